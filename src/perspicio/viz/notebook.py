"""Notebook display (``_repr_html_``) of explanations and comparisons: self-contained HTML (inline
base64 PNG, inline styles, no external assets), bounded in size (the first few rows of a large
batch, then "and N more"). The objects' ``_repr_html_`` catch any error and fall back to text."""

from __future__ import annotations

import base64
import html
import io
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..core.explanation import Explanation
    from ..metrics.evaluate import Comparison

#: rows (images, texts, table rows) drawn in full before "and N more"
MAX_ITEMS = 4
#: table rows of a tabular explanation
MAX_ROWS = 10
#: features listed per tabular row
TOP_FEATURES = 3
#: resolution of the inline figures
DPI = 72

_STYLE = "font-family:system-ui,sans-serif;font-size:13px;border-collapse:collapse;margin:4px 0"
_CELL = "border:1px solid #ccc;padding:2px 6px;text-align:left"


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def png_data_uri(fig: Any, dpi: int = DPI) -> str:
    """A matplotlib figure as a ``data:image/png;base64`` URI (pyplot figures are closed)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    try:
        import matplotlib.pyplot as plt

        plt.close(fig)  # figures made with pyplot (shap_plots) stay registered otherwise
    except Exception:  # pragma: no cover - pyplot unavailable: nothing was registered
        pass
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(fig: Any, alt: str) -> str:
    return f'<img src="{png_data_uri(fig)}" alt="{_esc(alt)}" style="max-width:100%;height:auto">'


def _more(n: int, shown: int, what: str) -> str:
    return f"<p><i>and {n - shown} more {what}</i></p>" if n > shown else ""


def _table(head: list[str], rows: list[list[str]]) -> str:
    th = "".join(f'<th style="{_CELL};background:#f4f4f4">{_esc(h)}</th>' for h in head)
    body = "".join(
        "<tr>" + "".join(f'<td style="{_CELL}">{c}</td>' for c in r) + "</tr>" for r in rows
    )
    return f'<table style="{_STYLE}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def _header(exp: Explanation) -> str:
    layer = f" &middot; layer <code>{_esc(exp.layer)}</code>" if exp.layer else ""
    return (
        f"<div><b>{_esc(exp.method)}</b> &middot; {len(exp)} row{'s' if len(exp) != 1 else ''} &middot; "
        f"attributions {_esc(tuple(exp.attributions.shape))}{layer}</div>"
    )


def _score_head(exp: Explanation) -> list[str]:
    """Column names of the per-row score cells (:func:`_score_cells`)."""
    probs = exp.probabilities
    head = ["row", "target", exp.score_unit] + (
        ["probability"] if probs and exp.score_unit != "probability" else []
    )
    head += ["base value"] if exp.base_value is not None else []
    return head


def _score_cells(exp: Explanation, i: int) -> list[str]:
    """Row ``i``: index, target, score, probability (when the score is not one), base value."""
    from .plots import target_text

    probs = exp.probabilities
    row = [str(i), _esc(target_text(exp, i)), f"{float(exp.scores[i]):.4g}"]
    if probs and exp.score_unit != "probability":
        row.append(f"{probs[i]:.3f}")
    if exp.base_value is not None:
        b = exp.base_value
        row.append(f"{float(b[i] if getattr(b, 'ndim', 0) else b):.4g}")
    return row


def _score_rows(exp: Explanation, shown: int) -> str:
    return _table(_score_head(exp), [_score_cells(exp, i) for i in range(shown)])


def _image_html(exp: Explanation) -> str:
    from .plots import method_figure

    n = len(exp)
    shown = min(n, MAX_ITEMS)
    imgs = "".join(_img(method_figure(exp, index=i), f"{exp.method} row {i}") for i in range(shown))
    return (
        _header(exp)
        + f'<div style="display:flex;flex-wrap:wrap;gap:6px">{imgs}</div>'
        + _score_rows(exp, shown)
        + _more(n, shown, "rows (index the explanation: exp[i])")
    )


def _text_html(exp: Explanation) -> str:
    from .text_plots import token_heatmap_html

    n = len(exp)
    shown = min(n, MAX_ITEMS)
    parts = []
    for i in range(shown):
        try:
            parts.append(token_heatmap_html(exp, i, full_page=False))
        except Exception:  # model-agnostic text explanations keep their values in extras
            from .shap_plots import text_html

            parts.append(text_html(exp, i))
    style = (
        "<style>.perspicio-text .tokens{line-height:2.2em;font-family:monospace}"
        ".perspicio-text .tok{padding:.1em .3em;border-radius:3px;border:1px solid #ddd}"
        ".perspicio-text .title{font-weight:bold}</style>"
    )
    return (
        style
        + _header(exp)
        + f'<div class="perspicio-text">{"".join(parts)}</div>'
        + _score_rows(exp, shown)
        + _more(n, shown, "texts")
    )


def _tabular_html(exp: Explanation) -> str:
    import numpy as np

    from .shap_plots import beeswarm, feature_table, waterfall

    values, names, fvals = feature_table(exp)
    n = len(values)
    shown = min(n, MAX_ROWS)
    head = _score_head(exp)
    head.append(f"top {TOP_FEATURES} features (value: attribution)")
    rows = []
    for i in range(shown):
        row = _score_cells(exp, i)
        top = np.argsort(-np.abs(values[i]), kind="stable")[:TOP_FEATURES]
        row.append(
            ", ".join(
                f"{_esc(names[j])}"
                + (f" = {fvals[i, j]:.4g}" if fvals is not None else "")
                + f": {values[i, j]:+.3g}"
                for j in top
            )
        )
        rows.append(row)
    fig = beeswarm(exp) if n > 1 else waterfall(exp, 0)
    what = "summary (beeswarm) of every row" if n > 1 else "waterfall of row 0"
    return (
        _header(exp)
        + _table(head, rows)
        + _more(n, shown, "rows")
        + f"<div><small>{what}</small><br>{_img(fig, what)}</div>"
    )


def explanation_html(exp: Explanation) -> str:
    """The notebook HTML of an explanation: overlays with titles and colorbars and the scores with
    their unit (images), token heatmaps (text), a table and a summary/waterfall figure (tabular)."""
    if exp.is_image:
        return _image_html(exp)
    if exp.extras.get("tokens") is not None:
        return _text_html(exp)
    return _tabular_html(exp)


def comparison_html(comp: Comparison) -> str:
    """The notebook HTML of a :class:`~perspicio.metrics.Comparison`: the methods x metrics table
    (best per column marked) and the comparison figure of the first input."""
    from .plots import comparison_figure

    metrics = list(comp.metrics)
    best = comp.best()
    head = (
        ["method"]
        + [f"{m} {'↑' if comp.higher_is_better(m) else '↓'}" for m in metrics]
        + ["mean rank"]
    )
    rows = []
    for rec in comp.records():
        m = rec["method"]
        cells = [f"<b>{_esc(m)}</b>"]
        for metric in metrics:
            v = rec[metric]
            txt = "n/a" if not math.isfinite(v) else f"{v:.4g}"
            cells.append(
                f"<b>&#9733; {txt}</b>" if m in best.get(metric, []) and math.isfinite(v) else txt
            )
        cells.append("n/a" if not math.isfinite(rec["mean_rank"]) else f"{rec['mean_rank']:.3g}")
        rows.append(cells)
    rows += [
        [f"<b>{_esc(m)}</b>", f"failed: {_esc(msg)}"] + [""] * len(metrics)
        for m, msg in comp.errors.items()
    ]
    out = (
        f"<div><b>Comparison</b> of {len(comp.methods)} methods on {_esc(comp.model_name) or 'the model'} "
        f"({'' if comp.inputs is None else len(comp.inputs)} input{'s' if comp.inputs is None or len(comp.inputs) != 1 else ''})"
        "; &#9733; best per column, ↑ higher is better, ↓ lower is better</div>"
        + _table(head, rows)
    )
    exps = [comp.explanations[m] for m in comp.methods if m in comp.explanations]
    image_exps = [e for e in exps if e.is_image][:11]
    if image_exps:
        out += _img(comparison_figure(image_exps, index=0), "comparison of the first input")
        if comp.inputs is not None and len(comp.inputs) > 1:
            out += f"<p><i>first input shown; and {len(comp.inputs) - 1} more (write_report shows every input)</i></p>"
    return out
