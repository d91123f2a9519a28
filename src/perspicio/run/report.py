"""An HTML report of a run store: what the model relies on across the whole data set.

One self-contained file (figures embedded as PNG, no external resources). Sections: the run
summary; mean maps per class and method; the metrics' distributions per method; the samples
where the methods disagree most; the misclassified samples; border reliance (the share of
positive evidence in the outer tenth of the input - the proxy for "looking outside the object"
when the store has no object masks); and SpRAy clusters per class (:mod:`perspicio.run.spray`).

The attributions are read chunk by chunk, so memory stays bounded whatever the store's size;
SpRAy clusters at most ``spray_limit`` samples per class (a seeded random subset beyond that).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .spray import SprayResult, prepare_maps
from .spray import spray as spray_maps
from .store import Store, StoreError

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:20px;color:#222;max-width:1200px}
h1{font-size:22px} h2{font-size:18px;margin-top:30px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px} th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left}
img.fig{max-width:100%;height:auto;border:1px solid #eee}
p.note{font-size:13px;color:#555;max-width:900px}
"""
BORDER = 0.1  # width of the border band, as a fraction of the side


@dataclass
class _Stats:
    """Per-sample statistics gathered in one streaming pass over the attribution arrays."""

    small: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (n, h, w) downsized maps
    border: dict[str, np.ndarray] = field(default_factory=dict)  # method -> (n,) border share
    class_sum: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    class_count: dict[int, int] = field(default_factory=dict)


