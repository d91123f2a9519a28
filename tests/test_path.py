"""Integrated Gradients (input / layer / neuron) and GradientSHAP: closed forms, the IG
axioms, baselines, quadrature rules, Captum agreement, memory, errors, CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from perspicio import explain
from perspicio.core.baselines import make_baseline
from perspicio.errors import ConvergenceWarning, LayerError, ModelError, OptionError
from perspicio.methods import completeness_error
from perspicio.methods.path import (
    MAX_GAUSS_LEGENDRE_STEPS,
    MAX_STEPS,
    GradientSHAP,
    gauss_legendre,
    quadrature_nodes,
)


class Square(nn.Module):
    """f(x) = (w . x)^2 on a flattened input (2 outputs: (w.x)^2 and w.x)."""

    def __init__(self, w: list[float]) -> None:
        super().__init__()
        self.lin = nn.Linear(len(w), 1, bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(torch.tensor([w]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.lin(x.flatten(1))
        return torch.cat([s * s, s], dim=1)


W = [1.0, -2.0, 0.5, 3.0]
X = torch.tensor([1.0, 0.5, -2.0, 1.0]).view(1, 1, 2, 2)  # w.x = 1 - 1 - 1 + 3 = 2


# ----------------------------------------------------------------------------- quadrature


@pytest.mark.parametrize("rule", ["gauss_legendre", "left", "right", "middle", "trapezoid"])
def test_quadrature_weights(rule: str) -> None:
    a, w = quadrature_nodes(rule, 7)
    assert len(a) == 7 and float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_gauss_legendre_is_exact_for_high_degree() -> None:
    a, w = quadrature_nodes("gausslegendre", 5)  # Captum's spelling is accepted
    for deg in range(10):  # exact up to degree 2n - 1 = 9
        assert float((w * a**deg).sum()) == pytest.approx(1 / (deg + 1), abs=1e-13)
    with pytest.raises(OptionError, match="steps"):
        quadrature_nodes("left", 0)
    with pytest.raises(OptionError, match="quadrature"):
        quadrature_nodes("simpson", 4)
    with pytest.raises(OptionError, match="trapezoid"):
        quadrature_nodes("trapezoid", 1)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 17, 50, 64, 101, 256, 500])
def test_gauss_legendre_nodes_match_numpy(n: int) -> None:
    x, w = gauss_legendre(n)
    ref_x, ref_w = np.polynomial.legendre.leggauss(n)
    np.testing.assert_allclose(x, ref_x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w, ref_w, rtol=0, atol=1e-12)
    a, wt = quadrature_nodes("gauss_legendre", n)
    np.testing.assert_allclose(a.numpy(), (ref_x + 1) / 2, rtol=0, atol=1e-12)
    np.testing.assert_allclose(wt.numpy(), ref_w / 2, rtol=0, atol=1e-12)


def test_gauss_legendre_many_nodes_is_fast() -> None:
    # numpy's eigenvalue route is cubic: 2000 nodes took seconds (4000: a minute, or a MemoryError)
    import time

    start = time.perf_counter()
    a, w = quadrature_nodes("gauss_legendre", 2000)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.6, f"2000 Gauss-Legendre nodes took {elapsed:.2f} s"
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool((a.diff() > 0).all()) and 0 < float(a.min()) and float(a.max()) < 1
    for deg in (0, 1, 7, 100, 1001):  # integrates x^deg exactly on [0, 1]
        assert float((w * a**deg).sum()) == pytest.approx(1 / (deg + 1), rel=1e-12)


def test_steps_above_the_bound_are_refused() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    x = torch.ones(1, 1, 2, 2)
    quadrature_nodes("gauss_legendre", MAX_GAUSS_LEGENDRE_STEPS)  # the bounds themselves are accepted
    quadrature_nodes("middle", MAX_STEPS)
    with pytest.raises(OptionError, match=f"steps=4000000 is above the limit of {MAX_GAUSS_LEGENDRE_STEPS} Gauss"):
        quadrature_nodes("gauss_legendre", 4_000_000)
    for rule in ("gauss_legendre", "left", "trapezoid", "adaptive"):
        limit = MAX_GAUSS_LEGENDRE_STEPS if rule == "gauss_legendre" else MAX_STEPS
        with pytest.raises(OptionError, match=f"steps={limit + 1} is above the limit of {limit}"):
            quadrature_nodes(rule, limit + 1)
    for method, kw in [("integrated_gradients", {}), ("layer_integrated_gradients", {"layer": "1"}),
                       ("neuron_integrated_gradients", {"layer": "1", "neuron": 0})]:
        with pytest.raises(OptionError, match=f"limit of {MAX_GAUSS_LEGENDRE_STEPS}"):
            explain(model, x, method=method, target=0, steps=4000 * 1000, **kw)
        with pytest.raises(OptionError, match=f"limit of {MAX_STEPS}"):
            explain(model, x, method=method, target=0, steps=MAX_STEPS + 1, quadrature="left", **kw)
    with pytest.raises(OptionError, match="steps must be an integer"):
        explain(model, x, method="integrated_gradients", target=0, steps=2.5)


def test_cli_refuses_absurd_steps(tmp_path, capsys) -> None:
    from PIL import Image

    from perspicio.cli import main

    img = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(img)
    code = main(["explain", str(img), "--method", "integrated_gradients", "--model", "torchvision:resnet18",
                 "--random-init", "--steps", "100000", "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"limit of {MAX_GAUSS_LEGENDRE_STEPS}" in capsys.readouterr().err


# ----------------------------------------------------------------------------- closed forms


@pytest.mark.parametrize(("rule", "c"), [("gauss_legendre", 1.0), ("middle", 1.0), ("trapezoid", 1.0),
                                         ("left", 1 / 2), ("right", 3 / 2)])
def test_ig_closed_form_on_quadratic(rule: str, c: float) -> None:
    # IG_i = x_i w_i (w.x) c with c = 2 sum_k w_k a_k: 1 for exact rules, (n-1)/n and (n+1)/n (n = 2) for left/right
    e = explain(Square(W), X, method="integrated_gradients", target=0, steps=2, quadrature=rule)
    expected = [xi * wi * 2 * c for xi, wi in zip(X.flatten().tolist(), W)]
    assert e.attributions.flatten().tolist() == pytest.approx(expected, abs=1e-6)
    assert e.scores.tolist() == [pytest.approx(4.0)] and e.base_value.tolist() == [0.0]


def test_ig_on_linear_output_is_exact_with_one_step() -> None:
    b = torch.full_like(X, 0.5)
    e = explain(Square(W), X, method="integrated_gradients", target=1, steps=1, baseline=b)
    expected = [(xi - 0.5) * wi for xi, wi in zip(X.flatten().tolist(), W)]
    assert e.attributions.flatten().tolist() == pytest.approx(expected, abs=1e-6)
    assert completeness_error(e).item() < 1e-6
    assert completeness_error(e, Square(W)).item() < 1e-6


# ----------------------------------------------------------------------------- axioms


class Clipped(nn.Module):
    """The IG paper's example f(x) = 1 - relu(1 - x): flat at x = 2."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 1 - torch.relu(1 - x.flatten(1))


