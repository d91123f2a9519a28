"""Self-contained HTML report of a :class:`~perspicio.metrics.Comparison`, plus its JSON.

One file, no external resources: images are embedded as base64 PNG, curves are
inline SVG. Sections: the methods x metrics table (best per column marked, mean
rank), the explained images with each method's overlay, deletion/insertion
curves, and the sanity-check panel (maps under cascading randomization and their
similarity to the original). The JSON written next to it holds every number.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from ..core.jsonable import write_json
from .overlay import overlay

if TYPE_CHECKING:
    from ..metrics.evaluate import Comparison

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
    "#393b79",
    "#637939",
    "#8c6d31",
    "#843c39",
    "#7b4173",
    "#3182bd",
)

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px;overflow-wrap:anywhere} h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
p{overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%}
table.scores{border-collapse:collapse;font-size:13px}
table.scores th,table.scores td{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
table.scores th{background:#f4f4f4} table.scores td.name{text-align:left;font-weight:600}
td.best{background:#d9f2d9;font-weight:700} td.na{color:#999} td.err{color:#b00;white-space:normal}
.grid{display:flex;flex-wrap:wrap;gap:10px} figure{margin:0;text-align:center;font-size:12px;width:150px}
figure img{width:150px;height:150px;object-fit:contain;border:1px solid #ddd}
figcaption{overflow-wrap:anywhere;line-height:1.35}
.row{display:flex;flex-wrap:wrap;gap:10px;align-items:flex-start;margin-bottom:14px}
.row .label{width:150px;font-weight:600;font-size:13px;overflow-wrap:anywhere}
.small{font-size:12px;color:#555} svg text{font-size:11px;font-family:sans-serif}
svg.chart{max-width:100%;height:auto} figure.chart{width:auto;max-width:100%;text-align:left}
figcaption.charttitle{font-weight:700;font-size:12px;margin:0 0 4px 48px}
"""


def _png(img: Any) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _fmt(v: float) -> str:
    if v is None or not math.isfinite(v):
        return "n/a"
    return f"{v:.4g}"


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


#: width of one character of the charts' 11 px sans-serif text, rounded up (for the layout)
CHAR_PX = 7.0


def line_chart(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    width: int = 420,
    height: int = 260,
    ylim: tuple[float, float] | None = None,
) -> str:
    """An inline SVG line chart of ``{name: (xs, ys)}``, its legend below the plot.

    ``ylim`` is widened to the data, and every curve is clipped to the plot area, so no curve
    leaves its axes; the chart is widened to its longest text, and scales down with the page
    (``viewBox``), so no text is cut."""
    left, right, top, bottom = 48, 16, 8, 36
    xs_all = [x for xs, _ in series.values() for x in xs]
    ys_all = [y for _, ys in series.values() for y in ys if math.isfinite(y)]
    if not xs_all or not ys_all:
        return ""
    longest = max([len(xlabel) + 8] + [len(n) + 6 for n in series])
    width = int(max(width, left + right + CHAR_PX * longest))
    pw, ph = width - left - right, height - top - bottom
    total_h = height + 8 + 16 * len(series)
    x0, x1 = min(xs_all), max(xs_all)
    y0, y1 = ylim if ylim is not None else (min(0.0, min(ys_all)), max(ys_all))
    y0, y1 = min(y0, min(ys_all)), max(y1, max(ys_all))
    if y1 <= y0:
        y1 = y0 + 1.0
    if x1 <= x0:
        x1 = x0 + 1.0

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (1 - (y - y0) / (y1 - y0)) * ph

    clip = "clip" + hashlib.sha1(repr((title, list(series))).encode()).hexdigest()[:10]
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" width="{width}" height="{total_h}" '
        f'viewBox="0 0 {width} {total_h}" role="img" aria-label="{_esc(title)}">',
        f'<clipPath id="{clip}"><rect x="{left}" y="{top}" width="{pw}" height="{ph}"/></clipPath>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>',
    ]
    for t in range(5):
        yv = y0 + (y1 - y0) * t / 4
        parts.append(f'<text x="{left - 4}" y="{py(yv) + 4:.1f}" text-anchor="end">{yv:.2g}</text>')
        xv = x0 + (x1 - x0) * t / 4
        parts.append(
            f'<text x="{px(xv):.1f}" y="{top + ph + 14}" text-anchor="middle">{xv:.2g}</text>'
        )
    parts.append(
        f'<text x="{left + pw / 2}" y="{height - 4}" text-anchor="middle">{_esc(xlabel)}</text>'
    )
    parts.append(
        f'<text x="12" y="{top + ph / 2}" transform="rotate(-90 12 {top + ph / 2})" text-anchor="middle">{_esc(ylabel)}</text>'
    )
    for i, (name, (xs, ys)) in enumerate(series.items()):
        pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in zip(xs, ys) if math.isfinite(y))
        parts.append(
            f'<polyline fill="none" stroke="{_color(i)}" stroke-width="1.6" clip-path="url(#{clip})" points="{pts}"/>'
        )
        ly = height + 8 + 16 * i + 4
        parts.append(
            f'<line x1="{left}" y1="{ly - 4}" x2="{left + 16}" y2="{ly - 4}" stroke="{_color(i)}" stroke-width="3"/>'
        )
        parts.append(f'<text x="{left + 22}" y="{ly}">{_esc(name)}</text>')
    parts.append("</svg>")
    return f'<figure class="chart"><figcaption class="charttitle">{_esc(title)}</figcaption>{"".join(parts)}</figure>'


