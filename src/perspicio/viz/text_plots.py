"""Pictures of text explanations: token heatmaps (HTML and PNG), attention matrices per layer and
head (PNG), and the lines view of attention (a self-contained HTML page, no external scripts).

Attributions are shown raw-signed: red for positive, blue for negative, the colour strength the
value over the largest absolute value of the text (attention-family maps are non-negative and
are shown min-max scaled, since rollout and gradient-weighted relevance carry a constant floor).
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from torch import Tensor

from ..core.explanation import Explanation
from ..errors import InputError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "attention_matrix_figure",
    "lines_view_html",
    "token_heatmap_figure",
    "token_heatmap_html",
    "token_values",
]

#: attribution methods whose maps are non-negative relevance with a floor (shown min-max scaled)
NONNEGATIVE_METHODS = (
    "attention",
    "attention_rollout",
    "attention_flow",
    "transformer_attribution",
)


def token_values(exp: Explanation, index: int = 0) -> tuple[list[str], np.ndarray]:
    """Token strings of text ``index`` and their display values in [-1, 1]."""
    tokens = exp.extras.get("tokens")
    if tokens is None:
        raise InputError(
            "this explanation has no tokens: token pictures need an explanation of text."
        )
    toks = list(tokens[index])
    a = exp.attributions[index, : len(toks)].detach().double().cpu().numpy()
    if exp.method in NONNEGATIVE_METHODS:
        lo, hi = a.min(), a.max()
        v = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    else:
        m = np.abs(a).max()
        v = a / m if m > 0 else np.zeros_like(a)
    return toks, v


def _rgba(v: float) -> tuple[float, float, float, float]:
    return (0.84, 0.15, 0.16, abs(v)) if v >= 0 else (0.13, 0.40, 0.80, abs(v))


def _title(exp: Explanation, index: int) -> str:
    target = ""
    if exp.target_names:
        target = f" - target {exp.target_names[index]}"
    elif "target_fn" in exp.extras:
        target = f" - target {getattr(exp.extras['target_fn'], 'name', '') or ''}".rstrip()
    score = float(exp.scores[index]) if exp.scores.numel() > index else float("nan")
    unit = exp.score_unit if exp.score_unit != "output" else "model output"
    return f"{exp.method}{target}" + ("" if np.isnan(score) else f" ({unit} {score:.3f})")


def token_heatmap_html(exp: Explanation, index: int = 0, *, full_page: bool = True) -> str:
    """The tokens of text ``index`` on coloured backgrounds; hovering shows the raw value."""
    toks, v = token_values(exp, index)
    raw = exp.attributions[index, : len(toks)].tolist()
    spans = []
    for t, val, r in zip(toks, v, raw):
        c = _rgba(float(val))
        color = f"rgba({int(c[0] * 255)},{int(c[1] * 255)},{int(c[2] * 255)},{c[3]:.3f})"
        spans.append(
            f'<span class="tok" style="background:{color}" title="{html.escape(t)}: {r:.6g}">'
            f"{html.escape(t)}</span>"
        )
    body = (
        f'<div class="heat"><div class="title">{html.escape(_title(exp, index))}</div>'
        f'<div class="tokens">{" ".join(spans)}</div></div>'
    )
    if not full_page:
        return body
    style = (
        "body{font-family:sans-serif;margin:1.5em}.title{font-weight:bold;margin-bottom:.6em}"
        ".tokens{line-height:2.2em;font-family:monospace;font-size:15px}"
        ".tok{padding:.15em .3em;border-radius:3px;border:1px solid #ddd}"
    )
    return f"<!DOCTYPE html><html><head><meta charset='utf-8'><style>{style}</style></head><body>{body}</body></html>"


def token_heatmap_figure(exp: Explanation, index: int = 0, *, per_row: int = 10) -> Figure:
    """The tokens of text ``index`` as coloured cells, ``per_row`` to a row, with a colour bar."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LinearSegmentedColormap, Normalize
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    toks, v = token_values(exp, index)
    rows = (len(toks) + per_row - 1) // per_row
    width = max(len(t) for t in toks) * 0.12 + 0.35
    cols = min(per_row, len(toks))
    # inches: 0.5 title on top, the token rows, 0.95 for the colour bar and its labels below
    fig_w, grid_h = max(4.0, cols * width + 0.6), rows * 0.55
    fig_h = grid_h + 1.45
    fig = Figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes((0.3 / fig_w, 0.95 / fig_h, (fig_w - 0.6) / fig_w, grid_h / fig_h))
    ax.set_xlim(0, cols * width)
    ax.set_ylim(rows * 0.55, 0)
    ax.axis("off")
    for k, (t, val) in enumerate(zip(toks, v)):
        r, c = divmod(k, per_row)
        ax.add_patch(
            Rectangle(
                (c * width + 0.03, r * 0.55 + 0.05),
                width - 0.06,
                0.45,
                facecolor=_rgba(float(val)),
                edgecolor="#cccccc",
                linewidth=0.6,
            )
        )
        ax.text(
            c * width + width / 2,
            r * 0.55 + 0.28,
            t,
            ha="center",
            va="center",
            family="monospace",
            fontsize=10,
        )
    ax.set_title(_title(exp, index), fontsize=10)
    cmap = LinearSegmentedColormap.from_list(
        "rb", [(0.13, 0.40, 0.80), (1, 1, 1), (0.84, 0.15, 0.16)]
    )
    cax = fig.add_axes((0.3, 0.55 / fig_h, 0.4, 0.12 / fig_h))
    bar = fig.colorbar(
        ScalarMappable(norm=Normalize(-1, 1), cmap=cmap),
        cax=cax,
        orientation="horizontal",
    )
    scaled = "min-max scaled" if exp.method in NONNEGATIVE_METHODS else "/ max |value|"
    bar.set_label(f"attribution ({scaled})", fontsize=8)
    bar.set_ticks([-1, -0.5, 0, 0.5, 1])
    bar.ax.tick_params(labelsize=7)
    return fig


