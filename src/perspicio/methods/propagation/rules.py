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
from . import rules_fast as fast
from .affine import AffineOp
from .nodes import safe_div
from .rules_fast import div_known_sign, shifted, times


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
        return times(op.adjoint(x, op.weight, s), x)


class LRP0(Epsilon):
    """LRP-0: relevance proportional to the contributions x_i w_ij (epsilon = 0)."""

    name = "lrp0"

    def __init__(self) -> None:
        super().__init__(0.0)


class Gamma(Rule):
    """LRP-gamma (Montavon et al. 2019): contributions that agree in sign with the output boosted.

    For an output ``z_j = sum_i x_i w_ij + b_j > 0``::

        R_i = sum_j  c+_ij / stab(sum_i' c+_i'j + b_j + gamma b_j+)  R_j
        c+_ij = x_i+ (w_ij + gamma w_ij+)  +  x_i- (w_ij + gamma w_ij-)

    and for ``z_j < 0`` the same with the opposite pairing, ``c-_ij = x_i+ (w_ij + gamma w_ij-) +
    x_i- (w_ij + gamma w_ij+)`` and ``b_j + gamma b_j-`` (outputs with ``z_j = 0`` pass nothing
    on). ``stab(d) = d + stabilizer * sign(d)``, sign(0) = +1. For non-negative inputs and positive
    outputs this is the paper's ``a_i (w_ij + gamma w_ij+)`` rule. :meth:`definition` computes it
    term by term; :meth:`relevance` computes the same numbers fast (:func:`.rules_fast.gamma`).
    """

    name = "gamma"

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        if not isinstance(gamma, (int, float)) or gamma < 0:
            raise OptionError(f"gamma must be a number >= 0; got {gamma!r}.")
        self.gamma = float(gamma)
        self.stabilizer = float(stabilizer)

    def definition(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
        """The formula above, evaluated as written (every term, plain weights)."""
        g, w, b, eps = self.gamma, op.weight, op.bias, self.stabilizer
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        w_up, w_dn = w + g * w.clamp(min=0), w + g * w.clamp(max=0)  # w + gamma w+, w + gamma w-
        b_up = None if b is None else b + g * b.clamp(min=0)
        b_dn = None if b is None else b + g * b.clamp(max=0)
        out = torch.zeros_like(x)
        # outputs z > 0: x+ with w + gamma w+, x- with w + gamma w-; outputs z < 0: the opposite
        for sign, wa, wb, bias in ((z > 0, w_up, w_dn, b_up), (z < 0, w_dn, w_up, b_dn)):
            s = safe_div(R * sign, op(xp, wa, bias) + op(xn, wb, None), eps)
            out = out + xp * op.vjp(xp, wa, s) + xn * op.vjp(xn, wb, s)
        return out

    def relevance(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
        return fast.gamma(self, op, x, z, R, ctx)


class AlphaBeta(Rule):
    """LRP-alpha-beta (Bach et al. 2015; Montavon et al. 2019), ``alpha - beta = 1``::

        R_i = sum_j ( alpha c+_ij / (sum_i' c+_i'j + b_j+ + eps)
                     - beta c-_ij / (sum_i' c-_i'j + b_j- - eps) ) R_j

    with the positive contributions ``c+_ij = x_i+ w_ij+ + x_i- w_ij-`` and the negative ones
    ``c-_ij = x_i+ w_ij- + x_i- w_ij+``; the stabiliser ``eps`` moves each denominator away from
    zero in the direction of its known sign (``stabilizer = 0``: a zero denominator gives zero
    relevance). The output ``z`` is not used. :meth:`definition` computes it term by term;
    :meth:`relevance` computes the same numbers fast (:func:`.rules_fast.alpha_beta`).
    """

    name = "alpha_beta"
    uses_output = False

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> None:
        if alpha < 0 or beta < 0 or abs(alpha - beta - 1.0) > 1e-12:
            raise OptionError(
                f"alpha-beta needs alpha >= 0, beta >= 0 and alpha - beta = 1; got alpha={alpha}, beta={beta}."
            )
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), float(stabilizer)

    def definition(
        self, op: AffineOp, x: Tensor, z: Tensor | None, R: Tensor, ctx: RuleContext
    ) -> Tensor:
        """The formula above, evaluated as written (every term, plain weights)."""
        w, b, eps = op.weight, op.bias, self.stabilizer
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        wp, wn = w.clamp(min=0), w.clamp(max=0)
        bp = None if b is None else b.clamp(min=0)
        bn = None if b is None else b.clamp(max=0)
        out = torch.zeros_like(x)
        # positive contributions (x+ w+, x- w-) weighted alpha, negative ones (x+ w-, x- w+) -beta
        for coef, wa, wb, bias, shift in (
            (self.alpha, wp, wn, bp, eps),
            (-self.beta, wn, wp, bn, -eps),
        ):
            d = op(xp, wa, bias) + op(xn, wb, None)
            s = coef * (R / (d + shift) if eps > 0 else safe_div(R, d, 0.0))
            out = out + xp * op.vjp(xp, wa, s) + xn * op.vjp(xn, wb, s)
        return out

    def relevance(self, op: AffineOp, x: Tensor, z: Tensor, R: Tensor, ctx: RuleContext) -> Tensor:
        return fast.alpha_beta(self, op, x, R, ctx)


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
                raise OptionError(
                    f"the zbox rule needs {which}=... bounds for a layer that is not the first one."
                )
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
        return (
            x * op.adjoint(x, w, s) - low * op.adjoint(low, wp, s) - high * op.adjoint(high, wn, s)
        )


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
            s = div_known_sign(R, shifted(op, ones, w, None, self.stabilizer))
        else:
            s = safe_div(R, op.map(ones, w, None), self.stabilizer)
        return times(op.adjoint(ones, w, s), ones)


class WSquare(Flat):
    """LRP-w^2: relevance spread in proportion to the squared weights (no bias)."""

    name = "wsquare"

    def _weights(self, op: AffineOp) -> Tensor:
        return op.weight * op.weight


RULES: dict[str, type[Rule]] = {
    "lrp0": LRP0,
    "zero": LRP0,
    "epsilon": Epsilon,
    "gamma": Gamma,
    "alpha_beta": AlphaBeta,
    "zplus": ZPlus,
    "z_plus": ZPlus,
    "zbox": ZBox,
    "z_box": ZBox,
    "z_beta": ZBox,
    "flat": Flat,
    "wsquare": WSquare,
    "w_square": WSquare,
}


def make_rule(
    spec: Any, *, epsilon: float = 1e-6, gamma: float = 0.25, low: Any = None, high: Any = None
) -> Rule:
    """A :class:`Rule` from a rule object or a name.

    Names: ``lrp0``, ``epsilon``, ``gamma``, ``alpha1_beta0``, ``alpha2_beta1`` (any
    ``alphaA_betaB``), ``zplus``, ``zbox``, ``flat``, ``wsquare``; the numeric
    parameters come from ``epsilon``/``gamma``/``low``/``high``.
    """
    if isinstance(spec, Rule):
        return spec
    if not isinstance(spec, str):
        raise OptionError(
            f"rule must be a rule name or a perspicio Rule object; got {type(spec).__name__}."
        )
    key = spec.strip().lower().replace("-", "_")
    if key.startswith("alpha") and "beta" in key:
        try:
            a, b = (float(v.strip("_")) for v in key[len("alpha") :].split("beta"))
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
    raise OptionError(
        f"unknown LRP rule {spec!r}; expected one of: {', '.join(names)}." + suggest(key, names)
    )
