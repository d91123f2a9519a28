"""Layer-wise Relevance Propagation at the operation level.

The output relevance ``R = out * dT/dout`` (the target logit at its class, zero
elsewhere) is propagated back through every operation of the forward pass with
the rule the :class:`~perspicio.methods.propagation.composites.Composite` assigns
to it; the relevance arriving at the input is the explanation. See
``docs/propagation.md`` for the rule of each operation.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...core import kernels, ops
from ...core.batching import Engine
from ...core.explanation import Explanation
from ...core.registry import register_method
from ...core.targets import resolve_target, slice_target
from ...errors import ModelError, OptionError
from ..base import Method
from .affine import affine_op
from .canonizers import merged_batchnorm, model_state, propagation_module
from .composites import Composite, make_composite
from .engine import (
    ACT,
    AFFINE,
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
    op_name,
    propagating,
)
from .lrp_nodes import (
    AffineRule,
    LinearRule,
    PassRule,
    ProductRule,
    SoftmaxRule,
    SumRule,
    norm_linear_maps,
)
from .operations import dim_arg, lp_normalize_args, substitute
from .rules import Flat, RuleContext, ZBox


def nonneg_activation(call: Call) -> bool:
    """Is the output of this activation non-negative whatever its input (ReLU, ReLU6, sigmoid, a
    clamp with a lower bound >= 0, ...)? Read from :mod:`perspicio.core.ops`."""
    return ops.nonnegative_output(call.func, call.args, call.kwargs)


class LRPPropagator(Propagator):
    """Relevance propagation with the rules of a :class:`Composite`."""

    method = "lrp"
    supported = frozenset(
        {STRUCT, SCALE, SUM, REDUCE, AFFINE, PRODUCT, ACT, NORM, SOFTMAX, MAXPOOL}
    )

    def __init__(
        self,
        model: nn.Module,
        composite: Composite,
        x_in: Tensor,
        *,
        low: Tensor | None = None,
        high: Tensor | None = None,
        gradient_fallback: bool = False,
        record_layers: bool = False,
    ) -> None:
        super().__init__(model, gradient_fallback=gradient_fallback)
        self.record_layers = record_layers
        self.track_modules = bool(record_layers)  # per-operation labels name their module
        self.composite = composite
        self.x_in = x_in
        self.low, self.high = low, high
        self.n = x_in.shape[0]
        self.derived: dict[int, tuple[Tensor, Any]] = {id(x_in): (x_in, lambda t: t)}
        self.gates: dict[int, Tensor] = {}
        #: tensors the forward pass proved non-negative (kept alive so their ids stay unique)
        self.nonneg: dict[int, Tensor] = {}
        #: outputs of zero paddings -> (output, ones where the input was and zeros where padding is)
        self.padded: dict[int, tuple[Tensor, Any]] = {}
        self.records: list[tuple[str, Tensor, Tensor]] = []
        self.rules_used: dict[str, str] = {}
        self._reprs: dict[int, str] = {}

    def release(self) -> None:
        self.padded.clear()
        self.derived.clear()
        self.gates.clear()
        self.nonneg.clear()

    # ------------------------------------------------------------------ bookkeeping
    def record(self, label: str, R: Tensor, rel: tuple[Tensor, ...]) -> None:
        if not self.record_layers:
            return
        if (
            R.ndim == 0
            or R.shape[0] != self.n
            or any(r.ndim == 0 or r.shape[0] != self.n for r in rel)
        ):
            return
        with torch.no_grad():
            out_sum = R.sum(dim=tuple(range(1, R.ndim))) if R.ndim > 1 else R
            in_sum = sum(r.sum(dim=tuple(range(1, r.ndim))) if r.ndim > 1 else r for r in rel)
        self.records.append((label, out_sum, in_sum))

    def _describe(self, rule: Any) -> str:
        """``repr(rule)``, once per rule object and call (the same rule serves many layers)."""
        text = self._reprs.get(id(rule))
        if text is None:
            text = self._reprs[id(rule)] = repr(rule)
        return text

    def op_label(self, name: str) -> str:
        """Label of a parameter-free operation: only ``record_layers`` tables show it, so only then
        is its module looked up."""
        return self.label(name) if self.record_layers else name

    def _track(self, call: Call, out: Any) -> None:
        if not isinstance(out, Tensor):
            return
        tensors = [a for a in call.args if isinstance(a, Tensor)]
        derived = [a for a in tensors if id(a) in self.derived]
        if len(derived) == 1 and len(tensors) == 1:
            src = derived[0]
            prev = self.derived[id(src)][1]
            func, args, kwargs = call.func, call.args, call.kwargs

            def replay(base: Tensor, prev: Any = prev, src: Tensor = src) -> Tensor:
                return func(*substitute(args, {id(src): prev(base)}), **kwargs)

            self.derived[id(out)] = (out, replay)
        if any(id(a) in self.gates for a in tensors):
            self.gates[id(out)] = out
        if self.nonneg and tensors and all(id(a) in self.nonneg for a in tensors):
            short = call.name.rsplit(".", 1)[-1]
            value = (
                call.kwargs.get("value", call.args[3] if len(call.args) > 3 else 0.0)
                if short == "pad"
                else 0.0
            )
            value = 0.0 if value is None else value
            if (
                not ops.has_flag(call.func, ops.WRITES)
                and isinstance(value, (int, float))
                and value >= 0
            ):
                self.nonneg[id(out)] = out

    def _nonneg_if(self, src: Tensor, out: Tensor) -> Tensor:
        if id(src) in self.nonneg:
            self.nonneg[id(out)] = out
        return out

    def _context(self, x: Tensor, rule: Any) -> RuleContext:
        if id(x) not in self.derived:
            ones = None
            if id(x) in self.padded and isinstance(rule, Flat):
                with torch.no_grad():
                    ones = self.padded[id(x)][1]()
            return RuleContext(ones=ones, first=False, nonneg=id(x) in self.nonneg)
        replay = self.derived[id(x)][1]
        with torch.no_grad():
            ones = replay(torch.ones_like(self.x_in))
            low = replay(self.low) if isinstance(rule, ZBox) and self.low is not None else None
            high = replay(self.high) if isinstance(rule, ZBox) and self.high is not None else None
        return RuleContext(ones=ones, low=low, high=high, first=True, nonneg=id(x) in self.nonneg)

    # ------------------------------------------------------------------ rules per kind
    def on_struct(self, call: Call) -> Any:
        out = call.run()
        self._track(call, out)
        if ops.window(call.func) == ("pad", 0) and isinstance(out, Tensor):
            self._track_padding(call, out)
        return out

    def _track_padding(self, call: Call, out: Tensor) -> None:
        """Remember where a zero padding put zeros: flat and w^2 spread relevance over the inputs of
        a receptive field, and padding is no input - the same as a convolution's own padding,
        and as the padding of a fused twin, which folds ``F.pad`` into its convolution."""
        bound = dict(zip(("input", "pad", "mode", "value"), call.args))
        bound.update(call.kwargs)
        src = bound.get("input")
        if (
            not isinstance(src, Tensor)
            or bound.get("mode", "constant") != "constant"
            or bound.get("value") not in (None, 0, 0.0)
        ):
            return
        func, args, kwargs = call.func, call.args, call.kwargs

        def ones() -> Tensor:
            return func(*substitute(args, {id(src): torch.ones_like(src)}), **kwargs)

        self.padded[id(out)] = (out, ones)

    def on_maxpool(self, call: Call) -> Any:
        out = call.run()  # winner takes all: the gradient routes relevance to the maximum
        return self._nonneg_if(call.args[0], out) if isinstance(out, Tensor) and call.args else out

    def on_affine(self, call: Call) -> Any:
        op = affine_op(call, self.is_var)
        x = next(t for t in iter_tensors(call.args) if self.is_var(t))
        first = id(x) in self.derived
        module = self.param_names.get(id(op.weight))
        if (
            module is None
        ):  # a weight that is not a parameter of the model: the module calling the op
            current = self.current_module()
            module = current[0] if current is not None else ""
        rule = self.composite.rule_for(op.name, module, first)
        label = self.label(op.name, op.weight)
        self.rules_used[label] = self._describe(rule)
        return apply_node(AffineRule(self, call, op, rule, self._context(x, rule), label), x)

    def on_fused(self, call: Call) -> Any:
        """A fused convolution + activation: one node whose backward is the convolution's rule
        (the activation passes relevance through) when that rule does not read the convolution's
        output (z+, alpha-beta, flat, z^B); otherwise split into the two operations."""
        f = fused_call(call)
        if f is None or not self.is_var(f.x) or self.is_var(f.weight) or self.is_var(f.bias):
            return super().on_fused(call)
        x = f.x
        first = id(x) in self.derived
        module = self.param_names.get(id(f.weight))  # the fused module, at the convolution's name
        if module is None:
            current = self.current_module()
            module = current[0] if current is not None else ""
        rule = self.composite.rule_for("conv2d", module, first)
        if rule.uses_output:
            return super().on_fused(call)
        conv = Call(F.conv2d, f.conv_args(), {}, "torch.nn.functional.conv2d", AFFINE)
        op = affine_op(conv, self.is_var)
        label = f"{op.name} @ {module or '<model>'}"
        self.rules_used[label] = self._describe(rule)
        packed = kernels.packed_kernel(f.weight)
        if (
            packed is not None and len(call.args) >= 2 and call.args[1] is f.weight
        ):  # run on the packed kernel
            call = Call(call.func, (x, packed, *call.args[2:]), call.kwargs, call.name, call.kind)
        out = apply_node(AffineRule(self, call, op, rule, self._context(x, rule), label), x)
        if f.act is not None and nonneg_activation(
            Call(f.act, (x, *f.act_args), f.act_kwargs, op_name(f.act), ACT)
        ):
            self.nonneg[id(out)] = out
        return out

    def on_sum(self, call: Call, ar: Arith) -> Any:
        sign = 1.0 if ar.op == "add" else -1.0
        terms = [(1.0, ar.a), (sign * ar.alpha, ar.b)]
        variables = [(c, t) for c, t in terms if self.is_var(t)]
        if len(variables) == 2 and variables[0][1] is variables[1][1]:  # x + x
            variables = [(variables[0][0] + variables[1][0], variables[0][1])]
        node = SumRule(self, call, [c for c, _ in variables], self.op_label("add"))
        return apply_node(node, *[t for _, t in variables])

    def on_scale(self, call: Call, x: Tensor) -> Any:
        return apply_node(PassRule(self, call, self.op_label("scale")), x)

    def on_activation(self, call: Call) -> Any:
        x = call.args[0]
        out = apply_node(PassRule(self, call, self.op_label(call.name)), x)
        if nonneg_activation(call):
            self.nonneg[id(out)] = out
        return out

    def on_reduce(self, call: Call) -> Any:
        x = call.args[0]
        rest, kw = call.args[1:], call.kwargs
        func = call.func
        out = apply_node(
            LinearRule(self, call, lambda t: func(t, *rest, **kw), self.op_label(call.name)), x
        )
        return self._nonneg_if(x, out) if ops.has_flag(func, ops.KEEPS_SIGN) else out

    def on_norm(self, call: Call) -> Any:
        x = call.args[0] if call.args else call.kwargs["input"]
        if lp_normalize_args(call) is not None:
            # x / ||x||_p with the norm held constant is x times a constant: the identity rule
            # (AttnLRP's rule for 1/std), in every composite - relevance is conserved exactly
            return apply_node(PassRule(self, call, self.op_label(call.name)), x)
        if merged_batchnorm(call):
            return x  # merged into the preceding layer: an exact identity
        if self.composite.norm == "identity":
            return apply_node(PassRule(self, call, self.op_label(call.name)), x)
        fn, transpose = norm_linear_maps(call, x.detach())
        return apply_node(LinearRule(self, call, fn, self.op_label(call.name), transpose), x)

    def on_softmax(self, call: Call) -> Any:
        x = call.args[0] if call.args else call.kwargs["input"]
        out = apply_node(SoftmaxRule(self, call, dim_arg(call), self.op_label(call.name)), x)
        self.gates[id(out)] = out
        return out

    def on_product(self, call: Call) -> Any:
        variables = []
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
        a, b = variables
        node = ProductRule(
            self,
            call,
            (id(a), id(b)),
            (id(a) in self.gates, id(b) in self.gates),
            self.op_label(call.name),
        )
        return apply_node(node, a, b)


# ============================================================================ method


def default_bounds(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (dim 1) min and max of the batch, broadcast to its shape."""
    if x.ndim < 2:
        return x.min().expand_as(x), x.max().expand_as(x)
    dims = [d for d in range(x.ndim) if d != 1]
    return x.amin(dim=dims, keepdim=True).expand_as(x), x.amax(dim=dims, keepdim=True).expand_as(x)


