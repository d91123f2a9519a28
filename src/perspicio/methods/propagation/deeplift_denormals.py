"""DeepLIFT's denormals workaround: how to tell ``x == x0`` with float kernels only, also when
the CPU flushes subnormals to zero (``torch.set_flush_denormal(True)``)."""

from __future__ import annotations

import torch
from torch import Tensor

#: the smallest positive (subnormal) number per float dtype: strictly between -d and d lies only 0
_SUBNORMAL = {dt: torch.finfo(dt).smallest_normal * torch.finfo(dt).eps for dt in (torch.float32, torch.float64)}


#: a subnormal double, read at run time (a literal comparison could be folded by the compiler)
_DENORMAL_PROBE = [5e-324]


def _subnormals_kept(t: Tensor) -> bool:
    """False when this thread flushes subnormals to zero (``torch.set_flush_denormal(True)`` sets
    the CPU's denormals-are-zero flag, which Python's float comparisons obey as torch's kernels
    do), which would make the smallest subnormal compare equal to 0."""
    return t.device.type != "cpu" or _DENORMAL_PROBE[0] > 0.0


def add_where_equal(r: Tensor, grad: Tensor, dx: Tensor) -> Tensor:
    """``r + grad`` where ``dx == 0`` exactly, ``r`` elsewhere (in place on ``r``; may overwrite ``grad`` and
    ``dx``): float kernels only, and correct whether or not this thread flushes subnormals to zero."""
    tiny = _SUBNORMAL.get(dx.dtype)
    if tiny is not None and _subnormals_kept(dx):
        return r.add_(torch.ops.aten.hardtanh_backward(grad, dx, -tiny, tiny))  # the gradient where x == x0
    # denormals flushed (torch.set_flush_denormal) or an unusual dtype: mask by |x - x0| > 0
    return r.add_(grad.sub_(torch.ops.aten.threshold_backward(grad, dx.abs_(), 0.0)))
