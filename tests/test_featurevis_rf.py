"""Receptive fields computed from the layers == brute-force gradient support."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from perspicio.errors import InputError, LayerError
from perspicio.featurevis import receptive_field
from perspicio.zoo.efficientnet import Conv2dSame, EfficientNetLite


def _positive(model: nn.Module, seed: int = 0) -> nn.Module:
    """Strictly positive weights: no gradient cancels, so the support is the full field."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand(p.shape, generator=g) + 0.1)
    return model.eval()


def brute_force_box(model: nn.Module, layer: nn.Module, shape: tuple[int, ...], pos: tuple[int, int], samples: int = 24):
    """Bounding box (top, left, bottom, right) of the pixels whose gradient of unit (0, *pos) is
    non-zero for some of ``samples`` random positive inputs."""
    g = torch.Generator().manual_seed(1)
    x = (torch.rand((samples, *shape), generator=g) + 0.05).requires_grad_(True)
    store = {}
    h = layer.register_forward_hook(lambda m, a, o: store.__setitem__("a", o))
    try:
        model(x)
    finally:
        h.remove()
    a = store["a"]
    (grad,) = torch.autograd.grad(a[:, 0, pos[0], pos[1]].sum(), x)
    support = grad.abs().sum(dim=(0, 1)) > 0
    rows = torch.nonzero(support.any(dim=1))[:, 0]
    cols = torch.nonzero(support.any(dim=0))[:, 0]
    return (int(rows.min()), int(cols.min()), int(rows.max()) + 1, int(cols.max()) + 1)


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 2, 3, padding=1)
        self.b = nn.Conv2d(2, 2, 5, padding=2, dilation=1)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1)
        self.out = nn.Conv2d(2, 2, 3, stride=2, dilation=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.a(x)) + self.b(x)  # union of a 3x3 and a 5x5 branch
        return self.out(self.pool(y))


class SamePad(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = Conv2dSame(2, 2, 3, stride=2)
        self.c2 = Conv2dSame(2, 2, 5, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.relu(self.c1(x)))


ARCHS = {
    "plain": (lambda: nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3), nn.ReLU()), "3", (2, 13, 13)),
    "stride_padding": (lambda: nn.Sequential(nn.Conv2d(2, 2, 5, stride=2, padding=2), nn.ReLU(),
                                             nn.Conv2d(2, 2, 3, stride=2, padding=1)), "2", (2, 23, 23)),
    "dilation": (lambda: nn.Sequential(nn.Conv2d(2, 2, 3, dilation=2, padding=2), nn.Conv2d(2, 2, 3, dilation=3)), "1", (2, 20, 20)),
    "maxpool": (lambda: nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.MaxPool2d(3, stride=2, padding=1),
                                      nn.Conv2d(2, 2, 3)), "2", (2, 19, 19)),
    "asymmetric_kernel": (lambda: nn.Sequential(nn.Conv2d(2, 2, (3, 5), stride=(1, 2), padding=(0, 2))), "0", (2, 12, 16)),
    "residual_avgpool": (Residual, "out", (2, 24, 24)),
    "tf_same_padding": (SamePad, "c2", (2, 21, 21)),
}


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_receptive_field_equals_gradient_support(arch: str) -> None:
    build, layer, shape = ARCHS[arch]
    model = _positive(build())
    rf = receptive_field(model, layer, shape)
    module = dict(model.named_modules())[layer]
    h, w = rf.grid
    for pos in [(0, 0), (h // 2, w // 2), (h - 1, w - 1), (0, w - 1)]:
        assert rf.box(*pos) == brute_force_box(model, module, shape, pos), (arch, pos, rf)


def test_known_values_hand_computed() -> None:
    m = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(1, 1, 3, stride=2, dilation=2, padding=2))
    rf = receptive_field(m, "3", (1, 32, 32))
    # conv3 p1: start -1, size 3; pool2: jump 2, size 4; conv3 s2 d2 p2: start -1-2*2, size 4+2*2*2, jump 4
    assert (rf.start, rf.jump, rf.size, rf.grid) == ((-5.0, -5.0), (4.0, 4.0), (12.0, 12.0), (8, 8))
    assert rf.box(0, 0, clip=False) == (-5, -5, 7, 7)
    assert rf.box(0, 0) == (0, 0, 7, 7)
    assert rf.box(2, 3) == (3, 7, 15, 19)


def test_efficientnet_block_matches_gradient_support() -> None:
    """The bundled architecture (TF-SAME padding, depthwise convs, residuals) at 64x64."""
    net = EfficientNetLite(10)
    for block in [net, *net._blocks]:  # ReLU6 would saturate with positive weights: the geometry is unchanged
        for name, m in list(block.named_children()):
            if isinstance(m, nn.ReLU6):
                setattr(block, name, nn.Identity())
    _positive(net)
    for m in net.modules():  # BN in eval mode with positive scale keeps gradients positive
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
    net.eval()
    for layer, size in (("_blocks.1", 48), ("_blocks.3", 64)):
        rf = receptive_field(net, layer, (3, size, size))
        module = dict(net.named_modules())[layer]
        h, w = rf.grid
        for pos in [(0, 0), (h // 2, w // 2), (h - 1, w - 1)]:
            assert rf.box(*pos) == brute_force_box(net, module, (3, size, size), pos, samples=2), (layer, pos, rf)


def test_bundled_model_values(zoo_model) -> None:
    rf = receptive_field(zoo_model, "_conv_stem", (3, 224, 224))
    assert (rf.start, rf.jump, rf.size, rf.grid) == ((0.0, 0.0), (2.0, 2.0), (3.0, 3.0), (112, 112))
    head = receptive_field(zoo_model, "_act_head", (3, 224, 224))
    assert head.grid == (7, 7) and head.jump == (32.0, 32.0)
    assert head.box(3, 3) == (0, 0, 224, 224)  # the head sees the whole image
    fc = receptive_field(zoo_model, "_fc", (3, 224, 224))
    assert fc.box(0, 0) == (0, 0, 224, 224)


def test_errors() -> None:
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(1, 1, 3)

        def forward(self, x):
            return self.c(F.interpolate(x, scale_factor=2))

    with pytest.raises(LayerError, match="interpolate"):
        receptive_field(Up(), "c", (1, 8, 8))
    m = nn.Sequential(nn.Conv2d(1, 1, 3))
    with pytest.raises(LayerError, match="not found"):
        receptive_field(m, "nope", (1, 8, 8))
    rf = receptive_field(m, "0", (1, 8, 8))
    with pytest.raises(InputError):
        rf.box(6, 0)
    with pytest.raises(InputError):
        receptive_field(m, "0", (1, 0, 8))
