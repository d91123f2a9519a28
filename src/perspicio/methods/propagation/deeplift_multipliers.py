"""DeepLIFT multipliers: what each nonlinear operation multiplies by instead of its derivative.

Rescale ``(y - y0) / (x - x0)`` for element-wise functions (and its fast form for clamps),
the exact Shapley splits of products and divisions, softmax and layer/group/RMS norms
composed from those, and the max-pooling split; each as an autograd node (``forward``
runs the operation, ``backward`` multiplies by the multiplier) that
:mod:`.deeplift_propagators` wraps around the input pass's operations.

Rules, each chosen so that contributions sum exactly to the output difference
(summation-to-delta):

* element-wise nonlinearities (ReLU, ReLU6, GELU, SiLU, sigmoid, tanh, exp, ...):
  Rescale ``m = (f(x) - f(x0)) / (x - x0)`` (the derivative where x = x0), or
  RevealCancel (positive and negative parts of ``x - x0`` handled separately);
* products ``a * b``, ``a @ b``, einsum of two input-dependent operands: the
  two-player Shapley split ``d(ab) = da (b + b0)/2 + (a + a0)/2 db`` (exact for any
  bilinear map);
* division ``a / b``: ``da (1/b + 1/b0)/2 - db (a + a0) / (2 b b0)`` (exact);
* softmax: ``exp(x - logsumexp(x))`` - the exps and the log (Rescale), the sum and the
  subtraction (linear), composed (bounded multipliers; :class:`SoftmaxNode`);
* LayerNorm / GroupNorm / RMSNorm: centring (linear), the squares (``c^2 - c0^2 = (c +
  c0)(c - c0)``), the square root (Rescale) and the division (above), composed;
* ``F.normalize`` (``y = x / max(||x||_p, eps)``): the powers ``|x|^p`` (``x + x0`` for p = 2,
  Rescale otherwise), their sum (linear), ``q -> 1 / max(q^(1/p), eps)`` (Rescale) and the
  product with x split in the order that keeps its terms bounded (:class:`LpNormalizeNode`);
* max pooling: the output difference lies between ``dx`` at the input's argmax and
  at the reference's argmax; it is split between the two as the convex
  combination that reproduces it exactly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...core import ops
from ...errors import ModelError
from .deeplift_denormals import add_where_equal
from .nodes import sum_to
from .operations import Call, op_name, substitute


def tiny_step(x: Tensor) -> Tensor:
    return 1e-7 * (1.0 + x.abs())


def derivative(fn: Any, x: Tensor) -> Tensor:
    """Element-wise derivative of an element-wise ``fn`` at ``x``."""
    with torch.enable_grad():
        xi = x.detach().requires_grad_(True)
        y = fn(xi)
        return torch.autograd.grad(y, xi, torch.ones_like(y))[0]


def clamp_bounds(call: Call) -> tuple[float | None, float | None] | None:
    """(low, high) of a ReLU / ReLU6 / hardtanh / scalar clamp call (the clamps of
    :mod:`perspicio.core.ops`; None for other operations and for bounds that are not numbers).

    Their derivative is 1 strictly inside the bounds and 0 elsewhere (autograd's
    convention at the kinks), so it is computed without an autograd call.
    """
    bounds = ops.clamp_bounds(call.func, call.args, call.kwargs)
    if bounds is None or not all(
        v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in bounds
    ):
        return None
    lo, hi = bounds
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def clamp_derivative(bounds: tuple[float | None, float | None], x: Tensor) -> Tensor:
    """Derivative of a clamp to ``bounds`` at ``x``: 1 strictly inside, 0 elsewhere."""
    lo, hi = bounds
    inside = x > lo if lo is not None else None
    if hi is not None:
        inside = x < hi if inside is None else inside.logical_and_(x < hi)
    return torch.ones_like(x) if inside is None else inside.to(x.dtype)


def clamp_rescale_backward(
    bounds: tuple[float | None, float | None],
    x: Tensor,
    x0: Tensor,
    y: Tensor,
    y0: Tensor,
    m: Tensor,
) -> Tensor:
    """``m * (y - y0) / (x - x0)`` for a clamp ``y = clamp(x, lo, hi)``, ``m * clamp'(x)`` where x == x0.

    The same values as ``m * rescale_multiplier(...)`` with float arithmetic only: on CPU,
    kernels that read or write boolean masks (``isnan``, comparisons, ``where``) cost 2-8x
    a float kernel of the same size, and these passes over every feature map dominate
    DeepLIFT's cost on a CNN. The 0/0 entries (x == x0: up to ~20% of a feature map) are
    zeroed in the quotient (``nan_to_num_``, in place), and the gradient ``hardtanh_backward``
    (1 strictly inside the bounds, 0 elsewhere) is added only there: a second
    ``hardtanh_backward`` keeps it where ``-d < x - x0 < d`` for the smallest subnormal ``d``,
    i.e. exactly where x == x0; each entry is either exactly the quotient or exactly the
    gradient (the other term is an exact 0). Eight passes over the feature map.
    """
    lo, hi = bounds
    lo_ = -float("inf") if lo is None else lo
    hi_ = float("inf") if hi is None else hi
    dx = x - x0
    r = torch.sub(y, y0).div_(dx)  # NaN where x == x0
    r = r.mul_(m) if not m.requires_grad and r.shape == m.shape else r * m
    r = r.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=-float("inf"))  # 0 where x == x0
    grad = torch.ops.aten.hardtanh_backward(m, x, lo_, hi_)
    return add_where_equal(r, grad, dx)  # the gradient where x == x0


def rescale_multiplier(
    fn: Any,
    x: Tensor,
    x0: Tensor,
    y: Tensor,
    y0: Tensor,
    bounds: tuple[float | None, float | None] | None = None,
) -> Tensor:
    """``(y - y0) / (x - x0)``, the derivative at x where x equals x0.

    A tiny non-zero ``x - x0`` is kept: the multiplier stays bounded for Lipschitz
    functions and ``m (x - x0)`` reproduces ``y - y0`` exactly, which is what
    summation-to-delta needs.
    """
    m = torch.sub(y, y0).div_(x - x0)
    bad = torch.isnan(m)  # 0/0 where x == x0
    if bad.any():
        # element-wise selects, no boolean indexing: x == x0 at up to ~20% of the entries here, and
        # nonzero()/index_put over a feature map cost more than the whole multiplier
        d = clamp_derivative(bounds, x) if bounds is not None else derivative(fn, x)
        m = torch.where(bad, d, m)
    return m


def reveal_cancel_multipliers(
    fn: Any, call: Call, x: Tensor, x0: Tensor, y0: Tensor, Pd: Tensor, Nd: Tensor
) -> tuple[Tensor, Tensor]:
    """RevealCancel multipliers ``(mP, mN)`` of the positive and negative parts ``Pd``, ``Nd`` of
    ``x - x0`` through the element-wise ``fn`` of ``call`` (Shrikumar et al. 2017, eq. 4-5); the
    derivative at x where a part vanishes."""
    # evaluate at the input the shadows imply (x0 + P + N, equal to x up to rounding), so that a
    # vanishing part gets a vanishing share instead of the rounding difference between the two
    fP, fN, fPN = fn(x0 + Pd), fn(x0 + Nd), fn(x0 + Pd + Nd)
    yP = 0.5 * ((fP - y0) + (fPN - fN))
    yN = (fPN - y0) - yP
    dP, dN = Pd.abs() <= tiny_step(x), Nd.abs() <= tiny_step(x)
    mP = yP / torch.where(dP, torch.ones_like(Pd), Pd)
    mN = yN / torch.where(dN, torch.ones_like(Nd), Nd)
    if dP.any() or dN.any():
        bounds = clamp_bounds(call)
        d = clamp_derivative(bounds, x) if bounds is not None else derivative(fn, x)
        mP, mN = torch.where(dP, d, mP), torch.where(dN, d, mN)
    return mP, mN


def norm_spec(call: Call, x: Tensor) -> dict[str, Any]:
    """Grouping, affine weight and eps of a layer/group/RMS norm call."""
    name = op_name(call.func).rsplit(".", 1)[-1]
    a = dict(zip(("input", "p1", "p2", "p3", "p4"), call.args))
    kw = call.kwargs
    if name in ("layer_norm", "rms_norm"):
        shape = a.get("p1", kw.get("normalized_shape"))
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        w = a.get("p2", kw.get("weight"))
        if name == "layer_norm":
            eps = a.get("p4", kw.get("eps", 1e-5))
        else:
            eps = a.get("p3", kw.get("eps"))
            eps = torch.finfo(x.dtype).eps if eps is None else eps
        m = 1
        for s in shape:
            m *= int(s)

        def view(t: Tensor) -> Tensor:
            return t.reshape(-1, 1, m)

        wfull = None if w is None else w.reshape(1, 1, m)
        return {
            "view": view,
            "w": lambda t: wfull,
            "eps": float(eps),
            "center": name == "layer_norm",
        }
    if name == "group_norm":
        groups = int(a.get("p1", kw.get("num_groups")))
        w = a.get("p2", kw.get("weight"))
        eps = a.get("p4", kw.get("eps", 1e-5))
        n = x.shape[0]

        def gview(t: Tensor) -> Tensor:
            return t.reshape(n, groups, -1)

        def wview(t: Tensor) -> Tensor | None:
            if w is None:
                return None
            return w.view(1, -1, *([1] * (x.ndim - 2))).expand_as(t).reshape(n, groups, -1)

        return {"view": gview, "w": wview, "eps": float(eps), "center": True}
    raise ModelError(f"deeplift has no rule for {call.name}.")


# ============================================================================ nodes (Rescale)


class RescaleNode:
    def __init__(self, fn: Any, call: Call, x0: Tensor, y0: Tensor) -> None:
        self.fn, self.call, self.x0, self.y0 = fn, call, x0, y0
        self.bounds = clamp_bounds(call)

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], y: Tensor, m: Tensor) -> tuple[Tensor]:
        x = ins[0]
        if (
            self.bounds is not None
            and m.shape == x.shape == y.shape == self.y0.shape == self.x0.shape
        ):
            return (clamp_rescale_backward(self.bounds, x, self.x0, y, self.y0, m),)
        r = rescale_multiplier(self.fn, x, self.x0, y, self.y0, self.bounds)
        if r.shape == x.shape and m.shape == x.shape and not m.requires_grad:
            return (r.mul_(m),)
        return (sum_to(m * r, x.shape),)


class BilinearNode:
    def __init__(self, call: Call, ids: tuple[int, int], a0: Tensor, b0: Tensor) -> None:
        self.call, self.ids, self.a0, self.b0 = call, ids, a0, b0

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], y: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
        a, b = ins
        abar, bbar = 0.5 * (a + self.a0), 0.5 * (b + self.b0)
        ia, ib = self.ids
        with torch.enable_grad():
            ai, bi = a.detach().requires_grad_(True), b.detach().requires_grad_(True)
            za = self.call.func(
                *substitute(self.call.args, {ia: ai, ib: bbar}),
                **substitute(self.call.kwargs, {ia: ai, ib: bbar}),
            )
            zb = self.call.func(
                *substitute(self.call.args, {ia: abar, ib: bi}),
                **substitute(self.call.kwargs, {ia: abar, ib: bi}),
            )
            ga, gb = torch.autograd.grad((za, zb), (ai, bi), (m, m))
        return ga, gb


class DivideNode:
    """``a / b`` with b input-dependent (a input-dependent or constant)."""

    def __init__(self, call: Call, a: Any, a0: Any, a_var: bool, b0: Tensor) -> None:
        self.call, self.a, self.a0, self.a_var, self.b0 = call, a, a0, a_var, b0

    def forward(self, *xs: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], y: Tensor, m: Tensor) -> tuple[Tensor, ...]:
        if self.a_var:
            a, b = ins
        else:
            a, b = self.a, ins[0]
        a0, b0 = (self.a0 if self.a_var else a), self.b0
        mb = sum_to(m * (-0.5) * (a + a0) / (b * b0), b.shape)
        if not self.a_var:
            return (mb,)
        ma = sum_to(m * 0.5 * (1.0 / b + 1.0 / b0), a.shape)
        return ma, mb


class SoftmaxNode:
    """softmax as ``exp(x - logsumexp(x))``, composed from exact rules: Rescale on the outer exp, the
    subtraction (linear), Rescale on the log and on the exps of ``logsumexp`` (after a common shift),
    the sum (linear). Every multiplier is bounded (secant slopes of exp below the maximum, of log
    between the two sums), so the contributions stay of the size of the output change even when
    the input's and the reference's logits are far apart; the split of a division ``e / sum(e)``
    (the same total) has terms of size ``e / sum(e0)`` there, which cancel only in exact arithmetic."""

    def __init__(self, call: Call, dim: int, x0: Tensor) -> None:
        self.call, self.dim, self.x0 = call, dim, x0

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], y: Tensor, m: Tensor) -> tuple[Tensor]:
        x, x0, d = ins[0], self.x0, self.dim
        finite = torch.isfinite(x) & torch.isfinite(x0)
        zero = torch.zeros_like(x)
        xs, x0s = torch.where(finite, x, zero), torch.where(finite, x0, zero)
        shift = torch.maximum(x.amax(d, keepdim=True), x0.amax(d, keepdim=True))
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        e = torch.where(finite, torch.exp(xs - shift), zero)
        e0 = torch.where(finite, torch.exp(x0s - shift), zero)
        S, S0 = e.sum(d, keepdim=True), e0.sum(d, keepdim=True)
        lse, lse0 = S.log(), S0.log()  # logsumexp - shift
        u, u0 = xs - shift - lse, x0s - shift - lse0  # log softmax
        s, s0 = torch.exp(u), torch.exp(u0)
        # outer exp: s - s0 = r (u - u0)
        du = u - u0
        small = du.abs() <= tiny_step(u)
        r = torch.where(small, s, (s - s0) / torch.where(small, torch.ones_like(du), du))
        mu = torch.where(finite, m * r, zero)
        # u = x - lse: lse - lse0 = rho (S - S0) (log), S - S0 = sum_i eps_i (x_i - x0_i) (exps)
        dS = S - S0
        small = dS.abs() <= tiny_step(S)
        rho = torch.where(
            small, 1.0 / S, (lse - lse0) / torch.where(small, torch.ones_like(dS), dS)
        )
        rho = torch.where(
            S > 0, rho, torch.zeros_like(rho)
        )  # a row masked entirely: nothing to split
        dx = xs - x0s
        small = dx.abs() <= tiny_step(xs)
        eps = torch.where(small, e, (e - e0) / torch.where(small, torch.ones_like(dx), dx))
        return (mu - (mu.sum(d, keepdim=True) * rho) * eps,)


class NormalizeNode:
    """Layer/group/RMS norm, composed from exact DeepLIFT rules (see module docstring)."""

    def __init__(self, call: Call, spec: dict[str, Any], x0: Tensor) -> None:
        self.call, self.spec, self.x0 = call, spec, x0

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], y: Tensor, m: Tensor) -> tuple[Tensor]:
        sp = self.spec
        x = ins[0]
        X, X0, M = sp["view"](x), sp["view"](self.x0), sp["view"](m)
        if sp["center"]:
            c, c0 = X - X.mean(-1, keepdim=True), X0 - X0.mean(-1, keepdim=True)
        else:
            c, c0 = X, X0
        q, q0 = (
            (c * c).mean(-1, keepdim=True) + sp["eps"],
            (c0 * c0).mean(-1, keepdim=True) + sp["eps"],
        )
        sig, sig0 = q.sqrt(), q0.sqrt()
        w = sp["w"](x)
        mu = M * w if w is not None else M
        mc = mu * 0.5 * (1.0 / sig + 1.0 / sig0)
        msig = (mu * (-0.5) * (c + c0)).sum(-1, keepdim=True) / (sig * sig0)
        dq = q - q0
        small = dq.abs() <= tiny_step(q)
        rs = torch.where(
            small, 0.5 / sig, (sig - sig0) / torch.where(small, torch.ones_like(dq), dq)
        )
        mc = mc + (msig * rs) * (c + c0) / c.shape[-1]
        if sp["center"]:
            mc = mc - mc.mean(-1, keepdim=True)
        return (mc.reshape(x.shape),)


class LpNormalizeNode:
    """``F.normalize``: ``y = x h`` with ``h = 1 / max(q^(1/p), eps)``, ``q = sum |x|^p`` along ``dim``,
    composed from exact rules so that contributions sum to ``y - y0``.

    The product ``x h`` is split in the order that keeps every term bounded: with the smaller
    ``h`` (the longer of the two vectors) on ``dx`` - ``dy = dx h + x0 dh`` when ``|x| >= |x0|``,
    ``dy = dx h0 + x dh`` otherwise - so ``|x0 dh| <= |x0| h0 = |y0|`` (or ``|y|``). The symmetric
    two-player split ``dx (h + h0)/2 + (x + x0)/2 dh`` is as exact but has terms of size
    ``x / eps`` against a zero reference (``h0 = 1 / eps``), which cancel only in exact arithmetic.
    ``dh`` is Rescale of ``q -> h`` times the linear sum of the powers ``|x|^p`` (``x + x0`` for
    p = 2, Rescale otherwise)."""

    def __init__(self, call: Call, p: float, dim: int, eps: float, x0: Tensor) -> None:
        self.call, self.p, self.dim, self.eps, self.x0 = call, p, dim, eps, x0

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], y: Tensor, m: Tensor) -> tuple[Tensor]:
        p, d = self.p, self.dim
        X, X0, M = ins[0].movedim(d, -1), self.x0.movedim(d, -1), m.movedim(d, -1)
        if p == 2.0:
            dpow = X + X0  # x^2 - x0^2 = (x + x0)(x - x0)
            q, q0 = (X * X).sum(-1, keepdim=True), (X0 * X0).sum(-1, keepdim=True)
        else:
            powered = X.abs().pow(p), X0.abs().pow(p)
            dpow = rescale_multiplier(lambda t: t.abs().pow(p), X, X0, *powered)
            q, q0 = powered[0].sum(-1, keepdim=True), powered[1].sum(-1, keepdim=True)
        n, n0 = X.norm(p, dim=-1, keepdim=True), X0.norm(p, dim=-1, keepdim=True)
        h, h0 = 1.0 / n.clamp_min(self.eps), 1.0 / n0.clamp_min(self.eps)
        longer = h <= h0
        mx = M * torch.where(longer, h, h0)
        mh = (M * torch.where(longer, X0, X)).sum(-1, keepdim=True)
        # h as one element-wise function of q: Rescale (its derivative where q == q0)
        dq = q - q0
        small = dq.abs() <= tiny_step(q)
        slope = torch.where(n > self.eps, -h / (p * q), torch.zeros_like(n))
        rq = torch.where(small, slope, (h - h0) / torch.where(small, torch.ones_like(dq), dq))
        return ((mx + (mh * rq) * dpow).movedim(-1, d),)


def pool_with_indices(call: Call, t: Tensor) -> tuple[Tensor, Tensor]:
    kwargs = {k: v for k, v in call.kwargs.items() if k != "return_indices"}
    args = substitute(call.args, {id(call.args[0]): t})
    return call.func(*args, **kwargs, return_indices=True)


def maxpool_split(
    x: Tensor, x0: Tensor, y: Tensor, y0: Tensor, idx: Tensor, idx0: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Flattened indices of both argmaxes and the weight t of the input's argmax.

    ``y - y0 = t (x - x0)[argmax x] + (1 - t) (x - x0)[argmax x0]`` with t in [0, 1].
    """
    n, c = x.shape[:2]
    xf, x0f = x.reshape(n, c, -1), x0.reshape(n, c, -1)
    i, j = idx.reshape(n, c, -1), idx0.reshape(n, c, -1)
    di = y.reshape(n, c, -1) - x0f.gather(2, i)
    dj = xf.gather(2, j) - y0.reshape(n, c, -1)
    dy = (y - y0).reshape(n, c, -1)
    gap = di - dj
    ok = gap.abs() > tiny_step(y.reshape(n, c, -1))
    t = torch.where(
        ok, (dy - dj) / torch.where(ok, gap, torch.ones_like(gap)), torch.full_like(gap, 0.5)
    )
    return i, j, t.clamp(0.0, 1.0)


class MaxPoolNode:
    def __init__(self, call: Call, x0: Tensor, y0: Tensor, idx0: Tensor) -> None:
        self.call, self.x0, self.y0, self.idx0 = call, x0, y0, idx0

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], y: Tensor, m: Tensor) -> tuple[Tensor]:
        x = ins[0]
        _, idx = pool_with_indices(self.call, x)
        i, j, t = maxpool_split(x, self.x0, y, self.y0, idx, self.idx0)
        n, c = x.shape[:2]
        mf = m.reshape(n, c, -1)
        out = torch.zeros(n, c, x[0, 0].numel(), dtype=m.dtype, device=m.device)
        out.scatter_add_(2, i, t * mf)
        out.scatter_add_(2, j, (1 - t) * mf)
        return (out.reshape(x.shape),)
