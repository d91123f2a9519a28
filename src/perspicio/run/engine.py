"""What one chunk of a run computes, and the engines that schedule chunks.

:func:`compute_chunk` is the whole unit of work: load the chunk, one forward pass for the
predictions, every method on the readable samples (one batched call each, the same target for
all methods), every metric on every explanation; the result is the chunk's attribution slices
and its rows. Both engines call it: ``local`` in this process with the store written by a
background thread (writes overlap the next chunk's compute), ``ray`` in actors that each hold the
model once and commit their chunks themselves.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import OptionError, PerspicioError
from .data import Chunk, Source
from .store import Store

#: target per sample: the model's prediction, the data set's label, or one class index
TARGETS = ("predicted", "label")


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run's results (its fingerprint is part of the store's)."""

    methods: Mapping[str, Mapping[str, Any]]
    metrics: Mapping[str, Mapping[str, Any]]
    target: str | int = "predicted"
    chunk_size: int = 64
    seed: int = 0
    batch_size: int | None = None
    output: Any = None
    top_k: int = 5
    #: "input": attributions at the input's resolution; "layer": a layer method's map at its layer's
    #: resolution (``Explanation.raw``, e.g. 7 x 7 for a CAM: 1,000x smaller than 224 x 224)
    maps: str = "input"

    def fingerprint(self) -> str:
        blob = json.dumps({"methods": self.methods, "metrics": self.metrics, "target": self.target,
                           "chunk_size": self.chunk_size, "seed": self.seed, "output": repr(self.output),
                           "maps": self.maps},
                          sort_keys=True, default=repr)
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass
class ChunkResult:
    """A computed chunk: attribution slices per method and one row per (sample, method)."""

    chunk: int
    start: int
    attributions: dict[str, np.ndarray]
    rows: list[dict[str, Any]]
    seconds: float = 0.0
    failed_samples: int = 0
    failed_rows: int = 0


@dataclass
class RunContext:
    """The model and data a worker needs (a picklable bundle, sent once to each Ray actor)."""

    module: torch.nn.Module
    labels: Sequence[str] | None
    preprocess: Callable[[Any], Tensor] | None
    source: Source
    config: RunConfig
    n: int
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def model_fingerprint(module: torch.nn.Module) -> str:
    """sha256 over the model's class and every parameter and buffer (names, dtypes, bytes)."""
    h = hashlib.sha256(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, t in module.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                 if t.numel() else b"")
    return h.hexdigest()


def chunk_bounds(n: int, chunk_size: int) -> list[tuple[int, int]]:
    return [(s, min(n, s + chunk_size)) for s in range(0, n, chunk_size)]


def row_schema(config: RunConfig) -> Any:
    """The Parquet schema of a row: fixed columns + one float column per metric."""
    import pyarrow as pa

    fields = [
        ("index", pa.int64()), ("sample_id", pa.string()), ("path", pa.string()), ("sha256", pa.string()),
        ("method", pa.string()), ("status", pa.string()), ("error", pa.string()),
        ("label", pa.int64()), ("prediction", pa.int64()), ("correct", pa.bool_()),
        ("target", pa.int64()), ("target_name", pa.string()), ("score", pa.float64()),
        ("prob_target", pa.float64()), ("prob_predicted", pa.float64()),
        ("top_classes", pa.list_(pa.int64())), ("top_probs", pa.list_(pa.float64())),
    ]
    fields += [(f"metric:{m}", pa.float64()) for m in config.metrics]
    fields += [("seconds", pa.float64()), ("provenance", pa.string())]
    return pa.schema(fields)


def _provenance() -> str:
    from .. import __version__

    return json.dumps({"perspicio": __version__, "torch": torch.__version__, "host": os.uname().nodename,
                       "pid": os.getpid()}, sort_keys=True)


def _finite(v: float) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


