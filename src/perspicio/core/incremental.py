"""Incremental inference: evaluate copies of one image that differ from it only inside a box.

An occlusion sweep runs hundreds of copies of the same image, each changed only inside its
window. In a convolutional network the change spreads slowly: after a k x k convolution it
covers the window plus a (k - 1)-pixel halo (divided by the stride), so in the early,
high-resolution layers - which take most of the time on CPU (on EfficientNet-Lite0 the stages
up to 28 x 28 are ~55% of a forward pass) - almost every output equals the unchanged
image's. Here each copy is carried as the unchanged image's activation (computed once, at
batch 1, and cached for the whole sweep) plus the values inside a box per copy; convolutions
compute only the boxes (input box + halo, no padding), element-wise operations act on the
boxes, residual adds merge two boxes. When a box grows past :data:`DENSE_FRACTION` of its
feature map, or the network calls anything else (pooling, reshapes, attention, ...), the
copies are materialised as an ordinary batch and the rest of the network runs as usual. The
idea is that of incremental CNN inference for occlusion (Nakandala et al., "Incremental and
approximate inference for faster occlusion-based deep CNN explanations", SIGMOD 2019).

The values are those of the full forward pass up to float rounding (the same products, summed
by convolutions over a smaller extent). Anything the interpreter cannot follow exactly - an
in-place operation on a copy, a convolution with string padding, a tensor argument that
varies over space - raises :class:`Unsupported` and the caller evaluates the batch densely;
:func:`evaluate_boxes` also compares one copy with its dense evaluation the first time it sees
a model and turns itself off for that model on any mismatch.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .caches import Cache
from .calls import out_of_place
from .fold import outputs_match
from .ops import METADATA

#: incremental occlusion on/off (PERSPICIO_INCREMENTAL=0: always dense batches)
INCREMENTAL = os.environ.get("PERSPICIO_INCREMENTAL", "1") not in ("0", "false", "no")
#: boxes larger than this fraction of their feature map are materialised (dense is cheaper then)
DENSE_FRACTION = 0.5
#: a copy is evaluated incrementally only if its box covers at most this fraction of the input
#: (larger boxes reach DENSE_FRACTION within a layer or two, and splitting the batch costs more;
#: whether a box size pays off is also measured per model, see IncrementalEvaluator). Against the
#: fused twin's dense batches (core/fuse.py) single superpixels of a ~40-segment SLIC mask no longer
#: pay off, occlusion windows and 16-px patches still do (docs/benchmarks.md, "Perturbation")
LOCAL_FRACTION = 0.03
#: and only in groups of at least this many copies (a group runs as its own, smaller batch)
MIN_GROUP = 4

#: per model: None = not checked yet, True = verified, False = gave a different answer once
_VERIFIED = Cache("incremental verification", holds="whether the incremental interpreter matched a model",
                  key="model (weak)", max_entries=4096)


class Unsupported(Exception):
    """The interpreter cannot follow this call exactly; evaluate the batch densely instead."""


# ============================================================================ the carried value


@dataclass
class Boxes:
    """``len(rows)`` copies of ``base`` (1, C, H, W), copy ``i`` replaced by ``data[i]`` inside
    the box of height/width ``data.shape[-2:]`` at ``(rows[i], cols[i])``."""

    base: Tensor
    data: Tensor
    rows: list[int]
    cols: list[int]
    cache: BaseCache

    @property
    def size(self) -> tuple[int, int]:
        return int(self.data.shape[-2]), int(self.data.shape[-1])

    def dense(self) -> Tensor:
        """The copies as an ordinary (B, C, H, W) batch."""
        n = len(self.rows)
        fmt = torch.channels_last if _is_channels_last(self.base) else torch.contiguous_format
        out = self.base.expand(n, *self.base.shape[1:]).contiguous(memory_format=fmt)
        h, w = self.size
        for i, (r, c) in enumerate(zip(self.rows, self.cols)):
            out[i, :, r:r + h, c:c + w] = self.data[i]
        return out

    def crop(self, source: Tensor, rows: Sequence[int], cols: Sequence[int], h: int, w: int,
             shift: tuple[int, int] = (0, 0)) -> Tensor:
        """The copies' values over new boxes ``(rows[i], cols[i], h, w)`` given in the coordinates
        of ``source`` - the base itself or the base padded by ``shift`` (top, left)."""
        if (h, w) == self.size and shift == (0, 0) and list(rows) == self.rows and list(cols) == self.cols:
            return self.data  # the same boxes (1x1 convolutions): nothing to gather
        region = crop_windows(source, rows, cols, h, w)
        bh, bw = self.size
        for i in range(len(rows)):
            top = self.rows[i] + shift[0] - rows[i]
            left = self.cols[i] + shift[1] - cols[i]
            r0, r1 = max(top, 0), min(top + bh, h)
            c0, c1 = max(left, 0), min(left + bw, w)
            if r0 < r1 and c0 < c1:
                region[i, :, r0:r1, c0:c1] = self.data[i, :, r0 - top:r1 - top, c0 - left:c1 - left]
        return region


def crop_windows(source: Tensor, rows: Sequence[int], cols: Sequence[int], h: int, w: int) -> Tensor:
    """``(len(rows), C, h, w)`` crops at ``(rows[i], cols[i])`` of ``source`` (1, C, H, W) - or of
    its own image ``source[i]`` when it holds one per crop - in one gather: every (h, w) window as
    a strided view (B, H-h+1, W-w+1, h, w, C) indexed by the corners, in channels-last order (so
    the result is channels-last)."""
    bhwc = source.permute(0, 2, 3, 1)
    sb, sr, sc, sch = bhwc.stride()
    b, height, width, ch = bhwc.shape
    windows = bhwc.as_strided((b, height - h + 1, width - w + 1, h, w, ch), (sb, sr, sc, sr, sc, sch))
    dev = source.device
    if b not in (1, len(rows)):
        raise ValueError(f"crop_windows: {b} source images for {len(rows)} crops")
    which = torch.arange(len(rows), device=dev) if b > 1 else torch.zeros(len(rows), dtype=torch.long, device=dev)
    return windows[which, torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)].permute(0, 3, 1, 2)


class BaseCache:
    """The unchanged image's value after each call, in call order: computed on the first batch
    of a sweep and reused by every later one (the network calls the same operations in the same
    order each time; a mismatch of function, shape, weight tensor or constant arguments - a
    forward whose control flow depends on the batch - recomputes from there)."""

    def __init__(self) -> None:
        self.values: list[tuple[Any, tuple, Tensor]] = []
        self.position = 0

    def get(self, func: Any, key: tuple, compute: Callable[[], Tensor]) -> Tensor:
        """The cached value of the next call if it is the same call (function, shapes, and the
        very same tensor objects - held here, so a new tensor cannot reuse an old one's id)."""
        i = self.position
        self.position += 1
        if i < len(self.values) and self.values[i][0] is func and _same(self.values[i][1], key):
            return self.values[i][2]
        del self.values[i:]
        value = compute()
        self.values.append((func, key, value))
        return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return a is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable objects: treat as different (recompute)
        return False


class BoxTensor(torch.Tensor):
    """A (B, C, H, W) tensor whose storage is the base expanded over the batch (so shape and
    dtype queries answer as for the real batch) and whose values are given by ``.boxes``."""

    boxes: Boxes

    @staticmethod
    def wrap(boxes: Boxes) -> BoxTensor:
        n = len(boxes.rows)
        t = torch.Tensor._make_subclass(BoxTensor, boxes.base.expand(n, *boxes.base.shape[1:]))
        t.boxes = boxes
        return t

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in METADATA:
            with torch._C.DisableTorchFunctionSubclass():
                return func(*args, **kwargs)
        run = handler(func)
        if run is not None:
            return run(func, args, kwargs)
        if _mutates(func, kwargs):
            raise Unsupported(f"in-place {getattr(func, '__name__', func)}")
        return _dense_call(func, args, kwargs)


def _is_channels_last(t: Tensor) -> bool:
    return t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _mutates(func: Any, kwargs: dict) -> bool:
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i") or name == "__setitem__" \
        or bool(kwargs.get("inplace")) or kwargs.get("out") is not None


def _unwrap(obj: Any, pick: Callable[[Boxes], Any]) -> Any:
    if isinstance(obj, BoxTensor):
        return pick(obj.boxes)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_unwrap(o, pick) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v, pick) for k, v in obj.items()}
    return obj


