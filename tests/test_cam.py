"""CAM family on tiny models with hand-set weights: exact expected maps in closed form.

The models make the captured activation ``A`` equal to (a simple function of) the
input, so every expected map is written down here from the papers' formulas with
numpy in float64, independently of the code under test:

* ``GapNet``: A = x, then global average pooling and a linear layer W (C, K).
  dS/dA_kij = W[c, k] / (h w) is spatially constant.
* ``FlatNet``: A = x, then a linear layer on the flattened map, M (C, K, h, w).
  dS/dA = M[c] varies over space, which separates the variants.
* ``PoolNet``: A = avgpool2(x) at half the input resolution (tests upsampling).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import perspicio
from perspicio import EmbeddingSimilarity, RegionTarget
from perspicio.errors import LayerError, ModelError, OptionError, TargetError
from perspicio.methods import (
    CAM,
    AblationCAM,
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
)

RTOL, ATOL = 1e-5, 1e-6

# ---------------------------------------------------------------------------- hand-set data

# A: (K=3, 3, 3) activations with zeros and negatives
A0 = np.array(
    [
        [[1, 2, 0], [0, 1, 3], [2, 0, 1]],
        [[0, 1, 1], [2, 0, 0], [1, 3, 0]],
        [[-1, 0, 2], [1, 1, -2], [0, 2, 1]],
    ],
    dtype=np.float64,
)
A1 = np.array(
    [
        [[0, 1, 2], [1, 0, 1], [3, 1, 0]],
        [[2, 2, 0], [0, 1, 1], [0, 0, 4]],
        [[1, -1, 0], [0, 2, 1], [1, 1, 1]],
    ],
    dtype=np.float64,
)
# W: GAP classifier, (C=4, K=3); b: its bias
W = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0], [-1.0, 0.5, 1.0], [2.0, 1.0, 1.0]])
B = np.array([0.1, -0.2, 0.3, 0.0])
# M: flat classifier (C=4, K=3, 3, 3) with integer weights in [-2, 2]
M = np.fromfunction(lambda c, k, i, j: ((c + 1) * (k + 2) + 3 * i - 2 * j) % 5 - 2, (4, 3, 3, 3))
MB = np.array([0.5, -0.5, 1.0, 0.0])
LABELS = ["dog", "cat", "car", "cup"]


def t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


def batch(*maps: np.ndarray) -> torch.Tensor:
    return t(np.stack(maps))


class GapNet(nn.Module):
    def __init__(self, w: np.ndarray = W, b: np.ndarray = B, act: nn.Module | None = None) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.act = act if act is not None else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(t(w))
            self.fc.bias.copy_(t(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act(self.feat(x))).flatten(1))


class FlatNet(nn.Module):
    def __init__(self, m: np.ndarray = M, b: np.ndarray = MB) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(int(np.prod(m.shape[1:])), m.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(t(m.reshape(m.shape[0], -1)))
            self.fc.bias.copy_(t(b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x).flatten(1))


class PoolNet(nn.Module):
    """x (K, 4, 4) -> avgpool2 (K, 2, 2) = A -> flat linear Q (C, K, 2, 2)."""

    def __init__(self, q: np.ndarray) -> None:
        super().__init__()
        self.inp = nn.Identity()
        self.feat = nn.AvgPool2d(2)
        self.fc = nn.Linear(int(np.prod(q.shape[1:])), q.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(t(q.reshape(q.shape[0], -1)))
            self.fc.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(self.inp(x)).flatten(1))


def avgpool2(x: np.ndarray) -> np.ndarray:
    k, h, w = x.shape
    return x.reshape(k, h // 2, 2, w // 2, 2).mean(axis=(2, 4))


#: bilinear (align_corners=False, half-pixel) upsampling matrix 2 -> 4
U = np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])


def up(a: np.ndarray) -> np.ndarray:
    """Bilinearly upsample (..., 2, 2) -> (..., 4, 4)."""
    return U @ a @ U.T


def relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0)


def softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


def close(actual: torch.Tensor, expected: np.ndarray, rtol: float = RTOL, atol: float = ATOL) -> None:
    np.testing.assert_allclose(actual.detach().double().numpy(), expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------------------- expected maps


def gap_grad(c: int) -> np.ndarray:
    """dS_c/dA_kij for GapNet on a 3x3 map: W[c, k] / 9 everywhere, (K, 3, 3)."""
    return np.broadcast_to(W[c][:, None, None] / 9.0, (3, 3, 3))


def gradcampp_weights(a: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Grad-CAM++ (Chattopadhyay et al., Eq. 19) for exp-score: alpha = g^2 / (2 g^2 + sum_ab A_ab g^3)."""
    s = a.sum(axis=(1, 2), keepdims=True)
    w = np.zeros(a.shape[0])
    for k in range(a.shape[0]):
        for i in range(a.shape[1]):
            for j in range(a.shape[2]):
                gk = g[k, i, j]
                if gk != 0:
                    alpha = gk**2 / (2 * gk**2 + s[k, 0, 0] * gk**3)
                    w[k] += alpha * max(gk, 0.0)
    return w


