"""Figures for :mod:`perspicio.featurevis` results (each function returns a matplotlib Figure).

No pyplot: figures are built with ``matplotlib.figure.Figure`` (no global state, no GUI).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

from .overlay import colorize

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..featurevis import (
        AttackResult,
        ExplanationChange,
        FeatureMaps,
        InversionResult,
        Kernels,
        MaximizeResult,
        Projection,
        Sensitivity,
        TopActivating,
    )


def _grid(n: int, cols: int | None = None, size: float = 1.6, extra_rows: int = 0) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    cols = cols or max(1, min(n, int(math.ceil(math.sqrt(n)))))
    rows = max(1, int(math.ceil(n / cols))) + extra_rows
    fig = Figure(figsize=(cols * size + 0.4, rows * size + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _img(t: Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W, 3) array for imshow."""
    a = t.detach().float().cpu()
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3:
        a = a.permute(1, 2, 0)
    arr = a.clamp(0, 1).numpy()
    return np.repeat(arr[..., None], 3, axis=2) if arr.ndim == 2 else arr


def _label(labels: Sequence[str] | None, i: int) -> str:
    if labels is not None:
        try:
            return str(i) if str(labels[i]) == str(i) else f"{i} {labels[i]}"
        except (IndexError, TypeError):
            pass
    return str(i)


