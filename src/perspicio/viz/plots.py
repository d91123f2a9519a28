"""Matplotlib figures of explanations (each function returns the Figure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .overlay import SIGNED_CMAP, UNSIGNED_CMAP, is_signed, normalize_map, overlay, to_image_array

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..core.explanation import Explanation


def _figure(rows: int, cols: int, size: float = 3.0) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    fig = Figure(figsize=(cols * size, rows * size + 0.4), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def _title(exp: Explanation, index: int) -> str:
    parts = [exp.method]
    neuron = dict(exp.provenance.get("neuron") or {})
    if neuron:
        parts.append(f"channel {neuron.get('neuron')} of {neuron.get('layer')}")
    elif exp.target_names:
        parts.append(exp.target_names[index])
    elif exp.targets is not None:
        parts.append(f"class {int(exp.targets[index])}")
    if exp.scores is not None:
        parts.append(f"{'value' if neuron else 'logit'} {float(exp.scores[index]):.4g}")
    return "\n".join(parts)


def _panel(fig: Figure, ax: Any, attr: Any, bg: Any, cmap: str | None, *, colorbar: bool = True) -> None:
    """The map of one explanation over ``bg`` with its own colour scale and colorbar: signed maps
    diverging in [-1, 1] (0 = no evidence), unsigned in [0, 1] (fraction of the map's top value)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    signed = is_signed(attr)
    cm = cmap or (SIGNED_CMAP if signed else UNSIGNED_CMAP)
    if bg is not None:
        ax.imshow(overlay(attr, bg, cmap=cm, positive=not signed))
    else:
        ax.imshow(normalize_map(attr, positive=not signed).cpu().numpy(), cmap=cm,
                  vmin=-1 if signed else 0, vmax=1)
    if colorbar:
        bar = fig.colorbar(ScalarMappable(Normalize(-1 if signed else 0, 1), cm), ax=ax, fraction=0.046, pad=0.02)
        bar.ax.tick_params(labelsize=7)
        bar.set_label("signed, / max |value|" if signed else "/ max value", fontsize=7)


def explanation_figure(exp: Explanation, image: Any = None, index: int = 0, *, cmap: str | None = None) -> Figure:
    """Input, heatmap and overlay of sample ``index`` side by side, each map with its colorbar
    (``cmap=None``: diverging for signed maps, sequential for unsigned ones)."""
    bg = image if image is not None else exp.inputs[index] if exp.inputs is not None else None
    fig, axes = _figure(1, 3 if bg is not None else 1)
    col = 0
    if bg is not None:
        axes[0, 0].imshow(to_image_array(bg))
        axes[0, 0].set_title("input")
        col = 1
    _panel(fig, axes[0, col], exp.attributions[index], None, cmap)
    axes[0, col].set_title(_title(exp, index), fontsize=9)
    if bg is not None:
        _panel(fig, axes[0, 2], exp.attributions[index], bg, cmap)
        axes[0, 2].set_title("overlay", fontsize=9)
    return fig


def comparison_figure(
    explanations: Sequence[Explanation], image: Any = None, index: int = 0, *, cmap: str | None = None,
    title: str | None = None
) -> Figure:
    """The input, then each method's overlay on it (same sample ``index``) with its colorbar;
    at most 4 panels a row, rows balanced so that few grid slots stay empty."""
    n = len(explanations) + 1
    rows = (n + 3) // 4
    cols = (n + rows - 1) // rows
    fig, axes = _figure(rows, cols, size=3.2)
    for ax in list(axes.flat)[n:]:
        fig.delaxes(ax)
    first = explanations[0]
    bg = image if image is not None else first.inputs[index] if first.inputs is not None else None
    axes.flat[0].imshow(to_image_array(bg))
    axes.flat[0].set_title(title or "input")
    for ax, exp in zip(list(axes.flat)[1:], explanations):
        _panel(fig, ax, exp.attributions[index], bg, cmap)
        ax.set_title(_title(exp, index), fontsize=9)
    return fig
