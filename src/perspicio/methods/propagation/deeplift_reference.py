"""DeepLIFT's reference-pass cache: when a recorded reference pass is reused, and for how long it is kept."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...core.caches import Cache
from .operations import iter_tensors


class ReferenceCache:
    """DeepLIFT's reference passes, kept for the next call with the same baseline.

    The reference pass depends only on the model and the baseline batch, and a sweep over a
    data set uses the same baseline (zero, a fixed image, a DeepSHAP background) for every
    chunk of every call, so one recorded pass serves them all: DeepLIFT then costs one forward
    and one backward. An entry is reused only when :func:`model_state` is unchanged and the
    baseline batch is equal element by element (a kept copy); entries live as long as the
    model (weak keys), at most ``max_entries`` per model, within a byte budget for all models
    together (and the total cache budget, :mod:`perspicio.core.caches`), least recently used
    first out.
    """

    def __init__(self, max_bytes: int = 512 * 2**20, max_entries: int = 4, name: str = "deeplift reference passes"
                 ) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        # per module: [(key, baseline copy, records, output, bytes)], most recently used last
        self._store = Cache(name, holds="recorded DeepLIFT reference passes (activations per baseline)",
                            key="model (weak); model state, baseline", sized=True, budget=max_bytes)

    @staticmethod
    def _key(state: tuple, x0: Tensor, gradient_fallback: bool) -> tuple:
        return state, tuple(x0.shape), x0.dtype, str(x0.device), gradient_fallback

    def get(self, model: nn.Module, state: tuple, x0: Tensor, gradient_fallback: bool) -> tuple | None:
        """``(refs, out0)`` recorded for ``x0`` on ``model`` in ``state``, or None."""
        entries = self._store.get(model) or []
        key = self._key(state, x0, gradient_fallback)
        for entry in entries:
            if entry[0] == key and torch.equal(entry[1], x0):
                return entry[2], entry[3]
        return None

    def put(self, model: nn.Module, state: tuple, x0: Tensor, gradient_fallback: bool,
            refs: list[dict[str, Any]], out0: Tensor) -> None:
        storages: dict[int, int] = {}
        for rec in refs:
            for t in iter_tensors(list(rec.values())):
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
        size = sum(storages.values()) + x0.numel() * x0.element_size() + out0.numel() * out0.element_size()
        if size > self.max_bytes:
            return
        entries = [e for e in self._store.get(model) or [] if e[0][0] == state]  # others are stale
        entries.append((self._key(state, x0, gradient_fallback), x0.detach().clone(), refs, out0, size))
        while len(entries) > self.max_entries or sum(e[4] for e in entries) > self.max_bytes:
            entries.pop(0)
        self._store.put(model, entries, size=sum(e[4] for e in entries))

    def clear(self) -> None:
        self._store.clear()


#: the process-wide cache of reference passes (``REFERENCE_CACHE.clear()`` frees it)
REFERENCE_CACHE = ReferenceCache()

