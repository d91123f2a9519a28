"""Plots of feature attributions (Shapley values, LIME, ablation): waterfall, beeswarm (summary),
mean-|value| bar chart, dependence scatter, force (static, stacked and self-contained HTML),
heatmap, decision plot, interaction summary, an HTML text highlighter and superpixel/patch
overlays for images.

Every plot takes an :class:`~perspicio.Explanation` and returns a matplotlib ``Figure`` (or an
HTML string); nothing is shown or saved here. The conventions are SHAP's: red pushes the output
up, blue down; "base value" is E[f(X)] (``exp.base_value``); a row's values add up from the base
value to f(x) (``exp.scores``).
"""

from __future__ import annotations

import html
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..core.explanation import Explanation

POS, NEG = "#d62728", "#1f77b4"
POS_LIGHT, NEG_LIGHT = "#f08080", "#7fb2d9"


def feature_table(
    exp: Explanation, feature_names: Sequence[str] | None = None
) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """(values (N, M), names (M,), feature values (N, M) or None) of an explanation over features."""
    if "values" in exp.extras:
        vals = [np.asarray(v, dtype=np.float64) for v in exp.extras["values"]]
        if len({len(v) for v in vals}) != 1:
            raise ValueError(
                "samples have different numbers of features; plot them one at a time (exp[i])."
            )
        values = np.stack(vals)
        stored = exp.extras.get("feature_names")
        names = list(stored[0]) if stored and stored[0] is not None else None
        fv = exp.extras.get("feature_values")
        fvals = np.stack([np.asarray(v.cpu(), dtype=np.float64) for v in fv]) if fv else None
    else:
        a = exp.attributions.detach().cpu().double()
        values = a.reshape(len(a), -1).numpy()
        names = None
        fvals = (
            exp.inputs.detach().cpu().double().reshape(len(a), -1).numpy()
            if isinstance(exp.inputs, Tensor)
            else None
        )
        if fvals is not None and fvals.shape != values.shape:
            fvals = None
    if feature_names is not None:
        names = list(feature_names)
    if names is None or len(names) != values.shape[1]:
        names = [f"x{i}" for i in range(values.shape[1])]
    return values, names, fvals


def _row_index(index: Any, rows: int) -> int:
    """``index`` as a row of ``rows`` explained rows (negative counts from the end), checked."""
    from ..errors import OptionError

    if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
        raise OptionError(f"index must be an integer row number, got {index!r}.")
    if not -rows <= int(index) < rows:
        raise OptionError(f"row {index} is out of range for {rows} explained rows.")
    return int(index) % rows


def _base(exp: Explanation, index: int) -> float | None:
    if exp.base_value is None:
        return None
    b = exp.base_value
    return float(b[index]) if isinstance(b, Tensor) and b.ndim else float(b)


def _output_name(exp: Explanation) -> str:
    """What f(x) is, for axis labels: the explanation's score unit (logit, probability, margin
    (log-odds), prediction), or "model output" when it is not known."""
    unit = exp.score_unit
    return "model output" if unit == "output" else unit


def _fit_texts(fig: Figure, ax: Any) -> None:
    """Widen the x-limits so the axes' own texts (value labels at bar ends) stay inside the axes."""
    renderer = fig.canvas.get_renderer()
    inv = ax.transData.inverted()
    x0, x1 = ax.get_xlim()
    for t in ax.texts:
        bb = t.get_window_extent(renderer)
        (a, _), (b, _) = inv.transform([(bb.x0, bb.y0), (bb.x1, bb.y1)])
        x0, x1 = min(x0, a), max(x1, b)
    pad = 0.02 * (x1 - x0)
    ax.set_xlim(x0 - pad, x1 + pad)
    fig.tight_layout()


def waterfall(
    exp: Explanation,
    index: int = 0,
    *,
    max_display: int = 10,
    feature_names: Sequence[str] | None = None,
) -> Figure:
    """How the features move one prediction from the base value E[f] to f(x).

    The ``max_display - 1`` largest |values| get their own bar; the rest are summed in one bar.
    """
    import matplotlib.pyplot as plt

    values, names, fvals = feature_table(exp, feature_names)
    index = _row_index(index, len(values))
    v = values[index]
    base = _base(exp, index)
    start = base if base is not None else 0.0
    order = np.argsort(-np.abs(v))
    shown = order[: max_display - 1] if len(v) > max_display else order
    rest = np.setdiff1d(order, shown)
    items = [
        (_label(names[i]) + (f" = {fvals[index, i]:.4g}" if fvals is not None else ""), v[i])
        for i in shown
    ]
    if len(rest):
        items.append((f"{len(rest)} other features", float(v[rest].sum())))
    items = items[::-1]  # smallest at the bottom, accumulate upwards
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1.6))
    # left edge of each bar: the base plus every bar below it
    cum = start
    lefts = []
    for _, val in items:
        lefts.append(cum)
        cum += val
    for y, ((_, val), lo) in enumerate(zip(items, lefts)):
        ax.barh(y, val, left=lo, color=POS if val >= 0 else NEG, height=0.6)
        ax.text(
            lo + val,
            y,
            f" {val:+.3g} ",
            va="center",
            ha="left" if val >= 0 else "right",
            fontsize=8,
        )
    ax.set_yticks(range(len(items)), [label for label, _ in items], fontsize=8)
    ax.axvline(start, color="grey", lw=0.8, ls="--")
    ax.axvline(cum, color="black", lw=0.8)
    target = f" ({exp.target_names[index]})" if exp.target_names else ""
    ax.set_xlabel(f"{_output_name(exp)}{target}")
    title = f"f(x) = {cum:.4g}" + (f"   E[f(X)] = {start:.4g}" if base is not None else "")
    ax.set_title(f"{exp.method}: {title}", fontsize=10)
    fig.tight_layout()
    _fit_texts(fig, ax)
    return fig


