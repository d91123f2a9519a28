"""Differential tests: perspicio's CAMs against pytorch-grad-cam and Captum's LayerGradCam.

Compared at the layer's resolution: our un-upsampled ``Explanation.raw`` (with
``relu=False``) against the reference's own un-normalised map (recorded from its
``get_cam_image``), to 1e-4 relative to the map's largest magnitude; then the
min-max normalised, ReLU'd maps (and, for gradient CAMs, the full-resolution
output after pytorch-grad-cam's cv2 resize) to 1e-4 absolute.

Deliberate differences, and the configuration tested instead:

* Score-CAM: our default weights are the paper's softmax probabilities; pytorch-grad-cam
  uses a softmax over channels of the target logits -> compare ``weights="channel_softmax"``.
  It also upsamples the masks with ``UpsamplingBilinear2d`` (align_corners=True); we
  (and the Score-CAM authors' code) use align_corners=False -> the oracle's upsampler is
  swapped for the half-pixel one in the test.
* Grad-CAM++: pytorch-grad-cam adds 1e-6 to the alpha denominator, which dominates when
  gradients are ~1e-3 (the bundled model's head); we use the exact formula -> compare on
  the target logit scaled by 1e4 (same target for both), where the epsilon is negligible.
* Eigen-CAM: the SVD's sign is arbitrary; we orient the map to correlate positively with
  the channel-mean activation -> compare up to sign.
* Ablation-CAM: pytorch-grad-cam ablates with 0 only when the layer's minimum is 0 (else
  min - 1e7); the paper sets the channel to 0 -> compare on ReLU layers (minimum 0).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torch.nn.functional as F
from captum.attr import LayerGradCam
from conftest import pgc_recorded_maps
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from perspicio.methods import (
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)

RTOL = 1e-4
CAT = 285  # "Egyptian cat"

GRADIENT_PAIRS = {
    "gradcam": (GradCAM, pgc.GradCAM),
    "hirescam": (HiResCAM, pgc.HiResCAM),
    "layercam": (LayerCAM, pgc.LayerCAM),
    "xgradcam": (XGradCAM, pgc.XGradCAM),
    "gradcampp": (GradCAMPlusPlus, pgc.GradCAMPlusPlus),
}


# ---------------------------------------------------------------------------- a second architecture


class SmallResNet(nn.Module):
    """A small residual CNN of our own (BatchNorm with non-trivial running statistics,
    in-place ReLUs, a residual add, stride-2 convolutions), 10 classes, 32x32 inputs."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.conv_a = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.relu_a = nn.ReLU(inplace=True)
        self.conv_b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn_b = nn.BatchNorm2d(8)
        self.relu_b = nn.ReLU()
        self.down = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn_down = nn.BatchNorm2d(16)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * (0.3 if "weight" in name else 0.1))
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.bn_b(self.conv_b(self.relu_a(self.bn_a(self.conv_a(x)))))
        x = self.relu_b(x + y)
        x = self.act(self.bn_down(self.down(x)))
        return self.fc(self.pool(x).flatten(1))


@pytest.fixture(scope="module")
def small():
    """(model, input (2, 3, 32, 32), targets) for the second architecture."""
    model = SmallResNet().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    return model, x, [3, 7]


@pytest.fixture(scope="module")
def bundled(zoo_model, chelsea_batch):
    """A private copy of the bundled model for the oracles (pytorch-grad-cam calls
    ``.backward()``, filling ``param.grad``, and swaps layers), plus the chelsea batch."""
    return copy.deepcopy(zoo_model.model).eval(), chelsea_batch


# ---------------------------------------------------------------------------- helpers


def reference_maps(ref_cls: type, model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list) -> tuple:
    """Run a pytorch-grad-cam method; return (its un-normalised maps at layer resolution,
    recorded from ``get_cam_image`` before its ReLU/scaling, and its final output)."""
    recorded, full = pgc_recorded_maps(ref_cls, model, [layer], x, targets)
    assert len(recorded) == 1
    return recorded[0], full


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    scale = np.abs(ref).max()
    assert scale > 0, "degenerate reference map"
    return float(np.abs(ours - ref).max() / scale)


def normalised(m: np.ndarray) -> np.ndarray:
    """ReLU, then min-max per sample (pytorch-grad-cam's display normalisation)."""
    m = np.maximum(m, 0)
    flat = m.reshape(len(m), -1)
    lo, hi = flat.min(1), flat.max(1)
    return (m - lo[:, None, None]) / (hi - lo)[:, None, None]


