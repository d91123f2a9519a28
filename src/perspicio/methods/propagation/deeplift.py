"""DeepLIFT (Rescale, RevealCancel) and DeepSHAP at the operation level.

DeepLIFT explains ``f(x) - f(x0)`` for a reference ``x0``. Two forward passes
are paired operation by operation: the reference pass records the inputs and
outputs of every nonlinear operation, the input pass wraps each nonlinear
operation in an autograd node whose backward multiplies by the DeepLIFT
multiplier instead of the derivative. Linear operations (conv, linear, sums,
pooling averages, BatchNorm in eval mode, reshapes) keep their gradient, which
*is* the linear rule. Attributions are ``(x - x0) * multiplier``.

Rules, each chosen so that contributions sum exactly to the output difference
(summation-to-delta):

* element-wise nonlinearities (ReLU, ReLU6, GELU, SiLU, sigmoid, tanh, exp, ...):
  Rescale ``m = (f(x) - f(x0)) / (x - x0)`` (the derivative where x = x0), or
  RevealCancel (positive and negative parts of ``x - x0`` handled separately);
* products ``a * b``, ``a @ b``, einsum of two input-dependent operands: the
  two-player Shapley split ``d(ab) = da (b + b0)/2 + (a + a0)/2 db`` (exact for any
  bilinear map);
* division ``a / b``: ``da (1/b + 1/b0)/2 - db (a + a0) / (2 b b0)`` (exact);
* softmax: exp (Rescale), the sum (linear) and the division (above), composed;
* LayerNorm / GroupNorm / RMSNorm: centring (linear), the squares (``c^2 - c0^2 = (c +
  c0)(c - c0)``), the square root (Rescale) and the division (above), composed;
* max pooling: the output difference lies between ``dx`` at the input's argmax and
  at the reference's argmax; it is split between the two as the convex
  combination that reproduces it exactly.

The pairing requires the same operations, in the same order, in both passes
(no input-dependent control flow); a mismatch is reported as an error.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ...core import kernels
from ...core.baselines import black_value, check_baseline, make_baseline
from ...core.batching import Engine
from ...core.caches import Cache
from ...core.explanation import Explanation
from ...core.registry import register_method
from ...core.targets import ResolvedTarget, resolve_target
from ...errors import ModelError, OptionError
from ..base import Method
from .affine import affine_op
from .canonizers import model_state, propagation_module
from .derived import derived, neg, pos
from .engine import (
    ACT,
    AFFINE,
    DIV,
    ELEMWISE,
    MAXPOOL,
    NORM,
    PRODUCT,
    REDUCE,
    SCALE,
    SOFTMAX,
    STRUCT,
    SUM,
    Arith,
    Call,
    Propagator,
    apply_node,
    fused_call,
    iter_tensors,
    op_kind,
    op_name,
    out_of_place,
    parse_arith,
    propagating,
    sum_to,
)
from .lrp import chunk_target, dim_arg, merged_batchnorm, substitute

RULES = ("rescale", "reveal_cancel")


def _tiny(x: Tensor) -> Tensor:
    return 1e-7 * (1.0 + x.abs())


def _derivative(fn: Any, x: Tensor) -> Tensor:
    """Element-wise derivative of an element-wise ``fn`` at ``x``."""
    with torch.enable_grad():
        xi = x.detach().requires_grad_(True)
        y = fn(xi)
        return torch.autograd.grad(y, xi, torch.ones_like(y))[0]


def clamp_bounds(call: Call) -> tuple[float | None, float | None] | None:
    """(low, high) of a ReLU / ReLU6 / hardtanh / scalar clamp call (None for other operations).

    Their derivative is 1 strictly inside the bounds and 0 elsewhere (autograd's
    convention at the kinks), so it is computed without an autograd call.
    """
    short = call.name.rsplit(".", 1)[-1].rstrip("_")
    a, kw = call.args, call.kwargs
    if short == "relu":
        return 0.0, None
    if short == "relu6":
        return 0.0, 6.0
    if short == "hardtanh":
        lo = a[1] if len(a) > 1 else kw.get("min_val", -1.0)
        hi = a[2] if len(a) > 2 else kw.get("max_val", 1.0)
    elif short in ("clamp", "clip"):
        lo = a[1] if len(a) > 1 else kw.get("min")
        hi = a[2] if len(a) > 2 else kw.get("max")
    elif short == "clamp_min":
        lo, hi = (a[1] if len(a) > 1 else kw.get("min")), None
    elif short == "clamp_max":
        lo, hi = None, (a[1] if len(a) > 1 else kw.get("max"))
    else:
        return None
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in (lo, hi)):
        return None
    return (None if lo is None else float(lo)), (None if hi is None else float(hi))


def clamp_derivative(bounds: tuple[float | None, float | None], x: Tensor) -> Tensor:
    """Derivative of a clamp to ``bounds`` at ``x``: 1 strictly inside, 0 elsewhere."""
    lo, hi = bounds
    inside = x > lo if lo is not None else None
    if hi is not None:
        inside = x < hi if inside is None else inside.logical_and_(x < hi)
    return torch.ones_like(x) if inside is None else inside.to(x.dtype)


def clamp_rescale_backward(bounds: tuple[float | None, float | None], x: Tensor, x0: Tensor, y: Tensor,
                           y0: Tensor, m: Tensor) -> Tensor:
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
    tiny = _SUBNORMAL.get(dx.dtype)
    if tiny is not None and _subnormals_kept(dx):
        return r.add_(torch.ops.aten.hardtanh_backward(grad, dx, -tiny, tiny))  # the gradient where x == x0
    # denormals flushed (torch.set_flush_denormal) or an unusual dtype: mask by |x - x0| > 0
    return r.add_(grad.sub_(torch.ops.aten.threshold_backward(grad, dx.abs_(), 0.0)))


#: the smallest positive (subnormal) number per float dtype: strictly between -d and d lies only 0
_SUBNORMAL = {dt: torch.finfo(dt).smallest_normal * torch.finfo(dt).eps for dt in (torch.float32, torch.float64)}


#: a subnormal double, read at run time (a literal comparison could be folded by the compiler)
_DENORMAL_PROBE = [5e-324]


def _subnormals_kept(t: Tensor) -> bool:
    """False when this thread flushes subnormals to zero (``torch.set_flush_denormal(True)`` sets
    the CPU's denormals-are-zero flag, which Python's float comparisons obey as torch's kernels
    do), which would make the smallest subnormal compare equal to 0."""
    return t.device.type != "cpu" or _DENORMAL_PROBE[0] > 0.0


def rescale_multiplier(fn: Any, x: Tensor, x0: Tensor, y: Tensor, y0: Tensor,
                       bounds: tuple[float | None, float | None] | None = None) -> Tensor:
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
        d = clamp_derivative(bounds, x) if bounds is not None else _derivative(fn, x)
        m = torch.where(bad, d, m)
    return m


def _norm_spec(call: Call, x: Tensor) -> dict[str, Any]:
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
        return {"view": view, "w": lambda t: wfull, "eps": float(eps), "center": name == "layer_norm"}
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


class _Rescale:
    def __init__(self, fn: Any, call: Call, x0: Tensor, y0: Tensor) -> None:
        self.fn, self.call, self.x0, self.y0 = fn, call, x0, y0
        self.bounds = clamp_bounds(call)

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], y: Tensor, m: Tensor) -> tuple[Tensor]:
        x = ins[0]
        if self.bounds is not None and m.shape == x.shape == y.shape == self.y0.shape == self.x0.shape:
            return (clamp_rescale_backward(self.bounds, x, self.x0, y, self.y0, m),)
        r = rescale_multiplier(self.fn, x, self.x0, y, self.y0, self.bounds)
        if r.shape == x.shape and m.shape == x.shape and not m.requires_grad:
            return (r.mul_(m),)
        return (sum_to(m * r, x.shape),)


class _Bilinear:
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
            za = self.call.func(*substitute(self.call.args, {ia: ai, ib: bbar}),
                                **substitute(self.call.kwargs, {ia: ai, ib: bbar}))
            zb = self.call.func(*substitute(self.call.args, {ia: abar, ib: bi}),
                                **substitute(self.call.kwargs, {ia: abar, ib: bi}))
            ga, gb = torch.autograd.grad((za, zb), (ai, bi), (m, m))
        return ga, gb


class _Divide:
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


class _Softmax:
    def __init__(self, call: Call, dim: int, x0: Tensor) -> None:
        self.call, self.dim, self.x0 = call, dim, x0

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], y: Tensor, m: Tensor) -> tuple[Tensor]:
        x, x0, d = ins[0], self.x0, self.dim
        finite = torch.isfinite(x) & torch.isfinite(x0)
        xs, x0s = torch.where(finite, x, torch.zeros_like(x)), torch.where(finite, x0, torch.zeros_like(x0))
        shift = torch.maximum(x.amax(d, keepdim=True), x0.amax(d, keepdim=True))
        shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
        e = torch.where(finite | torch.isfinite(x), torch.exp(x - shift), torch.zeros_like(x))
        e0 = torch.where(finite | torch.isfinite(x0), torch.exp(x0 - shift), torch.zeros_like(x0))
        S, S0 = e.sum(d, keepdim=True), e0.sum(d, keepdim=True)
        me = m * 0.5 * (1.0 / S + 1.0 / S0) + (m * (-0.5) * (e + e0)).sum(d, keepdim=True) / (S * S0)
        dx = xs - x0s
        small = dx.abs() <= _tiny(xs)
        r = torch.where(small, e, (e - e0) / torch.where(small, torch.ones_like(dx), dx))
        return (torch.where(finite, me * r, torch.zeros_like(me)),)


class _Normalize:
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
        q, q0 = (c * c).mean(-1, keepdim=True) + sp["eps"], (c0 * c0).mean(-1, keepdim=True) + sp["eps"]
        sig, sig0 = q.sqrt(), q0.sqrt()
        w = sp["w"](x)
        mu = M * w if w is not None else M
        mc = mu * 0.5 * (1.0 / sig + 1.0 / sig0)
        msig = (mu * (-0.5) * (c + c0)).sum(-1, keepdim=True) / (sig * sig0)
        dq = q - q0
        small = dq.abs() <= _tiny(q)
        rs = torch.where(small, 0.5 / sig, (sig - sig0) / torch.where(small, torch.ones_like(dq), dq))
        mc = mc + (msig * rs) * (c + c0) / c.shape[-1]
        if sp["center"]:
            mc = mc - mc.mean(-1, keepdim=True)
        return (mc.reshape(x.shape),)


def _pool_with_indices(call: Call, t: Tensor) -> tuple[Tensor, Tensor]:
    kwargs = {k: v for k, v in call.kwargs.items() if k != "return_indices"}
    args = substitute(call.args, {id(call.args[0]): t})
    return call.func(*args, **kwargs, return_indices=True)


def maxpool_split(x: Tensor, x0: Tensor, y: Tensor, y0: Tensor, idx: Tensor, idx0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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
    ok = gap.abs() > _tiny(y.reshape(n, c, -1))
    t = torch.where(ok, (dy - dj) / torch.where(ok, gap, torch.ones_like(gap)), torch.full_like(gap, 0.5))
    return i, j, t.clamp(0.0, 1.0)


class _MaxPool:
    def __init__(self, call: Call, x0: Tensor, y0: Tensor, idx0: Tensor) -> None:
        self.call, self.x0, self.y0, self.idx0 = call, x0, y0, idx0

    def forward(self, x: Tensor) -> Tensor:
        return self.call.run()

    def backward(self, ins: list[Tensor], y: Tensor, m: Tensor) -> tuple[Tensor]:
        x = ins[0]
        _, idx = _pool_with_indices(self.call, x)
        i, j, t = maxpool_split(x, self.x0, y, self.y0, idx, self.idx0)
        n, c = x.shape[:2]
        mf = m.reshape(n, c, -1)
        out = torch.zeros(n, c, x[0, 0].numel(), dtype=m.dtype, device=m.device)
        out.scatter_add_(2, i, t * mf)
        out.scatter_add_(2, j, (1 - t) * mf)
        return (out.reshape(x.shape),)


# ============================================================================ the Rescale propagator


class DeepLiftPropagator(Propagator):
    """Reference pass (``mode="record"``) or input pass (``mode="replay"``) of DeepLIFT-Rescale."""

    method = "deeplift"
    supported = frozenset({STRUCT, SCALE, SUM, REDUCE, AFFINE, PRODUCT, DIV, ACT, ELEMWISE, NORM, SOFTMAX, MAXPOOL})

    def __init__(self, model: nn.Module, *, mode: str, refs: list[dict[str, Any]] | None = None,
                 gradient_fallback: bool = False) -> None:
        super().__init__(model, gradient_fallback=gradient_fallback)
        self.mode = mode
        self.refs: list[dict[str, Any]] = [] if refs is None else refs
        self.k = 0
        # the reference pass runs without autograd: input dependence is tracked by tensor identity
        self.tracked: dict[int, Tensor] = {}

    #: linear operations skip the general dispatch (subclasses with their own linear rules turn it off)
    linear_fast_path = True

    def _one_var(self, args: tuple) -> bool:
        count = 0
        for t in iter_tensors(args):
            if self.is_var(t):
                count += 1
        return count == 1

    def track(self, t: Tensor) -> None:
        self.tracked[id(t)] = t

    def is_var(self, t: Any) -> bool:
        if self.mode == "record":
            return isinstance(t, Tensor) and id(t) in self.tracked
        return isinstance(t, Tensor) and t.requires_grad

    def dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        if not self.any_var(args, kwargs):
            return self.on_constant(func, args, kwargs)
        kind = op_kind(func) if self.linear_fast_path else None
        if kind is STRUCT or kind is REDUCE or (kind is AFFINE and self._one_var(args)):
            # linear operations keep their gradient (the linear rule) and pair nothing: run them
            # directly, without the general dispatch (about 2/3 of the calls of a CNN's pass)
            func, args, kwargs = out_of_place(func, args, kwargs)
            out = func(*args, **kwargs)
        else:
            out = super().dispatch(func, args, kwargs)
        if self.mode == "record":
            if isinstance(out, Tensor):
                if out.is_floating_point():
                    self.tracked[id(out)] = out
            else:
                for t in iter_tensors(out):
                    if t.is_floating_point():
                        self.tracked[id(t)] = t
        return out

    # ------------------------------------------------------------------ pairing
    def pair(self, call: Call, variables: list[Tensor], out: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Record (reference pass) or fetch (input pass) the reference of one nonlinear operation."""
        if self.mode == "record":
            rec = {"name": call.name, "ins": [v.detach() for v in variables],
                   "out": out.detach() if isinstance(out, Tensor) else None, **(extra or {})}
            self.refs.append(rec)
            return rec
        if self.k >= len(self.refs):
            raise ModelError(f"deeplift: the input pass runs more nonlinear operations than the reference pass "
                             f"({call.name} in {self.site()}); the model's control flow depends on its input.")
        rec = self.refs[self.k]
        self.k += 1
        shapes = [tuple(v.shape) for v in variables]
        if rec["name"] != call.name or [tuple(r.shape) for r in rec["ins"]] != shapes:
            raise ModelError(
                f"deeplift: operation #{self.k} differs between the input pass ({call.name}, shapes {shapes}) and "
                f"the reference pass ({rec['name']}); the model's control flow depends on its input "
                f"(at {self.site()}). Use a baseline that takes the same path."
            )
        return rec

    def _elementwise(self, call: Call) -> Any:
        x = next(t for t in call.args if self.is_var(t))
        if sum(1 for t in iter_tensors((call.args, call.kwargs)) if self.is_var(t)) != 1:
            return self._unknown(call.func, call.args, call.kwargs, reason="element-wise op of several inputs")
        if self.mode == "record":
            out = call.run()
            self.pair(call, [x], out)
            return out
        rec = self.pair(call, [x], None)
        fn = _unary(call, x)
        return apply_node(_Rescale(fn, call, rec["ins"][0], rec["out"]), x)

    def on_fused(self, call: Call) -> Any:
        """The reference pass (no gradients) runs a fused call's convolution on the fused twin's
        pre-packed kernel, then the activation with its pairing; the input pass splits the call
        (the convolution's gradient is the linear rule)."""
        if self.mode == "record" and not torch.is_grad_enabled():
            f = fused_call(call)
            packed = kernels.packed_kernel(f.weight) if f is not None else None
            if packed is not None and len(call.args) >= 2 and call.args[1] is f.weight:
                z = call.func(f.x, packed, f.bias, f.padding, f.stride, f.dilation, f.groups, "none", [], None)
                self.tracked[id(z)] = z
                return z if f.act is None else self.dispatch(f.act, (z, *f.act_args), f.act_kwargs)
        return super().on_fused(call)

    def on_activation(self, call: Call) -> Any:
        return self._elementwise(call)

    def on_elementwise(self, call: Call) -> Any:
        return self._elementwise(call)

    def on_product(self, call: Call) -> Any:
        variables: list[Tensor] = []
        for t in iter_tensors((call.args, call.kwargs)):
            if self.is_var(t) and all(t is not v for v in variables):
                variables.append(t)
        if len(variables) != 2:
            return self._unknown(call.func, call.args, call.kwargs,
                                 reason="a product needs exactly two distinct input-dependent operands")
        if self.mode == "record":
            out = call.run()
            self.pair(call, variables, out)
            return out
        rec = self.pair(call, variables, None)
        a, b = variables
        return apply_node(_Bilinear(call, (id(a), id(b)), rec["ins"][0], rec["ins"][1]), a, b)

    def on_div(self, call: Call, ar: Arith) -> Any:
        a_var = self.is_var(ar.a)
        if a_var and ar.a is ar.b:
            return self._unknown(call.func, call.args, call.kwargs, reason="x / x")
        variables = [ar.a, ar.b] if a_var else [ar.b]
        if self.mode == "record":
            out = call.run()
            self.pair(call, variables, out)
            return out
        rec = self.pair(call, variables, None)
        a0 = rec["ins"][0] if a_var else ar.a
        b0 = rec["ins"][-1]
        return apply_node(_Divide(call, ar.a, a0, a_var, b0), *variables)

    def on_softmax(self, call: Call) -> Any:
        x = call.args[0] if call.args else call.kwargs["input"]
        if self.mode == "record":
            out = call.run()
            self.pair(call, [x], out)
            return out
        rec = self.pair(call, [x], None)
        return apply_node(_Softmax(call, dim_arg(call), rec["ins"][0]), x)

    def on_norm(self, call: Call) -> Any:
        x = call.args[0] if call.args else call.kwargs["input"]
        if merged_batchnorm(call):
            return x  # merged into the preceding layer: an exact identity
        if op_name(call.func).endswith("batch_norm"):
            training = call.args[5] if len(call.args) > 5 else call.kwargs.get("training", False)
            if training:
                return self._unknown(call.func, call.args, call.kwargs, reason="batch_norm in training mode")
            return call.run()  # eval-mode BatchNorm is affine: the gradient is the linear rule
        if self.mode == "record":
            out = call.run()
            self.pair(call, [x], out)
            return out
        rec = self.pair(call, [x], None)
        return apply_node(_Normalize(call, _norm_spec(call, x), rec["ins"][0]), x)

    def on_maxpool(self, call: Call) -> Any:
        x = call.args[0] if call.args else call.kwargs["input"]
        if call.kwargs.get("return_indices") or (len(call.args) > 6 and call.args[6]):
            return self._unknown(call.func, call.args, call.kwargs, reason="return_indices=True")
        if self.mode == "record":
            with torch.no_grad():
                y0, idx0 = _pool_with_indices(call, x.detach())
            out = call.run()
            self.pair(call, [x], out, {"idx": idx0})
            return out
        rec = self.pair(call, [x], None)
        return apply_node(_MaxPool(call, rec["ins"][0], rec["out"], rec["idx"]), x)