def expected_gradient_cams(a: np.ndarray, g: np.ndarray) -> dict[str, np.ndarray]:
    """Un-ReLU'd maps of the gradient CAMs from activations a (K, h, w) and gradients g."""
    s = a.sum(axis=(1, 2))
    return {
        "gradcam": np.einsum("k,kij->ij", g.mean(axis=(1, 2)), a),
        "hirescam": (g * a).sum(0),
        "layercam": (relu(g) * a).sum(0),
        "xgradcam": np.einsum("k,kij->ij", (g * a).sum(axis=(1, 2)) / s, a),
        "gradcampp": np.einsum("k,kij->ij", gradcampp_weights(a, g), a),
    }


GRADIENT_CAMS = {
    "gradcam": GradCAM,
    "hirescam": HiResCAM,
    "layercam": LayerCAM,
    "xgradcam": XGradCAM,
    "gradcampp": GradCAMPlusPlus,
}


# ---------------------------------------------------------------------------- gradient CAMs


@pytest.mark.parametrize("name", list(GRADIENT_CAMS))
@pytest.mark.parametrize("relu_opt", [True, False])
def test_gradient_cams_exact_on_flat_classifier(name: str, relu_opt: bool) -> None:
    model = FlatNet()
    x = batch(A0, A1)
    targets = [2, 0]
    e = GRADIENT_CAMS[name](model, layer="feat", relu=relu_opt)(x, target=targets)
    assert e.method == name and e.layer == "feat"
    assert e.attributions.shape == (2, 1, 3, 3) and e.raw.shape == (2, 1, 3, 3)
    for n, (a, c) in enumerate(zip((A0, A1), targets)):
        expected = expected_gradient_cams(a, M[c])[name]
        close(e.attributions[n, 0], relu(expected) if relu_opt else expected)
        # the score is the target logit
        assert e.scores[n].item() == pytest.approx((M[c] * a).sum() + MB[c], rel=1e-6)
    assert e.targets.tolist() == targets
    # relu=False really keeps negative values here (the test would not discriminate otherwise)
    if not relu_opt and name in ("gradcam", "hirescam", "xgradcam"):
        assert (e.attributions < 0).any()


@pytest.mark.parametrize("name", list(GRADIENT_CAMS))
def test_gradient_cams_exact_on_gap_classifier(name: str) -> None:
    x = batch(A0)
    e = GRADIENT_CAMS[name](GapNet(), layer="feat", relu=False)(x, target=3)
    close(e.attributions[0, 0], expected_gradient_cams(A0, gap_grad(3))[name])


def test_gradcampp_closed_form_with_constant_gradient() -> None:
    """With a constant gradient g_k, Eq. 19 simplifies to w_k = hw * relu(g_k) / (2 + g_k sum A_k)."""
    e = GradCAMPlusPlus(GapNet(), layer="feat", relu=False)(batch(A0), target=0)
    g = W[0] / 9.0
    s = A0.sum(axis=(1, 2))
    w = 9.0 * relu(g) / (2.0 + g * s)
    close(e.attributions[0, 0], np.einsum("k,kij->ij", w, A0))


def test_cam_equals_hw_times_gradcam_under_gap_linear() -> None:
    model = GapNet()
    x = batch(A0, A1)
    for c in range(4):
        cam = CAM(model, layer="feat", relu=False)(x, target=c)
        grad = GradCAM(model, layer="feat", relu=False)(x, target=c)
        torch.testing.assert_close(cam.attributions, 9 * grad.attributions, rtol=1e-5, atol=1e-6)
        for n, a in enumerate((A0, A1)):
            close(cam.attributions[n, 0], np.einsum("k,kij->ij", W[c], a))


