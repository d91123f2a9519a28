"""Fused convolutions as the rules see them: a fused twin's ``act(conv(x))`` call split into its parts.

perspicio's fused twin (:mod:`perspicio.core.fuse`) runs a convolution, its zero padding and its
activation as one oneDNN call (:class:`~perspicio.core.kernels.FusedCall`). Under a
propagation mode that call is seen (the ``SEES_FUSED_CALLS`` protocol of
:mod:`perspicio.core.kernels`) and described here, so that each part gets its own rule; a
propagator may also keep the call whole when its convolution rule does not read the
convolution's output (LRP's ``on_fused``). Rules never see oneDNN: packed kernels stay behind
:class:`~perspicio.methods.propagation.affine.AffineOp`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F

from ...core import kernels
from ...core.kernels import FusedCall
from .operations import Call


def fused_call(call: Call) -> FusedCall | None:
    """Describe a fused call (None for an activation perspicio does not know)."""
    return kernels.parse_fused_call(call.args, call.kwargs)


def split_fused(dispatch: Callable[[Any, tuple, dict], Any], call: Call) -> tuple[bool, Any]:
    """Run a fused convolution + activation as its two operations, each through ``dispatch`` (so each
    gets its own rule): the convolution with the fused call's extended kernel and symmetric padding,
    which compute exactly what the zero padding and the original kernel did. Returns
    ``(False, None)`` for an activation perspicio does not know."""
    f = fused_call(call)
    if f is None:
        return False, None
    z = dispatch(F.conv2d, f.conv_args(), {})
    return True, (z if f.act is None else dispatch(f.act, (z, *f.act_args), f.act_kwargs))