def _swarm_offsets(x: np.ndarray, width: float = 0.4, bins: int = 80) -> np.ndarray:
    """Vertical offsets that spread points with similar x into a symmetric swarm (dense x, wide swarm).

    Points are binned along x; within a bin the k-th point goes to +-ceil(k/2) steps, and the step
    is chosen so the most crowded bin spans at most ``width`` either side.
    """
    out = np.zeros(len(x))
    finite = np.isfinite(x)
    if finite.sum() < 2:
        return out
    lo, hi = float(x[finite].min()), float(x[finite].max())
    idx = np.zeros(len(x), dtype=np.int64)
    if hi > lo:
        idx[finite] = np.minimum(((x[finite] - lo) / (hi - lo) * bins).astype(np.int64), bins - 1)
    idx[~finite] = bins
    order = np.argsort(idx, kind="stable")
    counts = np.bincount(idx, minlength=bins + 1)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(x), dtype=np.int64)
    rank[order] = np.arange(len(x)) - starts[idx[order]]
    level = (rank + 1) // 2 * np.where(rank % 2 == 1, 1, -1)
    step = width / max(1, (int(counts.max()) + 1) // 2)
    return level * step


def _color_scale(c: np.ndarray) -> np.ndarray:
    """Feature values mapped to [0, 1] between their 5th and 95th percentiles (NaN stays NaN)."""
    f = np.isfinite(c)
    if not f.any():
        return np.full(len(c), np.nan)
    lo, hi = np.percentile(c[f], 5), np.percentile(c[f], 95)
    if hi <= lo:
        lo, hi = float(c[f].min()), float(c[f].max())
    return np.clip((c - lo) / (hi - lo if hi > lo else 1.0), 0, 1)


def _label(name: str, width: int = 32) -> str:
    """A long feature name wrapped onto lines of at most ``width`` characters (readable, never clipped)."""
    return (
        textwrap.fill(str(name), width=width, break_long_words=True)
        if len(str(name)) > width
        else str(name)
    )


def beeswarm(
    exp: Explanation,
    *,
    max_display: int = 20,
    feature_names: Sequence[str] | None = None,
    seed: int = 0,
) -> Figure:
    """The summary plot: one dot per (sample, feature), x = attribution, colour = the feature's value.

    Features are ordered by mean |value| (the most important on top); dots with similar values are
    spread vertically (a swarm), so the height shows where values are dense. Feature values are
    coloured from low (blue) to high (red) between their 5th and 95th percentiles; missing
    values are grey. ``seed`` orders the dots inside a crowded bin.
    """
    import matplotlib.pyplot as plt

    values, names, fvals = feature_table(exp, feature_names)
    order = np.argsort(-np.abs(values).mean(0), kind="stable")[:max_display][::-1]
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(order) + 1.5))
    sc = None
    for y, j in enumerate(order):
        perm = rng.permutation(len(values))
        x = values[perm, j]
        yy = y + _swarm_offsets(x)
        if fvals is not None:
            c = _color_scale(fvals[perm, j])
            nan = ~np.isfinite(c)
            if nan.any():
                ax.scatter(x[nan], yy[nan], color="#999999", s=10, lw=0)
            sc = ax.scatter(
                x[~nan], yy[~nan], c=c[~nan], cmap="coolwarm", vmin=0, vmax=1, s=10, lw=0
            )
        else:
            ax.scatter(x, yy, color="grey", s=10, lw=0)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(order)), [_label(names[j]) for j in order], fontsize=8)
    ax.set_ylim(-0.7, len(order) - 0.3)
    ax.set_xlabel(f"{exp.method} value (impact on the model output)")
    if sc is not None:
        cb = fig.colorbar(sc, ax=ax, ticks=[0, 1], aspect=40)
        cb.ax.set_yticklabels(["low", "high"])
        cb.set_label("feature value")
    fig.tight_layout()
    return fig


#: ``shap.summary_plot``'s default is the beeswarm
summary = beeswarm


def bar(
    exp: Explanation, *, max_display: int = 20, feature_names: Sequence[str] | None = None
) -> Figure:
    """Mean |attribution| per feature over the explained samples (global importance)."""
    import matplotlib.pyplot as plt

    values, names, _ = feature_table(exp, feature_names)
    imp = np.abs(values).mean(0)
    order = np.argsort(-imp)[:max_display][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(order) + 1.2))
    ax.barh(range(len(order)), imp[order], color=POS)
    for y, j in enumerate(order):
        ax.text(imp[j], y, f" {imp[j]:.3g}", va="center", fontsize=8)
    ax.set_yticks(range(len(order)), [_label(names[j]) for j in order], fontsize=8)
    ax.set_xlabel(f"mean |{exp.method} value| over {len(values)} samples")
    fig.tight_layout()
    _fit_texts(fig, ax)
    return fig


# ============================================================================ dependence (scatter)


def _feature_index(feature: int | str, names: Sequence[str]) -> int:
    from ..errors import OptionError, suggest

    if isinstance(feature, (int, np.integer)) and not isinstance(feature, bool):
        if not -len(names) <= int(feature) < len(names):
            raise OptionError(f"feature index {feature} is out of range for {len(names)} features.")
        return int(feature) % len(names)
    if isinstance(feature, str) and feature in names:
        return list(names).index(feature)
    raise OptionError(
        f"unknown feature {feature!r}; expected an index or one of: {', '.join(map(str, names))}."
        + suggest(str(feature), list(names))
    )


def _interactions(exp: Explanation) -> np.ndarray | None:
    inter = exp.extras.get("interactions")
    if inter is None:
        return None
    a = (
        inter.detach().cpu().double().numpy()
        if isinstance(inter, Tensor)
        else np.asarray(inter, dtype=np.float64)
    )
    return a if a.ndim == 3 and a.shape[1] == a.shape[2] else None


