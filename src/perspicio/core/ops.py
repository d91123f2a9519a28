"""Tables of torch operations shared by perspicio's operation-level interpreters.

The propagation engine (``methods/propagation/engine.py``), the incremental evaluator
(:mod:`perspicio.core.incremental`) and the tracers each see every torch function a forward pass
calls; what a function *is* (a metadata query, ...) is stated here once, so the interpreters
cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

#: tensor properties read as attributes (``x.shape``): their getters reach a torch function mode
METADATA_PROPERTIES = ("shape", "ndim", "dtype", "device", "layout", "requires_grad", "is_leaf", "grad_fn",
                       "is_cuda", "is_sparse", "is_quantized", "is_meta", "is_mkldnn", "itemsize", "nbytes")
#: tensor methods that only query metadata (``x.size()``)
METADATA_METHODS = ("size", "dim", "ndimension", "stride", "numel", "nelement", "__len__", "is_contiguous",
                    "is_floating_point", "is_complex", "element_size", "data_ptr", "storage_offset", "get_device",
                    "has_names")


def functions(names: Sequence[str], owners: Sequence[Any]) -> list[Any]:
    """The functions ``owner.name`` that exist, for every owner and name (owners first)."""
    found = []
    for owner in owners:
        for n in names:
            f = getattr(owner, n, None)
            if f is not None:
                found.append(f)
    return found


def _metadata() -> frozenset:
    getters = [getattr(Tensor, n).__get__ for n in METADATA_PROPERTIES if hasattr(Tensor, n)]
    return frozenset([*getters, *functions(METADATA_METHODS, (Tensor,))])


#: tensor metadata queries (``x.shape``, ``x.dtype``, ``x.size()``, ...): they never return a tensor
#: and need no rule - interpreters run them straight through (about 4 in 5 calls of a CNN's forward)
METADATA: frozenset = _metadata()
