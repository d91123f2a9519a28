"""SHAP plots (perspicio.viz.shap_plots): every plot draws what its definition says (counted
elements, positions that add up), picks the right interacting feature, keeps every label inside
the figure, and the HTML force plots are self-contained. Explanations are built by hand (no
model, no numba), so the file runs in seconds."""

from __future__ import annotations

import re

import matplotlib
import numpy as np
import pytest
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.collections import PathCollection, PolyCollection  # noqa: E402
from matplotlib.patches import Polygon  # noqa: E402

from perspicio.core.explanation import Explanation  # noqa: E402
from perspicio.errors import OptionError  # noqa: E402
from perspicio.viz import shap_plots as sp  # noqa: E402

LONG = "a rather long feature name that would be clipped if nobody wrapped it (units)"


def make_exp(
    n: int = 60, f: int = 8, seed: int = 0, interactions: bool = False, nan: bool = False
) -> Explanation:
    """A hand-made explanation: phi_0 = x_0 * x_2 (feature 0 interacts with feature 2), others linear."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f))
    phi = x * np.linspace(1.0, 0.2, f)
    phi[:, 0] = x[:, 0] * x[:, 2]
    if nan:
        x[::7, 1] = np.nan
    base = np.full(n, 0.5)
    names = tuple([LONG] + [f"feature {j}" for j in range(1, f)])
    extras = {
        "values": tuple(torch.from_numpy(p) for p in phi),
        "feature_names": tuple(names for _ in range(n)),
        "feature_values": tuple(torch.from_numpy(r) for r in x),
    }
    if interactions:
        inter = np.zeros((n, f, f))
        inter[:, 0, 2] = inter[:, 2, 0] = phi[:, 0] / 2
        inter[:, range(f), range(f)] = phi - inter.sum(2)
        extras["interactions"] = torch.from_numpy(inter)
    return Explanation(
        attributions=torch.from_numpy(phi),
        method="tree_shap",
        scores=torch.from_numpy(base + phi.sum(1)),
        base_value=torch.from_numpy(base),
        targets=torch.zeros(n, dtype=torch.long),
        target_names=tuple("yes" for _ in range(n)),
        extras=extras,
    )


def assert_inside(fig) -> None:
    """Nothing drawn sticks out of the figure: its tight bounding box (every drawn artist, tick
    labels only where ticks are drawn) lies inside it, and so does every free text (1 px tolerance)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    w, h = fig.get_size_inches()
    tight = fig.get_tightbbox(r)
    tol = 1.0 / fig.dpi
    assert tight.x0 >= -tol and tight.y0 >= -tol and tight.x1 <= w + tol and tight.y1 <= h + tol, (
        tight,
        w,
        h,
    )
    ticks = {id(t) for ax in fig.axes for t in ax.get_xticklabels() + ax.get_yticklabels()}
    texts = [
        t
        for t in fig.findobj(matplotlib.text.Text)
        if t.get_visible() and t.get_text().strip() and id(t) not in ticks
    ]
    assert texts
    box = fig.bbox
    for t in texts:
        bb = t.get_window_extent(r)
        assert (
            bb.x0 >= box.x0 - 1
            and bb.x1 <= box.x1 + 1
            and bb.y0 >= box.y0 - 1
            and bb.y1 <= box.y1 + 1
        ), (t.get_text(), bb, box)


def points(ax) -> int:
    return sum(len(c.get_offsets()) for c in ax.collections if isinstance(c, PathCollection))


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def test_beeswarm_one_dot_per_row_and_feature_in_importance_order():
    e = make_exp()
    fig = sp.beeswarm(e, max_display=5)
    ax = fig.axes[0]
    assert points(ax) == 60 * 5
    labels = [t.get_text() for t in ax.get_yticklabels()]
    imp = np.abs(e.attributions.numpy()).mean(0)
    want = [
        sp._label(n) for n in np.array(e.extras["feature_names"][0])[np.argsort(-imp)[:5]][::-1]
    ]
    assert labels == want
    for c in ax.collections:  # the swarm keeps each feature inside its own row
        y = c.get_offsets()[:, 1]
        assert np.ptp(y) <= 0.81
    assert sp.summary is sp.beeswarm
    assert_inside(fig)


