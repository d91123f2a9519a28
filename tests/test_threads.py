"""Several threads, one model: each call returns what it returns alone and the model is left as found.

Without the per-model lock of ``model_guard`` the second thread snapshots the first one's frozen
state (every parameter left with ``requires_grad=False``), Grad-CAM's captured activation is
overwritten by the other thread's forward, and LRP sees the other call's canonizers.
"""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import TinyCNN
from torch import nn

import perspicio
from perspicio.core.guard import model_guard, model_lock


class ConvBN(TinyCNN):
    """TinyCNN with a BatchNorm after each convolution, with non-trivial statistics."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.bn1, self.bn2 = nn.BatchNorm2d(6), nn.BatchNorm2d(8)
        g = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for bn in (self.bn1, self.bn2):
                bn.weight.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act1(self.bn1(self.conv1(x)))
        a = self.act2(self.bn2(self.conv2(a)))
        return self.fc(self.pool(a).flatten(1))


CALLS = {
    "gradcam": {"layer": "act2"},
    "saliency": {},
    "integrated_gradients": {"steps": 32},
    "lrp": {},
    "deeplift": {},
    "occlusion": {"window": 4, "stride": 4},
}


def _state(model: nn.Module) -> tuple:
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
        [t.clone() for t in model.state_dict().values()],
    )


def _same_state(a: tuple, b: tuple) -> bool:
    return (a[0] == b[0] and a[1] == b[1] and all(x is y for x, y in zip(a[2], b[2]))
            and all(torch.equal(x, y) for x, y in zip(a[3], b[3])))


@pytest.mark.parametrize("n_threads", [2, 4])
def test_threads_on_one_model_match_single_thread_and_leave_model_untouched(n_threads):
    model = ConvBN().train()  # trainable, in training mode: the state a training loop leaves
    grad = torch.full_like(model.fc.weight, 0.25)
    model.fc.weight.grad = grad
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 12, 12, generator=g)
    before = _state(model)
    alone = {name: perspicio.explain(model, x, method=name, target=1, **opts).attributions
             for name, opts in CALLS.items()}
    assert _same_state(before, _state(model))

    errors: list[BaseException] = []
    mismatches: list[str] = []
    start = threading.Barrier(n_threads)

    def work(k: int) -> None:
        try:
            start.wait()
            names = list(CALLS)
            for i in range(20):
                name = names[(i + k) % len(names)]  # threads run different methods at the same time
                a = perspicio.explain(model, x, method=name, target=1, **CALLS[name]).attributions
                if not torch.allclose(a, alone[name], rtol=1e-5, atol=1e-6):
                    mismatches.append(f"thread {k} iteration {i}: {name}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors[0]
    assert not mismatches, mismatches[:5]
    after = _state(model)
    assert after[0] == before[0], "training flags changed"
    assert after[1] == before[1], "requires_grad changed"
    assert model.fc.weight.grad is grad
    assert _same_state(before, after)


def test_calls_on_different_models_are_not_serialised():
    a, b = ConvBN(0), ConvBN(1)
    x = torch.randn(1, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    entered, release = threading.Event(), threading.Event()

    def hold_a() -> None:
        with model_guard(a):
            entered.set()
            release.wait(timeout=60)

    t = threading.Thread(target=hold_a)
    t.start()
    try:
        assert entered.wait(timeout=30)
        done = threading.Event()

        def explain_b() -> None:
            perspicio.explain(b, x, method="saliency", target=0)
            done.set()

        t2 = threading.Thread(target=explain_b)
        t2.start()
        assert done.wait(timeout=60), "a call on model b waited for model a's lock"
        t2.join()
        # while a is held, another thread cannot enter a's guard
        assert not model_lock(a).acquire(timeout=0.05) or _release(model_lock(a))
    finally:
        release.set()
        t.join()


def _release(lock) -> bool:
    lock.release()
    return False


def test_nested_guard_in_one_thread_reenters():
    m = ConvBN()
    with model_guard(m), model_guard(m):
        assert all(not p.requires_grad for p in m.parameters())
    assert all(p.requires_grad for p in m.parameters())
