"""Affine operations (convolutions, linear layers, matmuls with a constant operand) as LRP and
DeepLIFT rules consume them: :class:`AffineOp`.

The rules never touch oneDNN: :meth:`AffineOp.map` and :meth:`AffineOp.adjoint` run the
convolutions of perspicio's own (memoised) kernels on pre-packed kernels through
:mod:`perspicio.core.kernels`, and :attr:`AffineOp.taps` says which taps of a fused twin's
kernel are real.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import kernels
from ...errors import ModelError
from .derived import derived, derived_owner
from .operations import Call, op_name


@dataclass
class AffineOp:
    """An affine operation as the rules see it: ``fn(x, weight, bias)`` and its input-adjoint.

    Rules evaluate the same map with modified inputs and weights (positive parts, ones,
    squares, ...), so the op is kept as a function of ``(x, w, b)``. ``conv`` holds a
    convolution's ``stride``/``padding``/``dilation``/``groups`` (None for other ops) and
    :attr:`taps` the real taps of its kernel. A rule evaluates the op with :meth:`map` and its
    transpose with :meth:`adjoint`: both run on oneDNN's pre-packed kernels where that applies
    (perspicio's own weights, CPU, float32, no gradients) and give the plain results otherwise -
    a rule never needs to know which.
    """

    name: str
    fn: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    weight: Tensor
    bias: Tensor | None
    conv: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __call__(self, x: Tensor, w: Tensor | None = None, b: Tensor | None = None) -> Tensor:
        return self.fn(x, self.weight if w is None else w, b)

    @property
    def taps(self) -> Tensor | None:
        """1 at the real taps of the kernel, 0 at zero taps added by a fused twin for an asymmetric
        padding (None: every tap is real). Rules that treat every tap alike (LRP-flat) use it."""
        return kernels.tap_mask(self.weight)

    def map(self, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """``fn(x, w, b)``, on a pre-packed kernel where possible (same arithmetic, same result)."""
        return _conv(self, x, w, b)

    def adjoint(self, x: Tensor, w: Tensor, s: Tensor) -> Tensor:
        """``J^T s`` of ``x -> fn(x, w)`` (:meth:`vjp`), for a stride-1 convolution as the forward
        convolution of ``s`` with the transposed, mirrored kernel on a pre-packed kernel."""
        return _vjp(self, x, w, s)

    def vjp(self, x: Tensor, w: Tensor, s: Tensor) -> Tensor:
        """``J^T s`` of ``x -> fn(x, w)`` (the map is linear in x, so no forward is needed for conv/linear)."""
        if self.name == "linear":
            return s.matmul(w)
        if self.conv is not None:
            c = self.conv
            return torch.ops.aten.convolution_backward(
                s, x, w, None, c["stride"], c["padding"], c["dilation"], False, [0] * len(c["stride"]),
                c["groups"], [True, False, False],
            )[0]
        with torch.enable_grad():
            xi = x.detach().requires_grad_(True)
            out = self.fn(xi, w.detach(), None)
            return torch.autograd.grad(out, xi, s)[0]


# ---------------------------------------------------------------------------- packed convolutions

#: run the rules' convolutions of memoised kernels on oneDNN-packed kernels (False: always plain)
USE_PACKED: bool = kernels.FUSED_OP is not None and kernels.PACKING


def _packable(op: AffineOp, x: Tensor, w: Tensor) -> bool:
    """Can this 2-d convolution run on a pre-packed oneDNN weight memoised across calls?

    oneDNN reorders a plain weight into its blocked layout on every call - for the small feature
    maps of a CNN's later layers that reorder costs as much as the convolution. Packing once pays
    off only where the packed weight is kept, i.e. for the weights ``derived`` memoises (those of
    perspicio's own twins and merged layers)."""
    return (USE_PACKED and op.conv is not None and x.dim() == 4
            and len(op.conv["stride"]) == 2 and x.dtype == w.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not w.requires_grad and derived_owner(w) is not None)


def _packed(w: Tensor, key: tuple, padding: list[int], stride: list[int], dilation: list[int], groups: int,
            size: tuple[int, ...], kernel: Callable[[Tensor], Tensor] | None = None) -> Tensor | None:
    """``kernel(w)`` (default ``w``) pre-packed, memoised with ``w`` under ``key``."""
    return derived(w, key, lambda t: kernels.pack_kernel((t if kernel is None else kernel(t)).contiguous(), padding, stride,
                                                 dilation, groups, size))


def _conv(op: AffineOp, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``op(x, w, b)``, on a pre-packed weight where possible (same arithmetic, same result)."""
    if not _packable(op, x, w) or (b is not None and (b.requires_grad or b.dtype != w.dtype)):
        return op(x, w, b)
    c = op.conv
    key = ("packed", tuple(c["padding"]), tuple(c["stride"]), tuple(c["dilation"]), c["groups"], tuple(x.shape[1:]))
    packed = _packed(w, key, c["padding"], c["stride"], c["dilation"], c["groups"], tuple(x.shape[2:]))
    if packed is None:
        return op(x, w, b)
    return kernels.run_conv(x, packed, b, c["padding"], c["stride"], c["dilation"], c["groups"])


def _transposed_kernel(w: Tensor, groups: int) -> Tensor:
    """The kernel whose stride-1 convolution is the adjoint of ``w``'s: in and out channels swapped
    within each group, taps mirrored."""
    out_ch, in_per_group = w.shape[0], w.shape[1]
    k = w.shape[2:]
    wt = w.reshape(groups, out_ch // groups, in_per_group, *k).transpose(1, 2)
    return wt.reshape(groups * in_per_group, out_ch // groups, *k).flip(-1, -2).contiguous()


def _vjp(op: AffineOp, x: Tensor, w: Tensor, s: Tensor) -> Tensor:
    """``op.vjp(x, w, s)``; for a stride-1 convolution as the forward convolution of ``s`` with the
    transposed, mirrored kernel (padding ``d (k - 1) - p``) on a pre-packed weight."""
    c = op.conv
    if (not _packable(op, x, w) or any(st != 1 for st in c["stride"]) or s.dim() != 4 or s.dtype != w.dtype
            or s.requires_grad):
        return op.vjp(x, w, s)
    k = w.shape[2:]
    pad = [d * (kk - 1) - p for d, kk, p in zip(c["dilation"], k, c["padding"])]
    if min(pad) < 0:  # padding wider than the kernel reaches: the adjoint would need cropping
        return op.vjp(x, w, s)
    key = ("vjp_packed", tuple(c["padding"]), tuple(c["dilation"]), c["groups"], tuple(s.shape[1:]))
    packed = _packed(w, key, pad, [1, 1], c["dilation"], c["groups"], tuple(s.shape[2:]),
                     lambda t: _transposed_kernel(t, c["groups"]))
    if packed is None:
        return op.vjp(x, w, s)
    g = kernels.run_conv(s, packed, None, pad, [1, 1], c["dilation"], c["groups"])
    return g if g.shape == x.shape else op.vjp(x, w, s)


def _tuple(v: Any, n: int) -> list[int]:
    if isinstance(v, int):
        return [v] * n
    return [int(i) for i in v]


def affine_op(call: Call, is_var: Callable[[Any], bool]) -> AffineOp:
    """Describe an AFFINE call (conv/linear/matmul with one constant operand) as an :class:`AffineOp`."""
    func, args, kwargs = call.func, call.args, call.kwargs
    name = op_name(func).rsplit(".", 1)[-1]
    if func is F.linear:
        w = args[1] if len(args) > 1 else kwargs["weight"]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        return AffineOp("linear", lambda x_, w_, b_: F.linear(x_, w_, b_), w, b)
    if func in (F.conv1d, F.conv2d, F.conv3d):
        n = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}[func]
        names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        w, b = bound["weight"], bound.get("bias")
        stride, padding = bound.get("stride", 1), bound.get("padding", 0)
        dilation, groups = bound.get("dilation", 1), bound.get("groups", 1)

        def conv(x_: Tensor, w_: Tensor, b_: Tensor | None) -> Tensor:
            return func(x_, w_, b_, stride, padding, dilation, groups)

        spec = None
        if not isinstance(padding, str):
            spec = {"stride": _tuple(stride, n), "padding": _tuple(padding, n), "dilation": _tuple(dilation, n),
                    "groups": int(groups)}
        return AffineOp(name, conv, w, b, conv=spec)
    if func in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
        w = args[1] if len(args) > 1 else kwargs["weight"]
        b = args[2] if len(args) > 2 else kwargs.get("bias")
        rest, kw = args[3:], {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
        return AffineOp(name, lambda x_, w_, b_: func(x_, w_, b_, *rest, **kw), w, b)
    # matmul-like with exactly one input-dependent operand: the constant one is the "weight"
    tensors = list(args)
    if func is torch.einsum or (name == "einsum"):
        eq, ops = args[0], list(args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        pos = next(i for i, t in enumerate(ops) if is_var(t))
        wpos = [i for i, t in enumerate(ops) if i != pos]
        if len(wpos) != 1:
            raise ModelError(f"einsum {eq!r} with {len(ops)} operands has no affine rule (expected two operands).")
        wi = wpos[0]

        def ein(x_: Tensor, w_: Tensor, b_: Tensor | None) -> Tensor:
            o = list(ops)
            o[pos], o[wi] = x_, w_
            return torch.einsum(eq, *o)

        return AffineOp("einsum", ein, ops[wi], None)
    pos = next(i for i, t in enumerate(tensors) if is_var(t))
    wi = 1 - pos
    other = tensors[wi]
    base = {"__matmul__": torch.matmul, "__rmatmul__": torch.matmul, "matmul": torch.matmul, "mm": torch.mm,
            "bmm": torch.bmm, "inner": torch.inner, "outer": torch.outer, "dot": torch.dot, "mv": torch.mv}[name]
    if name == "__rmatmul__":  # other @ self
        pos, wi = (1, 0) if pos == 0 else (0, 1)

    def mm(x_: Tensor, w_: Tensor, b_: Tensor | None) -> Tensor:
        return base(x_, w_) if pos == 0 else base(w_, x_)

    return AffineOp("matmul", mm, other, None)
