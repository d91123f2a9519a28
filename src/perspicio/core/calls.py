"""Facts about torch functions that interpreters of a forward pass need, memoised per function.

Both operation-level interpreters - the propagation engine (LRP, DeepLIFT) and the incremental
evaluator of local perturbations - see every torch call of a forward pass (a few hundred, from a
few dozen distinct functions) and must run in-place spellings out of place: the propagation
rules need the values before the write, and the incremental evaluator shares cached values
between batches that must never be overwritten. The in-place spellings themselves are a table of
:mod:`perspicio.core.ops` (``ops.INPLACE``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from . import ops
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


_INPLACE_FORMS = Memo("in-place forms", holds="out-of-place function of in-place torch calls")


def _compute_inplace_form(func: Any) -> tuple[Any, int | None]:
    mapped = ops.INPLACE.get(getattr(func, "__name__", ""))
    pos = None
    if mapped is None:
        sig = signature(func)
        if sig is not None and "inplace" in sig.parameters:
            pos = list(sig.parameters).index("inplace")
    return mapped, pos


def inplace_form(func: Any) -> tuple[Any, int | None]:
    """(out-of-place function for an in-place spelling or None, position of an ``inplace`` parameter or None)."""
    return memoised(_INPLACE_FORMS, func, _compute_inplace_form)


def is_inplace(func: Any, args: tuple, kwargs: dict) -> bool:
    """Does this call write into its input (an in-place spelling, or ``inplace=True``)?"""
    mapped, pos = inplace_form(func)
    if mapped is not None:
        return True
    if pos is None:
        return False
    return bool(args[pos] if len(args) > pos else kwargs.get("inplace", False))


def out_of_place(func: Any, args: tuple, kwargs: dict) -> tuple[Any, tuple, dict]:
    """Map an in-place call (``x.add_(y)``, ``F.relu(x, inplace=True)``, ``nn.ReLU6(inplace=True)``
    passing it by position) to its out-of-place form."""
    mapped, pos = inplace_form(func)
    if mapped is not None:
        return mapped, args, kwargs
    if "inplace" in kwargs:
        kwargs = {**kwargs, "inplace": False}
    elif pos is not None and len(args) > pos:
        args = (*args[:pos], False, *args[pos + 1 :])
    return func, args, kwargs