def interaction_strength(
    exp: Explanation, feature: int | str, *, feature_names: Sequence[str] | None = None
) -> tuple[np.ndarray, str]:
    """How strongly every feature interacts with ``feature``, and how that was measured.

    With interaction values (``tree_shap(..., interactions=True)``): the mean |interaction value|
    over the rows ("interaction values"). Without: a cheap approximation ("approximation"): the
    rows are sorted by ``feature``'s value and cut into about 10 groups of similar value; inside a
    group the feature's own value barely changes, so whatever of its attribution still varies is
    due to other features: a feature's score is the size-weighted mean |correlation| between the
    attribution and that feature's value inside the groups. The feature itself scores 0.
    """
    values, names, fvals = feature_table(exp, feature_names)
    i = _feature_index(feature, names)
    inter = _interactions(exp)
    if inter is not None and inter.shape[1] == values.shape[1]:
        score = np.abs(inter[:, i, :]).mean(0)
        score[i] = 0.0
        return score, "interaction values"
    score = np.zeros(values.shape[1])
    if fvals is None or len(values) < 4:
        return score, "approximation"
    xi = np.where(np.isfinite(fvals[:, i]), fvals[:, i], -np.inf)
    order = np.argsort(xi, kind="stable")
    groups = np.array_split(order, max(1, min(10, len(order) // 4)))
    phi = values[:, i]
    for g in groups:
        p = phi[g] - phi[g].mean()
        sp = np.sqrt((p * p).sum())
        if sp == 0:
            continue
        xj = fvals[g]
        ok = np.isfinite(xj)
        xj = np.where(ok, xj, 0.0)
        mean = xj.sum(0) / np.maximum(ok.sum(0), 1)
        d = np.where(ok, xj - mean, 0.0)
        sd = np.sqrt((d * d).sum(0))
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.where(sd > 0, np.abs(p @ d) / (sp * sd), 0.0)
        score += corr * len(g) / len(phi)
    score[i] = 0.0
    return score, "approximation"


def scatter(
    exp: Explanation,
    feature: int | str,
    *,
    color: int | str | None = "auto",
    feature_names: Sequence[str] | None = None,
    size: float = 14,
) -> Figure:
    """The dependence plot: x = the feature's value, y = its attribution (one dot per row).

    ``color="auto"`` colours the dots by the value of the feature that interacts most with this
    one (see :func:`interaction_strength`: from interaction values when the explanation has
    them, else an approximation - the colour bar says which); a name or index picks the feature;
    None draws one colour. Rows where the feature is missing (NaN) are drawn as crosses at the
    left edge.
    """
    import matplotlib.pyplot as plt

    values, names, fvals = feature_table(exp, feature_names)
    if fvals is None:
        raise ValueError(
            "a dependence plot needs the explained feature values (tabular explanations)."
        )
    i = _feature_index(feature, names)
    x, y = fvals[:, i], values[:, i]
    source = ""
    j = None
    if isinstance(color, str) and color == "auto":
        if values.shape[1] > 1:
            score, source = interaction_strength(exp, i, feature_names=names)
            j = int(np.argmax(score)) if score.max() > 0 else None
    elif color is not None:
        j = _feature_index(color, names)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ok = np.isfinite(x)
    if j is not None:
        c = fvals[:, j]
        cs = _color_scale(c)
        fin = ok & np.isfinite(cs)
        sc = ax.scatter(x[fin], y[fin], c=cs[fin], cmap="coolwarm", vmin=0, vmax=1, s=size, lw=0)
        other = ok & ~np.isfinite(cs)
        if other.any():
            ax.scatter(x[other], y[other], color="#999999", s=size, lw=0)
        lo, hi = np.nanpercentile(c, 5), np.nanpercentile(c, 95)
        cb = fig.colorbar(sc, ax=ax, ticks=[0, 1], aspect=40)
        cb.ax.set_yticklabels([f"{lo:.3g}", f"{hi:.3g}"], fontsize=8)
        how = f"\n(strongest interaction, {source})" if source else ""
        cb.set_label(_label(names[j], 28) + how, fontsize=8)
    else:
        ax.scatter(x[ok], y[ok], color=POS, s=size, lw=0)
    if (~ok).any():
        lo = float(np.nanmin(x)) if ok.any() else 0.0
        span = float(np.nanmax(x)) - lo if ok.any() else 1.0
        xm = lo - 0.06 * (span or 1.0)
        ax.scatter(
            np.full((~ok).sum(), xm),
            y[~ok],
            marker="x",
            color="#555555",
            s=size,
            lw=0.8,
            label=f"missing ({int((~ok).sum())})",
        )
        ax.legend(loc="best", fontsize=8)
    ax.axhline(0, color="grey", lw=0.6, ls=":")
    ax.set_xlabel(_label(names[i], 60))
    ax.set_ylabel(_label(f"{exp.method} value for {names[i]}", 40))
    fig.tight_layout()
    return fig


#: the SHAP name of the same plot
dependence = scatter


# ============================================================================ force plots


def _row(
    exp: Explanation, index: int, feature_names: Sequence[str] | None
) -> tuple[np.ndarray, list[str], np.ndarray | None, float, float]:
    """(values, names, feature values or None, base, f(x)) of one explained row."""
    values, names, fvals = feature_table(exp, feature_names)
    index = _row_index(index, len(values))
    v = values[index]
    base = _base(exp, index)
    base = 0.0 if base is None else base
    return v, names, (fvals[index] if fvals is not None else None), base, base + float(v.sum())


def _segments(
    v: np.ndarray,
) -> tuple[list[tuple[int, float, float]], list[tuple[int, float, float]]]:
    """Force-plot segments relative to f(x): positive values stacked to the left of f(x) (largest
    next to it), negative ones to the right; each (feature, start offset, end offset)."""
    pos = [int(j) for j in np.argsort(-v, kind="stable") if v[j] > 0]
    neg = [int(j) for j in np.argsort(v, kind="stable") if v[j] < 0]
    left, at = [], 0.0
    for j in pos:
        left.append((j, at - v[j], at))
        at -= v[j]
    right, at = [], 0.0
    for j in neg:
        right.append((j, at, at - v[j]))
        at -= v[j]
    return left, right


def _value_text(name: str, fv: float | None) -> str:
    if fv is None:
        return name
    return f"{name} = {'missing' if not np.isfinite(fv) else f'{fv:.4g}'}"


def force(
    exp: Explanation,
    index: int = 0,
    *,
    max_display: int = 12,
    min_fraction: float = 0.02,
    feature_names: Sequence[str] | None = None,
) -> Figure:
    """The force plot of one row: the features pushing f(x) up (red, from the left) and down (blue,
    from the right) meet at the prediction; the base value is marked on the same axis.

    Segments are labelled ``name = value`` (largest first, at most ``max_display``, each at least
    ``min_fraction`` of the total width); labels are placed on as many lines as needed so none
    overlaps another.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    v, names, fv, base, fx = _row(exp, index, feature_names)
    left, right = _segments(v)
    total = float(np.abs(v).sum()) or 1.0
    lo = min(base, fx + (left[-1][1] if left else 0.0))
    hi = max(base, fx + (right[-1][2] if right else 0.0))
    span = (hi - lo) or 1.0
    fig = plt.figure(figsize=(11, 3.2))
    ax = fig.add_axes((0.03, 0.4, 0.94, 0.5))
    h, tip = 0.12, 0.012 * span
    for segs, colour, sign in ((left, POS, 1), (right, NEG, -1)):
        for _, a, b in segs:
            a, b = fx + a, fx + b
            t = min(tip, (b - a) * 0.45)
            if sign > 0:  # arrow pointing right (towards higher output)
                pts = [(a, h), (b - t, h), (b, 0), (b - t, -h), (a, -h), (a + t, 0)]
            else:
                pts = [(a + t, h), (b, h), (b - t, 0), (b, -h), (a + t, -h), (a, 0)]
            ax.add_patch(Polygon(pts, closed=True, facecolor=colour, edgecolor="white", lw=0.8))
    ax.set_xlim(lo - 0.05 * span, hi + 0.05 * span)
    ax.set_ylim(-0.16, 0.55)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.spines["bottom"].set_position(("data", 0.25))
    ax.tick_params(axis="x", labelsize=8)
    ax.annotate(
        f"f(x) = {fx:.4g}",
        (fx, h),
        xytext=(fx, 0.45),
        ha="center",
        fontsize=10,
        weight="bold",
        arrowprops={"arrowstyle": "-", "color": "black", "lw": 0.8},
    )
    ax.annotate(
        f"base value = {base:.4g}",
        (base, 0.25),
        xytext=(base, 0.38),
        ha="center",
        fontsize=8,
        color="#555555",
        arrowprops={"arrowstyle": "-", "color": "#888888", "lw": 0.6},
    )
    if left:
        ax.text(fx - 0.01 * span, 0.33, "higher \u2192", ha="right", fontsize=8, color=POS)
    if right:
        ax.text(fx + 0.01 * span, 0.33, "\u2190 lower", ha="left", fontsize=8, color=NEG)
    labelled = sorted(left + right, key=lambda s: -(s[2] - s[1]))
    labelled = [s for s in labelled if (s[2] - s[1]) >= min_fraction * total][:max_display]
    _place_labels(
        fig,
        ax,
        [
            (
                fx + (a + b) / 2,
                _value_text(_label(names[j], 40), None if fv is None else fv[j]),
                POS if v[j] > 0 else NEG,
            )
            for j, a, b in labelled
        ],
        y0=-h,
    )
    target = f" ({exp.target_names[index]})" if exp.target_names else ""
    ax.set_title(
        f"{exp.method}{target}, {_output_name(exp)}: red pushes it higher, blue lower",
        fontsize=9,
        color="#333333",
        loc="left",
    )
    return fig


def _place_labels(fig: Figure, ax: Any, items: list[tuple[float, str, str]], y0: float) -> None:
    """Labels under the force bar at their segment's x, each on the first line where it overlaps no
    other label, kept inside the figure and linked to its segment by a thin line; the figure
    grows downwards to hold as many lines as needed (the bar keeps its size)."""
    renderer = fig.canvas.get_renderer()
    pt = 72.0 / fig.dpi  # points per pixel
    margin = 0.01 * fig.bbox.width
    lo, hi = fig.bbox.x0 + margin, fig.bbox.x1 - margin
    placed: list[tuple[Any, float, int]] = []
    lines: list[list[tuple[float, float]]] = []
    for x, text, colour in items:
        t = ax.annotate(
            text,
            (x, y0),
            xytext=(0, -12),
            textcoords="offset points",
            ha="center",
            va="top",
            fontsize=8,
            color=colour,
            linespacing=1.1,
            annotation_clip=False,
            arrowprops={
                "arrowstyle": "-",
                "color": colour,
                "lw": 0.5,
                "alpha": 0.6,
                "shrinkA": 0,
                "shrinkB": 0,
            },
        )
        bb = t.get_window_extent(renderer)
        shift = lo - bb.x0 if bb.x0 < lo else hi - bb.x1 if bb.x1 > hi else 0.0
        a, b = bb.x0 + shift, bb.x1 + shift
        line = next(
            (k for k, used in enumerate(lines) if all(b + 6 < u or a - 6 > v for u, v in used)),
            len(lines),
        )
        if line == len(lines):
            lines.append([])
        lines[line].append((a, b))
        placed.append((t, shift, line))
    heights = [0.0] * len(lines)
    for t, _, line in placed:
        heights[line] = max(heights[line], t.get_window_extent(renderer).height * pt + 3)
    for t, shift, line in placed:
        t.xyann = (shift * pt, -12 - sum(heights[:line]))
    # grow the figure below the axes so the lowest line fits (the axes keep their height in inches)
    below_in = (12 + sum(heights) + 8) / 72.0
    w, h = fig.get_size_inches()
    ax_box = ax.get_position()
    top_in = h * (1 - ax_box.y0)  # the axes and everything above them
    new_h = top_in + below_in + 0.35
    fig.set_size_inches(w, new_h)
    ax.set_position((ax_box.x0, 1 - top_in / new_h, ax_box.width, ax_box.height * h / new_h))


def _row_order(values: np.ndarray, order: str | Sequence[int], output: np.ndarray) -> np.ndarray:
    """Order of the rows for heatmap/stacked force plots: "clustering" (hierarchical clustering of
    the attribution vectors, leaves in order; scipy, else the first principal component), "output"
    (by f(x)) or "input" (as given), or explicit indices."""
    from ..errors import OptionError

    n = len(values)
    if not isinstance(order, str):
        idx = np.asarray(order, dtype=np.int64)
        if sorted(idx.tolist()) != list(range(n)):
            raise OptionError(f"order must be a permutation of the {n} rows.")
        return idx
    if order == "input":
        return np.arange(n)
    if order == "output":
        return np.argsort(output, kind="stable")
    if order != "clustering":
        raise OptionError(
            f"order must be 'clustering', 'output', 'input' or row indices; got {order!r}."
        )
    if n < 3:
        return np.argsort(output, kind="stable")
    try:
        from scipy.cluster.hierarchy import leaves_list, linkage

        return np.asarray(
            leaves_list(linkage(values, method="average", metric="cityblock")), dtype=np.int64
        )
    except ImportError:
        c = values - values.mean(0)
        _, _, vt = np.linalg.svd(c, full_matrices=False)
        return np.argsort(c @ vt[0], kind="stable")


def force_stacked(
    exp: Explanation,
    *,
    order: str | Sequence[int] = "clustering",
    max_display: int = 12,
    feature_names: Sequence[str] | None = None,
) -> Figure:
    """Many rows' force plots turned 90 degrees and set side by side: x = the rows (ordered by
    ``order``, see :func:`heatmap`), the black line f(x), red bands below it the features that
    pushed it up, blue bands above those that pushed it down. The ``max_display`` most important
    features get their own band (labelled at the right), the others share one."""
    import matplotlib.pyplot as plt

    values, names, _ = feature_table(exp, feature_names)
    bases = np.array([_base(exp, i) or 0.0 for i in range(len(values))])
    out = bases + values.sum(1)
    idx = _row_order(values, order, out)
    vals, out = values[idx], out[idx]
    imp = np.abs(values).mean(0)
    top = np.argsort(-imp, kind="stable")[:max_display]
    rest = np.setdiff1d(np.arange(values.shape[1]), top)
    cols = [vals[:, j] for j in top] + ([vals[:, rest].sum(1)] if len(rest) else [])
    labels = [names[j] for j in top] + ([f"{len(rest)} other features"] if len(rest) else [])
    xs = np.arange(len(vals))
    fig, ax = plt.subplots(figsize=(10, 4.8))
    below = out.copy()
    above = out.copy()
    for k, c in enumerate(cols):  # alternate two shades so neighbouring bands stay apart
        p, n = np.clip(c, 0, None), np.clip(c, None, 0)
        ax.fill_between(xs, below - p, below, color=POS if k % 2 == 0 else POS_LIGHT, lw=0)
        ax.fill_between(xs, above, above - n, color=NEG if k % 2 == 0 else NEG_LIGHT, lw=0)
        below, above = below - p, above - n
    ax.plot(xs, out, color="black", lw=1.0, label="f(x)")
    ax.axhline(float(np.mean(bases)), color="grey", lw=0.8, ls="--", label="base value")
    ax.set_xlim(-0.5, len(vals) - 0.5)
    ax.set_xlabel(f"rows (ordered by {order if isinstance(order, str) else 'the given order'})")
    ax.set_ylabel("model output")
    ax.legend(loc="upper left", fontsize=8)
    lab = "; ".join(_label(t, 28) for t in labels[:5]) + ("; ..." if len(labels) > 5 else "")
    ax.set_title(
        _label(f"{exp.method}: bands from the most important: {lab}", 110), fontsize=8, loc="left"
    )
    fig.tight_layout()
    return fig


def _svg_text(x: float, y: float, text: str, **attrs: Any) -> str:
    extra = " ".join(f'{k.replace("_", "-")}="{v}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}" {extra}>{html.escape(text)}</text>'


def _force_svg_row(
    v: np.ndarray,
    names: list[str],
    fv: np.ndarray | None,
    base: float,
    fx: float,
    title: str,
    max_display: int,
) -> str:
    width, pad = 960, 40
    left, right = _segments(v)
    lo = min(base, fx + (left[-1][1] if left else 0.0))
    hi = max(base, fx + (right[-1][2] if right else 0.0))
    span = (hi - lo) or 1.0
    lo, hi = lo - 0.05 * span, hi + 0.05 * span

    def px(val: float) -> float:
        return pad + (val - lo) / (hi - lo) * (width - 2 * pad)

    parts = [_svg_text(pad, 16, title, font_size="12", fill="#333")]
    ybar, h = 92, 14
    for segs, colour, sign in ((left, POS, 1), (right, NEG, -1)):
        for j, a, b in segs:
            x0, x1 = px(fx + a), px(fx + b)
            t = min(6.0, (x1 - x0) * 0.45)
            if sign > 0:
                pts = [
                    (x0, ybar - h),
                    (x1 - t, ybar - h),
                    (x1, ybar),
                    (x1 - t, ybar + h),
                    (x0, ybar + h),
                    (x0 + t, ybar),
                ]
            else:
                pts = [
                    (x0 + t, ybar - h),
                    (x1, ybar - h),
                    (x1 - t, ybar),
                    (x1, ybar + h),
                    (x0 + t, ybar + h),
                    (x0, ybar),
                ]
            tip = f"{_value_text(names[j], None if fv is None else fv[j])}: {v[j]:+.4g}"
            parts.append(
                f'<polygon class="seg" points="{" ".join(f"{a_:.1f},{b_:.1f}" for a_, b_ in pts)}" '
                f'fill="{colour}" stroke="white" stroke-width="1"><title>{html.escape(tip)}</title></polygon>'
            )
    parts.append(
        f'<line x1="{px(base):.1f}" x2="{px(base):.1f}" y1="{ybar - h - 30}" y2="{ybar + h}" '
        'stroke="#888" stroke-dasharray="3,2"/>'
    )
    parts.append(
        _svg_text(
            px(base),
            ybar - h - 34,
            f"base value {base:.4g}",
            font_size="11",
            fill="#555",
            text_anchor="middle",
        )
    )
    parts.append(
        _svg_text(
            px(fx),
            ybar - h - 20,
            f"f(x) = {fx:.4g}",
            font_size="13",
            font_weight="bold",
            text_anchor="middle",
        )
    )
    total = float(np.abs(v).sum()) or 1.0
    shown = sorted(left + right, key=lambda s: -(s[2] - s[1]))[:max_display]
    shown = [s for s in shown if (s[2] - s[1]) >= 0.02 * total]
    lines: list[list[tuple[float, float]]] = []
    for j, a, b in shown:
        cx = px(fx + (a + b) / 2)
        text = _value_text(names[j], None if fv is None else fv[j])
        w = 6.2 * len(text)
        x0 = min(max(cx - w / 2, 2), width - 2 - w)
        for k in range(len(lines) + 1):
            if k == len(lines):
                lines.append([])
            if all(x0 + w + 6 < a_ or x0 - 6 > b_ for a_, b_ in lines[k]):
                break
        lines[k].append((x0, x0 + w))
        y = ybar + h + 18 + 15 * k
        colour = POS if v[j] > 0 else NEG
        parts.append(
            f'<line x1="{cx:.1f}" x2="{x0 + w / 2:.1f}" y1="{ybar + h}" y2="{y - 10}" stroke="{colour}" '
            'stroke-width="0.6"/>'
        )
        parts.append(_svg_text(x0, y, text, font_size="11", fill=colour))
    height = ybar + h + 30 + 15 * len(lines)
    for tick in _ticks(lo, hi):
        parts.append(
            f'<line x1="{px(tick):.1f}" x2="{px(tick):.1f}" y1="{ybar - h - 2}" y2="{ybar - h - 6}" '
            'stroke="#999"/>'
        )
        parts.append(
            _svg_text(
                px(tick),
                ybar - h - 7,
                f"{tick:.3g}",
                font_size="9",
                fill="#999",
                text_anchor="middle",
            )
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">' + "".join(parts) + "</svg>"
    )


def _ticks(lo: float, hi: float, n: int = 6) -> list[float]:
    step = (hi - lo) / n
    if step <= 0:
        return []
    mag = 10 ** np.floor(np.log10(step))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step), default=step)
    start = np.ceil(lo / step) * step
    return [float(t) for t in np.arange(start, hi, step)]


def _force_svg_stack(
    values: np.ndarray,
    names: list[str],
    bases: np.ndarray,
    order: np.ndarray,
    title: str,
    max_display: int,
    row_ids: np.ndarray,
) -> str:
    width, height, pad_l, pad_r, pad_t, pad_b = 960, 420, 60, 200, 30, 40
    vals = values[order]
    out = bases[order] + vals.sum(1)
    imp = np.abs(values).mean(0)
    top = np.argsort(-imp, kind="stable")[:max_display]
    rest = np.setdiff1d(np.arange(values.shape[1]), top)
    cols = [vals[:, j] for j in top] + ([vals[:, rest].sum(1)] if len(rest) else [])
    labels = [names[j] for j in top] + ([f"{len(rest)} other features"] if len(rest) else [])
    lo = float((out - np.clip(vals, 0, None).sum(1)).min())
    hi = float((out - np.clip(vals, None, 0).sum(1)).max())
    span = (hi - lo) or 1.0
    lo, hi = lo - 0.05 * span, hi + 0.05 * span
    n = len(vals)
    plot_w, plot_h = width - pad_l - pad_r, height - pad_t - pad_b

    def X(i: float) -> float:
        return pad_l + (i + 0.5) / n * plot_w

    def Y(val: float) -> float:
        return pad_t + (hi - val) / (hi - lo) * plot_h

    parts = [_svg_text(pad_l, 18, title, font_size="12", fill="#333")]
    below, above = out.copy(), out.copy()
    xs = [X(i) for i in range(n)]
    for k, c in enumerate(cols):
        p, m = np.clip(c, 0, None), np.clip(c, None, 0)
        shades = (POS, NEG) if k % 2 == 0 else (POS_LIGHT, NEG_LIGHT)
        for lo_edge, hi_edge, colour in (
            (below - p, below, shades[0]),
            (above, above - m, shades[1]),
        ):
            if not (hi_edge - lo_edge).any():
                continue
            pts = [f"{x:.1f},{Y(t):.1f}" for x, t in zip(xs, hi_edge)]
            pts += [f"{x:.1f},{Y(b):.1f}" for x, b in zip(xs[::-1], lo_edge[::-1])]
            parts.append(
                f'<polygon class="band" points="{" ".join(pts)}" fill="{colour}">'
                f"<title>{html.escape(labels[k])}</title></polygon>"
            )
        below, above = below - p, above - m
    parts.append(
        '<polyline fill="none" stroke="black" stroke-width="1.2" points="'
        + " ".join(f"{x:.1f},{Y(t):.1f}" for x, t in zip(xs, out))
        + '"><title>f(x)</title></polyline>'
    )
    for i in range(
        n
    ):  # one transparent column per row: hover shows its prediction and strongest features
        v = vals[i]
        top3 = np.argsort(-np.abs(v))[:3]
        tip = f"row {int(row_ids[order[i]])}: f(x) = {out[i]:.4g}; " + ", ".join(
            f"{names[j]} {v[j]:+.3g}" for j in top3
        )
        parts.append(
            f'<rect x="{X(i) - plot_w / n / 2:.1f}" y="{pad_t}" width="{plot_w / n:.2f}" height="{plot_h}" '
            f'fill="transparent"><title>{html.escape(tip)}</title></rect>'
        )
    for t in _ticks(lo, hi):
        parts.append(
            f'<line x1="{pad_l - 5}" x2="{pad_l}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#999"/>'
        )
        parts.append(
            _svg_text(
                pad_l - 8, Y(t) + 4, f"{t:.3g}", font_size="10", fill="#555", text_anchor="end"
            )
        )
    parts.append(
        f'<line x1="{pad_l}" x2="{pad_l}" y1="{pad_t}" y2="{pad_t + plot_h}" stroke="#999"/>'
    )
    parts.append(
        _svg_text(
            pad_l + plot_w / 2,
            height - 10,
            "rows (hover for values)",
            font_size="11",
            fill="#555",
            text_anchor="middle",
        )
    )
    for k, lab in enumerate(labels[:14]):
        y = pad_t + 14 * k + 10
        parts.append(
            _svg_text(width - pad_r + 12, y, f"{k + 1}. {lab}"[:34], font_size="10", fill="#333")
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="sans-serif">' + "".join(parts) + "</svg>"
    )


def force_html(
    exp: Explanation,
    index: int | Sequence[int] | None = None,
    *,
    order: str | Sequence[int] = "clustering",
    max_display: int = 12,
    feature_names: Sequence[str] | None = None,
) -> str:
    """A self-contained HTML page (inline SVG, no script, no network) with force plots.

    ``index`` an int: that row's force plot. A list of rows, or None (all rows): the stacked plot
    of :func:`force_stacked` (bands per feature, ``order`` of the rows), followed by each row's own
    force plot when there are at most 10 rows. Hovering a segment or band shows its feature and value.
    """
    values, names, fvals = feature_table(exp, feature_names)
    method = html.escape(exp.method)

    def row_svg(i: int) -> str:
        v, _, fv, base, fx = _row(exp, i, names)
        target = f" ({exp.target_names[i]})" if exp.target_names else ""
        return _force_svg_row(
            v,
            names,
            fv,
            base,
            fx,
            f"row {i}{target}: red pushes the output higher, blue lower",
            max_display,
        )

    if isinstance(index, (int, np.integer)):
        body = row_svg(int(index))
    else:
        rows = np.arange(len(values)) if index is None else np.asarray(list(index), dtype=np.int64)
        bases = np.array([_base(exp, int(i)) or 0.0 for i in range(len(values))])
        sub_vals, sub_bases = values[rows], bases[rows]
        local = _row_order(sub_vals, order, sub_bases + sub_vals.sum(1))
        stack = _force_svg_stack(
            sub_vals,
            names,
            sub_bases,
            local,
            f"{len(rows)} rows, ordered by {order if isinstance(order, str) else 'the given order'}",
            max_display,
            rows,
        )
        body = stack + (
            "".join(f"<div>{row_svg(int(i))}</div>" for i in rows) if len(rows) <= 10 else ""
        )
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8"><title>perspicio force plot</title>'
        "<style>body{font-family:sans-serif;margin:16px} svg{display:block;margin-bottom:12px}"
        " .seg:hover,.band:hover{opacity:0.75}</style></head><body>"
        f'<h3 style="font-weight:normal">{method}: base value + contributions = model output</h3>'
        f"{body}</body></html>"
    )


# ============================================================================ heatmap, decision, interactions


def heatmap(
    exp: Explanation,
    *,
    order: str | Sequence[int] = "clustering",
    max_display: int = 12,
    feature_names: Sequence[str] | None = None,
) -> Figure:
    """Rows x features: every explained row a column, every feature a line, colour = its attribution
    (red +, blue -). Rows are ordered by ``order`` ("clustering": hierarchical clustering of the
    attribution vectors so rows explained alike sit together; "output"; "input"; or indices);
    features by mean |value| (the rest summed in one line). Above: f(x) per row; right: mean |value|."""
    import matplotlib.pyplot as plt

    values, names, _ = feature_table(exp, feature_names)
    bases = np.array([_base(exp, i) or 0.0 for i in range(len(values))])
    out = bases + values.sum(1)
    idx = _row_order(values, order, out)
    imp = np.abs(values).mean(0)
    top = np.argsort(-imp, kind="stable")[:max_display]
    rest = np.setdiff1d(np.arange(values.shape[1]), top)
    mat = values[idx][:, top].T
    labels = [_label(names[j]) for j in top]
    bars = list(imp[top])
    if len(rest):
        mat = np.vstack([mat, values[idx][:, rest].sum(1)])
        labels.append(f"{len(rest)} other features")
        bars.append(float(np.abs(values[:, rest].sum(1)).mean()))
    lim = float(np.percentile(np.abs(mat), 99.5)) or 1.0
    fig = plt.figure(figsize=(10, 0.38 * len(labels) + 2.6), layout="constrained")
    gs = fig.add_gridspec(
        2, 3, height_ratios=[1, max(2.0, 0.38 * len(labels))], width_ratios=[12, 2, 0.35]
    )
    ax_top = fig.add_subplot(gs[0, 0])
    ax = fig.add_subplot(gs[1, 0], sharex=ax_top)
    ax_bar = fig.add_subplot(gs[1, 1], sharey=ax)
    cax = fig.add_subplot(gs[1, 2])
    im = ax.imshow(mat, aspect="auto", cmap="bwr", vmin=-lim, vmax=lim, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel(f"rows (ordered by {order if isinstance(order, str) else 'the given order'})")
    ax_top.plot(np.arange(len(idx)), out[idx], color="black", lw=1)
    ax_top.axhline(float(bases.mean()), color="grey", lw=0.8, ls="--")
    ax_top.set_ylabel("f(x)", fontsize=8)
    ax_top.tick_params(labelbottom=False, labelsize=7)
    ax_bar.barh(range(len(labels)), bars, color="#555555", height=0.6)
    ax_bar.tick_params(labelleft=False, labelsize=7)
    ax_bar.set_xlabel("mean |value|", fontsize=8)
    cb = fig.colorbar(im, cax=cax)
    cb.set_label(f"{exp.method} value", fontsize=8)
    cb.ax.tick_params(labelsize=7)
    return fig


def decision(
    exp: Explanation,
    rows: Sequence[int] | None = None,
    *,
    max_display: int = 20,
    highlight: Sequence[int] | None = None,
    feature_names: Sequence[str] | None = None,
) -> Figure:
    """The decision plot: each row is a line that starts at the base value (bottom) and adds one
    feature's attribution per level, the most important features last (top), ending at f(x).

    Features are ordered by mean |value| over the plotted rows (the least important
    beyond ``max_display - 1`` are added first, in one step). Lines are coloured by f(x);
    ``highlight`` rows are drawn thick and dashed. With one row, each level is labelled with
    the feature's value.
    """
    import matplotlib.pyplot as plt
    from matplotlib import cm, colors

    values, names, fvals = feature_table(exp, feature_names)
    sel = np.arange(len(values)) if rows is None else np.asarray(list(rows), dtype=np.int64)
    vals = values[sel]
    bases = np.array([_base(exp, int(i)) or 0.0 for i in sel])
    imp = np.abs(vals).mean(0)
    order = np.argsort(imp, kind="stable")  # least important first (bottom)
    if len(order) > max_display:
        rest, shown = order[: len(order) - max_display + 1], order[len(order) - max_display + 1 :]
        steps = [vals[:, rest].sum(1)] + [vals[:, j] for j in shown]
        labels = [f"{len(rest)} other features"] + [_label(names[j]) for j in shown]
        cols = [None] + list(shown)
    else:
        steps = [vals[:, j] for j in order]
        labels = [_label(names[j]) for j in order]
        cols = list(order)
    path = np.column_stack([bases] + steps).cumsum(1)  # (R, levels + 1)
    out = path[:, -1]
    norm = colors.Normalize(
        vmin=float(out.min()),
        vmax=float(out.max()) if out.max() > out.min() else float(out.min()) + 1,
    )
    cmap = plt.get_cmap("coolwarm")
    fig, ax = plt.subplots(figsize=(8, 0.38 * len(labels) + 2.2))
    ys = np.arange(len(labels) + 1) - 0.5
    hl = set(int(h) for h in (highlight or []))
    for r in range(len(sel)):
        thick = int(sel[r]) in hl
        ax.plot(
            path[r],
            ys,
            color=cmap(norm(out[r])) if len(sel) > 1 else "black",
            lw=2.2 if thick else 1.0,
            ls="--" if thick else "-",
            alpha=1.0 if thick or len(sel) < 50 else 0.6,
        )
    ax.axvline(float(bases.mean()), color="grey", lw=0.8)
    for y in range(len(labels)):
        ax.axhline(y, color="#dddddd", lw=0.5, zorder=0)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_ylim(-0.5, len(labels) - 0.5)
    if len(sel) == 1 and fvals is not None:
        for y, j in enumerate(cols):
            if j is not None:
                fv = fvals[sel[0], j]
                ax.text(
                    path[0, y + 1],
                    y,
                    f"  ({'missing' if not np.isfinite(fv) else f'{fv:.3g}'})",
                    fontsize=7,
                    va="bottom",
                    color="#444444",
                )
    ax.set_xlabel(f"{_output_name(exp)} value")
    ax.margins(x=0.08)
    if len(sel) > 1:
        sm = cm.ScalarMappable(norm=norm, cmap=cmap)
        cb = fig.colorbar(sm, ax=ax, aspect=40, pad=0.02)
        cb.set_label("f(x)", fontsize=8)
    ax.set_title(
        f"{exp.method}: base value {float(bases.mean()):.4g} (bottom) -> f(x) (top)", fontsize=9
    )
    fig.tight_layout()
    return fig


def interaction_summary(
    exp: Explanation,
    *,
    max_display: int = 5,
    feature_names: Sequence[str] | None = None,
    seed: int = 0,
) -> Figure:
    """Beeswarms of SHAP interaction values for the ``max_display`` most important features: cell
    (i, j) shows, per row, the interaction of features i and j counted for both (2 x the value, as
    the pair's total share; the diagonal is the main effect), coloured by feature i's value.
    Needs ``tree_shap(..., interactions=True)``."""
    import matplotlib.pyplot as plt

    from ..errors import OptionError

    values, names, fvals = feature_table(exp, feature_names)
    inter = _interactions(exp)
    if inter is None or inter.shape[1] != values.shape[1]:
        raise OptionError(
            "interaction_summary needs interaction values: explain with "
            "method='tree_shap', interactions=True."
        )
    k = min(max_display, values.shape[1])
    top = np.argsort(-np.abs(values).mean(0), kind="stable")[:k]
    sub = inter[:, top][:, :, top] * (2 - np.eye(k))[None]
    lim = float(np.abs(sub).max()) * 1.05 or 1.0
    rng = np.random.default_rng(seed)
    fig, axes = plt.subplots(
        k,
        k,
        figsize=(2.0 * k + 1.6, 1.25 * k + 1.0),
        sharex=True,
        squeeze=False,
        layout="constrained",
    )
    for a in range(k):
        c = _color_scale(fvals[:, top[a]]) if fvals is not None else np.full(len(values), 0.5)
        for b in range(k):
            ax = axes[a, b]
            perm = rng.permutation(len(values))
            x = sub[perm, a, b]
            cc = c[perm]
            ok = np.isfinite(cc)
            yy = _swarm_offsets(x, width=0.42, bins=40)
            ax.scatter(x[ok], yy[ok], c=cc[ok], cmap="coolwarm", vmin=0, vmax=1, s=5, lw=0)
            if (~ok).any():
                ax.scatter(x[~ok], yy[~ok], color="#999999", s=5, lw=0)
            ax.axvline(0, color="grey", lw=0.5)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-0.5, 0.5)
            ax.set_yticks([])
            ax.tick_params(labelsize=6)
            if a == 0:
                ax.set_title(_label(names[top[b]], 18), fontsize=7)
            if b == 0:
                ax.set_ylabel(
                    _label(names[top[a]], 18), fontsize=7, rotation=0, ha="right", va="center"
                )
    fig.supxlabel(
        f"{exp.method} interaction value (diagonal: main effect; off-diagonal: 2 x the pair's value)",
        fontsize=8,
    )
    return fig


def text_html(exp: Explanation, index: int = 0) -> str:
    """The explained text with each token's background coloured by its attribution (red +, blue -)."""
    tokens = exp.extras.get("tokens")
    if not tokens:
        raise ValueError("text_html needs an explanation of text inputs (extras['tokens']).")
    toks = list(tokens[index])
    vals = np.asarray(exp.extras["values"][index], dtype=np.float64)
    scale = float(np.abs(vals).max()) or 1.0
    spans = []
    for tok, v in zip(toks, vals):
        a = min(1.0, abs(v) / scale)
        rgb = "214,39,40" if v >= 0 else "31,119,180"
        spans.append(
            f'<span title="{v:+.4g}" style="background: rgba({rgb},{a:.3f}); padding: 1px 2px; '
            f'border-radius: 3px">{html.escape(tok)}</span>'
        )
    target = f" for {html.escape(exp.target_names[index])}" if exp.target_names else ""
    return (
        f'<div style="font-family: sans-serif; line-height: 1.9"><div style="font-size: 80%; color: #555">'
        f"{html.escape(exp.method)}{target}: red supports, blue opposes</div>"
        + " ".join(spans)
        + "</div>"
    )


def superpixel_overlay(
    exp: Explanation, image: Any = None, index: int = 0, *, alpha: float = 0.6
) -> Figure:
    """Image, the signed per-feature map (superpixels/patches) and the image with feature boundaries."""
    import matplotlib.pyplot as plt

    from .overlay import to_image_array

    attr = exp.attributions[index].detach().cpu().double()
    amap = attr.mean(0).numpy() if attr.ndim == 3 else attr.numpy()
    bg = image if image is not None else exp.inputs[index] if exp.inputs is not None else None
    img = to_image_array(bg, size=amap.shape) if bg is not None else np.zeros((*amap.shape, 3))
    lim = float(np.abs(amap).max()) or 1.0
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    axes[0].imshow(img)
    axes[0].set_title("input")
    im = axes[1].imshow(amap, cmap="bwr", vmin=-lim, vmax=lim)
    axes[1].set_title(f"{exp.method} (red +, blue -)")
    fig.colorbar(im, ax=axes[1], fraction=0.046)
    axes[2].imshow(img)
    axes[2].imshow(np.clip(amap, 0, None) / lim, cmap="Reds", alpha=alpha, vmin=0, vmax=1)
    masks = exp.extras.get("feature_masks")
    if masks is not None:
        fm = masks[index].detach().cpu().numpy()
        fm = fm[0] if fm.ndim == 3 else fm
        edges = (np.diff(fm, axis=0, prepend=fm[:1]) != 0) | (
            np.diff(fm, axis=1, prepend=fm[:, :1]) != 0
        )
        overlay = np.zeros((*fm.shape, 4))
        overlay[edges] = (1, 1, 0, 0.9)
        axes[2].imshow(overlay)
    axes[2].set_title("positive evidence")
    for ax in axes:
        ax.axis("off")
    if exp.target_names:
        fig.suptitle(exp.target_names[index])
    fig.tight_layout()
    return fig


__all__ = [
    "bar",
    "beeswarm",
    "decision",
    "dependence",
    "feature_table",
    "force",
    "force_html",
    "force_stacked",
    "heatmap",
    "interaction_strength",
    "interaction_summary",
    "scatter",
    "summary",
    "superpixel_overlay",
    "text_html",
    "waterfall",
]
