"""Metrics: known answers on a linear model, axioms, oracles (Quantus, Captum), lifecycle, bad input."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

import perspicio
from perspicio import metrics
from perspicio.core.explanation import Explanation
from perspicio.errors import InputError, ModelError, OptionError, UnknownNameError
from perspicio.metrics.faithfulness import noisy_linear_imputation

H = W = 16


class LinearNet(nn.Module):
    """logits = W x + b over the flattened (3, 16, 16) input; 4 classes; seeded weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * H * W, 4)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(self.fc.weight.shape, generator=g, dtype=torch.float64).float())
            self.fc.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


class SmallCNN(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> GAP -> linear, 16x16 inputs, seeded (for CAMs and randomization)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.act2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.act2(self.conv2(self.act1(self.conv1(x))))).flatten(1))


@pytest.fixture
def lin() -> LinearNet:
    return LinearNet().eval()


@pytest.fixture
def xs() -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn(2, 3, H, W, generator=g)


def perfect(model: LinearNet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Gradient x input of a linear model: the exact contribution of every input element."""
    w = model.fc.weight.detach()[t].view(-1, 3, H, W)
    return w * x


def contributions(model: LinearNet, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return perfect(model, x, t).sum(1).flatten(1).double()


def trapezoid(curve: torch.Tensor) -> torch.Tensor:
    k = curve.shape[1] - 1
    return (curve.sum(1) - (curve[:, 0] + curve[:, -1]) / 2) / k


def logits(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).double().gather(1, t[:, None]).squeeze(1)


T = torch.tensor([2, 0])

# ============================================================================ registry


def test_registry_has_every_issue_metric_with_metadata():
    expected = {"deletion", "insertion", "road", "infidelity", "faithfulness_correlation", "average_drop",
                "max_sensitivity", "avg_sensitivity", "randomization", "pointing_game", "energy_pointing_game",
                "relevance_mass", "relevance_rank", "sparseness", "entropy", "completeness"}
    assert set(metrics.names()) == expected
    from perspicio.core.registry import METRICS

    for e in METRICS.entries():
        assert e.family in ("faithfulness", "robustness", "randomization", "localization", "complexity", "axiomatic")
        assert isinstance(e.extra["higher_is_better"], bool)
        assert e.extra["higher_is_better"] == e.cls.higher_is_better
        assert tuple(e.extra["needs"]) == tuple(e.cls.needs)
    assert "| `deletion` | faithfulness | lower |" in metrics.metrics_table(markdown=True)


# ============================================================================ deletion / insertion


def test_deletion_insertion_exact_on_linear_model(lin, xs):
    a = perfect(lin, xs, T)
    c = contributions(lin, xs, T)
    full = logits(lin, xs, T)
    top = c.sort(dim=1, descending=True).values.cumsum(1)
    # every pixel its own step: curve_k = f(x) - (k largest contributions)
    expected_del = torch.cat([full[:, None], full[:, None] - top], 1)
    r = metrics.Deletion(steps=H * W, score="logit")(lin, xs, a, target=T)
    torch.testing.assert_close(r.details["curve"].double(), expected_del, atol=2e-4, rtol=0)
    torch.testing.assert_close(r.scores, trapezoid(expected_del), atol=2e-4, rtol=0)
    # insertion from a zero image: curve_k = f(0) + k largest contributions
    f0 = lin.fc.bias.detach().double()[T][:, None]
    expected_ins = torch.cat([f0, f0 + top], 1)
    r = metrics.Insertion(steps=H * W, score="logit", replacement="zero")(lin, xs, a, target=T)
    torch.testing.assert_close(r.details["curve"].double(), expected_ins, atol=2e-4, rtol=0)
    # coarser steps: 16 features per step
    r = metrics.Deletion(steps=16, score="logit")(lin, xs, a, target=T)
    torch.testing.assert_close(r.details["curve"].double(), expected_del[:, ::16], atol=2e-4, rtol=0)
    assert r.details["fraction"].tolist() == [k / 16 for k in range(17)]


def test_perfect_explanation_is_optimal_and_random_is_average(lin, xs):
    x = xs[:1].expand(48, -1, -1, -1).contiguous()
    t = torch.full((48,), 2)
    g = torch.Generator().manual_seed(11)
    rand_attr = torch.rand(48, 1, H, W, generator=g)
    best = metrics.Deletion(steps=32, score="logit")(lin, xs[:1], perfect(lin, xs[:1], T[:1]), target=2).scores
    rnd = metrics.Deletion(steps=32, score="logit")(lin, x, rand_attr, target=t).scores
    assert (rnd >= best - 1e-5).all()  # MoRF with exact contributions has the lowest area of any order
    # a random order removes on average a proportional share: E[curve_k] = f(x) - (k/n) (f(x) - f(0))
    full, f0 = float(logits(lin, xs[:1], T[:1])), float(lin.fc.bias.detach()[2])
    expected = full - (full - f0) / 2
    assert abs(float(rnd.mean()) - expected) < 4 * float(rnd.std()) / math.sqrt(48)
    ins_best = metrics.Insertion(steps=32, score="logit", replacement="zero")(lin, xs[:1], perfect(lin, xs[:1], T[:1]), target=2).scores
    ins_rnd = metrics.Insertion(steps=32, score="logit", replacement="zero")(lin, x, rand_attr, target=t).scores
    assert (ins_rnd <= ins_best + 1e-5).all()


def test_deletion_constant_map_is_raster_order_and_lerf_flips_direction(lin, xs):
    c = contributions(lin, xs, T)
    full = logits(lin, xs, T)
    expected = torch.cat([full[:, None], full[:, None] - c.cumsum(1)], 1)
    r = metrics.Deletion(steps=H * W, score="logit")(lin, xs, torch.ones(2, 1, H, W), target=T)
    torch.testing.assert_close(r.details["curve"].double(), expected, atol=2e-4, rtol=0)
    assert metrics.Deletion().higher_is_better is False
    assert metrics.Deletion(order="lerf").higher_is_better is True


def test_patches_probability_and_chunking_do_not_change_results(lin, xs):
    a = perfect(lin, xs, T)
    probs = torch.softmax(lin(xs).detach().double(), 1)
    big = metrics.Deletion(steps=8, unit="patch", patch_size=4, batch_size=64)(lin, xs, a, target=T)
    small = metrics.Deletion(steps=8, unit="patch", patch_size=4, batch_size=3)(lin, xs, a, target=T)
    torch.testing.assert_close(big.scores, small.scores)
    torch.testing.assert_close(big.details["curve"][:, 0].double(), probs.gather(1, T[:, None])[:, 0], atol=1e-6, rtol=0)
    assert small.details["passes"]["chunk_sizes"] == [3]
    assert small.details["passes"]["forward_samples"] == 2 + 2 * 8  # original + 8 steps per sample


@pytest.mark.parametrize("kind", ["deletion", "insertion"])
@pytest.mark.parametrize("replacement", ["zero", "blur", "mean"])
def test_curve_matches_naive_perturbed_copies_on_a_cnn(kind, replacement, xs):
    """Every curve point is the model on the copy with the first round(k n / steps) features of the
    (independently computed) stable ranking replaced; chunks of 5 rows span samples."""
    from perspicio.metrics.faithfulness import replacement_image

    model = SmallCNN().eval()
    t = torch.tensor([1, 3])
    rel = torch.rand(2, H, W, generator=torch.Generator().manual_seed(5))
    steps = 8
    cls = metrics.Deletion if kind == "deletion" else metrics.Insertion
    r = cls(steps=steps, replacement=replacement, score="logit", batch_size=5)(model, xs, rel[:, None], target=t)
    repl = replacement_image(xs, replacement, 5.0)
    expected = torch.empty(2, steps + 1, dtype=torch.float64)
    for i in range(2):
        order = sorted(range(H * W), key=lambda j: (-float(rel[i].flatten()[j]), j))  # MoRF, ties in raster order
        for k in range(steps + 1):
            moved = torch.zeros(H * W, dtype=torch.bool)
            moved[order[: round(k * H * W / steps)]] = True
            moved = moved.view(1, H, W)
            img = torch.where(moved, repl[i], xs[i]) if kind == "deletion" else torch.where(moved, xs[i], repl[i])
            expected[i, k] = logits(model, img[None], t[i:i + 1])[0]
    torch.testing.assert_close(r.details["curve"].double(), expected, atol=1e-4, rtol=1e-5)
    assert r.details["passes"]["forward_samples"] == 2 * (steps + 1)


def test_blur_replacement_is_normalised_and_mean_replacement():
    from perspicio.metrics.faithfulness import replacement_image

    x = torch.full((1, 3, 12, 12), 2.5)
    torch.testing.assert_close(replacement_image(x, "blur", 3.0), x)
    m = replacement_image(torch.arange(2 * 4.0).view(1, 2, 2, 2), "mean")
    assert m[0, 0].unique().tolist() == [1.5] and m[0, 1].unique().tolist() == [5.5]


# ============================================================================ ROAD


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_noisy_linear_imputation_matches_quantus(solver):
    from quantus.functions.perturb_func import noisy_linear_imputation as q_impute

    g = np.random.default_rng(0)
    x = g.normal(size=(3, 12, 10)).astype(np.float64)
    mask = np.zeros((12, 10), bool)
    mask[2:8, 3:9] = True
    mask[0, 0] = mask[11, 9] = mask[5, 0] = True  # corners and borders
    idx = np.flatnonzero(mask)
    expected = q_impute(x.copy(), idx, noise=0.0)
    got = noisy_linear_imputation(torch.from_numpy(x)[None], torch.from_numpy(mask)[None], noise=0.0, solver=solver)
    np.testing.assert_allclose(got[0].numpy(), expected, atol=1e-5)
    # known pixels untouched, imputed ones are the neighbour-weighted mean (harmonic)
    np.testing.assert_array_equal(got[0].numpy()[:, ~mask], x[:, ~mask])


def test_road_constant_image_and_noise_is_seeded(lin):
    x = torch.full((1, 3, H, W), 0.3)
    a = torch.rand(1, 1, H, W, generator=torch.Generator().manual_seed(0))
    p = float(torch.softmax(lin(x).detach(), 1)[0, 1])
    r = metrics.ROAD(noise=0.0)(lin, x, a, target=1)
    assert r.details["curve"].shape == (1, 9)
    torch.testing.assert_close(r.scores, torch.tensor([p], dtype=torch.float64), atol=1e-6, rtol=0)
    r1 = metrics.ROAD(seed=1)(lin, x, a, target=1)
    r2 = metrics.ROAD(seed=1)(lin, x, a, target=1)
    r3 = metrics.ROAD(seed=2)(lin, x, a, target=1)
    assert torch.equal(r1.scores, r2.scores) and not torch.equal(r1.scores, r3.scores)


# ============================================================================ infidelity / faithfulness correlation


def test_infidelity_zero_for_exact_linear_attribution(lin, xs):
    w = lin.fc.weight.detach()[T].view(-1, 3, H, W)
    r = metrics.Infidelity(samples=16, normalize=False)(lin, xs, w, target=T)
    assert float(r.scores.max()) < 1e-8
    bad = metrics.Infidelity(samples=16, normalize=False)(lin, xs, -w, target=T)
    assert float(bad.scores.min()) > 1.0


@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_matches_captum(normalize):
    from captum.metrics import infidelity

    model = SmallCNN().eval()
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(1))
    attr = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    n, s, noise, seed = 2, 8, 0.2, 5
    pert = torch.randn((n, s, 3, H, W), generator=torch.Generator().manual_seed(seed)) * noise
    pert = pert.reshape(n * s, 3, H, W)

    def perturb(inputs):
        return pert, inputs - pert

    t = torch.tensor([1, 3])
    expected = infidelity(model, perturb, x, attr, target=t, n_perturb_samples=s, normalize=normalize)
    got = metrics.Infidelity(samples=s, noise=noise, normalize=normalize, seed=seed)(model, x, attr, target=t)
    torch.testing.assert_close(got.scores.float(), expected.float(), rtol=1e-4, atol=1e-6)


def test_faithfulness_correlation_known_values(lin, xs):
    a = perfect(lin, xs, T)
    r = metrics.FaithfulnessCorrelation(runs=20, unit="pixel", fraction=0.1)(lin, xs, a, target=T)
    torch.testing.assert_close(r.scores, torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    r = metrics.FaithfulnessCorrelation(runs=20, unit="patch", patch_size=4, fraction=0.25)(lin, xs, a, target=T)
    torch.testing.assert_close(r.scores, torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    # random attributions: correlation 0 on average
    x = xs[:1].expand(40, -1, -1, -1).contiguous()
    rnd = torch.rand(40, 1, H, W, generator=torch.Generator().manual_seed(4))
    vals = metrics.FaithfulnessCorrelation(runs=30, unit="pixel")(lin, x, rnd, target=2).scores
    assert abs(float(vals.mean())) < 4 * float(vals.std()) / math.sqrt(40)


def test_average_drop_known_values(lin, xs):
    probs = torch.softmax(lin(xs).detach().double(), 1).gather(1, T[:, None])[:, 0]
    r = metrics.AverageDrop()(lin, xs, torch.ones(2, 1, H, W), target=T)  # constant map: keeps the image
    # min-max scaling of a constant map gives 0: the masked image is the zero baseline
    p0 = torch.softmax(lin(torch.zeros_like(xs)).detach().double(), 1).gather(1, T[:, None])[:, 0]
    expected = 100 * (probs - p0).clamp_min(0) / probs
    torch.testing.assert_close(r.scores, expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(r.details["increase"], (p0 > probs).double())
    one = torch.zeros(2, 1, H, W)
    one[:, :, 0, 0] = 1.0
    one[:, :, 1:, :] = 1.0  # all but a few pixels at full weight
    r = metrics.AverageDrop()(lin, xs, one, target=T)
    assert r.scores.shape == (2,) and torch.isfinite(r.scores).all()


# ============================================================================ completeness


def test_completeness_with_base_value_and_not_applicable(lin, xs):
    a = perfect(lin, xs, T)
    f0 = lin.fc.bias.detach()[T]
    exp = Explanation(attributions=a, method="custom", scores=logits(lin, xs, T).float(), targets=T, inputs=xs, base_value=f0)
    r = metrics.Completeness()(lin, None, exp)
    assert float(r.scores.max()) < 1e-4
    r = metrics.Completeness(baseline="zero")(lin, xs, a * 1.5, target=T)
    torch.testing.assert_close(r.scores, 0.5 * (logits(lin, xs, T) - f0.double()).abs(), atol=1e-4, rtol=0)
    with pytest.raises(metrics.NotApplicable, match="base_value"):
        metrics.Completeness()(lin, xs, a, target=T)


# ============================================================================ robustness


def test_sensitivity_zero_for_constant_explainer_and_positive_for_input(lin, xs):
    w = lin.fc.weight.detach()

    def gradient(model, x, target):  # exact gradient of a linear model: does not depend on x
        t = torch.as_tensor(target).expand(len(x)) if torch.as_tensor(target).ndim == 0 else torch.as_tensor(target)
        return w[t].view(-1, 3, H, W)

    r = metrics.MaxSensitivity(samples=4)(lin, xs, gradient(lin, xs, T), target=T, method=gradient)
    assert float(r.scores.max()) == 0.0

    def input_times(model, x, target):
        return gradient(model, x, target) * x

    base = input_times(lin, xs, T)
    r = metrics.MaxSensitivity(samples=6, radius=0.05)(lin, xs, base, target=T, method=input_times)
    a = metrics.AvgSensitivity(samples=6, radius=0.05)(lin, xs, base, target=T, method=input_times)
    assert (r.scores > 0).all() and (a.scores <= r.scores + 1e-12).all()
    # bound: ||w * d|| / ||w * x|| <= radius * ||w|| / ||w x||
    bound = 0.05 * gradient(lin, xs, T).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)
    assert (r.scores <= bound.double() + 1e-6).all()


def test_max_sensitivity_matches_captum_on_zoo_model(zoo_model, chelsea_batch):
    from captum.metrics import sensitivity_max

    x = chelsea_batch
    s, radius, seed = 2, 0.02, 3
    exp = perspicio.explain(zoo_model, x, "gradcam")
    noise = (torch.rand((1, s, *x.shape[1:]), generator=torch.Generator().manual_seed(seed)) * 2 - 1) * radius
    noise = noise.reshape(s, *x.shape[1:])

    def perturb(inputs, perturb_radius=radius):
        return inputs + noise

    def expl(inputs, target=None):
        inputs = inputs[0] if isinstance(inputs, tuple) else inputs
        # a tuple: captum mis-broadcasts the reference explanation when given a bare tensor
        return (perspicio.explain(zoo_model, inputs, "gradcam", target=target).attributions,)

    expected = sensitivity_max(expl, x, perturb_func=perturb, n_perturb_samples=s, target=exp.targets)
    got = metrics.MaxSensitivity(samples=s, radius=radius, seed=seed)(zoo_model, x, exp)
    torch.testing.assert_close(got.scores.float(), expected.float(), rtol=1e-3, atol=1e-5)
    assert got.details["passes"]["backward_samples"] == s


# ============================================================================ randomization


def test_randomization_leaves_user_model_bit_identical(assert_no_hooks):
    model = SmallCNN().train()
    for p in model.fc.parameters():
        p.requires_grad_(False)
    model.conv1.weight.grad = torch.ones_like(model.conv1.weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0))
    x0 = x.clone()
    exp = perspicio.explain(model, x, "gradcam")
    r = metrics.Randomization(steps=3)(model, x, exp)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert torch.equal(model.conv1.weight.grad, torch.ones_like(model.conv1.weight)) and model.conv2.weight.grad is None
    assert torch.equal(x, x0)
    assert_no_hooks(model)
    assert r.details["layers"] == [["fc"], ["conv2"], ["conv1"]]
    assert r.details["cascading"]["spearman"].shape == (2, 3)
    assert r.details["independent"]["ssim"].shape == (2, 3)
    assert r.details["passes"]["backward_samples"] == 2 * 3 * 2  # two modes x three steps x two samples


def test_randomization_flags_a_model_independent_explanation():
    model = SmallCNN().eval()
    x = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(0))

    def edge_detector(m, inp, target):  # ignores the model: must fail the sanity check
        return inp.abs().sum(1, keepdim=True)

    r = metrics.Randomization(steps=3)(model, x, edge_detector(model, x, None), method=edge_detector)
    for mode in ("cascading", "independent"):
        for key in ("spearman", "ssim", "topk"):
            torch.testing.assert_close(r.details[mode][key], torch.ones(2, 3, dtype=torch.float64), atol=1e-9, rtol=0)
    assert r.scores.tolist() == pytest.approx([1.0, 1.0])
    good = metrics.Randomization(steps=3)(model, x, perspicio.explain(model, x, "gradcam"))
    assert float(good.scores.mean()) < 0.9


def test_similarity_measures_against_references():
    from scipy.stats import spearmanr
    from skimage.metrics import structural_similarity

    from perspicio.metrics.randomization import spearman, ssim, topk_intersection

    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 20, 24, generator=g)
    b = (a + 0.3 * torch.rand(2, 20, 24, generator=g)).clamp(0, 1)
    b[0, :5] = 0.0  # ties
    for i in range(2):
        assert float(spearman(a, b)[i]) == pytest.approx(spearmanr(a[i].flatten(), b[i].flatten()).statistic, abs=1e-10)
        ref = structural_similarity(a[i].double().numpy(), b[i].double().numpy(), data_range=1.0,
                                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        assert float(ssim(a, b)[i]) == pytest.approx(ref, abs=1e-6)
    assert topk_intersection(a, a, 0.1).tolist() == [1.0, 1.0]
    assert topk_intersection(a, -a, 0.1).tolist() == [0.0, 0.0]


# ============================================================================ localization and complexity


def _quantus(metric, a, s=None):
    x = np.zeros((a.shape[0], 3, *a.shape[-2:]), np.float32)
    return np.array(metric(model=None, x_batch=x, y_batch=np.zeros(a.shape[0], int), a_batch=a.numpy(),
                           s_batch=None if s is None else s.numpy().astype(np.float32)), dtype=np.float64)


def test_localization_and_complexity_match_quantus():
    import quantus

    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, H, W, generator=g)
    masks = torch.zeros(3, H, W, dtype=torch.bool)
    masks[0, 2:9, 3:12] = masks[1, 8:, 8:] = masks[2, :4, :] = True
    x = torch.zeros(3, 3, H, W)
    s = masks[:, None].float()
    cases = [
        (metrics.RelevanceMass(), quantus.RelevanceMassAccuracy(disable_warnings=True), s),
        (metrics.RelevanceRank(), quantus.RelevanceRankAccuracy(disable_warnings=True), s),
        (metrics.PointingGame(tolerance=0), quantus.PointingGame(disable_warnings=True), s),
        (metrics.Sparseness(), quantus.Sparseness(disable_warnings=True), None),
        (metrics.Entropy(), quantus.Complexity(disable_warnings=True), None),
    ]
    for ours, theirs, gt in cases:
        got = ours(None, x, a, masks=masks).scores.numpy()
        np.testing.assert_allclose(got, _quantus(theirs, a, gt), atol=2e-5, err_msg=type(ours).__name__)


def test_localization_known_values():
    x = torch.zeros(1, 3, H, W)
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, 4:8, 2:10] = True  # 32 of 256 pixels
    const = torch.ones(1, 1, H, W)
    f = None  # localization needs no model
    for m in (metrics.PointingGame(tolerance=0), metrics.RelevanceMass(), metrics.EnergyPointingGame()):
        assert m(f, x, const, target=0, masks=mask).scores.tolist() == [32 / 256]
    peak = torch.zeros(1, 1, H, W)
    peak[0, 0, 8, 5] = 1.0  # one row below the mask
    assert metrics.PointingGame(tolerance=0)(f, x, peak, target=0, masks=mask).scores.tolist() == [0.0]
    assert metrics.PointingGame(tolerance=1)(f, x, peak, target=0, masks=mask).scores.tolist() == [1.0]
    ring = torch.zeros(1, 1, H, W)
    ring[0, 0, 4, 2] = ring[0, 0, 7, 9] = 1.0  # corners of the mask: the bounding box is the mask itself
    odd = torch.zeros(1, H, W, dtype=torch.bool)
    odd[0, 4, 2] = odd[0, 7, 9] = True  # diagonal corners only: bounding box = 4x8 rectangle
    assert metrics.RelevanceMass()(f, x, const, target=0, masks=odd).scores.tolist() == [2 / 256]
    assert metrics.EnergyPointingGame()(f, x, const, target=0, masks=odd).scores.tolist() == [32 / 256]
    assert metrics.RelevanceRank()(f, x, ring, target=0, masks=odd).scores.tolist() == [1.0]
    boxes = [(2, 4, 10, 8)]
    assert metrics.RelevanceMass()(f, x, const, target=0, masks=boxes).scores.tolist() == [32 / 256]


def test_complexity_known_values():
    n = H * W
    x = torch.zeros(1, 3, H, W)
    f = None
    const, one = torch.ones(1, 1, H, W), torch.zeros(1, 1, H, W)
    one[0, 0, 3, 3] = -5.0
    assert metrics.Sparseness()(f, x, const, target=0).scores.tolist() == [0.0]
    assert metrics.Sparseness()(f, x, one, target=0).scores.tolist() == pytest.approx([(n - 1) / n])
    assert metrics.Entropy()(f, x, const, target=0).scores.tolist() == pytest.approx([math.log(n)])
    assert metrics.Entropy()(f, x, one, target=0).scores.tolist() == [0.0]
    assert metrics.Entropy()(f, x, torch.zeros(1, 1, H, W), target=0).scores.tolist() == pytest.approx([math.log(n)])


# ============================================================================ any method, black boxes, lifecycle


def test_every_metric_accepts_every_registered_method_on_a_tiny_model(assert_no_hooks):
    model = SmallCNN().eval()
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    masks = torch.zeros(1, H, W, dtype=torch.bool)
    masks[0, 4:12, 4:12] = True
    fast = {"deletion": {"steps": 8}, "insertion": {"steps": 8}, "road": {"percentages": (0.2, 0.6)},
            "infidelity": {"samples": 4}, "faithfulness_correlation": {"runs": 4, "unit": "pixel"},
            "max_sensitivity": {"samples": 2}, "avg_sensitivity": {"samples": 2}, "randomization": {"steps": 2}}
    from perspicio.core.registry import METHODS
    from perspicio.errors import PerspicioError

    perspicio.methods.names()  # registers the methods
    # one method of every registered family (the first that runs with default options), found at run time
    chosen, failed = {}, {}
    networks = [e for e in METHODS.entries() if not e.extra.get("needs")]  # not tree_shap / linear_shap
    for e in networks:
        if e.family in chosen:
            continue
        try:
            chosen[e.family] = perspicio.explain(model, x, e.name)
        except PerspicioError as exc:
            failed[e.name] = str(exc)
            continue
    # every family is covered: a family none of whose methods runs here is a failure, not a skip
    assert set(chosen) == {e.family for e in networks}, failed
    for exp in chosen.values():
        for name in metrics.names():
            m = metrics.get(name)(**fast.get(name, {}))
            try:
                r = m(model, x, exp, masks=masks)
            except metrics.NotApplicable:
                assert name == "completeness" and exp.base_value is None, (exp.method, name)
                continue
            assert r.scores.shape == (1,), (exp.method, name)
            if name == "completeness":
                assert float(r.scores[0]) < 0.05 * max(1.0, abs(float(r.details["delta_output"][0]))), exp.method
    assert_no_hooks(model)


def test_black_box_model_and_model_state_restored(lin, xs):
    def f(z):  # numpy in, numpy out: a true black box
        return lin(torch.from_numpy(z).float()).detach().numpy()

    a = perfect(lin, xs, T)
    r1 = metrics.Deletion(steps=8, score="logit")(f, xs, a, target=T)
    r2 = metrics.Deletion(steps=8, score="logit")(lin, xs, a, target=T)
    torch.testing.assert_close(r1.scores, r2.scores)
    lin.train()
    lin.fc.weight.grad = torch.full_like(lin.fc.weight, 3.0)
    x0 = xs.clone()
    metrics.Infidelity(samples=3)(lin, xs, a, target=T)
    assert lin.training and lin.fc.weight.requires_grad and torch.equal(lin.fc.weight.grad, torch.full_like(lin.fc.weight, 3.0))
    assert torch.equal(xs, x0)


def test_lifecycle_after_exception(assert_no_hooks):
    model = SmallCNN().train()
    x = torch.randn(1, 3, H, W, generator=torch.Generator().manual_seed(0))
    before = copy.deepcopy(model.state_dict())
    exp = perspicio.explain(model, x, "gradcam")
    calls = []

    def explode(m, inp, target):
        calls.append(1)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        metrics.MaxSensitivity(samples=2)(model, x, exp, method=explode)
    with pytest.raises(RuntimeError, match="boom"):
        metrics.Randomization(steps=2)(model, x, exp, method=explode)
    assert calls and model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert_no_hooks(model)


# ============================================================================ bad input


def test_bad_input_errors(lin, xs):
    a = perfect(lin, xs, T)
    with pytest.raises(InputError, match=r"masks must be .*\(2, 16, 16\)"):
        metrics.PointingGame()(lin, xs, a, target=T, masks=torch.ones(2, 8, 8, dtype=torch.bool))
    empty = torch.zeros(2, H, W, dtype=torch.bool)
    empty[0, 1, 1] = True
    with pytest.raises(InputError, match=r"sample\(s\) \[1\] is empty"):
        metrics.RelevanceMass()(lin, xs, a, target=T, masks=empty)
    with pytest.raises(InputError, match="needs ground-truth masks"):
        metrics.RelevanceRank()(lin, xs, a, target=T)
    with pytest.raises(InputError, match="box 0"):
        metrics.RelevanceMass()(lin, xs, a, target=T, masks=[(0, 0, 40, 4), (0, 0, 4, 4)])

    def black_box(z):
        return lin(torch.from_numpy(z).float()).detach().numpy()

    with pytest.raises(ModelError, match="needs a torch nn.Module and its gradients"):
        metrics.MaxSensitivity()(black_box, xs, a, target=T, method="gradcam")
    with pytest.raises(ModelError, match="randomizes the model's parameters"):
        metrics.Randomization()(black_box, xs, a, target=T, method=lambda m, z, t: z)
    with pytest.raises(UnknownNameError, match="Did you mean: deletion"):
        metrics.get("deleton")
    with pytest.raises(UnknownNameError):
        perspicio.evaluate(lin, xs, methods=["gradcam"], metrics=["nope"])
    with pytest.raises(OptionError, match="steps must be an integer"):
        metrics.Deletion(steps=0)
    with pytest.raises(OptionError, match="replacement must be one of"):
        metrics.Insertion(replacement="noise")
    with pytest.raises(OptionError, match="exceeds"):
        metrics.Deletion(steps=1000)(lin, xs, a, target=T)
    with pytest.raises(InputError, match="attributions for 1 samples and 2 inputs"):
        metrics.Sparseness()(lin, xs, a[:1], target=T)
    with pytest.raises(OptionError, match="re-runs the explanation method"):
        metrics.AvgSensitivity()(lin, xs, a, target=T)
