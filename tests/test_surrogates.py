"""Surrogates (issue 18): decision-tree and sparse linear distillation with held-out fidelity.

Closed form: a model that is itself a depth-3 tree is recovered exactly (fidelity 1.0, the same
function on the whole grid); a sparse linear model is recovered by the linear surrogate. Fidelity
is measured on held-out rows only (a memorising tree gets chance-level credit). Oracles: scipy's
Wilson interval, scikit-learn's R^2. Lifecycle, reproducibility and bad input as everywhere.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("sklearn")

from perspicio.errors import InputError, ModelError, OptionError, TargetError  # noqa: E402
from perspicio.surrogates import (  # noqa: E402
    SegmentPresence,
    distill_linear,
    distill_tree,
    fidelity_curve,
    wilson,
)
from perspicio.surrogates.fidelity import r2_fidelity  # noqa: E402


def _grid(n: int, seed: int, f: int = 5) -> np.ndarray:
    """Integer-valued rows: any threshold between two integers is the same split."""
    return np.random.default_rng(seed).integers(0, 10, size=(n, f)).astype(np.float64)


class TreeNet(nn.Module):
    """A hand-set depth-3 tree as a torch model: x0 <= 4.5, then x1 / x2 <= 4.5, then x3 / x4 <= 4.5
    on each branch; one-hot logits of the leaf's class (one class per leaf)."""

    LEAVES = (3, 0, 6, 1, 7, 2, 5, 4)  # class of each leaf, left to right

    def __init__(self) -> None:
        super().__init__()
        self.thresholds = nn.Parameter(
            torch.full((7,), 4.5)
        )  # balanced leaves: greedy CART finds the splits
        self.register_buffer("leaf_class", torch.tensor(self.LEAVES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.thresholds
        right0 = x[:, 0] > t[0]
        right1 = torch.where(right0, x[:, 2] > t[2], x[:, 1] > t[1])
        # third level: left-left on x3, left-right on x4, right-left on x3, right-right on x4
        feat = torch.where(right1, x[:, 4], x[:, 3])
        thr = torch.stack([t[3], t[4], t[5], t[6]])[right0.long() * 2 + right1.long()]
        right2 = feat > thr
        leaf = right0.long() * 4 + right1.long() * 2 + right2.long()
        return nn.functional.one_hot(self.leaf_class[leaf], 8).to(x.dtype) * 3.0 + 0.0 * t.sum()


# ----------------------------------------------------------------------------- closed form


def test_depth3_torch_tree_is_recovered_exactly() -> None:
    model = TreeNet().double()
    s = distill_tree(model, _grid(1600, 0), max_depth=3, seed=0)
    assert s.fidelity.value == 1.0
    assert s.fidelity.n == 400 and s.fidelity.interval == "wilson"
    assert s.depth == 3 and s.leaves == 8
    # the same function everywhere on the domain, not just on the held-out rows
    probe = _grid(5000, 99)
    with torch.no_grad():
        want = model(torch.from_numpy(probe)).argmax(1).numpy()
    got = s.tree.predict(probe)
    assert np.array_equal(got, want)
    # the root question is the model's
    root = s.nodes()[0]
    assert root["feature"] == "x0" and 4 < root["threshold"] < 5


def test_depth3_sklearn_tree_is_recovered_exactly() -> None:
    from sklearn.tree import DecisionTreeClassifier

    x = _grid(1200, 1)
    rng = np.random.default_rng(2)
    y = ((x[:, 0] > 4) * 2 + (x[:, 1] > 6) + (x[:, 2] > 2) * (x[:, 0] <= 4)) % 3
    teacher = DecisionTreeClassifier(max_depth=3, random_state=0).fit(
        x, (y + (rng.random(len(y)) < 0.1)) % 3
    )
    assert teacher.get_depth() == 3
    s = distill_tree(teacher, _grid(800, 3), max_depth=3)
    assert s.fidelity.value == 1.0
    probe = _grid(5000, 4)
    assert np.array_equal(s.predict(probe), teacher.predict(probe).astype(str))
    assert s.class_names == ("0", "1", "2")  # the estimator's classes_


def test_dataframe_and_sklearn_model_fitted_on_it() -> None:
    pd = pytest.importorskip("pandas")
    from sklearn.ensemble import RandomForestClassifier

    rng = np.random.default_rng(0)
    x = pd.DataFrame(rng.standard_normal((400, 3)), columns=["age", "income", "debt"])
    y = (x.income - x.debt > 0).astype(int)
    forest = RandomForestClassifier(n_estimators=10, random_state=0).fit(x, y)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter(
            "error"
        )  # no 'X does not have valid feature names', no read-only tensor
        s = distill_tree(forest, x, max_depth=2, labels=y)
    assert s.feature_names == ("age", "income", "debt")
    assert {c.feature for r in s.rules() for c in r.conditions} <= {"income", "debt"}
    assert s.accuracy["model"] > 0.9 and s.fidelity.n == 100


def test_fidelity_is_measured_on_held_out_rows_only() -> None:
    """A model with no structure (a random class per row): an unbounded tree memorises the training
    rows (training agreement 1.0) but gets chance-level credit on the held-out rows."""
    table = np.random.default_rng(5).integers(0, 2, size=10**5)

    def random_labels(a: np.ndarray) -> np.ndarray:
        key = (a[:, 0] * 1000 + a[:, 1] * 10 + a[:, 2]).astype(
            np.int64
        )  # distinct rows -> distinct keys
        p = table[key % len(table)].astype(np.float64)
        return np.stack([1 - p, p], 1)

    rng = np.random.default_rng(6)
    x = np.stack(
        [rng.permutation(4000)[:800] / 1.0, rng.integers(0, 100, 800), rng.integers(0, 10, 800)], 1
    )
    s = distill_tree(random_labels, x, max_depth=None, holdout=0.5)
    assert s.train_fidelity == 1.0
    assert s.fidelity.value < 0.62 and s.fidelity.low < 0.5 < s.fidelity.high + 0.05
    d = s._design
    assert set(d.train_rows).isdisjoint(d.test_rows) and len(d.train_rows) + len(d.test_rows) == 800
    assert np.array_equal(d.z_test, x[d.test_rows]) and np.array_equal(d.z_train, x[d.train_rows])


def test_neighbours_are_fit_only_and_come_from_training_rows() -> None:
    model = TreeNet().double()
    x = _grid(400, 7)
    s = distill_tree(model, x, max_depth=3, neighbours=3, neighbour_scale=0.05, seed=1)
    d = s._design
    assert d.n_neighbours == 3 * d.n_train and len(d.z_test) == 100
    extra = d.z_train[d.n_train :]
    base = np.repeat(d.z_train[: d.n_train], 3, axis=0)
    assert (
        np.abs(extra - base).max() < 0.05 * x.std(0).max() * 6
    )  # Gaussian around its own training row
    assert np.array_equal(d.z_test, x[d.test_rows])  # held-out rows are real rows, never generated
    assert s.fidelity.n == 100


# ----------------------------------------------------------------------------- intervals


def test_wilson_interval_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for k, n in ((0, 10), (8, 10), (10, 10), (97, 114), (1, 1)):
        ref = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
        lo, hi = wilson(k, n)
        assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)
    lo, hi = wilson(8, 10)  # by hand: centre 0.7167, half-width 0.2266 (z = 1.96)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)


def test_r2_fidelity_matches_sklearn_and_bootstrap_interval() -> None:
    from sklearn.metrics import r2_score

    rng = np.random.default_rng(0)
    ref = rng.standard_normal(300)
    pred = ref + 0.5 * rng.standard_normal(300)
    f = r2_fidelity(pred, ref, seed=3)
    assert f.value == pytest.approx(r2_score(ref, pred), abs=1e-12)
    assert f.low < f.value < f.high and f.interval == "bootstrap"
    assert r2_fidelity(pred, ref, seed=3) == f  # seeded
    assert r2_fidelity(pred, ref, seed=4).low != f.low


# ----------------------------------------------------------------------------- rules


def test_every_rule_reports_its_own_coverage_and_fidelity() -> None:
    from sklearn.tree import DecisionTreeClassifier

    x = _grid(1000, 8)
    y = (x[:, 0] + x[:, 1] * 0.7 - x[:, 2] * 0.3 > 6).astype(
        int
    )  # not a depth-2 tree: rules are imperfect
    teacher = DecisionTreeClassifier(max_depth=6, random_state=0).fit(x, y)
    s = distill_tree(
        teacher, x, max_depth=2, feature_names=["a", "b", "c", "d", "e"], class_names=["no", "yes"]
    )
    rules = s.rules()
    d = s._design
    assert sum(r.coverage for r in rules) == len(d.z_test)
    model_class = d.out_test.argmax(1)
    for r in rules:
        rows = np.ones(len(d.z_test), dtype=bool)
        for c in r.conditions:
            rows &= c.holds(d.z_test[:, s.feature_names.index(c.feature)])
        assert rows.sum() == r.coverage
        if r.coverage:
            want = np.mean(model_class[rows] == s.class_names.index(r.prediction))
            assert r.fidelity.value == pytest.approx(want)
            assert f"fidelity {r.fidelity.value:.2f} on {r.coverage} held-out rows" in r.text()
        assert r.text().startswith("if ") and r.prediction in ("no", "yes")
    assert s.fidelity.value < 1.0
    assert any(r.fidelity is not None and r.fidelity.value < 1.0 for r in rules)


def test_rule_conditions_merge_repeated_features() -> None:
    def band(a: np.ndarray) -> np.ndarray:  # class 1 for 3 < x0 <= 6 only
        p = ((a[:, 0] > 3) & (a[:, 0] <= 6)).astype(np.float64)
        return np.stack([1 - p, p], 1)

    s = distill_tree(band, _grid(600, 9, f=2), max_depth=2, feature_names=["width", "height"])
    texts = [r.text() for r in s.rules()]
    assert any(t.startswith("if 3.5 < width <= 6.5 then class 1") for t in texts), texts
    assert s.fidelity.value == 1.0


def test_score_regression_reports_r2_and_rule_errors() -> None:
    def score(a: np.ndarray) -> np.ndarray:
        return np.where(a[:, 0] > 4.5, 10.0, 0.0) + np.where(a[:, 1] > 2.5, 1.0, -1.0)

    s = distill_tree(score, _grid(800, 10), max_depth=2, seed=2)
    assert (
        s.kind == "score" and s.fidelity.measure == "r2" and s.fidelity.value == pytest.approx(1.0)
    )
    for r in s.rules():
        assert r.error == pytest.approx(0.0) and "mean |error| 0 on" in r.text()
    # a chosen score of a classifier
    s2 = distill_tree(TreeNet().double(), _grid(800, 11), max_depth=3, target=2)
    assert (
        s2.kind == "score"
        and s2.class_names == ("class 2",)
        and s2.fidelity.value == pytest.approx(1.0)
    )


# ----------------------------------------------------------------------------- curve, output


def test_fidelity_curve_and_smallest_tree() -> None:
    curve = fidelity_curve(TreeNet().double(), _grid(1600, 12), depths=[1, 2, 3, 4], labels=None)
    depths = [p.depth for p in curve.points]
    assert depths == [1, 2, 3, 4]
    fids = [p.fidelity.value for p in curve.points]
    assert fids[2] == 1.0 and fids[0] < fids[1] < 1.0
    assert curve.smallest(0.999) == 3 and curve.smallest(1.01) is None
    assert "depth" in str(curve)
    with pytest.raises(OptionError):
        curve.smallest(0.9, by="median")


def test_json_export_round_trip(tmp_path: Path) -> None:
    x = _grid(300, 13)
    labels = TreeNet().double()(torch.from_numpy(x)).argmax(1).numpy()
    s = distill_tree(TreeNet().double(), x, max_depth=2, labels=labels)
    text = s.to_json(tmp_path / "t.json")
    data = json.loads((tmp_path / "t.json").read_text())
    assert text == (tmp_path / "t.json").read_text()
    assert (
        data["fidelity"]["value"] == s.fidelity.value and data["fidelity"]["interval"] == "wilson"
    )
    assert len(data["rules"]) == s.leaves and len(data["nodes"]) == s.tree.tree_.node_count
    assert data["accuracy"]["model"] == 1.0  # labels are the model's own classes
    assert data["accuracy"]["surrogate"] == pytest.approx(s.fidelity.value)
    assert data["rows"] == {"train": 225, "neighbours": 0, "held_out": 75}


def _text_boxes(fig) -> list:
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    boxes = []
    for t in fig.axes[0].texts:
        if not t.get_text():
            continue
        patch = t.get_bbox_patch()
        boxes.append((patch or t).get_window_extent(renderer))
    return boxes


@pytest.mark.parametrize("depth", [2, 5, pytest.param(8, marks=pytest.mark.slow)])
def test_tree_figure_has_no_clipped_or_overlapping_text(depth: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def wavy(a: np.ndarray) -> np.ndarray:
        p = (np.sin(a[:, 0] * 1.3) + np.cos(a[:, 1] * 0.7) * a[:, 2] / 5 > 0.2).astype(np.float64)
        return np.stack([1 - p, p], 1)

    names = [
        "worst concave points",
        "mean fractal dimension",
        "area error",
        "texture",
        "smoothness",
    ]
    s = distill_tree(
        wavy,
        np.random.default_rng(14).uniform(0, 10, (1500, 5)),
        max_depth=depth,
        feature_names=names,
        class_names=["benign", "malignant"],
    )
    fig = s.figure()
    try:
        boxes = _text_boxes(fig)
        w, h = fig.bbox.width, fig.bbox.height
        for b in boxes:
            assert b.x0 >= 0 and b.y0 >= 0 and b.x1 <= w and b.y1 <= h, "text outside the figure"
        overlaps = [
            (i, j)
            for i in range(len(boxes))
            for j in range(i + 1, len(boxes))
            if boxes[i].overlaps(boxes[j])
        ]
        assert overlaps == []
    finally:
        plt.close(fig)


def test_linear_figure_and_curve_figure_fit() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = distill_linear(
        _linear_model,
        _normal(600, 15),
        max_features=3,
        feature_names=[f"a rather long feature name {i}" for i in range(6)],
    )
    fig = s.figure()
    try:
        fig.canvas.draw()
        box = fig.get_tightbbox(fig.canvas.get_renderer())  # inches
        w, h = fig.get_size_inches()
        assert box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= w + 0.01 and box.y1 <= h + 0.01
        curve = distill_tree(_linear_model, _normal(600, 15)).curve([1, 2, 3])
        fig2 = curve.figure()
        fig2.canvas.draw()
        box = fig2.get_tightbbox(fig2.canvas.get_renderer())
        w, h = fig2.get_size_inches()
        assert box.x0 >= -0.01 and box.y0 >= -0.01 and box.x1 <= w + 0.01 and box.y1 <= h + 0.01
        plt.close(fig2)
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- linear


def _normal(n: int, seed: int, f: int = 6) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, f))