def test_sensitivity_where_gradient_is_zero() -> None:
    x = torch.full((1, 1, 1, 1), 2.0)
    assert explain(Clipped(), x, method="saliency", target=0).attributions.item() == 0.0
    ig = explain(Clipped(), x, method="integrated_gradients", target=0, steps=50)
    assert ig.attributions.item() == pytest.approx(1.0, abs=1e-6)  # = f(x) - f(0)


def _mlp(hidden: list[list[float]], out: list[float]) -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, len(hidden)), nn.ReLU(), nn.Linear(len(hidden), 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor(hidden))
        net[1].bias.zero_()
        net[3].weight.copy_(torch.tensor([out]))
        net[3].bias.fill_(0.25)
    return net


H = [[1.0, -1.0, 0.5, 0.0], [0.0, 2.0, -1.0, 1.0], [-1.0, 0.5, 1.0, 1.0]]


def test_implementation_invariance() -> None:
    a = _mlp(H, [1.0, -2.0, 0.5])
    # same function: unit 2 scaled by 2 inside and by 1/2 outside, and unit 1 split in two halves
    b = _mlp([H[0], H[1], H[1], [2 * v for v in H[2]]], [1.0, -1.0, -1.0, 0.25])
    x = torch.tensor([0.3, -1.2, 2.0, 0.7]).view(1, 1, 2, 2)
    with torch.no_grad():
        assert torch.allclose(a(x), b(x))
    ea = explain(a, x, method="integrated_gradients", target=0, steps=64)
    eb = explain(b, x, method="integrated_gradients", target=0, steps=64)
    torch.testing.assert_close(ea.attributions, eb.attributions, atol=1e-6, rtol=1e-5)