class _OutputTap:
    """Keeps the model's output on the chunk's own inputs when a method computes it anyway (CAMs,
    gradients, LRP, Shapley's v(all) run the unperturbed batch, often as a channels-last copy),
    so the predictions cost no pass of their own. A forward hook that lives only for one call; it
    matches the batch by shape and values, never by identity."""

    def __init__(self, module: torch.nn.Module, x: Tensor, select: Callable[[Any, int], Tensor]) -> None:
        self.module, self.x, self.select = module, x, select
        self.out: Tensor | None = None

    def _hook(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        if self.out is not None or not args or not isinstance(args[0], Tensor):
            return
        a = args[0]
        if a.shape == self.x.shape and a.dtype == self.x.dtype and torch.equal(a.detach(), self.x):
            self.out = self.select(output, len(a)).detach().float()

    def __enter__(self) -> _OutputTap:
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def load_chunk(ctx: RunContext, start: int, stop: int) -> Chunk:
    """Read and preprocess samples ``start..stop-1`` (unreadable ones are recorded, not raised)."""
    return ctx.source.load(list(range(start, stop)), ctx.preprocess)


def compute_chunk(ctx: RunContext, chunk: int, start: int, stop: int, data: Chunk | None = None) -> ChunkResult:
    """Compute chunk ``chunk`` (samples ``start..stop-1``) of the run described by ``ctx``;
    ``data``: the chunk already loaded by :func:`load_chunk` (the local engine prefetches)."""
    from ..core.batching import Engine
    from ..core.guard import model_guard
    from ..core.outputs import OutputSelector
    from ..core.registry import METHODS, METRICS
    from ..methods.base import build
    from ..metrics.base import NotApplicable

    t_start = time.perf_counter()
    cfg = ctx.config
    select = OutputSelector(cfg.output)
    indices = list(range(start, stop))
    if data is None:
        data = load_chunk(ctx, start, stop)
    n_chunk = len(indices)
    errors: dict[int, str] = dict(data.errors)
    tgt: list[int | None] = [None] * n_chunk
    ok = list(data.ok)
    x = data.x
    # targets known before any pass (labels, one class); 'predicted' comes from the first pass
    if x is not None and ok and cfg.target != "predicted":
        n_out = len(ctx.labels) if ctx.labels else None
        keep = []
        for row, k in enumerate(ok):
            t = data.labels[k] if cfg.target == "label" else int(cfg.target)
            if t is None:
                errors[k] = "no label for this sample (target='label')"
            elif n_out is not None and not 0 <= t < n_out:
                errors[k] = f"target {t} is not an output of the model ({n_out} outputs)"
            else:
                tgt[k] = t
                keep.append(row)
        if len(keep) < len(ok):
            x = x[keep] if keep else None
            ok = [ok[r] for r in keep]
    out: Tensor | None = None
    explanations: dict[str, Any] = {}
    method_errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for mname, mopts in cfg.methods.items():
        if x is None or not ok:
            break
        t0 = time.perf_counter()
        cls = METHODS.get(mname).cls
        opts = dict(mopts)
        if cfg.batch_size is not None and "batch_size" in cls.option_names():
            opts.setdefault("batch_size", cfg.batch_size)
        if ctx.labels is not None and "labels" in cls.option_names():
            opts.setdefault("labels", ctx.labels)
        if cfg.output is not None:
            opts.setdefault("output", cfg.output)
        targets: Any = None if out is None and cfg.target == "predicted" else [tgt[k] for k in ok]
        try:
            with _OutputTap(ctx.module, x, select) as tap:
                explanations[mname] = build(cls, ctx.module, **opts)(x, target=targets)
        except OptionError:
            raise
        except Exception as exc:  # one failing method must not stop the data set
            method_errors[mname] = str(exc) if isinstance(exc, PerspicioError) else f"{type(exc).__name__}: {exc}"
        seconds[mname] = time.perf_counter() - t0
        if out is None:
            out = tap.out
            if out is None:  # the method never ran the plain batch: one pass of our own
                engine = Engine(ctx.module, batch_size=cfg.batch_size, output=select)
                with torch.no_grad(), model_guard(ctx.module):
                    out = engine.evaluate(x).float()
            if out.ndim != 2:
                raise OptionError(f"a run needs one score per class, (N, classes); the model's output has shape "
                                  f"{tuple(out.shape)} (select one with output=).")
            if cfg.target == "predicted":
                pred_idx = out.argmax(1) if out.shape[1] > 1 else torch.zeros(len(out), dtype=torch.long)
                for row, k in enumerate(ok):
                    tgt[k] = int(pred_idx[row])
    pred: list[int | None] = [None] * n_chunk
    score: list[float | None] = [None] * n_chunk
    p_tgt: list[float | None] = [None] * n_chunk
    p_pred: list[float | None] = [None] * n_chunk
    top_c: list[list[int] | None] = [None] * n_chunk
    top_p: list[list[float] | None] = [None] * n_chunk
    if out is not None:
        probs = out.softmax(1) if out.shape[1] > 1 else None
        predicted = out.argmax(1) if out.shape[1] > 1 else torch.zeros(len(out), dtype=torch.long)
        for row, k in enumerate(ok):
            pred[k] = int(predicted[row])
            t = tgt[k]
            if t is None or not 0 <= t < out.shape[1]:
                errors[k] = f"target {t} is not an output of the model ({out.shape[1]} outputs)"
                continue
            score[k] = float(out[row, t])
            if probs is not None:
                p_tgt[k], p_pred[k] = float(probs[row, t]), float(probs[row, pred[k]])
                v, c = probs[row].topk(min(cfg.top_k, out.shape[1]))
                top_c[k], top_p[k] = c.tolist(), [float(p) for p in v]
    attributions: dict[str, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    targets_ok = [tgt[k] for k in ok]
    for mname in cfg.methods:
        shape = ctx.shapes.get(mname)
        values = np.full((n_chunk, *shape), np.nan, np.float32) if shape is not None else None
        metric_scores: dict[str, list[float | None]] = {m: [None] * n_chunk for m in cfg.metrics}
        exp = explanations.get(mname)
        t0 = time.perf_counter()
        if exp is not None:
            kept = exp.raw if cfg.maps == "layer" and exp.raw is not None else exp.attributions
            a = kept.detach().float().cpu().numpy()
            if values is None:
                shape = ctx.shapes[mname] = tuple(a.shape[1:])
                values = np.full((n_chunk, *shape), np.nan, np.float32)
            if tuple(a.shape[1:]) != tuple(values.shape[1:]):
                raise OptionError(f"{mname} returned attributions of shape {tuple(a.shape[1:])}; the store "
                                  f"holds {tuple(values.shape[1:])} (inputs of different sizes?).")
            values[ok] = a
            for metric, kopts in cfg.metrics.items():
                mcls = METRICS.get(metric).cls
                o = dict(kopts)
                o.setdefault("seed", cfg.seed)
                if cfg.batch_size is not None and "batch_size" in mcls.option_names():
                    o.setdefault("batch_size", cfg.batch_size)
                if cfg.output is not None:
                    o.setdefault("output", cfg.output)
                try:
                    res = mcls(**o)(ctx.module, x, exp, target=targets_ok)
                except NotApplicable:
                    continue
                for r, k in enumerate(ok):
                    metric_scores[metric][k] = _finite(float(res.scores[r]))
        if values is not None:
            attributions[mname] = values
        per_sample = (seconds.get(mname, 0.0) + time.perf_counter() - t0) / max(1, n_chunk)
        for k, i in enumerate(indices):
            err = errors.get(k) or (method_errors.get(mname) if k in ok else None)
            failed = err is not None or k not in ok
            row = {
                "index": i, "sample_id": data.ids[k], "path": data.paths[k], "sha256": data.hashes[k],
                "method": mname, "status": "failed" if failed else "ok", "error": err,
                "label": data.labels[k], "prediction": pred[k],
                "correct": (pred[k] == data.labels[k]) if pred[k] is not None and data.labels[k] is not None else None,
                "target": tgt[k], "target_name": _name(ctx.labels, tgt[k]), "score": score[k],
                "prob_target": p_tgt[k], "prob_predicted": p_pred[k], "top_classes": top_c[k], "top_probs": top_p[k],
                "seconds": per_sample, "provenance": _provenance(),
            }
            for metric in cfg.metrics:
                row[f"metric:{metric}"] = metric_scores[metric][k]
            rows.append(row)
    failed_samples = sum(1 for k in range(n_chunk) if k not in ok or k in errors)
    return ChunkResult(chunk, start, attributions, rows, time.perf_counter() - t_start, failed_samples,
                       sum(r["status"] == "failed" for r in rows))


def _name(labels: Sequence[str] | None, t: int | None) -> str | None:
    if t is None or labels is None:
        return None
    try:
        return str(labels[t])
    except (IndexError, TypeError):
        return None


# ----------------------------------------------------------------------------- engines


@dataclass
class Summary:
    """What a run did: chunk and sample counts, failures, time and throughput."""

    samples: int
    chunks: int
    computed_chunks: int = 0
    skipped_chunks: int = 0
    failed_samples: int = 0
    failed_rows: int = 0
    seconds: float = 0.0
    engine: str = "local"
    store: str = ""

    @property
    def samples_per_second(self) -> float:
        done = self.computed_chunks
        return (self.samples * done / max(1, self.chunks)) / self.seconds if self.seconds > 0 and done else 0.0

    def __str__(self) -> str:
        return (f"{self.samples} samples in {self.chunks} chunks: {self.computed_chunks} computed, "
                f"{self.skipped_chunks} already complete (skipped); {self.failed_samples} samples failed "
                f"({self.failed_rows} failed rows); {self.seconds:.1f} s"
                + (f", {self.samples_per_second:.1f} samples/s" if self.computed_chunks else "")
                + f" [{self.engine}] -> {self.store}")


class Progress:
    """A bar with samples/s and ETA on a terminal; one line per chunk otherwise; silent if off."""

    def __init__(self, enabled: bool, total: int, done: int) -> None:
        import sys

        self.enabled = enabled
        self.total, self.done = total, done
        self.t0 = time.perf_counter()
        self.computed = 0
        self.tty = enabled and sys.stderr.isatty()
        self.bar: Any = None
        if self.tty:
            import rich.progress as rp

            self.bar = rp.Progress(rp.TextColumn("run"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                    rp.TextColumn("{task.fields[rate]}"), rp.TimeRemainingColumn(), transient=True)
            self.bar.start()
            self.task = self.bar.add_task("run", total=total, completed=done, rate="")

    def advance(self, samples: int) -> None:
        import sys

        self.done += samples
        self.computed += samples
        rate = self.computed / max(1e-9, time.perf_counter() - self.t0)
        if self.tty:
            self.bar.update(self.task, completed=self.done, rate=f"{rate:.1f} samples/s")
        elif self.enabled:
            left = (self.total - self.done) / rate if rate > 0 else float("nan")
            print(f"run: {self.done}/{self.total} samples, {rate:.1f} samples/s, ETA {left:.0f} s",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def _spare_core() -> bool:
    """Whether a core is left over beside torch's threads for decoding and writes: only then do
    they overlap compute. Without one, a loader and a writer thread beside torch's OpenMP team make
    the team wait at its barriers for a descheduled thread, which costs more than the overlap gains
    (docs/benchmarks.md, "Data-set runs")."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores > torch.get_num_threads()


def run_local(ctx: RunContext, store: Store, pending: Sequence[int], progress: Progress,
              overlap: bool | None = None) -> tuple[int, int]:
    """Compute ``pending`` chunks here. With a spare core (``overlap=None``: :func:`_spare_core`)
    the next chunk is decoded and the previous one committed by two threads while a chunk computes;
    otherwise each chunk is read, computed and committed in turn."""
    bounds = chunk_bounds(ctx.n, ctx.config.chunk_size)
    schema = row_schema(ctx.config)
    if not (_spare_core() if overlap is None else overlap):
        failed_samples = failed_rows = 0
        for c in pending:
            start, stop = bounds[c]
            res = compute_chunk(ctx, c, start, stop)
            store.write_chunk(res.chunk, res.start, ctx.n, ctx.config.chunk_size, res.attributions, res.rows, schema)
            failed_samples += res.failed_samples
            failed_rows += res.failed_rows
            progress.advance(stop - start)
        return failed_samples, failed_rows
    q: queue.Queue[ChunkResult | None] = queue.Queue(maxsize=2)
    failure: list[BaseException] = []
    def writer() -> None:
        while True:
            item = q.get()
            if item is None:
                return
            if failure:
                continue
            try:
                store.write_chunk(item.chunk, item.start, ctx.n, ctx.config.chunk_size, item.attributions,
                                  item.rows, schema)
            except BaseException as exc:  # reported to the main thread, which stops
                failure.append(exc)

    thread = threading.Thread(target=writer, name="perspicio-run-writer", daemon=True)
    thread.start()
    failed_samples = failed_rows = 0
    # the next chunk is read and decoded while this one computes
    loader = ThreadPoolExecutor(1, thread_name_prefix="perspicio-run-loader")
    ahead = loader.submit(load_chunk, ctx, *bounds[pending[0]]) if pending else None
    try:
        for i, c in enumerate(pending):
            if failure:
                break
            start, stop = bounds[c]
            data = ahead.result() if ahead is not None else None
            ahead = loader.submit(load_chunk, ctx, *bounds[pending[i + 1]]) if i + 1 < len(pending) else None
            res = compute_chunk(ctx, c, start, stop, data)
            failed_samples += res.failed_samples
            failed_rows += res.failed_rows
            q.put(res)
            progress.advance(stop - start)
    finally:
        loader.shutdown(wait=True, cancel_futures=True)
        q.put(None)
        thread.join()
    if failure:
        raise failure[0]
    return failed_samples, failed_rows


def run_ray(ctx: RunContext, store: Store, pending: Sequence[int], progress: Progress, *,
            address: str | None, workers: int | None,
            on_started: Callable[[list[Any]], None] | None = None) -> tuple[int, int]:
    """Compute ``pending`` chunks on Ray actors (each holds the model once and commits its own chunks).

    An actor that dies (killed, out of memory) is replaced and its chunk runs again elsewhere;
    uncommitted chunks are recomputed whole, so retries never duplicate rows."""
    try:
        import ray
        from ray.exceptions import RayActorError, WorkerCrashedError
    except ImportError:
        raise OptionError("engine='ray' needs Ray: pip install 'perspicio[ray]'.") from None
    started = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                  "configure_logging": False}
        if address:
            kwargs["address"] = address
        else:
            kwargs["num_cpus"] = workers or os.cpu_count() or 1
        ray.init(**kwargs)
        started = True
    try:
        n_workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        ctx_ref = ray.put(ctx)
        store_path = store.url

        threads = torch.get_num_threads()

        @ray.remote(num_cpus=1, max_restarts=0)
        class Worker:
            def __init__(self, ctx_ref: Any) -> None:
                self.ctx = ctx_ref
                # Ray gives each actor one OpenMP thread; the driver's count keeps every reduction in
                # the same order as the local engine, so both engines give bit-identical results
                torch.set_num_threads(threads)

            def pid(self) -> int:
                return os.getpid()

            def process(self, chunk: int) -> tuple[int, int, int]:
                start, stop = chunk_bounds(self.ctx.n, self.ctx.config.chunk_size)[chunk]
                res = compute_chunk(self.ctx, chunk, start, stop)
                Store(store_path).write_chunk(chunk, start, self.ctx.n, self.ctx.config.chunk_size,
                                              res.attributions, res.rows, row_schema(self.ctx.config))
                return stop - start, res.failed_samples, res.failed_rows

        actors = [Worker.remote(ctx_ref) for _ in range(n_workers)]
        if on_started is not None:
            on_started(actors)
        todo = list(pending)
        running: dict[Any, tuple[Any, int]] = {}
        failed_samples = failed_rows = 0
        free = list(actors)
        while todo or running:
            while todo and free:
                actor = free.pop()
                c = todo.pop(0)
                running[actor.process.remote(c)] = (actor, c)
            ready, _ = ray.wait(list(running), num_returns=1)
            ref = ready[0]
            actor, c = running.pop(ref)
            try:
                n_done, fs, fr = ray.get(ref)
            except (RayActorError, WorkerCrashedError):
                todo.insert(0, c)  # the chunk was not committed (or is re-committed identically)
                free.append(Worker.remote(ctx_ref))
                continue
            except ray.exceptions.RayTaskError as exc:
                cause = exc.as_instanceof_cause()
                raise (cause if isinstance(cause, PerspicioError) else exc) from None
            failed_samples += fs
            failed_rows += fr
            progress.advance(n_done)
            free.append(actor)
        return failed_samples, failed_rows
    finally:
        if started:
            ray.shutdown()