def test_swarm_offsets_spread_ties_symmetrically():
    off = sp._swarm_offsets(np.zeros(9), width=0.4)
    assert sorted(np.round(off / off.max() * 4).tolist()) == [-4, -3, -2, -1, 0, 1, 2, 3, 4]
    assert np.abs(off).max() <= 0.4 + 1e-12


def test_bar_one_bar_per_feature_with_mean_abs_values():
    e = make_exp()
    fig = sp.bar(e, max_display=6)
    bars = [p for p in fig.axes[0].patches]
    assert len(bars) == 6
    imp = np.sort(np.abs(e.attributions.numpy()).mean(0))[::-1][:6][::-1]
    np.testing.assert_allclose([b.get_width() for b in bars], imp)
    assert_inside(fig)


@pytest.mark.parametrize("with_interactions", [True, False])
def test_scatter_colours_by_the_interacting_feature(with_interactions):
    e = make_exp(interactions=with_interactions)
    score, how = sp.interaction_strength(e, 0)
    assert how == ("interaction values" if with_interactions else "approximation")
    assert int(np.argmax(score)) == 2 and score[0] == 0
    fig = sp.dependence(e, LONG)
    ax = fig.axes[0]
    assert points(ax) == 60
    off = np.concatenate([c.get_offsets() for c in ax.collections])
    x = np.array([r.numpy() for r in e.extras["feature_values"]])[:, 0]
    np.testing.assert_allclose(np.sort(off[:, 0]), np.sort(x))
    label = fig.axes[1].get_ylabel()
    assert "feature 2" in label and how in label
    assert_inside(fig)


def test_scatter_missing_values_and_fixed_colour():
    e = make_exp(nan=True)
    fig = sp.scatter(e, "feature 1", color=None)
    ax = fig.axes[0]
    assert points(ax) == 60
    assert any("missing (9)" in t.get_text() for t in ax.get_legend().get_texts())
    assert len(fig.axes) == 1  # no colour bar
    with pytest.raises(OptionError, match="unknown feature"):
        sp.scatter(e, "feature 99")
    assert_inside(fig)


def test_force_segments_add_up_from_the_base_value_to_the_output():
    e = make_exp()
    v = e.attributions[4].numpy()
    fig = sp.force(e, 4)
    ax = fig.axes[0]
    polys = [p for p in ax.patches if isinstance(p, Polygon)]
    assert len(polys) == int((v != 0).sum())
    xs = np.array([p.get_xy()[:, 0] for p in polys])
    fx = float(e.scores[4])
    assert xs.min() == pytest.approx(fx - v[v > 0].sum()) and xs.max() == pytest.approx(
        fx - v[v < 0].sum()
    )
    texts = [t.get_text() for t in ax.texts]
    assert any(t.startswith("f(x) = ") for t in texts) and any(
        t.startswith("base value = ") for t in texts
    )
    labels = [
        t
        for t in ax.texts
        if " = " in t.get_text() and not t.get_text().startswith(("f(x)", "base"))
    ]
    assert labels
    # labels on the same line never overlap
    r = fig.canvas.get_renderer()
    boxes = [(t.get_position()[1], t.get_window_extent(r)) for t in labels]
    for i, (yi, bi) in enumerate(boxes):
        for yj, bj in boxes[i + 1 :]:
            if yi == yj:
                assert bi.x1 < bj.x0 or bj.x1 < bi.x0
    assert_inside(fig)


def test_force_stacked_bands_and_output_line():
    e = make_exp(f=8)
    fig = sp.force_stacked(e, max_display=4, order="output")
    ax = fig.axes[0]
    assert (
        sum(isinstance(c, PolyCollection) for c in ax.collections) == 2 * 5
    )  # 4 features + the rest
    line = ax.lines[0]
    np.testing.assert_allclose(line.get_ydata(), np.sort(e.scores.numpy()))
    assert_inside(fig)


