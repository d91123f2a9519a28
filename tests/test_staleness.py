"""Issue 14, stale results after weight edits: perspicio's private copies of a model (inference and
fused twins, merged BatchNorm weights, DeepLIFT reference passes, LRP's derived weights) must follow
ANY change of any parameter or buffer - also writes through ``.data`` (which do not bump the version
counter) that keep every norm and sum: a row swap, a sign flip, a negated BatchNorm running mean.

Each test warms every cache on the model, edits it in place through ``.data``, and requires the
results to equal those of a fresh deep copy of the edited model (which has no cache entries). On the
old code (state = storage, version counter and L2 norm) all three edits went unseen: occlusion and
KernelSHAP returned the results of the old weights, DeepLIFT a mixture.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import perspicio
from perspicio.core import caches


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)).flatten(1))


def _net() -> Net:
    g = torch.Generator().manual_seed(0)
    net = Net()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        # dyadic classifier weights: every square and partial sum is exact, so a row swap keeps the
        # norm bit for bit (as it does for the real models of the issue) whatever the summation order
        net.fc.weight.copy_(torch.randint(-8, 9, net.fc.weight.shape, generator=g) / 8)
        for bn in (net.features[1], net.features[4]):
            bn.running_mean.copy_(torch.randn(8, generator=g))
            bn.running_var.copy_(torch.rand(8, generator=g) + 0.5)
    return net.eval()


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


METHODS = {
    "occlusion": {"window": 4, "stride": 4},
    "kernel_shap": {"feature_mask": torch.arange(16).reshape(4, 4).repeat_interleave(4, 0).repeat_interleave(4, 1),
                    "budget": 64, "seed": 0},
    "deeplift": {},
    "lrp": {"composite": "epsilon_plus"},
}


def _swap_rows(net: Net) -> None:
    w = net.fc.weight.data
    w[[1, 3]] = w[[3, 1]].clone()


def _flip_sign(net: Net) -> None:
    net.features[3].weight.data.neg_()


def _negate_running_mean(net: Net) -> None:
    net.features[1].running_mean.data.neg_()


EDITS = {"swap_rows": _swap_rows, "flip_sign": _flip_sign, "negate_running_mean": _negate_running_mean}


def _explain(model: nn.Module, method: str) -> torch.Tensor:
    return perspicio.explain(model, _x(), method=method, target=[1, 3], **METHODS[method]).attributions


@pytest.mark.parametrize("edit", list(EDITS))
@pytest.mark.parametrize("method", list(METHODS))
def test_in_place_data_edit_is_seen(method: str, edit: str) -> None:
    net = _net()
    before = _explain(net, method)
    _explain(net, method)  # the second call with an unchanged state builds the twins
    norms = [p.norm().item() for p in (*net.parameters(), *net.buffers()) if p.is_floating_point()]
    EDITS[edit](net)
    # the edit keeps every norm: a fingerprint of norms (the old state key) cannot see it
    assert norms == [p.norm().item() for p in (*net.parameters(), *net.buffers()) if p.is_floating_point()]
    after = _explain(net, method)
    fresh = _explain(copy.deepcopy(net), method)
    assert not torch.equal(before, fresh)  # the edit changes the result
    torch.testing.assert_close(after, fresh, rtol=1e-5, atol=1e-6 * float(fresh.abs().max()))


def test_state_tokens_see_every_change() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.randn(6, 4, generator=g)
    tok = caches.state_tokens([t])
    assert caches.state_tokens([t]) == tok  # unchanged: same token
    t.data[0, 0] = torch.nextafter(t[0, 0], torch.tensor(float("inf")))  # one ulp, through .data
    tok2 = caches.state_tokens([t])
    assert tok2 != tok
    t.data[[0, 1]] = t.data[[1, 0]].clone()  # row swap
    tok3 = caches.state_tokens([t])
    assert tok3 != tok2
    t.data.neg_()  # sign flip
    assert caches.state_tokens([t]) != tok3
    tok4 = caches.state_tokens([t])
    t.data = t.data.t().contiguous().t()  # same values, other strides
    assert caches.state_tokens([t]) != tok4
    z = torch.zeros(3)
    tz = caches.state_tokens([z])
    z.data.neg_()  # 0.0 -> -0.0: other bytes
    assert caches.state_tokens([z]) != tz
    big = torch.randn(1 << 16, generator=g)  # compared as a numpy copy, not as bytes
    tb = caches.state_tokens([big])
    big.data[-1] += 1
    assert caches.state_tokens([big]) != tb
