"""Figures of surrogates: the tree, the depth/fidelity curve, the linear coefficients.

The tree is laid out in inches (the axes span the figure, one data unit = one inch), each box
sized from its longest line, so labels never overlap whatever the names: top-down while the tree
has few leaves, left to right (one leaf per text row) beyond ``wide_leaves``, and cut at the
depth that keeps at most ``max_leaves`` boxes (a cut subtree shows how many leaves it hides).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

FONT = 9.0
CHAR_IN = FONT * 0.6 / 72  # average character width of the sans-serif font, inches
LINE_IN = FONT * 1.35 / 72
PALETTE = (
    "#a6cee3",
    "#fdbf6f",
    "#b2df8a",
    "#fb9a99",
    "#cab2d6",
    "#ffff99",
    "#8dd3c7",
    "#d9d9d9",
    "#bebada",
    "#fccde5",
)


def _pyplot() -> Any:
    import matplotlib.pyplot as plt

    return plt


def _size(text: str, font: float = FONT) -> tuple[float, float]:
    """Width and height in inches of a text box of ``font`` points."""
    lines = text.split("\n")
    scale = font / FONT
    return max(len(s) for s in lines) * CHAR_IN * scale + 0.25, len(lines) * LINE_IN * scale + 0.2


def draw_tree(
    nodes: Sequence[dict[str, Any]],
    *,
    title: str = "",
    class_names: Sequence[str] = (),
    wide_leaves: int = 12,
    max_leaves: int = 64,
) -> Any:
    """A matplotlib Figure of the tree ``nodes`` (``TreeSurrogate.to_dict()["nodes"]``)."""
    plt = _pyplot()
    by_id = {n["id"]: n for n in nodes}
    cut = _cut_depth(by_id, max_leaves)
    shown: list[int] = []
    leaves: list[int] = []

    def walk(i: int) -> None:
        shown.append(i)
        n = by_id[i]
        if n["left"] is None or n["depth"] >= cut:
            leaves.append(i)
            return
        walk(n["left"])
        walk(n["right"])

    walk(0)
    labels = {
        i: _label(by_id[i], by_id[i]["depth"] >= cut and by_id[i]["left"] is not None, by_id)
        for i in shown
    }
    sizes = {i: _size(labels[i]) for i in shown}
    depth = max(by_id[i]["depth"] for i in shown)
    horizontal = len(leaves) > wide_leaves
    pos: dict[int, tuple[float, float]] = {}
    margin = 0.3
    title_w, title_h = _size(title, FONT + 2) if title else (0.0, 0.1)
    title_h += 0.2
    if horizontal:
        col_w = [
            max(sizes[i][0] for i in shown if by_id[i]["depth"] == d) for d in range(depth + 1)
        ]
        gap = 0.5
        content = sum(col_w) + gap * depth
        width = max(margin * 2 + content, title_w + 2 * margin)
        left = (width - content) / 2
        xs = [left + sum(col_w[:d]) + gap * d + col_w[d] / 2 for d in range(depth + 1)]
        row_h = max(sizes[i][1] for i in leaves) + 0.15
        height = margin * 2 + title_h + row_h * len(leaves)
        for k, i in enumerate(leaves):
            pos[i] = (xs[by_id[i]["depth"]], height - title_h - margin - row_h * (k + 0.5))
    else:
        slot = max(sizes[i][0] for i in leaves) + 0.2
        level_h = max(s[1] for s in sizes.values()) + 0.45
        width = max(margin * 2 + slot * len(leaves), title_w + 2 * margin, 4.0)
        height = margin * 2 + title_h + level_h * depth + max(s[1] for s in sizes.values())
        x0 = (width - slot * len(leaves)) / 2
        top = height - title_h - margin - max(s[1] for s in sizes.values()) / 2
        for k, i in enumerate(leaves):
            pos[i] = (x0 + slot * (k + 0.5), top - level_h * by_id[i]["depth"])
    for i in reversed(shown):  # parents after their children
        n = by_id[i]
        if i in pos:
            continue
        (xl, yl), (xr, yr) = pos[n["left"]], pos[n["right"]]
        if horizontal:
            pos[i] = ((xs[n["depth"]]), (yl + yr) / 2)
        else:
            pos[i] = ((xl + xr) / 2, top - level_h * n["depth"])
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    colours = {name: PALETTE[k % len(PALETTE)] for k, name in enumerate(class_names)}
    for i in shown:
        n = by_id[i]
        x, y = pos[i]
        if n["left"] is not None and n["depth"] < cut:
            for child, word in ((n["left"], n["yes"]), (n["right"], n["no"])):
                cx, cy = pos[child]
                if horizontal:
                    start, end = (x + sizes[i][0] / 2, y), (cx - sizes[child][0] / 2, cy)
                else:
                    start, end = (x, y - sizes[i][1] / 2), (cx, cy + sizes[child][1] / 2)
                ax.annotate(
                    "",
                    xy=end,
                    xytext=start,
                    arrowprops={"arrowstyle": "-|>", "color": "#555555", "lw": 0.8},
                )
                mx, my = (start[0] + end[0]) / 2, (start[1] + end[1]) / 2
                ax.text(
                    mx,
                    my,
                    word,
                    fontsize=FONT - 1,
                    ha="center",
                    va="center",
                    color="#333333",
                    bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none"},
                )
        leaf = n["left"] is None
        face = colours.get(str(n["prediction"]), "#eeeeee") if leaf else "#f7f7f7"
        ax.text(
            x,
            y,
            labels[i],
            fontsize=FONT,
            ha="center",
            va="center",
            family="sans-serif",
            bbox={
                "boxstyle": "round,pad=0.3",
                "fc": face,
                "ec": "#444444" if leaf else "#999999",
                "lw": 0.8,
            },
        )
    if title:
        ax.text(
            width / 2, height - margin / 2 - 0.1, title, fontsize=FONT + 2, ha="center", va="top"
        )
    return fig


def _cut_depth(by_id: dict[int, dict[str, Any]], max_leaves: int) -> int:
    """Deepest depth d such that drawing nodes down to d shows at most ``max_leaves`` boxes at the bottom."""
    depth = max(n["depth"] for n in by_id.values())
    for d in range(depth, -1, -1):
        bottom = sum(
            1 for n in by_id.values() if n["depth"] == d or (n["depth"] < d and n["left"] is None)
        )
        if bottom <= max_leaves:
            return d
    return 0


def _count_leaves(i: int, by_id: dict[int, dict[str, Any]]) -> int:
    n = by_id[i]
    return (
        1
        if n["left"] is None
        else _count_leaves(n["left"], by_id) + _count_leaves(n["right"], by_id)
    )


def _label(n: dict[str, Any], cut: bool, by_id: dict[int, dict[str, Any]]) -> str:
    held = n["held_out"]
    if cut:
        return f"{n['question']}\n... {_count_leaves(n['id'], by_id)} leaves not drawn\n{held} held-out rows"
    if n["left"] is not None:
        return f"{n['question']}\n{held} held-out rows"
    pred = n["prediction"]
    head = pred if isinstance(pred, str) else f"score {pred:.4g}"
    if not held:
        return f"{head}\nno held-out rows"
    if n.get("fidelity") is not None:
        return f"{head}\nfidelity {n['fidelity']:.2f} on {held}"
    return f"{head}\nmean |error| {n['error']:.2g} on {held}"


def curve_figure(points: Sequence[dict[str, Any]], *, title: str = "") -> Any:
    """Fidelity (with its interval) and accuracy on the true labels against the tree depth."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4), layout="constrained")
    d = [p["depth"] for p in points]
    f = [p["fidelity"]["value"] for p in points]
    lo = [p["fidelity"]["low"] for p in points]
    hi = [p["fidelity"]["high"] for p in points]
    measure = "agreement" if points[0]["fidelity"]["measure"] == "agreement" else "R^2"
    ax.fill_between(d, lo, hi, color="#1f77b4", alpha=0.2, lw=0, label="95% interval")
    ax.plot(d, f, "o-", color="#1f77b4", label=f"fidelity ({measure} with the model, held-out)")
    acc = [p["accuracy"] for p in points]
    if all(a is not None for a in acc):
        ax.plot(d, acc, "s--", color="#d62728", label="tree accuracy on the true labels")
    for p in points:
        ax.annotate(
            f"{p['leaves']}",
            (p["depth"], p["fidelity"]["value"]),
            textcoords="offset points",
            xytext=(0, -14),
            ha="center",
            fontsize=7,
            color="#555555",
        )
    ax.set_xlabel("max depth (numbers: leaves)")
    ax.set_ylabel(measure)
    ax.set_xticks(d)
    ax.grid(alpha=0.3)
    # below the axes: inside, the legend covered the interval band and the leaf counts
    fig.legend(loc="outside lower center", fontsize=8, ncol=2, frameon=False)
    if title:
        ax.set_title(title, fontsize=10)
    return fig


