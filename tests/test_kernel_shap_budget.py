"""KernelSHAP budget allocation: the error falls with the budget, stays at or below shap's
KernelExplainer, and the reported standard errors are zero only when the result is exact."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest

import perspicio
from perspicio.methods.shapley import allocate_pairs


def nonlinear_game(m: int, seed: int = 0):
    """A fixed function with main effects, pairwise and higher-order interactions on m features,
    tabulated on every coalition (baseline 0, input x0): returns (black box on 0/1 rows, exact phi)."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=m)
    b = np.triu(rng.normal(size=(m, m)) * 0.6, 1)
    c = rng.normal(size=m)
    x0 = rng.uniform(0.5, 1.5, size=m)
    bits = ((np.arange(1 << m)[:, None] >> np.arange(m)) & 1).astype(float)
    x = bits * x0
    table = x @ a + np.einsum("ni,ij,nj->n", x, b, x) + 2 * np.sin(x @ c) + np.tanh(x[:, 0] * x[:, 1] * x[:, 2])
    powers = 1 << np.arange(m)

    def f(rows: np.ndarray) -> np.ndarray:
        return table[(np.asarray(rows) != 0).astype(np.int64) @ powers]

    exact = perspicio.explain(f, np.ones((1, m)), method="shapley_exact", baseline=0.0).attributions[0].numpy()
    return f, exact


@pytest.fixture(scope="module")
def game16():
    return nonlinear_game(16)


@pytest.fixture(scope="module")
def game10():
    return nonlinear_game(10)


def ours(f, m: int, budget: int, seed: int):
    return perspicio.explain(f, np.ones((1, m)), method="kernel_shap", baseline=0.0, budget=budget, seed=seed)


def max_error(e, exact) -> float:
    return float(np.abs(e.attributions[0].numpy() - exact).max())


def shap_max_error(f, exact, budget: int, seed: int) -> float:
    """shap's KernelExplainer (l1_reg=False, nsamples=budget) with its sampling drawn from a local
    generator: it calls np.random.choice/permutation, so its module sees a numpy whose ``random`` is
    a seeded RandomState (the global numpy state is never touched)."""
    shap = pytest.importorskip("shap")
    from shap.explainers import _kernel

    m = len(exact)
    local = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith("__")})
    local.random = np.random.RandomState(seed)
    saved = _kernel.np
    _kernel.np = local
    try:
        values = shap.KernelExplainer(f, np.zeros((1, m))).shap_values(np.ones((1, m)), nsamples=budget,
                                                                       l1_reg=False, silent=True)
    finally:
        _kernel.np = saved
    return float(np.abs(np.asarray(values).reshape(-1) - exact).max())


@pytest.mark.slow
def test_error_falls_with_the_budget_everywhere_from_100_to_600(game16):
    # every budget 100..600, two independent seeds each (different seeds at every budget, so
    # neighbouring budgets do not share their samples); windows of 50 and 25 budgets
    f, exact = game16
    errors = np.array([[max_error(ours(f, 16, b, 7 * b + s), exact) for s in range(2)] for b in range(100, 601)])
    per_budget = errors.mean(axis=1)[:500]
    w50 = per_budget.reshape(10, 50).mean(axis=1)
    assert np.all(w50[1:] <= w50[:-1]), f"mean max error by window of 50 budgets: {np.round(w50, 4)}"
    assert w50[-1] < 0.5 * w50[0]
    # no cliff where a whole coalition size becomes affordable (old code: 0.29 -> 1.24 at 274)
    w25 = per_budget.reshape(20, 25).mean(axis=1)
    assert np.all(w25[1:] <= 1.15 * w25[:-1]), f"mean max error by window of 25 budgets: {np.round(w25, 4)}"


@pytest.mark.slow
@pytest.mark.parametrize("m,budgets,seeds", [
    (16, (100, 150, 200, 250, 272, 273, 274, 275, 300, 350, 400, 450, 500, 550, 600), 30),
    (10, (40, 80, 100, 110, 111, 112, 113, 150, 300), 20),
])
def test_error_at_or_below_shap_kernel_explainer(m, budgets, seeds, game16, game10):
    f, exact = game16 if m == 16 else game10
    for b in budgets:
        mine = np.mean([max_error(ours(f, m, b, s), exact) for s in range(seeds)])
        theirs = np.mean([shap_max_error(f, exact, b, s) for s in range(seeds)])
        assert mine <= theirs, f"m={m} budget={b}: mean max error {mine:.4f} vs shap's {theirs:.4f}"


@pytest.mark.parametrize("m,budgets", [(16, (18, 40, 100, 272, 273, 274, 275, 276, 600, 5000)),
                                       (10, (12, 50, 110, 111, 112, 113, 500, 1000, 1023))])
def test_stderr_is_positive_unless_exact(m, budgets, game16, game10):
    f, exact = game16 if m == 16 else game10
    for b in budgets:
        e = ours(f, m, b, seed=1)
        se = e.extras["stderr"][0].numpy()
        err = np.abs(e.attributions[0].numpy() - exact).max()
        assert e.extras["sampled"][0] > 0
        assert np.all(se > 0), f"m={m} budget={b}: standard error {se.min()} while the largest error is {err:.3g}"
        assert err > 1e-9  # not exact, so a positive error bar is the honest answer


@pytest.mark.parametrize("budget", [1024, 1025, 5000])
def test_stderr_is_zero_when_every_coalition_is_evaluated(budget, game10):
    f, exact = game10
    e = ours(f, 10, budget, seed=0)
    np.testing.assert_allclose(e.attributions[0].numpy(), exact, atol=1e-10)
    assert np.all(e.extras["stderr"][0].numpy() == 0)
    assert e.provenance["evaluations"] == 1024


def test_stderr_tracks_the_error_around_the_old_cliff(game16):
    # budgets 274/275 used to sample nothing and report 0; the error bars must match the error
    f, exact = game16
    errs, ses = [], []
    for s in range(12):
        for b in (273, 274, 275):
            e = ours(f, 16, b, s)
            errs.append(e.attributions[0].numpy() - exact)
            ses.append(e.extras["stderr"][0].numpy())
    ratio = np.mean(ses) / np.sqrt(np.mean(np.square(errs)))
    assert 0.6 < ratio < 1.6, f"standard error / RMSE = {ratio:.2f}"


@pytest.mark.parametrize("m", [2, 3, 4, 7, 10, 16, 31])
def test_allocation_plan(m):
    strata = m // 2
    full = (1 << (m - 1)) - 1 if m < 40 else None
    for pairs in sorted({strata, strata + 1, 2 * m, 137, 1000, *(() if full is None else (full - 1, full))}):
        if full is not None and pairs > full or pairs < strata:
            continue
        plan = allocate_pairs(m, pairs)
        assert [s.size for s in plan] == list(range(1, strata + 1))
        assert sum(s.count for s in plan) == pairs
        assert all(1 <= s.count <= s.population for s in plan)
        assert math.isclose(sum(s.mass for s in plan), 1.0)
        enumerated = [s for s in plan if s.count == s.population]
        # complete sizes come from the outside in, and only when their proportional share covers
        # them (up to rounding the last pair)
        assert [s.size for s in enumerated] == list(range(1, len(enumerated) + 1)) or pairs == full
        left, mass_left = pairs, 1.0
        for s in enumerated[: len(enumerated) if pairs != full else 0]:
            assert left * s.mass / mass_left > s.population - 1
            left, mass_left = left - s.population, mass_left - s.mass
    if full is not None:
        assert all(s.count == s.population for s in allocate_pairs(m, full))
