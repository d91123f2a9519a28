"""Matplotlib figures of explanations (each function returns the Figure).

Every map gets its own colour scale and colorbar: signed maps diverge around zero (red: evidence
for the target, blue: against), unsigned maps are sequential. Titles name the method, the target
and the score with its unit (``Explanation.score_unit``: logit, probability, margin, ...).
Backgrounds keep the aspect ratio of the source image (:func:`model_view`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .overlay import SIGNED_CMAP, UNSIGNED_CMAP, is_signed, normalize_map, overlay, to_image_array

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

    from ..core.explanation import Explanation

#: colorbar labels of the two scales
SIGNED_LABEL = "value / max |value|  (red for, blue against)"
UNSIGNED_LABEL = "value / max value"


def display_size(model_size: tuple[int, int], source_size: tuple[int, int]) -> tuple[int, int]:
    """(height, width) showing a model input of ``model_size`` (h, w) at the aspect ratio of the
    source image (``source_size`` (h, w)) it was resized from, never shrinking a model pixel:
    the larger of the two per-axis scales is applied to the source."""
    (mh, mw), (sh, sw) = model_size, source_size
    if min(mh, mw, sh, sw) <= 0:
        from ..errors import InputError

        raise InputError(
            f"sizes must be positive; got model {model_size} and source {source_size}."
        )
    s = max(mh / sh, mw / sw)
    return max(1, round(sh * s)), max(1, round(sw * s))


def model_view(
    x: Tensor,
    source_size: tuple[int, int] | None = None,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> np.ndarray:
    """What the model saw, for display: the input ``x`` ((3, H, W) or (1, 3, H, W)) de-normalised
    with ``mean``/``std`` (the preprocessing's; min-max scaled without them), as an (h, w, 3) array
    in [0, 1], resized (bilinear) to the aspect ratio of ``source_size`` (h, w) when given.

    The bundled preprocessing resizes the whole image to the model's square without cropping, so
    the model's input region is the whole image: stretched back to its aspect ratio it is shown
    undistorted, and maps drawn over it are stretched the same way."""
    import torch
    import torch.nn.functional as F

    t = x.detach().float().cpu()
    t = t[0] if t.ndim == 4 else t
    if mean is not None and std is not None:
        m = torch.tensor(list(mean), dtype=t.dtype).view(-1, 1, 1)
        s = torch.tensor(list(std), dtype=t.dtype).view(-1, 1, 1)
        t = (t * s + m).clamp(0, 1)
    if source_size is not None:
        size = display_size(tuple(t.shape[-2:]), tuple(source_size))
        if size != tuple(t.shape[-2:]):
            t = F.interpolate(t[None], size=size, mode="bilinear", align_corners=False)[0].clamp(
                0, 1
            )
    return to_image_array(t)


def _figure(rows: int, cols: int, size: float = 3.0) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    fig = Figure(figsize=(cols * size, rows * size + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def target_text(exp: Explanation, index: int) -> str:
    """The explained target of row ``index``: its class name, 'class N', or 'channel N of LAYER'."""
    neuron = dict(exp.provenance.get("neuron") or {})
    if neuron:
        return f"channel {neuron.get('neuron')} of {neuron.get('layer')}"
    if exp.target_names:
        return str(exp.target_names[index])
    if exp.targets is not None:
        return f"class {int(exp.targets[index])}"
    return "custom target"


def score_text(exp: Explanation, index: int) -> str:
    """'logit 11.04, probability 0.800' (the score with its unit, and the probability when known)."""
    if exp.scores is None or exp.scores.numel() <= index:
        return ""
    text = f"{exp.score_unit} {float(exp.scores[index]):.4g}"
    probs = exp.probabilities
    if probs is not None and exp.score_unit != "probability" and index < len(probs):
        text += f", probability {probs[index]:.3f}"
    return text


def _title(exp: Explanation, index: int) -> str:
    return "\n".join(p for p in (exp.method, target_text(exp, index), score_text(exp, index)) if p)


def _panel(
    fig: Figure, ax: Any, attr: Any, bg: Any, cmap: str | None, *, colorbar: bool = True
) -> None:
    """The map of one explanation over ``bg`` with its own colour scale and colorbar: signed maps
    diverging in [-1, 1] (0 = no evidence), unsigned in [0, 1] (fraction of the map's top value)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    signed = is_signed(attr)
    cm = cmap or (SIGNED_CMAP if signed else UNSIGNED_CMAP)
    if bg is not None:
        ax.imshow(overlay(attr, bg, cmap=cm, positive=not signed))
    else:
        ax.imshow(
            normalize_map(attr, positive=not signed).cpu().numpy(),
            cmap=cm,
            vmin=-1 if signed else 0,
            vmax=1,
        )
    if colorbar:
        bar = fig.colorbar(
            ScalarMappable(Normalize(-1 if signed else 0, 1), cm), ax=ax, fraction=0.046, pad=0.02
        )
        bar.ax.tick_params(labelsize=7)
        bar.set_label(SIGNED_LABEL if signed else UNSIGNED_LABEL, fontsize=7)


def _background(exp: Explanation, image: Any, index: int) -> Any:
    return image if image is not None else exp.inputs[index] if exp.inputs is not None else None


def _aspect(bg: Any, attr: Any) -> float:
    """Width / height of what is drawn: the background's, else the map's."""
    if bg is not None:
        h, w = to_image_array(bg).shape[:2]
    else:
        h, w = attr.shape[-2:]
    return float(w) / float(h)


def explanation_figure(
    exp: Explanation, image: Any = None, index: int = 0, *, cmap: str | None = None
) -> Figure:
    """Input, heatmap and overlay of sample ``index`` side by side, each map with its colorbar
    (``cmap=None``: diverging for signed maps, sequential for unsigned ones). The heatmap is drawn
    at the background's aspect ratio (pass :func:`model_view` of a non-square photo)."""
    import torch.nn.functional as F

    bg = _background(exp, image, index)
    attr = exp.attributions[index]
    aspect = min(max(_aspect(bg, attr), 0.5), 2.5)
    fig, axes = _figure(1, 3 if bg is not None else 1, size=3.0)
    fig.set_size_inches(fig.get_figwidth() * max(aspect, 1.0), fig.get_figheight())
    col = 0
    if bg is not None:
        arr = to_image_array(bg)
        axes[0, 0].imshow(arr)
        axes[0, 0].set_title("input", fontsize=9)
        col = 1
        if tuple(attr.shape[-2:]) != arr.shape[:2]:  # the map at the background's geometry
            a = attr if attr.ndim == 3 else attr[None]
            attr = F.interpolate(
                a[None].float(), size=arr.shape[:2], mode="bilinear", align_corners=False
            )[0]
    _panel(fig, axes[0, col], attr, None, cmap)
    axes[0, col].set_title(_title(exp, index), fontsize=9)
    if bg is not None:
        _panel(fig, axes[0, 2], exp.attributions[index], bg, cmap)
        axes[0, 2].set_title("overlay", fontsize=9)
    return fig


def method_figure(
    exp: Explanation,
    image: Any = None,
    index: int = 0,
    *,
    cmap: str | None = None,
    size: float = 3.2,
) -> Figure:
    """One method's overlay of sample ``index`` with a title (method, target, score with its unit)
    and its colorbar: what ``perspicio explain`` writes as ``<image>_<method>.png``. The drawing
    keeps the background's aspect ratio."""
    from matplotlib.figure import Figure

    bg = _background(exp, image, index)
    attr = exp.attributions[index]
    aspect = min(max(_aspect(bg, attr), 0.4), 3.0)
    fig = Figure(figsize=(size * aspect + 1.1, size + 0.75), layout="constrained")
    ax = fig.add_subplot()
    ax.set_axis_off()
    _panel(fig, ax, attr, bg, cmap)
    ax.set_title(f"{exp.method}: {target_text(exp, index)}\n{score_text(exp, index)}", fontsize=9)
    return fig


def _grid_shape(n: int, max_cols: int = 4) -> tuple[int, int]:
    """(rows, cols) for ``n`` panels: as few rows as ``max_cols`` allows, columns balanced so the
    last row is as full as possible; its empty remainder holds the legend (:func:`comparison_figure`)."""
    rows = -(-n // max_cols)
    return rows, -(-n // rows)


def _legend_text(explanations: Sequence[Explanation], index: int) -> str:
    first = explanations[0]
    lines = [f"target: {target_text(first, index)}"]
    score = score_text(first, index)
    if score:
        lines.append(score)
    lines += ["", "Each map has its own scale:"]
    if any(is_signed(e.attributions[index]) for e in explanations):
        lines.append("signed maps: red for the target,\nblue against, white = 0")
    if any(not is_signed(e.attributions[index]) for e in explanations):
        lines.append("unsigned maps: bright = high,\nas a share of the map's maximum")
    return "\n".join(lines)


def comparison_figure(
    explanations: Sequence[Explanation],
    image: Any = None,
    index: int = 0,
    *,
    cmap: str | None = None,
    title: str | None = None,
) -> Figure:
    """The input, then each method's overlay on it (same sample ``index``) with its colorbar.

    At most 4 panels a row, with the grid shape leaving the fewest empty slots; the slots left in
    the last row hold one legend panel (the target, its score and how to read the colours), so the
    grid has no empty slot. Panels keep the background's aspect ratio."""
    from matplotlib.figure import Figure

    first = explanations[0]
    bg = _background(first, image, index)
    n = len(explanations) + 1
    rows, cols = _grid_shape(n)
    aspect = min(max(_aspect(bg, first.attributions[index]), 0.5), 2.5)
    size = min(3.2, 4.0 / aspect)  # panels at most 4 inches wide
    fig = Figure(
        figsize=(cols * (size * aspect + 0.8), rows * (size + 0.75) + 0.2), layout="constrained"
    )
    grid = fig.add_gridspec(rows, cols)
    axes = [fig.add_subplot(grid[k // cols, k % cols]) for k in range(n)]
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(to_image_array(bg))
    axes[0].set_title(title or "input", fontsize=10)
    for ax, exp in zip(axes[1:], explanations):
        _panel(fig, ax, exp.attributions[index], bg, cmap)
        ax.set_title(_title(exp, index), fontsize=9)
    empty = rows * cols - n
    if empty:
        ax = fig.add_subplot(grid[rows - 1, cols - empty :])
        ax.set_axis_off()
        ax.text(
            0.02,
            0.5,
            _legend_text(explanations, index),
            fontsize=9,
            va="center",
            ha="left",
            transform=ax.transAxes,
            wrap=True,
        )
        ax.set_label("legend")
    return fig