def kernels_figure(k: Kernels, *, max_filters: int = 64, max_inputs: int = 8) -> Figure:
    """First-layer RGB tiles, or (filters x input channels) grey tiles for deeper layers."""
    n = min(len(k.tiles), max_filters)
    if k.rgb:
        fig, axes = _grid(n, size=0.9)
        for i in range(n):
            axes.flat[i].imshow(k.tiles[i].numpy(), interpolation="nearest")
    else:
        cin = min(k.tiles.shape[1], max_inputs)
        fig, axes = _grid(n * cin, cols=cin, size=0.9)
        for i in range(n):
            for j in range(cin):
                axes[i, j].imshow(k.tiles[i, j].numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    fig.suptitle(f"kernels of {k.layer} ({'RGB' if k.rgb else 'per input channel'}; grey = 0)")
    return fig


def feature_maps_figure(fm: FeatureMaps, *, overlay: bool = True, cmap: str = "viridis") -> Figure:
    """The input, then each chosen channel's map (overlaid on the input when ``overlay``)."""
    n = len(fm.channels) + 1
    fig, axes = _grid(n, size=1.8)
    axes.flat[0].imshow(_img(fm.pixels))
    axes.flat[0].set_title("input", fontsize=8)
    bg = _img(fm.pixels)
    for a, (c, m, placed, mean) in enumerate(zip(fm.channels.tolist(), fm.maps, fm.placed, fm.means.tolist())):
        ax = axes.flat[a + 1]
        if overlay:
            p = placed.float()
            lo, hi = float(p.min()), float(p.max())
            heat = colorize(((p - lo) / max(hi - lo, 1e-12)).cpu().numpy(), cmap)
            ax.imshow(0.3 * bg + 0.7 * heat)
        else:
            ax.imshow(m.cpu().numpy(), cmap=cmap)
        ax.set_title(f"ch {c} (mean {mean:.2g})", fontsize=8)
    fig.suptitle(f"feature maps of {fm.layer}")
    return fig


def top_activating_figure(r: TopActivating) -> Figure:
    """Top row: the top-k inputs with the receptive-field box; bottom row: the patches."""
    from matplotlib.patches import Rectangle

    k = len(r.values)
    fig, axes = _grid(2 * k, cols=k, size=1.6)
    for i in range(k):
        ax = axes[0, i]
        ax.imshow(_img(r.pixels[i]))
        t, left, b, rt = r.boxes[i]
        ax.add_patch(Rectangle((left - 0.5, t - 0.5), rt - left, b - t, fill=False, edgecolor="red", linewidth=1.5))
        src = r.sources[i]
        ax.set_title(f"{float(r.values[i]):.3g}\n{src[-18:]}", fontsize=7)
        axes[1, i].imshow(_img(r.patches[i]), interpolation="nearest")
    fig.suptitle(f"top-{k} for {r.unit.describe()} of {r.layer} ({r.scanned} scanned, {len(r.skipped)} skipped)")
    return fig


def maximize_figure(res: MaximizeResult, labels: Sequence[str] | None = None) -> Figure:
    """The synthesised images (with their top class) and the objective per step."""
    n = len(res.pixels)
    cols = min(n, 5)
    fig, axes = _grid(n + cols, cols=cols, size=2.2)
    for i in range(n):
        ax = axes.flat[i]
        ax.imshow(_img(res.pixels[i]), interpolation="nearest" if res.pixels.shape[-1] <= 32 else None)
        if res.probabilities is not None:
            p, c = res.probabilities[i].max(0)
            ax.set_title(f"top: {_label(labels, int(c))[:22]}\np={float(p):.3f}", fontsize=8)
    rows = axes.shape[0]
    for ax in axes[rows - 1]:
        ax.remove()
    gs = axes[0, 0].get_gridspec()
    ax = fig.add_subplot(gs[rows - 1, :])
    ax.plot(res.history.numpy())
    ax.set_xlabel("step")
    ax.set_ylabel("objective")
    ax.set_title(res.description, fontsize=8)
    return fig


def inversion_figure(res: InversionResult) -> Figure:
    """Original, reconstruction, and the loss per step."""
    n = len(res.pixels)
    fig, axes = _grid(3 * n, cols=3, size=2.4)
    for i in range(n):
        axes[i, 0].imshow(_img(res.original[i]))
        axes[i, 0].set_title("original", fontsize=8)
        axes[i, 1].imshow(_img(res.pixels[i]))
        axes[i, 1].set_title(f"from {res.layer}\ncos {float(res.cosine[i]):.3f}", fontsize=8)
        axes[i, 2].set_axis_on()
        axes[i, 2].semilogy(res.history.numpy())
        axes[i, 2].set_xlabel("step", fontsize=7)
        axes[i, 2].set_title("loss", fontsize=8)
    return fig


def projection_figure(p: Projection, *, color_by: str = "label", thumbnails: bool = True, labels: Sequence[str] | None = None, max_thumbs: int = 60) -> Figure:
    """Scatter of the projected points coloured by label or prediction, with image thumbnails."""
    from matplotlib.figure import Figure
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    fig = Figure(figsize=(7.5, 6.5), layout="constrained")
    ax = fig.subplots()
    colors = p.labels if color_by == "label" and p.labels is not None else p.predictions
    xy = p.coords.numpy()
    if colors is not None:
        sc = ax.scatter(xy[:, 0], xy[:, 1], c=colors.numpy(), cmap="tab10" if int(colors.max()) < 10 else "tab20", s=10)
        classes = sorted(set(colors.tolist()))
        if len(classes) <= 20:
            handles = [sc.legend_elements()[0][i] for i in range(len(sc.legend_elements()[0]))]
            names = [str(labels[c]) if labels is not None and c < len(labels) else str(c) for c in classes]
            ax.legend(handles, [n[:18] for n in names][: len(handles)], fontsize=7, loc="best",
                      title=color_by if color_by == "label" and p.labels is not None else "prediction")
    else:
        sc = ax.scatter(xy[:, 0], xy[:, 1], s=10)
    if thumbnails and p.thumbnails is not None:
        step = max(1, len(xy) // max_thumbs)
        cmap = sc.get_cmap() if colors is not None else None
        for i in range(0, len(xy), step):
            box = OffsetImage(_img(p.thumbnails[i]), zoom=1.5 if p.thumbnails.shape[-1] <= 16 else 0.7)
            edge = cmap(sc.norm(float(colors[i]))) if cmap is not None else "black"
            ax.add_artist(AnnotationBbox(box, (xy[i, 0], xy[i, 1]), frameon=True, pad=0.15,
                                         bboxprops={"edgecolor": edge, "linewidth": 1.5}))
    title = f"{p.method.upper()} of {p.layer} ({len(xy)} items)"
    if p.explained_variance is not None:
        title += f"; variance explained {100 * float(p.explained_variance.sum()):.1f}%"
    ax.set_title(title)
    return fig


def sensitivity_figure(s: Sensitivity) -> Figure:
    """Occlusion map over the input, and the score/probability curves for scale, shift, rotation."""
    from matplotlib.figure import Figure

    n = (1 if s.occlusion is not None else 0) + len(s.curves)
    fig = Figure(figsize=(3.4 * max(n, 1), 3.4), layout="constrained")
    axes = fig.subplots(1, max(n, 1), squeeze=False)[0]
    a = 0
    if s.occlusion is not None:
        ax = axes[0]
        ax.imshow(_img(s.pixels))
        drop = (s.base_score - s.occlusion.placed).numpy()  # > 0 where occluding hurts the score
        m = float(abs(drop).max()) or 1.0
        im = ax.imshow(drop, cmap="RdBu_r", alpha=0.6, vmin=-m, vmax=m)
        fig.colorbar(im, ax=ax, shrink=0.8)
        ax.set_title(f"score drop when occluded\n(window {s.occlusion.window}, base {s.base_score:.3g})", fontsize=8)
        ax.set_axis_off()
        a = 1
    units = {"scale": "zoom factor", "translation": "horizontal shift (fraction of width)", "rotation": "angle (degrees)"}
    for name, c in s.curves.items():
        ax = axes[a]
        ax.plot(c.values.numpy(), c.scores.numpy(), "o-", label="score")
        ax.set_xlabel(units.get(name, name), fontsize=8)
        ax.set_ylabel("target score", fontsize=8)
        if c.probabilities is not None:
            ax2 = ax.twinx()
            ax2.plot(c.values.numpy(), c.probabilities.numpy(), "s--", color="tab:orange", label="probability")
            ax2.set_ylim(0, 1)
            ax2.set_ylabel("probability", fontsize=8)
        ax.set_title(name, fontsize=9)
        a += 1
    fig.suptitle(f"sensitivity of {s.target}")
    return fig


def adversarial_figure(res: AttackResult, change: ExplanationChange | None = None, labels: Sequence[str] | None = None, index: int = 0) -> Figure:
    """Clean image, adversarial image, amplified perturbation and (optionally) the other
    method's explanation of the clean and adversarial images side by side."""
    from .overlay import overlay

    cols = 3 + (3 if change is not None else 0)
    fig, axes = _grid(cols, cols=cols, size=2.4)
    i = index
    b, a = int(res.before[i]), int(res.after[i])
    axes[0, 0].imshow(_img(res.pixels[i]))
    axes[0, 0].set_title(f"clean: {_label(labels, b)[:20]}\np={float(res.before_prob[i]):.3f}", fontsize=8)
    axes[0, 1].imshow(_img(res.adversarial[i]))
    axes[0, 1].set_title(f"{res.method.upper()} {res.norm}: {_label(labels, a)[:20]}\np={float(res.after_prob[i]):.3f}", fontsize=8)
    d = res.perturbation[i]
    m = float(d.abs().max()) or 1.0
    axes[0, 2].imshow(_img(d / (2 * m) + 0.5))
    axes[0, 2].set_title(f"perturbation x{0.5 / m:.0f}\nLinf {float(res.linf[i]) * 255:.2f}/255, L2 {float(res.l2[i]):.3f}", fontsize=8)
    if change is not None:
        bg = res.pixels[i]
        for col, (e, title) in enumerate(((change.clean, f"{change.method}: clean, class {b}"),
                                           (change.adversarial_same, f"adversarial, class {b}\nr={change.correlation_same:.2f}"),
                                           (change.adversarial_new, f"adversarial, class {a}\nr={change.correlation_new:.2f}"))):
            axes[0, 3 + col].imshow(overlay(e.attributions[0], _img(bg)))
            axes[0, 3 + col].set_title(title, fontsize=8)
    return fig


__all__ = [
    "adversarial_figure", "feature_maps_figure", "inversion_figure", "kernels_figure", "maximize_figure",
    "projection_figure", "sensitivity_figure", "top_activating_figure",
]
