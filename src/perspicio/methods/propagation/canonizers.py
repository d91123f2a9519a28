"""Canonizers: scoped, undoable rewrites that give the model an LRP-friendly form.

:class:`MergeBatchNorm` folds each eval-mode BatchNorm into the convolution or
linear layer that feeds it (``W' = W * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``) and turns the BatchNorm into an exact identity
(mean 0, var 1, eps 0, gamma 1, beta 0). The function computed is the same; LRP
rules then see one affine operation instead of two. Pairs are found by tracing
one forward pass at the operation level (a BatchNorm whose input is the output
of a convolution/linear call that nothing else consumes), so functional calls
and models that are not ``nn.Sequential`` work. Layers without a bias get one
for the duration (EfficientNet's convolutions have none).

On exit every parameter and buffer is restored bit for bit (same tensor
objects, original values, ``bias`` removed again where it did not exist) - also
when the body raises.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_AFFINE_FUNCS = (F.conv1d, F.conv2d, F.conv3d, F.linear)


class _PairTracer(TorchFunctionMode):
    """Records affine outputs, BatchNorm inputs and how often each tensor is consumed."""

    def __init__(self) -> None:
        super().__init__()
        self.keep: list[Tensor] = []  # keeps ids unique during the trace
        self.uses: dict[int, int] = {}
        self.affine_out: dict[int, Tensor] = {}  # id(output) -> weight
        self.weight_calls: dict[int, int] = {}
        self.bn_calls: list[tuple[Tensor, Tensor | None]] = []  # (input, running_mean)
        self.bn_count: dict[int, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, (Tensor, list, tuple)):  # a consumer (not a shape query such as x.dim())
            for a in (*args, *kwargs.values()):
                items = a if isinstance(a, (list, tuple)) else (a,)
                for t in items:
                    if isinstance(t, Tensor):
                        self.uses[id(t)] = self.uses.get(id(t), 0) + 1
                        self.keep.append(t)
        if func in _AFFINE_FUNCS and isinstance(out, Tensor):
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(w, nn.Parameter):
                self.affine_out[id(out)] = w
                self.weight_calls[id(w)] = self.weight_calls.get(id(w), 0) + 1
                self.keep.append(out)
        elif func is F.batch_norm:
            x = args[0]
            rm = args[1] if len(args) > 1 else kwargs.get("running_mean")
            self.bn_calls.append((x, rm))
            if rm is not None:
                self.bn_count[id(rm)] = self.bn_count.get(id(rm), 0) + 1
        return out


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, list[tuple[str, str]]]] = weakref.WeakKeyDictionary()


def find_batchnorm_pairs(model: nn.Module, sample: Tensor) -> list[tuple[str, str]]:
    """``(affine_module_name, batchnorm_module_name)`` pairs that can be merged.

    One forward of one sample is traced (cached per model, module set and input shape).
    """
    mods = dict(model.named_modules())
    key = (tuple(sample.shape[1:]), sample.dtype, tuple(id(m) for m in mods.values()))
    cache = _CACHE.setdefault(model, {})
    if key in cache:
        return cache[key]
    owner: dict[int, str] = {}
    bn_owner: dict[int, str] = {}
    for name, m in mods.items():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            owner[id(m.weight)] = name
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            bn_owner[id(m.running_mean)] = name
    tracer = _PairTracer()
    with torch.no_grad(), tracer:
        model(sample[:1])
    pairs = []
    for x, rm in tracer.bn_calls:
        if rm is None or id(rm) not in bn_owner or tracer.bn_count.get(id(rm)) != 1:
            continue
        w = tracer.affine_out.get(id(x))
        if w is None or id(w) not in owner or tracer.weight_calls.get(id(w)) != 1:
            continue
        if tracer.uses.get(id(x), 0) != 1:  # the affine output also feeds something else
            continue
        pairs.append((owner[id(w)], bn_owner[id(rm)]))
    cache[key] = pairs
    return pairs


class MergeBatchNorm:
    """Scoped merge of BatchNorm layers into their preceding convolution/linear.

    ``pairs``: explicit ``[(affine_module, batchnorm_module), ...]`` (modules or
    names); by default they are discovered by tracing ``sample`` through the model.
    Use as ``with MergeBatchNorm()(model, sample) as merged: ...``; ``merged`` is
    the list of merged ``(affine, batchnorm)`` names. :func:`identity_batchnorms`
    tells propagators which BatchNorm calls are now exact identities (skipped).
    """

    name = "merge_batchnorm"

    def __init__(self, pairs: list[tuple[Any, Any]] | None = None) -> None:
        self.pairs = pairs

    def __repr__(self) -> str:
        return "MergeBatchNorm()"

    @contextmanager
    def __call__(self, model: nn.Module, sample: Tensor) -> Iterator[list[tuple[str, str]]]:
        mods = dict(model.named_modules())
        names = {id(m): n for n, m in mods.items()}
        if self.pairs is None:
            pairs = [(mods[a], mods[b]) for a, b in find_batchnorm_pairs(model, sample)]
        else:
            pairs = [(mods[a] if isinstance(a, str) else a, mods[b] if isinstance(b, str) else b) for a, b in self.pairs]
        undo: list[Any] = []
        merged: list[tuple[str, str]] = []
        try:
            with torch.no_grad():
                for lin, bn in pairs:
                    if bn.training and bn.track_running_stats:
                        continue  # batch statistics: not an affine map
                    undo.append(_merge(lin, bn))
                    merged.append((names.get(id(lin), "?"), names.get(id(bn), "?")))
                    _IDENTITY.add(id(bn.running_mean))
            yield merged
        finally:
            with torch.no_grad():
                for _, bn in pairs:
                    _IDENTITY.discard(id(bn.running_mean))
                for restore in reversed(undo):
                    restore()


#: ids of the running-mean buffers of BatchNorms currently merged (exact identities)
_IDENTITY: set[int] = set()


def is_identity_batchnorm(running_mean: Any) -> bool:
    """True if a ``batch_norm`` call with this running mean is a merged (identity) BatchNorm."""
    return running_mean is not None and id(running_mean) in _IDENTITY


_MERGED: weakref.WeakKeyDictionary[nn.Module, tuple[Any, Tensor, Tensor]] = weakref.WeakKeyDictionary()


def _state_key(lin: nn.Module, bn: nn.Module) -> tuple:
    ts = [lin.weight, lin.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]
    return tuple((t.data_ptr(), t._version) if t is not None else None for t in ts) + (bn.eps,)


def _merged_values(lin: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """``(W * s, (b - mean) * s + beta)``, cached while none of the tensors changes."""
    key = _state_key(lin, bn)
    hit = _MERGED.get(lin)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    w = lin.weight
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    b_old = lin.bias.double() if lin.bias is not None else torch.zeros_like(shift)
    new_w = (w.double() * scale.view((-1,) + (1,) * (w.ndim - 1))).to(w.dtype)
    new_b = (b_old * scale + shift).to(w.dtype)
    _MERGED[lin] = (key, new_w, new_b)
    return new_w, new_b


def _merge(lin: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> Any:
    """Merge ``bn`` into ``lin``; return the function that undoes it exactly.

    The parameters and buffers keep their identity; only the tensors they point to
    (``.data``) are swapped, so restoring puts back the very same memory.
    """
    new_w, new_b = _merged_values(lin, bn)
    swaps: list[tuple[Tensor, Tensor]] = []  # (parameter/buffer, original data)

    def swap(t: Tensor, value: Tensor) -> None:
        swaps.append((t, t.data))
        t.data = value

    had_bias = lin.bias is not None
    eps = bn.eps
    try:
        swap(lin.weight, new_w)
        if had_bias:
            swap(lin.bias, new_b)
        else:
            lin.bias = nn.Parameter(new_b, requires_grad=False)
        swap(bn.running_mean, torch.zeros_like(bn.running_mean))
        swap(bn.running_var, torch.ones_like(bn.running_var))
        if bn.weight is not None:
            swap(bn.weight, torch.ones_like(bn.weight))
        if bn.bias is not None:
            swap(bn.bias, torch.zeros_like(bn.bias))
        bn.eps = 0.0
    except BaseException:
        _restore(lin, bn, swaps, had_bias, eps)
        raise

    def restore() -> None:
        _restore(lin, bn, swaps, had_bias, eps)

    return restore


def _restore(lin: nn.Module, bn: nn.Module, swaps: list[tuple[Tensor, Tensor]], had_bias: bool, eps: float) -> None:
    for t, data in reversed(swaps):
        t.data = data
    if not had_bias:
        lin.bias = None
    bn.eps = eps