def check_agreement(ours_raw: torch.Tensor, ref_raw: np.ndarray) -> None:
    o = ours_raw[:, 0].double().numpy()
    assert o.shape == ref_raw.shape
    assert rel_err(o, ref_raw) < RTOL
    np.testing.assert_allclose(normalised(o), normalised(ref_raw), atol=RTOL, rtol=0)


def module(model: nn.Module, name: str) -> nn.Module:
    return dict(model.named_modules())[name]


def targets_for(name: str, classes: list[int]) -> tuple[list, object]:
    """(pytorch-grad-cam targets, our target) for the same class logits; for Grad-CAM++ the
    logits are scaled by 1e4 so the oracle's 1e-6 epsilon is negligible (see module doc)."""
    if name != "gradcampp":
        return [ClassifierOutputTarget(c) for c in classes], classes
    scale = 1e4
    idx = torch.tensor(classes)
    theirs = [(lambda out, c=c: out[c] * scale) for c in classes]
    return theirs, (lambda out: out.gather(1, idx[:, None]).squeeze(1) * scale)


# ---------------------------------------------------------------------------- gradient CAMs


@pytest.mark.parametrize("name", list(GRADIENT_PAIRS))
@pytest.mark.parametrize("layer", ["_act_head", "_blocks.10._act1"])
def test_gradient_cams_match_pytorch_grad_cam_on_bundled_model(bundled, name: str, layer: str) -> None:
    model, x = bundled
    ours_cls, ref_cls = GRADIENT_PAIRS[name]
    ref_t, our_t = targets_for(name, [CAT])
    e = ours_cls(model, layer=layer, relu=False)(x, target=our_t)
    ref_raw, _ = reference_maps(ref_cls, model, module(model, layer), x, ref_t)
    check_agreement(e.raw, ref_raw)


@pytest.mark.parametrize("name", ["gradcam", "layercam"])
def test_full_resolution_maps_match_pytorch_grad_cam(bundled, name: str) -> None:
    """Upsampled output: our bilinear (half-pixel) upsampling vs the oracle's cv2 resize,
    both ReLU'd at layer resolution and min-max normalised."""
    model, x = bundled
    ours_cls, ref_cls = GRADIENT_PAIRS[name]
    e = ours_cls(model)(x, target=CAT)  # default layer: _act_head
    assert e.layer == "_act_head" and e.attributions.shape == (1, 1, 224, 224)
    _, ref_full = reference_maps(ref_cls, model, model._act_head, x, [ClassifierOutputTarget(CAT)])
    np.testing.assert_allclose(normalised(e.attributions[:, 0].double().numpy()), ref_full, atol=RTOL, rtol=0)


@pytest.mark.parametrize("name", list(GRADIENT_PAIRS))
@pytest.mark.parametrize("layer", ["act", "relu_b", "stem.2"])
def test_gradient_cams_match_pytorch_grad_cam_on_small_resnet(small, name: str, layer: str) -> None:
    model, x, targets = small
    ours_cls, ref_cls = GRADIENT_PAIRS[name]
    ref_t, our_t = targets_for(name, targets)
    e = ours_cls(model, layer=layer, relu=False)(x, target=our_t)
    ref_raw, _ = reference_maps(ref_cls, model, module(model, layer), x, ref_t)
    check_agreement(e.raw, ref_raw)


@pytest.mark.parametrize("layer", ["_act_head", "_blocks.15"])
def test_gradcam_matches_captum_on_bundled_model(bundled, layer: str) -> None:
    model, x = bundled
    for relu in (False, True):
        ours = GradCAM(model, layer=layer, relu=relu)(x, target=CAT).raw
        theirs = LayerGradCam(model, module(model, layer)).attribute(x, target=CAT, relu_attributions=relu)
        assert rel_err(ours.double().numpy(), theirs.detach().double().numpy()) < RTOL


@pytest.mark.parametrize("layer", ["act", "relu_b", "bn_down"])
def test_gradcam_matches_captum_on_small_resnet(small, layer: str) -> None:
    model, x, targets = small
    ours = GradCAM(model, layer=layer, relu=False)(x, target=targets).raw
    theirs = LayerGradCam(model, module(model, layer)).attribute(x, target=torch.tensor(targets))
    assert rel_err(ours.double().numpy(), theirs.detach().double().numpy()) < RTOL


# ---------------------------------------------------------------------------- Eigen-CAM


