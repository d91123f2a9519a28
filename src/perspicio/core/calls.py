"""Facts about torch functions that interpreters of a forward pass need, memoised per function.

Both operation-level interpreters - the propagation engine (LRP, DeepLIFT) and the incremental
evaluator of local perturbations - see every torch call of a forward pass (a few hundred, from a
few dozen distinct functions) and must run in-place spellings out of place: the propagation
rules need the values before the write, and the incremental evaluator shares cached values
between batches that must never be overwritten.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from .caches import Memo

V = TypeVar("V")


def memoised(table: Memo, func: Any, compute: Callable[[Any], V]) -> V:
    """``table[func]``, computed by ``compute(func)`` on first use (unhashable callables: not stored);
    ``table`` is a registered, entry-bounded :class:`~perspicio.core.caches.Memo`."""
    return table(func, compute)


_SIGNATURES = Memo("function signatures", holds="inspect.signature of torch functions")


def _compute_signature(func: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):
        return None


def signature(func: Any) -> inspect.Signature | None:
    """``inspect.signature(func)``, or None for builtins without one."""
    return memoised(_SIGNATURES, func, _compute_signature)


#: in-place spellings and the out-of-place function computing the same result
INPLACE = {
    "add_": torch.add, "__iadd__": torch.add, "sub_": torch.sub, "__isub__": torch.sub, "mul_": torch.mul,
    "__imul__": torch.mul, "div_": torch.div, "__itruediv__": torch.div, "neg_": torch.neg,
    "relu_": torch.relu, "sigmoid_": torch.sigmoid, "tanh_": torch.tanh, "clamp_": torch.clamp,
    "clip_": torch.clamp, "clamp_min_": torch.clamp_min, "clamp_max_": torch.clamp_max, "exp_": torch.exp,
    "log_": torch.log, "sqrt_": torch.sqrt, "rsqrt_": torch.rsqrt, "abs_": torch.abs, "square_": torch.square,
    "reciprocal_": torch.reciprocal, "pow_": torch.pow, "__ipow__": torch.pow,
    "hardtanh_": F.hardtanh, "elu_": F.elu, "leaky_relu_": F.leaky_relu, "threshold_": F.threshold,
    "rrelu_": F.rrelu, "celu_": F.celu, "selu_": F.selu,
}

_INPLACE_FORMS = Memo("in-place forms", holds="out-of-place function of in-place torch calls")


def _compute_inplace_form(func: Any) -> tuple[Any, int | None]:
    mapped = INPLACE.get(getattr(func, "__name__", ""))
    pos = None
    if mapped is None:
        sig = signature(func)
        if sig is not None and "inplace" in sig.parameters:
            pos = list(sig.parameters).index("inplace")
    return mapped, pos


def inplace_form(func: Any) -> tuple[Any, int | None]:
    """(out-of-place function for an in-place spelling or None, position of an ``inplace`` parameter or None)."""
    return memoised(_INPLACE_FORMS, func, _compute_inplace_form)


def out_of_place(func: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """Map an in-place call (``x.add_(y)``, ``F.relu(x, inplace=True)``, ``nn.ReLU6(inplace=True)``
    passing it by position) to its out-of-place form."""
    mapped, pos = inplace_form(func)
    if mapped is not None:
        return mapped, args, kwargs
    if "inplace" in kwargs:
        kwargs = {**kwargs, "inplace": False}
    elif pos is not None and len(args) > pos:
        args = (*args[:pos], False, *args[pos + 1:])
    return func, args, kwargs
