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

Modules are caught through the functional call they make, so one mechanism
covers ``nn.ReLU`` modules and functional uses alike: a
:class:`torch.overrides.TorchFunctionMode` is pushed for the duration of a
``with`` block and popped in ``finally``; nothing global is patched. TorchScript
models bypass Python dispatch and are not affected.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

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


def _arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any) -> Any:
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


def _relu(args: tuple, kwargs: dict) -> tuple[float, float | None] | None:
    return 0.0, None


def _relu6(args: tuple, kwargs: dict) -> tuple[float, float | None] | None:
    return 0.0, 6.0


def _hardtanh(args: tuple, kwargs: dict) -> tuple[float, float | None] | None:
    lo = _num(_arg(args, kwargs, 1, "min_val", -1.0))
    hi = _num(_arg(args, kwargs, 2, "max_val", 1.0))
    return (lo, hi) if lo == 0.0 and hi is not None else None


def _clamp(args: tuple, kwargs: dict) -> tuple[float, float | None] | None:
    lo_raw = _arg(args, kwargs, 1, "min", None)
    hi_raw = _arg(args, kwargs, 2, "max", None)
    lo = _num(lo_raw)
    if lo != 0.0:
        return None
    if hi_raw is None:
        return 0.0, None
    hi = _num(hi_raw)
    return (0.0, hi) if hi is not None and hi > 0 else None


def _clamp_min(args: tuple, kwargs: dict) -> tuple[float, float | None] | None:
    lo = _num(_arg(args, kwargs, 1, "min", None))
    return (0.0, None) if lo == 0.0 else None


def _inplace_kw(args: tuple, kwargs: dict, pos: int) -> bool:
    return bool(_arg(args, kwargs, pos, "inplace", False))


# func -> (bounds parser, in-place?) ; in-place may depend on an `inplace` argument
_Parser = Callable[[tuple, dict], "tuple[float, float | None] | None"]
_TABLE: dict[Any, tuple[_Parser, Callable[[tuple, dict], bool]]] = {}


def _add(funcs: list[Any], parser: _Parser, inplace: Callable[[tuple, dict], bool]) -> None:
    for f in funcs:
        if f is not None:
            _TABLE[f] = (parser, inplace)


def _never(args: tuple, kwargs: dict) -> bool:
    return False


def _always(args: tuple, kwargs: dict) -> bool:
    return True


_add([torch.relu, Tensor.relu], _relu, _never)
_add([torch.relu_, Tensor.relu_, getattr(F, "relu_", None)], _relu, _always)
_add([F.relu], _relu, lambda a, k: _inplace_kw(a, k, 1))
_add([F.relu6], _relu6, lambda a, k: _inplace_kw(a, k, 1))
_add([F.hardtanh], _hardtanh, lambda a, k: _inplace_kw(a, k, 3))
_add([getattr(F, "hardtanh_", None)], _hardtanh, _always)
_add([torch.clamp, torch.clip, Tensor.clamp, Tensor.clip], _clamp, _never)
_add([torch.clamp_, getattr(torch, "clip_", None), Tensor.clamp_, Tensor.clip_], _clamp, _always)
_add([torch.clamp_min, Tensor.clamp_min], _clamp_min, _never)
_add([getattr(torch, "clamp_min_", None), Tensor.clamp_min_], _clamp_min, _always)


class RectifierOverride(TorchFunctionMode):
    """Torch function mode replacing rectifier gradients by ``rule``; ``calls`` counts overrides."""

    def __init__(self, rule: str) -> None:
        super().__init__()
        check_choice("rule", rule, RULES)
        self.rule = rule
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        entry = _TABLE.get(func)
        if entry is not None and args and isinstance(args[0], Tensor) and args[0].requires_grad:
            bounds = entry[0](args, kwargs)
            if bounds is not None and args[0].is_floating_point():
                x = args[0]
                self.calls += 1
                out = _Rectify.apply(x, bounds[0], bounds[1], self.rule)
                if entry[1](args, kwargs):  # in-place call: keep its semantics
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
