"""What a :func:`~perspicio.metrics.compare` run will cost, and telling the user as it goes.

The cost of a comparison is counted in model passes per explained sample: each method needs some
forward and backward passes (:func:`method_passes`, from its options: path steps, noise samples,
perturbation budgets), each metric some forward passes and some re-explanations
(``Metric.cost()``). The model's own time per pass is measured once on the inputs (a batch of
copies, warm), so the plan's seconds are passes x measured time - an estimate that the run then
replaces with measured times, method by method.

:class:`Reporter` prints the plan before the work starts and, while it runs, a progress bar that
names the current step on a terminal, or one line per finished step otherwise (a log file or a
CI job sees progress too). Nothing is printed unless ``progress=True``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import torch
from torch import Tensor, nn

#: method options that set the number of model passes per sample, in the order they are looked up
PASS_OPTIONS = ("steps", "samples", "budget")
#: path nodes assumed for ``steps="auto"`` (integrated gradients on the bundled model used 21-45 nodes
#: to reach a 1% completeness error on four sample images; docs/benchmarks.md)
AUTO_STEPS_ESTIMATE = 32


@dataclass(frozen=True)
class PassTimes:
    """Measured seconds per sample of one forward pass and of one forward + backward pass."""

    forward: float
    forward_backward: float

    @property
    def backward(self) -> float:
        return max(0.0, self.forward_backward - self.forward)


def measure_pass_times(module: nn.Module, x: Tensor, select: Callable[[Any, int], Tensor], copies: int = 16) -> PassTimes:
    """Time one warm output-only pass (the path the metrics' passes take: the engine's inference
    twin) and one forward + backward on ``copies`` copies of the first input, per sample. Runs
    under the caller's model guard."""
    from ..core.batching import Engine

    xb = x[:1].expand(copies, *x.shape[1:]).contiguous()
    engine = Engine(module, output=select)
    with torch.no_grad():
        engine.evaluate(xb)  # warm-up: the twin is built, kernels are chosen
        t0 = time.perf_counter()
        engine.evaluate(xb)
        t_f = (time.perf_counter() - t0) / copies
    xg = xb.detach().requires_grad_(True)
    t0 = time.perf_counter()
    with torch.enable_grad():
        out = select(module(xg), copies)
        target = out.reshape(copies, -1)[:, 0].sum()
        try:
            torch.autograd.grad(target, xg)
            t_fb = (time.perf_counter() - t0) / copies
        except RuntimeError:  # an output that does not depend on the input by autograd: 3 x forward
            t_fb = 3 * t_f
    return PassTimes(t_f, max(t_fb, t_f))


def method_passes(cls: type, family: str, options: Mapping[str, Any], x: Tensor) -> tuple[int, int]:
    """Estimated (forward, backward) passes per sample of a method with these options.

    Read from the options that set them (``steps`` of path methods, ``samples`` of noise and
    Shapley-style samplers, ``budget`` of perturbation methods, occlusion's windows); families
    without such an option take one forward and one backward pass (CAMs, gradients, LRP). An
    estimate: the run prints the measured time of every method."""
    import inspect

    def option(name: str) -> Any:
        if name in options:
            return options[name]
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None:
                continue
            p = inspect.signature(inspect.unwrap(init)).parameters.get(name)
            if p is not None and p.default is not inspect.Parameter.empty:
                return p.default
        return None

    if getattr(cls, "name", "") == "occlusion":
        h, w = x.shape[-2:]
        win, stride = option("window"), option("stride")
        win = win if isinstance(win, int) else max(1, min(h, w) // 8)
        stride = stride if isinstance(stride, int) else max(1, win // 2)
        n = (max(1, (h - win) // stride + 1)) * (max(1, (w - win) // stride + 1))
        return n + 1, 0
    for name in PASS_OPTIONS:
        v = option(name)
        if v == "auto":  # refined until converged: a typical count (the run reports the measured time)
            return AUTO_STEPS_ESTIMATE, AUTO_STEPS_ESTIMATE
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            backward = family in ("path", "noise")
            return v, (v if backward else 0)
    if family in ("perturbation", "shapley", "surrogate"):
        return 256, 0  # a typical budget when the method sets it from the input
    return 1, 1


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 90:
        return f"{s:.1f} s"
    return f"{s / 60:.1f} min"


class Reporter:
    """Plan, then progress: a bar naming the current step on a terminal, one line per finished
    step otherwise. Units are estimated seconds, so the bar's remaining time follows the plan's
    estimate and corrects itself with the measured times."""

    def __init__(self, enabled: bool, total_estimate: float, steps: int, stream: IO[str] | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.steps, self.done = steps, 0
        self.estimates: dict[Any, float] = {}
        self.t0 = time.perf_counter()
        self.tty = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar: Any = None
        if self.tty:
            import rich.console
            import rich.progress as rp

            self.bar = rp.Progress(rp.TextColumn("{task.description}"), rp.BarColumn(), rp.TextColumn("{task.fields[count]}"),
                                   rp.TimeElapsedColumn(), rp.TextColumn("~"), rp.TimeRemainingColumn(),
                                   transient=True, console=rich.console.Console(file=self.stream))
            self.bar.start()
            self.task = self.bar.add_task("compare", total=max(total_estimate, 1e-3), count=f"0/{steps}")

    def say(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text, highlight=False, markup=False)
        else:
            print(text, file=self.stream, flush=True)

    def start(self, description: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, description=description)

    def finish(self, line: str, estimate: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=estimate, count=f"{self.done}/{self.steps}")
        elif self.enabled:
            print(f"compare [{self.done}/{self.steps}] {line}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def plan_text(model_name: str, n: int, times: PassTimes, methods: Sequence[str], method_cost: Mapping[str, tuple[int, int]],
              method_seconds: Mapping[str, float], metrics: Sequence[str], metric_cost: Mapping[str, tuple[int, int]],
              metric_seconds: Mapping[str, float], opt_in: Sequence[str]) -> str:
    """The plan printed before a comparison starts."""
    total_m = sum(method_seconds.values())
    total_k = sum(metric_seconds.values())
    lines = [
        f"compare: {len(methods)} methods x {len(metrics)} metrics on {n} input{'s' if n != 1 else ''} "
        f"({model_name}: {format_seconds(times.forward)} per forward, {format_seconds(times.forward_backward)} per "
        f"forward+backward and sample, measured)",
        "  methods (passes per sample): " + ", ".join(
            f"{m} {method_cost[m][0]}f+{method_cost[m][1]}b" if method_cost[m][1] else f"{m} {method_cost[m][0]}f"
            for m in methods) + f"  -> est. {format_seconds(total_m)}",
    ]
    if metrics:
        lines.append("  metrics (per method and sample): " + ", ".join(
            f"{k} {metric_cost[k][0]}f" + (f"+{metric_cost[k][1]} re-explanations" if metric_cost[k][1] else "")
            for k in metrics) + f"  -> est. {format_seconds(total_k)}")
    lines.append(f"  estimated total {format_seconds(total_m + total_k)}"
                 + (f"; expensive metrics not chosen (opt in by name): {', '.join(opt_in)}" if opt_in else ""))
    return "\n".join(lines)
