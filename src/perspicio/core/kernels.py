"""The one interface to oneDNN's fused and pre-packed convolutions.

Everything perspicio does with ``torch.ops.mkldnn`` goes through this module; nothing else
names those private operators. It offers

* :func:`run_conv` - a 2-d convolution, optionally with an activation as oneDNN post-op, on a
  plain or pre-packed kernel (:func:`pack_kernel`); :data:`PACKING` says whether packing exists;
* the *fused call* that perspicio's fused twin (:mod:`perspicio.core.fuse`) makes:
  :func:`is_fused_call` recognises it and :func:`parse_fused_call` describes it as a
  :class:`FusedCall` (the convolution's arguments and the activation as the torch function a
  model would call), so an interpreter of torch operations never parses oneDNN arguments;
* the facts about a fused twin's kernels: :func:`tap_mask` (the real taps of a kernel extended
  by zero taps for an asymmetric padding) and :func:`packed_kernel` (its kept packed form);
* the protocol by which a :class:`~torch.overrides.TorchFunctionMode` asks to *see* fused calls:
  a mode class that sets :data:`SEES_FUSED_CALLS` (the attribute name
  ``"handles_fused_convolutions"``) to True gets the fused call itself, with the dense kernel, while
  it is the innermost mode (:func:`fused_calls_seen`). Any other mode, and gradients without such
  a mode, make a fused module run its original convolution and activation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .caches import Cache


def _pointwise() -> Any:
    """``torch.ops.mkldnn._convolution_pointwise`` (None in a build without oneDNN)."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return None if ops is None else ops._convolution_pointwise
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return None


def _reorder() -> Any:
    """oneDNN's kernel packing op (None in a build without it)."""
    ops = getattr(torch.ops, "mkldnn", None)
    try:
        return None if ops is None or not torch.backends.mkldnn.is_available() else ops._reorder_convolution_weight
    except (AttributeError, RuntimeError):
        return None


#: the fused convolution operator (None: this torch has no oneDNN; nothing is fused then)
FUSED_OP: Any = _pointwise()

#: oneDNN can pre-pack kernels: then even a convolution with nothing to fuse runs faster as a fused call
PACKING: bool = _reorder() is not None

#: the class attribute a torch function mode sets to True to receive fused calls (see module docstring)
SEES_FUSED_CALLS = "handles_fused_convolutions"


def available() -> bool:
    """Can this torch run fused convolutions (oneDNN present and usable)?"""
    return FUSED_OP is not None and torch.backends.mkldnn.is_available()


def is_fused_call(func: Any) -> bool:
    """Is ``func`` the fused convolution operator?"""
    return FUSED_OP is not None and func is FUSED_OP


def pack_kernel(weight: Tensor, padding: list[int], stride: list[int], dilation: list[int], groups: int,
                size: tuple[int, ...]) -> Tensor | None:
    """``weight`` pre-packed in oneDNN's blocked layout for inputs of spatial ``size`` (None where
    packing is unavailable). oneDNN reorders a plain kernel on every call, which on small feature
    maps costs as much as the convolution; a packed kernel gives the same results at any batch."""
    reorder = _reorder()
    if reorder is None:
        return None
    try:
        return reorder(weight, padding, stride, dilation, groups, [1, weight.shape[1] * groups, *size[-2:]])
    except RuntimeError:  # a configuration oneDNN does not pack: run on the plain weight
        return None


def run_conv(x: Tensor, weight: Tensor, bias: Tensor | None, padding: list[int], stride: list[int],
             dilation: list[int], groups: int, attr: str = "none", scalars: list[Any] | None = None,
             algorithm: str | None = None) -> Tensor:
    """``act(conv2d(x, weight, bias))`` as one oneDNN call; ``weight`` plain (dense) or packed by
    :func:`pack_kernel` (same arithmetic, same result). ``attr`` names the post-op (``"none"``,
    ``"relu"``, ``"hardtanh"``, ...; see :func:`post_op_function`). Only where :data:`FUSED_OP`
    exists."""
    return FUSED_OP(x, weight, bias, padding, stride, dilation, groups, attr, [] if scalars is None else scalars,
                    algorithm)