def _stack(source: Explanation | Tensor, index: int) -> Tensor:
    """(L, heads, T, T) attention of text ``index``."""
    if isinstance(source, Explanation):
        att = source.extras.get("attentions")
        if att is None:
            raise InputError("this explanation holds no attention weights: use method='attention'.")
        source = att[index]
    if not isinstance(source, Tensor) or source.ndim != 4:
        raise InputError("attention must be (layers, heads, T, T).")
    return source.detach().float().cpu()


def _tokens(source: Explanation | Tensor, tokens: Sequence[str] | None, index: int) -> list[str]:
    if tokens is None and isinstance(source, Explanation):
        tokens = source.extras.get("tokens", [None])[index]
    if tokens is None:
        raise InputError("pass the token strings (tokens=...).")
    return list(tokens)


def attention_matrix_figure(
    source: Explanation | Tensor,
    tokens: Sequence[str] | None = None,
    *,
    index: int = 0,
    layer: int | None = None,
    cols: int = 4,
) -> Figure:
    """Token-to-token attention matrices: one panel per layer (mean over heads) when ``layer`` is
    None, else one panel per head of ``layer`` plus their mean. Rows are queries, columns keys."""
    from matplotlib.figure import Figure

    att = _stack(source, index)
    toks = _tokens(source, tokens, index)
    t = len(toks)
    att = att[:, :, :t, :t]
    if layer is None:
        panels = [(f"layer {i} (mean of heads)", att[i].mean(0)) for i in range(att.shape[0])]
    else:
        a = att[layer]
        panels = [(f"layer {layer % att.shape[0]} head {h}", a[h]) for h in range(a.shape[0])]
        panels.append((f"layer {layer % att.shape[0]} mean", a.mean(0)))
    cols = min(cols, len(panels))
    rows = (len(panels) + cols - 1) // cols
    side = max(2.6, 0.16 * t + 1.4)
    fig = Figure(figsize=(cols * side, rows * side), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    fs = 8 if t <= 24 else 6 if t <= 40 else 4
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.axis("off")
            continue
        name, m = panels[k]
        im = ax.imshow(m.numpy(), cmap="viridis", vmin=0, vmax=float(m.max()) or 1.0)
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(t), toks, rotation=90, fontsize=fs)
        ax.set_yticks(range(t), toks, fontsize=fs)
        fig.colorbar(im, ax=ax, shrink=0.7)
    return fig


