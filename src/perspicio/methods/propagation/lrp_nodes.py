"""LRP's rules for the operations that are not affine layers, one small node per rule.

Each rule object is the ``rule`` of one :class:`~perspicio.methods.propagation.nodes.Node`: its
``forward`` runs the operation, its ``backward(ins, out, R)`` returns the relevance of each input
(and records the step for ``record_layers``). :class:`AffineRule` hands an affine operation to
the composite's rule (:mod:`.rules`); the others are fixed by the operation kind
(docs/propagation.md, "LRP: the rule of each operation"):

* :class:`PassRule`: pass-through (element-wise activations, scaling by constants, identity norms);
* :class:`LinearRule`: proportional through a parameter-free linear map (sums, means, pooling,
  frozen-statistics norms), ``R_x = x * J^T (R / z)``;
* :class:`SumRule`: proportional split of ``a + b`` (residuals);
* :class:`ProductRule`: epsilon over the inner sum of a product of two input-dependent tensors,
  then 50/50 (or all to the operand that is not a softmax gate);
* :class:`SoftmaxRule`: AttnLRP's ``R_x = x (R - s sum(R))``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ...core import ops
from ...errors import ModelError
from .nodes import safe_div, sum_to
from .operations import Call, op_name, substitute
from .rules import RuleContext

if TYPE_CHECKING:  # pragma: no cover - annotations only
    from .lrp import LRPPropagator


def norm_linear_part(call: Call, x: Tensor) -> Any:
    """For a normalisation call, the linear map it is when its statistics are frozen (bias excluded)."""
    return norm_linear_maps(call, x)[0]


def norm_linear_maps(call: Call, x: Tensor) -> tuple[Any, Any]:
    """For a normalisation call, the linear map ``J`` it is when its statistics are frozen (bias
    excluded) and its transpose ``s -> J^T s`` in closed form: the frozen statistics make ``J`` a
    per-channel scale (BatchNorm, RMSNorm) or the scaled centring ``diag(w) inv (I - 11^T / n)``
    (LayerNorm, GroupNorm per group), whose transpose is ``inv (u - mean(u))`` with ``u = w s``
    (the centring is symmetric, ``inv`` constant per row)."""
    name = op_name(call.func).rsplit(".", 1)[-1]
    a = dict(zip(("input", "p1", "p2", "p3", "p4", "p5", "p6", "p7"), call.args))
    kw = call.kwargs
    if name == "batch_norm":
        rm, rv = a.get("p1", kw.get("running_mean")), a.get("p2", kw.get("running_var"))
        w = a.get("p3", kw.get("weight"))
        training = a.get("p5", kw.get("training", False))
        eps = a.get("p7", kw.get("eps", 1e-5))
        if training or rm is None:
            raise ModelError(
                "batch_norm with batch statistics (training mode) is not an affine map; use eval mode."
            )
        scale = torch.rsqrt(rv + eps)
        if w is not None:
            scale = scale * w
        scale = scale.view(1, -1, *([1] * (x.ndim - 2)))
        return (lambda t: t * scale), (lambda s: s * scale)
    if name == "layer_norm":
        shape = a.get("p1", kw.get("normalized_shape"))
        w = a.get("p2", kw.get("weight"))
        eps = a.get("p4", kw.get("eps", 1e-5))
        dims = tuple(
            range(x.ndim - len(tuple(shape) if not isinstance(shape, int) else (shape,)), x.ndim)
        )
        inv = torch.rsqrt(x.var(dim=dims, unbiased=False, keepdim=True) + eps)

        def ln(t: Tensor) -> Tensor:
            out = (t - t.mean(dim=dims, keepdim=True)) * inv
            return out * w if w is not None else out

        def ln_t(s: Tensor) -> Tensor:
            u = (s * w if w is not None else s) * inv
            return u - u.mean(dim=dims, keepdim=True)

        return ln, ln_t
    if name == "group_norm":
        groups = a.get("p1", kw.get("num_groups"))
        w = a.get("p2", kw.get("weight"))
        eps = a.get("p4", kw.get("eps", 1e-5))
        n = x.shape[0]
        xg = x.reshape(n, groups, -1)
        inv = torch.rsqrt(xg.var(dim=-1, unbiased=False, keepdim=True) + eps)
        wshape = (1, -1, *([1] * (x.ndim - 2)))

        def gn(t: Tensor) -> Tensor:
            tg = t.reshape(n, groups, -1)
            out = ((tg - tg.mean(dim=-1, keepdim=True)) * inv).reshape(t.shape)
            return out * w.view(wshape) if w is not None else out

        def gn_t(s: Tensor) -> Tensor:
            u = (s * w.view(wshape) if w is not None else s).reshape(n, groups, -1) * inv
            return (u - u.mean(dim=-1, keepdim=True)).reshape(s.shape)

        return gn, gn_t
    if name == "rms_norm":
        shape = a.get("p1", kw.get("normalized_shape"))
        w = a.get("p2", kw.get("weight"))
        eps = a.get("p3", kw.get("eps"))
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        dims = tuple(
            range(x.ndim - len(tuple(shape) if not isinstance(shape, int) else (shape,)), x.ndim)
        )
        inv = torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + eps)
        return (lambda t: t * inv * w if w is not None else t * inv), (
            lambda s: s * inv * w if w is not None else s * inv
        )
    raise ModelError(f"no linear form known for {call.name}.")


def linear_vjp(fn: Any, x: Tensor, s: Tensor) -> Tensor:
    """``J^T s`` of a linear map ``fn`` at ``x`` (by autograd on a detached copy)."""
    with torch.enable_grad():
        xi = x.detach().requires_grad_(True)
        return torch.autograd.grad(fn(xi), xi, s)[0]


class PassRule:
    def __init__(self, prop: LRPPropagator, call: Call, label: str) -> None:
        self.prop, self.call, self.label = prop, call, label

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], out: Tensor, R: Tensor) -> tuple[Tensor]:
        return (sum_to(R, ins[0].shape),)  # conserves by construction: nothing to record


class LinearRule:
    """Relevance proportional to contributions of a parameter-free linear map: ``x * J^T (R / z)``."""

    def __init__(
        self, prop: LRPPropagator, call: Call, fn: Any, label: str, transpose: Any = None
    ) -> None:
        self.prop, self.call, self.fn, self.label = prop, call, fn, label
        #: ``s -> J^T s`` in closed form (None: by autograd through ``fn``)
        self.transpose = transpose

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], out: Tensor, R: Tensor) -> tuple[Tensor]:
        x = ins[0]
        s = safe_div(R, out, self.prop.composite.stabilizer)
        Rx = x * (self.transpose(s) if self.transpose is not None else linear_vjp(self.fn, x, s))
        self.prop.record(self.label, R, (Rx,))
        return (Rx,)


class AffineRule:
    def __init__(
        self, prop: LRPPropagator, call: Call, op: Any, rule: Any, ctx: RuleContext, label: str
    ) -> None:
        self.prop, self.call, self.op, self.rule, self.ctx, self.label = (
            prop,
            call,
            op,
            rule,
            ctx,
            label,
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], out: Tensor, R: Tensor) -> tuple[Tensor]:
        Rx = self.rule.relevance(self.op, ins[0], out, R, self.ctx)
        self.prop.record(self.label, R, (Rx,))
        return (Rx,)


class SumRule:
    """``z = sum_t c_t t (+ constants)``: each variable term gets ``c_t t / z`` of the relevance."""

    def __init__(self, prop: LRPPropagator, call: Call, coefs: list[float], label: str) -> None:
        self.prop, self.call, self.coefs, self.label = prop, call, coefs, label

    def forward(self, *xs: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], out: Tensor, R: Tensor) -> tuple[Tensor, ...]:
        s = safe_div(R, out, self.prop.composite.stabilizer)
        rel = tuple(
            sum_to(t * s if c == 1.0 else c * t * s, t.shape) for c, t in zip(self.coefs, ins)
        )
        self.prop.record(self.label, R, rel)
        return rel


def product_vjp(
    call: Call, ids: tuple[int, int], a: Tensor, b: Tensor, s: Tensor
) -> tuple[Tensor, Tensor] | None:
    """``(J_a^T s, J_b^T s)`` of a product ``z = f(a, b)`` in closed form from the saved operands,
    without recomputing the forward: for ``z = L @ R`` (batched, broadcast), ``s @ R^T`` and
    ``L^T @ s`` summed over broadcast dimensions. ``ids``: ``id`` of the forward's ``a`` and ``b``
    (``call.args`` holds the forward's tensors). None where no closed form applies (einsum, 1-d
    operands, extra arguments): the caller uses autograd."""
    order = ops.matmul_operands(call.func)
    if order is None or call.kwargs or len(call.args) != 2 or a.ndim < 2 or b.ndim < 2:
        return None
    left, right = id(call.args[order[0]]), id(call.args[order[1]])
    if (left, right) == ids:
        return sum_to(s @ b.mT, a.shape), sum_to(a.mT @ s, b.shape)
    if (right, left) == ids:
        return sum_to(b.mT @ s, a.shape), sum_to(s @ a.mT, b.shape)
    return None


class ProductRule:
    """Bilinear ``z = f(a, b)``: epsilon on the sum inside f, then 50/50 (or all to the non-gate)."""

    def __init__(
        self,
        prop: LRPPropagator,
        call: Call,
        ids: tuple[int, int],
        gates: tuple[bool, bool],
        label: str,
    ) -> None:
        self.prop, self.call, self.ids, self.gates, self.label = prop, call, ids, gates, label

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], out: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
        a, b = ins
        s = safe_div(R, out, self.prop.composite.stabilizer)
        grads = product_vjp(self.call, self.ids, a, b, s)
        if grads is not None:
            ga, gb = grads
        else:
            ga, gb = self._autograd_vjp(a, b, s)
        if self.prop.composite.attention == "constant" and self.gates[0] != self.gates[1]:
            Ra = torch.zeros_like(a) if self.gates[0] else a * ga
            Rb = torch.zeros_like(b) if self.gates[1] else b * gb
        else:
            Ra, Rb = 0.5 * a * ga, 0.5 * b * gb
        self.prop.record(self.label, R, (Ra, Rb))
        return Ra, Rb

    def _autograd_vjp(self, a: Tensor, b: Tensor, s: Tensor) -> tuple[Tensor, Tensor]:
        """``J_a^T s``, ``J_b^T s`` of the call by autograd through a recomputed forward."""
        va, vb = self.ids
        with torch.enable_grad():
            ai, bi = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
            zi = self.call.func(
                *substitute(self.call.args, {va: ai, vb: bi}),
                **substitute(self.call.kwargs, {va: ai, vb: bi}),
            )
            return torch.autograd.grad(zi, (ai, bi), s)


class SoftmaxRule:
    """AttnLRP softmax rule: ``R_x = x (R - s sum(R))`` (zero where x is -inf)."""

    def __init__(self, prop: LRPPropagator, call: Call, dim: int, label: str) -> None:
        self.prop, self.call, self.dim, self.label = prop, call, dim, label

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], out: Tensor, R: Tensor) -> tuple[Tensor]:
        x = ins[0]
        Rx = x * (R - out * R.sum(dim=self.dim, keepdim=True))
        Rx = torch.where(torch.isfinite(x), Rx, torch.zeros_like(Rx))
        self.prop.record(self.label, R, (Rx,))
        return (Rx,)