def post_op_function(attr: str, scalars: list[Any], algorithm: str | None) -> tuple[Any, tuple, dict] | None:
    """The torch function (with its extra arguments) that the activation module of a oneDNN post-op
    calls (``(None, (), {})`` for no post-op; None if unknown)."""
    if attr == "none":
        return None, (), {}
    if attr == "hardtanh" and len(scalars) == 2:
        return F.hardtanh, (float(scalars[0]), float(scalars[1])), {}
    if attr == "leaky_relu" and len(scalars) == 1:
        return F.leaky_relu, (float(scalars[0]),), {}
    if attr == "gelu":
        return F.gelu, (), {"approximate": algorithm or "none"}
    plain = {"relu": F.relu, "swish": F.silu, "sigmoid": torch.sigmoid, "tanh": torch.tanh,
             "hardswish": F.hardswish}
    return (plain[attr], (), {}) if attr in plain and not scalars else None


@dataclass
class FusedCall:
    """A fused call, described: the convolution's arguments (``weight`` the dense kernel, as a mode
    that sees fused calls receives it) and the activation as the torch function the model's
    activation module calls (None: no activation)."""

    x: Tensor
    weight: Tensor
    bias: Tensor | None
    padding: list[int]
    stride: list[int]
    dilation: list[int]
    groups: int
    act: Any
    act_args: tuple
    act_kwargs: dict

    def conv_args(self) -> tuple:
        """The arguments of the equivalent ``F.conv2d`` call."""
        return (self.x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def parse_fused_call(args: tuple, kwargs: dict) -> FusedCall | None:
    """Describe a fused call's arguments (None for an activation perspicio does not know)."""
    names = ("x", "weight", "bias", "padding", "stride", "dilation", "groups", "attr", "scalars", "algorithm")
    a = dict(zip(names, args))
    a.update(kwargs)
    act = post_op_function(a.get("attr", "none"), list(a.get("scalars") or []), a.get("algorithm"))
    if act is None:
        return None
    return FusedCall(a["x"], a["weight"], a.get("bias"), list(a["padding"]), list(a["stride"]), list(a["dilation"]),
                     int(a["groups"]), *act)


#: extended kernels (zero taps added for an asymmetric padding) -> 1 at the real taps, 0 at the added
#: ones (rules that treat every tap alike, such as LRP-flat, must skip the added ones)
TAP_MASKS = Cache("fused kernel taps", holds="masks of the real taps of extended fused kernels",
                  key="fused kernel (weak)", sized=True, tied=True)


def tap_mask(weight: Tensor) -> Tensor | None:
    """The real taps of an extended kernel (None: every tap is real)."""
    return TAP_MASKS.get(weight)


#: dense fused kernels -> the same kernel pre-packed in oneDNN's blocked layout (plain weights are
#: reordered on every call, which on small feature maps costs as much as the convolution)
PACKED = Cache("packed fused kernels", holds="oneDNN-packed fused kernels (also held by their module)",
               key="fused kernel (weak)", tied=True)


def packed_kernel(weight: Tensor) -> Tensor | None:
    """The kept packed form of a fused twin's dense kernel (None: none kept)."""
    return PACKED.get(weight)


def fused_calls_seen() -> bool:
    """Does the innermost torch function mode declare :data:`SEES_FUSED_CALLS`?

    (A torch without these internals reports False: fused modules then run their original layers
    under any mode, which is correct, only slower.)"""
    try:
        n = torch._C._len_torch_function_stack()
        return n > 0 and getattr(torch._C._get_function_stack_at(n - 1), SEES_FUSED_CALLS, False)
    except AttributeError:  # pragma: no cover - older or newer torch
        return False