_LINES_JS = """
const D=JSON.parse(document.getElementById('data').textContent);
const L=D.att.length,H=D.att[0].length,T=D.tokens.length;
const sel=(id,n,lab,extra)=>{const s=document.getElementById(id);if(extra){const o=document.createElement('option');
o.value=-1;o.text=extra;s.appendChild(o);}for(let i=0;i<n;i++){const o=document.createElement('option');o.value=i;
o.text=lab+' '+i;s.appendChild(o);}s.onchange=draw;return s;};
const ls=sel('layer',L,'layer'),hs=sel('head',H,'head','mean of heads');ls.value=L-1;hs.value=-1;
let focus=-1;
function mat(){const l=+ls.value,h=+hs.value;if(h>=0)return D.att[l][h];
const m=[];for(let i=0;i<T;i++){m.push([]);for(let j=0;j<T;j++){let s=0;for(let k=0;k<H;k++)s+=D.att[l][k][i][j];
m[i].push(s/H);}}return m;}
function draw(){const svg=document.getElementById('svg');const rowH=22,W=460;svg.setAttribute('height',T*rowH+20);
let g='';const m=mat();for(let i=0;i<T;i++){for(let j=0;j<T;j++){const w=m[i][j];if(w<0.01)continue;
if(focus>=0&&i!==focus)continue;const y1=i*rowH+15,y2=j*rowH+15;
g+=`<line x1="150" y1="${y1}" x2="${W-150}" y2="${y2}" stroke="#d62728" stroke-opacity="${Math.min(1,w)}" stroke-width="2"/>`;}}
for(let i=0;i<T;i++){const y=i*rowH+19,b=i===focus?'bold':'normal';
g+=`<text x="140" y="${y}" text-anchor="end" font-weight="${b}" data-i="${i}" class="q">${D.tokens[i]}</text>`;
g+=`<text x="${W-140}" y="${y}" text-anchor="start">${D.tokens[i]}</text>`;}
svg.innerHTML=g;svg.querySelectorAll('.q').forEach(e=>{e.onmouseenter=()=>{focus=+e.dataset.i;draw();};
e.onmouseleave=()=>{focus=-1;draw();};});}
draw();
"""


def lines_view_html(
    source: Explanation | Tensor,
    tokens: Sequence[str] | None = None,
    *,
    index: int = 0,
    title: str = "",
) -> str:
    """The lines view of attention (as bertviz popularised it): queries on the left, keys on the
    right, a line per weight (opacity = weight), a layer and head chooser, hover a query token to see
    only its lines. One self-contained HTML page: the weights are embedded, no external scripts."""
    att = _stack(source, index)
    toks = _tokens(source, tokens, index)
    t = len(toks)
    data = {
        "tokens": [html.escape(s) for s in toks],
        "att": np.round(att[:, :, :t, :t].numpy(), 4).tolist(),
    }
    payload = json.dumps(data).replace("</", "<\\/")
    head = html.escape(title or "attention: lines view")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>" + head + "</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}svg text{font-family:monospace;font-size:13px}"
        ".q{cursor:pointer}</style></head><body>"
        f"<h3>{head}</h3><p>Left: query tokens (hover one to isolate it); right: the tokens attended to. "
        "Line opacity = attention weight (weights below 0.01 not drawn).</p>"
        "<label>Layer <select id='layer'></select></label> <label>Head <select id='head'></select></label>"
        "<div><svg id='svg' width='460'></svg></div>"
        f"<script type='application/json' id='data'>{payload}</script><script>{_LINES_JS}</script></body></html>"
    )
