"""Data-set runs: explain and score a whole data set into a resumable store.

``perspicio.run(model, data, methods=..., metrics=..., store=DIR)`` computes every method (and
metric) on every sample, chunk by chunk, into a :class:`~perspicio.run.store.Store` (Zarr arrays
for the attributions, Parquet rows for everything else). Re-running the same call resumes; a
changed model, data set or configuration is refused unless ``overwrite=True``.
:func:`perspicio.run.report.write_report` turns a store into an HTML report, and
:func:`perspicio.run.spray.spray` clusters a class's explanations (SpRAy).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.options import check_choice, check_int
from ..errors import InputError, ModelError, OptionError
from .data import Source, as_source
from .engine import (
    TARGETS,
    Progress,
    RunConfig,
    RunContext,
    Summary,
    chunk_bounds,
    compute_chunk,
    model_fingerprint,
    row_schema,
    run_local,
    run_ray,
)
from .store import FORMAT, Store, StoreError

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class RunResult:
    """A finished run: its :class:`Summary` and its :class:`Store` (``.rows()``, ``.attributions(m)``)."""

    summary: Summary
    store: Store

    def rows(self, **kw: Any) -> Any:
        return self.store.rows(**kw)

    def attributions(self, method: str) -> Any:
        return self.store.attributions(method)

    def __repr__(self) -> str:
        return f"RunResult({self.summary})"


def _named_options(kind: str, names: Sequence[str], options: Mapping[str, Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    options = dict(options or {})
    unknown = [k for k in options if k not in names]
    if unknown:
        raise OptionError(f"{kind}_options names {unknown[0]!r}, which is not among the chosen {kind}s ({', '.join(names)}).")
    return {n: dict(options.get(n, {})) for n in names}


def _model_parts(model: Any, preprocess: Callable[[Any], Any] | None) -> tuple[Any, Sequence[str] | None, Any]:
    from torch import nn

    from ..core.blackbox import unwrap_model

    module, labels = unwrap_model(model)
    if not isinstance(module, nn.Module) or getattr(module, "is_black_box", False):
        raise ModelError("a run explains a torch nn.Module (or a bundled model); got "
                         f"{type(model).__name__}.")
    if preprocess is None:
        preprocess = getattr(model, "preprocess", None)
    return module, labels, preprocess


def _check_rows_fit(module: Any, source: Source, preprocess: Any) -> None:
    """Feature rows (a table without an image-path column) are tried on the model once before any
    work: a model that cannot take them (an image classifier) is an InputError here, instead of the
    same failure inside the model for every sample."""
    import torch

    from ..core.guard import model_guard
    from .data import PATH_COLUMNS, Rows

    if not isinstance(source, Rows):
        return
    x = source.load([0], preprocess).x
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    try:
        with model_guard(module, freeze=False), torch.no_grad():
            module(x.to(device))
    except Exception as exc:  # noqa: BLE001 - whatever the model raises, the rows do not fit it
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"{source.describe()}: no image-path column ({', '.join(PATH_COLUMNS)}), and the "
                         f"model cannot take the columns as feature rows ({first}).") from None


def run(
    model: Any,
    data: Any,
    methods: str | Sequence[str] = "gradcam",
    metrics: str | Sequence[str] | None = None,
    store: str | os.PathLike[str] = "perspicio-run",
    target: str | int = "predicted",
    *,
    engine: str = "local",
    address: str | None = None,
    workers: int | None = None,
    chunk_size: int = 64,
    seed: int = 0,
    batch_size: int | None = None,
    output: Any = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    metric_options: Mapping[str, Mapping[str, Any]] | None = None,
    preprocess: Callable[[Any], Any] | None = None,
    labels: Sequence[int] | None = None,
    maps: str = "input",
    overwrite: bool = False,
    progress: bool = False,
) -> RunResult:
    """Explain (and score) every sample of ``data`` into the store ``store``; resume if it exists.

    Args:
        model: a bundled model (its preprocessing and class names are used) or an ``nn.Module``.
        data: a folder of images (class sub-folders give labels), a CSV/Parquet of image paths and
            labels or of tabular rows, a tensor, a numpy array, a torch Dataset/DataLoader or a
            Hugging Face dataset (see :func:`perspicio.run.data.as_source`).
        methods / metrics: registry names (lists or comma-separated); metrics are optional.
        store: the store directory (created; resumed when it holds the same work).
        target: ``"predicted"`` (default), ``"label"`` (the data set's labels) or a class index.
        engine: ``"local"`` (this process) or ``"ray"`` (actors; ``address="auto"`` joins a cluster,
            None starts a local one with ``workers`` CPUs).
        chunk_size: samples per chunk: the unit of commit, resume and retry.
        maps: ``"input"`` stores attributions at the input's resolution; ``"layer"`` stores a layer
            method's map at its layer's resolution (a CAM's 7 x 7 instead of 224 x 224).
        overwrite: replace a store that holds a different run (otherwise it is refused).
    """
    from ..metrics.evaluate import resolve_methods

    check_choice("engine", engine, ENGINES)
    check_choice("maps", maps, ("input", "layer"))
    if not (target in TARGETS or (isinstance(target, int) and not isinstance(target, bool) and target >= 0)):
        raise OptionError(f"target must be 'predicted', 'label' or a class index >= 0; got {target!r}.")
    chunk_size = check_int("chunk_size", chunk_size, minimum=1)
    if workers is not None:
        workers = check_int("workers", workers, minimum=1)
    method_names = resolve_methods(methods)
    metric_names = _metric_names(metrics)
    module, class_names, prep = _model_parts(model, preprocess)
    source: Source = as_source(data, class_names=class_names, labels=labels)
    known = getattr(source, "labels", None)  # a Dataset's labels are only known item by item
    if target == "label" and known is not None and all(y is None for y in known):
        raise OptionError("target='label' but the data has no labels (class sub-folders, a label column, or labels=).")
    if isinstance(target, int) and class_names and target >= len(class_names):
        raise OptionError(f"target {target} is out of range: the model has {len(class_names)} classes "
                          f"(0..{len(class_names) - 1}).")
    _check_rows_fit(module, source, prep)
    config = RunConfig(
        methods=_named_options("method", method_names, method_options),
        metrics=_named_options("metric", metric_names, metric_options),
        target=target, chunk_size=chunk_size, seed=seed, batch_size=batch_size, output=output, maps=maps,
    )
    n = len(source)
    bounds = chunk_bounds(n, chunk_size)
    st = Store(store)
    manifest = st.open({
        "fingerprints": {"model": model_fingerprint(module), "data": source.fingerprint(),
                         "configuration": config.fingerprint()},
        "configuration": {"methods": config.methods, "metrics": config.metrics, "target": target,
                          "chunk_size": chunk_size, "seed": seed, "maps": maps},
        "n_samples": n, "n_chunks": len(bounds), "data": source.describe(),
        "class_names": list(class_names) if class_names is not None else None,
        "model": getattr(model, "name", type(module).__name__), "shapes": {},
        "format": FORMAT,
    }, overwrite=overwrite)
    ctx = RunContext(module, class_names, prep, source, config, n,
                     {k: tuple(v) for k, v in (manifest.get("shapes") or {}).items()})
    done = st.done_chunks()
    pending = [c for c in range(len(bounds)) if c not in done]
    summary = Summary(samples=n, chunks=len(bounds), skipped_chunks=len(done), engine=engine, store=st.url)
    bar = Progress(progress, n, sum(bounds[c][1] - bounds[c][0] for c in done))
    t0 = time.perf_counter()
    try:
        fs = fr = 0
        # the first chunks run here until every method's attribution shape is known, so the arrays
        # exist before any worker writes (no two processes ever create the same array)
        while pending and len(ctx.shapes) < len(config.methods):
            c = pending.pop(0)
            res = compute_chunk(ctx, c, *bounds[c])
            st.write_chunk(c, res.start, n, chunk_size, res.attributions, res.rows, row_schema(config))
            fs, fr = fs + res.failed_samples, fr + res.failed_rows
            summary.computed_chunks += 1
            bar.advance(bounds[c][1] - bounds[c][0])
        if ctx.shapes and ctx.shapes != manifest.get("shapes"):
            st.update_manifest(shapes={k: list(v) for k, v in ctx.shapes.items()})
        if pending:
            if engine == "ray":
                a, b = run_ray(ctx, st, pending, bar, address=address, workers=workers)
            else:
                a, b = run_local(ctx, st, pending, bar)
            fs, fr = fs + a, fr + b
            summary.computed_chunks += len(pending)
    finally:
        bar.close()
    summary.failed_samples, summary.failed_rows = fs, fr
    summary.seconds = time.perf_counter() - t0
    return RunResult(summary, st)


def _metric_names(metrics: str | Sequence[str] | None) -> list[str]:
    from ..metrics.evaluate import resolve_metrics

    if metrics is None or metrics == "" or (not isinstance(metrics, str) and len(metrics) == 0):
        return []
    return resolve_metrics(metrics)


def open_store(path: str | os.PathLike[str]) -> Store:
    """An existing store, checked (manifest present, format readable)."""
    st = Store(path)
    st.manifest()
    return st


__all__ = ["ENGINES", "RunResult", "Store", "StoreError", "Summary", "open_store", "run"]
