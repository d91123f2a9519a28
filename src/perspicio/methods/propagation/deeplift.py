"""DeepLIFT (Rescale, RevealCancel) and DeepSHAP: the method classes, and how one DeepLIFT call
runs its two passes (:func:`deeplift_pairs`).

DeepLIFT explains ``f(x) - f(x0)`` for a reference ``x0``. Two forward passes
are paired operation by operation: the reference pass records the inputs and
outputs of every nonlinear operation, the input pass wraps each nonlinear
operation in an autograd node whose backward multiplies by the DeepLIFT
multiplier instead of the derivative. Linear operations (conv, linear, sums,
pooling averages, BatchNorm in eval mode, reshapes) keep their gradient, which
*is* the linear rule. Attributions are ``(x - x0) * multiplier``.

One question per file:

* :mod:`.deeplift_multipliers`: what each nonlinear operation multiplies by (the rules);
* :mod:`.deeplift_propagators`: how the reference pass and the input pass are paired;
* :mod:`.deeplift_reference`: when a recorded reference pass is reused (:data:`REFERENCE_CACHE`);
* :mod:`.deeplift_denormals`: how ``x == x0`` is found when the CPU flushes subnormals;
* this module: the methods ``deeplift`` and ``deep_shap``.

The pairing requires the same operations, in the same order, in both passes
(no input-dependent control flow); a mismatch is reported as an error.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ...core.baselines import black_value, check_baseline, make_baseline
from ...core.batching import Engine
from ...core.explanation import Explanation
from ...core.options import check_choice, check_int
from ...core.registry import register_method
from ...core.targets import resolve_target, row_scores, slice_target
from ...errors import ModelError, OptionError
from ..base import Method
from .canonizers import model_state, propagation_module
from .deeplift_propagators import DeepLiftPropagator, RevealCancelPropagator
from .deeplift_reference import REFERENCE_CACHE
from .engine import propagating

RULES = ("rescale", "reveal_cancel")


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


def _check_rule(rule: str) -> str:
    return check_choice("rule", rule.strip().lower().replace("-", "_") if isinstance(rule, str) else rule, RULES)


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
                    holder["tgt"] = resolve_target(slice_target(target, start, stop, n), out.detach(), self.labels)
                return row_scores(holder["tgt"], out)

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
        return Explanation(
            attributions=attributions, method=self.name, scores=torch.cat(scores), targets=targets,
            base_value=torch.cat(bases),
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
        check_int("samples", samples, minimum=1)
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
        sample_of = torch.arange(n, device=x.device).repeat_interleave(B)
        bases, fallbacks = [], []
        state = model_state(self.model)
        hits = [0]

        def run(start: int, stop: int) -> Tensor:
            rows = sample_of[start:stop]
            xs = x[rows]
            x0s = bg[torch.arange(start, stop, device=x.device) % B]

            def score(out: Tensor, which: str, rows: Tensor = rows) -> Tensor:
                return row_scores(tgt, out, rows)

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
        return Explanation(
            attributions=attributions, method=self.name, scores=scores_x, targets=idx, base_value=base_value,
            provenance={"rule": self.rule, "background_size": B, "gradient_fallback": tuple(fallbacks),
                        "cached_references": hits[0], "convolutions_fused": fused},
            extras={"background": bg},
        )