def _fig_uri(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _esc(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _map2d(a: np.ndarray) -> np.ndarray:
    a = np.nan_to_num(np.asarray(a, dtype=np.float64))
    return a.sum(0) if a.ndim == 3 else a


def border_share(maps: np.ndarray, band: float = BORDER) -> np.ndarray:
    """Share of each map's positive evidence inside the outer ``band`` of its height and width."""
    m = np.clip(np.nan_to_num(maps.astype(np.float64)), 0, None)
    if m.ndim == 4:
        m = m.sum(1)
    h, w = m.shape[-2:]
    bh, bw = max(1, round(h * band)), max(1, round(w * band))
    inner = m[:, bh:h - bh, bw:w - bw].sum((1, 2)) if h > 2 * bh and w > 2 * bw else np.zeros(len(m))
    total = m.sum((1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 1 - inner / total, np.nan)


def _gather(store: Store, methods: Sequence[str], group: np.ndarray, classes: Sequence[int], n: int,
            chunk: int) -> _Stats:
    st = _Stats()
    for method in methods:
        arr = store.attributions(method)
        small_parts, border_parts = [], []
        sums: dict[int, np.ndarray] = {}
        for s in range(0, n, chunk):
            a = np.asarray(arr[s:s + chunk], dtype=np.float32)
            small_parts.append(prepare_maps(a, 16) * 1.0)
            border_parts.append(border_share(a))
            ok = ~np.isnan(a.reshape(len(a), -1)).any(1)
            for c in classes:
                sel = ok & (group[s:s + len(a)] == c)
                if sel.any():
                    part = np.nan_to_num(a[sel]).astype(np.float64)
                    part = part.sum(1) if part.ndim == 4 else part
                    sums[c] = sums.get(c, 0) + part.sum(0)
                    if method == methods[0]:
                        st.class_count[c] = st.class_count.get(c, 0) + int(sel.sum())
        st.small[method] = np.concatenate(small_parts)
        st.border[method] = np.concatenate(border_parts)
        st.class_sum[method] = sums
    return st


def _show(ax: Any, m: np.ndarray, title: str) -> None:
    lim = float(np.nanmax(np.abs(m))) if np.isfinite(m).any() and np.nanmax(np.abs(m)) > 0 else 1.0
    signed = bool(np.nanmin(m) < -1e-9 * lim)
    ax.imshow(m, cmap="RdBu_r" if signed else "inferno", vmin=-lim if signed else 0, vmax=lim, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def _thumb(path: Any) -> np.ndarray | None:
    if not isinstance(path, str) or not path or not os.path.isfile(path):
        return None
    try:
        from ..zoo.images import load_image

        img = load_image(path)
        img.thumbnail((96, 96))
        return np.asarray(img)
    except Exception:  # a file that vanished or broke since the run: no thumbnail
        return None


def _sample_grid(store: Store, rows: Any, methods: Sequence[str], indices: Sequence[int], captions: Sequence[str]) -> str:
    import matplotlib.pyplot as plt

    if not len(indices):
        return ""
    path_of = rows.drop_duplicates("index").set_index("index")["path"].to_dict()
    has_thumb = any(_thumb(path_of.get(i)) is not None for i in indices[:1])
    cols = len(methods) + int(has_thumb)
    fig, axes = plt.subplots(len(indices), cols, figsize=(1.7 * cols + 0.6, 1.75 * len(indices)), squeeze=False)
    arrays = {m: store.attributions(m) for m in methods}
    for r, (i, cap) in enumerate(zip(indices, captions)):
        c0 = 0
        if has_thumb:
            t = _thumb(path_of.get(i))
            ax = axes[r, 0]
            if t is not None:
                ax.imshow(t)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title("input", fontsize=8)
            c0 = 1
        for j, m in enumerate(methods):
            _show(axes[r, c0 + j], _map2d(arrays[m][i]), m)
        axes[r, 0].set_ylabel(cap, fontsize=8, rotation=0, ha="right", va="center", labelpad=8)
    fig.tight_layout()
    return f'<img class="fig" alt="samples" src="{_fig_uri(fig)}">'


def _direction(metric: str) -> str:
    from ..core.registry import METRICS

    try:
        return "higher is better" if METRICS.get(metric).cls.higher_is_better else "lower is better"
    except Exception:  # a metric no longer registered in this version: no direction shown
        return "direction unknown"


def _spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ra = np.argsort(np.argsort(a, 1, kind="stable"), 1, kind="stable").astype(np.float64)
    rb = np.argsort(np.argsort(b, 1, kind="stable"), 1, kind="stable").astype(np.float64)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra ** 2).sum(1) * (rb ** 2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / den, np.nan)


def write_report(store: str | os.PathLike[str] | Store, out: str | os.PathLike[str] | None = None, *,
                 spray: bool = True, max_classes: int = 10, spray_method: str | None = None,
                 spray_limit: int = 2000, max_samples_shown: int = 8, seed: int = 0) -> Path | str:
    """Write the HTML report of ``store`` to ``out`` (default ``STORE/report.html``); returns its path."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    st = store if isinstance(store, Store) else Store(store)
    manifest = st.manifest()
    rows = st.rows()
    if len(rows) == 0:
        raise StoreError(f"the store {str(st.path)!r} has no committed chunks yet: run it first.")
    out_path: Any = Path(out) if out is not None else st.path / "report.html"
    methods = list(manifest["configuration"]["methods"])
    metrics = list(manifest["configuration"]["metrics"])
    names = manifest.get("class_names") or None
    n = int(manifest["n_samples"])
    chunk = int(manifest["configuration"]["chunk_size"])
    done_methods = [m for m in methods if m in set(manifest.get("shapes") or {})]
    per_sample = rows.drop_duplicates("index").set_index("index").reindex(range(n))
    labels = per_sample["label"].to_numpy(dtype=float)
    preds = per_sample["prediction"].to_numpy(dtype=float)
    group = np.where(np.isfinite(labels), labels, preds)
    group = np.where(np.isfinite(group), group, -1).astype(int)
    counts = {int(c): int((group == c).sum()) for c in np.unique(group) if c >= 0}
    classes = sorted(counts, key=lambda c: (-counts[c], c))[:max_classes]

    def cname(c: int) -> str:
        return str(names[c]) if names and 0 <= c < len(names) else f"class {c}"

    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' content='width=device-width,initial-scale=1'>"
             f"<title>perspicio run report</title><style>{CSS}</style></head><body>",
             f"<h1>Run report: {_esc(manifest.get('model'))} on {_esc(manifest.get('data'))}</h1>"]
    ok_rows = rows[rows["status"] == "ok"]
    failed = rows[rows["status"] == "failed"]
    n_done = rows["index"].nunique()
    acc = per_sample["correct"].dropna()
    summary = [("samples in the data", n), ("samples computed", n_done),
               ("methods", ", ".join(methods)), ("metrics", ", ".join(metrics) or "none"),
               ("target", manifest["configuration"]["target"]),
               ("failed rows", f"{len(failed)} ({failed['index'].nunique()} samples)"),
               ("accuracy on labelled samples", f"{acc.astype(float).mean():.3f} ({len(acc)} samples)" if len(acc) else "no labels")]
    parts.append("<table>" + "".join(f"<tr><th class='l'>{_esc(k)}</th><td class='l'>{_esc(v)}</td></tr>" for k, v in summary) + "</table>")
    if len(failed):
        errs = failed.groupby("error", dropna=False)["index"].nunique().sort_values(ascending=False).head(5)
        parts.append("<p class='note'>Most frequent failures: " + "; ".join(f"{_esc(e)} ({c})" for e, c in errs.items()) + "</p>")
    if not done_methods:
        parts.append("<p class='note'>No attributions were stored (every sample failed).</p></body></html>")
        return _write_html(st, out, out_path, "".join(parts))

    stats = _gather(st, done_methods, group, classes, n, chunk)

    # per-class mean maps
    parts.append("<h2>Mean map per class</h2><p class='note'>Each panel is the mean attribution of one method over the "
                 "samples of one class (by label when the data has labels, else by prediction), scaled to its own maximum. "
                 "Red/blue: signed evidence for/against; dark-to-bright: unsigned.</p>")
    fig, axes = plt.subplots(len(classes), len(done_methods), figsize=(1.9 * len(done_methods) + 1.2, 1.9 * len(classes)), squeeze=False)
    for r, c in enumerate(classes):
        for j, m in enumerate(done_methods):
            cnt = stats.class_count.get(c, 0)
            mean = stats.class_sum[m].get(c)
            _show(axes[r, j], mean / max(cnt, 1) if mean is not None else np.zeros((2, 2)), m if r == 0 else "")
        axes[r, 0].set_ylabel(f"{cname(c)}\n(n={stats.class_count.get(c, 0)})", fontsize=8)
    fig.tight_layout()
    parts.append(f'<img class="fig" alt="mean maps" src="{_fig_uri(fig)}">')

    # metric distributions
    if metrics:
        parts.append("<h2>Metric distributions</h2><p class='note'>One box per method: the per-sample values of each metric "
                     "(the box spans the middle half, the line is the median).</p>")
        cols = min(3, len(metrics))
        nrows = math.ceil(len(metrics) / cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 2.8 * nrows), squeeze=False)
        for k, metric in enumerate(metrics):
            ax = axes[k // cols, k % cols]
            data = [ok_rows.loc[ok_rows["method"] == m, f"metric:{metric}"].dropna().to_numpy() for m in done_methods]
            if any(len(d) for d in data):
                ax.boxplot([d if len(d) else [np.nan] for d in data], showfliers=False)
                ax.set_xticks(range(1, len(done_methods) + 1), done_methods, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{metric} ({_direction(metric)})", fontsize=9)
        for k in range(len(metrics), nrows * cols):
            axes[k // cols, k % cols].axis("off")
        fig.tight_layout()
        parts.append(f'<img class="fig" alt="metrics" src="{_fig_uri(fig)}">')
        table = ok_rows.groupby("method")[[f"metric:{m}" for m in metrics]].mean()
        parts.append("<table><tr><th class='l'>method</th>" + "".join(f"<th>{_esc(m)} (mean, {_direction(m)})</th>" for m in metrics) + "</tr>"
                     + "".join("<tr><td class='l'>" + _esc(m) + "</td>" + "".join(
                         f"<td>{v:.4g}</td>" if np.isfinite(v) else "<td>n/a</td>" for v in table.loc[m].to_numpy()) + "</tr>"
                         for m in table.index) + "</table>")

    # disagreement
    if len(done_methods) >= 2:
        pairs = [(a, b) for i, a in enumerate(done_methods) for b in done_methods[i + 1:]]
        corr = np.nanmean(np.stack([_spearman_rows(stats.small[a].reshape(n, -1), stats.small[b].reshape(n, -1))
                                    for a, b in pairs]), 0) if n else np.array([])
        order = [int(i) for i in np.argsort(np.where(np.isfinite(corr), corr, np.inf), kind="stable")
                 if np.isfinite(corr[i])][:max_samples_shown]
        parts.append("<h2>Where the methods disagree most</h2><p class='note'>Samples with the lowest mean rank correlation "
                     f"(Spearman, maps downsized to 16 x 16) between the {len(done_methods)} methods; median over all samples: "
                     f"{np.nanmedian(corr):.3f}.</p>")
        parts.append(_sample_grid(st, rows, done_methods, order, [f"#{i}\nr={corr[i]:.2f}" for i in order]))

    # mistakes
    wrong = per_sample[(per_sample["correct"] == False)].index.tolist()[:max_samples_shown]  # noqa: E712
    parts.append(f"<h2>Misclassified samples</h2><p class='note'>{int((per_sample['correct'] == False).sum())} of "  # noqa: E712
                 f"{len(acc)} labelled samples are misclassified; the first {len(wrong)} are shown with each method's map "
                 "of the explained target.</p>")
    if wrong:
        caps = [f"#{i}\n{cname(int(labels[i]))} -> {cname(int(preds[i]))}" for i in wrong]
        parts.append(_sample_grid(st, rows, done_methods, wrong, caps))

    # border reliance
    parts.append(f"<h2>Border reliance</h2><p class='note'>Share of each map's positive evidence in the outer {int(BORDER * 100)}% "
                 "of the input on every side (the band covers about a third of the area). Without object masks this is the "
                 "proxy for a model looking outside the object: high values point at frames, watermarks or corner marks.</p>")
    fig, ax = plt.subplots(figsize=(6, 2.6))
    for m in done_methods:
        v = stats.border[m][np.isfinite(stats.border[m])]
        if len(v):
            ax.hist(v, bins=20, range=(0, 1), histtype="step", label=f"{m} (median {np.median(v):.2f})")
    ax.set_xlabel("share of positive evidence in the border band")
    ax.set_ylabel("samples")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    parts.append(f'<img class="fig" alt="border" src="{_fig_uri(fig)}">')
    m0 = done_methods[0]
    b = stats.border[m0]
    top = [int(i) for i in np.argsort(np.where(np.isfinite(b), -b, np.inf), kind="stable")[:max_samples_shown] if np.isfinite(b[i])]
    if top:
        parts.append(f"<p class='note'>Samples with the highest border share ({_esc(m0)}):</p>")
        parts.append(_sample_grid(st, rows, done_methods, top, [f"#{i}\n{b[i]:.2f}" for i in top]))

    # SpRAy
    if spray:
        sm = spray_method or m0
        if sm not in done_methods:
            raise InputError(f"spray_method {sm!r} is not a method of this run ({', '.join(done_methods)}).")
        parts.append(f"<h2>SpRAy: strategies per class ({_esc(sm)})</h2><p class='note'>Spectral relevance analysis "
                     "(Lapuschkin et al., 2019): the maps of a class are clustered by where their evidence lies; the number "
                     "of clusters is the largest eigengap of the k-nearest-neighbour graph's Laplacian. A small cluster whose "
                     "mean map sits off the object is a candidate shortcut (\"Clever Hans\").</p>")
        rng = np.random.default_rng(seed)
        for c in classes:
            members = np.flatnonzero((group == c) & np.isfinite(stats.border[sm]))
            if len(members) < 8:
                continue
            if len(members) > spray_limit:
                members = np.sort(rng.choice(members, spray_limit, replace=False))
            res = spray_maps(stats.small[sm][members], seed=seed)
            parts.append(_spray_section(res, members, cname(c), stats.border[sm]))
    parts.append("</body></html>")
    return _write_html(st, out, out_path, "".join(parts))


def _write_html(st: Store, out: Any, out_path: Any, html: str) -> Any:
    """Write the report: to ``out`` (a local file) when given, else next to the store - through
    the store's file system when it is remote (the path returned is then a URL string)."""
    if out is None and st.remote:
        url = f"{st.url.rstrip('/')}/report.html"
        st.fs.pipe_file(str(out_path), html.encode("utf-8"))
        return url
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(html, encoding="utf-8")
    return out_path


def _spray_section(res: SprayResult, members: np.ndarray, name: str, border: np.ndarray) -> str:
    import matplotlib.pyplot as plt

    k = res.k
    fig, axes = plt.subplots(1, k + 1, figsize=(2.2 * (k + 1) + 0.8, 2.4), squeeze=False)
    ax = axes[0, 0]
    ev = res.eigenvalues
    ax.plot(range(1, len(ev) + 1), ev, "o-", ms=3)
    ax.axvline(k + 0.5, color="#d62728", lw=1, ls="--")
    ax.set_title(f"eigenvalues (k={k})", fontsize=8)
    ax.tick_params(labelsize=7)
    for j in range(k):
        idx = members[res.labels == j]
        share = float(np.nanmean(border[idx])) if len(idx) else float("nan")
        _show(axes[0, j + 1], res.mean_maps[j], f"cluster {j + 1}: n={res.sizes[j]}\nborder {share:.2f}")
    fig.tight_layout()
    typical = "; ".join(f"cluster {j + 1}: " + ", ".join(f"#{int(members[i])}" for i in res.typical[j]) for j in range(k))
    return (f"<h3>{_esc(name)} ({len(members)} samples)</h3><img class='fig' alt='spray {_esc(name)}' src='{_fig_uri(fig)}'>"
            f"<p class='note'>Typical samples: {_esc(typical)}</p>")


__all__ = ["border_share", "write_report"]