def test_hirescam_equals_gradcam_when_gradients_spatially_constant() -> None:
    model = GapNet()
    x = batch(A0, A1)
    h = HiResCAM(model, layer="feat")(x, target=[1, 2])
    g = GradCAM(model, layer="feat")(x, target=[1, 2])
    torch.testing.assert_close(h.attributions, g.attributions, rtol=1e-5, atol=1e-6)
    # ... and differ when they are not (FlatNet)
    h = HiResCAM(FlatNet(), layer="feat", relu=False)(x, target=[1, 2])
    g = GradCAM(FlatNet(), layer="feat", relu=False)(x, target=[1, 2])
    assert (h.attributions - g.attributions).abs().max() > 0.1


def test_gradcam_through_convolution() -> None:
    """A is a hand-set 1x1 conv of the input: A_k = sum_c V[k, c] x_c + v_k."""
    v = np.array([[1.0, -1.0], [0.5, 2.0], [0.0, 1.0]])
    vb = np.array([0.0, 0.5, -1.0])

    class ConvGap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 3, 1)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(3, 4)
            with torch.no_grad():
                self.conv.weight.copy_(t(v)[:, :, None, None])
                self.conv.bias.copy_(t(vb))
                self.fc.weight.copy_(t(W))
                self.fc.bias.copy_(t(B))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.pool(self.conv(x)).flatten(1))

    x_np = A0[:2]
    a = np.einsum("kc,cij->kij", v, x_np) + vb[:, None, None]
    e = GradCAM(ConvGap(), relu=False)(batch(x_np), target=1)  # auto layer -> "conv"
    assert e.layer == "conv"
    close(e.attributions[0, 0], np.einsum("k,kij->ij", W[1] / 9.0, a))


# ---------------------------------------------------------------------------- CAM


def test_cam_exact_and_relu() -> None:
    e = CAM(GapNet(), layer="feat")(batch(A0), target=0)
    expected = np.einsum("k,kij->ij", W[0], A0)
    assert (expected < 0).any()
    close(e.attributions[0, 0], relu(expected))
    assert e.provenance["backward_samples"] == 0 and e.provenance["forward_samples"] == 1


def test_cam_auto_layer_on_tiny_cnn(tiny_cnn, tiny_input) -> None:
    e = CAM(tiny_cnn)(tiny_input)  # predicted class, auto layer = act2
    assert e.layer == "act2"
    with torch.no_grad():
        a = tiny_cnn.act2(tiny_cnn.conv2(tiny_cnn.act1(tiny_cnn.conv1(tiny_input))))
        pred = tiny_cnn(tiny_input).argmax(1)
    expected = torch.einsum("nk,nkhw->nhw", tiny_cnn.fc.weight[pred], a).clamp_min(0)
    torch.testing.assert_close(e.attributions[:, 0], expected)
    assert e.targets.tolist() == pred.tolist()


def test_cam_clear_error_without_gap_linear() -> None:
    with pytest.raises(ModelError, match=r"global average pooling.*no nn.Linear takes 3 input features"):
        CAM(FlatNet(), layer="feat")(batch(A0))
    with pytest.raises(ModelError, match="has no nn.Linear"):
        CAM(SegNet(), layer="feat")(batch(A0[:2]), target=RegionTarget(0, np.ones((3, 3))))
    # a ReLU between the layer and the pooling breaks "GAP + linear" for negative activations
    model = GapNet(act=nn.ReLU())
    with pytest.raises(ModelError, match="does not reproduce the model output"):
        CAM(model, layer="feat")(batch(A0))
    # ... while the ReLU's own output is fine
    e = CAM(model, layer="act", relu=False)(batch(A0), target=2)
    close(e.attributions[0, 0], np.einsum("k,kij->ij", W[2], relu(A0)))


def test_cam_rejects_callable_target() -> None:
    with pytest.raises(ModelError, match="callable targets"):
        CAM(GapNet(), layer="feat")(batch(A0), target=lambda out: out[:, 1])


# ---------------------------------------------------------------------------- Ablation-CAM


