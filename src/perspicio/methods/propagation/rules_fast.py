"""Fast evaluation of the LRP-gamma and LRP-alpha-beta rules (the definitions are in :mod:`.rules`).

The rules' definitions evaluate the layer once per group of contributions (``x+`` and ``x-``,
each with its own modified weights) and add the results. The functions here compute the same
numbers with fewer and cheaper passes:

* **non-negative inputs** (after a ReLU, proven by the forward pass or checked with one
  reduction): the ``x-`` terms vanish and are skipped;
* **stacked signs**: an input of both signs runs as *one* map of ``[x+, x-]`` (stacked along the
  input channels) with the two modified kernels stacked likewise, so the layer's output-sized
  tensors are written and read once instead of twice (linear layers, ungrouped convolutions);
* **gamma on non-negative inputs** reuses the forward output ``z``: with ``P = W+ x + b+`` the
  boosted denominators are ``z + g P`` and ``z + g (z - P)``, one extra evaluation instead of
  two, and the two adjoints fold into ``W^T a + W+^T d``;
* **known signs**: alpha-beta's denominators have a known sign, so the stabiliser rides on the
  bias and the division writes into the fresh buffer;
* **skipped halves**: without relevance on negative outputs (a layer feeding a ReLU) gamma's
  ``z < 0`` half is not evaluated;
* fresh buffers are reused in place (``times``, ``div_known_sign``) and modified weights are
  memoised per weight (:func:`~.derived.derived`), packed for oneDNN behind :class:`~.affine.AffineOp`.

``tests/test_lrp_formulas.py`` checks every path against a direct implementation of the
formulas on small random convolution and linear layers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .affine import AffineOp
from .derived import clamp_neg, clamp_pos, derived, neg, pos
from .nodes import safe_div

if TYPE_CHECKING:  # pragma: no cover
    from .rules import AlphaBeta, Gamma, RuleContext


# ---------------------------------------------------------------------------- shared helpers


def signed(x: Tensor, ctx: RuleContext) -> bool:
    """Does ``x`` have negative entries? (Skipped when the forward pass proved it cannot.)"""
    # a float reduction: boolean kernels (x < 0, any) are several times slower on CPU
    return not ctx.nonneg and x.numel() > 0 and bool(x.amin() < 0)


def _folds_bias(op: AffineOp) -> bool:
    """Does ``op`` apply its bias argument (conv/linear), so that a constant can be folded into it?"""
    return op.conv is not None or op.name == "linear"


def shifted(op: AffineOp, x: Tensor, w: Tensor, b: Tensor | None, shift: float) -> Tensor:
    """``op(x, w, b) + shift`` in a fresh buffer; the shift rides on the bias where the op applies one."""
    if shift == 0.0:
        return op.map(x, w, b)
    if _folds_bias(op):  # conv/linear weights are (out, in, ...): one bias entry per output channel
        if b is None:
            bias = torch.full((w.shape[0],), shift, dtype=w.dtype, device=w.device)
        else:
            bias = derived(b, ("shift", shift), lambda t: t + shift)
        return op.map(x, w, bias)
    return op.map(x, w, b).add_(shift)


def div_known_sign(R: Tensor, z: Tensor) -> Tensor:
    """``R / z`` written into ``z`` (a fresh buffer of the same shape) when possible."""
    if z.shape == R.shape and z.dtype == R.dtype and not R.requires_grad:
        return torch.div(R, z, out=z)
    return R / z


def times(g: Tensor, x: Tensor) -> Tensor:
    """``x * g`` reusing the fresh buffer ``g`` when the shapes agree.

    In a backward pass (grad mode off) the saved input ``x`` still has ``requires_grad``,
    but no graph is recorded, so only ``g`` itself has to be free of autograd history.
    """
    if (
        g.shape == x.shape
        and g.dtype == x.dtype
        and not g.requires_grad
        and not (x.requires_grad and torch.is_grad_enabled())
    ):
        return g.mul_(x)
    return x * g


def where_pos(R: Tensor, z: Tensor) -> Tensor:
    """``R * (z > 0)`` (R where z > 0, else 0) without a boolean mask (float kernels are faster on CPU)."""
    if R.shape == z.shape and R.dtype == z.dtype:
        return torch.ops.aten.threshold_backward(R, z, 0.0)
    return R * (z > 0)


def where_neg(R: Tensor, z: Tensor) -> Tensor:
    """``R * (z < 0)`` (R where z < 0, else 0) without a boolean mask."""
    if R.shape == z.shape and R.dtype == z.dtype:
        return torch.ops.aten.threshold_backward(R, torch.neg(z), 0.0)
    return R * (z < 0)


def boost(g: float, low: float | None, high: float | None) -> Callable[[Tensor], Tensor]:
    """``t + g * t.clamp(low, high)``: a weight with its positive (or negative) part boosted."""
    return lambda t: t + g * t.clamp(min=low, max=high)


# ---------------------------------------------------------------------------- inputs of both signs


def _stackable(op: AffineOp) -> bool:
    """Can an input of both signs run as one map of ``[x+, x-]`` (stacked along the input channels)?
    (Linear layers and ungrouped convolutions: their kernels stack along the input channels.)"""
    return op.name == "linear" or (op.conv is not None and op.conv["groups"] == 1)


def _split_signs(op: AffineOp, x: Tensor) -> tuple[Tensor, int]:
    """``[x+, x-]`` stacked along the input channels, and that dimension."""
    dim = 1 if op.conv is not None else -1
    return torch.cat([x.clamp(min=0), x.clamp(max=0)], dim=dim), dim


def _merge_signs(g: Tensor, dim: int) -> Tensor:
    """The relevance of ``x`` from that of ``[x+, x-]`` (the two halves added)."""
    half = g.shape[dim] // 2
    return g.narrow(dim, 0, half) + g.narrow(dim, half, half)


def _stack(
    first: Callable[[Tensor], Tensor], second: Callable[[Tensor], Tensor]
) -> Callable[[Tensor], Tensor]:
    """A kernel for ``[x+, x-]``: ``first(W)`` for ``x+`` and ``second(W)`` for ``x-``, stacked likewise."""
    return lambda t: torch.cat([first(t), second(t)], dim=1)


# ---------------------------------------------------------------------------- LRP-gamma


def gamma(rule: Gamma, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
    """:meth:`.rules.Gamma.definition`, fast (see the module docstring)."""
    g, w, b, eps = rule.gamma, op.weight, op.bias, rule.stabilizer
    is_signed = signed(x, ctx)  # after ReLUs the input is non-negative: skip the x- terms
    # relevance on outputs with z < 0: none when the layer feeds a ReLU whose next rule multiplies
    # by its input (an inactive unit passes nothing on) - then the "down" half is skipped
    R_dn = where_neg(R, z)
    down = bool(R_dn.any())
    if not is_signed and z.shape == R.shape:
        return _gamma_nonneg(g, eps, op, x, z, R, R_dn if down else None)
    wu = derived(w, ("gamma_up", g), boost(g, 0.0, None))
    wd = derived(w, ("gamma_dn", g), boost(g, None, 0.0))
    bu = None if b is None else derived(b, ("gamma_up", g), boost(g, 0.0, None))
    bd = None if b is None else derived(b, ("gamma_dn", g), boost(g, None, 0.0))
    if is_signed and _stackable(op):
        return _gamma_stacked(g, eps, op, x, z, R, R_dn if down else None, bu, bd)
    xp = x.clamp(min=0) if is_signed else x
    xn = x.clamp(max=0) if is_signed else None
    z_up = op.map(xp, wu, bu)  # positive contributions boosted
    if is_signed:
        z_up = z_up.add_(op.map(xn, wd, None))
    s_up = safe_div(where_pos(R, z), z_up, eps)
    if not down:
        out = times(op.adjoint(xp, wu, s_up), xp)
        return out.add_(times(op.adjoint(xn, wd, s_up), xn)) if is_signed else out
    z_dn = op.map(xp, wd, bd)  # negative contributions boosted
    if is_signed:
        z_dn = z_dn.add_(op.map(xn, wu, None))
    s_dn = safe_div(R_dn, z_dn, eps)
    out = times(op.adjoint(xp, wu, s_up).add_(op.adjoint(xp, wd, s_dn)), xp)
    if is_signed:
        out = out.add_(times(op.adjoint(xn, wd, s_up).add_(op.adjoint(xn, wu, s_dn)), xn))
    return out


def _gamma_stacked(
    g: float,
    eps: float,
    op: AffineOp,
    x: Tensor,
    z: Tensor,
    R: Tensor,
    R_dn: Tensor | None,
    bu: Tensor | None,
    bd: Tensor | None,
) -> Tensor:
    """Inputs of both signs as one map of ``[x+, x-]`` (stacked along the input channels) with
    ``[W + gW+, W + gW-]`` for the boosted positive part and ``[W + gW-, W + gW+]`` for the
    negative one (as in :func:`_alpha_beta_stacked`)."""
    w = op.weight
    both, dim = _split_signs(op, x)

    def part(stacked: Tensor, bias: Tensor | None, Rs: Tensor) -> Tensor:
        s = safe_div(Rs, op.map(both, stacked, bias), eps)
        return times(op.adjoint(both, stacked, s), both)

    boost_pos, boost_neg = boost(g, 0.0, None), boost(g, None, 0.0)
    up = derived(w, ("gamma_stacked_up", g), _stack(boost_pos, boost_neg))
    out = part(up, bu, where_pos(R, z))
    if R_dn is not None:
        dn = derived(w, ("gamma_stacked_dn", g), _stack(boost_neg, boost_pos))
        out = out.add_(part(dn, bd, R_dn))
    return _merge_signs(out, dim)


def _gamma_nonneg(
    g: float, eps: float, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, R_dn: Tensor | None
) -> Tensor:
    """The rule for x >= 0 with one extra evaluation instead of two.

    With ``P = W+ x + b+`` and the forward output ``z = W x + b``: ``z - P = W- x + b-``, so
    ``z_up = z + gamma P`` and ``z_dn = z + gamma (z - P)``; and
    ``(W + gW+)^T s_up + (W + gW-)^T s_dn = W^T (s_up + (1 + g) s_dn) + g W+^T (s_up - s_dn)``.
    Without relevance on negative outputs (``R_dn`` None) that is ``(W + gW+)^T s_up``.
    """
    w, b = op.weight, op.bias
    wp = pos(w)
    P = op.map(x, wp, pos(b))
    z_up = torch.add(z, P, alpha=g)
    s_up = safe_div(where_pos(R, z), z_up, eps)
    if R_dn is None:
        return times(op.adjoint(x, derived(w, ("gamma_up", g), boost(g, 0.0, None)), s_up), x)
    z_dn = torch.sub(z, P).mul_(g).add_(z)
    s_dn = safe_div(R_dn, z_dn, eps)
    a = torch.add(s_up, s_dn, alpha=1.0 + g)
    d = s_up.sub_(s_dn).mul_(g) if not s_up.requires_grad else (s_up - s_dn) * g
    return times(op.adjoint(x, w, a).add_(op.adjoint(x, wp, d)), x)


# ---------------------------------------------------------------------------- LRP-alpha-beta


def alpha_beta(rule: AlphaBeta, op: AffineOp, x: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
    """:meth:`.rules.AlphaBeta.definition`, fast (see the module docstring)."""
    w, b, eps = op.weight, op.bias, rule.stabilizer
    is_signed = signed(x, ctx)  # after ReLUs the input is non-negative: skip the x- terms
    if is_signed and _stackable(op):
        return _alpha_beta_stacked(rule, op, x, R)
    wp = pos(w)
    xp = x.clamp(min=0) if is_signed else x
    xn = x.clamp(max=0) if is_signed else None
    # z+ >= 0 and z- <= 0 by construction, so the stabiliser's sign is known: z+ + eps and
    # z- - eps (at z- = 0 every negative contribution is zero, so its sign does not matter)
    known = eps > 0
    z_pos = shifted(op, xp, wp, pos(b), eps if known else 0.0)
    if is_signed:
        z_pos = z_pos.add_(op.map(xn, neg(w), None))
    s_pos = div_known_sign(R, z_pos) if known else safe_div(R, z_pos, eps)
    if rule.alpha != 1.0:
        s_pos = s_pos.mul_(rule.alpha) if s_pos is z_pos else s_pos * rule.alpha
    out = times(op.adjoint(xp, wp, s_pos), xp)
    if is_signed:
        out = out.add_(times(op.adjoint(xn, neg(w), s_pos), xn))
    if rule.beta:
        wn = neg(w)
        z_neg = shifted(op, xp, wn, neg(b), -eps if known else 0.0)
        if is_signed:
            z_neg = z_neg.add_(op.map(xn, wp, None))
        s_neg = div_known_sign(R, z_neg) if known else safe_div(R, z_neg, eps)
        s_neg = s_neg.mul_(-rule.beta) if s_neg is z_neg else s_neg * -rule.beta
        out = out.add_(times(op.adjoint(xp, wn, s_neg), xp))
        if is_signed:
            out = out.add_(times(op.adjoint(xn, wp, s_neg), xn))
    return out


def _alpha_beta_stacked(rule: AlphaBeta, op: AffineOp, x: Tensor, R: Tensor) -> Tensor:
    """The rule for an input of both signs as one map of ``[x+, x-]`` (stacked along the input
    channels) with ``[W+, W-]`` for the positive part and ``[W-, W+]`` for the negative one.

    Each part is then one convolution and one transposed convolution instead of two of each
    plus a sum: the same arithmetic, but the layer's output-sized tensors - the convolution's
    result and the relevance it divides - are written and read once instead of twice.
    """
    w, b, eps = op.weight, op.bias, rule.stabilizer
    both, dim = _split_signs(op, x)
    known = eps > 0

    def part(stacked: Tensor, bias: Tensor | None, shift: float, coef: float) -> Tensor:
        z = shifted(op, both, stacked, bias, shift if known else 0.0)
        s = div_known_sign(R, z) if known else safe_div(R, z, eps)
        if coef != 1.0:
            s = s.mul_(coef) if s is z else s * coef
        return times(op.adjoint(both, stacked, s), both)

    pn = derived(w, "stacked_pn", _stack(clamp_pos, clamp_neg))
    out = part(pn, pos(b), eps, rule.alpha)
    if rule.beta:
        np_ = derived(w, "stacked_np", _stack(clamp_neg, clamp_pos))
        out = out.add_(part(np_, neg(b), -eps, -rule.beta))
    return _merge_signs(out, dim)
