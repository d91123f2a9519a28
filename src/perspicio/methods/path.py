"""Path attributions: Integrated Gradients (input, layer, neuron) and Expected Gradients / GradientSHAP.

Integrated Gradients (Sundararajan et al., ICML 2017) attributes
``f(x) - f(x')`` to the features along the straight path from a baseline ``x'``:

    IG_i(x) = (x_i - x'_i) * integral_0^1 df/dx_i (x' + a (x - x')) da

The integral is a quadrature ``sum_k w_k g(a_k)`` over ``steps`` nodes (left, right
or middle Riemann sums, the trapezoid rule, Gauss-Legendre, the default: exact
for polynomials of degree 2*steps - 1, or ``"adaptive"``). All ``N * steps`` path
points go through the shared :class:`~perspicio.core.batching.Engine`; with the
fixed rules gradients are accumulated in place, so memory is one chunk however
many steps are used. ``steps`` is at most 4096 for Gauss-Legendre (nodes computed by
Newton's method on the Legendre recurrence, O(steps^2)) and 100000 for the other rules.

On ReLU/ReLU6 networks the integrand ``g(a) = grad f(b + a (x - b)) . (x - b)`` is
piecewise constant with many jumps, and on the bundled EfficientNet-Lite0 with the
zero baseline they crowd into the first ~5% of the path (|g| up to several hundred
there, ~3 elsewhere; docs/benchmarks.md). No fixed rule handles that well. The
``"adaptive"`` rule places the nodes where the integrand is rough: every node's
forward pass also gives ``f`` at the node, so the exact integral of each panel
between two nodes is known for free and measures the panel's quadrature error; the
worst panels are bisected round by round (composite trapezoid on the final mesh,
same weights for every feature: a true quadrature, no rescaling; it keeps the node
gradients until the mesh is final, ``steps`` input-sized tensors per input).

Deliberate difference from Captum: our trapezoid rule uses the textbook weights
(1/(n-1), halved at both ends; they sum to 1), Captum's use 1/n (summing to
(n-1)/n), so its trapezoid attributions are smaller by (n-1)/n. The other rules
match Captum's exactly.

Completeness (sum_i IG_i = f(x) - f(x')) is checked in every call: the
Explanation's ``base_value`` is f(x'), its provenance holds the absolute and
relative completeness errors, and :func:`completeness_error` recomputes them
(optionally re-running the model) as its own call.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..core.baselines import black_value, check_baseline, make_baseline
from ..core.batching import DEFAULT_MEMORY_BUDGET, Engine
from ..core.blackbox import unwrap_model
from ..core.capture import Capture, auto_layer, resolve_layer
from ..core.explanation import Explanation
from ..core.guard import model_guard
from ..core.inputs import as_batch
from ..core.options import check_choice, check_float, check_int
from ..core.outputs import OutputSelector
from ..core.registry import register_method
from ..core.targets import ResolvedTarget, check_target_count, resolve_target, row_scores
from ..errors import ConvergenceWarning, LayerError, OptionError
from .base import Method
from .gradient import NeuronObjective, gradient_inputs, no_target, target_grads

#: quadrature rule names (Captum's spellings are accepted as aliases)
QUADRATURES = ("gauss_legendre", "left", "right", "middle", "trapezoid", "adaptive")
#: adaptive rule: initial uniform panels, and panels bisected per input and round
ADAPTIVE_START_PANELS = 4
ADAPTIVE_PER_ROUND = (4, 8)  # (min, max); a round fills one engine chunk when there are few inputs
_ALIASES = {
    "gausslegendre": "gauss_legendre",
    "gauss-legendre": "gauss_legendre",
    "gl": "gauss_legendre",
    "riemann_left": "left",
    "riemann_right": "right",
    "riemann_middle": "middle",
    "riemann_trapezoid": "trapezoid",
    "trapezoidal": "trapezoid",
}


# ============================================================================ quadrature


#: largest ``steps`` of the Gauss-Legendre rule. Its nodes cost O(steps^2) to compute (0.15 s
#: at the bound), and beyond a few hundred nodes it gains nothing on the piecewise-smooth
#: integrands of real networks; use the cheap rules (or "adaptive") for dense reference paths.
MAX_GAUSS_LEGENDRE_STEPS = 4096
#: largest ``steps`` of every other rule: each node is a forward and backward pass per input.
MAX_STEPS = 100_000


def check_steps(steps: Any, rule: str = "left") -> int:
    """``steps`` as validated by every path method: an integer in 1..:data:`MAX_STEPS`
    (1..:data:`MAX_GAUSS_LEGENDRE_STEPS` for ``rule="gauss_legendre"``)."""
    check_int("steps", steps, minimum=1)
    if rule == "gauss_legendre" and steps > MAX_GAUSS_LEGENDRE_STEPS:
        raise OptionError(
            f"steps={steps} is above the limit of {MAX_GAUSS_LEGENDRE_STEPS} Gauss-Legendre nodes "
            "(more gain nothing on a network's integrand); use fewer, or quadrature='adaptive' / "
            "'middle' for a dense path."
        )
    if steps > MAX_STEPS:
        raise OptionError(
            f"steps={steps} is above the limit of {MAX_STEPS} path nodes (each node is a forward and "
            f"backward pass per input); use at most {MAX_STEPS}."
        )
    return int(steps)


def gauss_legendre(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Gauss-Legendre nodes (ascending) and weights on [-1, 1] in O(n^2) time and O(n) memory.

    Newton's method on P_n, evaluated with the three-term recurrence
    (j + 1) P_{j+1} = (2j + 1) x P_j - j P_{j-1}, started from the asymptotic guesses
    x_k = (1 - 1/(8 n^2) + 1/(8 n^3)) cos(pi (4k - 1) / (4n + 2)) of the roots in [0, 1); the other
    half follows by symmetry. Weights 2 / ((1 - x^2) P_n'(x)^2).
    """
    half = (n + 1) // 2
    k = np.arange(1, half + 1, dtype=np.float64)
    x = (1 - 1 / (8 * n**2) + 1 / (8 * n**3)) * np.cos(np.pi * (4 * k - 1) / (4 * n + 2))

    def legendre(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p_prev, p = np.ones_like(x), x.copy()
        for j in range(1, n):
            p_prev, p = p, ((2 * j + 1) * x * p - j * p_prev) / (j + 1)
        return p, n * (p_prev - x * p) / (1 - x * x)  # P_n and P_n'

    for _ in range(100):
        p, dp = legendre(x)
        step = p / dp
        x = x - step
        if np.abs(step).max() < 1e-15:
            break
    _, dp = legendre(x)  # derivative at the converged roots
    w = 2 / ((1 - x * x) * dp * dp)
    if n % 2:  # the middle root is 0 exactly
        x[-1] = 0.0
    nodes = np.concatenate([-x, x[::-1][n % 2 :]])
    weights = np.concatenate([w, w[::-1][n % 2 :]])
    return nodes, weights


def quadrature_nodes(rule: str, steps: int) -> tuple[Tensor, Tensor]:
    """Nodes ``alphas`` in [0, 1] and weights (summing to 1) of ``rule`` with ``steps`` nodes (float64).

    ``steps`` must be in 1..:data:`MAX_STEPS`, for Gauss-Legendre 1..:data:`MAX_GAUSS_LEGENDRE_STEPS`
    (:class:`~perspicio.errors.OptionError` otherwise).
    """
    rule = normalize_rule(rule)
    steps = check_steps(steps, rule)
    k = np.arange(steps, dtype=np.float64)
    if rule == "adaptive":  # the starting nodes; the rule places the others (see _adaptive_path)
        if steps < 2:
            raise OptionError(f"the adaptive rule needs steps >= 2; got {steps}.")
        return quadrature_nodes("trapezoid", min(steps, ADAPTIVE_START_PANELS + 1))
    if rule == "gauss_legendre":
        nodes, weights = gauss_legendre(steps)
        alphas, weights = (nodes + 1) / 2, weights / 2
    elif rule == "left":
        alphas, weights = k / steps, np.full(steps, 1 / steps)
    elif rule == "right":
        alphas, weights = (k + 1) / steps, np.full(steps, 1 / steps)
    elif rule == "middle":
        alphas, weights = (k + 0.5) / steps, np.full(steps, 1 / steps)
    else:  # trapezoid
        if steps < 2:
            raise OptionError(f"the trapezoid rule needs steps >= 2; got {steps}.")
        alphas = k / (steps - 1)
        weights = np.full(steps, 1 / (steps - 1))
        weights[0] = weights[-1] = 0.5 / (steps - 1)
    return torch.from_numpy(np.ascontiguousarray(alphas)), torch.from_numpy(
        np.ascontiguousarray(weights)
    )


def normalize_rule(rule: str) -> str:
    key = str(rule).strip().lower().replace(" ", "_")
    key = _ALIASES.get(key, key)
    return check_choice("quadrature", key, QUADRATURES)


def _generator(seed: Any) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _check_seed(seed: Any) -> int:
    return check_int("seed", seed)


# ============================================================================ completeness


def completeness_error(
    explanation: Explanation, model: Any = None, *, relative: bool = False
) -> Tensor:
    """Per-sample |sum(attributions) - (f(x) - f(baseline))|, the IG completeness gap.

    Without ``model`` the scores recorded in the explanation are used; with it, f(x)
    and f(baseline) are recomputed from ``explanation.inputs`` and the stored baseline
    (an independent check of the recorded values). ``relative`` divides by |f(x) - f(baseline)|.
    """
    base = explanation.base_value
    if base is None:
        raise OptionError(
            f"explanation of method {explanation.method!r} has no base value (not a path method)."
        )
    fx, fb = explanation.scores, base
    if model is not None:
        fx, fb = _recompute_scores(explanation, model)
    total = explanation.attributions.detach().reshape(len(explanation), -1).sum(1).double()
    gap = fx.double() - fb.double()
    err = (total - gap).abs()
    if relative:
        err = err / gap.abs().clamp_min(1e-12)
    return err


def _recompute_scores(explanation: Explanation, model: Any) -> tuple[Tensor, Tensor]:
    net, labels = unwrap_model(model)
    baseline = explanation.extras.get("baseline")
    if baseline is None or explanation.inputs is None:
        raise OptionError(
            "the explanation does not carry its inputs and baseline; call without model=."
        )
    if explanation.extras.get("background") is not None:
        raise OptionError(
            "GradientSHAP's base value is an average over a background set; call without model=."
        )
    x = explanation.inputs
    neuron = explanation.extras.get("neuron_objective")
    with model_guard(net), torch.no_grad():
        if neuron is not None:
            eng = Engine(net)
            rows = torch.arange(len(x))
            return neuron.scores(x, rows, eng).detach(), neuron.scores(baseline, rows, eng).detach()
        select = OutputSelector(
            explanation.options.get("output")
        )  # the tensor the method explained
        out_x, out_b = select(net(x), len(x)), select(net(baseline))
    if explanation.targets is not None:
        tgt = ResolvedTarget(fn=lambda o: o, indices=explanation.targets, description="")
    else:
        fn = explanation.extras.get("target_fn")
        if fn is None:
            raise OptionError(
                "the explanation's callable target was not recorded; call without model=."
            )
        tgt = ResolvedTarget(fn=fn, indices=None, description="")
    rows = torch.arange(len(x))
    return row_scores(tgt, out_x, rows), row_scores(tgt, out_b, rows)


#: relative completeness error above which IG warns (ConvergenceWarning)
COMPLETENESS_TOLERANCE = 0.01
#: ``steps="auto"`` (Integrated Gradients' default): the adaptive rule refines the path until every
#: relative completeness error is at most ``tolerance`` or this many nodes are used
AUTO_MAX_STEPS = 256


def _completeness_provenance(
    attr: Tensor,
    fx: Tensor,
    fb: Tensor,
    *,
    method: str | None = None,
    steps: int | None = None,
    tolerance: float = COMPLETENESS_TOLERANCE,
    auto: bool = False,
) -> dict[str, Any]:
    """Completeness errors per sample; with ``method``, warn when one exceeds 1% of |f(x) - f(b)|:
    the path integral was not resolved by the chosen steps (the attributions are then not what
    the paper defines, however plausible they look)."""
    total = attr.reshape(len(attr), -1).sum(1).double()
    gap = fx.double() - fb.double()
    err = (total - gap).abs()
    rel = (err / gap.abs().clamp_min(1e-12)).tolist()
    worst = max(rel, default=0.0)
    if method is not None and worst > tolerance:
        remedy = (
            f"steps='auto' stopped at its cap of {steps} path nodes - pass steps=1024 (with "
            "quadrature='adaptive') or a baseline closer to the input (e.g. 'blur')"
            if auto
            else "use steps='auto' (refines until the error is below the tolerance), raise steps, or use a "
            "baseline closer to the input (e.g. 'blur')"
        )
        warnings.warn(
            f"{method}: relative completeness error {worst:.2%} (> {tolerance * 100:.3g}%) with {steps} steps; "
            f"the path integral is not resolved: {remedy}. Per-sample errors: "
            "provenance['relative_completeness_error'].",
            ConvergenceWarning,
            stacklevel=5,
        )  # the caller of perspicio.explain
    return {"completeness_error": err.tolist(), "relative_completeness_error": rel}


# ============================================================================ Integrated Gradients


class _PathBase(Method):
    """Options and baseline handling shared by the IG variants: any float batch (N, ...)."""

    input_ndim = None

    def _prepare_inputs(self, inputs: Any) -> Any:
        return gradient_inputs(self, inputs)

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int = 50,
        baseline: Any = "zero",
        quadrature: str = "gauss_legendre",
        seed: int = 0,
        **common: Any,
    ) -> None:
        black = black_value(model)
        super().__init__(model, **common)
        quadrature_nodes(quadrature, steps)  # validates steps and the rule
        check_baseline(baseline)
        self.steps = steps
        self.baseline = baseline
        self.quadrature = normalize_rule(quadrature)
        self.seed = _check_seed(seed)
        self._black = black

    def _baseline(self, x: Tensor) -> Tensor:
        return make_baseline(self.baseline, x, black=self._black, generator=_generator(self.seed))

    def _nodes(self, x: Tensor) -> tuple[Tensor, Tensor]:
        alphas, weights = quadrature_nodes(self.quadrature, self.steps)
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        return alphas.to(x.device, dtype), weights.to(x.device, dtype)

    def _provenance(self) -> dict[str, Any]:
        return {"steps": self.steps, "quadrature": self.quadrature}


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.view(-1, *[1] * (like.ndim - 1))