@pytest.mark.parametrize("batch_size", [None, 2])
def test_ablationcam_exact(batch_size: int | None) -> None:
    x = batch(A0, A1)
    targets = [1, 3]
    e = AblationCAM(FlatNet(), layer="feat", relu=False, batch_size=batch_size)(x, target=targets)
    for n, (a, c) in enumerate(zip((A0, A1), targets)):
        y = (M[c] * a).sum() + MB[c]
        y_k = y - (M[c] * a).sum(axis=(1, 2))  # score with channel k zeroed
        w = (y - y_k) / y
        close(e.attributions[n, 0], np.einsum("k,kij->ij", w, a), rtol=1e-5, atol=1e-5)
    # main forward + the 2-copy check of the fast path + one copy per channel and sample
    assert e.provenance["forward_samples"] == 2 + 2 + 2 * 3
    if batch_size:
        assert e.provenance["chunk_sizes"] == [2, 2]  # fast path: one map per sample


class PrefixViewNet(FlatNet):
    """Reshapes the layer output with the *input's* batch size: the expanded fast path of
    Ablation-CAM fails here and the method must fall back to whole-model copies."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x).reshape(x.shape[0], -1))


def test_ablationcam_falls_back_when_layer_output_cannot_be_expanded() -> None:
    x = batch(A0, A1)
    e = AblationCAM(PrefixViewNet(), layer="feat", relu=False, batch_size=4)(x, target=[1, 3])
    f = AblationCAM(FlatNet(), layer="feat", relu=False, batch_size=4)(x, target=[1, 3])
    torch.testing.assert_close(e.attributions, f.attributions)
    assert e.provenance["chunk_sizes"] == [4] and f.provenance["chunk_sizes"] == [4, 4]


# ---------------------------------------------------------------------------- Score-CAM


def scorecam_expected(a: np.ndarray, c: int, weights: str) -> np.ndarray:
    """Score-CAM on FlatNet (A = x, same resolution): masks are min-max scaled channels."""
    lo = a.min(axis=(1, 2), keepdims=True)
    hi = a.max(axis=(1, 2), keepdims=True)
    masks = (a - lo) / (hi - lo)
    logits = np.stack([np.einsum("ckij,kij->c", M, a * masks[k][None]) + MB for k in range(a.shape[0])])
    if weights == "probability":
        w = np.array([softmax(row)[c] for row in logits])
    else:
        w = softmax(logits[:, c])
    return np.einsum("k,kij->ij", w, a)


@pytest.mark.parametrize("weights", ["probability", "channel_softmax"])
def test_scorecam_exact(weights: str) -> None:
    x = batch(A0, A1)
    targets = [0, 2]
    e = ScoreCAM(FlatNet(), layer="feat", relu=False, weights=weights, batch_size=2)(x, target=targets)
    for n, (a, c) in enumerate(zip((A0, A1), targets)):
        close(e.attributions[n, 0], scorecam_expected(a, c, weights))
    assert e.provenance["forward_samples"] == 2 + 2 * 3


def test_scorecam_masks_are_upsampled_bilinearly() -> None:
    q = np.fromfunction(lambda c, k, i, j: ((c + 2) * (k + 1) + i - 2 * j) % 3 - 1.0, (3, 2, 2, 2))
    x_np = np.fromfunction(lambda k, i, j: ((k + 1) * (i + 2 * j) % 5) - 1.0, (2, 4, 4))
    a = avgpool2(x_np)
    masks = []
    for k in range(2):
        m = up(a[k])
        masks.append((m - m.min()) / (m.max() - m.min()))
    probs = [softmax(np.einsum("ckij,kij->c", q, avgpool2(x_np * m[None])))[1] for m in masks]
    e = ScoreCAM(PoolNet(q), layer="feat", relu=False)(batch(x_np), target=1)
    raw = np.einsum("k,kij->ij", np.array(probs), a)
    close(e.raw[0, 0], raw)
    close(e.attributions[0, 0], up(raw))


def test_scorecam_callable_target_uses_raw_score() -> None:
    a = A0
    e = ScoreCAM(FlatNet(), layer="feat", relu=False)(batch(a), target=lambda out: out[:, 1] * 2)
    lo, hi = a.min(axis=(1, 2), keepdims=True), a.max(axis=(1, 2), keepdims=True)
    masks = (a - lo) / (hi - lo)
    w = np.array([2 * ((M[1] * a * masks[k][None]).sum() + MB[1]) for k in range(3)])
    close(e.attributions[0, 0], np.einsum("k,kij->ij", w, a), rtol=1e-5, atol=1e-5)
    assert e.targets is None


def test_scorecam_rejects_unknown_weights() -> None:
    with pytest.raises(OptionError, match="weights must be"):
        ScoreCAM(FlatNet(), layer="feat", weights="softmax")


# ---------------------------------------------------------------------------- Eigen-CAM


@pytest.mark.parametrize("coef", [[1.0, 2.0, 0.5], [-1.0, -2.0, 0.5]])
def test_eigencam_exact_on_rank_one_activations(coef: list[float]) -> None:
    """A_k = a_k p + c_k: the centred matrix is (p - mean p) a^T, so the first principal
    projection is +-(p - mean p) |a|; the sign follows the channel-mean activation."""
    p = np.array([[0.0, 1.0, 3.0], [2.0, -1.0, 0.0], [1.0, 4.0, 0.5]])
    a = np.array(coef)
    offsets = np.array([0.5, -1.0, 2.0])
    acts = a[:, None, None] * p[None] + offsets[:, None, None]
    e = EigenCAM(FlatNet(), layer="feat", relu=False)(batch(acts))
    expected = (p - p.mean()) * np.linalg.norm(a) * np.sign(a.mean())
    close(e.attributions[0, 0], expected, rtol=1e-5, atol=1e-5)
    e = EigenCAM(FlatNet(), layer="feat")(batch(acts))
    close(e.attributions[0, 0], relu(expected), rtol=1e-5, atol=1e-5)
    assert e.provenance["backward_samples"] == 0


# ---------------------------------------------------------------------------- upsampling


def test_upsample_modes_on_pooled_layer() -> None:
    q = np.fromfunction(lambda c, k, i, j: (c + 1) * (i - j) + k - 0.5, (2, 2, 2, 2))
    x_np = np.fromfunction(lambda k, i, j: (k + 1) * i - j + 0.25 * k, (2, 4, 4))
    a = avgpool2(x_np)
    raw = (q[0] * a).sum(0)  # HiResCAM
    e = HiResCAM(PoolNet(q), layer="feat", relu=False)(batch(x_np), target=0)
    close(e.raw[0, 0], raw)
    close(e.attributions[0, 0], up(raw))
    e = HiResCAM(PoolNet(q), layer="feat", relu=False, upsample="nearest")(batch(x_np), target=0)
    close(e.attributions[0, 0], np.kron(raw, np.ones((2, 2))))
    with pytest.raises(OptionError, match="upsample must be one of"):
        HiResCAM(PoolNet(q), layer="feat", upsample="linear")


# ---------------------------------------------------------------------------- targets


def test_target_forms() -> None:
    model = GapNet()
    x = batch(A0, A1)
    logits = np.stack([W @ a.mean(axis=(1, 2)) + B for a in (A0, A1)])

    def expected(c: int, a: np.ndarray) -> np.ndarray:
        return relu(np.einsum("k,kij->ij", W[c], a)) / 9.0

    # None -> predicted class per sample
    e = GradCAM(model, layer="feat")(x)
    pred = logits.argmax(1)
    assert e.targets.tolist() == pred.tolist()
    for n, a in enumerate((A0, A1)):
        close(e.attributions[n, 0], expected(pred[n], a))
    # int (same for every sample), list (one per sample), tensor
    e = GradCAM(model, layer="feat")(x, target=1)
    assert e.targets.tolist() == [1, 1]
    close(e.attributions[1, 0], expected(1, A1))
    e = GradCAM(model, layer="feat")(x, target=torch.tensor([3, 0]))
    assert e.targets.tolist() == [3, 0]
    close(e.attributions[0, 0], expected(3, A0))
    close(e.attributions[1, 0], expected(0, A1))
    np.testing.assert_allclose(e.scores.numpy(), [logits[0, 3], logits[1, 0]], rtol=1e-6)
    # class name with labels
    e = GradCAM(model, layer="feat", labels=LABELS)(x, target="Cat")
    assert e.targets.tolist() == [1, 1] and e.target_names == ("cat", "cat")
    e = GradCAM(model, layer="feat", labels=LABELS)(x, target=["cup", "dog"])
    assert e.targets.tolist() == [3, 0] and e.target_names == ("cup", "dog")
    # a callable gives the same map as the equivalent class index, without indices
    e2 = GradCAM(model, layer="feat")(x, target=lambda out: out[:, 2])
    e1 = GradCAM(model, layer="feat")(x, target=2)
    torch.testing.assert_close(e2.attributions, e1.attributions)
    assert e2.targets is None
    torch.testing.assert_close(e2.scores, e1.scores)


def test_target_errors() -> None:
    model = GapNet()
    x = batch(A0, A1)
    with pytest.raises(TargetError, match="out of range.*4 outputs"):
        GradCAM(model, layer="feat")(x, target=4)
    with pytest.raises(TargetError, match="got 3 targets for 2 inputs"):
        GradCAM(model, layer="feat")(x, target=[0, 1, 2])
    with pytest.raises(TargetError, match="unknown class name 'kat'.*cat"):
        GradCAM(model, layer="feat", labels=LABELS)(x, target="kat")
    with pytest.raises(TargetError, match="no class labels"):
        GradCAM(model, layer="feat")(x, target="cat")
    with pytest.raises(TargetError, match=r"one scalar per sample, shape \(2,\)"):
        GradCAM(model, layer="feat")(x, target=lambda out: out)


class SegNet(nn.Module):
    """A = x (K=2, 3x3) -> 1x1 conv V (C=3, K=2): per-pixel class logits (N, 3, 3, 3)."""

    V = np.array([[1.0, 0.0], [0.5, -2.0], [-1.0, 1.0]])
    VB = np.array([0.0, 0.25, -0.5])

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.head = nn.Conv2d(2, 3, 1)
        with torch.no_grad():
            self.head.weight.copy_(t(self.V)[:, :, None, None])
            self.head.bias.copy_(t(self.VB))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feat(x))


def test_region_target_on_segmentation_net() -> None:
    mask = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 0]], dtype=bool)
    a = A0[:2]
    tgt = RegionTarget(1, torch.tensor(mask))
    g = SegNet.V[1][:, None, None] * mask[None]  # dS/dA_kij
    e = HiResCAM(SegNet(), layer="feat", relu=False)(batch(a), target=tgt)
    close(e.attributions[0, 0], (g * a).sum(0))
    e = GradCAM(SegNet(), layer="feat", relu=False)(batch(a), target=tgt)
    close(e.attributions[0, 0], np.einsum("k,kij->ij", g.mean(axis=(1, 2)), a))
    score = ((np.einsum("k,kij->ij", SegNet.V[1], a) + SegNet.VB[1]) * mask).sum()
    assert e.scores[0].item() == pytest.approx(score, rel=1e-6)
    assert e.targets is None
    # class targets on a segmentation output are refused with a pointer to callables
    with pytest.raises(TargetError, match="callable"):
        GradCAM(SegNet(), layer="feat")(batch(a), target=1)


def test_embedding_similarity_target() -> None:
    emb = np.fromfunction(lambda d, k, i, j: np.cos(d + 2 * k + 3 * i - j), (5, 3, 3, 3))
    ref = np.array([1.0, -0.5, 0.25, 2.0, 0.0])
    model = FlatNet(emb, np.zeros(5))
    e_vec = np.einsum("dkij,kij->d", emb, A0)
    ne, nr = np.linalg.norm(e_vec), np.linalg.norm(ref)
    s = e_vec @ ref / (ne * nr)
    ds_de = ref / (ne * nr) - s * e_vec / ne**2
    g = np.einsum("d,dkij->kij", ds_de, emb)
    e = HiResCAM(model, layer="feat", relu=False)(batch(A0), target=EmbeddingSimilarity(torch.tensor(ref)))
    close(e.attributions[0, 0], (g * A0).sum(0), rtol=1e-4, atol=1e-6)
    assert e.scores[0].item() == pytest.approx(s, rel=1e-5)


# ---------------------------------------------------------------------------- multi-layer fusion


def test_multi_layer_fusion() -> None:
    q = np.fromfunction(lambda c, k, i, j: (c + 1) * (i + 1) - (k + 1) * j + 0.5, (2, 2, 2, 2))
    x_np = np.fromfunction(lambda k, i, j: np.sin(1.0 + k + 2.0 * i + 0.7 * j) + 0.3, (2, 4, 4))
    a2 = avgpool2(x_np)
    # layer "inp" (A = x, 4x4): dS/dx = q[c] spread over each 2x2 block / 4 -> channel mean = mean(q[c, k]) / 4
    map1 = relu(np.einsum("k,kij->ij", q[0].mean(axis=(1, 2)) / 4.0, x_np))
    map2 = relu(np.einsum("k,kij->ij", q[0].mean(axis=(1, 2)), a2))
    fused = (minmax(map1) + minmax(up(map2))) / 2
    e = GradCAM(PoolNet(q), layer=["inp", "feat"])(batch(x_np), target=0)
    assert e.layer == ("inp", "feat")
    close(e.attributions[0, 0], fused, rtol=1e-5, atol=1e-6)
    maps = e.extras["layer_maps"]
    close(maps[0][0, 0], map1)
    close(maps[1][0, 0], map2)
    # layers may also be given as modules, through explain()
    model = PoolNet(q)
    e2 = perspicio.explain(model, batch(x_np), method="gradcam", layer=[model.inp, model.feat], target=0)
    torch.testing.assert_close(e2.attributions, e.attributions)


# ---------------------------------------------------------------------------- transformer tokens


class TinyViT(nn.Module):
    """Patch tokens = the input's pixels (K channels), plus a class token; head = W on
    (mean of patch tokens + class token). The block's output is (N, 1 + h*w, K)."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.full((1, 1, 3), 0.5))
        self.block = nn.Identity()
        self.head = nn.Linear(3, 4)
        with torch.no_grad():
            self.head.weight.copy_(t(W))
            self.head.bias.copy_(t(B))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        tokens = self.block(tokens)
        return self.head(tokens[:, 1:].mean(1) + tokens[:, 0])