def coefficient_figure(
    rows: Sequence[tuple[str, Sequence[float]]],
    series: Sequence[str],
    *,
    title: str = "",
    xlabel: str = "",
) -> Any:
    """Horizontal bars: one row per feature, one bar per series (class) - the non-zero coefficients."""
    plt = _pyplot()
    n = max(len(rows), 1)
    longest = max((len(name) for name, _ in rows), default=8)
    fig = plt.figure(
        figsize=(max(7.0, 3.5 + longest * CHAR_IN), 1.6 + 0.32 * n * max(1, len(series)) ** 0.5)
    )
    ax = fig.add_subplot()
    height = 0.8 / max(1, len(series))
    for s, name in enumerate(series):
        ys = [r - 0.4 + height * (s + 0.5) for r in range(len(rows))]
        vals = [v[s] for _, v in rows]
        ax.barh(
            ys,
            vals,
            height=height,
            color=PALETTE[s % len(PALETTE)],
            edgecolor="#444444",
            lw=0.5,
            label=name if len(series) > 1 else None,
        )
    ax.set_yticks(range(len(rows)), [name for name, _ in rows])
    ax.invert_yaxis()
    ax.axvline(0, color="#444444", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    if not rows:
        ax.text(0.5, 0.5, "all coefficients are zero", transform=ax.transAxes, ha="center")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def segment_figure(image: Any, ids: Any, names: Sequence[str], used: set[int]) -> Any:
    """The image (C, H, W) with segment outlines and names; segments in ``used`` outlined in red,
    their names boxed."""
    import numpy as np

    plt = _pyplot()
    img = image.detach().float().cpu()
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-12)
    arr = img.permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    seg = np.asarray(ids)
    h, w = seg.shape
    fig = plt.figure(figsize=(7.0, 7.0 * h / w + 0.6))
    ax = fig.add_axes((0.02, 0.02, 0.96, 0.96 * 7.0 * h / w / (7.0 * h / w + 0.6)))
    ax.imshow(arr[..., :3], interpolation="nearest")
    edge = np.zeros((h, w), dtype=bool)
    edge[:-1] |= seg[:-1] != seg[1:]
    edge[:, :-1] |= seg[:, :-1] != seg[:, 1:]
    hot = np.isin(seg, sorted(used)) & (edge | np.roll(edge, 1, 0) | np.roll(edge, 1, 1))
    overlay = np.zeros((h, w, 4))
    overlay[edge] = (1.0, 1.0, 0.0, 0.8)
    overlay[hot & edge] = (1.0, 0.0, 0.0, 1.0)
    ax.imshow(overlay, interpolation="nearest")
    for k, name in enumerate(names):
        rows, cols = np.nonzero(seg == k)
        if len(rows) == 0:
            continue
        j = np.argmin(
            (rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2
        )  # a pixel inside the segment
        label = (
            name.replace("segment ", "")
            if name.startswith("segment ")
            else name.replace("cell ", "")
        )
        ax.text(
            cols[j],
            rows[j],
            label,
            fontsize=7 if k not in used else 8,
            ha="center",
            va="center",
            color="black" if k in used else "white",
            fontweight="bold" if k in used else "normal",
            bbox={
                "boxstyle": "round,pad=0.15",
                "fc": "#ffdddd" if k in used else "black",
                "ec": "red" if k in used else "none",
                "alpha": 0.85,
            },
        )
    ax.set_axis_off()
    fig.suptitle("segments (red: used by the tree)", fontsize=10, y=0.995, va="top")
    return fig
