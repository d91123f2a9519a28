"""Scoped override of the backward pass of rectifiers (guided backprop, deconvnet).

Guided backpropagation and deconvnet differ from the plain gradient only in how
gradients pass backwards through rectifiers:

* ``"guided"``  (Springenberg et al. 2015): ``g_in = 1[lo < x < hi] * relu(g_out)`` - the
  forward mask of the rectifier AND only positive gradient signal;
* ``"deconv"``  (Zeiler & Fergus 2014): ``g_in = relu(g_out)`` - the forward mask is
  ignored, the backward signal is itself rectified.

A rectifier is any call with a lower bound of exactly 0: ``nn.ReLU``/``F.relu``/
``torch.relu``/``Tensor.relu`` (and in-place forms), ``nn.ReLU6``/``F.relu6``,
``F.hardtanh`` with ``min_val=0``, and ``clamp``/``clip``/``clamp_min`` with
``min=0`` (with or without ``max``). Other clamps (e.g. ``clamp(min=1e-6)`` for
numerical safety) keep their normal gradient.

Which calls are rectifiers is read from the clamp table of :mod:`perspicio.core.ops` (also
what :func:`~perspicio.core.ops.register_operation` extends), whether a call is in place from
:mod:`perspicio.core.calls`. Modules are caught through the functional call they make, so one mechanism
covers ``nn.ReLU`` modules and functional uses alike: a
:class:`torch.overrides.TorchFunctionMode` is pushed for the duration of a
``with`` block and popped in ``finally``; nothing global is patched. TorchScript
models bypass Python dispatch and are not affected.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import ops
from .calls import is_inplace
from .options import check_choice

RULES = ("guided", "deconv")


class _Rectify(torch.autograd.Function):
    """clamp(x, lo, hi) forward; rule-specific backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, lo: float, hi: float | None, rule: str) -> Tensor:  # type: ignore[override]
        out = x.clamp(min=lo) if hi is None else x.clamp(min=lo, max=hi)
        ctx.rule = rule
        if rule == "guided":
            mask = x > lo if hi is None else (x > lo) & (x < hi)
            ctx.mask = mask
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        g = grad.clamp_min(0)
        if ctx.rule == "guided":
            g = g * ctx.mask
        return g, None, None, None


def _num(v: Any) -> float | None:
    if isinstance(v, numbers.Real) and not isinstance(v, bool):
        return float(v)
    return None


def rectifier_bounds(func: Any, args: tuple, kwargs: dict) -> tuple[float, float | None] | None:
    """``(0, upper)`` of a rectifier call - a clamp of :mod:`perspicio.core.ops` (ReLU, ReLU6,
    hardtanh, clamp, clip, clamp_min) whose lower bound is exactly 0 and whose upper bound, if any,
    is a number above it; None for any other call."""
    bounds = ops.clamp_bounds(func, args, kwargs)
    if bounds is None or _num(bounds[0]) != 0.0:
        return None
    if bounds[1] is None:
        return 0.0, None
    hi = _num(bounds[1])
    return (0.0, hi) if hi is not None and hi > 0 else None


class RectifierOverride(TorchFunctionMode):
    """Torch function mode replacing rectifier gradients by ``rule``; ``calls`` counts overrides."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        check_choice("rule", rule, RULES)
        self.rule = rule
        self.calls = 0

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if args and isinstance(args[0], Tensor) and args[0].requires_grad:
            bounds = rectifier_bounds(func, args, kwargs)
            if bounds is not None and args[0].is_floating_point():
                x = args[0]
                self.calls += 1
                out = _Rectify.apply(x, bounds[0], bounds[1], self.rule)
                if is_inplace(func, args, kwargs):  # in-place call: keep its semantics
                    x.copy_(out)
                    return x
                return out
        return func(*args, **kwargs)


def rectifier_override(rule: str) -> RectifierOverride:
    """Context manager: inside the ``with`` block rectifier gradients follow ``rule``.

    >>> with rectifier_override("guided") as mode:
    ...     grads = torch.autograd.grad(model(x)[:, c].sum(), x)
    """
    return RectifierOverride(rule)