@pytest.mark.parametrize("reshape", ["auto", (3, 3)])
def test_token_layer_reshape(reshape: object) -> None:
    x = batch(A0, A1)
    e = GradCAM(TinyViT(), layer="block", relu=False, reshape=reshape)(x, target=[0, 3])
    assert e.raw.shape == (2, 1, 3, 3)
    close(e.attributions[0, 0], np.einsum("k,kij->ij", W[0] / 9.0, A0))
    close(e.attributions[1, 0], np.einsum("k,kij->ij", W[3] / 9.0, A1))
    # Ablation-CAM zeroes a channel on every token (patch and class tokens alike)
    e = AblationCAM(TinyViT(), layer="block", relu=False)(x[:1], target=3)
    pooled = A0.mean(axis=(1, 2)) + 0.5
    y = W[3] @ pooled + B[3]
    w = W[3] * pooled / y
    close(e.attributions[0, 0], np.einsum("k,kij->ij", w, A0), rtol=1e-5, atol=1e-5)


def test_token_layer_callable_reshape_and_errors() -> None:
    x = batch(A0)

    def grid(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 1:].reshape(len(tokens), 3, 3, -1).permute(0, 3, 1, 2)

    e = HiResCAM(TinyViT(), layer="block", relu=False, reshape=grid)(x, target=1)
    close(e.attributions[0, 0], np.einsum("k,kij->ij", W[1] / 9.0, A0))

    class OddViT(TinyViT):  # 3x2 patches + class token = 7 tokens: not a square grid
        pass

    with pytest.raises(LayerError, match="not a square grid.*reshape="):
        GradCAM(OddViT(), layer="block")(batch(A0[:, :, :2]), target=0)
    e = GradCAM(OddViT(), layer="block", relu=False, reshape=(3, 2))(batch(A0[:, :, :2]), target=0)
    close(e.attributions[0, 0], np.einsum("k,kij->ij", W[0] / 6.0, A0[:, :, :2]))


