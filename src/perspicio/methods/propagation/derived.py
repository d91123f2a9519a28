"""Values derived from perspicio's own weights (``W+``, ``W-``, stacked, boosted and packed kernels),
memoised across calls where that is safe.

The LRP and DeepLIFT rules need the same transforms of every weight on every call. Only tensors
perspicio computed and never writes to (merged BatchNorm layers, the private twins' weights) are
memoised; any other parameter is transformed afresh every time (see :func:`derived`).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

from torch import Tensor

from ...core.caches import Cache

#: values derived from perspicio's own weights (merged BatchNorm layers, private twins): W+, W-,
#: stacked, boosted and packed kernels, keyed by that weight (weakly) and the derivation path
_DERIVED = Cache("lrp derived weights", holds="W+, W-, stacked, boosted and packed forms of private weights",
                 key="private weight (weak), derivation", sized=True)
#: each memoised value -> (weak reference to the weight it comes from, derivation path), so that values
#: derived from it (``b+ + eps`` from ``b+``) are memoised too. The weight is referenced weakly: a strong
#: reference here would keep the weight - and through _DERIVED every value derived from it - alive
#: forever (each entry's value holding the other's key: the leak of issue 14)
_ORIGINS = Cache("lrp derived origins", holds="derived value -> its private weight (weak reference)",
                 key="derived value (weak)", tied=True)


def derived(t: Tensor, tag: Any, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(t)`` for a weight or bias ``t``, memoised across calls where that is safe.

    The rules need the same positive/negative parts of every weight on every call. Only
    tensors whose storage is one of perspicio's own weights (the BatchNorm canonizer's merged
    weights/biases and the private twins' tensors, which perspicio computed and never writes to;
    see ``canonizers.merged_tensor``) are memoised, keyed weakly by that tensor, its version
    counter and the derivation path (``tag`` after the tags that led to ``t``); for any other
    parameter ``fn`` is evaluated every time, so a write to a user's parameter (also through
    ``.data``, which bypasses the version counter) can never leave a stale value. Values derived
    from memoised values are memoised likewise. The memo is a byte-bounded LRU cache
    (:mod:`perspicio.core.caches`).
    """
    if t.requires_grad or t.grad_fn is not None:
        return fn(t)
    found = origin(t)
    if found is None:
        return fn(t)
    owner, path = found
    key = (owner._version, (*path, tag))
    value = _DERIVED.get(owner, key)
    if value is None:
        value = fn(t)
        if isinstance(value, Tensor):
            _DERIVED.put(owner, value, key)
            if value is not t and value is not owner and _ORIGINS.get(value) is None:  # (fn may return its input)
                _ORIGINS.put(value, (weakref.ref(owner), key[1]))
    return value


def origin(t: Tensor) -> tuple[Tensor, tuple] | None:
    """(perspicio's own weight ``t`` comes from, derivation path), or None for any other tensor."""
    from .canonizers import merged_tensor

    hit = _ORIGINS.get(t)
    if hit is not None:
        owner = hit[0]()
        return None if owner is None else (owner, hit[1])
    owned = merged_tensor(t)
    return None if owned is None else (owned, ())


def derived_owner(t: Tensor) -> Tensor | None:
    """perspicio's own weight that ``t`` comes from (None: ``t`` is not memoised)."""
    found = origin(t)
    return None if found is None else found[0]


def derived_tags(owner: Tensor) -> list[Any]:
    """The tags of the values currently memoised for ``owner`` (the last step of each path)."""
    return [sub[1][-1] for sub in _DERIVED.subs(owner)]


def clamp_pos(t: Tensor) -> Tensor:
    """``t+`` (negative entries zeroed)."""
    return t.clamp(min=0)


def clamp_neg(t: Tensor) -> Tensor:
    """``t-`` (positive entries zeroed)."""
    return t.clamp(max=0)


def pos(t: Tensor | None) -> Tensor | None:
    """``t+`` of a weight or bias, memoised like :func:`derived` (None stays None)."""
    return None if t is None else derived(t, "pos", clamp_pos)


def neg(t: Tensor | None) -> Tensor | None:
    """``t-`` of a weight or bias, memoised like :func:`derived` (None stays None)."""
    return None if t is None else derived(t, "neg", clamp_neg)
