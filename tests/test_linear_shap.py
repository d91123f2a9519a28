"""linear_shap: closed-form SHAP values of linear models against shap's LinearExplainer and by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import perspicio
from perspicio.errors import InputError, ModelError, OptionError
from perspicio.trees.linear import correlation_transform, linear_shap, read_linear

shap = pytest.importorskip("shap")
from sklearn.linear_model import LinearRegression, LogisticRegression, Ridge  # noqa: E402


def correlated(n: int = 400, f: int = 4, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(f, f))
    return rng.normal(size=(n, f)) @ a + rng.normal(size=f)


def test_hand_computed_two_features():
    """f(x) = 2 x0 + 3 x1 + 1; background mean (1, 2), covariance [[1, 0.5], [0.5, 1]].

    interventional: phi = w (x - mean) = (2 (3 - 1), 3 (0 - 2)) = (4, -6); base f(mean) = 9.
    correlation-dependent, Gaussian conditional expectations with c = x - mean = (2, -2):
      v({0}) - v({}) = (w0 + s01 w1) c0 = (2 + 1.5) 2 = 7;  v({1}) - v({}) = (w1 + s01 w0) c1 = 4 (-2) = -8
      v({0,1}) - v({}) = w . c = -2
      phi0 = (7 + (-2 - (-8))) / 2 = 6.5;  phi1 = (-8 + (-2 - 7)) / 2 = -8.5
    """
    # a background with covariance [[1, .5], [.5, 1]]: mean + Cholesky-scaled +-1 rows
    chol = np.linalg.cholesky(np.array([[1.0, 0.5], [0.5, 1.0]]))
    z = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], dtype=float) * np.sqrt(3 / 4)
    bg = np.array([1.0, 2.0]) + z @ chol.T
    assert np.allclose(np.cov(bg, rowvar=False), [[1.0, 0.5], [0.5, 1.0]])
    model = torch.nn.Linear(2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, 3.0]]))
        model.bias.fill_(1.0)
    x = np.array([[3.0, 0.0]])
    e = perspicio.explain(model, x, method="linear_shap", background=bg)
    assert e.attributions[0].tolist() == pytest.approx([4.0, -6.0])
    assert float(e.base_value[0]) == pytest.approx(9.0)
    e = perspicio.explain(
        model, x, method="linear_shap", background=bg, feature_perturbation="correlation_dependent"
    )
    assert e.attributions[0].tolist() == pytest.approx([6.5, -8.5], abs=1e-12)
    assert float(e.base_value[0] + e.attributions.sum()) == pytest.approx(7.0)  # f(x) = 6 + 0 + 1


@pytest.mark.parametrize("cls", [LinearRegression, Ridge])
def test_interventional_equals_shap_regression(cls):
    x = correlated()
    y = x @ np.array([1.0, -2.0, 0.5, 3.0]) + 0.1
    m = cls().fit(x, y)
    e = perspicio.explain(m, x[:20], method="linear_shap", background=x[-100:])
    ref = shap.LinearExplainer(m, x[-100:]).shap_values(x[:20])
    assert np.abs(e.attributions.numpy() - ref).max() < 1e-10
    torch.testing.assert_close(
        e.base_value + e.attributions.sum(1), torch.from_numpy(m.predict(x[:20]))
    )


def test_logistic_multiclass_interventional_equals_shap_and_targets():
    x = correlated()
    y = np.digitize(x[:, 0] - x[:, 2], [-1, 1])
    m = LogisticRegression(max_iter=500).fit(x, y)
    ref = np.asarray(shap.LinearExplainer(m, x[-100:]).shap_values(x[:10]))  # (N, F, K)
    for k in range(3):
        e = perspicio.explain(m, x[:10], method="linear_shap", background=x[-100:], target=k)
        assert np.abs(e.attributions.numpy() - ref[:, :, k]).max() < 1e-10
        torch.testing.assert_close(e.scores, torch.from_numpy(m.decision_function(x[:10])[:, k]))
    e = perspicio.explain(m, x[:10], method="linear_shap", background=x[-100:])
    assert e.targets.tolist() == m.predict(x[:10]).tolist()


def test_correlation_dependent_exact_transform_agrees_with_shap_sampling():
    """shap estimates the transform from random permutations; ours is exact for <= 12 features,
    so the two agree within shap's Monte-Carlo error (1e-2 of the largest value at 20000 samples)."""
    x = correlated(f=5, seed=1)
    y = x @ np.array([1.0, -2.0, 0.5, 3.0, 0.0])
    m = LinearRegression().fit(x, y)
    bg = x[-200:]
    ex = shap.LinearExplainer(m, bg, feature_perturbation="correlation_dependent", nsamples=20000)
    ref = ex.shap_values(x[:10])
    e = perspicio.explain(
        m, x[:10], method="linear_shap", background=bg, feature_perturbation="correlation_dependent"
    )
    ours = e.attributions.numpy()
    assert np.abs(ours - ref).max() < 1e-2 * np.abs(ref).max()
    torch.testing.assert_close(
        e.base_value + e.attributions.sum(1), torch.from_numpy(m.predict(x[:10]))
    )


def test_sampled_transform_converges_to_the_exact_one_and_is_efficient():
    x = correlated(f=6, seed=2)
    cov = np.cov(x, rowvar=False)
    w = np.array([1.0, -1.0, 2.0, 0.0, 0.5, -3.0])
    exact, is_exact = correlation_transform(cov, w)
    assert is_exact
    assert np.allclose(exact.sum(0), w)  # every row of x - mean: sum of phi = w . (x - mean)
    import perspicio.trees.linear as L

    old = L.EXACT_MAX_FEATURES
    L.EXACT_MAX_FEATURES = 3  # force sampling
    try:
        est, is_exact = correlation_transform(
            cov, w, nsamples=4000, generator=np.random.default_rng(0)
        )
    finally:
        L.EXACT_MAX_FEATURES = old
    assert not is_exact
    assert np.allclose(est.sum(0), w)  # antithetic permutations telescope: efficiency is exact
    assert np.abs(est - exact).max() < 0.05 * np.abs(exact).max()


def test_linear_bad_input():
    x = correlated()
    m = LinearRegression().fit(x, x[:, 0])
    with pytest.raises(OptionError, match="needs background"):
        perspicio.explain(m, x[:2], method="linear_shap")
    with pytest.raises(InputError, match=r"shape \(N, 4\)"):
        perspicio.explain(m, x[:2, :3], method="linear_shap", background=x)
    bad = x[:3].copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        perspicio.explain(m, bad, method="linear_shap", background=x)
    from sklearn.tree import DecisionTreeRegressor

    with pytest.raises(ModelError, match="coef_ and intercept_"):
        read_linear(DecisionTreeRegressor().fit(x, x[:, 0]))
    with pytest.raises(OptionError, match="feature_perturbation"):
        linear_shap(read_linear(m), x[:2], x, feature_perturbation="tree_path_dependent")
