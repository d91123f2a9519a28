"""Helpers shared by the benchmark scripts: median timing, the model's own limit, tables.

The *limit* of a method is what the model itself costs for the passes the method
needs: ``passes / best throughput``, where the best throughput is measured here over
batch sizes (and memory formats). Everything runs in one process, so the ratios are
comparable even on a noisy shared machine; absolute seconds are not.

Run benchmarks with glibc's malloc kept from returning memory to the OS between
batches (page-fault noise otherwise dominates on the shared VM)::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python benchmarks/bench_x.py
"""

from __future__ import annotations

import contextlib
import copy
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MALLOC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
ROOT = Path(__file__).resolve().parent.parent


def malloc_note() -> str:
    """One line saying whether the recommended malloc settings are active."""
    got = {k: os.environ.get(k) for k in MALLOC_ENV}
    if all(got.values()):
        return " ".join(f"{k}={v}" for k, v in got.items())
    print("warning: MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ not set; timings will be noisier", file=sys.stderr)
    return "malloc defaults (MALLOC_* not set)"


def machine_note() -> str:
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn) for _ in range(max(1, repeats)))


def interleaved(fns: dict[str, Callable[[], object]], repeats: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median times of several contenders, run round-robin so load changes hit all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeats)):
        for k, fn in fns.items():
            times[k].append(timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


@contextlib.contextmanager
def channels_last_copy(model: nn.Module) -> Iterator[nn.Module]:
    """A channels-last deep copy of ``model`` (the original is left alone)."""
    yield copy.deepcopy(model).to(memory_format=torch.channels_last)


@dataclass
class Throughput:
    """Samples per second by (memory format, batch size), and the best of them."""

    forward: dict[tuple[str, int], float]
    best_forward: float
    best_forward_at: tuple[str, int]


def forward_throughput(
    model: nn.Module,
    sample: torch.Tensor,
    batch_sizes: Sequence[int] = (1, 8, 16, 32, 64),
    formats: Iterable[str] = ("contiguous", "channels_last"),
    repeats: int = 3,
) -> Throughput:
    """Best no-grad forward throughput of ``model`` on copies of ``sample`` (1, C, H, W)."""
    results: dict[tuple[str, int], float] = {}
    for fmt in formats:
        if fmt == "channels_last":
            m = copy.deepcopy(model).to(memory_format=torch.channels_last)
        else:
            m = model
        for bs in batch_sizes:
            xb = sample.repeat(bs, 1, 1, 1)
            if fmt == "channels_last":
                xb = xb.contiguous(memory_format=torch.channels_last)

            def fwd(xb: torch.Tensor = xb, m: nn.Module = m) -> None:
                with torch.no_grad():
                    m(xb)

            results[(fmt, bs)] = bs / median_time(fwd, repeats=repeats)
    best_at = max(results, key=results.get)
    return Throughput(results, results[best_at], best_at)


def forward_backward_time(model: nn.Module, sample: torch.Tensor, target: int, repeats: int = 5) -> float:
    """Median time of one forward + backward (to the input) at batch 1, parameters frozen."""
    params = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in params:
        p.requires_grad_(False)

    def step() -> None:
        xi = sample.clone().requires_grad_(True)
        torch.autograd.grad(model(xi)[:, target].sum(), xi)

    try:
        return median_time(step, repeats=repeats)
    finally:
        for p, req in params:
            p.requires_grad_(req)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (also readable on a terminal)."""

    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def write_section(title: str, body: str, path: Path | None = None) -> Path:
    """Replace (or append) the ``## title`` section of docs/benchmarks.md with ``body``."""
    path = path or ROOT / "docs" / "benchmarks.md"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    head = f"## {title}"
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.strip() == head), None)
    new = [head, "", *body.strip().splitlines(), ""]
    if start is None:
        lines = [*lines, "", *new] if lines and lines[-1].strip() else [*lines, *new]
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines = [*lines[:start], *new, *lines[end:]]
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
