"""The inference twin (BatchNorm folded into the preceding layer) used for output-only passes."""

from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import perspicio
from perspicio.core import caches, fold
from perspicio.core.batching import Engine
from perspicio.errors import OptionError


def _bn(c: int, seed: int) -> nn.BatchNorm2d:
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
    return bn


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = _bn(4, 1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=4)  # depthwise, with bias
        self.bn2 = _bn(4, 2)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = F.relu(self.bn2(self.conv2(h))) + h
        return self.head(h.mean((2, 3)))


class SharedConvOutput(ConvBN):
    """conv1's output feeds bn1 AND a skip: folding bn1 into conv1 would change the skip."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv1(x)
        h = F.relu(self.bn1(z)) + z
        h = F.relu(self.bn2(self.conv2(h)))  # this pair can be folded
        return self.head(h.mean((2, 3)))


class FunctionalBN(ConvBN):
    """Calls F.batch_norm with bn1's buffers itself: swapping the module cannot fold it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.bn1
        h = F.batch_norm(self.conv1(x), b.running_mean, b.running_var, b.weight, b.bias, False, 0.0, b.eps)
        return self.head(F.relu(h).mean((2, 3)))


def _x(n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(5))


def test_twin_folds_every_pair_and_matches_outputs():
    model = ConvBN().eval()
    twin, folded = fold.inference_twin(model, _x())
    assert folded == 2 and twin is not model
    assert not any(isinstance(m, nn.BatchNorm2d) for m in twin.modules())
    with torch.no_grad():
        torch.testing.assert_close(twin(_x()), model(_x()), rtol=1e-5, atol=1e-5)


def test_user_model_untouched_and_cache_is_weak():
    model = ConvBN().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fold.inference_twin(model, _x())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model.bn1, nn.BatchNorm2d) and model.conv1.bias is None
    assert caches.entry("inference twins", model) is not None
    del model
    gc.collect()
    assert len([m for m in caches.owners("inference twins") if isinstance(m, ConvBN)]) == 0


