"""Receptive fields computed from the layers of the network, not guessed.

One forward pass of a dummy input runs under a :class:`~torch.overrides.TorchFunctionMode`
that sees every tensor operation (functional calls, module internals, ``x + y`` in
``forward``). Each tensor derived from the input carries, per spatial dimension, the
affine description of its receptive field: output index ``i`` sees input pixels
``[start + i * jump, start + i * jump + size)``. The geometric operations update it
with the usual recurrences (kernel ``k``, stride ``s``, padding ``p``, dilation ``d``)::

    jump' = jump * s
    size' = size + (k - 1) * d * jump
    start' = start - p * jump

``F.pad`` (asymmetric or TensorFlow-``SAME`` padding) shifts ``start``; element-wise
ops, concatenation along channels and residual additions take the union of their
inputs' fields; global pooling gives the whole extent. Operations that move pixels in
ways a box cannot describe (interpolation, slicing of the grid) make the field
undefined, and asking for it raises :class:`~perspicio.errors.LayerError` naming the op.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..core import ops
from ..core.caches import Cache
from ..core.capture import StopForward
from ..core.guard import model_device, model_dtype, model_guard
from ..errors import InputError, LayerError
from ._common import resolve, unwrap


@dataclass(frozen=True)
class _Dim:
    """Receptive field along one axis: index i sees [start + i*jump, start + i*jump + size)."""

    start: float
    jump: float
    size: float
    n: int

    def collapse(self) -> _Dim:
        """All positions together (what a global pool or a flatten sees)."""
        return _Dim(self.start, 0.0, (self.n - 1) * self.jump + self.size, 1)


_Field = tuple[_Dim, ...]


class _Unknown:
    def __init__(self, why: str) -> None:
        self.why = why


def _union(fields: Sequence[_Field], n: Sequence[int]) -> _Field:
    """Per axis: the smallest box holding every input's field at each position."""
    out = []
    for axis, length in enumerate(n):
        dims = [f[axis] for f in fields]
        varying = [d for d in dims if d.n > 1 and d.jump != 0]
        jumps = {d.jump for d in varying}
        if len(jumps) > 1 or (varying and len(varying) != len(dims)):
            # different grids (or a grid combined with a constant box): bound by full extents
            dims = [d.collapse() for d in dims]
            jump = 0.0
        else:
            jump = next(iter(jumps)) if jumps else 0.0
        start = min(d.start for d in dims)
        end = max(d.start + d.size for d in dims)
        out.append(_Dim(start, jump, end - start, length))
    return tuple(out)


def _pairs(v: Any, k: int) -> tuple[int, ...]:
    if isinstance(v, int):
        return (v,) * k
    v = tuple(int(a) for a in v)
    return v * k if len(v) == 1 else v


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


