"""Object detection: a torchvision detector (random weights, offline) explained for one
predicted box's score with ``output=perspicio.detections`` and ``perspicio.BoxScoreTarget``,
by Grad-CAM and occlusion; Grad-CAM is checked against pytorch-grad-cam's
``FasterRCNNBoxScoreTarget`` (same definition with ``add_iou=True`` when every detection
has the explained label)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import perspicio
from perspicio.errors import LayerError, ModelError, TargetError

torchvision = pytest.importorskip("torchvision")

LAYER = "backbone.body.12"


def seeded_detector() -> torch.nn.Module:
    """Faster R-CNN (MobileNetV3 FPN, 3 classes) at 160 px with deterministic random weights from
    a local generator: He-normal weights, zero biases, BatchNorm scales 1, the box/class
    heads scaled down so that boxes are predicted with scores around 0.5 (not saturated)."""
    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3, min_size=160, max_size=160, box_detections_per_img=10)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                scale = 1e-3 if any(k in name for k in ("bbox_pred", "cls_logits", "cls_score")) else 1.0
                p.copy_(torch.randn(p.shape, generator=g) * scale * math.sqrt(2 / p[0].numel()))
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.fill_(1.0)
    return model.eval()


@pytest.fixture(scope="module")
def detector():
    model = seeded_detector()
    x = torch.rand(1, 3, 160, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        det = model(x)[0]
    assert len(det["scores"]) > 0, "the seeded detector predicts no box"
    return model, x, det


def test_detections_output_is_a_padded_tensor(detector) -> None:
    model, x, det = detector
    with torch.no_grad():
        t = perspicio.detections(model(x))
    k = len(det["scores"])
    assert t.shape == (1, 100, 6)
    torch.testing.assert_close(t[0, :k, :4], det["boxes"])
    torch.testing.assert_close(t[0, :k, 4], det["scores"])
    assert t[0, :k, 5].tolist() == det["labels"].float().tolist()
    assert (t[0, k:, 5] == -1).all() and (t[0, k:, :5] == 0).all()


def test_without_output_the_error_names_the_detection_structure(detector) -> None:
    model, x, _ = detector
    with pytest.raises(ModelError, match=r"list of 1 item: \[0\] dict with keys 'boxes' \(tensor \(10, 4\)\).*"
                                         r"output=perspicio.detections"):
        perspicio.explain(model, x, "gradcam", layer=LAYER)


def test_box_score_target_scores_the_matching_detection(detector) -> None:
    model, x, det = detector
    with torch.no_grad():
        out = perspicio.detections(model(x))
    box, label = det["boxes"][0], int(det["labels"][0])
    assert perspicio.BoxScoreTarget(box, label)(out).item() == pytest.approx(det["scores"][0].item())
    two = perspicio.BoxScoreTarget(det["boxes"][:2], det["labels"][:2])(out).item()
    assert two == pytest.approx(det["scores"][:2].sum().item())
    shifted = box + torch.tensor([1.0, 1.0, -1.0, -1.0])
    with_iou = perspicio.BoxScoreTarget(shifted, label, add_iou=True)(out).item()
    inner = (box[2] - box[0] - 2) * (box[3] - box[1] - 2) / ((box[2] - box[0]) * (box[3] - box[1]))
    assert with_iou == pytest.approx(det["scores"][0].item() + inner.item(), rel=1e-5)
    # another label, or a box far from every detection: nothing to explain
    far = perspicio.BoxScoreTarget([0.0, 0.0, 2.0, 2.0], label)
    assert far(out).item() == 0
    with pytest.raises(TargetError, match=r"reference box 0 \[0.0, 0.0, 2.0, 2.0\] \(label \d\) matches no detection"):
        perspicio.explain(model, x, "occlusion", output=perspicio.detections, target=far, window=80)
    with pytest.raises(TargetError, match="pass output=perspicio.detections"):
        perspicio.BoxScoreTarget(box, label)(torch.zeros(1, 10))
    with pytest.raises(TargetError, match="x2 > x1"):
        perspicio.BoxScoreTarget([5.0, 5.0, 1.0, 9.0], 1)
    with pytest.raises(TargetError, match="one integer label per box"):
        perspicio.BoxScoreTarget([[0.0, 0.0, 1.0, 1.0]] * 2, [1])


def test_a_cam_layer_without_one_row_per_input_is_refused(detector) -> None:
    """A detector's ROI pooling (one row per proposal) is never the automatic CAM layer: layers
    without one row per input are not maps of it. The automatic layer is then the RPN head's last
    map, which the box scores do not depend on (proposals are detached): refused with a suggestion
    instead of returning a map of zeros; an explicit per-proposal layer is refused as before."""
    model, x, det = detector
    target = perspicio.BoxScoreTarget(det["boxes"][0], det["labels"][0])
    with pytest.raises(ModelError, match=r"does not depend on the automatic CAM layer 'rpn\.head\.bbox_pred'.*"
                                         r"Pass layer=\.\.\. with a layer the score is computed from"):
        perspicio.explain(model, x, "gradcam", output=perspicio.detections, target=target)
    with pytest.raises(LayerError, match=r"layer 'roi_heads.box_roi_pool' outputs \d+ rows of shape "
                                         r"\(256, 7, 7\) for 1 input\(s\).*Pass layer=\.\.\. with one row per input"):
        perspicio.explain(model, x, "gradcam", output=perspicio.detections, target=target,
                          layer="roi_heads.box_roi_pool")


def test_gradcam_of_a_box_matches_pytorch_grad_cam(detector) -> None:
    """Grad-CAM of one detection's score equals pytorch-grad-cam's with its FasterRCNNBoxScoreTarget
    (reference box: the detection shrunk by 1 px, so the IoU term is smooth; every detection
    has the same label, so both definitions pick the same detection)."""
    pgc = pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam.utils.model_targets import FasterRCNNBoxScoreTarget

    model, x, det = detector
    box = det["boxes"][0] + torch.tensor([1.0, 1.0, -1.0, -1.0])
    label = int(det["labels"][0])
    assert (det["labels"] == label).all()
    target = perspicio.BoxScoreTarget(box, label, add_iou=True)
    e = perspicio.explain(model, x, "gradcam", layer=LAYER, output=perspicio.detections, target=target, relu=False)
    assert e.options["output"] is perspicio.detections
    assert e.scores.item() > det["scores"][0].item() + 0.5  # score + IoU

    oracle = copy.deepcopy(model)  # pytorch-grad-cam fills .grad and keeps hooks until released
    ref = pgc.GradCAM(oracle, [oracle.get_submodule(LAYER)])
    recorded = []
    inner = ref.get_cam_image
    ref.get_cam_image = lambda *a, **k: recorded.append(np.asarray(inner(*a, **k), dtype=np.float64)) or recorded[-1]
    try:
        ref(input_tensor=x, targets=[FasterRCNNBoxScoreTarget([label], box[None].numpy())])
    finally:
        ref.activations_and_grads.release()
    ours = e.raw[:, 0].double().numpy()
    assert ours.shape == recorded[0].shape == (1, 10, 10)
    scale = np.abs(recorded[0]).max()
    assert scale > 0
    assert np.abs(ours - recorded[0]).max() / scale < 1e-4


def test_occlusion_of_a_box(detector) -> None:
    model, x, det = detector
    target = perspicio.BoxScoreTarget(det["boxes"][0], det["labels"][0])
    e = perspicio.explain(model, x, "occlusion", output=perspicio.detections, target=target, window=80, stride=80,
                          batch_size=4)
    assert e.attributions.shape == (1, 3, 160, 160)
    assert e.scores.item() == pytest.approx(det["scores"][0].item(), rel=1e-5)
    assert torch.isfinite(e.attributions).all() and e.attributions.abs().sum() > 0
    # each 80x80 window's attribution is the score drop when it is occluded with zeros
    copies = x.repeat(4, 1, 1, 1)
    for i, (r, c) in enumerate(((0, 0), (0, 80), (80, 0), (80, 80))):
        copies[i, :, r:r + 80, c:c + 80] = 0
    with torch.no_grad():
        drops = e.scores - target(perspicio.detections(model(copies)))
    got = torch.stack([e.attributions[0, 0, r, c] for r, c in ((0, 0), (0, 80), (80, 0), (80, 80))])
    torch.testing.assert_close(got, drops, rtol=1e-4, atol=1e-5)


def test_readme_detection_recipe_runs(detector) -> None:
    """The README's output=/detection recipe, run as written on the seeded detector (and a
    dict-returning model for its first line)."""
    from pathlib import Path

    from conftest import TinyCNN

    class HFLike(TinyCNN):
        def forward(self, x):
            return {"logits": super().forward(x)}

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```python\n")[1:]]
    recipe = next(b for b in blocks if "BoxScoreTarget" in b)
    model, x, det = detector
    scope = {"perspicio": perspicio, "detector": model, "x": x, "hf_model": HFLike().eval(),
             "batch": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))}
    exec(compile(recipe, "README.md", "exec"), scope)
    assert scope["cam"].attributions.shape == (1, 1, 160, 160) and scope["cam"].attributions.sum() > 0
    assert scope["occ"].attributions.shape == (1, 3, 160, 160)
    assert scope["cam"].scores.item() == pytest.approx(det["scores"][0].item())
