"""LRP rules for affine operations (convolutions, linear layers, matmuls with a constant).

A rule turns the relevance ``R`` of an affine operation's output ``z = W x + b``
into relevance of its input. All rules here have the form of the LRP overview
(Montavon et al., 2019): evaluate the operation with modified inputs/weights,
divide the relevance by the (stabilised) modified output, and redistribute with
the transposed modified operation::

    R_x = sum_m  x_m * W_m^T ( R / stab(sum_m z_m) ),   z_m = W_m x_m (+ b_m)

The stabiliser adds ``eps * sign(z)`` (sign(0) = +1); with ``eps = 0`` a zero
denominator yields zero relevance instead of a division by zero.

=============  ===========================================================================
rule           definition
=============  ===========================================================================
``lrp0``       z = W x + b
``epsilon``    z = W x + b, denominator z + eps sign(z)
``gamma``      contributions agreeing in sign with z are boosted: W + gamma W+ for x+ and
               W + gamma W- for x- when z > 0 (the opposite pairing when z < 0)
``alpha_beta`` alpha * (positive contributions normalised) - beta * (negative ones)
``zplus``      alpha=1, beta=0 (positive contributions x+W+ and x-W- only)
``zbox``       z = W x - W+ low - W- high (bounded input domain; no bias)
``flat``       inputs and weights set to one (relevance spread uniformly over the receptive field)
``wsquare``    inputs set to one, weights squared (no bias)
=============  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import OptionError
from .affine import AffineOp
from .derived import clamp_neg, clamp_pos, derived, neg, pos
from .nodes import safe_div


@dataclass
class RuleContext:
    """What a rule may need besides the op: the input-domain mask and bounds.

    ``ones`` is one at input positions and zero at padding introduced by
    structural operations (``F.pad``) between the model input and this layer;
    ``low``/``high`` are the input bounds carried through the same operations
    (only set for the first layer).
    """

    ones: Tensor | None = None
    low: Tensor | None = None
    high: Tensor | None = None
    first: bool = False
    #: the input is known to be non-negative (output of a ReLU/ReLU6, ...): no sign check needed
    nonneg: bool = False


def _signed(x: Tensor, ctx: RuleContext) -> bool:
    """Does ``x`` have negative entries? (Skipped when the forward pass proved it cannot.)"""
    # a float reduction: boolean kernels (x < 0, any) are several times slower on CPU
    return not ctx.nonneg and x.numel() > 0 and bool(x.amin() < 0)


def _folds_bias(op: AffineOp) -> bool:
    """Does ``op`` apply its bias argument (conv/linear), so that a constant can be folded into it?"""
    return op.conv is not None or op.name == "linear"


def _shifted(op: AffineOp, x: Tensor, w: Tensor, b: Tensor | None, shift: float) -> Tensor:
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


def _div_known_sign(R: Tensor, z: Tensor) -> Tensor:
    """``R / z`` written into ``z`` (a fresh buffer of the same shape) when possible."""
    if z.shape == R.shape and z.dtype == R.dtype and not R.requires_grad:
        return torch.div(R, z, out=z)
    return R / z


def _times(g: Tensor, x: Tensor) -> Tensor:
    """``x * g`` reusing the fresh buffer ``g`` when the shapes agree.

    In a backward pass (grad mode off) the saved input ``x`` still has ``requires_grad``,
    but no graph is recorded, so only ``g`` itself has to be free of autograd history.
    """
    if (g.shape == x.shape and g.dtype == x.dtype and not g.requires_grad
            and not (x.requires_grad and torch.is_grad_enabled())):
        return g.mul_(x)
    return x * g


def _where_pos(R: Tensor, z: Tensor) -> Tensor:
    """``R * (z > 0)`` (R where z > 0, else 0) without a boolean mask (float kernels are faster on CPU)."""
    if R.shape == z.shape and R.dtype == z.dtype:
        return torch.ops.aten.threshold_backward(R, z, 0.0)
    return R * (z > 0)


def _where_neg(R: Tensor, z: Tensor) -> Tensor:
    """``R * (z < 0)`` (R where z < 0, else 0) without a boolean mask."""
    if R.shape == z.shape and R.dtype == z.dtype:
        return torch.ops.aten.threshold_backward(R, torch.neg(z), 0.0)
    return R * (z < 0)


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


def _stack(first: Callable[[Tensor], Tensor], second: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """A kernel for ``[x+, x-]``: ``first(W)`` for ``x+`` and ``second(W)`` for ``x-``, stacked likewise."""
    return lambda t: torch.cat([first(t), second(t)], dim=1)


class Rule:
    """Base of LRP rules for affine operations; subclasses implement :meth:`relevance`."""

    name = "rule"
    #: does :meth:`relevance` read the layer's output ``z``? Rules that do not (z+, alpha-beta,
    #: flat, z^B) let perspicio run the layer fused with its activation, whose output is never
    #: materialised (``z`` is then None)
    uses_output = True

    def relevance(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
        raise NotImplementedError  # abstract

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({params})"


class Epsilon(Rule):
    """LRP-epsilon; ``epsilon=0`` is LRP-0 (Bach et al. 2015)."""

    name = "epsilon"

    def __init__(self, epsilon: float = 1e-6) -> None:
        if not isinstance(epsilon, (int, float)) or epsilon < 0:
            raise OptionError(f"epsilon must be a number >= 0; got {epsilon!r}.")
        self.epsilon = float(epsilon)

    def relevance(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
        s = safe_div(R, z, self.epsilon)
        return _times(op.adjoint(x, op.weight, s), x)


class LRP0(Epsilon):
    """LRP-0: relevance proportional to the contributions x_i w_ij (epsilon = 0)."""

    name = "lrp0"

    def __init__(self) -> None:
        super().__init__(0.0)


class Gamma(Rule):
    """LRP-gamma: favour contributions that agree in sign with the output.

    For ``z > 0`` the positive contributions (x+ with W+, x- with W-) are scaled by
    ``1 + gamma``; for ``z < 0`` the negative ones. For non-negative inputs and
    positive outputs this is the paper's ``w + gamma w+`` rule.
    """

    name = "gamma"

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        if not isinstance(gamma, (int, float)) or gamma < 0:
            raise OptionError(f"gamma must be a number >= 0; got {gamma!r}.")
        self.gamma = float(gamma)
        self.stabilizer = float(stabilizer)

    def relevance(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
        g, w, b = self.gamma, op.weight, op.bias
        signed = _signed(x, ctx)  # after ReLUs the input is non-negative: skip the x- terms
        # relevance on outputs with z < 0: none when the layer feeds a ReLU whose next rule multiplies
        # by its input (an inactive unit passes nothing on) - then the "down" half is skipped
        R_dn = _where_neg(R, z)
        down = bool(R_dn.any())
        if not signed and z.shape == R.shape:
            return self._nonneg(op, x, z, R, R_dn if down else None)
        wu, wd = derived(w, ("gamma_up", g), _boost(g, 0.0, None)), derived(w, ("gamma_dn", g), _boost(g, None, 0.0))
        bu = None if b is None else derived(b, ("gamma_up", g), _boost(g, 0.0, None))
        bd = None if b is None else derived(b, ("gamma_dn", g), _boost(g, None, 0.0))
        if signed and _stackable(op):
            return self._stacked(op, x, z, R, R_dn if down else None, bu, bd)
        xp = x.clamp(min=0) if signed else x
        xn = x.clamp(max=0) if signed else None
        z_up = op.map(xp, wu, bu)  # positive contributions boosted
        if signed:
            z_up = z_up.add_(op.map(xn, wd, None))
        s_up = safe_div(_where_pos(R, z), z_up, self.stabilizer)
        if not down:
            out = _times(op.adjoint(xp, wu, s_up), xp)
            return out.add_(_times(op.adjoint(xn, wd, s_up), xn)) if signed else out
        z_dn = op.map(xp, wd, bd)  # negative contributions boosted
        if signed:
            z_dn = z_dn.add_(op.map(xn, wu, None))
        s_dn = safe_div(R_dn, z_dn, self.stabilizer)
        out = _times(op.adjoint(xp, wu, s_up).add_(op.adjoint(xp, wd, s_dn)), xp)
        if signed:
            out = out.add_(_times(op.adjoint(xn, wd, s_up).add_(op.adjoint(xn, wu, s_dn)), xn))
        return out

    def _stacked(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, R_dn: Tensor | None, bu: Tensor | None,
                 bd: Tensor | None) -> Tensor:
        """Inputs of both signs as one map of ``[x+, x-]`` (stacked along the input channels) with
        ``[W + gW+, W + gW-]`` for the boosted positive part and ``[W + gW-, W + gW+]`` for the
        negative one (as in :meth:`AlphaBeta._stacked`)."""
        g, w = self.gamma, op.weight
        both, dim = _split_signs(op, x)

        def part(stacked: Tensor, bias: Tensor | None, Rs: Tensor) -> Tensor:
            s = safe_div(Rs, op.map(both, stacked, bias), self.stabilizer)
            return _times(op.adjoint(both, stacked, s), both)

        boost_pos, boost_neg = _boost(g, 0.0, None), _boost(g, None, 0.0)
        out = part(derived(w, ("gamma_stacked_up", g), _stack(boost_pos, boost_neg)), bu, _where_pos(R, z))
        if R_dn is not None:
            out = out.add_(part(derived(w, ("gamma_stacked_dn", g), _stack(boost_neg, boost_pos)), bd, R_dn))
        return _merge_signs(out, dim)

    def _nonneg(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, R_dn: Tensor | None) -> Tensor:
        """The same rule for x >= 0 with one extra evaluation instead of two.

        With ``P = W+ x + b+`` and the forward output ``z = W x + b``: ``z - P = W- x + b-``, so
        ``z_up = z + gamma P`` and ``z_dn = z + gamma (z - P)``; and
        ``(W + gW+)^T s_up + (W + gW-)^T s_dn = W^T (s_up + (1 + g) s_dn) + g W+^T (s_up - s_dn)``.
        Without relevance on negative outputs (``R_dn`` None) that is ``(W + gW+)^T s_up``.
        """
        g, w, b = self.gamma, op.weight, op.bias
        wp = pos(w)
        P = op.map(x, wp, pos(b))
        z_up = torch.add(z, P, alpha=g)
        s_up = safe_div(_where_pos(R, z), z_up, self.stabilizer)
        if R_dn is None:
            return _times(op.adjoint(x, derived(w, ("gamma_up", g), _boost(g, 0.0, None)), s_up), x)
        z_dn = torch.sub(z, P).mul_(g).add_(z)
        s_dn = safe_div(R_dn, z_dn, self.stabilizer)
        a = torch.add(s_up, s_dn, alpha=1.0 + g)
        d = s_up.sub_(s_dn).mul_(g) if not s_up.requires_grad else (s_up - s_dn) * g
        return _times(op.adjoint(x, w, a).add_(op.adjoint(x, wp, d)), x)


def _boost(g: float, low: float | None, high: float | None) -> Callable[[Tensor], Tensor]:
    """``t + g * t.clamp(low, high)``: a weight with its positive (or negative) part boosted."""
    return lambda t: t + g * t.clamp(min=low, max=high)


class AlphaBeta(Rule):
    """LRP-alpha-beta: alpha * positive share - beta * negative share (alpha - beta = 1)."""

    name = "alpha_beta"
    uses_output = False

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> None:
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
            raise OptionError(f"alpha-beta needs alpha >= 0, beta >= 0 and alpha - beta = 1; got alpha={alpha}, beta={beta}.")
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), float(stabilizer)

    def relevance(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
        w, b = op.weight, op.bias
        signed = _signed(x, ctx)  # after ReLUs the input is non-negative: skip the x- terms
        if signed and _stackable(op):
            return self._stacked(op, x, R)
        wp = pos(w)
        xp = x.clamp(min=0) if signed else x
        xn = x.clamp(max=0) if signed else None
        eps = self.stabilizer
        # z+ >= 0 and z- <= 0 by construction, so the stabiliser's sign is known: z+ + eps and
        # z- - eps (at z- = 0 every negative contribution is zero, so its sign does not matter)
        known = eps > 0
        z_pos = _shifted(op, xp, wp, pos(b), eps if known else 0.0)
        if signed:
            z_pos = z_pos.add_(op.map(xn, neg(w), None))
        s_pos = _div_known_sign(R, z_pos) if known else safe_div(R, z_pos, eps)
        if self.alpha != 1.0:
            s_pos = s_pos.mul_(self.alpha) if s_pos is z_pos else s_pos * self.alpha
        out = _times(op.adjoint(xp, wp, s_pos), xp)
        if signed:
            out = out.add_(_times(op.adjoint(xn, neg(w), s_pos), xn))
        if self.beta:
            wn = neg(w)
            z_neg = _shifted(op, xp, wn, neg(b), -eps if known else 0.0)
            if signed:
                z_neg = z_neg.add_(op.map(xn, wp, None))
            s_neg = _div_known_sign(R, z_neg) if known else safe_div(R, z_neg, eps)
            s_neg = s_neg.mul_(-self.beta) if s_neg is z_neg else s_neg * -self.beta
            out = out.add_(_times(op.adjoint(xp, wn, s_neg), xp))
            if signed:
                out = out.add_(_times(op.adjoint(xn, wp, s_neg), xn))
        return out


    def _stacked(self, op: AffineOp, x: Tensor, R: Tensor) -> Tensor:
        """The rule for an input of both signs as one map of ``[x+, x-]`` (stacked along the input
        channels) with ``[W+, W-]`` for the positive part and ``[W-, W+]`` for the negative one.

        Each part is then one convolution and one transposed convolution instead of two of each
        plus a sum: the same arithmetic, but the layer's output-sized tensors - the convolution's
        result and the relevance it divides - are written and read once instead of twice (on the
        bundled model's expansion layers, whose outputs are six times their inputs, this part of
        the rule ran about a third faster).
        """
        w, b, eps = op.weight, op.bias, self.stabilizer
        both, dim = _split_signs(op, x)
        known = eps > 0

        def part(stacked: Tensor, bias: Tensor | None, shift: float, coef: float) -> Tensor:
            z = _shifted(op, both, stacked, bias, shift if known else 0.0)
            s = _div_known_sign(R, z) if known else safe_div(R, z, eps)
            if coef != 1.0:
                s = s.mul_(coef) if s is z else s * coef
            return _times(op.adjoint(both, stacked, s), both)

        out = part(derived(w, "stacked_pn", _stack(clamp_pos, clamp_neg)), pos(b), eps, self.alpha)
        if self.beta:
            out = out.add_(part(derived(w, "stacked_np", _stack(clamp_neg, clamp_pos)), neg(b), -eps, -self.beta))
        return _merge_signs(out, dim)


class ZPlus(AlphaBeta):
    """LRP-z+: only positive contributions (alpha=1, beta=0), inputs of both signs allowed."""

    name = "zplus"

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__(1.0, 0.0, stabilizer)


class ZBox(Rule):
    """LRP-z^B for a bounded input domain ``low <= x <= high`` (first layer).

    ``low``/``high``: numbers, per-channel tensors (C,) or tensors broadcastable to
    the input; None takes the bounds given to the method (default: per-channel
    min/max of the explained batch).
    """

    name = "zbox"
    uses_output = False

    def __init__(self, low: Any = None, high: Any = None, stabilizer: float = 1e-6) -> None:
        self.low, self.high, self.stabilizer = low, high, float(stabilizer)

    def _bound(self, given: Any, ctx_bound: Tensor | None, x: Tensor, which: str) -> Tensor:
        if given is None:
            if ctx_bound is None:
                raise OptionError(f"the zbox rule needs {which}=... bounds for a layer that is not the first one.")
            return ctx_bound.to(x)
        t = torch.as_tensor(given, dtype=x.dtype, device=x.device)
        if t.ndim == 1 and x.ndim >= 2 and t.shape[0] == x.shape[1]:
            t = t.view(1, -1, *([1] * (x.ndim - 2)))
        return t.expand_as(x)

    def relevance(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
        low = self._bound(self.low, ctx.low, x, "low")
        high = self._bound(self.high, ctx.high, x, "high")
        w = op.weight
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        zb = op.map(x, w, None) - op.map(low, wp, None) - op.map(high, wn, None)
        s = safe_div(R, zb, self.stabilizer)
        return x * op.adjoint(x, w, s) - low * op.adjoint(low, wp, s) - high * op.adjoint(high, wn, s)


class Flat(Rule):
    """LRP-flat: relevance spread uniformly over each output's receptive field."""

    name = "flat"
    uses_output = False

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def _weights(self, op: AffineOp) -> Tensor:
        taps = op.taps  # a kernel extended by zero taps (folded padding): only the real taps
        return torch.ones_like(op.weight) if taps is None else taps

    def relevance(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
        ones = ctx.ones if ctx.ones is not None else torch.ones_like(x)
        w = self._weights(op)
        if self.stabilizer > 0 and bool((w >= 0).all()):  # ones and non-negative weights: zf >= 0
            s = _div_known_sign(R, _shifted(op, ones, w, None, self.stabilizer))
        else:
            s = safe_div(R, op.map(ones, w, None), self.stabilizer)
        return _times(op.adjoint(ones, w, s), ones)


class WSquare(Flat):
    """LRP-w^2: relevance spread in proportion to the squared weights (no bias)."""

    name = "wsquare"

    def _weights(self, op: AffineOp) -> Tensor:
        return op.weight * op.weight


RULES: dict[str, type[Rule]] = {
    "lrp0": LRP0, "zero": LRP0, "epsilon": Epsilon, "gamma": Gamma, "alpha_beta": AlphaBeta, "zplus": ZPlus,
    "z_plus": ZPlus, "zbox": ZBox, "z_box": ZBox, "z_beta": ZBox, "flat": Flat, "wsquare": WSquare,
    "w_square": WSquare,
}


def make_rule(spec: Any, *, epsilon: float = 1e-6, gamma: float = 0.25, low: Any = None, high: Any = None) -> Rule:
    """A :class:`Rule` from a rule object or a name.

    Names: ``lrp0``, ``epsilon``, ``gamma``, ``alpha1_beta0``, ``alpha2_beta1`` (any
    ``alphaA_betaB``), ``zplus``, ``zbox``, ``flat``, ``wsquare``; the numeric
    parameters come from ``epsilon``/``gamma``/``low``/``high``.
    """
    if isinstance(spec, Rule):
        return spec
    if not isinstance(spec, str):
        raise OptionError(f"rule must be a rule name or a perspicio Rule object; got {type(spec).__name__}.")
    key = spec.strip().lower().replace("-", "_")
    if key.startswith("alpha") and "beta" in key:
        try:
            a, b = (float(v.strip("_")) for v in key[len("alpha"):].split("beta"))
        except ValueError:
            a = b = None
        if a is not None:
            return AlphaBeta(a, b)
    if key == "epsilon":
        return Epsilon(epsilon)
    if key == "gamma":
        return Gamma(gamma)
    if key in ("zbox", "z_box", "z_beta"):
        return ZBox(low, high)
    if key in RULES:
        return RULES[key]()
    from ...errors import suggest

    names = sorted({*RULES, "alpha1_beta0", "alpha2_beta1"})
    raise OptionError(f"unknown LRP rule {spec!r}; expected one of: {', '.join(names)}." + suggest(key, names))
