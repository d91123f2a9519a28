"""Differential sweep: perspicio's CAMs on vision transformers against pytorch-grad-cam with its
documented ``reshape_transform`` (drop the class/distillation token(s), put the patch tokens on the
grid, channels first), at an explicitly chosen layer (``blocks[-1].norm1``).

Models (random weights, nothing downloads): timm ViT-Tiny at 64 x 64 and 96 x 96 (4 x 4 and
6 x 6 grids), timm DeiT distilled (2 extra tokens), a Hugging Face ``ViTForImageClassification``
wrapped to return its logits. perspicio's ``Explanation.raw`` is the map at the layer's (patch
grid) resolution, before any ReLU with ``relu=False``; it is compared with the map the reference's
``get_cam_image`` returns (recorded), to 1e-5 of the map's largest magnitude. ``attributions`` is
that map upsampled to the input (bilinear, half-pixel): compared with the reference's output after
the same ReLU and min-max scaling.

Matched settings where the definitions differ (docs/text.md, "CAMs on vision transformers"):

* Grad-CAM++: the reference adds 1e-6 to the alpha denominator ``2 g^2 + sum(A) g^3``. After a
  LayerNorm the activations are signed, the denominator crosses zero, and that epsilon moves the
  map by 1e-3 (measured here) -> the target logit is scaled by 1e8 (same target for both), where the
  epsilon is negligible (agreement then 1e-12 in float64).
* Score-CAM: ``weights="channel_softmax"`` and the reference's mask upsampler swapped for the
  half-pixel one (as in tests/test_cam_reference.py).
* Eigen-CAM: the SVD's sign is arbitrary -> compared up to sign per image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from perspicio.methods import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM

timm = pytest.importorskip("timm")
pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402

RTOL = 1e-5
CLASSES = [1, 3]
SCALE = 1e8


def _timm(name: str, size: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = timm.create_model(name, pretrained=False, img_size=size, depth=2, num_classes=5)
    return m.eval().double()


class HFLogits(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits


def _hf_vit() -> nn.Module:
    t = pytest.importorskip("transformers")
    cfg = t.ViTConfig(
        image_size=64,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = t.ViTForImageClassification(cfg)
    return HFLogits(m).eval().double()


def _hf_layer(m: nn.Module) -> str:
    names = [n for n, _ in m.named_modules() if n.endswith("layernorm_before")]
    return names[-1]  # the last block's (module paths differ between transformers versions)


MODELS = {
    "timm_vit_64": (lambda: _timm("vit_tiny_patch16_224", 64), 1, 64, None),
    "timm_vit_96": (lambda: _timm("vit_tiny_patch16_224", 96), 1, 96, None),
    "timm_deit_64": (lambda: _timm("deit_tiny_distilled_patch16_224", 64), 2, 64, None),
    "hf_vit_64": (_hf_vit, 1, 64, _hf_layer),
}


@pytest.fixture(scope="module", params=list(MODELS))
def vit_case(request):
    make, extra, size, layer_of = MODELS[request.param]
    model = make()
    layer = layer_of(model) if layer_of else "blocks.1.norm1"
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1)).double()
    return request.param, model, layer, extra, x


def reshape_transform(extra: int, side: int):
    def f(tokens: torch.Tensor) -> torch.Tensor:
        t = tokens[:, extra:]
        return t.reshape(t.shape[0], side, side, t.shape[-1]).permute(0, 3, 1, 2)

    return f


def reference(ref_cls, model, layer, x, extra, targets) -> tuple[np.ndarray, np.ndarray]:
    """(maps recorded from get_cam_image, final output) of pytorch-grad-cam."""
    module = dict(model.named_modules())[layer]
    ref = ref_cls(model, [module], reshape_transform=reshape_transform(extra, x.shape[-1] // 16))
    recorded: list = []
    inner = ref.get_cam_image

    def record(*args, **kwargs):
        out = inner(*args, **kwargs)
        recorded.append(np.asarray(out, dtype=np.float64))
        return out

    ref.get_cam_image = record
    try:
        full = ref(input_tensor=x, targets=targets)
    finally:
        ref.activations_and_grads.release()
        for p in model.parameters():
            p.grad = None
    assert len(recorded) == 1
    return recorded[0], np.asarray(full, dtype=np.float64)


def rel_err(ours: np.ndarray, ref: np.ndarray) -> float:
    scale = np.abs(ref).max()
    assert scale > 0, "degenerate reference map"
    return float(np.abs(ours - ref).max() / scale)


def minmax(m: np.ndarray) -> np.ndarray:
    m = np.maximum(m, 0)
    flat = m.reshape(len(m), -1)
    lo, hi = flat.min(1), flat.max(1)
    return (m - lo[:, None, None]) / (hi - lo)[:, None, None]


@pytest.fixture
def half_pixel_mask_upsampling(monkeypatch):
    def upsampler(size):
        return nn.Upsample(size=size, mode="bilinear", align_corners=False)

    monkeypatch.setattr(torch.nn, "UpsamplingBilinear2d", upsampler)


def test_gradcam_equals_reference_at_grid_and_full_resolution(vit_case) -> None:
    name, model, layer, extra, x = vit_case
    e = GradCAM(model, layer=layer, relu=False)(x, target=CLASSES)
    side = x.shape[-1] // 16
    assert e.raw.shape == (2, 1, side, side) and e.attributions.shape == (2, 1, *x.shape[-2:])
    raw, full = reference(
        pgc.GradCAM, model, layer, x, extra, [ClassifierOutputTarget(c) for c in CLASSES]
    )
    assert rel_err(e.raw[:, 0].numpy(), raw) < RTOL
    # full resolution: perspicio's default map (ReLU at the grid, then bilinear half-pixel upsampling
    # to the input) against the reference's output (ReLU, min-max, cv2's bilinear resize, min-max
    # again), after the same min-max scaling
    ours = GradCAM(model, layer=layer)(x, target=CLASSES)
    np.testing.assert_allclose(minmax(ours.attributions[:, 0].numpy()), full, atol=1e-5, rtol=0)


def test_gradcam_plus_plus_equals_reference_with_a_scaled_target(vit_case) -> None:
    name, model, layer, extra, x = vit_case
    idx = torch.tensor(CLASSES)
    e = GradCAMPlusPlus(model, layer=layer, relu=False)(
        x, target=lambda out: out.gather(1, idx[:, None]).squeeze(1) * SCALE
    )
    targets = [(lambda out, c=c: out[c] * SCALE) for c in CLASSES]
    raw, _ = reference(pgc.GradCAMPlusPlus, model, layer, x, extra, targets)
    assert rel_err(e.raw[:, 0].numpy(), raw) < RTOL


def test_scorecam_equals_reference(vit_case, half_pixel_mask_upsampling) -> None:
    name, model, layer, extra, x = vit_case
    e = ScoreCAM(model, layer=layer, relu=False, weights="channel_softmax")(x, target=CLASSES)
    raw, _ = reference(
        pgc.ScoreCAM, model, layer, x, extra, [ClassifierOutputTarget(c) for c in CLASSES]
    )
    assert rel_err(e.raw[:, 0].numpy(), raw) < RTOL


def test_eigencam_equals_reference_up_to_sign(vit_case) -> None:
    name, model, layer, extra, x = vit_case
    e = EigenCAM(model, layer=layer, relu=False)(x, target=CLASSES)
    raw, _ = reference(
        pgc.EigenCAM, model, layer, x, extra, [ClassifierOutputTarget(c) for c in CLASSES]
    )
    ours = e.raw[:, 0].numpy()
    for i in range(len(x)):
        err = min(
            rel_err(ours[i : i + 1], raw[i : i + 1]), rel_err(-ours[i : i + 1], raw[i : i + 1])
        )
        assert err < RTOL, (name, i, err)
