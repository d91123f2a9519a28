"""The one engine that pushes many inputs through a model in chunks.

Score-CAM masks, Ablation-CAM copies, occlusion windows, IG steps, SmoothGrad
noise, Shapley coalitions and metric curves are all "many inputs through the
model". :class:`Engine` chunks them under ``batch_size`` (or a memory budget from
which the batch size is derived), counts forward/backward passes for the
provenance, and shows a progress bar on request.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import OptionError
from . import incremental
from .allocator import allocator_tuned
from .caches import Cache
from .fold import compiled_outputs, inference_twin
from .fuse import fused_twin
from .incremental import IncrementalEvaluator
from .options import check_float, check_int

#: default memory budget for one chunk (bytes); override per call or with PERSPICIO_MEMORY_BUDGET
DEFAULT_MEMORY_BUDGET = int(float(os.environ.get("PERSPICIO_MEMORY_BUDGET", 1.5 * 2**30)))
#: largest chunk used when the budget would allow more (throughput is flat beyond this on CPU)
MAX_AUTO_BATCH = 64
#: without allocator tuning, output-only chunks keep their largest feature map below this:
#: glibc's mmap threshold adapts up to 32 MiB, below which freed buffers are reused from the
#: heap instead of mapped afresh (see core/allocator.py). Fused twin of the bundled model,
#: untuned, img/s by batch: 1: 113, 2: 158, 4: 186, 6: 205, 8: 167, 16: 89 (4.6 MiB per sample)
UNTUNED_CHUNK_BYTES = 30 * 2**20
#: cap for low-dimensional samples (tabular rows (1, F), token sequences): cheap per row
MAX_AUTO_ROWS = 4096
#: feed 4-D inputs to convolutional models in channels-last memory format (same values, faster
#: CPU convolutions, see docs/benchmarks.md "CAM family"); PERSPICIO_CHANNELS_LAST=0 turns it off
CHANNELS_LAST = os.environ.get("PERSPICIO_CHANNELS_LAST", "1") not in ("0", "false", "no")

#: per model and input shape: (sum, largest) bytes of the leaf-module outputs for one sample
_ACT_BYTES = Cache("activation profiles", holds="per-sample activation bytes (measured once)",
                   key="model (weak), input shape", max_entries=4096)
#: per model: may inputs be passed channels-last (has Conv2d layers, does not .view() them)?
_CL_OK = Cache("channels-last support", holds="whether a model takes channels-last inputs", key="model (weak)",
               max_entries=4096)


def activation_profile(model: nn.Module, sample: Tensor) -> tuple[int, int]:
    """(sum, largest) bytes of the leaf-module outputs for ONE sample, measured once and
    cached per model and input shape.

    The sum bounds what autograd keeps alive for a backward pass; without gradients
    intermediates are freed as the forward proceeds, so the live set is a few of the
    largest outputs, not their sum.
    """
    declared = getattr(model, "bytes_per_sample", None)
    if callable(declared):  # black boxes declare an estimate instead of being probed
        b = int(declared(sample))
        return b, b
    key = (tuple(sample.shape[1:]), sample.dtype, str(sample.device))
    hit = _ACT_BYTES.get(model, key)
    if hit is not None:
        return hit
    total, largest = [0], [0]

    def hook(mod: nn.Module, args: object, out: object) -> None:
        if isinstance(out, Tensor):
            b = out.numel() * out.element_size()
            total[0] += b
            largest[0] = max(largest[0], b)

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(sample[:1])
    finally:
        for h in handles:
            h.remove()
    floor = sample[:1].numel() * sample.element_size()
    return _ACT_BYTES.put(model, (max(total[0], floor), max(largest[0], floor)), key)


def activation_bytes(model: nn.Module, sample: Tensor) -> int:
    """Bytes of all leaf-module outputs for ONE sample (what a backward pass keeps alive)."""
    return activation_profile(model, sample)[0]


#: live no-grad activations per sample, in units of the largest layer output (input, output,
#: a residual branch and allocator slack)
NO_GRAD_LIVE_FACTOR = 4


def chunks(n: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, size):
        yield start, min(n, start + size)


@dataclass
class Engine:
    """Chunked evaluation with pass counting.

    ``batch_size`` wins if given; otherwise the chunk is the memory budget divided
    by the measured per-sample memory (with gradients: 3x the sum of all layer
    outputs; without: 4x the largest one), capped at :data:`MAX_AUTO_BATCH`.
    """

    model: nn.Module
    batch_size: int | None = None
    memory_budget: int | None = None
    progress: bool | Callable[[int, int, str], None] = False
    forwards: int = 0
    backwards: int = 0
    chunk_sizes: list[int] = field(default_factory=list)
    folded: int | None = None  # BatchNorm layers folded in the inference twin (None: not used)
    compile: bool = False  # run output-only passes through torch.compile'd inference twins
    compiled: int = 0  # samples evaluated by a compiled twin
    fused: int = 0  # convolutions fused with their activation/padding in the twin that ran
    #: maps the model's raw output to the tensor to explain (core/outputs.py ``OutputSelector``,
    #: called as ``output(raw, n)``); None: outputs are used as returned
    output: Callable[..., Tensor] | None = None
    _twin: tuple[nn.Module, int] | None = field(default=None, repr=False)
    _boxes: IncrementalEvaluator | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        check_int("batch_size", self.batch_size, minimum=1, allow_none=True)
        check_float("memory_budget", self.memory_budget, minimum=0, strict=True, allow_none=True, hint="bytes")

    def chunk_size(self, sample: Tensor, *, grad: bool = False, local: bool = False) -> int:
        """Samples per chunk. ``local``: copies that differ from one sample inside small boxes
        (occlusion), which the incremental path computes as crops in the large early layers, so
        the untuned-allocator cap on large feature maps does not apply."""
        if self.batch_size is not None:
            return self.batch_size
        total, largest = activation_profile(self.model, sample)
        per = total * 3 if grad else largest * NO_GRAD_LIVE_FACTOR
        budget = self.memory_budget or DEFAULT_MEMORY_BUDGET
        cap = MAX_AUTO_BATCH if sample.ndim > 2 else MAX_AUTO_ROWS
        if not grad and not local and sample.ndim > 2 and not allocator_tuned():
            # glibc would mmap/unmap every large feature map: small chunks reuse heap buffers
            cap = max(1, min(cap, UNTUNED_CHUNK_BYTES // max(largest, 1)))
        return int(max(1, min(cap, budget // max(per, 1))))

    def forward(self, x: Tensor, *, count: int | None = None, module: nn.Module | None = None) -> Tensor:
        """``model(x)``, counted as ``count`` samples (default ``len(x)``; more when a hook
        expands the batch inside the model, as Ablation-CAM does). ``module``: a function-
        preserving substitute of the model to run instead (its inference twin)."""
        self.forwards += len(x) if count is None else count  # tensors, or lists of strings for text black boxes
        return self._run(self.model if module is None else module, x, count)

    def evaluate(self, x: Tensor, *, count: int | None = None, around: Sequence[Tensor] = ()) -> Tensor:
        """Pure model outputs for ``x``: like :meth:`forward`, but for passes that need no
        hooks and no gradients (perturbations, masked copies, metric curves), which run the
        model's BatchNorm-folded inference twin (:mod:`perspicio.core.fold`) - the same
        function, one fewer pass over every feature map.

        ``around``: samples (C, H, W) the images in ``x`` are copies of. When every copy differs
        from one of them only inside a small box (one occluded patch or superpixel, a coalition
        of few features), the batch is evaluated incrementally (:meth:`evaluate_boxes`)."""
        if torch.is_grad_enabled() or not isinstance(x, Tensor):
            return self.forward(x, count=count)
        if around and x.ndim == 4 and count is None and incremental.INCREMENTAL:
            return self._evaluate_local(x, around)
        module = self._inference_module(x[:1])
        self.forwards += len(x) if count is None else count
        if module is not self.model:
            module = self._dense_module(module, x)
        if self.compile and module is not self.model:
            xc = x.contiguous(memory_format=torch.channels_last) if self.prefers_channels_last(x) else x
            out = compiled_outputs(module, xc)  # the fused twin compiled: 5% faster than it on the bundled model
            if out is not None:
                self.compiled += len(x)
                return out if self.output is None else self.output(out, len(x))
        return self._run(module, x, count)

    def _dense_module(self, module: nn.Module, x: Tensor) -> nn.Module:
        """The fused form of the inference twin for dense no-grad batches like ``x``
        (:mod:`perspicio.core.fuse`), or ``module`` itself."""
        if module is self.model or torch.is_grad_enabled() or not isinstance(x, Tensor) or x.ndim != 4:
            return module
        fused, n = fused_twin(module, x[:1])
        self.fused = max(self.fused, n)
        return fused

    def _inference_module(self, sample: Tensor) -> nn.Module:
        """The inference twin for output-only passes, looked up once per engine (one call: the
        weights cannot change mid-call)."""
        if self._twin is None:
            self._twin = inference_twin(self.model, sample)
        module, self.folded = self._twin
        return module

    def _evaluate_local(self, x: Tensor, around: Sequence[Tensor]) -> Tensor:
        """:meth:`evaluate` for copies of the samples in ``around``: the copies that differ from
        one of them only inside a small box go through :meth:`evaluate_boxes` (one group per
        reference), the others as an ordinary batch."""
        height, width = x.shape[-2:]
        area = torch.full((len(x),), height * width + 1)
        which = torch.full((len(x),), -1)
        spans = []
        for j, ref in enumerate(around):
            if tuple(ref.shape) != tuple(x.shape[1:]):
                spans.append(None)
                continue
            fr, lr, fc, lc = incremental.difference_spans(x, ref)
            spans.append((fr, lr, fc, lc))
            a = (lr - fr + 1) * (lc - fc + 1)
            better = a < area
            area, which = torch.where(better, a, area), torch.where(better, j, which)
        local = area <= incremental.LOCAL_FRACTION * height * width
        for j in range(len(around)):
            if int((local & (which == j)).sum()) < incremental.MIN_GROUP:
                local &= which != j
        if not bool(local.any()):
            return self.evaluate(x)
        pieces = []
        for j, ref in enumerate(around):
            idx = torch.nonzero(local & (which == j)).flatten()
            if len(idx):
                rows, cols, h, w = incremental.common_boxes(*(s[idx] for s in spans[j]), height, width)
                data = incremental.crop_windows(x[idx], rows, cols, h, w)
                pieces.append((idx, self.evaluate_boxes(ref, data, rows, cols)))
        rest = torch.nonzero(~local).flatten()
        if len(rest):
            pieces.append((rest, self.evaluate(x[rest])))
        out = pieces[0][1].new_empty((len(x), *pieces[0][1].shape[1:]))
        for idx, values in pieces:
            out[idx] = values
        return out

    def evaluate_boxes(self, sample: Tensor, data: Tensor, rows: list[int], cols: list[int]) -> Tensor:
        """Pure outputs for ``len(rows)`` copies of ``sample`` (C, H, W), copy ``i`` equal to
        ``data[i]`` inside the box at ``(rows[i], cols[i])`` and to ``sample`` elsewhere (occlusion
        windows). Convolutional models are evaluated incrementally: only the boxes and their
        growing halo are recomputed in the early layers (:mod:`perspicio.core.incremental`); the
        result equals :meth:`evaluate` on the dense copies up to float rounding."""
        module = self._inference_module(sample[None])
        if self._boxes is None:
            boxed = module if self.output is None else _Selecting(module, self.output)
            self._boxes = IncrementalEvaluator(boxed, self.model,
                                               lambda x: self._run_capped(self._dense_module(module, x), x))
            # without convolutions nothing stays local (black boxes, MLPs, transformers): dense batches
            self._boxes.enabled &= any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
        base = sample[None]
        if self.prefers_channels_last(base):
            base = base.contiguous(memory_format=torch.channels_last)
            data = data.contiguous(memory_format=torch.channels_last)
        self.forwards += len(rows)
        with torch.no_grad():
            return self._boxes(base, data, rows, cols, owner=sample)

    def _run_capped(self, module: nn.Module, x: Tensor) -> Tensor:
        """``module(x)`` in pieces of the ordinary output-only chunk size: dense fallbacks of the
        incremental path, whose chunks may be larger than dense batches should be."""
        size = self.chunk_size(x[:1]) if self.batch_size is None else len(x)
        return torch.cat([self._run(module, x[i:i + size]) for i in range(0, len(x), size)])

    def _run(self, module: nn.Module, x: Tensor, rows: int | None = None) -> Tensor:
        """``module(x)``, its output selected (``rows``: output rows expected, default ``len(x)``)."""
        out = self._call(module, x)
        return out if self.output is None else self.output(out, len(x) if rows is None else rows)

    def _call(self, module: nn.Module, x: Tensor) -> Tensor:
        if self.prefers_channels_last(x):
            try:
                return module(x.contiguous(memory_format=torch.channels_last))
            except RuntimeError as exc:  # a model that calls .view() on its feature maps
                if "view size is not compatible" not in str(exc):
                    raise
                _CL_OK.put(self.model, False)
        return module(x)

    def prefers_channels_last(self, x: object) -> bool:
        """Whether this engine feeds ``x`` to the model in channels-last memory format (callers
        that build large batches can build them in that format directly and save a copy)."""
        if not CHANNELS_LAST or not isinstance(x, Tensor) or x.ndim != 4 or x.is_contiguous(memory_format=torch.channels_last):
            return False
        ok = _CL_OK.get(self.model)
        if ok is None:
            ok = _CL_OK.put(self.model, any(isinstance(m, nn.Conv2d) for m in self.model.modules()))
        return ok

    def grad(self, output: Tensor, inputs: Tensor | list[Tensor], n: int) -> tuple[Tensor, ...]:
        self.backwards += n
        return torch.autograd.grad(output, inputs)

    def map(
        self,
        fn: Callable[[int, int], Tensor],
        n: int,
        *,
        sample: Tensor,
        grad: bool = False,
        description: str = "evaluating",
        local: bool = False,
        multiple: int = 1,
    ) -> Tensor:
        """Call ``fn(start, stop)`` over ``range(n)`` in chunks and concatenate the results.

        ``multiple``: chunks hold a multiple of this many items when the budget allows (DeepSHAP
        keeps whole copies of its background in a chunk, so every chunk pairs the same rows)."""
        size = self.chunk_size(sample, grad=grad, local=local)
        if multiple > 1 and size > multiple:
            size -= size % multiple
        self.chunk_sizes.append(size)
        parts = []
        with progress_bar(self.progress, n, description) as advance:
            for start, stop in chunks(n, size):
                if grad:
                    parts.append(fn(start, stop))
                else:
                    with torch.no_grad():
                        parts.append(fn(start, stop))
                advance(stop - start)
        return torch.cat(parts, dim=0)

    def run(
        self,
        fn: Callable[[int, int], None],
        n: int,
        *,
        sample: Tensor,
        grad: bool = False,
        description: str = "evaluating",
    ) -> None:
        """Like :meth:`map`, but ``fn`` accumulates its results itself (e.g. ``index_add_``),
        so memory stays at one chunk however large ``n`` is (IG with many steps)."""
        size = self.chunk_size(sample, grad=grad)
        self.chunk_sizes.append(size)
        with progress_bar(self.progress, n, description) as advance:
            for start, stop in chunks(n, size):
                if grad:
                    fn(start, stop)
                else:
                    with torch.no_grad():
                        fn(start, stop)
                advance(stop - start)

    def stats(self) -> dict[str, int | list[int]]:
        stats: dict[str, int | list[int]] = {"forward_samples": self.forwards, "backward_samples": self.backwards,
                                             "chunk_sizes": self.chunk_sizes}
        if self.folded:
            stats["batchnorm_folded"] = self.folded
        if self.compiled:
            stats["compiled_samples"] = self.compiled
        if self.fused:
            stats["convolutions_fused"] = self.fused
        if self._boxes is not None and self._boxes.served:
            stats["incremental_samples"] = self._boxes.served
        return stats


class _Selecting:
    """``module`` followed by the engine's output selection, for the incremental evaluator (which
    calls it on box tensors; built per engine, it keys nothing)."""

    def __init__(self, module: nn.Module, output: Callable[..., Tensor]) -> None:
        self.module, self.output = module, output

    def __call__(self, x: Tensor) -> Tensor:
        return self.output(self.module(x), len(x))


class _NoBar:
    def __enter__(self) -> Callable[[int], None]:
        return lambda k: None

    def __exit__(self, *exc: object) -> None:
        return None


class _RichBar:
    def __init__(self, total: int, description: str) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), transient=True
        )
        self.total = total
        self.description = description

    def __enter__(self) -> Callable[[int], None]:
        self.progress.start()
        task = self.progress.add_task(self.description, total=self.total)
        return lambda k: self.progress.advance(task, k)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


class _CallbackBar:
    """Progress reported to a callable ``fn(done, total, description)`` after every chunk (a web
    page, a log, a notebook widget)."""

    def __init__(self, fn: Callable[[int, int, str], None], total: int, description: str) -> None:
        self.fn, self.total, self.description, self.done = fn, total, description, 0

    def __enter__(self) -> Callable[[int], None]:
        self.fn(0, self.total, self.description)

        def advance(k: int) -> None:
            self.done += k
            self.fn(self.done, self.total, self.description)

        return advance

    def __exit__(self, *exc: object) -> None:
        return None


def check_progress(progress: Any) -> bool | Callable[[int, int, str], None]:
    """``progress`` as every method takes it: True/False (a terminal bar) or a callable
    ``fn(done, total, description)`` called after every chunk of passes."""
    if isinstance(progress, bool) or callable(progress):
        return progress
    raise OptionError(f"progress must be True, False or a callable fn(done, total, description); got {progress!r}.")


def progress_bar(enabled: bool | Callable[[int, int, str], None], total: int,
                 description: str) -> _NoBar | _RichBar | _CallbackBar:
    """A rich progress bar context yielding ``advance(k)``, or a no-op one (also when the output is
    not a terminal: a transient bar there would only leave a blank line behind); a callable
    ``enabled`` receives ``(done, total, description)`` after every chunk instead."""
    if callable(enabled) and not isinstance(enabled, bool):
        return _CallbackBar(enabled, total, description)
    if enabled:
        from rich.console import Console

        enabled = Console().is_terminal
    return _RichBar(total, description) if enabled else _NoBar()