def check_eigen(ours_raw: torch.Tensor, ref_raw: np.ndarray) -> None:
    o = ours_raw[:, 0].double().numpy()
    for n in range(len(o)):  # per sample: same map up to the SVD's sign
        sign = 1.0 if (o[n] * ref_raw[n]).sum() >= 0 else -1.0
        assert rel_err(o[n], sign * ref_raw[n]) < RTOL


@pytest.mark.parametrize("layer", ["_act_head", "_blocks.10._act1"])
def test_eigencam_matches_up_to_sign_on_bundled_model(bundled, layer: str) -> None:
    model, x = bundled
    e = EigenCAM(model, layer=layer, relu=False)(x)
    ref_raw, _ = reference_maps(pgc.EigenCAM, model, module(model, layer), x, [ClassifierOutputTarget(CAT)])
    check_eigen(e.raw, ref_raw)


def test_eigencam_matches_up_to_sign_on_small_resnet(small) -> None:
    model, x, targets = small
    for layer in ("act", "stem.2"):
        e = EigenCAM(model, layer=layer, relu=False)(x)
        ref_raw, _ = reference_maps(pgc.EigenCAM, model, module(model, layer), x, [ClassifierOutputTarget(c) for c in targets])
        check_eigen(e.raw, ref_raw)


# ---------------------------------------------------------------------------- Score-CAM, Ablation-CAM


@pytest.fixture
def half_pixel_mask_upsampling(monkeypatch):
    """Make pytorch-grad-cam's Score-CAM upsample its masks like ours (align_corners=False)."""

    def upsampler(size):
        return nn.Upsample(size=size, mode="bilinear", align_corners=False)

    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d", upsampler)


@pytest.fixture(scope="module")
def small_bundled_input(bundled):
    """Chelsea at 96x96 (cheap: Score/Ablation-CAM cost one forward per channel)."""
    model, x = bundled
    return F.interpolate(x, size=(96, 96), mode="bilinear", antialias=True, align_corners=False)


def test_scorecam_matches_pytorch_grad_cam_on_bundled_model(bundled, small_bundled_input, half_pixel_mask_upsampling) -> None:
    model, _ = bundled
    layer = "_blocks.1._act1"  # 96 channels at 24x24
    e = ScoreCAM(model, layer=layer, relu=False, weights="channel_softmax")(small_bundled_input, target=CAT)
    ref_raw, _ = reference_maps(pgc.ScoreCAM, model, module(model, layer), small_bundled_input, [ClassifierOutputTarget(CAT)])
    check_agreement(e.raw, ref_raw)


def test_scorecam_matches_pytorch_grad_cam_on_small_resnet(small, half_pixel_mask_upsampling) -> None:
    model, x, targets = small
    for layer in ("act", "stem.2"):
        e = ScoreCAM(model, layer=layer, relu=False, weights="channel_softmax", batch_size=6)(x, target=targets)
        ref_raw, _ = reference_maps(pgc.ScoreCAM, model, module(model, layer), x, [ClassifierOutputTarget(c) for c in targets])
        check_agreement(e.raw, ref_raw)


def test_ablationcam_matches_pytorch_grad_cam_on_bundled_model(bundled, small_bundled_input) -> None:
    model, _ = bundled
    layer = "_blocks.1._act1"  # ReLU6 output: the oracle ablates with 0 like the paper
    e = AblationCAM(model, layer=layer, relu=False)(small_bundled_input, target=CAT)
    ref_raw, _ = reference_maps(pgc.AblationCAM, model, module(model, layer), small_bundled_input, [ClassifierOutputTarget(CAT)])
    check_agreement(e.raw, ref_raw)


def test_ablationcam_matches_pytorch_grad_cam_on_small_resnet(small) -> None:
    model, x, targets = small
    for layer in ("act", "relu_b"):
        e = AblationCAM(model, layer=layer, relu=False, batch_size=5)(x, target=targets)
        ref_raw, _ = reference_maps(pgc.AblationCAM, model, module(model, layer), x, [ClassifierOutputTarget(c) for c in targets])
        check_agreement(e.raw, ref_raw)


def test_oracle_left_bundled_model_intact(bundled, zoo_model) -> None:
    """The oracles ran on a private copy; the shared bundled model has no grads or swapped layers."""
    assert all(p.grad is None for p in zoo_model.model.parameters())
    assert type(zoo_model.model._act_head) is nn.ReLU6