def _dense_call(func: Any, args: tuple, kwargs: dict) -> Any:
    """Materialise every carried value and run ``func`` on ordinary tensors."""
    with torch._C.DisableTorchFunctionSubclass():
        return func(*_unwrap(args, Boxes.dense), **_unwrap(kwargs, Boxes.dense))


# ============================================================================ handlers


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, int):
        return v, v
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(a, int) for a in v):
        return int(v[0]), int(v[1])
    raise Unsupported(f"convolution argument {v!r}")


def _out_boxes(starts: list[int], size: int, n_out: int, kernel: int, stride: int, pad: int, dil: int) -> tuple[list[int], int]:
    """Output positions whose receptive field meets the input box, as equal-size boxes."""
    reach = dil * (kernel - 1)
    lo = [max(0, math.ceil((s + pad - reach) / stride)) for s in starts]
    hi = [min(n_out - 1, (s + size - 1 + pad) // stride) for s in starts]
    length = max(1, max(b - a + 1 for a, b in zip(lo, hi)))
    return [max(0, min(a, n_out - length)) for a in lo], length


def _conv2d(func: Any, args: tuple, kwargs: dict) -> Any:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    bound = dict(zip(names, args)) | kwargs
    x, weight, bias = bound["input"], bound["weight"], bound.get("bias")
    if not isinstance(x, BoxTensor) or isinstance(weight, BoxTensor) or isinstance(bias, BoxTensor):
        return _dense_call(func, args, kwargs)
    stride, padding, dil = (_pair(bound.get(k, d)) for k, d in (("stride", 1), ("padding", 0), ("dilation", 1)))
    groups = int(bound.get("groups", 1))
    b = x.boxes
    base_out = b.cache.get(func, (tuple(b.base.shape), weight, bias, stride, padding, dil, groups),
                           lambda: func(b.base, weight, bias, stride, padding, dil, groups))
    h_out, w_out = base_out.shape[-2:]
    kh, kw = weight.shape[-2:]
    h, w = b.size
    rows, ho = _out_boxes(b.rows, h, h_out, kh, stride[0], padding[0], dil[0])
    cols, wo = _out_boxes(b.cols, w, w_out, kw, stride[1], padding[1], dil[1])
    if ho * wo > DENSE_FRACTION * h_out * w_out:
        return _dense_call(func, args, kwargs)
    source = b.base
    if padding != (0, 0):
        source = b.cache.get(F.pad, (tuple(b.base.shape), padding),
                             lambda: F.pad(b.base, (padding[1], padding[1], padding[0], padding[0])))
    hin = (ho - 1) * stride[0] + dil[0] * (kh - 1) + 1
    win = (wo - 1) * stride[1] + dil[1] * (kw - 1) + 1
    region = b.crop(source, [r * stride[0] for r in rows], [c * stride[1] for c in cols], hin, win, padding)
    out = func(region, weight, bias, stride, 0, dil, groups)
    if tuple(out.shape[-2:]) != (ho, wo):  # cannot happen for valid arguments; never guess
        raise Unsupported("convolution box arithmetic")
    return BoxTensor.wrap(Boxes(base_out, out, rows, cols, b.cache))


def _pad(func: Any, args: tuple, kwargs: dict) -> Any:
    """Constant padding of the two spatial dims (TensorFlow-style 'same' convolutions): the boxes
    move by the top/left pad; the padded border is the same in every copy."""
    names = ("input", "pad", "value") if func is torch.constant_pad_nd else ("input", "pad", "mode", "value")
    bound = dict(zip(names, args)) | kwargs
    x, pad, mode = bound["input"], tuple(bound["pad"]), bound.get("mode", "constant")
    if not isinstance(x, BoxTensor) or mode != "constant" or len(pad) not in (2, 4) or min(pad) < 0 or x.ndim != 4:
        return _dense_call(func, args, kwargs)
    b = x.boxes
    left, top = pad[0], (pad[2] if len(pad) == 4 else 0)
    value = bound.get("value")
    base = b.cache.get(func, (tuple(b.base.shape), pad, value),
                       lambda: F.pad(b.base, pad, "constant", value))
    return BoxTensor.wrap(Boxes(base, b.data, [r + top for r in b.rows], [c + left for c in b.cols], b.cache))


def _uniform_over_space(t: Any, ndim: int) -> bool:
    """Broadcasts identically over the batch and both spatial dims (a scalar, a per-channel tensor)."""
    if not isinstance(t, Tensor):
        return True
    shape = (1,) * (ndim - t.ndim) + tuple(t.shape)
    return t.ndim <= ndim and shape[0] == 1 and shape[-1] == 1 and shape[-2] == 1


def _pointwise(func: Any, args: tuple, kwargs: dict) -> Any:
    """Element-wise functions of carried values, scalars and per-channel constants. Always out of
    place (``inplace=True``, also by position as ``nn.ReLU6`` passes it): the cached base values
    are shared between batches and must never be overwritten."""
    func, args, kwargs = out_of_place(func, args, kwargs)
    carried = [a for a in (*args, *kwargs.values()) if isinstance(a, BoxTensor)]
    ndim = carried[0].ndim
    for a in (*args, *kwargs.values()):
        if not isinstance(a, BoxTensor) and isinstance(a, Tensor) and not _uniform_over_space(a, ndim):
            return _dense_call(func, args, kwargs)
        if isinstance(a, (list, tuple)) and any(isinstance(v, Tensor) for v in a):
            return _dense_call(func, args, kwargs)
    first = carried[0].boxes
    if any(c.boxes.base.shape != first.base.shape or len(c.boxes.rows) != len(first.rows) for c in carried):
        return _dense_call(func, args, kwargs)
    if len(carried) == 1:
        rows, cols, data_of = first.rows, first.cols, (lambda b: b.data)
    else:  # several carried operands (a residual add): one box per copy covering all of theirs
        h_full, w_full = first.base.shape[-2:]
        tops = [min(c.boxes.rows[i] for c in carried) for i in range(len(first.rows))]
        lefts = [min(c.boxes.cols[i] for c in carried) for i in range(len(first.rows))]
        h = max(max(c.boxes.rows[i] + c.boxes.size[0] for c in carried) - tops[i] for i in range(len(tops)))
        w = max(max(c.boxes.cols[i] + c.boxes.size[1] for c in carried) - lefts[i] for i in range(len(lefts)))
        if h * w > DENSE_FRACTION * h_full * w_full:
            return _dense_call(func, args, kwargs)
        rows = [min(t, h_full - h) for t in tops]
        cols = [min(c, w_full - w) for c in lefts]
        data_of = lambda b: b.crop(b.base, rows, cols, h, w)  # noqa: E731
    with torch._C.DisableTorchFunctionSubclass():
        key = (tuple(first.base.shape), *(a for a in (*args, *kwargs.values()) if not isinstance(a, BoxTensor)))
        base = first.cache.get(func, key,
                               lambda: func(*_unwrap(args, lambda b: b.base), **_unwrap(kwargs, lambda b: b.base)))
        data = func(*_unwrap(args, data_of), **_unwrap(kwargs, data_of))
    if not isinstance(data, Tensor) or tuple(data.shape[:2]) != (len(rows), base.shape[1]) or base.ndim != 4:
        raise Unsupported(f"{getattr(func, '__name__', func)} changed the layout")
    return BoxTensor.wrap(Boxes(base, data, rows, cols, first.cache))


def _dropout_eval(func: Any, args: tuple, kwargs: dict) -> Any:
    training = kwargs.get("training", args[2] if len(args) > 2 else True)
    if training:
        raise Unsupported("dropout in training mode")
    return args[0]


def _inplace_spelling(func: Any) -> bool:
    """``x.add_(y)``, ``x += y``: the caller may rely on the write (an interpreter that returns a new
    value instead would change the program) - these run densely, or not at all."""
    name = getattr(func, "__name__", "")
    return (name.endswith("_") and not name.endswith("__")) or name.startswith("__i")


def handler(func: Any) -> Callable[[Any, tuple, dict], Any] | None:
    """How the evaluator runs ``func`` on carried boxes, from the shared operation table
    (:mod:`perspicio.core.ops`); None: on materialised, dense values."""
    window = ops.window(func)
    if window is not None:
        return _conv2d if window == ("conv", 2) else _pad if window[0] == "pad" else None
    if func in ops.DROPOUTS:
        return _dropout_eval
    if ops.elementwise(func) and not _inplace_spelling(func):
        return _pointwise
    return None


# ============================================================================ entry point


def evaluate_boxes(module: nn.Module, base: Tensor, data: Tensor, rows: Sequence[int], cols: Sequence[int],
                   cache: BaseCache | None = None) -> Tensor:
    """``module`` applied to ``len(rows)`` copies of ``base`` (1, C, H, W), copy ``i`` replaced by
    ``data[i]`` inside the box at ``(rows[i], cols[i])``. Raises :class:`Unsupported` when the
    network does something the interpreter cannot follow exactly (the caller then runs
    :meth:`Boxes.dense` through the module itself)."""
    cache = cache if cache is not None else BaseCache()
    cache.position = 0
    boxes = Boxes(base, data, [int(r) for r in rows], [int(c) for c in cols], cache)
    out = module(BoxTensor.wrap(boxes))
    if isinstance(out, BoxTensor):
        out = out.boxes.dense()
    if not isinstance(out, Tensor) or type(out) is not Tensor:
        raise Unsupported("the model returned something other than a tensor")
    return out


def difference_spans(batch: Tensor, reference: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For copies ``batch`` (B, C, H, W) of ``reference`` (C, H, W): per copy the first row, last
    row, first column and last column where it differs from the reference (a copy equal to the
    reference gets the 1 x 1 span at the origin)."""
    diff = (batch != reference).any(dim=1)  # (B, H, W)
    spans = []
    for axis, n in ((2, diff.shape[-2]), (1, diff.shape[-1])):
        hit = diff.any(dim=axis)  # (B, n)
        idx = torch.arange(n, device=hit.device)
        first = torch.where(hit, idx, n).min(dim=1).values
        last = torch.where(hit, idx, -1).max(dim=1).values
        empty = last < 0
        spans += [torch.where(empty, 0, first), torch.where(empty, 0, last)]
    return spans[0], spans[1], spans[2], spans[3]


def common_boxes(first_r: Tensor, last_r: Tensor, first_c: Tensor, last_c: Tensor, height: int, width: int
                 ) -> tuple[list[int], list[int], int, int]:
    """One box size (h, w) covering every span, and per-copy positions inside the image."""
    h = int((last_r - first_r + 1).max())
    w = int((last_c - first_c + 1).max())
    return first_r.clamp(max=height - h).tolist(), first_c.clamp(max=width - w).tolist(), h, w


def box_batch(x: Tensor, boxes: Sequence[tuple[int, int, int, int]], fill: Callable[[int, Tensor, int, int], None]
              ) -> tuple[list[int], list[int], Tensor]:
    """Crops of the (C, H, W) sample ``x`` of one common size covering every ``(top, left, h, w)``
    box (moved inward at the borders), each modified in place by ``fill(i, crop, top, left)``."""
    h = max(b[2] for b in boxes)
    w = max(b[3] for b in boxes)
    rows = [min(b[0], x.shape[-2] - h) for b in boxes]
    cols = [min(b[1], x.shape[-1] - w) for b in boxes]
    data = crop_windows(x[None], rows, cols, h, w)
    for i, (r, c) in enumerate(zip(rows, cols)):
        fill(i, data[i], r, c)
    return rows, cols, data


#: per model: (input shape, box size) -> whether incremental batches were measured faster
_FASTER = Cache("incremental timing", holds="whether incremental batches were measured faster",
                key="model (weak), input shape, box size", max_entries=4096)


class IncrementalEvaluator:
    """Evaluates box batches of one sample at a time through ``module`` for one call, falling back
    to dense batches (``run_dense``) for models the interpreter cannot follow. The first batch a
    model ever sees is also checked: its first copy against the dense evaluation.

    Whether the interpreter pays off depends on the model (how long boxes stay small, how much of
    the time the early layers take, Python overhead per operation), so it is measured: until a
    decision exists for the model, input shape and box size, the second batch runs dense and the
    third incremental (the first warms the cache of unchanged activations), both timed per copy;
    incremental is kept if it was at least 1.25x faster (one batch each is a noisy measurement).
    Both paths give the same values."""

    def __init__(self, module: nn.Module, key: nn.Module, run_dense: Callable[[Tensor], Tensor]) -> None:
        self.module = module
        self.key = key
        self.run_dense = run_dense
        self.caches: list[tuple[Tensor, BaseCache]] = []  # per reference sample (a few at most)
        self.enabled = INCREMENTAL and _VERIFIED.get(key) is not False
        self.served = 0  # copies evaluated incrementally
        self.trial: dict[tuple, list[float | None]] = {}  # [batches seen, dense s/copy, incremental s/copy]

    def cache_for(self, owner: Tensor) -> BaseCache:
        for t, cache in self.caches:
            if t is owner:
                return cache
        self.caches = [*self.caches[-3:], (owner, BaseCache())]
        return self.caches[-1][1]

    def __call__(self, base: Tensor, data: Tensor, rows: list[int], cols: list[int], *, owner: Tensor) -> Tensor:
        cache = self.cache_for(owner)
        boxes = Boxes(base, data, rows, cols, cache)
        key = (tuple(base.shape), tuple(data.shape[-2:]))
        faster = _FASTER.get(self.key, key)
        trial = self.trial.setdefault(key, [0, None, None])
        trial[0] += 1
        timing = faster is None and len(rows) >= MIN_GROUP and trial[0] >= 2
        if self.enabled and faster is not False and not (timing and trial[1] is None):
            t0 = time.perf_counter()
            try:
                out = evaluate_boxes(self.module, base, data, rows, cols, cache)
            except Unsupported:  # the model's code, not this batch: remember it for the model
                self.enabled = False
                _VERIFIED.put(self.key, False)
            else:
                if _VERIFIED.get(self.key) is None:
                    ok = outputs_match(out[:1], self.run_dense(boxes.dense()[:1])) and bool(torch.isfinite(out).all())
                    _VERIFIED.put(self.key, ok)
                    self.enabled = ok
                elif timing:
                    trial[2] = (time.perf_counter() - t0) / len(rows)
                    _FASTER.put(self.key, trial[2] < 0.8 * trial[1], key)
                if self.enabled:
                    self.served += len(rows)
                    return out
        t0 = time.perf_counter()
        out = self.run_dense(boxes.dense())
        if timing and trial[1] is None:
            trial[1] = (time.perf_counter() - t0) / len(rows)
        return out
