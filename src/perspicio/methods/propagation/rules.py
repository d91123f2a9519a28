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

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ...errors import OptionError
from .engine import AffineOp, safe_div


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


def _pos(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.clamp(max=0)


class Rule:
    """Base of LRP rules for affine operations; subclasses implement :meth:`relevance`."""

    name = "rule"

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
        return x * op.vjp(x, op.weight, s)


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
        wp, wn = w + g * w.clamp(min=0), w + g * w.clamp(max=0)
        bp = None if b is None else b + g * b.clamp(min=0)
        bn = None if b is None else b + g * b.clamp(max=0)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        signed = bool((x < 0).any())  # after ReLUs the input is non-negative: skip the x- terms
        z_up = op(xp, wp, bp) + (op(xn, wn, None) if signed else 0)  # positive contributions boosted
        z_dn = op(xp, wn, bn) + (op(xn, wp, None) if signed else 0)  # negative contributions boosted
        s_up = safe_div(R * (z > 0), z_up, self.stabilizer)
        s_dn = safe_div(R * (z < 0), z_dn, self.stabilizer)
        out = xp * (op.vjp(xp, wp, s_up) + op.vjp(xp, wn, s_dn))
        if signed:
            out = out + xn * (op.vjp(xn, wn, s_up) + op.vjp(xn, wp, s_dn))
        return out


class AlphaBeta(Rule):
    """LRP-alpha-beta: alpha * positive share - beta * negative share (alpha - beta = 1)."""

    name = "alpha_beta"

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> None:
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
            raise OptionError(f"alpha-beta needs alpha >= 0, beta >= 0 and alpha - beta = 1; got alpha={alpha}, beta={beta}.")
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), float(stabilizer)

    def relevance(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
        w, b = op.weight, op.bias
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        signed = bool((x < 0).any())  # after ReLUs the input is non-negative: skip the x- terms
        z_pos = op(xp, wp, _pos(b)) + (op(xn, wn, None) if signed else 0)
        s_pos = safe_div(R, z_pos, self.stabilizer)
        pos = xp * op.vjp(xp, wp, s_pos)
        if signed:
            pos = pos + xn * op.vjp(xn, wn, s_pos)
        out = self.alpha * pos if self.alpha != 1.0 else pos
        if self.beta:
            z_neg = op(xp, wn, _neg(b)) + (op(xn, wp, None) if signed else 0)
            s_neg = safe_div(R, z_neg, self.stabilizer)
            neg = xp * op.vjp(xp, wn, s_neg)
            if signed:
                neg = neg + xn * op.vjp(xn, wp, s_neg)
            out = out - self.beta * neg
        return out


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
        zb = op(x, w, None) - op(low, wp, None) - op(high, wn, None)
        s = safe_div(R, zb, self.stabilizer)
        return x * op.vjp(x, w, s) - low * op.vjp(low, wp, s) - high * op.vjp(high, wn, s)


class Flat(Rule):
    """LRP-flat: relevance spread uniformly over each output's receptive field."""

    name = "flat"

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def _weights(self, w: Tensor) -> Tensor:
        return torch.ones_like(w)

    def relevance(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
        ones = ctx.ones if ctx.ones is not None else torch.ones_like(x)
        w = self._weights(op.weight)
        zf = op(ones, w, None)
        s = safe_div(R, zf, self.stabilizer)
        return ones * op.vjp(ones, w, s)


class WSquare(Flat):
    """LRP-w^2: relevance spread in proportion to the squared weights (no bias)."""

    name = "wsquare"

    def _weights(self, w: Tensor) -> Tensor:
        return w * w


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