def test_force_html_is_self_contained_one_and_many_rows():
    e = make_exp()
    one = sp.force_html(e, 2)
    assert one.count('class="seg"') == int((e.attributions[2] != 0).sum())
    many = sp.force_html(e, range(5))
    assert many.count("<svg") == 1 + 5 and many.count('class="band"') > 0
    assert many.count("<rect") == 5  # one hover column per row
    every = sp.force_html(e)
    assert every.count("<svg") == 1 and every.count("<rect") == 60
    for page in (one, many, every):
        assert "<script" not in page and " src=" not in page and "href" not in page
        assert set(re.findall(r"https?://[^\"' ]+", page)) <= {"http://www.w3.org/2000/svg"}
        assert "&lt;" not in page or "<" in page


def test_heatmap_rows_by_features_in_the_chosen_order():
    e = make_exp(f=8)
    fig = sp.heatmap(e, max_display=5, order="output")
    ax = next(a for a in fig.axes if a.images)
    mat = ax.images[0].get_array()
    assert mat.shape == (6, 60)
    phi = e.attributions.numpy()
    order = np.argsort(e.scores.numpy(), kind="stable")
    top = np.argsort(-np.abs(phi).mean(0), kind="stable")[:5]
    np.testing.assert_allclose(mat[:5], phi[order][:, top].T)
    np.testing.assert_allclose(mat.sum(0), phi[order].sum(1))
    clustered = sp._row_order(phi, "clustering", e.scores.numpy())
    assert sorted(clustered.tolist()) == list(range(60))
    with pytest.raises(OptionError):
        sp.heatmap(e, order="sideways")
    assert_inside(fig)


def test_decision_lines_run_from_base_to_output():
    e = make_exp(f=8)
    fig = sp.decision(e, range(10), max_display=5, highlight=[3])
    ax = fig.axes[0]
    paths = [
        ln for ln in ax.lines if len(ln.get_xdata()) == 6
    ]  # base + "3 other features" + 4 levels
    assert len(paths) == 10
    starts = [ln.get_xdata()[0] for ln in paths]
    ends = [ln.get_xdata()[-1] for ln in paths]
    np.testing.assert_allclose(starts, 0.5)
    np.testing.assert_allclose(ends, e.scores.numpy()[:10])
    assert sum(ln.get_linestyle() == "--" for ln in paths) == 1
    assert_inside(fig)
    single = sp.decision(e, [0])
    assert len(single.axes) == 1 and len(single.axes[0].texts) == 8  # a feature value per level
    assert_inside(single)


def test_interaction_summary_grid_and_error_without_interactions():
    e = make_exp(interactions=True)
    fig = sp.interaction_summary(e, max_display=3)
    grid = [a for a in fig.axes if a.collections]
    assert len(grid) == 9 and all(points(a) == 60 for a in grid)
    inter = e.extras["interactions"].numpy()
    top = np.argsort(-np.abs(e.attributions.numpy()).mean(0), kind="stable")[:3]
    xs = np.sort(np.concatenate([c.get_offsets()[:, 0] for c in grid[1].collections]))
    np.testing.assert_allclose(xs, np.sort(2 * inter[:, top[0], top[1]]))
    assert_inside(fig)
    with pytest.raises(OptionError, match="interactions=True"):
        sp.interaction_summary(make_exp())


@pytest.mark.parametrize("plot", [lambda e: sp.waterfall(e, 0), sp.bar])
def test_waterfall_and_bar_value_labels_inside_the_axes(plot):
    fig = plot(make_exp())
    assert_inside(fig)
    ax = fig.axes[0]
    r = fig.canvas.get_renderer()
    box = ax.get_window_extent(r)
    for t in ax.texts:
        bb = t.get_window_extent(r)
        assert box.x0 <= bb.x0 and bb.x1 <= box.x1, t.get_text()


@pytest.mark.parametrize("plot", [sp.waterfall, sp.force])
def test_row_index_checked_and_negative_counts_from_the_end(plot):
    e = make_exp(n=5)
    for bad in (5, -6, 1.0, True):
        with pytest.raises(OptionError, match="row|integer"):
            plot(e, bad)

    def texts(fig):
        return [t.get_text() for t in fig.findobj(matplotlib.text.Text) if t.get_text()]

    last, same, first = texts(plot(e, -1)), texts(plot(e, 4)), texts(plot(e, 0))
    assert last == same and last != first
