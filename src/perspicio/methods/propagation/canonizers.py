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
from torch import Tensor, nn

from ...core.bnpairs import find_batchnorm_pairs, fingerprint, folded_affine


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
    return fingerprint([lin.weight, lin.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var]) + (bn.eps,)


def _merged_values(lin: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """``(W * s, (b - mean) * s + beta)``, cached while none of the tensors changes."""
    key = _state_key(lin, bn)
    hit = _MERGED.get(lin)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    new_w, new_b = folded_affine(lin, bn)
    _MERGED[lin] = (key, new_w, new_b)
    for t in (new_w, new_b):
        _OWNED[t.data_ptr()] = weakref.ref(t)
    return new_w, new_b


#: storage pointer -> the merged weight/bias tensor perspicio computed and holds (weakly)
_OWNED: dict[int, weakref.ref] = {}


def merged_tensor(t: Tensor) -> Tensor | None:
    """The canonizer's own merged tensor whose storage ``t`` (a parameter) currently holds, or None.

    Such tensors are computed once per set of layer/BatchNorm states and never written to, so
    values derived from them may be kept across calls (see ``rules.derived``).
    """
    ref = _OWNED.get(t.data_ptr())
    owned = ref() if ref is not None else None
    if (owned is None or owned.shape != t.shape or owned.stride() != t.stride() or owned.dtype != t.dtype
            or owned.device != t.device):  # e.g. a transposed view of a square weight: not the same tensor
        return None
    return owned


#: per affine layer without a bias: the Parameter that holds its merged bias (it wraps the cached
#: merged bias), reused across calls instead of a new Parameter per layer and call
_BIAS_PARAMS: weakref.WeakKeyDictionary[nn.Module, nn.Parameter] = weakref.WeakKeyDictionary()


def _bias_parameter(lin: nn.Module, value: Tensor) -> nn.Parameter:
    p = _BIAS_PARAMS.get(lin)
    if p is None or p.data_ptr() != value.data_ptr() or p.shape != value.shape or p.dtype != value.dtype:
        p = nn.Parameter(value, requires_grad=False)
        _BIAS_PARAMS[lin] = p
    return p


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
            lin.bias = _bias_parameter(lin, new_b)
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
