"""Score several explanation methods with several metrics: :func:`evaluate` and :func:`compare`.

:func:`compare` runs every method once on the inputs (the same resolved target for
all), scores each explanation with every metric, and returns a :class:`Comparison`
holding the explanations, every :class:`~perspicio.metrics.base.MetricResult`, a
ranking, and a JSON-ready dict of every number. :func:`evaluate` is the same call
returning only the methods x metrics :class:`Table` (records; ``.to_pandas()`` for a
DataFrame).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.explanation import Explanation, classify_output, display
from ..core.jsonable import to_jsonable, write_json
from ..core.outputs import OutputSelector
from ..core.registry import METHODS, METRICS
from ..core.targets import resolve_target, target_names
from ..errors import OptionError, PerspicioError, UnknownNameError, suggest
from .base import MetricResult, NotApplicable, prepare_model
from .plan import PassTimes, Reporter, format_seconds, measure_pass_times, method_passes, plan_text

#: metrics run by ``metrics="default"``: cheap for every method - forward passes only, no
#: re-explanation, no ground truth (deletion and insertion: 100 passes per method and sample each,
#: average_drop 1, completeness 0 (the explanation's base value), sparseness and entropy 0)
DEFAULT_METRICS = ("deletion", "insertion", "average_drop", "sparseness", "entropy", "completeness")
#: metrics that cost many passes (re-explanations or many perturbations): run only when named
EXPENSIVE_METRICS = (
    "faithfulness_correlation",
    "max_sensitivity",
    "avg_sensitivity",
    "randomization",
    "infidelity",
    "road",
)


def resolve_methods(spec: str | Sequence[str] | None) -> list[str]:
    """'all', a family ("family:cam" or "gradient"), a comma-separated string or a list ->
    registered method names; empty -> the CAM family."""

    return METHODS.select(spec, default=["family:cam"])


def resolve_metrics(spec: str | Sequence[str] | None, *, have_masks: bool = False) -> list[str]:
    """'default', 'all', a family name, a comma-separated string or a list -> metric names.

    'all' includes the localization metrics only when masks are given.
    """
    from . import names as metric_names

    items = _split(spec) or ["default"]
    families = {e.family for e in METRICS.entries()}
    out: list[str] = []
    for item in items:
        key = item.strip().lower().replace("-", "_")
        if key == "default":
            out += list(DEFAULT_METRICS) + (metric_names("localization") if have_masks else [])
        elif key == "all":
            out += [
                m
                for m in metric_names()
                if have_masks or "masks" not in METRICS.get(m).extra.get("needs", ())
            ]
        elif key in families and key not in METRICS:
            out += metric_names(key)
        else:
            out.append(METRICS.get(key).name)
    return list(dict.fromkeys(out))


def _split(spec: str | Sequence[str] | None) -> list[str]:
    if spec is None:
        return []
    if isinstance(spec, str):
        spec = [spec]
    out: list[str] = []
    for s in spec:
        if not isinstance(s, str):
            raise OptionError(f"names must be strings; got {type(s).__name__}.")
        out += [p.strip() for p in s.split(",") if p.strip()]
    return out


def _check_options(
    kind: str, options: Mapping[str, Mapping[str, Any]] | None, known: Sequence[str]
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, opts in (options or {}).items():
        if name not in known:
            raise UnknownNameError(
                f"{kind}_options names {name!r}, which is not among the chosen {kind}s "
                f"({', '.join(known)})." + suggest(name, known)
            )
        if not isinstance(opts, Mapping):
            raise OptionError(
                f"{kind}_options[{name!r}] must be a dict of options; got {type(opts).__name__}."
            )
        out[name] = dict(opts)
    return out


# ----------------------------------------------------------------------------- result


@dataclass
class Comparison:
    """Explanations of several methods and their scores under several metrics."""

    methods: list[str]
    metrics: list[str]
    explanations: dict[str, Explanation]
    results: dict[str, dict[str, MetricResult]]
    not_applicable: dict[str, dict[str, str]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, dict[str, float]] = field(default_factory=dict)
    inputs: Tensor | None = None
    targets: list[int] | None = None
    target_names: list[str] | None = None
    model_name: str = ""

    def higher_is_better(self, metric: str) -> bool:
        for per in self.results.values():
            if metric in per:
                return per[metric].higher_is_better
        return bool(METRICS.get(metric).extra.get("higher_is_better", True))

    def value(self, method: str, metric: str) -> float:
        r = self.results.get(method, {}).get(metric)
        return r.value if r is not None else math.nan

    def ranks(self) -> dict[str, dict[str, float]]:
        """Rank of each method per metric (1 = best; ties share the mean rank; NaN values unranked)."""
        out: dict[str, dict[str, float]] = {m: {} for m in self.ok_methods}
        for metric in self.metrics:
            vals = [(m, self.value(m, metric)) for m in self.ok_methods]
            vals = [(m, v) for m, v in vals if math.isfinite(v)]
            sign = -1.0 if self.higher_is_better(metric) else 1.0
            ordered = sorted(vals, key=lambda mv: sign * mv[1])
            i = 0
            while i < len(ordered):
                j = i
                while j + 1 < len(ordered) and ordered[j + 1][1] == ordered[i][1]:
                    j += 1
                for m, _ in ordered[i : j + 1]:
                    out[m][metric] = (i + j) / 2 + 1
                i = j + 1
        return out

    @property
    def ok_methods(self) -> list[str]:
        return [m for m in self.methods if m not in self.errors]

    def best(self) -> dict[str, list[str]]:
        """Best method(s) per metric."""
        ranks = self.ranks()
        out: dict[str, list[str]] = {}
        for metric in self.metrics:
            winners = [
                m
                for m in self.ok_methods
                if ranks[m].get(metric) is not None
                and ranks[m][metric]
                == min(
                    (ranks[k][metric] for k in self.ok_methods if metric in ranks[k]), default=None
                )
            ]
            out[metric] = winners
        return out

    def ranking(self) -> list[tuple[str, float]]:
        """Methods sorted by their mean rank over the metrics they were scored on."""
        ranks = self.ranks()
        mean = {m: (sum(r.values()) / len(r) if r else math.nan) for m, r in ranks.items()}
        return sorted(mean.items(), key=lambda kv: (not math.isfinite(kv[1]), kv[1]))

    def records(self) -> list[dict[str, Any]]:
        """One record per method: its mean score per metric, mean rank and position, best first."""
        rows = []
        for pos, (m, mean_rank) in enumerate(self.ranking(), start=1):
            row: dict[str, Any] = {"method": m}
            for metric in self.metrics:
                row[metric] = self.value(m, metric)
            row["mean_rank"] = mean_rank
            row["rank"] = pos
            rows.append(row)
        return rows

    def table(self) -> Table:
        """The methods x metrics :class:`Table` (one record per method, best first)."""
        return Table(self.records(), format_table(self))

    def to_dict(self) -> dict[str, Any]:
        """Every number: per-sample scores, curves, similarities, passes, timings, explanation summaries."""
        return {
            "model": self.model_name,
            "targets": self.targets,
            "target_names": self.target_names,
            "methods": self.methods,
            "metrics": {
                m: {
                    "higher_is_better": self.higher_is_better(m),
                    "family": METRICS.get(m).family,
                    "summary": METRICS.get(m).summary,
                }
                for m in self.metrics
            },
            "table": to_jsonable(self.records()),
            "ranks": self.ranks(),
            "best": self.best(),
            "results": {
                m: {k: r.summary() for k, r in per.items()} for m, per in self.results.items()
            },
            "not_applicable": self.not_applicable,
            "errors": self.errors,
            "seconds": self.seconds,
            "explanations": {m: e.summary() for m, e in self.explanations.items()},
        }

    def save_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())

    def __repr__(self) -> str:
        return f"Comparison(methods={self.methods}, metrics={self.metrics})\n" + format_table(self)

    def _repr_html_(self) -> str:
        """Notebook display: the methods x metrics table and the comparison figure of the first input
        (drawn by the display layer); never raises (falls back to the text table)."""
        try:
            return display().comparison_html(self)
        except Exception as exc:  # a notebook display must never raise
            import html

            return (
                f"<pre>{html.escape(repr(self))}</pre>"
                f"<p><small>(display failed: {html.escape(str(exc))})</small></p>"
            )


class Table:
    """The methods x metrics table of :func:`evaluate`: one record (dict) per method, best first,
    with its mean score per metric, ``mean_rank`` and ``rank``. Iterating yields the records;
    ``table["gradcam"]`` is one method's record; :meth:`to_pandas` gives a DataFrame indexed by
    method (pandas is optional)."""

    def __init__(self, records: Sequence[Mapping[str, Any]], text: str = "") -> None:
        self.records: list[dict[str, Any]] = [dict(r) for r in records]
        self._text = text

    @property
    def columns(self) -> list[str]:
        """Column names after ``method``: the metrics, then ``mean_rank`` and ``rank``."""
        return [k for k in self.records[0] if k != "method"] if self.records else []

    @property
    def methods(self) -> list[str]:
        """Method names, best first."""
        return [r["method"] for r in self.records]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: int | str) -> dict[str, Any]:
        """The record at a position, or of a method by name."""
        if isinstance(key, str):
            for r in self.records:
                if r["method"] == key:
                    return r
            raise UnknownNameError(
                f"no method {key!r} in the table; it has: {', '.join(self.methods)}."
                + suggest(key, self.methods)
            )
        return self.records[key]

    def to_pandas(self) -> Any:
        """A pandas DataFrame with one row per method (index: method)."""
        try:
            import pandas as pd
        except ImportError:
            raise PerspicioError(
                "Table.to_pandas() needs pandas: pip install pandas (or use .records)."
            ) from None
        return pd.DataFrame(self.records, columns=["method", *self.columns]).set_index("method")

    def __repr__(self) -> str:
        return self._text or "\n".join(str(r) for r in self.records)

    def _repr_html_(self) -> str:
        from html import escape

        def cell(v: Any) -> str:
            if isinstance(v, float):
                return "n/a" if not math.isfinite(v) else f"{v:.4g}"
            return escape(str(v))

        head = "".join(f"<th>{escape(c)}</th>" for c in ["method", *self.columns])
        body = "".join(
            "<tr>"
            + "".join(f"<td>{cell(r.get(c))}</td>" for c in ["method", *self.columns])
            + "</tr>"
            for r in self.records
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def format_table(comp: Comparison, *, digits: int = 4) -> str:
    """Plain-text methods x metrics table, best per column marked with '*'."""
    best = comp.best()
    head = (
        ["method"]
        + [f"{m}{'^' if comp.higher_is_better(m) else 'v'}" for m in comp.metrics]
        + ["rank"]
    )
    rows = [head]
    for rec in comp.records():
        row = [rec["method"]]
        for m in comp.metrics:
            v = rec[m]
            cell = "n/a" if not math.isfinite(v) else f"{v:.{digits}g}"
            row.append(cell + ("*" if rec["method"] in best.get(m, []) else ""))
        row.append(str(rec["rank"]))
        rows.append(row)
    for m in comp.errors:
        rows.append([m] + ["error"] * len(comp.metrics) + ["-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


def compare(
    model: Any,
    inputs: Any,
    methods: str | Sequence[str] | None = "family:cam",
    metrics: str | Sequence[str] | None = "default",
    target: Any = None,
    *,
    masks: Any = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    progress: bool = False,
    output: Any = None,
) -> Comparison:
    """Run ``methods`` on ``inputs``, score each with ``metrics``, and rank them.

    Args:
        model: nn.Module or bundled ZooModel.
        inputs: (N, C, H, W) batch.
        methods: 'all', a family (e.g. 'cam'), or names (list or comma-separated).
        metrics: 'default', 'all', a family, or names. Localization metrics need ``masks``.
        target: explained target for every method (default: the predicted class).
        masks: ground truth for localization metrics ((N, H, W) masks or (N, 4) boxes).
        method_options / metric_options: per-name option dicts, e.g. ``{"deletion": {"steps": 50}}``.
        seed: seed of every randomized metric (each uses its own generator).
        batch_size: chunk size for the methods and metrics (default: from the memory budget).
        progress: print the plan (passes and estimated seconds per method and metric, from the
            model's measured pass times), then one line per finished step on stderr (a bar naming
            the current step on a terminal).
        output: for models that return a dict, tuple or ``ModelOutput``: the key, index or callable
            selecting the tensor to explain and score (every method's and metric's ``output=``).

    A method that fails on this model (e.g. it needs a linear classifier head) is recorded in
    ``errors``; a metric that is not defined for a method (completeness of a CAM) in
    ``not_applicable``; both show as n/a in the table.
    """
    from ..core.inputs import as_batch
    from ..methods.base import build

    method_names = resolve_methods(methods)
    metric_names = resolve_metrics(metrics, have_masks=masks is not None)
    m_opts = _check_options("method", method_options, method_names)
    k_opts = _check_options("metric", metric_options, metric_names)
    module, labels, black_box = prepare_model(model)
    if black_box:
        from ..errors import ModelError

        raise ModelError(
            "compare/evaluate run registered methods, which need a torch nn.Module; "
            "score a black-box explanation with a metric class directly."
        )
    select = OutputSelector(output)
    for name in metric_names:  # validate every metric's options before any work
        _make_metric(name, k_opts.get(name, {}), seed, batch_size, output)
    x = as_batch(inputs, module)
    with torch.no_grad():
        from ..core.guard import model_guard

        with model_guard(module):
            out = select(module(x), len(x))
    tgt = resolve_target(target, out, labels)
    unit, probs = classify_output(out) if tgt.indices is not None else ("output", None)
    target_probs = (
        probs.gather(1, tgt.indices.to(probs.device).view(-1, 1).long())[:, 0]
        if probs is not None and tgt.indices is not None
        else None
    )
    comp = Comparison(
        method_names,
        metric_names,
        {},
        {},
        inputs=x,
        targets=tgt.indices.tolist() if tgt.indices is not None else None,
        target_names=target_names(labels, tgt.indices),
        model_name=getattr(model, "name", type(module).__name__),
    )
    reporter = _plan(comp, module, x, select, m_opts, k_opts, seed, batch_size, output, progress)
    try:
        for mname in method_names:
            cls = METHODS.get(mname).cls
            opts = dict(m_opts.get(mname, {}))
            if batch_size is not None and "batch_size" in cls.option_names():
                opts.setdefault("batch_size", batch_size)
            if labels is not None and "labels" in cls.option_names():
                opts.setdefault("labels", labels)
            if output is not None:
                opts.setdefault("output", output)
            reporter.start(f"{mname}: explaining")
            t0 = time.perf_counter()
            try:
                exp = build(cls, module, **opts)(x, target=tgt)
            except PerspicioError as exc:
                if isinstance(exc, OptionError) and mname in m_opts:
                    raise
                comp.errors[mname] = str(exc)
                reporter.finish(f"{mname}: failed ({exc})", reporter.estimates[mname])
                for metric in metric_names:
                    reporter.finish(
                        f"{mname} {metric}: skipped", reporter.estimates[(mname, metric)]
                    )
                continue
            if (
                unit != "output"
                and getattr(cls, "targets_are_classes", True)
                and len(exp) == len(x)
            ):
                exp = exp.with_score_unit(unit, target_probs)
            comp.explanations[mname] = exp
            took = time.perf_counter() - t0
            comp.seconds[mname] = {"explain": round(took, 4)}
            comp.results[mname] = {}
            reporter.finish(
                f"{mname}: explained in {format_seconds(took)}", reporter.estimates[mname]
            )
            for metric in metric_names:
                reporter.start(f"{mname}: {metric}")
                t0 = time.perf_counter()
                scorer = _make_metric(metric, k_opts.get(metric, {}), seed, batch_size, output)
                try:
                    res = scorer(module, x, exp, target=tgt, masks=masks)
                except NotApplicable as exc:
                    comp.not_applicable.setdefault(mname, {})[metric] = str(exc)
                    line = f"{mname} {metric}: n/a"
                else:
                    comp.results[mname][metric] = res
                    line = f"{mname} {metric} = {res.value:.4g}"
                took = time.perf_counter() - t0
                comp.seconds[mname][metric] = round(took, 4)
                reporter.finish(
                    f"{line} ({format_seconds(took)})", reporter.estimates[(mname, metric)]
                )
    finally:
        reporter.close()
    reporter.say(f"compare: done in {format_seconds(time.perf_counter() - reporter.t0)}")
    if not comp.explanations and comp.errors:
        first = next(iter(comp.errors.items()))
        raise OptionError(f"every method failed; {first[0]}: {first[1]}")
    return comp


def _plan(
    comp: Comparison,
    module: Any,
    x: Tensor,
    select: Any,
    m_opts: Mapping[str, Mapping[str, Any]],
    k_opts: Mapping[str, Mapping[str, Any]],
    seed: int,
    batch_size: int | None,
    output: Any,
    progress: bool,
) -> Reporter:
    """Estimate every step's seconds from the model's measured pass times, print the plan, and
    return the reporter that shows the run's progress (silent without ``progress``)."""
    n = len(x)
    estimates: dict[Any, float] = {}
    method_cost: dict[str, tuple[int, int]] = {}
    metric_cost: dict[str, tuple[int, int]] = {}
    if progress:
        from ..core.guard import model_guard

        with model_guard(module):
            times = measure_pass_times(module, x, select)
    else:
        times = PassTimes(0.0, 0.0)
    for mname in comp.methods:
        entry = METHODS.get(mname)
        f, b = method_cost[mname] = method_passes(entry.cls, entry.family, m_opts.get(mname, {}), x)
        estimates[mname] = n * (f * times.forward + b * times.backward)
    for metric in comp.metrics:
        scorer = _make_metric(metric, dict(k_opts.get(metric, {})), seed, batch_size, output)
        metric_cost[metric] = scorer.cost() if hasattr(scorer, "cost") else (0, 0)
    for mname in comp.methods:
        for metric in comp.metrics:
            f, again = metric_cost[metric]
            estimates[(mname, metric)] = n * f * times.forward + again * estimates[mname]
    method_s = {m: estimates[m] for m in comp.methods}
    metric_s = {k: sum(estimates[(m, k)] for m in comp.methods) for k in comp.metrics}
    reporter = Reporter(progress, sum(estimates.values()), len(estimates))
    reporter.estimates = estimates
    opt_in = [k for k in EXPENSIVE_METRICS if k not in comp.metrics and k in METRICS]
    reporter.say(
        plan_text(
            comp.model_name,
            n,
            times,
            comp.methods,
            method_cost,
            method_s,
            comp.metrics,
            metric_cost,
            metric_s,
            opt_in,
        )
    )
    return reporter


