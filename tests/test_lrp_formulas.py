"""LRP-gamma and LRP-alpha-beta: the fast paths equal the formulas.

The rules' fast evaluation (``rules_fast.py``: stacked signs, the one-pass gamma on non-negative
inputs, skipped halves, known-sign stabilisers, packed kernels) is checked against a direct
implementation of each formula written here from the papers - every contribution ``x_i w_ij`` of
a small random linear or convolution layer as an explicit array (convolutions through
``unfold``), summed as the formula says - and against each rule's own ``definition``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from perspicio.methods.propagation.affine import affine_op
from perspicio.methods.propagation.canonizers import _own_tensor
from perspicio.methods.propagation.operations import AFFINE, Call
from perspicio.methods.propagation.rules import AlphaBeta, Gamma, RuleContext, ZPlus


def _stab(d: torch.Tensor, eps: float) -> torch.Tensor:
    """d + eps sign(d), sign(0) = +1 (the gamma rule's stabiliser)."""
    return d + eps * torch.where(d >= 0, 1.0, -1.0).to(d)


def _div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den, zero where den == 0 (stabiliser 0)."""
    return torch.where(den != 0, num / torch.where(den != 0, den, 1.0), 0.0)


def _contributions(
    layer: dict, x: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs as patches (N, P, L) and the dense weight (O, P): z_ol = sum_p W_op X_pl (+ b_o)."""
    if layer["kind"] == "linear":
        return x[:, :, None].double(), w.double()
    groups, k = layer["groups"], w.shape[-1]
    cout, cin = w.shape[0], w.shape[1] * groups
    dense = torch.zeros(cout, cin, k, k, dtype=torch.float64)
    per_in, per_out = cin // groups, cout // groups
    for gi in range(groups):  # block-diagonal: a grouped convolution as an ungrouped one
        dense[gi * per_out : (gi + 1) * per_out, gi * per_in : (gi + 1) * per_in] = w[
            gi * per_out : (gi + 1) * per_out
        ]
    patches = F.unfold(x.double(), k, padding=layer["padding"], stride=layer["stride"])
    return patches, dense.reshape(cout, -1)


def _back(layer: dict, x: torch.Tensor, rel: torch.Tensor) -> torch.Tensor:
    """Relevance of the patches (N, P, L) summed back onto the input."""
    if layer["kind"] == "linear":
        return rel[:, :, 0]
    k = layer["k"]
    return F.fold(rel, x.shape[-2:], k, padding=layer["padding"], stride=layer["stride"])


def gamma_formula(layer: dict, x, w, b, R, g: float, eps: float) -> torch.Tensor:
    """R_i = sum_j c_ij / stab(sum_i' c_i'j + b'_j) R_j; for z_j > 0: c_ij = x_i+ (w_ij + g w_ij+) +
    x_i- (w_ij + g w_ij-), b'_j = b_j + g b_j+; for z_j < 0 the opposite pairing and b_j + g b_j-."""
    X, W = _contributions(layer, x, w)
    Rl = R.double().reshape(R.shape[0], R.shape[1], -1)  # (N, O, L)
    bd = torch.zeros(W.shape[0], dtype=torch.float64) if b is None else b.double()
    xp, xn = X.clamp(min=0)[:, None], X.clamp(max=0)[:, None]  # (N, 1, P, L)
    Wu = (W + g * W.clamp(min=0))[None, :, :, None]
    Wd = (W + g * W.clamp(max=0))[None, :, :, None]
    z = (X[:, None] * W[None, :, :, None]).sum(2) + bd[None, :, None]
    total = 0.0
    for mask, c, bias in (
        (z > 0, xp * Wu + xn * Wd, bd + g * bd.clamp(min=0)),
        (z < 0, xp * Wd + xn * Wu, bd + g * bd.clamp(max=0)),
    ):
        den = c.sum(2) + bias[None, :, None]
        s = Rl * mask / _stab(den, eps) if eps > 0 else _div(Rl * mask, den)
        total = total + (c * s[:, :, None]).sum(1)
    return _back(layer, x, total)


def alpha_beta_formula(
    layer: dict, x, w, b, R, alpha: float, beta: float, eps: float
) -> torch.Tensor:
    """R_i = sum_j (alpha c+_ij / (sum c+ + b_j+ + eps) - beta c-_ij / (sum c- + b_j- - eps)) R_j with
    c+_ij = x_i+ w_ij+ + x_i- w_ij- and c-_ij = x_i+ w_ij- + x_i- w_ij+ (Bach et al. 2015)."""
    X, W = _contributions(layer, x, w)
    Rl = R.double().reshape(R.shape[0], R.shape[1], -1)
    bd = torch.zeros(W.shape[0], dtype=torch.float64) if b is None else b.double()
    xp, xn = X.clamp(min=0)[:, None], X.clamp(max=0)[:, None]
    Wp, Wn = W.clamp(min=0)[None, :, :, None], W.clamp(max=0)[None, :, :, None]
    total = 0.0
    for coef, c, bias, shift in (
        (alpha, xp * Wp + xn * Wn, bd.clamp(min=0), eps),
        (-beta, xp * Wn + xn * Wp, bd.clamp(max=0), -eps),
    ):
        if coef == 0:
            continue
        den = c.sum(2) + bias[None, :, None]
        s = coef * (Rl / (den + shift) if eps > 0 else _div(Rl, den))
        total = total + (c * s[:, :, None]).sum(1)
    return _back(layer, x, total)


LAYERS = [
    {"kind": "linear"},
    {"kind": "conv", "groups": 1, "k": 3, "stride": 1, "padding": 1},
    {"kind": "conv", "groups": 1, "k": 3, "stride": 2, "padding": 0},
    {"kind": "conv", "groups": 2, "k": 3, "stride": 1, "padding": 1},
]


def _case(layer: dict, seed: int, bias: bool, signed: bool, own: bool):
    g = torch.Generator().manual_seed(seed)
    if layer["kind"] == "linear":
        w, x = torch.randn(5, 6, generator=g), torch.randn(3, 6, generator=g)
        args = (x, w, torch.randn(5, generator=g) if bias else None)
        func, name = F.linear, "torch.nn.functional.linear"
    else:
        w = torch.randn(6, 4 // layer["groups"], layer["k"], layer["k"], generator=g)
        x = torch.randn(2, 4, 7, 7, generator=g)
        args = (
            x,
            w,
            torch.randn(6, generator=g) if bias else None,
            layer["stride"],
            layer["padding"],
            1,
            layer["groups"],
        )
        func, name = F.conv2d, "torch.nn.functional.conv2d"
    if not signed:
        x = x.abs()
        args = (x, *args[1:])
    if own:  # perspicio's own weights: modified kernels memoised and run packed where possible
        _own_tensor(w)
        if args[2] is not None:
            _own_tensor(args[2])
    op = affine_op(Call(func, args, {}, name, AFFINE), lambda t: t is x)
    z = func(*args)
    R = torch.randn(z.shape, generator=g)
    return op, x, w, args[2], z, R


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=2e-6 * scale)


@pytest.mark.parametrize(
    "layer",
    LAYERS,
    ids=lambda c: (
        "linear" if c["kind"] == "linear" else f"conv_g{c['groups']}_s{c['stride']}_p{c['padding']}"
    ),
)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "nonneg"])
@pytest.mark.parametrize("own", [False, True], ids=["plain", "own"])
def test_gamma_fast_path_equals_the_formula(layer: dict, signed: bool, own: bool) -> None:
    for seed, bias, relu_after, eps, gamma in [
        (0, True, False, 1e-6, 0.25),
        (1, False, True, 1e-6, 0.5),
        (2, True, True, 0.0, 1.0),
        (3, True, False, 0.1, 0.0),
    ]:
        op, x, w, b, z, R = _case(layer, seed, bias, signed, own)
        if relu_after:  # a layer feeding a ReLU: no relevance on outputs z < 0 (the skipped half)
            R = R * (z > 0)
        expected = gamma_formula(layer, x, w, b, R, gamma, eps)
        rule = Gamma(gamma, eps)
        for ctx in [RuleContext(), RuleContext(nonneg=not signed)]:
            with torch.no_grad():
                _close(rule.relevance(op, x, z, R, ctx), expected)
        _close(rule.definition(op, x, z, R, RuleContext()), expected)