# ---------------------------------------------------------------------------- registry, explain(), options


def test_registry_lists_every_cam() -> None:
    from perspicio.methods import get, names

    cams = {"cam", "gradcam", "gradcampp", "xgradcam", "layercam", "hirescam", "scorecam", "ablationcam", "eigencam"}
    assert cams <= set(names("cam"))
    for n in cams:
        assert get(n).name == n


def test_explain_matches_class_and_records_options() -> None:
    x = batch(A0)
    e = perspicio.explain(FlatNet(), x, method="hirescam", layer="feat", target=2, relu=False)
    d = HiResCAM(FlatNet(), layer="feat", relu=False)(x, target=2)
    torch.testing.assert_close(e.attributions, d.attributions)
    assert e.options["relu"] is False and e.options["layer"] == "feat"
    assert e.provenance["forward_samples"] == 1 and e.provenance["backward_samples"] == 1
    with pytest.raises(OptionError, match="no option 'rellu'.*relu"):
        perspicio.explain(FlatNet(), x, method="gradcam", rellu=False)


def test_many_pass_cams_do_not_depend_on_batch_size(tiny_cnn, tiny_input) -> None:
    for cls in (ScoreCAM, AblationCAM):
        a = cls(tiny_cnn, layer="act1", batch_size=5)(tiny_input, target=[1, 4])
        b = cls(tiny_cnn, layer="act1", batch_size=12)(tiny_input, target=[1, 4])
        c = cls(tiny_cnn, layer="act1")(tiny_input, target=[1, 4])
        torch.testing.assert_close(a.attributions, b.attributions, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.attributions, c.attributions, rtol=1e-5, atol=1e-6)
        if cls is ScoreCAM:
            assert a.provenance["forward_samples"] == 2 + 2 * 6 and a.provenance["chunk_sizes"] == [5]
        else:  # + the 2-copy check; one map per sample
            assert a.provenance["forward_samples"] == 2 + 2 + 2 * 6 and a.provenance["chunk_sizes"] == [5, 5]