def test_twin_rebuilt_after_weights_change():
    model = ConvBN().eval()
    fold.inference_twin(model, _x())
    with torch.no_grad():
        model.bn2.running_mean.add_(1.0)  # in place: version counter moves
    twin, _ = fold.inference_twin(model, _x())
    with torch.no_grad():
        torch.testing.assert_close(twin(_x()), model(_x()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,expected", [(SharedConvOutput, 1), (FunctionalBN, 0)])
def test_unfoldable_pairs_are_left_alone(cls, expected):
    model = cls().eval()
    twin, folded = fold.inference_twin(model, _x())
    assert folded == expected
    with torch.no_grad():
        torch.testing.assert_close(twin(_x()), model(_x()), rtol=1e-5, atol=1e-5)


def test_training_mode_batchnorm_is_not_folded():
    model = ConvBN().train()
    twin, folded = fold.inference_twin(model, _x())
    assert twin is model and folded == 0


def test_engine_evaluate_uses_twin_only_without_grad():
    model = ConvBN().eval()
    eng = Engine(model)
    with torch.no_grad():
        out = eng.evaluate(_x())
    assert eng.folded == 2 and eng.forwards == 2 and eng.stats()["batchnorm_folded"] == 2
    eng2 = Engine(model)
    x = _x().requires_grad_()
    out2 = eng2.evaluate(x)  # gradients wanted: the user's model itself
    assert out2.requires_grad and eng2.folded is None
    torch.testing.assert_close(out, out2.detach(), rtol=1e-5, atol=1e-5)


def test_hooks_stay_on_the_original():
    model = ConvBN().eval()
    seen = []
    handle = model.conv2.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    try:
        twin, _ = fold.inference_twin(model, _x())
        seen.clear()
        with torch.no_grad():
            twin(_x())
        assert seen == []
    finally:
        handle.remove()


def test_methods_agree_with_and_without_folding(monkeypatch):
    model = ConvBN().eval()
    x = _x(1)
    on = perspicio.explain(model, x, method="occlusion", target=1, window=4, stride=2)
    assert on.provenance["batchnorm_folded"] == 2
    monkeypatch.setattr(fold, "FOLD_BATCHNORM", False)
    off = perspicio.explain(model, x, method="occlusion", target=1, window=4, stride=2)
    assert "batchnorm_folded" not in off.provenance
    torch.testing.assert_close(on.attributions, off.attributions, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- compile=True (opt-in)


def _bn_net() -> nn.Module:
    gen = torch.Generator().manual_seed(5)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(8, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(8, generator=gen) + 0.5)
    return net


def test_compile_equals_uncompiled_and_pads_short_chunks() -> None:
    from perspicio import explain

    net = _bn_net()
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    opts = {"method": "rise", "budget": 40, "seed": 0, "target": 1, "batch_size": 16}  # chunks 16, 16, 8 (padded)
    fast = explain(net, x, compile=True, **opts)
    plain = explain(net, x, **opts)
    assert fast.provenance["compiled_samples"] == 40 and "compiled_samples" not in plain.provenance
    torch.testing.assert_close(fast.attributions, plain.attributions, atol=1e-6, rtol=1e-5)
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    assert not hasattr(net, "_perspicio_compiled") and type(net) is nn.Sequential  # the user's model is never compiled


def test_compile_failure_warns_and_runs_uncompiled(monkeypatch) -> None:
    from perspicio import explain

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler found")

    monkeypatch.setattr(torch, "compile", broken)
    net = _bn_net()
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(RuntimeWarning, match="torch.compile could not be used .*no C.. compiler"):
        e = explain(net, x, method="rise", budget=16, seed=0, target=0, batch_size=16, compile=True)
    assert "compiled_samples" not in e.provenance
    with pytest.raises(OptionError, match="compile must be True or False"):
        explain(net, x, method="rise", compile="yes")


def test_twin_sees_writes_through_data():
    # `.data` writes (EMA updates, weight surgery) do not move the version counter: the norm in the
    # fingerprint catches them
    model = ConvBN().eval()
    fold.inference_twin(model, _x())
    version = model.conv1.weight._version
    model.conv1.weight.data.mul_(2.0)
    assert model.conv1.weight._version == version
    twin, _ = fold.inference_twin(model, _x())
    with torch.no_grad():
        torch.testing.assert_close(twin(_x()), model(_x()), rtol=1e-5, atol=1e-5)


class Flagged(ConvBN):
    """A model whose function depends on a plain attribute, not only on its weights."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * self.scale


def test_twin_rebuilt_after_attribute_change():
    model = Flagged().eval()
    x = _x()
    twin, _ = fold.inference_twin(model, x)
    model.scale = 3.0  # not a tensor: only the attribute signature can see it
    twin2, _ = fold.inference_twin(model, x)
    assert twin2 is not twin
    with torch.no_grad():
        torch.testing.assert_close(twin2(x), model(x), rtol=1e-5, atol=1e-5)
    e = perspicio.explain(model, x, method="deeplift", target=0)  # runs on the twin
    with torch.no_grad():
        delta = model(x)[:, 0] - model(torch.zeros_like(x))[:, 0]
    torch.testing.assert_close(e.attributions.flatten(1).sum(1), delta, rtol=1e-4, atol=1e-5)


def test_model_changing_attributes_every_call_stops_being_copied():
    model = Flagged().eval()
    x = _x()
    for i in range(fold.MAX_CHURN + 2):
        model.scale = 1.0 + i
        module, _ = fold.inference_twin(model, x)
    assert module is model  # not deep-copied on every call any more
    with torch.no_grad():
        model.conv1.weight.mul_(0.5)  # a weight change starts over
    module, _ = fold.inference_twin(model, x)
    assert module is not model
