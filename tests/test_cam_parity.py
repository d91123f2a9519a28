"""vis_cam parity (issue 19) and one home for target names (issue 15).

* Layer names as written in Python (``layer4[-1]``, ``features[8]``, ``model.layer4[-1]``,
  ``blocks[-1].norm1``), resolved by ``core.capture.resolve_layer`` for every layer method.
* Several layers as one string ``"a,b"`` (what ``perspicio explain --layer a,b`` passes on).
* ``eigen_smooth``, ``aug_smooth`` and EigenGrad-CAM: hand-set activations whose first principal
  component is known in closed form, axioms, and pytorch-grad-cam as the oracle on a randomly
  initialised resnet18 at 64x64.
* Target names: ``Method.__call__`` is the only place they are built (CAMs, tree_shap, linear_shap).

Hand-set patterns: ``U`` (columns 1, 0, -1) and ``V`` (rows 1, 0, -1) are zero-mean and orthogonal,
|U|^2 = |V|^2 = 6. A two-channel activation with centred columns ``U a^T + V b^T`` and ``a`` orthogonal
to ``b`` has right-singular vectors ``a/|a|`` and ``b/|b|`` with singular values ``sqrt(6)|a|`` and
``sqrt(6)|b|``, so its first principal projection is ``U |a|`` when ``|a| > |b|``.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hook_report, pgc_recorded_maps
from torch import nn

import perspicio
from perspicio import RegionTarget
from perspicio.core.capture import resolve_layer, resolve_layers
from perspicio.core.targets import target_names
from perspicio.errors import LayerError, OptionError, TargetError
from perspicio.methods import (
    EigenCAM,
    GradCAM,
    GradCAMPlusPlus,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    names,
)
from perspicio.methods.cam import AUGMENTATIONS, EigenGradCAM, principal_map

ROOT = Path(__file__).resolve().parent.parent
U = np.array([[1.0, 0.0, -1.0]] * 3)
V = np.array([[1.0] * 3, [0.0] * 3, [-1.0] * 3])
SQRT8 = np.sqrt(8.0)


def t(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=torch.float32)


def batch(*maps: np.ndarray) -> torch.Tensor:
    return torch.stack([t(m) for m in maps])


def close(actual: torch.Tensor, expected: np.ndarray, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(actual.detach().double().numpy(), expected, rtol=tol, atol=tol)


def relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0.0)


def minmax(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


class GapNet(nn.Module):
    """A = x at ``feat``; global average pooling; linear head ``W`` (C, K), no bias.
    dS_c/dA_kij = W[c, k] / (h w), spatially constant."""

    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(t(w))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x).mean(dim=(2, 3)))


class FlatNet(nn.Module):
    """A = x at ``feat``; a linear layer on the flattened map, ``M`` (C, K, h, w): dS_c/dA = M[c]."""

    def __init__(self, m: np.ndarray) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.fc = nn.Linear(int(np.prod(m.shape[1:])), m.shape[0], bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(t(m.reshape(m.shape[0], -1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(x).flatten(1))


class TwoLayerNet(nn.Module):
    """``inp`` (A = x, 4x4) -> ``feat`` (2x2 average pooling) -> GAP -> linear."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Identity()
        self.feat = nn.AvgPool2d(2)
        self.fc = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.fc.weight.copy_(t([[1.0, -0.5], [0.25, 2.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.feat(self.inp(x)).mean(dim=(2, 3)))


# ============================================================================ principal component


def test_first_principal_component_of_two_channels_exact() -> None:
    """A = (2U + V + 5, 2U - V - 1): centred columns U (2, 2) + V (1, -1); (1, 1)/sqrt2 carries
    singular value sqrt(48) > sqrt(12), so the projection is 2 sqrt2 U, and it correlates positively
    with the channel sum 4U + 4: Eigen-CAM = 2 sqrt2 U exactly. Grad-CAM with unit channel weights
    (W = 9 = h w) smooths to the same map; unsmoothed it is the channel sum."""
    x = batch(np.stack([2 * U + V + 5, 2 * U - V - 1]))
    e = EigenCAM(GapNet(np.array([[9.0, 9.0]])), layer="feat", relu=False)(x)
    close(e.raw[0, 0], SQRT8 * U)
    model = GapNet(np.array([[9.0, 9.0], [-9.0, -9.0], [9.0, -9.0]]))
    close(GradCAM(model, layer="feat", relu=False)(x, target=0).raw[0, 0], 4 * U + 4)
    close(
        GradCAM(model, layer="feat", relu=False, eigen_smooth=True)(x, target=0).raw[0, 0],
        SQRT8 * U,
    )
    # negative weights: the weighted activations are -A, the map follows the channel sum -4U - 4
    close(
        GradCAM(model, layer="feat", relu=False, eigen_smooth=True)(x, target=1).raw[0, 0],
        -SQRT8 * U,
    )
    close(GradCAM(model, layer="feat", eigen_smooth=True)(x, target=1).raw[0, 0], relu(-SQRT8 * U))
    # weights (1, -1): weighted (2U + V + 5, -2U + V + 1), first component along (1, -1) -> +-2 sqrt2 U;
    # the channel sum 2V + 6 is uncorrelated with U (a tie), so the largest entry (U[0, 0] = 1) is made positive
    close(
        GradCAM(model, layer="feat", relu=False, eigen_smooth=True)(x, target=2).raw[0, 0],
        SQRT8 * U,
    )
    close(GradCAM(model, layer="feat", relu=False)(x, target=2).raw[0, 0], 2 * V + 6)


def test_eigengradcam_exact_and_class_specific() -> None:
    """W = (18, 9) -> gradients (2, 1); A = (U + V/2 + 3, 2U - V - 2) -> G*A = (2U + V + 6, 2U - V - 2):
    EigenGrad-CAM = 2 sqrt2 U. The opposite class negates G*A and the map (Eigen-CAM would not change)."""
    x = batch(np.stack([U + V / 2 + 3, 2 * U - V - 2]))
    model = GapNet(np.array([[18.0, 9.0], [-18.0, -9.0]]))
    e0 = EigenGradCAM(model, layer="feat", relu=False)(x, target=0)
    close(e0.raw[0, 0], SQRT8 * U)
    close(EigenGradCAM(model, layer="feat", relu=False)(x, target=1).raw[0, 0], -SQRT8 * U)
    close(EigenGradCAM(model, layer="feat")(x, target=0).raw[0, 0], relu(SQRT8 * U))
    assert e0.provenance["backward_samples"] == 1 and e0.target_names is None
    # EigenGrad-CAM is HiResCAM (G*A) smoothed; eigen_smooth changes nothing on the Eigen CAMs
    hires = HiResCAM(model, layer="feat", relu=False, eigen_smooth=True)(x, target=0)
    torch.testing.assert_close(hires.raw, e0.raw)
    again = EigenGradCAM(model, layer="feat", relu=False, eigen_smooth=True)(x, target=0)
    torch.testing.assert_close(again.raw, e0.raw)
    a = EigenCAM(model, layer="feat", relu=False)(x, target=0)
    b = EigenCAM(model, layer="feat", relu=False, eigen_smooth=True)(x, target=1)
    torch.testing.assert_close(a.raw, b.raw)


def numpy_principal(weighted: np.ndarray) -> np.ndarray:
    """Independent reference of principal_map in numpy float64 (same sign rule, no ties)."""
    out = []
    for w in weighted:
        k = w.shape[0]
        mat = w.reshape(k, -1).T
        mat = mat - mat.mean(axis=0)
        _, _, vt = np.linalg.svd(mat)
        proj = mat @ vt[0]
        ref = w.sum(axis=0).ravel()
        sign = 1.0 if proj @ (ref - ref.mean()) > 0 else -1.0
        out.append((sign * proj).reshape(w.shape[1:]))
    return np.stack(out)


def test_principal_map_matches_numpy_svd_and_its_axioms() -> None:
    g = torch.Generator().manual_seed(4)
    w = torch.randn(3, 6, 5, 7, generator=g, dtype=torch.float64)
    p = principal_map(w)
    np.testing.assert_allclose(p.numpy(), numpy_principal(w.numpy()), rtol=1e-10, atol=1e-10)
    # a projection of centred data: zero spatial mean, norm = the largest singular value
    mat = w.permute(0, 2, 3, 1).reshape(3, 35, 6)
    s = torch.linalg.svdvals(mat - mat.mean(1, keepdim=True))
    torch.testing.assert_close(
        p.flatten(1).mean(1), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(p.flatten(1).norm(dim=1), s[:, 0])
    # invariant to a per-channel offset and to the sign of all channels (the sign follows the data);
    # scaling the data scales the map
    torch.testing.assert_close(
        principal_map(w + torch.arange(6.0, dtype=w.dtype)[:, None, None]), p
    )
    torch.testing.assert_close(principal_map(-w), -p)
    torch.testing.assert_close(principal_map(2.5 * w), 2.5 * p)
    assert principal_map(w.float()).dtype == torch.float32


# ============================================================================ aug_smooth


def test_aug_smooth_exact_on_flat_classifier() -> None:
    """HiResCAM on FlatNet: map(x) = sum_k M[c,k] * x_k with constant gradients, so the copy
    f * flip(x), flipped back, is f * sum_k flip(M[c,k]) * x_k; ReLU and [0, 1] scaling remove f.
    aug_smooth = (minmax(relu(m)) + minmax(relu(m_flip))) / 2. Class 0 wins on x and class 1 on
    the flipped x: every copy must still explain class 0 (resolved once, on the input as given)."""
    m = np.fromfunction(
        lambda c, k, i, j: ((c + 2) * (k + 1) + 3 * i - 2 * j) % 5 - 2.0, (2, 2, 3, 3)
    )
    m[1] = m[0, :, :, ::-1]  # S_1(x) = S_0(flip x): class 1 wins on flip x iff class 0 wins on x
    x_np = np.fromfunction(lambda k, i, j: np.cos(0.9 * k + 1.3 * i) + 0.8 * j + 0.2, (2, 3, 3))
    model = FlatNet(m)
    x = batch(x_np)
    with torch.no_grad():
        assert (
            model(x).argmax(1).item() == 0 and model(x.flip(-1)).argmax(1).item() == 1
        )  # the premise
    plain = np.einsum("kij,kij->ij", m[0], x_np)
    flipped = np.einsum("kij,kij->ij", m[0, :, :, ::-1], x_np)
    e = HiResCAM(model, layer="feat", aug_smooth=True)(x)
    assert e.targets.tolist() == [0] and e.raw is None
    close(e.attributions[0, 0], (minmax(relu(plain)) + minmax(relu(flipped))) / 2)
    assert len(e.extras["aug_maps"]) == len(AUGMENTATIONS) == 6
    for (flip, factor), got in zip(AUGMENTATIONS, e.extras["aug_maps"]):
        close(got[0, 0], factor * relu(flipped if flip else plain))
    assert e.provenance["forward_samples"] == 6 and e.provenance["backward_samples"] == 6
    assert e.scores.tolist() == pytest.approx([float((m[0] * x_np).sum())], rel=1e-5)
    assert e.options["aug_smooth"] is True


def test_aug_smooth_on_a_flip_equivariant_model_is_the_scaled_map() -> None:
    """GAP + linear: Grad-CAM commutes with the flip and is linear in the input, so every copy,
    scaled to [0, 1], is the same map: aug_smooth = minmax(Grad-CAM). Several targets per input."""
    w = np.array([[1.0, -2.0], [0.5, 1.5], [-1.0, 0.25]])
    x_np = np.stack([np.stack([U + 2 * V, V - U + 0.5]), np.stack([U * V, U + V])])
    x = batch(*x_np)
    e = GradCAM(GapNet(w), layer="feat", aug_smooth=True)(x, target=[[0, 1], [1, 2]])
    for row, (n, c) in enumerate([(0, 0), (0, 1), (1, 1), (1, 2)]):
        plain = relu(np.einsum("k,kij->ij", w[c] / 9.0, x_np[n]))
        close(e.attributions[row, 0], minmax(plain))


def test_aug_smooth_and_eigen_smooth_keep_the_model_untouched(tiny_cnn, tiny_input) -> None:
    params = [p.detach().clone() for p in tiny_cnn.parameters()]
    x0 = tiny_input.clone()
    for cls in (GradCAM, ScoreCAM, EigenGradCAM, LayerCAM):
        e = cls(tiny_cnn, layer="act1, act2", aug_smooth=True, eigen_smooth=True)(
            tiny_input, target=[1, 4]
        )
        assert e.attributions.shape == (2, 1, 8, 8) and torch.isfinite(e.attributions).all()
        assert float(e.attributions.min()) >= 0 and float(e.attributions.max()) <= 1
    assert hook_report(tiny_cnn) == [] and not tiny_cnn.training
    assert all(p.grad is None and torch.equal(p, q) for p, q in zip(tiny_cnn.parameters(), params))
    assert torch.equal(tiny_input, x0)


def test_aug_smooth_refuses_positional_targets_and_options_are_checked() -> None:
    model = FlatNet(np.ones((2, 2, 3, 3)))
    x = batch(np.stack([U, V]))
    with pytest.raises(TargetError, match="aug_smooth flips the input.*RegionTarget"):
        GradCAM(model, layer="feat", aug_smooth=True)(x, target=RegionTarget(0, torch.ones(3, 3)))
    e = GradCAM(model, layer="feat", aug_smooth=True)(
        x, target=lambda out: out[:, 0] - 2 * out[:, 1]
    )
    assert e.targets is None and len(e.extras["aug_maps"]) == 6
    for opt in ("eigen_smooth", "aug_smooth"):
        with pytest.raises(OptionError, match=f"{opt} must be True or False; got 'yes'"):
            perspicio.explain(model, x, method="gradcam", layer="feat", **{opt: "yes"})
    assert {"eigen_smooth", "aug_smooth"} <= set(GradCAMPlusPlus.option_names())


# ============================================================================ several layers


def test_several_layers_as_one_string() -> None:
    x = batch(np.fromfunction(lambda k, i, j: np.sin(1.0 + k + 2.0 * i + 0.7 * j) + 0.3, (2, 4, 4)))
    ref = GradCAM(TwoLayerNet(), layer=["inp", "feat"])(x, target=0)
    for spec in ("inp,feat", " inp , feat ", "inp,model.feat"):
        e = GradCAM(TwoLayerNet(), layer=spec)(x, target=0)
        assert e.layer == ("inp", "feat") and e.options["layer"] == spec
        torch.testing.assert_close(e.attributions, ref.attributions)
    with pytest.raises(LayerError, match="'inp' is given more than once"):
        GradCAM(TwoLayerNet(), layer="inp,inp")
    with pytest.raises(LayerError, match="no submodule 'faet'. Did you mean: feat"):
        GradCAM(TwoLayerNet(), layer="inp,faet")
    with pytest.raises(LayerError, match="names no layer"):
        resolve_layers(TwoLayerNet(), ",")
    # methods that take one layer say so
    for method in ("guided_gradcam", "layer_integrated_gradients"):
        with pytest.raises(LayerError, match="names several layers; this method takes one"):
            perspicio.explain(TwoLayerNet(), x, method=method, layer="inp,feat", target=0)


@pytest.mark.slow
def test_cli_fuses_layers_given_as_a_b(tmp_path, capsys) -> None:
    """`perspicio explain --layer a,b` reaches the CAM as one string and is fused, with the new
    options through --option."""
    import json

    from perspicio.cli import main

    code = main(
        [
            "explain",
            "--model",
            "torchvision:resnet18",
            "--random-init",
            "--method",
            "gradcam,eigengradcam",
            "--layer",
            "layer3,layer4[-1]",
            "--option",
            "aug_smooth=True",
            "--out",
            str(tmp_path),
        ]
    )
    out = capsys.readouterr().out
    assert code in (0, None), out
    summary = json.loads((tmp_path / "summary.json").read_text())
    (entries,) = summary.values()
    assert [e["method"] for e in entries] == ["gradcam", "eigengradcam"]
    for entry in entries:
        assert entry["layer"] == ["layer3", "layer4.1"]
        assert (
            entry["options"]["layer"] == "layer3,layer4[-1]"
            and entry["options"]["aug_smooth"] is True
        )


# ============================================================================ layer names in Python form


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(4)
        self.mlp = nn.Sequential(nn.Linear(4, 4), nn.GELU())


class NamedNet(nn.Module):
    """A Sequential ``features``, a ModuleList ``blocks``, a ModuleDict ``stages`` and one module
    registered twice (``head`` and ``alias``)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())
        self.blocks = nn.ModuleList([Block(), Block(), Block()])
        self.stages = nn.ModuleDict(
            {"s1": nn.ReLU(), "s2": nn.Sequential(nn.Identity(), nn.ReLU())}
        )
        self.head = nn.Linear(4, 2)
        self.alias = self.head


class Wrapper(nn.Module):
    """A model whose submodule is called ``model`` (as in Hugging Face wrappers)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = NamedNet()


@pytest.mark.parametrize(
    "spec, name",
    [
        ("features[2]", "features.2"),
        ("features.2", "features.2"),
        ("features[-1]", "features.3"),
        ("features [ -4 ]", "features.0"),
        ("blocks[-1].norm1", "blocks.2.norm1"),
        ("blocks[1].mlp[0]", "blocks.1.mlp.0"),
        ("blocks.0.mlp.1", "blocks.0.mlp.1"),
        ("stages['s2'][1]", "stages.s2.1"),
        ('stages["s1"]', "stages.s1"),
        ("stages.s2", "stages.s2"),
        ("model.blocks[-1]", "blocks.2"),
        ("alias", "head"),
    ],
)
def test_python_layer_names_resolve_to_the_module(spec: str, name: str) -> None:
    model = NamedNet()
    got_name, module = resolve_layer(model, spec)
    assert got_name == name and module is dict(model.named_modules())[name]


def test_model_prefix_is_literal_when_the_model_has_a_submodule_called_model() -> None:
    w = Wrapper()
    assert resolve_layer(w, "model.blocks[-1]") == ("model.blocks.2", w.model.blocks[2])
    with pytest.raises(LayerError, match="'model' \\(NamedNet\\) has no submodule 'model'"):
        resolve_layer(w, "model.model.blocks[0]")
    root = nn.Sequential(nn.Conv2d(3, 2, 1), nn.ReLU())
    assert resolve_layer(root, "[-1]")[0] == "1" and resolve_layer(root, "model[0]")[0] == "0"


@pytest.mark.parametrize(
    "spec, message",
    [
        (
            "features[4]",
            r"'features' \(Sequential\) has 4 modules, so \[4\] is out of range \(-4..3\)",
        ),
        ("blocks[-4]", r"'blocks' \(ModuleList\) has 3 modules, so \[-4\] is out of range"),
        (
            "head[0]",
            r"'head' \(Linear\) is not a Sequential or ModuleList, so \[0\] does not index it",
        ),
        (
            "featurs[0]",
            r"the model \(NamedNet\) has no submodule 'featurs'. Did you mean: features",
        ),
        (
            "blocks[0].norm2",
            r"'blocks.0' \(Block\) has no submodule 'norm2'. Did you mean: blocks.0.norm1\?"
            r" Its submodules: norm1, mlp",
        ),
        (
            "stages['s3']",
            r"'stages' \(ModuleDict\) has no submodule 's3'. Did you mean: stages.s., stages.s.\?",
        ),
        ("features[1", r"not a module name.*Python form.*Did you mean: .*features.1"),
        ("features.[1]", r"not a module name"),
        ("feat ures", r"not a module name"),
        ("model", r"the layer is the whole model"),
    ],
)
def test_layer_name_mistakes_name_the_failing_step(spec: str, message: str) -> None:
    with pytest.raises(LayerError, match=message) as info:
        resolve_layer(NamedNet(), spec)
    if "whole model" not in message:
        assert str(info.value).startswith(f"layer {spec!r} not found in NamedNet")


def test_cam_accepts_python_names_on_resnet18() -> None:
    tv = pytest.importorskip("torchvision")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tv.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    ref = GradCAM(model, layer="layer4.1")(x, target=3)
    for spec in ("layer4[-1]", "model.layer4[1]", "layer4[ 1 ]"):
        e = GradCAM(model, layer=spec)(x, target=3)
        assert e.layer == "layer4.1"
        torch.testing.assert_close(e.attributions, ref.attributions, rtol=0, atol=0)
    assert resolve_layer(model, "layer4[1].conv2")[0] == "layer4.1.conv2"
    with pytest.raises(
        LayerError,
        match="'layer4.1' \\(BasicBlock\\) has no submodule 'conv3'. Did you mean: "
        "layer4.1.conv2, layer4.1.conv1",
    ):
        GradCAM(model, layer="layer4[-1].conv3")


# ============================================================================ target names (issue 15)

LABELS = ("zero", "one", "two", "three", "four")


@pytest.mark.parametrize("method", names("cam"))
def test_cams_get_their_target_names_from_method_call(tiny_cnn, tiny_input, method: str) -> None:
    e = perspicio.explain(
        tiny_cnn, tiny_input, method=method, layer="act2", target=[4, 1], labels=LABELS
    )
    assert e.targets.tolist() == [4, 1] and e.target_names == ("four", "one")
    assert e.target_names == target_names(LABELS, e.targets)
    assert (
        perspicio.explain(
            tiny_cnn, tiny_input, method=method, layer="act2", target=[4, 1]
        ).target_names
        is None
    )


@pytest.mark.slow  # ~15 s CPU: the tree and linear readers' first use
def test_tree_and_linear_shap_get_their_target_names_from_method_call() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    y = np.array(["ant", "bee", "cat"])[np.digitize(x[:, 0] + 0.5 * x[:, 1], [-0.5, 0.5])]
    for method, est in (
        ("tree_shap", DecisionTreeClassifier(max_depth=3, random_state=0)),
        ("linear_shap", LogisticRegression()),
    ):
        est.fit(x, y)
        bg = {"background": x} if method == "linear_shap" else {}
        e = perspicio.explain(est, x[:3], method=method, target=2, **bg)
        assert e.targets.tolist() == [2, 2, 2] and e.target_names == ("cat", "cat", "cat"), method
        e = perspicio.explain(
            est, x[:2], method=method, target=[0, 1], labels=("A", "B", "C"), **bg
        )
        assert e.target_names == ("A", "B"), method


def test_cam_and_tree_modules_do_not_build_target_names() -> None:
    """The one place is Method.__call__ (core/targets.target_names); these modules had copies."""
    for rel in ("src/perspicio/methods/cam.py", "src/perspicio/methods/tree.py"):
        tree = ast.parse((ROOT / rel).read_text())
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        keywords = {k.arg for n in ast.walk(tree) if isinstance(n, ast.Call) for k in n.keywords}
        assert "target_names" not in used and "target_names" not in keywords, rel


# ============================================================================ pytorch-grad-cam as the oracle

pgc = pytest.importorskip("pytorch_grad_cam")
CLASSES = [3, 7]


@pytest.fixture(scope="module")
def resnet():
    """A randomly initialised torchvision resnet18 (seeded inside fork_rng: the global RNG is left
    as it was), a private deep copy for the oracle (it calls .backward() and fills param.grad), and
    two 64x64 inputs."""
    tv = pytest.importorskip("torchvision")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = tv.models.resnet18(weights=None, num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, copy.deepcopy(model).eval(), x


def oracle(
    ref_cls: type, model: nn.Module, layers: list[nn.Module], x: torch.Tensor, **call: bool
) -> tuple:
    """pytorch-grad-cam's maps: (every get_cam_image result, un-normalised at layer resolution;
    its final output)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    return pgc_recorded_maps(
        ref_cls, model, layers, x, [ClassifierOutputTarget(c) for c in CLASSES], **call
    )


def centred(a: np.ndarray) -> np.ndarray:
    return a - a.mean()


def check_principal(ours: torch.Tensor, theirs: np.ndarray, plain: torch.Tensor) -> None:
    """Same map up to the SVD's sign (pytorch-grad-cam keeps LAPACK's), to 1e-4 of its largest
    magnitude; ours has the sign that correlates positively with the un-smoothed map ``plain``."""
    o = ours[:, 0].double().numpy()
    for n in range(len(o)):
        sign = 1.0 if (o[n] * theirs[n]).sum() >= 0 else -1.0
        assert np.abs(o[n] - sign * theirs[n]).max() < 1e-4 * np.abs(theirs[n]).max()
        assert (centred(o[n]) * centred(plain[n, 0].double().numpy())).sum() > 0


@pytest.mark.parametrize("layer", ["layer3", "layer4[0]"])
def test_eigen_smooth_gradcam_matches_pytorch_grad_cam(resnet, layer: str) -> None:
    model, twin, x = resnet
    name, _ = resolve_layer(model, layer)
    ours = GradCAM(model, layer=layer, relu=False, eigen_smooth=True)(x, target=CLASSES)
    plain = GradCAM(model, layer=layer, relu=False)(x, target=CLASSES)
    (theirs,), _ = oracle(
        pgc.GradCAM, twin, [dict(twin.named_modules())[name]], x, eigen_smooth=True
    )
    assert theirs.shape == tuple(ours.raw[:, 0].shape)
    check_principal(ours.raw, theirs, plain.raw)


@pytest.mark.parametrize("layer", ["layer3", "layer4[0]"])
def test_eigengradcam_matches_pytorch_grad_cam(resnet, layer: str) -> None:
    model, twin, x = resnet
    name, _ = resolve_layer(model, layer)
    ours = EigenGradCAM(model, layer=layer, relu=False)(x, target=CLASSES)
    plain = HiResCAM(model, layer=layer, relu=False)(x, target=CLASSES)
    (theirs,), _ = oracle(pgc.EigenGradCAM, twin, [dict(twin.named_modules())[name]], x)
    check_principal(ours.raw, theirs, plain.raw)


def test_aug_smooth_gradcam_matches_pytorch_grad_cam(resnet) -> None:
    """Six copies (flip x {1, 0.9, 1.1}); each map ReLU'd, upsampled, scaled to [0, 1] and
    flipped back, then averaged: the oracle's full output, to 1e-4."""
    model, twin, x = resnet
    ours = GradCAM(model, layer="layer3", aug_smooth=True)(x, target=CLASSES)
    recorded, theirs = oracle(pgc.GradCAM, twin, [twin.layer3], x, aug_smooth=True)
    assert len(recorded) == 6
    assert (
        min(np.abs(r).max() for r in recorded) > 1e-3
    )  # the oracle's 1e-7 in its scaling is negligible
    np.testing.assert_allclose(ours.attributions[:, 0].double().numpy(), theirs, atol=1e-4, rtol=0)


def test_fused_layers_are_the_mean_of_pytorch_grad_cams_single_layer_maps(resnet) -> None:
    """Two layers from one string: the mean of the per-layer maps, each scaled to [0, 1] at the input
    size - the mean of the oracle's single-layer outputs. (The oracle's own multi-layer mean scales
    each map at the layer's resolution, before resizing, and rescales the mean: not the same.)"""
    model, twin, x = resnet
    ours = (
        GradCAM(model, layer="layer3,layer4[-1]")(x, target=CLASSES)
        .attributions[:, 0]
        .double()
        .numpy()
    )
    singles = [oracle(pgc.GradCAM, twin, [layer], x)[1] for layer in (twin.layer3, twin.layer4[-1])]
    np.testing.assert_allclose(ours, (singles[0] + singles[1]) / 2, atol=1e-4, rtol=0)