class _Tracer(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[int, tuple[Tensor, _Field | _Unknown]] = {}

    def track(self, t: Tensor, f: _Field | _Unknown) -> None:
        self.fields[id(t)] = (t, f)

    def field(self, t: Tensor) -> _Field | _Unknown | None:
        entry = self.fields.get(id(t))
        return entry[1] if entry is not None and entry[0] is t else None

    def _inputs(self, obj: Any, out: list[tuple[Tensor, Any]]) -> None:
        if isinstance(obj, Tensor):
            f = self.field(obj)
            if f is not None:
                out.append((obj, f))
        elif isinstance(obj, (list, tuple)):
            for o in obj:
                self._inputs(o, out)
        elif isinstance(obj, dict):
            for o in obj.values():
                self._inputs(o, out)

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        tracked: list[tuple[Tensor, Any]] = []
        self._inputs(args, tracked)
        self._inputs(kwargs, tracked)
        if not tracked:
            return result
        outs = [result] if isinstance(result, Tensor) else [r for r in result if isinstance(r, Tensor)] if isinstance(result, (tuple, list)) else []
        if not outs:
            return result
        name = getattr(func, "__name__", str(func))
        try:
            new = self._rule(func, name, args, kwargs, tracked, outs[0])
        except Exception as exc:  # an op we cannot describe: the field below it is undefined
            new = _Unknown(f"{name} ({exc})")
        for o in outs[:1]:
            self.track(o, new)
        for o in outs[1:]:  # e.g. pooling indices: same geometry
            self.track(o, new)
        return result

    def _rule(self, func: Any, name: str, args: tuple, kwargs: dict, tracked: list, out: Tensor) -> _Field | _Unknown:
        unknown = [f for _, f in tracked if isinstance(f, _Unknown)]
        if unknown:
            return unknown[0]
        src, field = tracked[0]
        nd = len(field)
        window = (ops.window(func) or ("", 0))[0]  # the geometry of the operation: core/ops.py
        if window == "conv" and tracked[0][0] is args[0]:
            w = _arg(args, kwargs, 1, "weight", None)
            k = tuple(w.shape[2:])
            stride = _pairs(_arg(args, kwargs, 3, "stride", 1), nd)
            dil = _pairs(_arg(args, kwargs, 5, "dilation", 1), nd)
            pad = _arg(args, kwargs, 4, "padding", 0)
            if pad == "valid":
                pads = (0,) * nd
            elif pad == "same":
                pads = tuple((d * (kk - 1)) // 2 for d, kk in zip(dil, k))
            else:
                pads = _pairs(pad, nd)
            return self._window(field, k, stride, pads, dil, out)
        if window == "max_pool":
            k = _pairs(_arg(args, kwargs, 1, "kernel_size", None), nd)
            s = _arg(args, kwargs, 2, "stride", None)
            stride = k if s is None or (not isinstance(s, int) and len(s) == 0) else _pairs(s, nd)
            pads = _pairs(_arg(args, kwargs, 3, "padding", 0), nd)
            dil = _pairs(_arg(args, kwargs, 4, "dilation", 1), nd)
            return self._window(field, k, stride, pads, dil, out)
        if window == "avg_pool":
            k = _pairs(_arg(args, kwargs, 1, "kernel_size", None), nd)
            s = _arg(args, kwargs, 2, "stride", None)
            stride = k if s is None or (not isinstance(s, int) and len(s) == 0) else _pairs(s, nd)
            pads = _pairs(_arg(args, kwargs, 3, "padding", 0), nd)
            return self._window(field, k, stride, pads, (1,) * nd, out)
        if window == "adaptive_pool":
            dims = []
            for axis in range(nd):
                n_in = src.shape[src.ndim - nd + axis]
                n_out = out.shape[out.ndim - nd + axis]
                d = field[axis]
                if n_out == 1:
                    dims.append(d.collapse())
                elif n_in % n_out == 0:
                    k = n_in // n_out
                    dims.append(_Dim(d.start, d.jump * k, d.size + (k - 1) * d.jump, n_out))
                else:
                    return _Unknown(f"{name} from {n_in} to {n_out} (bins of unequal size)")
            return tuple(dims)
        if window == "pad":
            pad = tuple(int(p) for p in _arg(args, kwargs, 1, "pad", ()))
            dims = list(field)
            for axis in range(nd):
                pos = 2 * (nd - 1 - axis)  # pad lists the last dimension first
                if pos + 1 < len(pad):
                    left = pad[pos]
                    d = dims[axis]
                    n_out = out.shape[out.ndim - nd + axis]
                    dims[axis] = _Dim(d.start - left * d.jump, d.jump, d.size, n_out)
            return tuple(dims)
        # generic: same spatial grid -> union of the inputs; spatial grid lost -> collapse
        spatial_out = tuple(out.shape[-nd:]) if out.ndim >= nd + 2 else None
        fields = []
        for t, f in tracked:
            spatial_in = tuple(t.shape[-nd:]) if t.ndim >= nd + 2 else None
            if spatial_out is not None and spatial_in == spatial_out:
                fields.append(f)
            elif spatial_in is not None and all(s == 1 for s in spatial_in):
                fields.append(tuple(d.collapse() for d in f))  # broadcast (N, C, 1, 1) scale
            elif spatial_out is None or out.ndim < nd + 2:
                fields.append(tuple(d.collapse() for d in f))
            else:
                return _Unknown(f"{name} changes the spatial grid {spatial_in} -> {spatial_out}")
        if spatial_out is None:
            collapsed = _union([tuple(d.collapse() for d in f) for f in fields], [1] * nd)
            return collapsed
        return _union(fields, spatial_out)

    @staticmethod
    def _window(field: _Field, k: Sequence[int], stride: Sequence[int], pads: Sequence[int], dil: Sequence[int], out: Tensor) -> _Field:
        nd = len(field)
        dims = []
        for axis in range(nd):
            d = field[axis]
            n_out = out.shape[out.ndim - nd + axis]
            dims.append(_Dim(d.start - pads[axis] * d.jump, d.jump * stride[axis], d.size + (k[axis] - 1) * dil[axis] * d.jump, n_out))
        return tuple(dims)


#: per model: (layer name, input shape) -> field (the geometry depends on nothing else)
_CACHE = Cache("receptive fields", holds="traced receptive-field geometry of layers",
               key="model (weak), layer, input shape", max_entries=4096)


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of every position of a layer's output grid.

    Output position ``(i, j)`` sees input rows ``[start[0] + i*jump[0], ... + size[0])`` and
    columns likewise (possibly beyond the image border, where padding was).
    ``grid`` is the layer's (h, w); ``input_size`` the traced input's (H, W).
    """

    layer: str
    start: tuple[float, ...]
    jump: tuple[float, ...]
    size: tuple[float, ...]
    grid: tuple[int, ...]
    input_size: tuple[int, ...]

    def box(self, *position: int, clip: bool = True) -> tuple[int, ...]:
        """``(top, left, bottom, right)`` (end-exclusive) of the field of ``position``;
        clipped to the image by default. A layer without a spatial grid gives the whole extent."""
        if len(position) == 1 and isinstance(position[0], (tuple, list)):
            position = tuple(position[0])
        if len(position) != len(self.grid):
            raise InputError(f"position needs {len(self.grid)} indices for layer {self.layer!r}; got {position}.")
        lo, hi = [], []
        for p, s, j, z, n, full in zip(position, self.start, self.jump, self.size, self.grid, self.input_size):
            if not 0 <= p < max(n, 1):
                raise InputError(f"position {position} is outside the {self.grid} grid of layer {self.layer!r}.")
            a = s + p * j
            b = a + z
            a, b = int(math.floor(a)), int(math.ceil(b))
            if clip:
                a, b = max(a, 0), min(b, full)
            lo.append(a)
            hi.append(b)
        return (*lo, *hi)

    def crop(self, image: Tensor, *position: int) -> Tensor:
        """The part of ``image`` (..., H, W) inside the field of ``position``."""
        top, left, bottom, right = self.box(*position)
        return image[..., top:bottom, left:right]

    @property
    def extent(self) -> tuple[int, ...]:
        """Size of the (unclipped) field in pixels per axis."""
        return tuple(int(math.ceil(z)) for z in self.size)


def receptive_field(model: Any, layer: Any, input_shape: Sequence[int] = (3, 224, 224)) -> ReceptiveField:
    """Compute the receptive field of ``layer``'s outputs for an input of ``input_shape``
    (C, H, W) by tracing one forward pass of zeros (see the module docstring)."""
    bundle = unwrap(model)
    net = bundle.model
    name, module = resolve(net, layer)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) < 2 or any(s < 1 for s in shape):
        raise InputError(f"input_shape must be (C, H, W) with positive sizes; got {tuple(input_shape)}.")
    x = torch.zeros((1, *shape), device=model_device(net), dtype=model_dtype(net))
    nd = len(shape) - 1
    tracer = _Tracer()
    found: list[Any] = []

    key = (name, shape)
    cached = _CACHE.get(net, key)
    if cached is not None:
        return cached

    def hook(mod: nn.Module, args: object, out: object) -> None:
        t = out if isinstance(out, Tensor) else next((o for o in out if isinstance(o, Tensor)), None) if isinstance(out, (tuple, list)) else None
        if t is not None and not found:
            found.append((tracer.field(t), tuple(t.shape)))
            raise StopForward  # the rest of the network cannot change this layer's field

    handle = module.register_forward_hook(hook)
    try:
        with model_guard(net), torch.no_grad(), tracer:
            tracer.track(x, tuple(_Dim(0.0, 1.0, 1.0, n) for n in shape[1:]))
            try:
                net(x)
            except StopForward:
                pass
    finally:
        handle.remove()
        tracer.fields.clear()
    if not found:
        raise LayerError(f"layer {name!r} was not reached in the forward pass.")
    field, out_shape = found[0]
    if field is None:
        raise LayerError(f"layer {name!r}: its output does not depend on the input through traceable operations.")
    if isinstance(field, _Unknown):
        raise LayerError(f"cannot compute the receptive field of layer {name!r}: it passes through {field.why}.")
    grid = tuple(out_shape[-nd:]) if len(out_shape) >= nd + 2 else (1,) * nd
    if len(out_shape) < nd + 2:
        field = tuple(d.collapse() for d in field)
    result = ReceptiveField(
        layer=name,
        start=tuple(d.start for d in field),
        jump=tuple(d.jump for d in field),
        size=tuple(d.size for d in field),
        grid=grid,
        input_size=tuple(shape[1:]),
    )
    _CACHE.put(net, result, key)
    return result
