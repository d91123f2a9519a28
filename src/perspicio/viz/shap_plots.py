"""Plots of feature attributions (Shapley values, LIME, ablation): waterfall, beeswarm, mean-|value|
bar chart, an HTML text highlighter and superpixel/patch overlays for images.

Every plot takes an :class:`~perspicio.Explanation` and returns a matplotlib ``Figure`` (or an
HTML string); nothing is shown or saved here.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from torch import Tensor

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ..core.explanation import Explanation

POS, NEG = "#d62728", "#1f77b4"


def feature_table(exp: Explanation, feature_names: Sequence[str] | None = None) -> tuple[np.ndarray, list[str], np.ndarray | None]:
    """(values (N, M), names (M,), feature values (N, M) or None) of an explanation over features."""
    if "values" in exp.extras:
        vals = [np.asarray(v, dtype=np.float64) for v in exp.extras["values"]]
        if len({len(v) for v in vals}) != 1:
            raise ValueError("samples have different numbers of features; plot them one at a time (exp[i]).")
        values = np.stack(vals)
        stored = exp.extras.get("feature_names")
        names = list(stored[0]) if stored and stored[0] is not None else None
        fv = exp.extras.get("feature_values")
        fvals = np.stack([np.asarray(v.cpu(), dtype=np.float64) for v in fv]) if fv else None
    else:
        a = exp.attributions.detach().cpu().double()
        values = a.reshape(len(a), -1).numpy()
        names = None
        fvals = exp.inputs.detach().cpu().double().reshape(len(a), -1).numpy() if isinstance(exp.inputs, Tensor) else None
        if fvals is not None and fvals.shape != values.shape:
            fvals = None
    if feature_names is not None:
        names = list(feature_names)
    if names is None or len(names) != values.shape[1]:
        names = [f"x{i}" for i in range(values.shape[1])]
    return values, names, fvals


def _base(exp: Explanation, index: int) -> float | None:
    if exp.base_value is None:
        return None
    b = exp.base_value
    return float(b[index]) if isinstance(b, Tensor) and b.ndim else float(b)


def waterfall(exp: Explanation, index: int = 0, *, max_display: int = 10,
              feature_names: Sequence[str] | None = None) -> Figure:
    """How the features move one prediction from the base value E[f] to f(x).

    The ``max_display - 1`` largest |values| get their own bar; the rest are summed in one bar.
    """
    import matplotlib.pyplot as plt

    values, names, fvals = feature_table(exp, feature_names)
    v = values[index]
    base = _base(exp, index)
    start = base if base is not None else 0.0
    order = np.argsort(-np.abs(v))
    shown = order[: max_display - 1] if len(v) > max_display else order
    rest = np.setdiff1d(order, shown)
    items = [(names[i] + (f" = {fvals[index, i]:.4g}" if fvals is not None else ""), v[i]) for i in shown]
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
        ax.text(lo + val, y, f" {val:+.3g} ", va="center", ha="left" if val >= 0 else "right", fontsize=8)
    ax.set_yticks(range(len(items)), [label for label, _ in items], fontsize=8)
    ax.axvline(start, color="grey", lw=0.8, ls="--")
    ax.axvline(cum, color="black", lw=0.8)
    target = f" ({exp.target_names[index]})" if exp.target_names else ""
    ax.set_xlabel(f"model output{target}")
    title = f"f(x) = {cum:.4g}" + (f"   E[f(X)] = {start:.4g}" if base is not None else "")
    ax.set_title(f"{exp.method}: {title}", fontsize=10)
    fig.tight_layout()
    return fig


def beeswarm(exp: Explanation, *, max_display: int = 20, feature_names: Sequence[str] | None = None,
             seed: int = 0) -> Figure:
    """One dot per (sample, feature): x = attribution, colour = the feature's value (low blue, high red)."""
    import matplotlib.pyplot as plt

    values, names, fvals = feature_table(exp, feature_names)
    order = np.argsort(-np.abs(values).mean(0))[:max_display][::-1]
    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(order) + 1.4))
    sc = None
    for y, j in enumerate(order):
        x = values[:, j]
        jitter = (rng.random(len(x)) - 0.5) * 0.5
        if fvals is not None:
            c = fvals[:, j]
            lo, hi = np.percentile(c, 5), np.percentile(c, 95)
            c = np.clip((c - lo) / (hi - lo if hi > lo else 1.0), 0, 1)
            sc = ax.scatter(x, y + jitter, c=c, cmap="coolwarm", vmin=0, vmax=1, s=12)
        else:
            ax.scatter(x, y + jitter, color="grey", s=12)
    ax.axvline(0, color="grey", lw=0.8)
    ax.set_yticks(range(len(order)), [names[j] for j in order], fontsize=8)
    ax.set_xlabel(f"{exp.method} value (impact on the model output)")
    if sc is not None:
        cb = fig.colorbar(sc, ax=ax, ticks=[0, 1], aspect=40)
        cb.ax.set_yticklabels(["low", "high"])
        cb.set_label("feature value")
    fig.tight_layout()
    return fig


def bar(exp: Explanation, *, max_display: int = 20, feature_names: Sequence[str] | None = None) -> Figure:
    """Mean |attribution| per feature over the explained samples (global importance)."""
    import matplotlib.pyplot as plt

    values, names, _ = feature_table(exp, feature_names)
    imp = np.abs(values).mean(0)
    order = np.argsort(-imp)[:max_display][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(order) + 1.2))
    ax.barh(range(len(order)), imp[order], color=POS)
    for y, j in enumerate(order):
        ax.text(imp[j], y, f" {imp[j]:.3g}", va="center", fontsize=8)
    ax.set_yticks(range(len(order)), [names[j] for j in order], fontsize=8)
    ax.set_xlabel(f"mean |{exp.method} value| over {len(values)} samples")
    fig.tight_layout()
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
        spans.append(f'<span title="{v:+.4g}" style="background: rgba({rgb},{a:.3f}); padding: 1px 2px; '
                     f'border-radius: 3px">{html.escape(tok)}</span>')
    target = f" for {html.escape(exp.target_names[index])}" if exp.target_names else ""
    return (f'<div style="font-family: sans-serif; line-height: 1.9"><div style="font-size: 80%; color: #555">'
            f"{html.escape(exp.method)}{target}: red supports, blue opposes</div>" + " ".join(spans) + "</div>")


def superpixel_overlay(exp: Explanation, image: Any = None, index: int = 0, *, alpha: float = 0.6) -> Figure:
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
        edges = (np.diff(fm, axis=0, prepend=fm[:1]) != 0) | (np.diff(fm, axis=1, prepend=fm[:, :1]) != 0)
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


__all__ = ["bar", "beeswarm", "feature_table", "superpixel_overlay", "text_html", "waterfall"]