def _bound(value: Any, x: Tensor, name: str) -> Tensor:
    try:
        t = torch.as_tensor(value, dtype=x.dtype, device=x.device)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise OptionError(
            f"{name} must be a number or a tensor; got {type(value).__name__}."
        ) from exc
    if t.ndim == 1 and x.ndim >= 2 and t.shape[0] == x.shape[1]:
        t = t.view(1, -1, *([1] * (x.ndim - 2)))
    try:
        return t.expand_as(x)
    except RuntimeError as exc:
        raise OptionError(
            f"{name} of shape {tuple(t.shape)} does not broadcast to the input {tuple(x.shape)}."
        ) from exc


@register_method(
    "lrp",
    family="propagation",
    needs_gradients=True,
    summary="LRP: relevance propagated back with per-operation rules (composites, canonizers)",
    paper="Bach et al., PLOS ONE 2015; Montavon et al., 2019",
)
class LRP(Method):
    """Layer-wise Relevance Propagation, operation by operation.

    ``composite``: preset name (``epsilon_plus_flat``, ``epsilon_plus``,
    ``epsilon_gamma_box``, ``epsilon_alpha2_beta1``, ``epsilon_alpha2_beta1_flat``) or a
    :class:`Composite`; ``rule``: one rule everywhere instead (``lrp0``, ``epsilon``,
    ``gamma``, ``alpha2_beta1``, ``zplus``, ``zbox``, ``flat``, ``wsquare`` or a Rule).
    ``epsilon``/``gamma`` parameterise the named rules; ``low``/``high`` bound the
    input for z^B (default: per-channel min/max of the batch); ``norm`` and
    ``attention`` override the composite's treatment of normalisation and
    attention; ``gradient_fallback`` lets operations without a rule pass their
    gradient (recorded in the provenance) instead of raising; ``record_layers``
    keeps the relevance entering and leaving every operation (per sample) in
    ``extras["layer_relevance"]`` for :func:`~perspicio.methods.propagation.conservation`
    (two reductions per operation, off by default for speed).
    """

    input_ndim = None

    def __init__(
        self,
        model: nn.Module,
        *,
        composite: Any = None,
        rule: Any = None,
        epsilon: float = 1e-6,
        gamma: float = 0.25,
        low: Any = None,
        high: Any = None,
        norm: str | None = None,
        attention: str | None = None,
        gradient_fallback: bool = False,
        record_layers: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(model, **common)
        self.record_layers = bool(record_layers)
        self.composite = make_composite(
            composite,
            rule,
            epsilon=epsilon,
            gamma=gamma,
            low=low,
            high=high,
            norm=norm,
            attention=attention,
        )
        self.low, self.high = low, high
        self.gradient_fallback = bool(gradient_fallback)

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        n = x.shape[0]
        dlow, dhigh = default_bounds(x)
        low = _bound(self.low, x, "low") if self.low is not None else dlow
        high = _bound(self.high, x, "high") if self.high is not None else dhigh
        scores, indices, out_rel, records, fallbacks = [], [], [], [], []
        rules_used: dict[str, str] = {}
        with ExitStack() as stack:
            module, merged, fused = self.model, 0, 0
            if (
                self.composite.merge_batchnorm
            ):  # the folded (and fused) twin, or the model with BatchNorms merged
                module, merged, fused = stack.enter_context(
                    propagation_module(self.model, x, model_state(self.model))
                )

            def run(start: int, stop: int) -> Tensor:
                xc = x[start:stop].detach().clone().requires_grad_(True)
                prop = LRPPropagator(
                    module,
                    self.composite,
                    xc,
                    low=low[start:stop],
                    high=high[start:stop],
                    gradient_fallback=self.gradient_fallback,
                    record_layers=self.record_layers,
                )
                with propagating(module, prop):
                    out = engine.forward(xc, module=module)
                tgt = resolve_target(
                    slice_target(target, start, stop, n), out.detach(), self.labels
                )
                s = tgt(out)
                if not out.requires_grad:
                    raise ModelError(
                        "the model output does not depend on the input: nothing to propagate."
                    )
                if tgt.indices is not None and len(tgt.indices) == out.shape[0]:  # class scores: R = the score
                    flat = torch.zeros_like(out.detach()).reshape(out.shape[0], -1)
                    idx = tgt.indices.to(out.device)[:, None]
                    R = flat.scatter_(1, idx, s.detach()[:, None]).reshape(out.shape)
                else:
                    g = torch.autograd.grad(s.sum(), out, retain_graph=True)[0]
                    R = (out * g).detach()
                try:
                    rel = engine.grad((out * R).sum(), [xc], stop - start)[0]
                except RuntimeError as exc:
                    raise ModelError(
                        f"relevance could not be propagated to the input: {exc}"
                    ) from exc
                scores.append(s.detach())
                indices.append(tgt.indices)
                out_rel.append(R.reshape(R.shape[0], -1).sum(1))
                records.append(prop.records)
                fallbacks.extend(f for f in prop.fallbacks if f not in fallbacks)
                rules_used.update(prop.rules_used)
                return rel.detach()

            attributions = engine.map(run, n, sample=x[:1], grad=True, description="LRP")
        targets = torch.cat(indices) if all(i is not None for i in indices) else None
        return Explanation(
            attributions=attributions,
            method=self.name,
            scores=torch.cat(scores),
            targets=targets,
            provenance={
                "composite": self.composite.describe(),
                "batchnorm_merged": merged,
                "convolutions_fused": fused,
                "gradient_fallback": tuple(fallbacks),
            },
            extras={
                "output_relevance": torch.cat(out_rel),
                "layer_relevance": merge_records(records),
                "rules": dict(rules_used),
            },
        )


def merge_records(chunks: list[list[tuple[str, Tensor, Tensor]]]) -> tuple[dict[str, Any], ...]:
    """Per-operation relevance sums of all chunks, in backward order: ({op, output, input}, ...)."""
    if not chunks:
        return ()
    length = len(chunks[0])
    if any(len(c) != length for c in chunks):
        return ()
    out = []
    for i in range(length):
        label = chunks[0][i][0]
        out.append(
            {
                "op": label,
                "output": torch.cat([c[i][1] for c in chunks]),
                "input": torch.cat([c[i][2] for c in chunks]),
            }
        )
    return tuple(out)