class Mix(nn.Module):
    def __init__(self, f: nn.Module, g: nn.Module, a: float, b: float) -> None:
        super().__init__()
        self.f, self.g, self.a, self.b = f, g, a, b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * self.f(x) + self.b * self.g(x)


def test_linearity(tiny_cnn, tiny_input) -> None:
    from tests.conftest import TinyCNN

    g = TinyCNN(seed=3).eval()
    mix = Mix(tiny_cnn, g, 2.0, -0.5)
    opts = {"target": 1, "steps": 16, "baseline": "zero"}
    ef, eg, em = (explain(m, tiny_input, method="integrated_gradients", **opts) for m in (tiny_cnn, g, mix))
    torch.testing.assert_close(em.attributions, 2.0 * ef.attributions - 0.5 * eg.attributions, atol=1e-5, rtol=1e-4)


def test_unresolved_path_warns(tiny_cnn, tiny_input) -> None:
    # 2 nodes cannot resolve a ReLU network's path: the user is told, with the number and the remedy
    with pytest.warns(ConvergenceWarning, match=r"relative completeness error .*raise steps"):
        e = explain(tiny_cnn, tiny_input, method="integrated_gradients", target=1, steps=2, quadrature="left")
    assert max(e.provenance["relative_completeness_error"]) > 0.01
    import warnings

    with warnings.catch_warnings():  # a linear model is integrated exactly: no warning
        warnings.simplefilter("error", ConvergenceWarning)
        lin = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        explain(lin, tiny_input, method="integrated_gradients", target=0, steps=2)


def test_completeness_on_bundled_model(zoo_model, chelsea_batch) -> None:
    # default steps (50) and quadrature (Gauss-Legendre), two sample images; the blurred baseline keeps the
    # path near natural images. With the zero baseline the integrand jumps by hundreds in the first ~5% of
    # the path and 50 nodes of any rule give 1-12% here (see docs/benchmarks.md, "Completeness").
    from perspicio import zoo

    coffee = zoo_model.preprocess(zoo.sample("coffee"))
    e = explain(zoo_model, torch.cat([chelsea_batch, coffee]), method="integrated_gradients", baseline="blur",
                batch_size=26)
    rel = e.provenance["relative_completeness_error"]
    assert max(rel) < 0.01, rel
    assert completeness_error(e, relative=True).tolist() == pytest.approx(rel)


# ----------------------------------------------------------------------------- baselines


def test_baselines(zoo_model, tiny_input) -> None:
    x = tiny_input
    assert torch.equal(make_baseline("zero", x), torch.zeros_like(x))
    black = make_baseline("black", x)
    assert torch.equal(black, x.amin(dim=(0, 2, 3), keepdim=True).expand_as(x))
    from perspicio.core.baselines import black_value

    bv = black_value(zoo_model)
    assert bv.tolist() == pytest.approx([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225])
    const = torch.full((1, 3, 16, 16), 0.7)
    torch.testing.assert_close(make_baseline("blur", const), const)
    blurred = make_baseline("blur:2", x)
    assert blurred.shape == x.shape and blurred.std() < x.std()
    g = torch.Generator().manual_seed(0)
    u = make_baseline("uniform", x, generator=g)
    assert torch.equal(u, make_baseline("uniform", x, generator=torch.Generator().manual_seed(0)))
    flat = x.reshape(len(x), -1)
    assert bool((u.reshape(len(x), -1) >= flat.min(1, keepdim=True).values).all())
    assert torch.equal(make_baseline(torch.ones(3, 1, 1), x), torch.ones_like(x))
    assert torch.equal(make_baseline(lambda t: t * 0.5, x), x * 0.5)
    with pytest.raises(OptionError, match=r"baseline of shape \(5,\) does not broadcast"):
        make_baseline(torch.ones(5), x)
    with pytest.raises(OptionError, match="baseline must be one of"):
        explain(Square(W), X, method="integrated_gradients", baseline="gray")
    with pytest.raises(OptionError, match="blur:SIGMA"):
        explain(Square(W), X, method="integrated_gradients", baseline="blur:-1")