# ---------------------------------------------------------------------------- channels-last engine


class ViewNet(nn.Module):
    """LeNet-style: flattens its conv features with .view(), which channels-last inputs break."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4 * 6 * 6, 3)
        g = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).view(len(x), -1))


@pytest.mark.parametrize("method", ["gradcam", "scorecam", "ablationcam"])
def test_channels_last_engine_matches_contiguous(monkeypatch, method: str, tiny_cnn, tiny_input) -> None:
    """The engine feeds conv models channels-last inputs (faster on CPU); results are the
    same as in the contiguous layout, and models that .view() their feature maps fall back."""
    from perspicio.core import batching, caches

    x6 = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(9))
    view_net = ViewNet()
    fast = [perspicio.explain(tiny_cnn, tiny_input, method=method, target=[0, 3]),
            perspicio.explain(view_net, x6, method=method, target=[0, 2])]
    assert caches.entry("channels-last support", tiny_cnn) is True
    assert caches.entry("channels-last support", view_net) is False
    monkeypatch.setattr(batching, "CHANNELS_LAST", False)
    slow = [perspicio.explain(tiny_cnn, tiny_input, method=method, target=[0, 3]),
            perspicio.explain(ViewNet(), x6, method=method, target=[0, 2])]
    for f, s in zip(fast, slow):
        torch.testing.assert_close(f.attributions, s.attributions, rtol=1e-5, atol=1e-6)


def test_scorecam_constant_channels_share_one_pass():
    """All-zero (constant) channels give all-zero masks: one shared forward, same weights."""
    import torch.nn as nn

    import perspicio

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight[1].zero_()
        conv.bias[1] = -1.0  # channel 1 is constant zero after ReLU
        conv.weight[3].zero_()
        conv.bias[3] = 0.5  # channel 3 is constant non-zero
    model = nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 6, 6)
    e = perspicio.explain(model, x, method="scorecam", layer="1", target=[0, 2], relu=False)
    assert e.provenance["forward_samples"] == 2 + 1 + 2 * 2  # 2 inputs, shared zero input, 2 channels x 2
    acts = torch.relu(conv(x)).detach()
    expected = torch.zeros(2, 6, 6)
    for n, c in enumerate([0, 2]):
        for k in range(4):
            a = acts[n, k]
            rng = a.max() - a.min()
            mask = (a - a.min()) / rng if rng > 0 else torch.zeros_like(a)
            w = model(x[n : n + 1] * mask).softmax(1)[0, c]
            expected[n] += w * a
    torch.testing.assert_close(e.raw[:, 0], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["scorecam", "ablationcam"])
def test_several_targets_share_the_masked_passes(tiny_cnn, tiny_input, method):
    """Masked/ablated copies do not depend on the target: T targets per input cost the passes
    of one, and each row equals the single-target call."""
    targets = [[0, 2, 1], [1, 0, 2]]
    multi = perspicio.explain(tiny_cnn, tiny_input, method=method, target=targets)
    one = perspicio.explain(tiny_cnn, tiny_input, method=method, target=[0, 1])
    assert multi.attributions.shape[0] == 6
    for i in range(2):
        for t in range(3):
            single = perspicio.explain(tiny_cnn, tiny_input[i : i + 1], method=method, target=targets[i][t])
            torch.testing.assert_close(multi.attributions[3 * i + t], single.attributions[0], rtol=1e-4, atol=1e-5)
    # one capture pass over the 6 rows, then the same masked passes as the 2-row single-target call
    assert multi.provenance["forward_samples"] - 6 == one.provenance["forward_samples"] - 2
