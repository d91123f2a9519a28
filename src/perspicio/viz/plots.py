"""Matplotlib figures of explanations (each function returns the Figure)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .overlay import normalize_map, overlay, to_image_array

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
    if exp.target_names:
        parts.append(exp.target_names[index])
    elif exp.targets is not None:
        parts.append(f"class {int(exp.targets[index])}")
    parts.append(f"score {float(exp.scores[index]):.3g}")
    return "\n".join(parts)


def explanation_figure(exp: Explanation, image: Any = None, index: int = 0, *, cmap: str = "jet") -> Figure:
    """Input, heatmap and overlay of sample ``index`` side by side."""
    bg = image if image is not None else exp.inputs[index] if exp.inputs is not None else None
    fig, axes = _figure(1, 3 if bg is not None else 1)
    heat = normalize_map(exp.attributions[index]).cpu().numpy()
    col = 0
    if bg is not None:
        axes[0, 0].imshow(to_image_array(bg))
        axes[0, 0].set_title("input")
        col = 1
    axes[0, col].imshow(heat, cmap=cmap, vmin=0, vmax=1)
    axes[0, col].set_title(_title(exp, index))
    if bg is not None:
        axes[0, 2].imshow(overlay(exp.attributions[index], bg, cmap=cmap))
        axes[0, 2].set_title("overlay")
    return fig


def comparison_figure(
    explanations: Sequence[Explanation], image: Any = None, index: int = 0, *, cmap: str = "jet", title: str | None = None
) -> Figure:
    """One row: the input, then each method's overlay on it (same sample ``index``)."""
    n = len(explanations) + 1
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    fig, axes = _figure(rows, cols)
    first = explanations[0]
    bg = image if image is not None else first.inputs[index] if first.inputs is not None else None
    axes.flat[0].imshow(to_image_array(bg))
    axes.flat[0].set_title(title or "input")
    for ax, exp in zip(list(axes.flat)[1:], explanations):
        ax.imshow(overlay(exp.attributions[index], bg, cmap=cmap))
        ax.set_title(_title(exp, index), fontsize=9)
    return fig
