"""perspicio.surrogates on models and data test_surrogates.py does not cover: a torch MLP on a
scikit-learn data set, XGBoost classifier and regressor, models that return class labels
(functions of integers or strings, a scikit-learn classifier without predict_proba), constant
models, one feature, max_leaf_nodes, NaN input, and the curve figure's legend. Every fidelity is
recomputed by hand with scikit-learn's metrics on the held-out rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from sklearn.metrics import accuracy_score, r2_score  # noqa: E402

from perspicio.errors import InputError, OptionError, TargetError  # noqa: E402
from perspicio.surrogates import distill_linear, distill_tree  # noqa: E402
from perspicio.surrogates.fidelity import r2, r2_fidelity  # noqa: E402


def _rows(n: int, f: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, f))


def _check_held_out(s, model_out) -> None:
    """The surrogate's fidelity is scikit-learn's accuracy / R^2 of the tree against the model on
    exactly the held-out rows (disjoint from the training rows)."""
    d = s._design
    if d.train_rows is not None:
        assert set(d.train_rows).isdisjoint(d.test_rows)
    pred = (
        s.tree.predict(d.z_test)
        if hasattr(s, "tree")
        else s.model.predict((d.z_test - s.mean) / s.scale)
    )
    want = model_out(d.z_test)
    if s.kind == "class":
        assert s.fidelity.value == accuracy_score(want, pred)
        assert s.fidelity.n == len(d.z_test) and s.fidelity.measure == "agreement"
    else:
        assert s.fidelity.value == pytest.approx(r2_score(want, pred), rel=1e-9, abs=1e-12)
        assert s.fidelity.measure == "r2"


# ----------------------------------------------------------------------------- torch MLP


def _mlp() -> nn.Module:
    g = torch.Generator().manual_seed(0)
    m = nn.Sequential(nn.Linear(30, 16), nn.ReLU(), nn.Linear(16, 2)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.6)
    return m.eval()


def test_torch_mlp_on_breast_cancer_tree_and_linear() -> None:
    from sklearn.datasets import load_breast_cancer

    bc = load_breast_cancer()
    x = (bc.data - bc.data.mean(0)) / bc.data.std(0)
    model = _mlp()
    names = list(bc.feature_names)

    def cls(z):
        with torch.no_grad():
            return model(torch.from_numpy(z)).argmax(1).numpy()

    assert 0.2 < cls(x).mean() < 0.8  # both classes present
    for depth in (1, 2, 4):
        s = distill_tree(model, x, max_depth=depth, feature_names=names, labels=bc.target)
        _check_held_out(s, cls)
        assert s.depth <= depth and s.kind == "class"
        assert s.train_fidelity == accuracy_score(
            cls(s._design.z_train), s.tree.predict(s._design.z_train)
        )
        used = {n["feature"] for n in s.nodes() if "feature" in n}
        assert used <= set(names) and used
        assert s.accuracy["model"] == accuracy_score(
            bc.target[s._design.test_rows], cls(s._design.z_test)
        )
    lin = distill_linear(model, x, max_features=4, feature_names=names)
    _check_held_out(lin, cls)
    assert lin.n_features_used <= 4 and {f for f, _ in lin.terms()} <= set(names)
    # a score: the softmax probability of class 1, R^2 by hand
    s = distill_tree(model, x, max_depth=3, target=1, softmax=True)

    def prob(z):
        with torch.no_grad():
            return torch.softmax(model(torch.from_numpy(z)), 1)[:, 1].numpy()

    _check_held_out(s, prob)
    assert s.kind == "score" and s.class_names == ("class 1",)


def test_max_leaf_nodes_and_max_depth_are_respected() -> None:
    x = _rows(600, 5, 0)

    def wavy(a):
        p = (np.sin(2 * a[:, 0]) + a[:, 1] * a[:, 2] > 0).astype(float)
        return np.stack([1 - p, p], 1)

    for leaves in (2, 3, 7):
        s = distill_tree(wavy, x, max_depth=None, max_leaf_nodes=leaves)
        assert s.leaves == leaves and len(s.rules()) == leaves
        assert s.options["max_leaf_nodes"] == leaves
        _check_held_out(s, lambda z: wavy(z).argmax(1))
    assert distill_tree(wavy, x, max_depth=2, max_leaf_nodes=16).leaves <= 4
    with pytest.raises(OptionError, match="max_leaf_nodes must be an integer >= 2"):
        distill_tree(wavy, x, max_leaf_nodes=1)


# ----------------------------------------------------------------------------- XGBoost


def test_xgboost_classifier_and_regressor() -> None:
    xgb = pytest.importorskip("xgboost")
    from sklearn.datasets import load_diabetes, load_iris

    xi, yi = load_iris(return_X_y=True)
    clf = xgb.XGBClassifier(n_estimators=15, max_depth=3, random_state=0).fit(xi, yi)
    s = distill_tree(clf, xi, max_depth=3, labels=yi)
    _check_held_out(s, clf.predict)
    assert s.class_names == ("0", "1", "2") and s.kind == "class"
    xd, yd = load_diabetes(return_X_y=True)
    reg = xgb.XGBRegressor(n_estimators=15, max_depth=3, random_state=0).fit(xd, yd)
    s = distill_tree(reg, xd, max_depth=3, feature_names=load_diabetes().feature_names)
    _check_held_out(s, reg.predict)
    assert s.kind == "score" and 0.3 < s.fidelity.value < 1
    assert s.nodes()[0]["feature"] in load_diabetes().feature_names
    lin = distill_linear(reg, xd, l1=0.01)
    _check_held_out(lin, reg.predict)


# ----------------------------------------------------------------------------- label models


def test_models_that_return_labels_are_distilled_as_classes() -> None:
    """Before the fix an integer-label function was regressed as a score (R^2 of class numbers) and
    string labels failed deep in the black-box wrapper."""
    from sklearn.svm import LinearSVC

    x = _rows(400, 3, 1)

    def signs(a):  # -1 / +1 labels
        return np.where(a[:, 0] + 0.5 * a[:, 1] > 0, 1, -1)

    truth = np.where(x[:, 0] + 0.3 * x[:, 1] > 0, 1, -1)  # true labels in the model's values
    s = distill_tree(signs, x, max_depth=2, labels=truth)
    assert s.kind == "class" and s.class_names == ("-1", "1")
    rows = s._design.test_rows
    assert s.accuracy["model"] == accuracy_score(truth[rows], signs(x[rows]))
    assert s.accuracy["surrogate"] == accuracy_score(truth[rows], s.predict(x[rows]).astype(int))
    _check_held_out(s, lambda z: (signs(z) > 0).astype(int))
    assert set(s.predict(x)) <= {"-1", "1"}

    def words(a):
        return np.where(a[:, 2] > 0.3, "yes", "no")

    s = distill_tree(words, x, max_depth=1, test_data=_rows(100, 3, 2))
    assert s.class_names == ("no", "yes") and s.fidelity.value >= 0.97
    _check_held_out(s, lambda z: (words(z) == "yes").astype(int))
    assert s.rules()[0].text().startswith("if x2 ")
    with pytest.raises(TargetError, match="returns class labels"):
        distill_tree(words, x, target=0)

    y = np.array(["benign", "malignant"])[(x[:, 0] - x[:, 1] > 0).astype(int)]
    svc = LinearSVC().fit(x, y)  # no predict_proba: predict gives the labels
    s = distill_tree(svc, x, max_depth=2, labels=y)
    assert s.class_names == ("benign", "malignant")
    _check_held_out(s, lambda z: (svc.predict(z) == "malignant").astype(int))
    assert s.accuracy["model"] == accuracy_score(
        y[s._design.test_rows], svc.predict(s._design.z_test)
    )
    lin = distill_linear(svc, x)
    _check_held_out(lin, lambda z: (svc.predict(z) == "malignant").astype(int))


# ----------------------------------------------------------------------------- degenerate models


def test_constant_models_and_r2_convention() -> None:
    x = _rows(200, 3, 3)
    s = distill_tree(lambda a: np.tile([0.2, 0.8], (len(a), 1)), x)
    assert s.kind == "class" and s.fidelity.value == 1.0 and s.leaves == 1
    s = distill_tree(lambda a: np.full(len(a), 3.0), x)
    assert s.kind == "score" and s.fidelity.value == 1.0  # was NaN
    assert (s.fidelity.low, s.fidelity.high) == (1.0, 1.0)
    assert s.rules_text() == "always score = 3 (mean |error| 0 on 50 held-out rows)"
    # scikit-learn's convention for a constant reference: 1 if matched exactly, else 0
    ref = np.full(20, 2.0)
    assert r2(ref, ref) == r2_score(ref, ref) == 1.0
    assert r2(ref + 0.1, ref) == r2_score(ref, ref + 0.1) == 0.0
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(40), rng.standard_normal(40)
    assert r2(b, a) == pytest.approx(r2_score(a, b), rel=1e-12)
    f = r2_fidelity(np.r_[ref, 2.5], np.r_[ref, 2.5])  # resamples of only the constant rows
    assert f.value == 1.0 and f.low == 1.0


def test_single_feature() -> None:
    x = _rows(300, 1, 4)
    s = distill_tree(lambda a: (a[:, 0] > 0.3).astype(float), x, max_depth=2, feature_names=["age"])
    assert s.kind == "score" and s.fidelity.value == 1.0
    assert s.nodes()[0]["feature"] == "age" and 0.2 < s.nodes()[0]["threshold"] < 0.4
    lin = distill_linear(lambda a: 2.0 * a[:, 0] - 1.0, x, l1=1e-6, feature_names=["age"])
    assert lin.raw_coefficients[0, 0] == pytest.approx(2.0, abs=1e-4)
    assert lin.equation().startswith("score = -1 + 2 * age")
    with pytest.raises(InputError, match=r"shape \(rows, features\); got shape \(300,\)"):
        distill_tree(lambda a: a[:, 0], x[:, 0])


def test_nan_input_names_rows() -> None:
    pd = pytest.importorskip("pandas")
    x = _rows(100, 4, 5)
    bad = x.copy()
    bad[[7, 42], 1] = np.nan
    bad[42, 3] = np.inf

    def f(a):
        return a[:, 0]

    with pytest.raises(InputError, match=r"data contains 3 NaN/Inf value\(s\) \(rows 7, 42\)"):
        distill_tree(f, bad)
    with pytest.raises(InputError, match=r"test_data contains 3 NaN/Inf value\(s\) \(rows 7, 42\)"):
        distill_linear(f, x, test_data=bad)
    with pytest.raises(InputError, match=r"rows 7, 42"):
        distill_tree(f, pd.DataFrame(bad, columns=list("abcd")))
    with pytest.raises(InputError, match=r"rows 7, 42"):
        distill_tree(_mlp_4(), torch.from_numpy(bad))


def _mlp_4() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3)).double().eval()


# ----------------------------------------------------------------------------- figures


def test_curve_figure_legend_does_not_cover_the_axes() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def step(a):
        p = (a[:, 0] > 0).astype(float)
        return np.stack([1 - p, p], 1)

    s = distill_tree(step, _rows(300, 3, 6), labels=(_rows(300, 3, 6)[:, 0] > 0).astype(int))
    fig = s.curve([1, 2, 3]).figure()
    try:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        (ax,) = fig.axes
        legend = fig.legends[0].get_window_extent(renderer)
        assert not legend.overlaps(ax.get_window_extent(renderer))
        box = fig.get_tightbbox(renderer)
        w, h = fig.get_size_inches()
        assert box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= w + 0.01 and box.y1 <= h + 0.01
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert texts == [
            "95% interval",
            "fidelity (agreement with the model, held-out)",
            "tree accuracy on the true labels",
        ]
    finally:
        plt.close(fig)