@pytest.mark.parametrize(
    "layer",
    LAYERS,
    ids=lambda c: (
        "linear" if c["kind"] == "linear" else f"conv_g{c['groups']}_s{c['stride']}_p{c['padding']}"
    ),
)
@pytest.mark.parametrize("signed", [True, False], ids=["signed", "nonneg"])
@pytest.mark.parametrize("own", [False, True], ids=["plain", "own"])
def test_alpha_beta_fast_path_equals_the_formula(layer: dict, signed: bool, own: bool) -> None:
    for seed, bias, alpha, beta, eps in [
        (0, True, 2.0, 1.0, 1e-6),
        (1, False, 1.0, 0.0, 1e-6),
        (2, True, 1.5, 0.5, 0.0),
        (3, True, 3.0, 2.0, 0.05),
    ]:
        op, x, w, b, z, R = _case(layer, seed, bias, signed, own)
        expected = alpha_beta_formula(layer, x, w, b, R, alpha, beta, eps)
        rule = AlphaBeta(alpha, beta, eps)
        for ctx in [RuleContext(), RuleContext(nonneg=not signed)]:
            with torch.no_grad():
                _close(rule.relevance(op, x, None, R, ctx), expected)  # the output is not read
        _close(rule.definition(op, x, None, R, RuleContext()), expected)
    op, x, w, b, z, R = _case(layer, 4, True, signed, own)
    with torch.no_grad():  # z+ is alpha-beta with alpha = 1, beta = 0
        _close(
            ZPlus().relevance(op, x, None, R, RuleContext()),
            alpha_beta_formula(layer, x, w, b, R, 1.0, 0.0, 1e-6),
        )


def test_the_formulas_by_hand() -> None:
    """The direct implementations above on a 2-input, 1-output layer computed by hand, so that the
    oracle itself is checked: x = (1, -2), w = (2, 1), b = 0.5 -> z = 0.5, R = 1."""
    layer = {"kind": "linear"}
    x, w, b, R = (
        torch.tensor([[1.0, -2.0]]),
        torch.tensor([[2.0, 1.0]]),
        torch.tensor([0.5]),
        torch.ones(1, 1),
    )
    # gamma = 1, z > 0: c = (1 * (2 + 2), -2 * (1 + 0)) = (4, -2), denominator 4 - 2 + 0.5 + 0.5 = 3
    torch.testing.assert_close(
        gamma_formula(layer, x, w, b, R, 1.0, 0.0), torch.tensor([[4 / 3, -2 / 3]]).double()
    )
    # alpha 2, beta 1: c+ = (2, 0), sum + b+ = 2.5; c- = (0, -2), sum + b- = -2 -> (2 * 2/2.5, -(-2/-2))
    torch.testing.assert_close(
        alpha_beta_formula(layer, x, w, b, R, 2.0, 1.0, 0.0), torch.tensor([[1.6, -1.0]]).double()
    )