def _linear_model(a: np.ndarray) -> np.ndarray:
    logit = 3.0 * a[:, 1] - 2.0 * a[:, 4]
    p = 1 / (1 + np.exp(-logit))
    return np.stack([1 - p, p], 1)


def test_linear_surrogate_recovers_a_sparse_logistic_model() -> None:
    s = distill_linear(_linear_model, _normal(1200, 16), l1=0.002)
    used = [f for f, _ in s.terms()]
    assert used[:2] == ["x1", "x4"]
    assert s.fidelity.value >= 0.97 and s.fidelity.interval == "wilson"
    coef = dict(s.terms())
    assert coef["x1"][0] > 0 > coef["x4"][0]
    s3 = distill_linear(_linear_model, _normal(1200, 16), max_features=2)
    assert s3.n_features_used <= 2 and {f for f, _ in s3.terms()} <= {"x1", "x4"}


def test_linear_surrogate_of_a_score_recovers_coefficients() -> None:
    def score(a: np.ndarray) -> np.ndarray:
        return 2.0 + 1.5 * a[:, 0] - 0.5 * a[:, 3]

    s = distill_linear(score, _normal(800, 17) * 3 + 1, l1=1e-4)
    assert s.kind == "score" and s.fidelity.measure == "r2" and s.fidelity.value > 0.9999
    raw = s.raw_coefficients[0]
    assert raw[0] == pytest.approx(1.5, abs=1e-3) and raw[3] == pytest.approx(-0.5, abs=1e-3)
    assert s.raw_intercept[0] == pytest.approx(2.0, abs=1e-2)
    assert "score = 2" in s.equation()
    json.loads(s.to_json())