def _display_images(comp: Comparison, images: Sequence[Any] | None) -> list[Any]:
    n = comp.inputs.shape[0] if comp.inputs is not None else 0
    if images is not None:
        return list(images)
    return [comp.inputs[i] for i in range(n)] if comp.inputs is not None else []


def _table_html(comp: Comparison) -> str:
    best = comp.best()
    ranks = comp.ranks()
    head = "".join(
        f'<th title="{_esc(_metric_summary(m))}">{_esc(m)} {"&uarr;" if comp.higher_is_better(m) else "&darr;"}</th>'
        for m in comp.metrics
    )
    rows = []
    for rec in comp.records():
        m = rec["method"]
        cells = []
        for metric in comp.metrics:
            v = rec[metric]
            reason = comp.not_applicable.get(m, {}).get(metric)
            if reason is not None:
                cells.append(f'<td class="na" title="{_esc(reason)}">n/a</td>')
            elif m in best.get(metric, []) and math.isfinite(v):
                cells.append(
                    f'<td class="best" title="best; rank {ranks[m].get(metric)}">&#9733; {_fmt(v)}</td>'
                )
            else:
                r = ranks[m].get(metric)
                cells.append(f'<td title="rank {r}">{_fmt(v)}</td>')
        rows.append(
            f'<tr><td class="name">{_esc(m)}</td>{"".join(cells)}<td>{_fmt(rec["mean_rank"])}</td><td>{rec["rank"]}</td></tr>'
        )
    for m, msg in comp.errors.items():
        rows.append(
            f'<tr><td class="name">{_esc(m)}</td><td class="err" colspan="{len(comp.metrics) + 2}">{_esc(msg)}</td></tr>'
        )
    return (
        f'<div class="scroll"><table class="scores"><tr><th>method</th>{head}<th>mean rank</th><th>position</th></tr>'
        + "".join(rows)
        + "</table></div>"
        + '<p class="small">&uarr; higher is better, &darr; lower is better; &#9733; marks the best method per column. '
        "Values are means over the inputs; n/a: the metric is not defined for that method (hover for why).</p>"
    )


def _metric_summary(name: str) -> str:
    from ..core.registry import METRICS

    return METRICS.get(name).summary


def _fit(img: Any, size: tuple[int, int] | None) -> Any:
    """A background for maps of ``size`` (h, w): a PIL image is resized to the map's resolution at
    its own aspect ratio (never squashed); arrays and tensors (e.g. ``model_view``) are used as given."""
    from PIL import Image

    if isinstance(img, Image.Image) and size is not None:
        from .plots import display_size

        h, w = display_size(size, (img.height, img.width))
        return img.convert("RGB").resize((w, h), Image.BILINEAR)
    return img


def _images_html(comp: Comparison, images: list[Any]) -> str:
    from PIL import Image

    from .overlay import to_image_array

    out = []
    first = next(iter(comp.explanations.values()), None)
    size = tuple(first.attributions.shape[-2:]) if first is not None else None
    for i, img in enumerate(images):
        figs = []
        background = _fit(img, size)
        arr = to_image_array(background)
        figs.append(
            f'<figure><img src="{_png(Image.fromarray((arr * 255).round().astype("uint8")))}" alt="input {i}"><figcaption>input {i}'
            + (f"<br>target: {_esc(comp.target_names[i])}" if comp.target_names else "")
            + "</figcaption></figure>"
        )
        for m, exp in comp.explanations.items():
            figs.append(
                f'<figure><img src="{_png(overlay(exp.attributions[i], background))}" alt="{_esc(m)}"><figcaption>{_esc(m)}</figcaption></figure>'
            )
        out.append(f'<div class="grid">{"".join(figs)}</div>')
    return "".join(out)


def _curves_html(comp: Comparison) -> str:
    charts = []
    for metric in ("deletion", "insertion", "road"):
        if metric not in comp.metrics:
            continue
        series = {}
        for m in comp.ok_methods:
            r = comp.results.get(m, {}).get(metric)
            if r is None or "curve" not in r.details:
                continue
            curve = r.details["curve"].double().mean(0).tolist()
            xs = [
                float(v)
                for v in (
                    r.details["fraction"].tolist()
                    if isinstance(r.details["fraction"], Tensor)
                    else r.details["fraction"]
                )
            ]
            series[f"{m} ({r.value:.3f})"] = (xs, curve)
        if series:
            score = next(
                iter(
                    r.options.get("score", "probability")
                    for per in comp.results.values()
                    for k, r in per.items()
                    if k == metric
                )
            )
            charts.append(
                line_chart(
                    series,
                    title=f"{metric} curve (mean over inputs; legend: area)",
                    xlabel="fraction of features "
                    + ("inserted" if metric == "insertion" else "removed"),
                    ylabel=f"target {score}",
                )
            )
    return (
        f'<div class="grid">{"".join(charts)}</div>'
        if charts
        else "<p>No deletion/insertion metrics were run.</p>"
    )


