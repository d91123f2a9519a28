"""DeepLIFT propagators: how the reference pass and the input pass are paired operation by operation.

:class:`DeepLiftPropagator` records the reference pass (``mode="record"``) and, on the input
pass, wraps each nonlinear operation in its multiplier node (:mod:`.deeplift_multipliers`);
:class:`RevealCancelPropagator` carries the positive and negative parts of ``x - x0`` as
shadow tensors through every operation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn

from ...core import kernels
from ...core.calls import out_of_place
from ...errors import ModelError
from .affine import affine_op
from .canonizers import merged_batchnorm
from .deeplift_multipliers import (
    BilinearNode,
    DivideNode,
    LpNormalizeNode,
    MaxPoolNode,
    NormalizeNode,
    RescaleNode,
    SoftmaxNode,
    maxpool_split,
    norm_spec,
    pool_with_indices,
    reveal_cancel_multipliers,
)
from .derived import derived, neg, pos
from .fused import fused_call
from .nodes import apply_node
from .operations import (
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
    dim_arg,
    iter_tensors,
    lp_normalize_args,
    op_kind,
    op_name,
    parse_arith,
    substitute,
)
from .tracing import Propagator

# ============================================================================ the Rescale propagator


class DeepLiftPropagator(Propagator):
    """Reference pass (``mode="record"``) or input pass (``mode="replay"``) of DeepLIFT-Rescale."""

    method = "deeplift"
    supported = frozenset(
        {STRUCT, SCALE, SUM, REDUCE, AFFINE, PRODUCT, DIV, ACT, ELEMWISE, NORM, SOFTMAX, MAXPOOL}
    )

    def __init__(
        self,
        model: nn.Module,
        *,
        mode: str,
        refs: list[dict[str, Any]] | None = None,
        gradient_fallback: bool = False,
    ) -> None:
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
    def pair(
        self, call: Call, variables: list[Tensor], out: Any, extra: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """Record (reference pass) or fetch (input pass) the reference of one nonlinear operation."""
        if self.mode == "record":
            rec = {
                "name": call.name,
                "ins": [v.detach() for v in variables],
                "out": out.detach() if isinstance(out, Tensor) else None,
                **(extra or {}),
            }
            self.refs.append(rec)
            return rec
        if self.k >= len(self.refs):
            raise ModelError(
                f"deeplift: the input pass runs more nonlinear operations than the reference pass "
                f"({call.name} in {self.site()}); the model's control flow depends on its input."
            )
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
            return self._unknown(
                call.func, call.args, call.kwargs, reason="element-wise op of several inputs"
            )
        if self.mode == "record":
            out = call.run()
            self.pair(call, [x], out)
            return out
        rec = self.pair(call, [x], None)
        fn = _unary(call, x)
        return apply_node(RescaleNode(fn, call, rec["ins"][0], rec["out"]), x)

    def on_fused(self, call: Call) -> Any:
        """The reference pass (no gradients) runs a fused call's convolution on the fused twin's
        pre-packed kernel, then the activation with its pairing; the input pass splits the call
        (the convolution's gradient is the linear rule)."""
        if self.mode == "record" and not torch.is_grad_enabled():
            f = fused_call(call)
            packed = kernels.packed_kernel(f.weight) if f is not None else None
            if packed is not None and len(call.args) >= 2 and call.args[1] is f.weight:
                z = call.func(
                    f.x, packed, f.bias, f.padding, f.stride, f.dilation, f.groups, "none", [], None
                )
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
            return self._unknown(
                call.func,
                call.args,
                call.kwargs,
                reason="a product needs exactly two distinct input-dependent operands",
            )
        if self.mode == "record":
            out = call.run()
            self.pair(call, variables, out)
            return out
        rec = self.pair(call, variables, None)
        a, b = variables
        return apply_node(BilinearNode(call, (id(a), id(b)), rec["ins"][0], rec["ins"][1]), a, b)

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
        return apply_node(DivideNode(call, ar.a, a0, a_var, b0), *variables)

    def on_softmax(self, call: Call) -> Any:
        x = call.args[0] if call.args else call.kwargs["input"]
        if self.mode == "record":
            out = call.run()
            self.pair(call, [x], out)
            return out
        rec = self.pair(call, [x], None)
        return apply_node(SoftmaxNode(call, dim_arg(call), rec["ins"][0]), x)

    def on_norm(self, call: Call) -> Any:
        x = call.args[0] if call.args else call.kwargs["input"]
        lp = lp_normalize_args(call)
        if lp is not None:
            if not (math.isfinite(lp[0]) and lp[0] > 0):
                return self._unknown(
                    call.func, call.args, call.kwargs, reason=f"F.normalize with p={lp[0]:g}"
                )
            if self.mode == "record":
                out = call.run()
                self.pair(call, [x], out)
                return out
            rec = self.pair(call, [x], None)
            return apply_node(LpNormalizeNode(call, *lp, rec["ins"][0]), x)
        if merged_batchnorm(call):
            return x  # merged into the preceding layer: an exact identity
        if op_name(call.func).endswith("batch_norm"):
            training = call.args[5] if len(call.args) > 5 else call.kwargs.get("training", False)
            if training:
                return self._unknown(
                    call.func, call.args, call.kwargs, reason="batch_norm in training mode"
                )
            return call.run()  # eval-mode BatchNorm is affine: the gradient is the linear rule
        if self.mode == "record":
            out = call.run()
            self.pair(call, [x], out)
            return out
        rec = self.pair(call, [x], None)
        return apply_node(NormalizeNode(call, norm_spec(call, x), rec["ins"][0]), x)

    def on_maxpool(self, call: Call) -> Any:
        x = call.args[0] if call.args else call.kwargs["input"]
        if call.kwargs.get("return_indices") or (len(call.args) > 6 and call.args[6]):
            return self._unknown(call.func, call.args, call.kwargs, reason="return_indices=True")
        if self.mode == "record":
            with torch.no_grad():
                y0, idx0 = pool_with_indices(call, x.detach())
            out = call.run()
            self.pair(call, [x], out, {"idx": idx0})
            return out
        rec = self.pair(call, [x], None)
        return apply_node(MaxPoolNode(call, rec["ins"][0], rec["out"], rec["idx"]), x)


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
    supported = frozenset(
        {STRUCT, SCALE, SUM, REDUCE, AFFINE, ACT, ELEMWISE, NORM, MAXPOOL, PRODUCT, DIV, SOFTMAX}
    )

    def __init__(
        self, model: nn.Module, *, refs: list[dict[str, Any]], gradient_fallback: bool = False
    ) -> None:
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
        pos = torch.relu(
            d
        )  # d * (d > 0) with that mask held constant by autograd; one float kernel
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
            return self._unknown(
                call.func, call.args, call.kwargs, reason="in-place item assignment"
            )
        out = call.run()
        kwargs = dict(call.kwargs)
        args = call.args
        name = op_name(call.func).rsplit(".", 1)[-1]
        if name in (
            "pad",
            "masked_fill",
            "where",
        ):  # fill values are constants: their difference is zero
            if "value" in kwargs:
                kwargs["value"] = 0.0
            zero = True
        else:
            zero = False
        with torch.enable_grad():
            shadows = [
                call.func(*self._stream(args, w, zero), **self._stream(kwargs, w, zero))
                for w in (0, 1)
            ]
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
            return self.set(
                out,
                torch.broadcast_to(cp * P + cn * N, out.shape),
                torch.broadcast_to(cp * N + cn * P, out.shape),
            )

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
            return self.set(
                out, call.func(P, *rest, **call.kwargs), call.func(N, *rest, **call.kwargs)
            )

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
                w_pn = derived(
                    op.weight, "reveal_cancel_pn", lambda w: torch.cat([pos(w), neg(w)], dim=1)
                )
                w_np = derived(
                    op.weight, "reveal_cancel_np", lambda w: torch.cat([neg(w), pos(w)], dim=1)
                )
                return self.set(out, op(both, w_pn, None), op(both, w_np, None))
            return self.set(
                out, op(P, wp, None) + op(N, wn, None), op(N, wp, None) + op(P, wn, None)
            )

    def on_norm(self, call: Call) -> Any:
        if merged_batchnorm(call):
            return call.args[0]
        if not op_name(call.func).endswith("batch_norm"):
            self.pair(call, [call.args[0]], None)
            return self._unknown(
                call.func,
                call.args,
                call.kwargs,
                reason="no RevealCancel rule for layer norms or F.normalize",
            )
        from .lrp_nodes import norm_linear_part

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
        P, N = self.parts(x)
        mP, mN = reveal_cancel_multipliers(
            fn, call, x, rec["ins"][0], rec["out"], P.detach(), N.detach()
        )
        with torch.enable_grad():
            return self.set(out, mP * P, mN * N)

    def on_maxpool(self, call: Call) -> Any:
        x = call.args[0]
        rec = self.pair(call, [x], None)
        out = call.run()
        with torch.no_grad():
            _, idx = pool_with_indices(call, x)
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
        return self._unknown(
            call.func, call.args, call.kwargs, reason="no RevealCancel rule for products"
        )

    def on_div(self, call: Call, ar: Arith) -> Any:
        self.pair(call, [t for t in (ar.a, ar.b) if self.is_var(t)], None)
        return self._unknown(
            call.func, call.args, call.kwargs, reason="no RevealCancel rule for divisions"
        )

    def on_softmax(self, call: Call) -> Any:
        self.pair(call, [call.args[0]], None)
        return self._unknown(
            call.func, call.args, call.kwargs, reason="no RevealCancel rule for softmax"
        )

    def fallback(self, func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        """Map the shadows with the operation's Jacobian at the input (forward-mode AD)."""
        variables = [t for t in iter_tensors((args, kwargs)) if self.is_var(t)]
        outs = [out] if isinstance(out, Tensor) else [o for o in out if isinstance(o, Tensor)]
        streams = []
        for which in (0, 1):
            with torch.enable_grad(), fwAD.dual_level():
                mapping = {
                    id(v): fwAD.make_dual(v.detach(), self.shadow[id(v)][1 + which])
                    for v in variables
                }
                res = func(*substitute(args, mapping), **substitute(kwargs, mapping))
                res = (
                    [res] if isinstance(res, Tensor) else [r for r in res if isinstance(r, Tensor)]
                )
                tangents = [fwAD.unpack_dual(r).tangent for r in res]
            streams.append(
                [tg if tg is not None else torch.zeros_like(o) for tg, o in zip(tangents, outs)]
            )
        for o, p, n in zip(outs, streams[0], streams[1]):
            self.set(o, p, n)
        return out

    unknown_hint = (
        "Use rule='rescale', rewrite it with supported operations, or pass gradient_fallback=True "
        "(recorded in the explanation's provenance)."
    )

    def _on_path(self, args: tuple, kwargs: dict, out: Any) -> bool:
        # RevealCancel tracks its variables itself (outputs do not require grad here)
        return any(self.is_var(t) for t in iter_tensors((args, kwargs))) and any(
            t.is_floating_point() for t in iter_tensors(out)
        )