def test_linear_multiclass_and_single_class_error() -> None:
    s = distill_linear(TreeNet().double(), _grid(800, 18), l1=0.001)
    assert len(s.series) == 8 and s.coefficients.shape == (8, 5)

    def constant(a: np.ndarray) -> np.ndarray:
        return np.tile([0.9, 0.1], (len(a), 1))

    with pytest.raises(ModelError, match="one class"):
        distill_linear(constant, _grid(100, 19))


# ----------------------------------------------------------------------------- images


class QuadrantNet(nn.Module):
    """Class 1 when the top-left quadrant of an (N, 3, 8, 8) image is bright."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, :4, :4].mean((1, 2, 3)) * self.w - 0.5
        return torch.stack([-s, s], 1)


def test_segment_presence_finds_the_segment_the_model_reads() -> None:
    images = torch.ones(2, 3, 8, 8)
    s = distill_tree(
        QuadrantNet(),
        images,
        features=SegmentPresence("grid:2", samples=64, baseline="zero"),
        max_depth=2,
    )
    assert s.fidelity.value == 1.0
    assert s.feature_names == ("cell r0 c0", "cell r0 c1", "cell r1 c0", "cell r1 c1")
    by_class = {r.prediction: r for r in s.rules()}
    kept = by_class["class 1"]
    assert (
        kept.text()
        == f"if cell r0 c0 kept then class 1 (fidelity 1.00 on {kept.coverage} held-out rows)"
    )
    assert by_class["class 0"].text().startswith("if cell r0 c0 removed then class 0")
    assert s.nodes()[0]["question"] == "cell r0 c0 kept?"
    fig = s.segments_figure()
    labels = {t.get_text(): t.get_fontweight() for t in fig.axes[0].texts}
    assert labels == {"r0 c0": "bold", "r0 c1": "normal", "r1 c0": "normal", "r1 c1": "normal"}
    import matplotlib.pyplot as plt

    plt.close(fig)
    with pytest.raises(OptionError, match="SegmentPresence"):
        distill_tree(TreeNet().double(), _grid(100, 0)).segments_figure()


def test_feature_function_on_images() -> None:
    rng = torch.Generator().manual_seed(0)
    images = torch.rand(200, 3, 8, 8, generator=rng)

    def channel_means(x: torch.Tensor) -> np.ndarray:
        return x.mean((2, 3)).numpy()

    channel_means.feature_names = ["red", "green", "blue"]

    class RedNet(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x[:, 0].mean((1, 2)) - 0.5
            return torch.stack([-s, s], 1)

    s = distill_tree(RedNet(), images, features=channel_means, max_depth=1)
    assert s.fidelity.value == 1.0 and s.nodes()[0]["feature"] == "red"


def test_superpixels_are_refused_across_images() -> None:
    pytest.importorskip("skimage")
    with pytest.raises(OptionError, match="one image"):
        distill_tree(QuadrantNet(), torch.rand(2, 3, 8, 8), features="slic:4")


# ----------------------------------------------------------------------------- reproducibility, lifecycle


def test_seeded_runs_are_bit_reproducible() -> None:
    x = _normal(500, 20)
    a = distill_tree(_linear_model, x, max_depth=4, neighbours=2, seed=7)
    b = distill_tree(_linear_model, x, max_depth=4, neighbours=2, seed=7)
    c = distill_tree(_linear_model, x, max_depth=4, neighbours=2, seed=8)
    assert a.to_json() == b.to_json()
    assert np.array_equal(a._design.z_train, b._design.z_train)
    assert a.to_json() != c.to_json()
    la = distill_linear(_linear_model, x, seed=7).to_json()
    assert la == distill_linear(_linear_model, x, seed=7).to_json()


def test_no_side_effects_on_a_torch_model(assert_no_hooks) -> None:
    model = TreeNet().double().train()
    model.thresholds.grad = torch.full_like(model.thresholds, 0.25)
    before = copy.deepcopy(model.state_dict())
    x = torch.from_numpy(_grid(200, 21))
    x_copy = x.clone()
    distill_tree(model, x, max_depth=3)
    distill_linear(model, x)
    assert model.training and model.thresholds.requires_grad
    assert torch.equal(model.thresholds.grad, torch.full_like(model.thresholds, 0.25))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(x, x_copy)
    assert_no_hooks(model)


def test_model_state_restored_when_the_model_raises(assert_no_hooks) -> None:
    class Flaky(TreeNet):
        calls = 0

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("boom")
            return super().forward(x)

    model = Flaky().double().train()
    with pytest.raises(RuntimeError, match="boom"):
        distill_tree(model, _grid(200, 24), batch_size=16)
    assert model.training and model.thresholds.requires_grad and model.thresholds.grad is None
    assert_no_hooks(model)


# ----------------------------------------------------------------------------- bad input


def test_bad_input_gives_clear_errors() -> None:
    model = TreeNet().double()
    x = _grid(100, 22)
    with pytest.raises(InputError, match="at least 10 training and 10 held-out"):
        distill_tree(model, x[:15])
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(InputError, match=r"1 NaN/Inf value\(s\) \(rows 3\)"):
        distill_tree(model, bad)
    with pytest.raises(InputError, match="feature_names has 3 names; the data has 5"):
        distill_tree(model, x, feature_names=["a", "b", "c"])
    with pytest.raises(InputError, match="unique"):
        distill_tree(model, x, feature_names=["a", "a", "b", "c", "d"])
    for depth in (0, -2, 2.5, True):
        with pytest.raises(OptionError, match="max_depth must be an integer >= 1"):
            distill_tree(model, x, max_depth=depth)
    with pytest.raises(InputError, match="one label per row"):
        distill_tree(model, x, labels=np.zeros(7))
    with pytest.raises(InputError, match="test_data 4"):
        distill_tree(model, x, test_data=x[:20, :4])
    with pytest.raises(TargetError):
        distill_tree(model, x, target="zebra")
    with pytest.raises(TargetError, match="out of range"):
        distill_tree(model, x, target=9)
    with pytest.raises(InputError, match=r"shape \(rows, features\)"):
        distill_tree(model, x[:, 0])
    with pytest.raises(InputError, match="data is required"):
        distill_tree(model)
    with pytest.raises(OptionError, match="holdout"):
        distill_tree(model, x, holdout=1.5)
    with pytest.raises(OptionError, match="neighbours"):
        distill_tree(model, x, neighbours=-1)
    with pytest.raises(OptionError, match="l1"):
        distill_linear(model, x, l1=0)
    with pytest.raises(InputError, match="labels"):
        distill_tree(model, x, labels=np.full(100, 11))

    with pytest.raises(OptionError, match="unknown option 'max_dept'.*Did you mean: max_depth"):
        distill_tree(model, x, max_dept=3)
    with pytest.raises(
        OptionError, match="unknown option 'max_feature'.*Did you mean: max_features"
    ):
        distill_linear(model, x, max_feature=3)
    with pytest.raises(OptionError, match="unknown option 'neighbors'.*neighbours"):
        distill_tree(model, x, neighbors=2)

    def nan_model(a: np.ndarray) -> np.ndarray:
        return np.full((len(a), 2), np.nan)

    with pytest.raises(ModelError, match="NaN"):
        distill_tree(nan_model, x)


# ----------------------------------------------------------------------------- bundled model, CLI


@pytest.fixture(scope="module")
def breast_cancer():
    from perspicio.zoo.tabular import load_tabular

    return load_tabular("breast_cancer", "mlp", cache=False)


@pytest.mark.slow
def test_bundled_breast_cancer_mlp_distils_faithfully(breast_cancer) -> None:
    """The numbers reported in docs/surrogates.md (114 held-out test rows, seed 0)."""
    s4 = distill_tree(breast_cancer, max_depth=4)
    s5 = distill_tree(breast_cancer, max_depth=5)
    assert s4.fidelity.n == s5.fidelity.n == 114
    assert s4.fidelity.value >= 0.93 and s5.fidelity.value >= 0.93
    assert s5.accuracy is not None and s5.accuracy["model"] > 0.9
    assert s4.class_names == ("malignant", "benign") and "worst" in s4.rules_text()
    lin = distill_linear(breast_cancer, max_features=5)
    assert lin.fidelity.value >= 0.93 and lin.n_features_used <= 5


@pytest.mark.slow
def test_cli_surrogate_tree_and_linear(tmp_path: Path, monkeypatch) -> None:
    from perspicio.cli import main

    monkeypatch.setenv("PERSPICIO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["surrogate", "tree", "--max-depth", "3", "--depths", "1-4", "-o", str(out)]) == 0
    for name in ("tree.png", "rules.txt", "fidelity_curve.png", "tree.json"):
        assert (out / name).is_file()
    data = json.loads((out / "tree.json").read_text())
    assert data["max_depth"] == 3 and [p["depth"] for p in data["curve"]["points"]] == [1, 2, 3, 4]
    assert (out / "rules.txt").read_text().startswith("if ")
    assert main(["surrogate", "linear", "--max-features", "4", "-o", str(out)]) == 0
    assert json.loads((out / "linear.json").read_text())["fidelity"]["n"] == 114
    # a csv with a header and a label column
    x = _grid(120, 23)
    y = TreeNet().double()(torch.from_numpy(x)).argmax(1).numpy()
    csv = tmp_path / "rows.csv"
    csv.write_text(
        "a,b,c,d,e,label\n" + "\n".join(",".join(map(str, [*r, c])) for r, c in zip(x, y))
    )
    monkeypatch.setattr(
        "perspicio.cli.surrogate._load", lambda spec, device, seed: (TreeNet().double(), False)
    )
    assert (
        main(
            [
                "surrogate",
                "tree",
                "-m",
                "mine",
                "--data",
                str(csv),
                "--label-column",
                "label",
                "--depths",
                "none",
                "-o",
                str(out / "csv"),
            ]
        )
        == 0
    )
    data = json.loads((out / "csv" / "tree.json").read_text())
    assert data["feature_names"] == ["a", "b", "c", "d", "e"] and data["accuracy"]["model"] == 1.0


def test_cli_errors_are_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    from perspicio.cli import main

    monkeypatch.setenv("PERSPICIO_CACHE", str(tmp_path / "cache"))

    out = str(tmp_path / "o")
    assert main(["surrogate", "tree", "--max-depth", "0", "--depths", "none", "-o", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: max_depth must be an integer >= 1") and "\n" not in err
    assert main(["surrogate", "tree", "--depths", "x", "-o", out]) == 2
    assert "--depths" in capsys.readouterr().err
    assert main(["surrogate", "linear", "-m", "torchvision:resnet18", "-o", out]) == 2
    assert "--data is required" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n3,x\n")
    assert main(["surrogate", "tree", "--data", str(bad), "-o", out]) == 2
    assert "numeric" in capsys.readouterr().err


# ----------------------------------------------------------------------------- layering


def test_surrogates_import_only_core_and_errors() -> None:
    import perspicio

    src = Path(perspicio.__file__).parent / "surrogates"
    allowed = ("perspicio.core", "perspicio.errors", "perspicio.surrogates")
    for path in src.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                module = "perspicio.surrogates" if node.level == 1 else "perspicio"
                module = f"{module}.{node.module}" if node.module else module
                assert module.startswith(allowed), (path.name, module)
            elif isinstance(node, ast.Import):
                assert not any(
                    a.name.startswith("perspicio") and not a.name.startswith(allowed)
                    for a in node.names
                ), path.name
