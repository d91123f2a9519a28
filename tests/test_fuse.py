"""Fused twin: convolution + activation (+ asymmetric zero padding) as one oneDNN call for
output-only passes - equal to the folded twin, only where the trace proves it, with fallbacks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import perspicio
from perspicio.core import fold, fuse, kernels
from perspicio.core.batching import Engine

pytestmark = pytest.mark.skipif(not kernels.available(),
                                reason="this torch build has no oneDNN pointwise convolution")


def _x(n: int = 2, size: int = 15, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


class PadConv(nn.Conv2d):
    """A convolution that zero-pads its input itself, asymmetrically (like TensorFlow's SAME)."""

    def __init__(self, *args, pads: tuple[int, int, int, int], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.pads = pads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pads))


class Pads(nn.Module):
    """Every fusable activation, an asymmetric padding on either side, a reused output, a dilated conv."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        acts = [nn.ReLU(), nn.ReLU6(inplace=True), nn.Hardtanh(-1.0, 2.0), nn.SiLU(), nn.Sigmoid(), nn.Tanh(),
                nn.Hardswish(), nn.LeakyReLU(0.2), nn.GELU(approximate="tanh"), nn.GELU()]
        # right/bottom-heavy padding, then left/top-heavy; grouped, depthwise and dense; with and without bias
        self.convs = nn.ModuleList(PadConv(3 if i == 0 else 6, 6, 3, stride=2 if i in (1, 3) else 1,
                                           groups=1 if i % 3 else 3 if i == 0 else 6, bias=i % 2 == 0,
                                           pads=(0, 1, 0, 1) if i % 2 else (2, 0, 1, 0)) for i in range(len(acts)))
        self.bns = nn.ModuleList(nn.BatchNorm2d(6) for _ in acts)
        self.acts = nn.ModuleList(acts)
        self.shared = nn.Conv2d(6, 6, 1)
        self.dilated = PadConv(6, 6, 3, dilation=2, pads=(0, 1, 0, 1))
        self.head = nn.Linear(6, 4)
        with torch.no_grad():
            for bn in self.bns:
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn, act in zip(self.convs, self.bns, self.acts):
            x = act(bn(conv(x)))
        s = self.shared(x)
        x = F.relu(s) + s  # the output feeds two operations: not fused
        x = torch.relu(self.dilated(x))  # dilation with asymmetric padding: not fused
        return self.head(x.mean((2, 3)))


def test_fused_twin_equals_folded_twin_for_every_activation_and_padding() -> None:
    model = Pads().eval()
    x = _x(3, 96)
    twin, folded = fold.inference_twin(model, x)
    assert folded == len(model.bns)
    fused, n = fuse.fused_twin(twin, x)
    # the dilated convolution is left alone; the shared one (its output feeds two operations) runs
    # alone on its pre-packed kernel where oneDNN packs kernels
    assert n == len(model.acts) + int(kernels.PACKING)
    assert sum(isinstance(m, fuse.FusedConv2d) for m in fused.modules()) == n
    assert sum(m.attr != "none" for m in fused.modules() if isinstance(m, fuse.FusedConv2d)) == len(model.acts)
    assert sum(m.padding != [0, 0] for m in fused.modules() if isinstance(m, fuse.FusedConv2d)) == len(model.acts)
    with torch.no_grad():
        ref = model(x)
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            torch.testing.assert_close(fused(xx), ref, rtol=1e-4, atol=1e-5)


def test_without_kernel_packing_only_activation_pairs_are_fused(monkeypatch) -> None:
    # a torch without oneDNN's weight reorder: plain convolutions stay, fused calls take the dense kernel
    monkeypatch.setattr(kernels, "PACKING", False)
    monkeypatch.setattr(kernels, "pack_kernel", lambda *args: None)
    model = Pads().eval()
    x = _x(2, 96)
    twin, _ = fold.inference_twin(model, x)
    fused, n = fuse.fused_twin(twin, x)
    assert n == len(model.acts)
    assert all(m.packed is None for m in fused.modules() if isinstance(m, fuse.FusedConv2d))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_other_sizes_gradients_and_dtypes_run_the_original_layers() -> None:
    model = Pads().eval()
    twin, _ = fold.inference_twin(model, _x(1, 96))
    fused, n = fuse.fused_twin(twin, _x(1, 96))
    assert n > 0
    with torch.no_grad():  # another input size: padding differs, the fused calls step aside
        torch.testing.assert_close(fused(_x(2, 80)), model(_x(2, 80)), rtol=1e-4, atol=1e-5)
        xd = _x(1, 96).double()
        torch.testing.assert_close(fused.double()(xd), model.double()(xd), rtol=1e-9, atol=1e-9)
    model.float()
    xg = _x(1, 96).requires_grad_(True)
    g = torch.autograd.grad(fused.float()(xg).sum(), xg)[0]  # with gradients: the original layers
    assert torch.isfinite(g).all() and g.abs().sum() > 0


def test_bundled_model_is_fused_and_bit_identical(zoo_model, chelsea_batch) -> None:
    model = zoo_model.model
    x = chelsea_batch[:1]
    twin, _ = fold.inference_twin(model, x)
    fused, n = fuse.fused_twin(twin, x)
    # stem, head, every expansion and depthwise convolution with its ReLU6 (33), and where kernels
    # are pre-packed the 16 projections too
    assert n == (49 if kernels.PACKING else 33)
    assert sum(m.attr == "hardtanh" for m in fused.modules() if isinstance(m, fuse.FusedConv2d)) == 33
    xb = x.repeat(3, 1, 1, 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(fused(xb), twin(xb))


def test_resnet_reused_relu_is_not_fused() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(num_classes=5).eval()
    x = _x(1, 64)
    twin, _ = fold.inference_twin(model, x)
    fused, n = fuse.fused_twin(twin, x)
    # only the stem with its ReLU: every block calls its one ReLU module twice (with packing, every
    # convolution runs alone on its packed kernel)
    assert n == (20 if kernels.PACKING else 1)
    assert sum(m.attr == "relu" for m in fused.modules() if isinstance(m, fuse.FusedConv2d)) == 1
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)


def test_engine_evaluate_reports_fusion_and_env_switch(monkeypatch) -> None:
    model = Pads().eval()
    x = _x(4, 96)
    e = Engine(model)
    with torch.no_grad():
        out = e.evaluate(x)
    assert e.stats()["convolutions_fused"] == len(model.acts) + int(kernels.PACKING)
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(fuse, "FUSE", False)
    e2 = Engine(model)
    with torch.no_grad():
        e2.evaluate(x)
    assert "convolutions_fused" not in e2.stats()


def test_methods_agree_with_and_without_fusion(monkeypatch) -> None:
    model = Pads().eval()
    x = _x(1, 96)
    a = perspicio.explain(model, x, method="occlusion", window=8, stride=8, target=1)
    monkeypatch.setattr(fuse, "FUSE", False)
    b = perspicio.explain(model, x, method="occlusion", window=8, stride=8, target=1)
    torch.testing.assert_close(a.attributions, b.attributions, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf"])
def test_torchvision_models_fused_and_equal(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=7).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    x = _x(1, 64)
    twin, _ = fold.inference_twin(model, x)
    fused, n = fuse.fused_twin(twin, x)
    assert n > 10  # Hardswish / SiLU / ReLU after convolutions (also inside squeeze-excitation)
    xb = _x(3, 64, seed=1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(xb)
        torch.testing.assert_close(fused(xb), ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


PROPAGATION = [("lrp", {"composite": "epsilon_plus_flat"}), ("lrp", {"composite": "epsilon_gamma_box"}),
               ("lrp", {"composite": "epsilon_alpha2_beta1"}), ("lrp", {"rule": "wsquare"}),
               ("lrp", {"rule": "epsilon"}), ("deeplift", {"baseline": "zero"}),
               ("deeplift", {"baseline": "zero", "rule": "reveal_cancel"}), ("deep_shap", {"samples": 2}),
               # the reference pass itself through the fused twin (not replayed from the first call's cache)
               ("deeplift", {"baseline": "uniform", "cache_reference": False}),
               ("deep_shap", {"samples": 2, "cache_reference": False})]


@pytest.mark.parametrize("method, kw", PROPAGATION, ids=[f"{m}-{'-'.join(map(str, k.values()))}" for m, k in PROPAGATION])
def test_propagation_through_the_fused_twin_equals_the_unfused_model(monkeypatch, method: str, kw: dict) -> None:
    """LRP/DeepLIFT propagate through the fused twin: one node per convolution + activation for
    rules that read only the layer's input, the pair split back into its two operations (with
    the extended kernel) for the others - the same relevance as without fusion."""
    model = Pads().eval()
    x = _x(2, 96, seed=3)

    def explain() -> perspicio.Explanation:
        return perspicio.explain(model, x, method=method, target=1, **kw)

    explain()  # the twin is built once the model's state repeats between calls
    a = explain()
    assert a.provenance["convolutions_fused"] == len(model.acts) + int(kernels.PACKING)
    monkeypatch.setattr(fuse, "FUSE", False)
    b = explain()
    assert b.provenance["convolutions_fused"] == 0
    scale = b.attributions.abs().max()
    assert scale > 0
    torch.testing.assert_close(a.attributions / scale, b.attributions / scale, rtol=0, atol=2e-5)


def test_flat_rule_skips_the_taps_added_for_a_folded_padding(monkeypatch) -> None:
    # the first convolution pads (2, 0) x (1, 0): its fused kernel has zero taps on the far side,
    # which LRP-flat (every tap alike) must not count
    model = Pads().eval()
    x = _x(1, 96, seed=4)
    explain = lambda: perspicio.explain(model, x, method="lrp", composite="epsilon_plus_flat", target=2)  # noqa: E731
    explain()
    good = explain().attributions
    scale = good.abs().max()
    monkeypatch.setattr(kernels.TAP_MASKS, "get", lambda *a, **k: None)  # forget the real taps
    bad = explain().attributions
    assert (good - bad).abs().max() > 1e-2 * scale
    monkeypatch.setattr(fuse, "FUSE", False)
    torch.testing.assert_close(explain().attributions / scale, good / scale, rtol=0, atol=2e-5)