def _make_metric(
    name: str, opts: dict[str, Any], seed: int, batch_size: int | None, output: Any = None
) -> Any:
    from .base import Metric

    cls: type[Metric] = METRICS.get(name).cls
    allowed = cls.option_names()
    unknown = [k for k in opts if k not in allowed]
    if unknown:
        raise OptionError(
            f"metric {name!r} has no option {unknown[0]!r}; its options are: {', '.join(allowed)}."
            + suggest(unknown[0], allowed)
        )
    opts = dict(opts)
    opts.setdefault("seed", seed)
    if batch_size is not None:
        opts.setdefault("batch_size", batch_size)
    if output is not None:
        opts.setdefault("output", output)
    return cls(**opts)


def evaluate(
    model: Any,
    inputs: Any,
    methods: str | Sequence[str] | None = "family:cam",
    metrics: str | Sequence[str] | None = "default",
    target: Any = None,
    **kwargs: Any,
) -> Table:
    """Score ``methods`` on ``inputs`` with ``metrics``; return the methods x metrics :class:`Table`.

    The table has one record per method (mean score over the inputs per metric, the mean
    rank and the overall position), best first; ``.to_pandas()`` gives a DataFrame. Keyword arguments are those of :func:`compare`, which returns
    the full :class:`Comparison` (per-sample scores, curves, explanations).
    """
    return compare(model, inputs, methods=methods, metrics=metrics, target=target, **kwargs).table()