def test_bad_options() -> None:
    with pytest.raises(OptionError, match="steps must be an integer >= 1"):
        explain(Square(W), X, method="integrated_gradients", steps=0)
    with pytest.raises(OptionError, match="noise must be a number >= 0"):
        explain(Square(W), X, method="gradient_shap", noise=-0.1)
    with pytest.raises(OptionError, match="does not broadcast"):
        explain(Square(W), X, method="integrated_gradients", baseline=torch.zeros(2, 3))

    class NoGrad(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (x.flatten(1) > 0).float()

    with pytest.raises(ModelError, match="gradient path"):
        explain(NoGrad(), X, method="integrated_gradients", target=0, steps=2)


# ----------------------------------------------------------------------------- batching and memory


def test_chunks_and_multi_target(tiny_cnn, tiny_input) -> None:
    a = explain(tiny_cnn, tiny_input, method="integrated_gradients", target=[[1, 3]], steps=8, batch_size=5)
    assert a.attributions.shape == (4, 3, 8, 8) and a.targets.tolist() == [1, 3, 1, 3]
    b = explain(tiny_cnn, tiny_input[1:], method="integrated_gradients", target=3, steps=8)
    torch.testing.assert_close(a.attributions[3], b.attributions[0])
    assert a.provenance["chunk_sizes"][-1] == 5
    assert a.provenance["backward_samples"] == 4 * 8


def test_many_steps_stay_within_the_budget(tiny_cnn, tiny_input) -> None:
    from perspicio.core.batching import activation_bytes

    per = activation_bytes(tiny_cnn, tiny_input[:1]) * 3
    e = explain(tiny_cnn, tiny_input[:1], method="integrated_gradients", steps=512, memory_budget=per * 64)
    assert e.provenance["chunk_sizes"][-1] == 64  # 512 path points, 64 at a time, accumulated in place
    assert e.provenance["relative_completeness_error"][0] < 1e-3


# ----------------------------------------------------------------------------- layer and neuron IG


class TextNet(nn.Module):
    """Embedding -> mean over tokens -> linear."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.fc = nn.Linear(4, 3)
        with torch.no_grad():
            self.emb.weight.copy_(torch.randn(10, 4, generator=g))
            self.fc.weight.copy_(torch.randn(3, 4, generator=g))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(ids)).mean(1))


def test_layer_ig_on_embeddings() -> None:
    net = TextNet().eval()
    ids = torch.tensor([[1, 4, 7, 2]])
    e = explain(net, ids, method="layer_integrated_gradients", layer="emb", target=2, steps=64)
    assert e.attributions.shape == (1, 4, 4) and e.layer == "emb"
    assert e.provenance["relative_completeness_error"][0] < 1e-4
    # closed form check against a direct high-resolution integral over the embedding path
    ex, eb = net.emb(ids).detach(), net.emb(torch.zeros_like(ids)).detach()
    a = torch.linspace(0, 1, 20001)[:, None, None]
    pts = eb + a * (ex - eb)
    grads = (1 - torch.tanh(pts) ** 2) * net.fc.weight[2].detach() / 4
    ref = (ex - eb) * torch.trapezoid(grads, dx=1 / 20000, dim=0)
    torch.testing.assert_close(e.attributions, ref, atol=1e-5, rtol=1e-4)
    with pytest.raises(LayerError, match="layer="):
        explain(net, ids, method="layer_integrated_gradients")


def test_layer_ig_matches_captum(tiny_cnn, tiny_input) -> None:
    from captum.attr import LayerIntegratedGradients as CLIG

    ours = explain(tiny_cnn, tiny_input, method="layer_integrated_gradients", layer="act1", target=2, steps=20)
    ref = CLIG(tiny_cnn, tiny_cnn.act1).attribute(tiny_input, target=2, n_steps=20)
    torch.testing.assert_close(ours.attributions, ref, atol=1e-6, rtol=1e-5)


def test_neuron_ig(tiny_cnn, tiny_input) -> None:
    from captum.attr import NeuronIntegratedGradients as CNIG

    e = explain(tiny_cnn, tiny_input, method="neuron_integrated_gradients", layer="conv2", neuron=(4, 3, 5), steps=32)
    ref = CNIG(tiny_cnn, tiny_cnn.conv2).attribute(tiny_input, (4, 3, 5), n_steps=32)
    torch.testing.assert_close(e.attributions, ref, atol=1e-6, rtol=1e-5)
    assert max(e.provenance["relative_completeness_error"]) < 0.05
    assert completeness_error(e, tiny_cnn).tolist() == pytest.approx(e.provenance["completeness_error"], abs=1e-5)


# ----------------------------------------------------------------------------- Captum: IG, GradientSHAP


@pytest.fixture(scope="module")
def crop(chelsea_batch) -> torch.Tensor:
    return chelsea_batch[..., 48:176, 48:176].clone()


def test_ig_agrees_with_captum(zoo_model, crop, tiny_cnn, tiny_input) -> None:
    from captum.attr import IntegratedGradients as CIG

    e = explain(zoo_model, crop, method="integrated_gradients", target=285, steps=16)
    ref = CIG(zoo_model.model).attribute(crop, target=285, n_steps=16, internal_batch_size=8)
    assert float((e.attributions - ref).abs().max() / ref.abs().max()) < 1e-5
    b = torch.randn(tiny_input.shape, generator=torch.Generator().manual_seed(5))
    for rule in ("left", "right", "middle", "trapezoid"):
        e = explain(tiny_cnn, tiny_input, method="integrated_gradients", target=[0, 4], steps=9, quadrature=rule, baseline=b)
        ref = CIG(tiny_cnn).attribute(tiny_input, baselines=b, target=[0, 4], n_steps=9, method=f"riemann_{rule}")
        if rule == "trapezoid":  # Captum's trapezoid weights sum to (n-1)/n; ours are the textbook 1/(n-1)
            ref = ref * 9 / 8
        torch.testing.assert_close(e.attributions, ref, atol=1e-6, rtol=1e-5)


def test_gradient_shap_agrees_with_captum_on_fixed_draws(zoo_model, crop, monkeypatch) -> None:
    from captum.attr import GradientShap

    g = torch.Generator().manual_seed(11)
    background = torch.randn((3, *crop.shape[1:]), generator=g)
    S, stdev = 3, 0.2
    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = np.random.get_state()
        np.random.seed(0)
        try:
            ref = GradientShap(zoo_model.model).attribute(crop, background, n_samples=S, stdevs=stdev, target=285)
            torch.manual_seed(0)
            np.random.seed(0)
            idx = torch.tensor(np.random.choice(3, S))
            eps = torch.normal(0, torch.tensor(stdev).repeat((S, *crop.shape[1:])))
            alpha = torch.tensor(np.random.uniform(0.0, 1.0, S))
        finally:
            np.random.set_state(state)
    monkeypatch.setattr(GradientSHAP, "_draw", lambda self, *a: (idx, alpha, eps))
    rng = float(crop.max() - crop.min())
    e = explain(zoo_model, crop, method="gradient_shap", baseline=background, samples=S, noise=stdev / rng, target=285)
    assert float((e.attributions - ref).abs().max() / ref.abs().max()) < 1e-5


def test_gradient_shap_exact_on_linear_model() -> None:
    net = Square(W)
    bg = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2), -torch.ones(1, 2, 2)])
    e = explain(net, X, method="gradient_shap", target=1, baseline=bg, samples=64, seed=3)
    idx, _, _ = GradientSHAP(net, samples=64, seed=3)._draw(1, 64, 3, X, torch.zeros(1), torch.Generator().manual_seed(3))
    # the generator is consumed by the background spec only for named baselines, so draws match
    per = torch.stack([(X[0] - bg[i]) * torch.tensor(W).view(1, 2, 2) for i in idx.tolist()])
    torch.testing.assert_close(e.attributions[0], per.mean(0))
    torch.testing.assert_close(e.extras["standard_error"][0], per.std(0, unbiased=True) / 8)
    assert e.base_value.tolist() == [pytest.approx(0.0)]  # mean of w.b over the background: (0 + 2.5 - 2.5) / 3
    again = explain(net, X, method="gradient_shap", target=1, baseline=bg, samples=64, seed=3)
    assert torch.equal(again.attributions, e.attributions)
    with pytest.raises(OptionError, match="background"):
        explain(net, X, method="gradient_shap", baseline=torch.zeros(2, 1, 3, 3))


# ----------------------------------------------------------------------------- CLI


def test_cli_integrated_gradients(tmp_path, capsys) -> None:
    from perspicio.cli import main

    out = tmp_path / "out"
    code = main(["explain", "chelsea", "--method", "integrated_gradients,smoothgrad", "--steps", "2",
                 "--samples", "2", "--baseline", "black", "-o", str(out), "--no-progress"])
    assert code == 0
    assert (out / "chelsea_integrated_gradients.npy").exists() and (out / "chelsea_comparison.png").exists()
    assert np.load(out / "chelsea_integrated_gradients.npy").shape == (1, 3, 224, 224)
    # 2 steps cannot resolve the path: one warning line with the error and the remedy, no Python source line
    err = capsys.readouterr().err
    assert "warning: integrated_gradients: relative completeness error" in err and "warnings.warn" not in err


@pytest.mark.parametrize(("method", "opts"), [
    ("integrated_gradients", {"steps": 6}),
    ("integrated_gradients", {"steps": 5, "baseline": "blur", "quadrature": "trapezoid"}),
    ("layer_integrated_gradients", {"steps": 6, "layer": "conv1"}),
])
@pytest.mark.parametrize("batch_size", [None, 1])
def test_multi_target_shares_the_path_and_is_bit_identical(tiny_cnn, tiny_input, method, opts, batch_size) -> None:
    targets = [[0, 3, 4], [1, 4, 2]]
    flat = [t for row in targets for t in row]
    shared = explain(tiny_cnn, tiny_input, method=method, target=targets, batch_size=batch_size, **opts)
    repeated = explain(tiny_cnn, tiny_input.repeat_interleave(3, 0), method=method, target=flat,
                       batch_size=batch_size, **opts)
    assert torch.equal(shared.attributions, repeated.attributions)
    assert torch.equal(shared.scores, repeated.scores) and torch.equal(shared.base_value, repeated.base_value)
    steps = opts["steps"]
    assert shared.provenance["forward_samples"] == 2 * steps + 4  # one path per input + endpoints
    assert repeated.provenance["forward_samples"] == 6 * steps + 12
    assert shared.provenance["backward_samples"] == repeated.provenance["backward_samples"] == 6 * steps
    assert shared.provenance["relative_completeness_error"] == repeated.provenance["relative_completeness_error"]


@pytest.mark.parametrize("opts", [{}, {"baseline": torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)),
                                       "noise": 0.1}])
def test_gradient_shap_multi_target_rows_equal_single_target_calls(tiny_cnn, tiny_input, opts) -> None:
    # the draws (background, path point, noise) are shared by the targets of one input
    shared = explain(tiny_cnn, tiny_input[:1], method="gradient_shap", target=[[0, 3, 4]], samples=6, **opts)
    assert shared.provenance["forward_samples"] == 6 + 1 + (3 if opts else 1)
    for row, t in enumerate([0, 3, 4]):
        single = explain(tiny_cnn, tiny_input[:1], method="gradient_shap", target=t, samples=6, **opts)
        assert torch.equal(shared.attributions[row], single.attributions[0])
        assert torch.equal(shared.extras["standard_error"][row], single.extras["standard_error"][0])
        assert torch.equal(shared.base_value[row], single.base_value[0])


# ----------------------------------------------------------------------------- adaptive rule


class Kinked(nn.Module):
    """f(x) = sum_j relu(x . v_j - c_j): piecewise linear along any path, kinks where the
    thresholds c_j are crossed (clustered near the baseline, as on the bundled model)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.v = nn.Parameter(torch.randn(64, 12, generator=g))
        self.c = nn.Parameter(torch.rand(64, generator=g) ** 4 * 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(x.flatten(1) @ self.v.T - self.c)
        return torch.stack([(h * torch.linspace(-1, 1, 64)).sum(1), h.sum(1)], 1)


def test_adaptive_rule_is_a_convergent_quadrature() -> None:
    model = Kinked().eval()
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(3)) * 2
    opts = {"target": 0, "baseline": "zero"}
    # exact IG of a piecewise-linear function: each piece's gradient times its length
    ref = explain(model, x, method="integrated_gradients", steps=20000, quadrature="middle", **opts).attributions
    errs = []
    for steps in (12, 48, 192):
        e = explain(model, x, method="integrated_gradients", steps=steps, quadrature="adaptive", **opts)
        assert e.provenance["backward_samples"] == 2 * steps  # exactly `steps` gradient evaluations per input
        mesh = e.provenance["nodes"]
        assert len(mesh) == 2 and all(len(m) == steps and m[0] == 0.0 and m[-1] == 1.0 for m in mesh)
        errs.append(float((e.attributions - ref).abs().max() / ref.abs().max()))
    assert errs[2] < errs[0] and errs[2] < 1e-3, errs
    # per feature (not only in the completeness sum) it is closer to the exact IG than Gauss-Legendre
    gl192 = explain(model, x, method="integrated_gradients", steps=192, **opts).attributions
    assert errs[2] < float((gl192 - ref).abs().max() / ref.abs().max()) / 2
    # it beats Gauss-Legendre with the same number of gradients on this kinked integrand
    gl = explain(model, x, method="integrated_gradients", steps=48, **opts)
    ad = explain(model, x, method="integrated_gradients", steps=48, quadrature="adaptive", **opts)
    assert sum(ad.provenance["relative_completeness_error"]) < sum(gl.provenance["relative_completeness_error"])
    # no rescaling: the attributions are the trapezoid rule on the reported mesh, exactly
    mesh = torch.tensor(ad.provenance["nodes"][0], dtype=torch.float64)
    h = mesh.diff()
    w = torch.zeros_like(mesh)
    w[:-1] += h / 2
    w[1:] += h / 2
    pts = (mesh.view(-1, 1, 1, 1).float() * x[0]).requires_grad_(True)
    (g,) = torch.autograd.grad(model(pts)[:, 0].sum(), pts)
    expected = x[0].double() * (w.view(-1, 1, 1, 1) * g.double()).sum(0)
    torch.testing.assert_close(ad.attributions[0].double(), expected, atol=1e-5, rtol=1e-5)


def test_adaptive_rule_with_bounded_gradient_store() -> None:
    # a budget that stores 10 node gradients per input: the other 38 nodes go in one last round,
    # spread over the panels by their errors; still the trapezoid rule on the reported mesh
    model = Kinked().eval()
    x = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(3)) * 2
    e = explain(model, x, method="integrated_gradients", steps=48, quadrature="adaptive", target=0,
                memory_budget=4 * 2 * 48 * 10)
    assert e.provenance["backward_samples"] == 96
    for i in range(2):
        mesh = torch.tensor(e.provenance["nodes"][i], dtype=torch.float64)
        assert len(mesh) == 48 and mesh[0] == 0 and mesh[-1] == 1 and bool((mesh.diff() > 0).all())
        w = torch.zeros_like(mesh)
        w[:-1] += mesh.diff() / 2
        w[1:] += mesh.diff() / 2
        pts = (mesh.view(-1, 1, 1, 1).float() * x[i]).requires_grad_(True)
        (g,) = torch.autograd.grad(model(pts)[:, 0].sum(), pts)
        expected = x[i].double() * (w.view(-1, 1, 1, 1) * g.double()).sum(0)
        torch.testing.assert_close(e.attributions[i].double(), expected, atol=1e-5, rtol=1e-5)
    assert max(e.provenance["relative_completeness_error"]) < 0.05


def test_adaptive_rule_options() -> None:
    a, w = quadrature_nodes("adaptive", 50)  # the starting mesh
    assert a.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0] and float(w.sum()) == pytest.approx(1.0)
    with pytest.raises(OptionError, match="adaptive"):
        quadrature_nodes("adaptive", 1)
    with pytest.raises(OptionError, match="adaptive"):
        explain(Kinked(), torch.ones(1, 3, 2, 2), method="layer_integrated_gradients", layer="v", quadrature="adaptive")