def _sanity_html(comp: Comparison, images: list[Any]) -> str:
    if "randomization" not in comp.metrics:
        return "<p>The randomization metric was not run.</p>"
    blocks = []
    charts = {}
    for m in comp.ok_methods:
        r = comp.results.get(m, {}).get("randomization")
        if r is None:
            continue
        exp = comp.explanations[m]
        background = _fit(images[0], tuple(exp.attributions.shape[-2:])) if images else None
        cells = [
            f'<figure><img src="{_png(overlay(exp.attributions[0], background))}" alt="original"><figcaption>original</figcaption></figure>'
        ]
        maps = r.details.get("_cascading_maps")
        casc = r.details.get("cascading")
        layers = r.details.get("layers", [])
        if maps is not None and casc is not None:
            for k in range(maps.shape[0]):
                sp, ss, tk = (float(casc[name][0, k]) for name in ("spearman", "ssim", "topk"))
                upto = layers[k][-1] if layers and layers[k] else ""
                cells.append(
                    f'<figure><img src="{_png(overlay(maps[k][None], background))}" alt="randomized {k + 1}"><figcaption>'
                    f"randomized down to<br><code>{_esc(upto)}</code><br>&rho; {_fmt(sp)}<br>SSIM {_fmt(ss)}<br>top-k {_fmt(tk)}"
                    "</figcaption></figure>"
                )
            charts[m] = (
                list(range(1, casc["spearman"].shape[1] + 1)),
                casc["spearman"].double().nanmean(0).tolist(),
            )
        blocks.append(
            f'<div class="row"><div class="label">{_esc(m)}<br><span class="small">mean similarity {_fmt(r.value)}</span></div>{"".join(cells)}</div>'
        )
    chart = (
        line_chart(
            charts,
            title="cascading randomization: Spearman rank correlation with the original map",
            xlabel="layer groups randomized (output side first)",
            ylabel="Spearman rho",
            width=420,
            ylim=(-0.2, 1.0),
        )
        if charts
        else ""
    )
    return (
        '<p class="small">Sanity check (Adebayo et al. 2018): maps of the first input as the model\'s layers are '
        "randomized from the output towards the input (on a copy of the model). A faithful explanation changes "
        "(low similarity); one that stays the same reflects the input, not the model.</p>"
        + chart
        + "".join(blocks)
    )


def render_html(
    comp: Comparison,
    images: Sequence[Any] | None = None,
    *,
    title: str = "perspicio compare",
    json_name: str | None = None,
    sources: Sequence[str] | None = None,
) -> str:
    """The report as one HTML string (everything embedded)."""
    imgs = _display_images(comp, images)
    meta = [
        f"model: <b>{_esc(comp.model_name)}</b>",
        f"methods: {_esc(', '.join(comp.methods))}",
        f"metrics: {_esc(', '.join(comp.metrics))}",
    ]
    if sources:
        meta.append(f"inputs: {_esc(', '.join(sources))}")
    if json_name:
        meta.append(f"all numbers: <code>{_esc(json_name)}</code>")
    ranking = ", ".join(f"{i}. {_esc(m)}" for i, (m, _) in enumerate(comp.ranking(), start=1))
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{CSS}</style></head><body>'
        f'<h1>{_esc(title)}</h1><p class="small">{" &middot; ".join(meta)}</p>'
        f"<p><b>Ranking by mean rank:</b> {ranking}</p>"
        f"<h2>Scores</h2>{_table_html(comp)}"
        f"<h2>Explanations</h2>{_images_html(comp, imgs)}"
        f"<h2>Deletion / insertion curves</h2>{_curves_html(comp)}"
        f"<h2>Sanity checks</h2>{_sanity_html(comp, imgs)}"
        "</body></html>"
    )


def write_report(
    comp: Comparison,
    path: str | Path,
    images: Sequence[Any] | None = None,
    *,
    title: str = "perspicio compare",
    sources: Sequence[str] | None = None,
) -> tuple[Path, Path]:
    """Write ``path`` (HTML) and ``path`` with suffix .json (every number); return both paths.

    Both are written to temporary names first and renamed, so a failure leaves no half-written file.
    """
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        path = path.with_suffix(".html")
    path.parent.mkdir(parents=True, exist_ok=True)
    json_path = path.with_suffix(".json")
    text = render_html(comp, images, title=title, json_name=json_path.name, sources=sources)
    tmp_html = path.with_name(path.name + ".tmp")
    tmp_html.write_text(text, encoding="utf-8")
    try:
        data = comp.to_dict()
        if sources:
            data["inputs"] = list(sources)
        write_json(json_path, data)
    except BaseException:
        tmp_html.unlink(missing_ok=True)
        raise
    tmp_html.replace(path)
    return path, json_path