def _unary(call: Call, x: Tensor) -> Any:
    func, args, kwargs = call.func, call.args, call.kwargs

    def fn(t: Tensor) -> Tensor:
        return func(*substitute(args, {id(x): t}), **kwargs)

    return fn


# ============================================================================ RevealCancel (shadow propagation)


class RevealCancelPropagator(DeepLiftPropagator):
    """DeepLIFT-RevealCancel: the positive and negative parts of ``x - x0`` travel separately.

    Every tensor that depends on the input gets two *shadow* tensors ``(P, N)`` with
    ``P + N = x - x0``. Linear operations sort each term ``w_i dx_i`` into ``P'`` or
    ``N'`` by its sign (the paper's linear rule); element-wise nonlinearities use
    the RevealCancel rule (Shrikumar et al. 2017, eq. 4-5) with multipliers held
    constant, so autograd through the shadows yields the multipliers of the
    positive and negative parts. Operations without a RevealCancel rule
    (products, softmax, layer norms) raise, or with ``gradient_fallback`` map the
    shadows with their Jacobian at the input.
    """

    method = "deeplift (reveal_cancel)"
    linear_fast_path = False  # its linear operations map the shadow streams
    # products, divisions, softmax and layer norms are accepted only to keep the pairing aligned:
    # their handlers raise (or fall back to the Jacobian) after consuming the reference record
    supported = frozenset({STRUCT, SCALE, SUM, REDUCE, AFFINE, ACT, ELEMWISE, NORM, MAXPOOL, PRODUCT, DIV, SOFTMAX})

    def __init__(self, model: nn.Module, *, refs: list[dict[str, Any]], gradient_fallback: bool = False) -> None:
        super().__init__(model, mode="replay", refs=refs, gradient_fallback=gradient_fallback)
        self.shadow: dict[int, tuple[Tensor, Tensor, Tensor]] = {}  # id -> (tensor, P, N)

    def is_var(self, t: Any) -> bool:
        return isinstance(t, Tensor) and id(t) in self.shadow

    def set(self, out: Tensor, P: Tensor, N: Tensor) -> Tensor:
        self.shadow[id(out)] = (out, P, N)
        return out

    def parts(self, t: Tensor) -> tuple[Tensor, Tensor]:
        _, P, N = self.shadow[id(t)]
        return P, N

    def split(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Positive and negative part of the total difference ``P + N`` (the sign held constant).

        DeepLIFT's linear rule sorts each term ``w_i dx_i`` by the sign of the term with
        the *total* ``dx_i``; the two parts of ``dx_i`` then share that term's multiplier.
        (Mapping P and N separately through ``W+``/``W-`` would make both streams grow
        layer by layer and cancel catastrophically in float32.)
        """
        P, N = self.parts(t)
        d = P + N
        pos = torch.relu(d)  # d * (d > 0) with that mask held constant by autograd; one float kernel
        return pos, d - pos

    def _stream(self, obj: Any, which: int, zero_scalars: bool = False) -> Any:
        """``obj`` with input-dependent tensors replaced by their P (0) or N (1) shadow, constants by zeros."""
        if isinstance(obj, Tensor):
            if self.is_var(obj):
                return self.shadow[id(obj)][1 + which]
            return torch.zeros_like(obj) if obj.is_floating_point() else obj
        if isinstance(obj, list):
            return [self._stream(o, which, zero_scalars) for o in obj]
        if isinstance(obj, tuple):
            return tuple(self._stream(o, which, zero_scalars) for o in obj)
        if zero_scalars and isinstance(obj, float):
            return 0.0
        return obj

    def on_struct(self, call: Call) -> Any:
        if op_name(call.func).endswith("__setitem__"):
            return self._unknown(call.func, call.args, call.kwargs, reason="in-place item assignment")
        out = call.run()
        kwargs = dict(call.kwargs)
        args = call.args
        name = op_name(call.func).rsplit(".", 1)[-1]
        if name in ("pad", "masked_fill", "where"):  # fill values are constants: their difference is zero
            if "value" in kwargs:
                kwargs["value"] = 0.0
            zero = True
        else:
            zero = False
        with torch.enable_grad():
            shadows = [call.func(*self._stream(args, w, zero), **self._stream(kwargs, w, zero)) for w in (0, 1)]
        if isinstance(out, Tensor):
            self.set(out, *shadows)
        elif isinstance(out, (tuple, list)):
            for o, p, n in zip(out, shadows[0], shadows[1]):
                if isinstance(o, Tensor):
                    self.set(o, p, n)
        return out

    def on_scale(self, call: Call, x: Tensor) -> Any:
        ar = parse_arith(call.func, call.args, call.kwargs)
        out = call.run()
        other = ar.b if ar.a is x else ar.a
        c = other if ar.op == "mul" else 1.0 / other
        if isinstance(c, Tensor):
            cp, cn = c.clamp(min=0), c.clamp(max=0)
        else:
            cp, cn = max(float(c), 0.0), min(float(c), 0.0)
        with torch.enable_grad():
            P, N = self.split(x)
            return self.set(out, torch.broadcast_to(cp * P + cn * N, out.shape),
                            torch.broadcast_to(cp * N + cn * P, out.shape))

    def on_sum(self, call: Call, ar: Arith) -> Any:
        out = call.run()
        sign = 1.0 if ar.op == "add" else -1.0
        P = torch.zeros((), dtype=out.dtype, device=out.device)
        N = torch.zeros((), dtype=out.dtype, device=out.device)
        with torch.enable_grad():
            for c, t in ((1.0, ar.a), (sign * ar.alpha, ar.b)):
                if self.is_var(t):
                    tp, tn = self.split(t)
                    P, N = (P + c * tp, N + c * tn) if c >= 0 else (P + c * tn, N + c * tp)
            return self.set(out, torch.broadcast_to(P, out.shape), torch.broadcast_to(N, out.shape))

    def on_reduce(self, call: Call) -> Any:
        out = call.run()
        x = call.args[0]
        rest = call.args[1:]
        with torch.enable_grad():
            P, N = self.split(x)  # non-negative weights: the parts keep their sign
            return self.set(out, call.func(P, *rest, **call.kwargs), call.func(N, *rest, **call.kwargs))

    def on_affine(self, call: Call) -> Any:
        out = call.run()
        op = affine_op(call, self.is_var)
        x = next(t for t in iter_tensors(call.args) if self.is_var(t))
        wp, wn = pos(op.weight), neg(op.weight)
        with torch.enable_grad():
            P, N = self.split(x)
            if op.name == "linear" or (op.conv is not None and op.conv["groups"] == 1):
                # W+ P + W- N and W- P + W+ N as two maps of [P, N] stacked along the input features,
                # with [W+, W-] / [W- , W+] stacked likewise: no batch slicing (whose backward
                # zero-fills and copies a full buffer per slice), one concatenation
                both = torch.cat([P, N], dim=1 if op.conv is not None else -1)
                w_pn = derived(op.weight, "reveal_cancel_pn", lambda w: torch.cat([pos(w), neg(w)], dim=1))
                w_np = derived(op.weight, "reveal_cancel_np", lambda w: torch.cat([neg(w), pos(w)], dim=1))
                return self.set(out, op(both, w_pn, None), op(both, w_np, None))
            return self.set(out, op(P, wp, None) + op(N, wn, None), op(N, wp, None) + op(P, wn, None))

    def on_norm(self, call: Call) -> Any:
        if merged_batchnorm(call):
            return call.args[0]
        if not op_name(call.func).endswith("batch_norm"):
            self.pair(call, [call.args[0]], None)
            return self._unknown(call.func, call.args, call.kwargs, reason="no RevealCancel rule for layer norms")
        from .lrp import norm_linear_part

        x = call.args[0]
        out = call.run()
        scale = norm_linear_part(call, x)(torch.ones_like(x[:1]))
        sp, sn = scale.clamp(min=0), scale.clamp(max=0)
        with torch.enable_grad():
            P, N = self.split(x)
            return self.set(out, sp * P + sn * N, sp * N + sn * P)

    def _elementwise(self, call: Call) -> Any:
        x = next(t for t in call.args if self.is_var(t))
        rec = self.pair(call, [x], None)
        out = call.run()
        fn = _unary(call, x)
        x0, y0 = rec["ins"][0], rec["out"]
        P, N = self.parts(x)
        Pd, Nd = P.detach(), N.detach()
        # evaluate at the input the shadows imply (x0 + P + N, equal to x up to rounding), so that a
        # vanishing part gets a vanishing share instead of the rounding difference between the two
        fP, fN, fPN = fn(x0 + Pd), fn(x0 + Nd), fn(x0 + Pd + Nd)
        yP = 0.5 * ((fP - y0) + (fPN - fN))
        yN = (fPN - y0) - yP
        dP, dN = Pd.abs() <= _tiny(x), Nd.abs() <= _tiny(x)
        mP = yP / torch.where(dP, torch.ones_like(Pd), Pd)
        mN = yN / torch.where(dN, torch.ones_like(Nd), Nd)
        if dP.any() or dN.any():
            bounds = clamp_bounds(call)
            d = clamp_derivative(bounds, x) if bounds is not None else _derivative(fn, x)
            mP, mN = torch.where(dP, d, mP), torch.where(dN, d, mN)
        with torch.enable_grad():
            return self.set(out, mP * P, mN * N)

    def on_maxpool(self, call: Call) -> Any:
        x = call.args[0]
        rec = self.pair(call, [x], None)
        out = call.run()
        with torch.no_grad():
            _, idx = _pool_with_indices(call, x)
        i, j, t = maxpool_split(x, rec["ins"][0], out, rec["out"], idx, rec["idx"])
        n, c = x.shape[:2]
        with torch.enable_grad():
            P, N = self.split(x)

            def pool(s: Tensor) -> Tensor:
                sf = s.reshape(n, c, -1)
                return (t * sf.gather(2, i) + (1 - t) * sf.gather(2, j)).reshape(out.shape)

            return self.set(out, pool(P), pool(N))

    def on_product(self, call: Call) -> Any:
        variables = [t for t in iter_tensors((call.args, call.kwargs)) if self.is_var(t)]
        self.pair(call, variables, None)
        return self._unknown(call.func, call.args, call.kwargs, reason="no RevealCancel rule for products")

    def on_div(self, call: Call, ar: Arith) -> Any:
        self.pair(call, [t for t in (ar.a, ar.b) if self.is_var(t)], None)
        return self._unknown(call.func, call.args, call.kwargs, reason="no RevealCancel rule for divisions")

    def on_softmax(self, call: Call) -> Any:
        self.pair(call, [call.args[0]], None)
        return self._unknown(call.func, call.args, call.kwargs, reason="no RevealCancel rule for softmax")

    def fallback(self, func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        """Map the shadows with the operation's Jacobian at the input (forward-mode AD)."""
        variables = [t for t in iter_tensors((args, kwargs)) if self.is_var(t)]
        outs = [out] if isinstance(out, Tensor) else [o for o in out if isinstance(o, Tensor)]
        streams = []
        for which in (0, 1):
            with torch.enable_grad(), fwAD.dual_level():
                mapping = {id(v): fwAD.make_dual(v.detach(), self.shadow[id(v)][1 + which]) for v in variables}
                res = func(*substitute(args, mapping), **substitute(kwargs, mapping))
                res = [res] if isinstance(res, Tensor) else [r for r in res if isinstance(r, Tensor)]
                tangents = [fwAD.unpack_dual(r).tangent for r in res]
            streams.append([tg if tg is not None else torch.zeros_like(o) for tg, o in zip(tangents, outs)])
        for o, p, n in zip(outs, streams[0], streams[1]):
            self.set(o, p, n)
        return out

    unknown_hint = ("Use rule='rescale', rewrite it with supported operations, or pass gradient_fallback=True "
                    "(recorded in the explanation's provenance).")

    def _on_path(self, args: tuple, kwargs: dict, out: Any) -> bool:
        # RevealCancel tracks its variables itself (outputs do not require grad here)
        return any(self.is_var(t) for t in iter_tensors((args, kwargs))) and any(
            t.is_floating_point() for t in iter_tensors(out))


# ============================================================================ reference cache


class ReferenceCache:
    """DeepLIFT's reference passes, kept for the next call with the same baseline.

    The reference pass depends only on the model and the baseline batch, and a sweep over a
    data set uses the same baseline (zero, a fixed image, a DeepSHAP background) for every
    chunk of every call, so one recorded pass serves them all: DeepLIFT then costs one forward
    and one backward. An entry is reused only when :func:`model_state` is unchanged and the
    baseline batch is equal element by element (a kept copy); entries live as long as the
    model (weak keys), at most ``max_entries`` per model, within a byte budget for all models
    together (and the total cache budget, :mod:`perspicio.core.caches`), least recently used
    first out.
    """

    def __init__(self, max_bytes: int = 512 * 2**20, max_entries: int = 4, name: str = "deeplift reference passes"
                 ) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        # per module: [(key, baseline copy, records, output, bytes)], most recently used last
        self._store = Cache(name, holds="recorded DeepLIFT reference passes (activations per baseline)",
                            key="model (weak); model state, baseline", sized=True, budget=max_bytes)

    @staticmethod
    def _key(state: tuple, x0: Tensor, gradient_fallback: bool) -> tuple:
        return state, tuple(x0.shape), x0.dtype, str(x0.device), gradient_fallback

    def get(self, model: nn.Module, state: tuple, x0: Tensor, gradient_fallback: bool) -> tuple | None:
        """``(refs, out0)`` recorded for ``x0`` on ``model`` in ``state``, or None."""
        entries = self._store.get(model) or []
        key = self._key(state, x0, gradient_fallback)
        for entry in entries:
            if entry[0] == key and torch.equal(entry[1], x0):
                return entry[2], entry[3]
        return None

    def put(self, model: nn.Module, state: tuple, x0: Tensor, gradient_fallback: bool,
            refs: list[dict[str, Any]], out0: Tensor) -> None:
        storages: dict[int, int] = {}
        for rec in refs:
            for t in iter_tensors(list(rec.values())):
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
        size = sum(storages.values()) + x0.numel() * x0.element_size() + out0.numel() * out0.element_size()
        if size > self.max_bytes:
            return
        entries = [e for e in self._store.get(model) or [] if e[0][0] == state]  # others are stale
        entries.append((self._key(state, x0, gradient_fallback), x0.detach().clone(), refs, out0, size))
        while len(entries) > self.max_entries or sum(e[4] for e in entries) > self.max_bytes:
            entries.pop(0)
        self._store.put(model, entries, size=sum(e[4] for e in entries))

    def clear(self) -> None:
        self._store.clear()


#: the process-wide cache of reference passes (``REFERENCE_CACHE.clear()`` frees it)
REFERENCE_CACHE = ReferenceCache()


def deeplift_pairs(
    model: nn.Module, xs: Tensor, x0s: Tensor, score: Any, engine: Engine, rule: str, gradient_fallback: bool,
    state: tuple | None = None, owner: nn.Module | None = None,
) -> tuple[Tensor, Tensor, Tensor, list[str], bool]:
    """DeepLIFT of pairs ``(xs[i], x0s[i])``: attributions, target scores at xs and at x0s,
    fallbacks, and whether the reference pass came from :data:`REFERENCE_CACHE`.

    ``score(output, which)`` maps a model output to one score per pair (``which`` is
    "input" or "reference"). ``state``: :func:`model_state` taken before any canonizer ran,
    to reuse and keep reference passes; None records afresh and keeps nothing. ``owner``: the
    user's model when ``model`` is its folded twin; passes are kept per owner, since the twin
    and the model with merged BatchNorms record the same operations with the same values
    (checked on the bundled model: equal records), and the replay checks every operation's
    name and shapes anyway.
    """
    key = model if owner is None else owner
    cached = REFERENCE_CACHE.get(key, state, x0s, gradient_fallback) if state is not None else None
    if cached is None:
        rec = DeepLiftPropagator(model, mode="record", gradient_fallback=gradient_fallback)
        x0r = x0s.detach().clone()
        rec.track(x0r)
        with propagating(model, rec), torch.no_grad():
            out0 = engine.forward(x0r, module=model).detach()
        rec.tracked.clear()
        refs = rec.refs
        if state is not None:
            REFERENCE_CACHE.put(key, state, x0s, gradient_fallback, refs, out0)
    else:
        refs, out0 = cached
    n = xs.shape[0]
    if rule == "rescale":
        prop: DeepLiftPropagator = DeepLiftPropagator(model, mode="replay", refs=refs,
                                                      gradient_fallback=gradient_fallback)
        xr = xs.detach().clone().requires_grad_(True)
        with propagating(model, prop):
            out = engine.forward(xr, module=model)
        s = score(out, "input")
        if not s.requires_grad:
            raise ModelError("the target score does not depend on the input: nothing to propagate.")
        try:
            m = engine.grad(s.sum(), [xr], n)[0]
        except RuntimeError as exc:
            raise ModelError(f"multipliers could not be propagated to the input: {exc}") from exc
        attr = (xs - x0s) * m
    else:
        prop = RevealCancelPropagator(model, refs=refs, gradient_fallback=gradient_fallback)
        dx = (xs - x0s).detach()
        xr = xs.detach().clone()
        with torch.enable_grad():
            P0, N0 = dx.clamp(min=0).requires_grad_(True), dx.clamp(max=0).requires_grad_(True)
        prop.set(xr, P0, N0)
        with propagating(model, prop), torch.no_grad():
            out = engine.forward(xr, module=model)
        if not prop.is_var(out):
            raise ModelError("the model output does not depend on the input: nothing to propagate.")
        Pout, Nout = prop.parts(out)
        with torch.enable_grad():
            o = out.detach().requires_grad_(True)
            s = score(o, "input")
            g = torch.autograd.grad(s.sum(), o)[0]
            mP, mN = engine.grad((g * (Pout + Nout)).sum(), [P0, N0], n)
        attr = P0.detach() * mP + N0.detach() * mN
        s = s.detach()
    if prop.k != len(refs):
        raise ModelError("deeplift: the input pass ran fewer nonlinear operations than the reference pass; "
                         "the model's control flow depends on its input.")
    base = score(out0, "reference").detach()  # after the input pass: targets resolve on f(x)
    return attr.detach(), s.detach(), base, prop.fallbacks, cached is not None


def _score_fn(tgt: ResolvedTarget, idx: Tensor | None) -> Any:
    def score(out: Tensor, which: str) -> Tensor:
        if idx is not None:
            return out.reshape(out.shape[0], -1).gather(1, idx[:, None].to(out.device)).squeeze(1)
        return tgt.fn(out)

    return score


def _check_rule(rule: str) -> str:
    if not isinstance(rule, str) or rule.strip().lower().replace("-", "_") not in RULES:
        raise OptionError(f"rule must be one of {', '.join(RULES)}; got {rule!r}.")
    return rule.strip().lower().replace("-", "_")


@register_method("deeplift", family="propagation", needs_gradients=True,
                 summary="DeepLIFT: contributions to f(x) - f(baseline) with Rescale or RevealCancel multipliers",
                 paper="Shrikumar et al., ICML 2017")
class DeepLift(Method):
    """DeepLIFT at the operation level; attributions sum to ``f(x) - f(baseline)``.

    ``baseline``: a name, number, tensor or callable from :mod:`perspicio.core.baselines`;
    ``rule``: "rescale" or "reveal_cancel";
    ``gradient_fallback``: let operations without a rule use their gradient
    (recorded) instead of raising; ``cache_reference``: reuse the reference pass of an
    earlier call or chunk with the same model state and baseline (:class:`ReferenceCache`).
    """

    input_ndim = None

    def __init__(
        self,
        model: nn.Module,
        *,
        baseline: Any = "zero",
        rule: str = "rescale",
        seed: int = 0,
        gradient_fallback: bool = False,
        cache_reference: bool = True,
        **common: Any,
    ) -> None:
        super().__init__(model, **common)
        self.rule = _check_rule(rule)
        check_baseline(baseline)
        self._black = black_value(model)
        self.cache_reference = bool(cache_reference)
        self.baseline = baseline
        self.seed = int(seed)
        self.gradient_fallback = bool(gradient_fallback)

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        x0 = make_baseline(self.baseline, x, black=self._black, seed=self.seed)
        n = x.shape[0]
        scores, bases, indices, fallbacks = [], [], [], []
        state = model_state(self.model)
        hits = [0]

        def run(start: int, stop: int) -> Tensor:
            xs = x[start:stop]
            holder: dict[str, Any] = {"tgt": None}

            def score(out: Tensor, which: str) -> Tensor:
                if holder["tgt"] is None:  # the first call is on f(x): "predicted class" means x's
                    holder["tgt"] = resolve_target(chunk_target(target, start, stop, n), out.detach(), self.labels)
                t = holder["tgt"]
                return _score_fn(t, t.indices)(out, which)

            attr, s, base, fb, hit = deeplift_pairs(module, xs, x0[start:stop], score, engine, self.rule,
                                                    self.gradient_fallback, state if self.cache_reference else None,
                                                    self.model)
            hits[0] += int(hit)
            scores.append(s)
            bases.append(base)
            indices.append(holder["tgt"].indices)
            fallbacks.extend(f for f in fb if f not in fallbacks)
            return attr

        with propagation_module(self.model, x, state) as (module, _, fused):
            attributions = engine.map(run, n, sample=x[:1], grad=True, description="DeepLIFT")
        targets = torch.cat(indices) if all(i is not None for i in indices) else None
        names = (tuple(self.labels[i] for i in targets.tolist())
                 if self.labels is not None and targets is not None else None)
        return Explanation(
            attributions=attributions, method=self.name, scores=torch.cat(scores), targets=targets,
            base_value=torch.cat(bases), target_names=names,
            provenance={"rule": self.rule, "gradient_fallback": tuple(fallbacks), "cached_references": hits[0],
                        "convolutions_fused": fused},
            extras={"baseline": x0},
        )


@register_method("deep_shap", family="propagation", needs_gradients=True,
                 summary="DeepSHAP: DeepLIFT averaged over a background set (base value = mean background output)",
                 paper="Lundberg & Lee, NeurIPS 2017")
class DeepShap(Method):
    """DeepSHAP: DeepLIFT against every background sample, averaged.

    ``background``: a tensor (B, ...) of reference samples (a data sample, ideally), or
    a baseline name from :mod:`perspicio.core.baselines` to generate ``samples`` of them
    ("uniform": seeded noise in the input's range - a stand-in when no data is at
    hand). Attributions sum to ``f(x) - mean_b f(background_b)``; ``base_value`` is that mean.
    Chunks hold whole copies of the background, so with ``cache_reference`` (default) its
    reference passes are recorded once and reused by every later chunk and call.
    """

    input_ndim = None

    def __init__(
        self,
        model: nn.Module,
        *,
        background: Any = "uniform",
        samples: int = 8,
        rule: str = "rescale",
        seed: int = 0,
        gradient_fallback: bool = False,
        cache_reference: bool = True,
        **common: Any,
    ) -> None:
        super().__init__(model, **common)
        check_baseline(background, "background", allow_callable=False)
        self._black = black_value(model)
        self.cache_reference = bool(cache_reference)
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise OptionError(f"samples must be a positive integer; got {samples!r}.")
        self.background = background
        self.samples = samples
        self.rule = _check_rule(rule)
        self.seed = int(seed)
        self.gradient_fallback = bool(gradient_fallback)

    def _background(self, x: Tensor) -> Tensor:
        bg = self.background
        if isinstance(bg, str) or bg is None:
            gen_x = x[:1].expand(self.samples, *x.shape[1:])
            parts = [make_baseline(bg, gen_x[i:i + 1], black=self._black, seed=self.seed + i,
                                   name="background")
                     for i in range(self.samples)]
            return torch.cat(parts)
        try:
            b = torch.as_tensor(bg).to(device=x.device, dtype=x.dtype)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise OptionError(f"background must be a tensor (B, ...) or a name; got {type(bg).__name__}.") from exc
        if b.ndim == x.ndim - 1:
            b = b[None]
        if b.shape[1:] != x.shape[1:] or b.shape[0] < 1:
            raise OptionError(f"background must have shape (B, {', '.join(map(str, x.shape[1:]))}); "
                              f"got {tuple(b.shape)}.")
        if not torch.isfinite(b).all():
            raise OptionError("background contains NaN/Inf values.")
        return b

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        bg = self._background(x)
        n, B = x.shape[0], bg.shape[0]
        with torch.no_grad():
            out = engine.evaluate(x)
        tgt = resolve_target(target, out, self.labels)
        scores_x = tgt(out).detach()
        idx = tgt.indices
        pair_idx = idx.repeat_interleave(B) if idx is not None else None
        sample_of = torch.arange(n, device=x.device).repeat_interleave(B)
        bases, fallbacks = [], []
        state = model_state(self.model)
        hits = [0]

        def run(start: int, stop: int) -> Tensor:
            rows = sample_of[start:stop]
            xs = x[rows]
            x0s = bg[torch.arange(start, stop, device=x.device) % B]
            sel = pair_idx[start:stop] if pair_idx is not None else None
            score = _score_fn(tgt, sel)
            attr, _, base, fb, hit = deeplift_pairs(module, xs, x0s, score, engine, self.rule,
                                                    self.gradient_fallback, state if self.cache_reference else None,
                                                    self.model)
            hits[0] += int(hit)
            bases.append(base)
            fallbacks.extend(f for f in fb if f not in fallbacks)
            return attr

        with propagation_module(self.model, x, state) as (module, _, fused):
            attr = engine.map(run, n * B, sample=x[:1], grad=True, description="DeepSHAP", multiple=B)
        attributions = attr.reshape(n, B, *x.shape[1:]).mean(1)
        base_value = torch.cat(bases).reshape(n, B).mean(1)
        names = (tuple(self.labels[i] for i in idx.tolist()) if self.labels is not None and idx is not None else None)
        return Explanation(
            attributions=attributions, method=self.name, scores=scores_x, targets=idx, base_value=base_value,
            target_names=names,
            provenance={"rule": self.rule, "background_size": B, "gradient_fallback": tuple(fallbacks),
                        "cached_references": hits[0], "convolutions_fused": fused},
            extras={"background": bg},
        )
