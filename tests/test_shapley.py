"""Shapley estimators: closed-form games, axioms, efficiency, shap oracle, convergence, errors."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

import perspicio
from perspicio.errors import OptionError
from perspicio.methods import efficiency_error

ESTIMATORS = ("shapley_exact", "shapley_sampling", "kernel_shap")


def game_model(v):
    """A black box whose output on rows of 0/1 is the game value of the present features."""

    def f(x: np.ndarray) -> np.ndarray:
        return np.array([float(v(frozenset(np.flatnonzero(row != 0)))) for row in x])

    return f


def reference_shapley(v, m: int) -> np.ndarray:
    """Independent reference: average marginal contribution over all m! orderings."""
    phi = np.zeros(m)
    perms = list(itertools.permutations(range(m)))
    for p in perms:
        s: set[int] = set()
        for i in p:
            before = v(frozenset(s))
            s.add(i)
            phi[i] += v(frozenset(s)) - before
    return phi / len(perms)


def run(method, v, m, **kw):
    x = np.ones((1, m))
    kw.setdefault("baseline", 0.0)
    return perspicio.explain(game_model(v), x, method=method, **kw)


# ----------------------------------------------------------------------------- closed-form games


@pytest.mark.parametrize("method", ESTIMATORS)
def test_additive_game(method):
    w = [3.0, -1.0, 0.5, 2.0, 0.0]
    e = run(method, lambda s: sum(w[i] for i in s) + 7.0, 5, budget=64, seed=1)
    np.testing.assert_allclose(e.attributions[0].numpy(), w, atol=1e-12)
    assert float(e.base_value[0]) == pytest.approx(7.0)


@pytest.mark.parametrize("method", ESTIMATORS)
def test_pure_interaction_game(method):
    # v(S) = 1 iff features 0 and 1 are both present: they split the unit, the rest get 0
    e = run(method, lambda s: float({0, 1} <= s), 4, budget=16, seed=2)
    np.testing.assert_allclose(e.attributions[0].numpy(), [0.5, 0.5, 0.0, 0.0], atol=1e-12)


def test_majority_games():
    # symmetric majority of 5 voters: 1/5 each
    e = run("shapley_exact", lambda s: float(len(s) >= 3), 5)
    np.testing.assert_allclose(e.attributions[0].numpy(), [0.2] * 5, atol=1e-12)
    # weighted majority [51; 50, 49, 1]: the big party is pivotal in 4 of 6 orders -> (2/3, 1/6, 1/6)
    wts = [50, 49, 1]
    e = run("shapley_exact", lambda s: float(sum(wts[i] for i in s) >= 51), 3)
    np.testing.assert_allclose(e.attributions[0].numpy(), [2 / 3, 1 / 6, 1 / 6], atol=1e-12)
    # [4; 3, 2, 1, 1]: winning coalitions {0,1}, {0,2}, {0,3}, {1,2,3} -> players 1-3 symmetric: (1/2, 1/6, 1/6, 1/6)
    wts = [3, 2, 1, 1]
    e = run("shapley_exact", lambda s: float(sum(wts[i] for i in s) >= 4), 4)
    np.testing.assert_allclose(e.attributions[0].numpy(), [1 / 2, 1 / 6, 1 / 6, 1 / 6], atol=1e-12)


def random_game(m, seed):
    rng = np.random.default_rng(seed)
    table = {frozenset(c): rng.normal() for k in range(m + 1) for c in itertools.combinations(range(m), k)}
    return table.__getitem__


def test_exact_matches_permutation_reference_on_random_game():
    v = random_game(6, 0)
    e = run("shapley_exact", v, 6)
    np.testing.assert_allclose(e.attributions[0].numpy(), reference_shapley(v, 6), atol=1e-12)


def test_kernel_shap_with_full_budget_is_exact():
    v = random_game(7, 1)
    e = run("kernel_shap", v, 7, budget=2**7)
    np.testing.assert_allclose(e.attributions[0].numpy(), reference_shapley(v, 7), atol=1e-10)
    assert float(e.extras["stderr"][0].abs().max()) == 0.0


# ----------------------------------------------------------------------------- axioms


def test_axioms_exact():
    m = 5
    v = random_game(m, 3)
    # symmetry: features 1 and 3 interchangeable
    def sym(s):
        t = set(s)
        if (1 in t) != (3 in t):
            t ^= {1, 3}
            return 0.5 * (v(frozenset(t)) + v(frozenset(s)))
        return v(frozenset(s))

    phi = run("shapley_exact", sym, m).attributions[0].numpy()
    assert phi[1] == pytest.approx(phi[3], abs=1e-12)
    # dummy: feature 4 never matters
    phi = run("shapley_exact", lambda s: v(frozenset(s - {4})), m).attributions[0].numpy()
    assert phi[4] == pytest.approx(0.0, abs=1e-12)
    # linearity
    w = random_game(m, 4)
    a = run("shapley_exact", v, m).attributions[0].numpy()
    b = run("shapley_exact", w, m).attributions[0].numpy()
    c = run("shapley_exact", lambda s: 2 * v(s) - 3 * w(s), m).attributions[0].numpy()
    np.testing.assert_allclose(c, 2 * a - 3 * b, atol=1e-12)


@pytest.mark.parametrize("method", ESTIMATORS)
def test_efficiency_and_base_value(method, diabetes_gbm):
    demo, bg = diabetes_gbm
    x = demo.X_test[:2]
    # named groups by column name; the other columns stay their own features
    groups = {"demographics": ["age", "sex"], "lipids": ["s1", "s2", "s3"]}
    e = perspicio.explain(demo, x, method=method, background=bg[:20], budget=None if method == "shapley_exact" else 60,
                          seed=0, feature_mask=groups, feature_names=demo.feature_names)
    assert e.extras["feature_names"][0] == ("demographics", "lipids", "bmi", "bp", "s4", "s5", "s6")
    pred = demo.predict(bg[:20])
    base = [pred[:, t].mean() for t in e.targets.tolist()]
    np.testing.assert_allclose(e.base_value.numpy(), base, atol=1e-12)
    assert float(efficiency_error(e).max()) < 1e-9
    # grouped columns share their group's value
    a = e.attributions[0].numpy()
    assert a[0] == a[1] and a[4] == a[5] == a[6]
    assert len(e.extras["values"][0]) == 7


# ----------------------------------------------------------------------------- shap oracle and convergence


@pytest.fixture(scope="module")
def diabetes_gbm():
    from perspicio.zoo.tabular import load_tabular

    demo = load_tabular("diabetes", "gbm", cache=False)
    return demo, demo.background(40, seed=1)


def test_exact_equals_shap_exact_explainer(diabetes_gbm):
    shap = pytest.importorskip("shap")
    demo, bg = diabetes_gbm
    x = demo.X_test[:2]
    ours = perspicio.explain(demo, x, method="shapley_exact", background=bg)
    masker = shap.maskers.Independent(bg, max_samples=len(bg))
    ref = shap.explainers.Exact(demo.estimator.predict, masker)(x)
    np.testing.assert_allclose(ours.attributions.numpy(), ref.values, atol=1e-6)
    np.testing.assert_allclose(ours.base_value.numpy(), ref.base_values, atol=1e-6)


@pytest.mark.parametrize("method,budget,bound", [("kernel_shap", 400, 0.05), ("shapley_sampling", 1000, 0.08)])
def test_estimators_converge_to_exact(diabetes_gbm, method, budget, bound):
    demo, bg = diabetes_gbm
    x = demo.X_test[:1]
    exact = perspicio.explain(demo, x, method="shapley_exact", background=bg).attributions[0].numpy()
    est = perspicio.explain(demo, x, method=method, background=bg, budget=budget, seed=3)
    rel = np.abs(est.attributions[0].numpy() - exact).max() / np.abs(exact).max()
    assert rel < bound, f"{method}: max error {rel:.3f} of the largest value at budget {budget}"
    assert est.provenance["evaluations"] <= budget
    big = perspicio.explain(demo, x, method=method, background=bg, budget=4 * budget, seed=3)
    rel_big = np.abs(big.attributions[0].numpy() - exact).max() / np.abs(exact).max()
    assert rel_big < bound / 1.5, "error does not shrink with the budget"


@pytest.mark.parametrize("method", ["kernel_shap", "shapley_sampling"])
def test_standard_errors_are_calibrated(method):
    # a random game on 10 players (every coalition value i.i.d. normal): far from additive
    from perspicio.methods.shapley import exact_shapley

    m = 10
    table = np.random.default_rng(5).normal(size=1 << m)
    exact = exact_shapley(torch.from_numpy(table), m).numpy()

    def f(x: np.ndarray) -> np.ndarray:
        return table[(x != 0).astype(int) @ (1 << np.arange(m))]

    x = np.ones((1, m))
    errs, ses = [], []
    for seed in range(12):
        e = perspicio.explain(f, x, method=method, baseline=0.0, budget=200, seed=seed)
        errs.append(e.attributions[0].numpy() - exact)
        ses.append(e.extras["stderr"][0].numpy())
    rmse = np.sqrt(np.mean(np.square(errs), axis=0)).mean()
    se = np.mean(ses)
    assert 0.4 < se / rmse < 2.5, f"reported standard error {se:.4f} vs observed RMSE {rmse:.4f}"


def test_sampling_tolerance_stops_early():
    v = random_game(6, 7)
    e = run("shapley_sampling", v, 6, budget=20000, tolerance=0.05, seed=0)
    assert e.provenance["evaluations"] < 20000
    assert float(e.extras["stderr"][0].max()) < 0.05


@pytest.mark.parametrize("method", ESTIMATORS)
def test_seeded_runs_are_bit_reproducible(method, diabetes_gbm):
    demo, bg = diabetes_gbm
    kw = dict(background=bg[:10], budget=None if method == "shapley_exact" else 300, seed=11)
    a = perspicio.explain(demo, demo.X_test[:2], method=method, **kw)
    b = perspicio.explain(demo, demo.X_test[:2], method=method, batch_size=37, **kw)
    assert torch.equal(a.attributions, b.attributions)
    if method != "shapley_exact":
        c = perspicio.explain(demo, demo.X_test[:2], method=method, **{**kw, "seed": 12})
        assert not torch.equal(a.attributions, c.attributions)


def test_images_kernel_shap_efficiency(tiny_cnn, tiny_input):
    e = perspicio.explain(tiny_cnn, tiny_input, method="kernel_shap", feature_mask="grid:2", budget=16, seed=0)
    assert e.attributions.shape == tiny_input.shape
    assert float(efficiency_error(e).max()) < 1e-5
    with torch.no_grad():
        base = tiny_cnn(torch.zeros_like(tiny_input))
    np.testing.assert_allclose(e.base_value.numpy(), base.gather(1, e.targets[:, None])[:, 0].numpy(), atol=1e-5)


# ----------------------------------------------------------------------------- bad input


def test_bad_options_raise_clear_errors():
    f = game_model(lambda s: len(s))
    x = np.ones((1, 6))
    with pytest.raises(OptionError, match="budget=5 is below the minimum kernel_shap needs"):
        perspicio.explain(f, x, method="kernel_shap", budget=5)
    with pytest.raises(OptionError, match="budget=10 is below the minimum shapley_sampling"):
        perspicio.explain(f, x, method="shapley_sampling", budget=10)
    with pytest.raises(OptionError, match="2\\^M"):
        perspicio.explain(f, x, method="shapley_exact", budget=10)
    with pytest.raises(OptionError, match="up to 20 features"):
        perspicio.explain(f, np.ones((1, 21)), method="shapley_exact")
    with pytest.raises(OptionError, match=r"background must have shape \(K, 6\)"):
        perspicio.explain(f, x, method="kernel_shap", background=np.zeros((4, 5)))
    with pytest.raises(OptionError, match="contiguous"):
        perspicio.explain(f, x, method="kernel_shap", feature_mask=[0, 0, 2, 2, 3, 3])
    with pytest.raises(OptionError, match="feature_mask has shape"):
        perspicio.explain(f, x, method="kernel_shap", feature_mask=[0, 1, 2])
    with pytest.raises(OptionError, match="either background"):
        perspicio.explain(f, x, method="kernel_shap", background=np.zeros((2, 6)), baseline=0.0)
    with pytest.raises(OptionError, match="tolerance"):
        perspicio.explain(f, x, method="shapley_sampling", tolerance=-1)


def test_exact_shapley_math_on_additive_plus_interaction():
    from perspicio.methods.shapley import exact_shapley

    m = 16
    ints = torch.arange(1 << m)
    w = torch.randn(m, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    values = ((ints[:, None] >> torch.arange(m)) & 1).double() @ w  # additive
    np.testing.assert_allclose(exact_shapley(values, m).numpy(), w.numpy(), atol=1e-9)
    # pure interaction of features 3 and 17 on top: they split it
    both = ((ints >> 3) & 1) * ((ints >> 13) & 1)
    phi = exact_shapley(values + both.double(), m).numpy()
    expected = w.numpy().copy()
    expected[[3, 13]] += 0.5
    np.testing.assert_allclose(phi, expected, atol=1e-9)
    assert math.isclose(phi.sum(), float(values[-1] + 1 - values[0]), abs_tol=1e-9)