@register_method(
    "integrated_gradients",
    family="path",
    needs_gradients=True,
    summary="Integrated Gradients: path integral of gradients from a baseline (completeness checked)",
    paper="Sundararajan et al., ICML 2017",
)
class IntegratedGradients(_PathBase):
    """IG with the baselines of :mod:`perspicio.core.baselines` and quadrature rules
    left/right/middle Riemann, trapezoid, Gauss-Legendre (as in Captum) or
    ``"adaptive"`` (nodes refined where the integrand is rough, see the module notes;
    its final mesh is in ``provenance["nodes"]``).

    ``steps="auto"`` (the default) refines the adaptive rule until every relative
    completeness error is at most ``tolerance`` (default 1%) or :data:`AUTO_MAX_STEPS`
    nodes are used; the error reached and the nodes spent are in the provenance, and a
    :class:`~perspicio.errors.ConvergenceWarning` is raised only when the cap is hit first.
    An integer ``steps`` uses that many nodes of ``quadrature`` (default Gauss-Legendre).

    ``base_value`` is f(baseline); provenance records the completeness error.
    Several targets per input share the path: one forward pass per path point and
    one backward pass per target.
    """

    shares_forward_across_targets = True

    def __init__(
        self,
        model: nn.Module,
        *,
        steps: int | str = "auto",
        quadrature: str | None = None,
        tolerance: float = COMPLETENESS_TOLERANCE,
        **options: Any,
    ) -> None:
        self.auto = isinstance(steps, str)
        if self.auto:
            if str(steps).strip().lower() != "auto":
                raise OptionError(f"steps must be a positive integer or 'auto'; got {steps!r}.")
            if quadrature is not None and normalize_rule(quadrature) != "adaptive":
                raise OptionError(
                    f"steps='auto' refines the adaptive rule; quadrature={quadrature!r} needs an "
                    "integer steps (e.g. steps=50)."
                )
            steps, quadrature = AUTO_MAX_STEPS, "adaptive"
        check_float("tolerance", tolerance, minimum=0.0)
        self.tolerance = float(tolerance)
        super().__init__(model, steps=steps, quadrature=quadrature or "gauss_legendre", **options)

    def _provenance(self) -> dict[str, Any]:
        return {
            **super()._provenance(),
            **({"steps": "auto", "max_steps": self.steps} if self.auto else {}),
        }

    def _explain(
        self, x: Tensor, target: Any, engine: Engine, targets_per_input: int = 1
    ) -> Explanation:
        per = targets_per_input
        # rows come in groups of `per` copies of one input: one path per input, `per` backward passes
        xu = x[::per] if per > 1 else x
        bu = self._baseline(xu)
        tgt, fx, fb = self._endpoints(xu, bu, target, engine, per)
        b = bu.repeat_interleave(per, dim=0) if per > 1 else bu
        n, steps = len(xu), self.steps
        alphas, weights = self._nodes(x)
        diff, du = x - b, xu - bu
        total = torch.zeros_like(x)

        def chunk(start: int, stop: int) -> None:
            js = torch.arange(start, stop, device=x.device)
            ni, ki = js // steps, js % steps
            pts = (bu[ni] + _bcast(alphas[ki], x) * du[ni]).requires_grad_(True)
            s = self._scores(pts, ni, tgt, engine, per)
            w = _bcast(weights[ki], x)
            for t, g in enumerate(target_grads(engine, s, pts, per)):
                total.index_add_(0, ni * per + t, g * w)

        if self.quadrature == "adaptive":
            total, mesh = self._adaptive_path(x, bu, du, tgt, fx, fb, engine, per)
        else:
            engine.run(chunk, n * steps, sample=x[:1], grad=True, description=self.name)
        attr = (diff * total).detach()
        indices = tgt.indices if isinstance(tgt, ResolvedTarget) else tgt.channels
        extras: dict[str, Any] = {"baseline": b}
        if isinstance(tgt, ResolvedTarget) and tgt.indices is None:
            extras["target_fn"] = tgt.fn
        if not isinstance(tgt, ResolvedTarget):
            extras["neuron_objective"] = tgt
        used = max(len(m) for m in mesh) if self.quadrature == "adaptive" else self.steps
        prov = {
            **self._provenance(),
            **_completeness_provenance(
                attr, fx, fb, method=self.name, steps=used, tolerance=self.tolerance, auto=self.auto
            ),
        }
        if self.quadrature == "adaptive":
            prov["nodes"] = mesh
            prov["nodes_used"] = [len(m) for m in mesh]
        if not isinstance(tgt, ResolvedTarget):
            prov["neuron"] = tgt.describe()
        return Explanation(
            attributions=attr,
            method=self.name,
            scores=fx,
            base_value=fb,
            targets=indices,
            layer=tgt.layer_name if not isinstance(tgt, ResolvedTarget) else None,
            provenance=prov,
            extras=extras,
        )

    def _adaptive_path(
        self,
        x: Tensor,
        bu: Tensor,
        du: Tensor,
        tgt: Any,
        fx: Tensor,
        fb: Tensor,
        engine: Engine,
        per: int,
    ) -> tuple[Tensor, list[list[float]]]:
        """The adaptive rule: composite trapezoid on a mesh refined where the integrand is rough.

        Every node is a gradient evaluation whose forward pass also gives ``f`` at the node,
        so the exact integral of each panel, ``f(b + a_r d) - f(b + a_l d)``, is known for free.
        Starting from 4 equal panels, each round bisects the 4-8 panels (per input) whose
        trapezoid value is furthest from their exact integral (the scalar error of the panel;
        summed over the targets, relative to each target's |f(x) - f(x')|) until ``steps``
        nodes are used. The weights are the trapezoid weights of the final mesh, the same
        for every feature: a plain quadrature (no rescaling), converging to the IG integral
        as the mesh refines. Node gradients are kept until the mesh is final, at most a
        quarter of the memory budget: beyond that many nodes, the remaining ones are spread
        over the panels in proportion to their errors in one last round (equally spaced
        inside each panel, accumulated in place).
        Returns the weighted gradient sums (rows of ``x``) and each input's final mesh.
        """
        n, steps = len(bu), self.steps
        start, _ = quadrature_nodes("adaptive", steps)
        node_bytes = per * du[0].numel() * du.element_size()
        budget = (self.memory_budget or DEFAULT_MEMORY_BUDGET) // 4
        cap = min(steps, max(len(start), budget // max(1, n * node_bytes)))
        nodes: list[list[float]] = [start.tolist() for _ in range(n)]
        grads: list[dict[float, Tensor]] = [{} for _ in range(n)]
        fvals: list[dict[float, Tensor]] = [{} for _ in range(n)]
        svals: list[dict[float, Tensor]] = [{} for _ in range(n)]
        gap = (fx.double() - fb.double()).abs().clamp_min(1e-12).view(n, per)
        lo, hi = ADAPTIVE_PER_ROUND
        per_round = min(hi, max(lo, engine.chunk_size(x[:1], grad=True) // n))
        total = torch.zeros((n * per, *du.shape[1:]), dtype=du.dtype, device=du.device)

        def evaluate(todo: list[tuple[int, float, float | None]]) -> None:
            """Gradients at (input, alpha, weight): stored when weight is None, else accumulated."""
            ai = torch.tensor([i for i, _, _ in todo], device=x.device)
            aa = torch.tensor([a for _, a, _ in todo], dtype=du.dtype, device=x.device)

            def chunk(start: int, stop: int) -> None:
                ni, al = ai[start:stop], aa[start:stop]
                pts = (bu[ni] + _bcast(al, du) * du[ni]).requires_grad_(True)
                s = self._scores(pts, ni, tgt, engine, per)
                g = torch.stack(target_grads(engine, s, pts, per), 1).detach()  # (points, per, ...)
                sv = (g * du[ni].unsqueeze(1)).reshape(len(ni), per, -1).sum(2).double()
                fv = s.detach().double().view(len(ni), per)
                for j in range(len(ni)):
                    i, a, w = todo[start + j]
                    if w is None:
                        grads[i][a], fvals[i][a], svals[i][a] = g[j], fv[j], sv[j]
                    else:
                        total[i * per : (i + 1) * per] += w * g[j]

            engine.run(chunk, len(todo), sample=x[:1], grad=True, description=self.name)

        def panel_errors(i: int) -> tuple[list[float], np.ndarray, Tensor]:
            a = sorted(nodes[i])
            sv = torch.stack([svals[i][v] for v in a])
            fv = torch.stack([fvals[i][v] for v in a])
            h = np.diff(a)
            err = (
                (sv[1:] + sv[:-1]) / 2 * torch.from_numpy(h)[:, None] - (fv[1:] - fv[:-1])
            ).abs() / gap[i]
            return a, h, err.sum(1)

        def completeness(i: int) -> Tensor:
            """Signed relative completeness error of the composite trapezoid on input ``i``'s mesh,
            per target (the same sum the final attributions have)."""
            a = sorted(nodes[i])
            sv = torch.stack([svals[i][v] for v in a])
            fv = torch.stack([fvals[i][v] for v in a])
            h = torch.from_numpy(np.diff(a))[:, None]
            return (((sv[1:] + sv[:-1]) / 2 * h).sum(0) - (fv[-1] - fv[0])) / gap[i]

        new = [list(a) for a in nodes]
        done = [False] * n  # steps="auto": the input's completeness error is within the tolerance
        while any(new):
            evaluate([(i, a, None) for i in range(n) for a in new[i]])
            new = [[] for _ in range(n)]
            for i in range(n):
                if self.auto:
                    done[i] = float(completeness(i).abs().max()) <= self.tolerance
                room = cap - len(nodes[i])
                if room > 0 and not done[i]:
                    a, _, err = panel_errors(i)
                    worst = torch.argsort(err, descending=True, stable=True)[
                        : min(per_round, room)
                    ].tolist()
                    new[i] = [(a[k] + a[k + 1]) / 2 for k in worst]
                    nodes[i].extend(new[i])
        last: list[tuple[int, float, float | None]] = []
        for i in range(n):
            a, h, err = panel_errors(i)
            extra = np.zeros(len(h), dtype=np.int64)
            if (
                steps > len(a) and not done[i]
            ):  # the last round: the remaining nodes in proportion to the panel errors
                share = (
                    (err / err.sum()).numpy() * (steps - len(a))
                    if float(err.sum()) > 0
                    else np.full(len(h), (steps - len(a)) / len(h))
                )
                extra = np.floor(share).astype(np.int64)
                extra[
                    np.argsort(-(share - extra), kind="stable")[: steps - len(a) - int(extra.sum())]
                ] += 1
            sub = h / (extra + 1)
            w = np.zeros(len(a))
            w[:-1] += sub / 2
            w[1:] += sub / 2
            for k, v in enumerate(a):
                total[i * per : (i + 1) * per] += float(w[k]) * grads[i][v]
            for k in range(len(h)):
                last += [(i, a[k] + j * sub[k], float(sub[k])) for j in range(1, int(extra[k]) + 1)]
                nodes[i] += [a[k] + j * sub[k] for j in range(1, int(extra[k]) + 1)]
            grads[i].clear()
        if last:
            evaluate(last)
        return total, [sorted(m) for m in nodes]

    def _endpoints(
        self, x: Tensor, b: Tensor, target: Any, engine: Engine, per: int = 1
    ) -> tuple[Any, Tensor, Tensor]:
        """Resolve the target and compute f(x), f(baseline) in one chunked no-grad pass
        (``per`` targets per input: the target and the scores have ``len(x) * per`` rows)."""
        n = len(x)
        check_target_count(target, n * per)
        both = torch.cat([x, b])
        out = engine.map(
            lambda s, e: engine.forward(both[s:e]), 2 * n, sample=x[:1], description="endpoints"
        )
        if per > 1:
            out = torch.cat(
                [out[:n].repeat_interleave(per, dim=0), out[n:].repeat_interleave(per, dim=0)]
            )
        m = n * per
        tgt = resolve_target(target, out[:m], self.labels)
        rows = torch.arange(m, device=out.device)
        return tgt, row_scores(tgt, out[:m], rows).detach(), row_scores(tgt, out[m:], rows).detach()

    def _scores(self, pts: Tensor, rows: Tensor, tgt: Any, engine: Engine, per: int = 1) -> Tensor:
        """Scores at the path points ``pts`` (of inputs ``rows``): ``len(pts) * per`` values,
        row ``j * per + t`` for target ``t`` of point ``j``."""
        out = engine.forward(pts)
        if per > 1:
            rows = (rows[:, None] * per + torch.arange(per, device=rows.device)).reshape(-1)
            out = out.repeat_interleave(per, dim=0)
        return row_scores(tgt, out, rows)


@register_method(
    "neuron_integrated_gradients",
    family="path",
    needs_gradients=True,
    needs_layer=True,
    summary="Neuron Integrated Gradients: IG of one unit/channel of a layer w.r.t. the input",
    paper="Sundararajan et al., ICML 2017; Dhamdhere et al., ICLR 2019",
)
class NeuronIntegratedGradients(IntegratedGradients):
    """IG where the explained scalar is a unit or channel of ``layer`` (see
    :class:`~perspicio.methods.gradient.NeuronObjective`); the model runs only up to
    the layer. Completeness holds for the neuron's value. ``target`` must be None."""

    targets_are_classes = False  # targets are the explained channels

    def __init__(
        self, model: nn.Module, layer: Any = None, *, neuron: Any = None, **options: Any
    ) -> None:
        super().__init__(model, **options)
        self._neuron = NeuronObjective(self.model, layer, neuron)

    def _endpoints(
        self, x: Tensor, b: Tensor, target: Any, engine: Engine, per: int = 1
    ) -> tuple[Any, Tensor, Tensor]:
        no_target(self, target)
        obj = self._neuron
        obj.prepare(x, engine)
        rows = torch.arange(len(x), device=x.device)
        fx = engine.map(lambda s, e: obj.scores(x[s:e], rows[s:e], engine), len(x), sample=x[:1])
        fb = engine.map(lambda s, e: obj.scores(b[s:e], rows[s:e], engine), len(x), sample=x[:1])
        return obj, fx.detach(), fb.detach()

    def _scores(self, pts: Tensor, rows: Tensor, tgt: Any, engine: Engine, per: int = 1) -> Tensor:
        return tgt.scores(pts, rows, engine)


@register_method(
    "layer_integrated_gradients",
    family="path",
    needs_gradients=True,
    needs_layer=True,
    summary="Layer Integrated Gradients: IG over a layer's output (e.g. an embedding layer)",
    paper="Sundararajan et al., ICML 2017; Dhamdhere et al., ICLR 2019",
)
class LayerIntegratedGradients(_PathBase):
    """IG along the straight path between the layer's outputs at the baseline and at the
    input: the layer output is replaced by ``a(x') + alpha (a(x) - a(x'))`` while the model
    runs on ``x``. Attributions have the layer output's shape. Integer inputs (token ids)
    are accepted, with an id-tensor baseline (default: zeros, e.g. the pad id)."""

    def __init__(self, model: nn.Module, layer: Any = None, **options: Any) -> None:
        super().__init__(model, **options)
        if self.quadrature == "adaptive":
            raise OptionError(
                "quadrature 'adaptive' is available for integrated_gradients; "
                "layer_integrated_gradients takes a fixed rule (e.g. 'gauss_legendre')."
            )
        self.layer_spec = layer
        self._layer = resolve_layer(self.model, layer) if layer not in (None, "auto") else None

    def _prepare_inputs(self, inputs: Any) -> Any:
        return as_batch(inputs, self.model, ndim=None, keep_integer=True)

    shares_forward_across_targets = True

    def _explain(
        self, x: Tensor, target: Any, engine: Engine, targets_per_input: int = 1
    ) -> Explanation:
        per = targets_per_input
        x = x[::per]  # the rows came as `per` copies of each input (several targets per input)
        n, steps = len(x), self.steps
        if self._layer is None:
            if not x.is_floating_point() or x.ndim != 4:
                raise LayerError("layer_integrated_gradients needs layer=... for non-image inputs.")
            self._layer = resolve_layer(self.model, auto_layer(self.model, x))
        name, module = self._layer
        check_target_count(target, n * per)
        b = self._baseline(x)
        both = torch.cat([x, b])
        acts: list[Tensor] = []
        calls: list[int] = []

        def endpoints(s: int, e: int) -> Tensor:
            with Capture([module]) as cap:
                out = engine.forward(both[s:e])
            calls.append(len(cap.outputs[0]))
            acts.append(cap.last(0))
            return out

        out = engine.map(endpoints, 2 * n, sample=x[:1], description="endpoints")
        if max(calls) != 1:
            raise LayerError(
                f"layer {name!r} runs {max(calls)} times per forward pass; pick a layer called once."
            )
        act = torch.cat(acts)
        ax, ab = act[:n], act[n:]
        du, bu = (
            ax - ab,
            ab,
        )  # the path, per input (keeps the layer's memory format, hence its rounding)
        if per > 1:
            out = out.repeat_interleave(per, dim=0)
            ax, ab, b = (t.repeat_interleave(per, dim=0) for t in (ax, ab, b))
        m = n * per
        tgt = resolve_target(target, out[:m], self.labels)
        rows = torch.arange(m, device=out.device)
        fx, fb = row_scores(tgt, out[:m], rows).detach(), row_scores(tgt, out[m:], rows).detach()
        alphas, weights = self._nodes(ax)
        diff = ax - ab
        total = torch.zeros_like(ax)
        offsets = torch.arange(per, device=x.device)

        def chunk(start: int, stop: int) -> None:
            js = torch.arange(start, stop, device=x.device)
            ni, ki = js // steps, js % steps
            pts = (bu[ni] + _bcast(alphas[ki], ax) * du[ni]).requires_grad_(True)
            with Capture([module], transform=lambda i, t: pts, store=False):
                out = engine.forward(x[ni])
            if per > 1:
                out = out.repeat_interleave(per, dim=0)
            s = row_scores(tgt, out, (ni[:, None] * per + offsets).reshape(-1))
            w = _bcast(weights[ki], ax)
            for t, g in enumerate(target_grads(engine, s, pts, per)):
                total.index_add_(0, ni * per + t, g * w)

        engine.run(chunk, n * steps, sample=x[:1], grad=True, description=self.name)
        attr = (diff * total).detach()
        extras: dict[str, Any] = {"baseline": b, "layer_baseline": ab, "layer_input": ax}
        if tgt.indices is None:
            extras["target_fn"] = tgt.fn
        return Explanation(
            attributions=attr,
            method=self.name,
            scores=fx,
            base_value=fb,
            targets=tgt.indices,
            layer=name,
            provenance={
                **self._provenance(),
                **_completeness_provenance(attr, fx, fb, method=self.name, steps=self.steps),
            },
            extras=extras,
        )


# ============================================================================ GradientSHAP


@register_method(
    "gradient_shap",
    family="path",
    needs_gradients=True,
    summary="GradientSHAP / Expected Gradients: IG averaged over random baselines and path points",
    paper="Lundberg & Lee, NeurIPS 2017; Erion et al., Nature MI 2021",
)
class GradientSHAP(Method):
    """Expected Gradients: ``E_{x'~background, a~U(0,1)} [(x - x') * df/dx(x' + a (x - x'))]``,
    estimated with ``samples`` draws per input; with ``noise > 0`` Gaussian noise of that
    relative level (times the sample's value range) is added to the input of each
    draw (GradientSHAP as in SHAP/Captum, which use an absolute standard deviation).

    ``baseline`` is the background: a tensor (B, ...) of reference inputs shared by all
    inputs, a single reference (C, H, W), or a named baseline as for IG. ``extras``
    holds the per-feature ``standard_error`` of the estimate; ``base_value`` is the mean
    model score over the background.
    """

    input_ndim = None

    def _prepare_inputs(self, inputs: Any) -> Any:
        return gradient_inputs(self, inputs)

    def __init__(
        self,
        model: nn.Module,
        *,
        baseline: Any = "zero",
        samples: int = 32,
        noise: float = 0.0,
        seed: int = 0,
        **common: Any,
    ) -> None:
        black = black_value(model)
        super().__init__(model, **common)
        check_baseline(baseline)
        check_int("samples", samples, minimum=1)
        check_float("noise", noise, minimum=0, hint="relative to the input range")
        self.baseline = baseline
        self.samples = samples
        self.noise = float(noise)
        self.seed = _check_seed(seed)
        self._black = black

    def _background(self, x: Tensor, gen: torch.Generator) -> tuple[Tensor, bool]:
        """(background, shared): (B, ...) shared by all inputs, or (N, ...) one per input."""
        spec = self.baseline
        if isinstance(spec, (Tensor, np.ndarray)) and not isinstance(spec, str):
            t = torch.as_tensor(spec)
            if t.ndim == x.ndim:
                if tuple(t.shape[1:]) != tuple(x.shape[1:]):
                    raise OptionError(
                        f"baseline background of shape {tuple(t.shape)} does not match the input sample shape "
                        f"{tuple(x.shape[1:])}; expected (B, {', '.join(map(str, x.shape[1:]))})."
                    )
                t = t.to(x)
                if not torch.isfinite(t).all():
                    raise OptionError("baseline contains NaN/Inf values.")
                return t, True
        return make_baseline(spec, x, black=self._black, generator=gen), False

    def _draw(
        self,
        n: int,
        samples: int,
        n_background: int,
        x: Tensor,
        sigma: Tensor,
        gen: torch.Generator,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Random draws per row ``r = i * samples + s``: background index, path point, input noise."""
        idx = torch.randint(n_background, (n * samples,), generator=gen)
        alpha = torch.rand(n * samples, generator=gen, dtype=torch.float64)
        eps = None
        if self.noise > 0:
            eps = torch.randn((n * samples, *x.shape[1:]), generator=gen, dtype=x.dtype)
            eps = eps * sigma.repeat_interleave(samples).view(-1, *[1] * (x.ndim - 1)).cpu()
        return idx, alpha, eps

    shares_forward_across_targets = True

    def _explain(
        self, x: Tensor, target: Any, engine: Engine, targets_per_input: int = 1
    ) -> Explanation:
        per = targets_per_input
        x = x[::per]  # the rows came as `per` copies of each input: draws and forwards are shared
        n, S, m = len(x), self.samples, len(x) * per
        check_target_count(target, m)
        gen = _generator(self.seed)
        bg, shared = self._background(x, gen)
        # f(x) and f(background): one chunked no-grad pass
        both = torch.cat([x, bg])
        out = engine.map(
            lambda s, e: engine.forward(both[s:e]), len(both), sample=x[:1], description="endpoints"
        )
        out_x, out_bg = out[:n].repeat_interleave(per, dim=0), out[n:]
        tgt = resolve_target(target, out_x, self.labels)
        rows = torch.arange(m, device=x.device)
        fx = row_scores(tgt, out_x, rows).detach()
        if shared:
            fb = torch.stack(
                [
                    row_scores(tgt, out_bg, torch.full((len(bg),), i, device=x.device)).mean()
                    for i in range(m)
                ]
            )
        else:
            fb = row_scores(tgt, out_bg.repeat_interleave(per, dim=0), rows)
        fb = fb.detach()
        flat = x.reshape(n, -1)
        sigma = self.noise * (flat.max(1).values - flat.min(1).values)
        idx, alpha, eps = self._draw(n, S, len(bg) if shared else 1, x, sigma, gen)
        idx, alpha = idx.to(x.device), alpha.to(x.device, x.dtype)
        eps = eps.to(x.device, x.dtype) if eps is not None else None
        shape = (m, *x.shape[1:])
        total = torch.zeros(shape, dtype=x.dtype, device=x.device)
        total_sq = torch.zeros(shape, dtype=x.dtype, device=x.device)
        offsets = torch.arange(per, device=x.device)

        def chunk(start: int, stop: int) -> None:
            js = torch.arange(start, stop, device=x.device)
            ni = js // S
            xr = x[ni] if eps is None else x[ni] + eps[js]
            br = bg[idx[js]] if shared else bg[ni]
            d = xr - br
            a = _bcast(alpha[js], x)
            pts = (a * xr + (1 - a) * br).requires_grad_(True)  # same rounding as SHAP/Captum
            out = engine.forward(pts)
            if per > 1:
                out = out.repeat_interleave(per, dim=0)
            s = row_scores(tgt, out, (ni[:, None] * per + offsets).reshape(-1))
            for t, g in enumerate(target_grads(engine, s, pts, per)):
                contrib = d * g
                total.index_add_(0, ni * per + t, contrib)
                total_sq.index_add_(0, ni * per + t, contrib * contrib)

        engine.run(chunk, n * S, sample=x[:1], grad=True, description=self.name)
        mean = total / S
        var = (total_sq / S - mean * mean).clamp_min(0) * (S / max(S - 1, 1))
        stderr = (var / S).sqrt()
        extras: dict[str, Any] = {
            "standard_error": stderr.detach(),
            "background": bg if shared else None,
            "baseline": None if shared else bg.repeat_interleave(per, dim=0),
        }
        prov = {
            "samples": S,
            "noise": self.noise,
            "seed": self.seed,
            "mean_standard_error": stderr.reshape(m, -1).mean(1).tolist(),
            **_completeness_provenance(mean, fx, fb),
        }
        return Explanation(
            attributions=mean.detach(),
            method=self.name,
            scores=fx,
            base_value=fb,
            targets=tgt.indices,
            provenance=prov,
            extras=extras,
        )
