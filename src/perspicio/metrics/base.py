"""Base class of all evaluation metrics and the helpers they share.

A metric is constructed with its options and called on a model, the inputs and an
explanation (an :class:`~perspicio.Explanation` or a raw attribution tensor). It
returns a :class:`MetricResult`: one score per sample, whether higher is better,
and the side results (curves, per-layer similarities) a report needs.

What a metric needs is declared once, in ``@register_metric(..., needs=...)`` (with its
``family`` and ``higher_is_better``); the registry sets them as class attributes:

* ``"model"``: it calls the model (through :class:`~perspicio.core.batching.Engine`,
  chunked and counted, vectorised over samples);
* ``"method"``: it re-runs the explanation method (robustness, randomization);
* ``"parameters"``: it needs the model's weights (randomization works on a deep copy);
* ``"masks"``: it needs ground-truth masks or boxes (localization);
* ``"base_value"``: it needs the method's reference output (completeness).

A model may be an ``nn.Module``, a bundled ``ZooModel`` or any callable mapping a
batch tensor to outputs (a black box). Metrics that need gradients of a black box
(e.g. re-running a gradient method) or its parameters raise :class:`ModelError`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batching import Engine
from ..core.blackbox import unwrap_model
from ..core.explanation import Explanation
from ..core.guard import model_guard
from ..core.inputs import as_batch
from ..core.jsonable import to_jsonable
from ..core.options import RecordsOptions, check_int
from ..core.outputs import OutputSelector
from ..core.targets import ResolvedTarget, resolve_target, row_scores
from ..errors import ConvergenceWarning, InputError, ModelError, OptionError, PerspicioError

SCORES = ("probability", "logit")


class NotApplicable(OptionError):
    """The metric is not defined for this explanation (e.g. completeness of a CAM)."""


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class MetricResult:
    """Per-sample scores of one metric on one explanation.

    Attributes:
        metric: registry name.
        scores: (N,) float tensor, one score per sample (NaN where undefined).
        higher_is_better: direction of the score.
        details: side results (curves, per-layer similarities, maps), read-only.
        options: the metric options used.
    """

    metric: str
    scores: Tensor
    higher_is_better: bool
    details: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def value(self) -> float:
        """Mean over samples, ignoring NaN (NaN if every sample is undefined)."""
        s = self.scores.double()
        ok = ~torch.isnan(s)
        return float(s[ok].mean()) if ok.any() else math.nan

    def summary(self, *, arrays: bool = True) -> dict[str, Any]:
        """JSON-friendly: value, per-sample scores and (with ``arrays``) every detail as lists."""
        out: dict[str, Any] = {
            "metric": self.metric,
            "value": to_jsonable(None if self.value is None else float(self.value)),
            "higher_is_better": self.higher_is_better,
            "scores": to_jsonable(self.scores.double()),
            "options": to_jsonable(dict(self.options)),
        }
        if arrays:
            out["details"] = to_jsonable({k: v for k, v in self.details.items() if not k.startswith("_")})
        return out




# ----------------------------------------------------------------------------- models


def prepare_model(model: Any) -> tuple[nn.Module, Sequence[str] | None, bool]:
    """``(module, labels, is_black_box)`` for an nn.Module, a ZooModel or a prediction callable.

    Callables are wrapped by the core's :class:`~perspicio.core.blackbox.BlackBox` (numpy in,
    array out by default; wrap with ``BlackBox(fn, inputs="torch")`` for tensor functions).
    """
    inner, labels = unwrap_model(model)
    if not isinstance(inner, nn.Module):
        raise ModelError(f"model must be an nn.Module, a bundled model or a callable; got {type(model).__name__}.")
    return inner, labels, bool(getattr(inner, "is_black_box", False))


# ----------------------------------------------------------------------------- explainers


class Explainer:
    """Re-runs an explanation method on other inputs or on another model (a randomized copy).

    Built from a registered method name (+ options), a :class:`~perspicio.methods.Method`
    instance, the method recorded in an :class:`Explanation`, or a plain callable
    ``fn(model, x, target) -> attributions``.
    """

    def __init__(self, spec: Any, options: Mapping[str, Any] | None = None) -> None:
        from ..core.registry import METHODS
        from ..methods.base import Method

        self.options = dict(options or {})
        self.fn: Callable[[Any, Tensor, Any], Tensor] | None = None
        self.cls: type | None = None
        if isinstance(spec, Method):
            self.cls = type(spec)
            self.options = {**dict(spec.options), **self.options}
            self.name = spec.name
        elif isinstance(spec, str):
            self.cls = METHODS.get(spec).cls
            self.name = self.cls.name  # type: ignore[attr-defined]
        elif isinstance(spec, type) and issubclass(spec, Method):
            self.cls = spec
            self.name = spec.name
        elif callable(spec):
            self.fn = spec
            self.name = getattr(spec, "__name__", type(spec).__name__)
        else:
            raise OptionError(
                "method must be a registered method name, a Method instance or a callable "
                f"fn(model, x, target) -> attributions; got {type(spec).__name__}."
            )
        self.needs_gradients = False
        #: relative completeness errors of every re-explanation that recorded one (path methods):
        #: the metric reports their worst in ``details["re_explanation_completeness_error"]``
        self.completeness_errors: list[float] = []
        if self.cls is not None:
            entry = METHODS.get(self.name) if self.name in METHODS else None
            self.needs_gradients = bool(entry.needs_gradients) if entry is not None else True

    @classmethod
    def from_explanation(cls, exp: Explanation) -> Explainer:
        from ..core.registry import METHODS

        if exp.method not in METHODS:
            raise OptionError(
                f"the explanation's method {exp.method!r} is not registered; pass method=... "
                "(a method name, a Method or a callable) to re-run it."
            )
        return cls(exp.method, exp.options)

    def check_model(self, black_box: bool, metric: str) -> None:
        if black_box and (self.cls is not None or self.needs_gradients):
            raise ModelError(
                f"metric {metric!r} re-runs method {self.name!r}, which needs a torch nn.Module"
                + (" and its gradients" if self.needs_gradients else "")
                + "; the model is a black-box callable. Use a model-agnostic method passed as a callable, "
                "or give the nn.Module."
            )

    def __call__(self, model: nn.Module, x: Tensor, target: Any, labels: Sequence[str] | None = None,
                 source: nn.Module | None = None) -> tuple[Tensor, dict[str, int]]:
        """Attributions of ``x`` for ``target`` on ``model``, and the passes it cost.

        ``source`` is the model the options refer to: module-valued options (a layer
        given as a module) are translated to the module of the same name in ``model``.
        """
        if self.fn is not None:
            out = self.fn(model, x, target)
            attr = out.attributions if isinstance(out, Explanation) else torch.as_tensor(out)
            return attr.detach().to(x.device), {}
        from ..methods.base import build

        opts = {k: _translate_modules(v, source, model) for k, v in self.options.items()}
        opts.pop("progress", None)
        if "labels" in (self.cls.option_names() if self.cls else []) and opts.get("labels") is None and labels is not None:
            opts["labels"] = labels
        with warnings.catch_warnings():  # a re-explanation's convergence is recorded, not warned about
            warnings.simplefilter("ignore", ConvergenceWarning)
            exp = build(self.cls, model, **opts)(x, target=target)  # type: ignore[arg-type]
        prov = exp.provenance
        rel = prov.get("relative_completeness_error")
        if rel:
            self.completeness_errors.extend(float(v) for v in rel)
        return exp.attributions.detach(), {"forward_samples": int(prov.get("forward_samples", 0)),
                                           "backward_samples": int(prov.get("backward_samples", 0))}


def _translate_modules(v: Any, source: nn.Module | None, model: nn.Module) -> Any:
    if isinstance(v, (list, tuple)):
        return type(v)(_translate_modules(x, source, model) for x in v)
    if isinstance(v, nn.Module) and source is not None and source is not model:
        for name, m in source.named_modules():
            if m is v:
                return model.get_submodule(name) if name else model
    return v


# ----------------------------------------------------------------------------- context


@dataclass
class Context:
    """Everything a metric computes with, validated once at the boundary."""

    model: nn.Module | None
    x: Tensor
    attributions: Tensor
    target: ResolvedTarget
    output: Tensor
    engine: Engine
    generator: torch.Generator
    labels: Sequence[str] | None
    black_box: bool
    explanation: Explanation | None
    explainer: Explainer | None
    masks: Tensor | None

    @property
    def relevance(self) -> Tensor:
        """Per-pixel relevance (N, H, W): channels summed, resized to the input if needed."""
        return relevance_map(self.attributions, self.x)

    def scores(self, out: Tensor, rows: Tensor, kind: str) -> Tensor:
        """Score of the explained target for outputs ``out`` whose row r belongs to sample ``rows[r]``."""
        if self.target.indices is not None and out.ndim == 2:
            return row_scores(self.target, out.float().softmax(dim=1) if kind == "probability" else out, rows)
        if kind == "probability" and self.target.indices is not None:
            raise OptionError("score='probability' needs a (N, classes) output; use score='logit'.")
        return self.target.fn(out)

    def forward_scores(self, make: Callable[[int, int], tuple[Tensor, Tensor]], n: int, kind: str,
                       description: str = "scoring") -> Tensor:
        """Scores of ``n`` perturbed rows built chunk-wise by ``make(start, stop) -> (batch, rows)``."""

        def fn(start: int, stop: int) -> Tensor:
            batch, rows = make(start, stop)
            return self.scores(self.engine.evaluate(batch), rows, kind).detach().float()

        return self.engine.map(fn, n, sample=self.x[:1], description=description)


def relevance_map(attributions: Tensor, x: Tensor) -> Tensor:
    """Reduce attributions to (N, H, W) at the input's spatial size (channels summed)."""
    a = attributions.detach().to(x.device).float()
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[0] != x.shape[0]:
        raise InputError(
            f"attributions must be (N, C, H, W) or (N, H, W) with N={x.shape[0]} samples; got shape {tuple(a.shape)}."
        )
    a = a.sum(dim=1, keepdim=True)
    if tuple(a.shape[-2:]) != tuple(x.shape[-2:]):
        a = F.interpolate(a, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return a[:, 0]


def attributions_like_input(attributions: Tensor, x: Tensor) -> Tensor:
    """Attributions as (N, C', H, W) at the input's size, C' = 1 or the input's channels."""
    a = attributions.detach().to(x.device).float()
    if a.ndim == 3:
        a = a[:, None]
    if a.ndim != 4 or a.shape[0] != x.shape[0]:
        raise InputError(f"attributions must be (N, C, H, W) with N={x.shape[0]}; got shape {tuple(a.shape)}.")
    if a.shape[1] not in (1, x.shape[1]):
        a = a.sum(dim=1, keepdim=True)
    if tuple(a.shape[-2:]) != tuple(x.shape[-2:]):
        a = F.interpolate(a, size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return a


def as_masks(masks: Any, x: Tensor) -> Tensor:
    """Validate ground truth: (N, H, W)/(H, W) boolean masks or (N, 4) boxes (x0, y0, x1, y1) -> (N, H, W) bool."""
    n, h, w = x.shape[0], x.shape[-2], x.shape[-1]
    if isinstance(masks, (list, tuple)) and masks and all(isinstance(b, (list, tuple)) and len(b) == 4 for b in masks):
        masks = torch.as_tensor(masks, dtype=torch.float64)
        if masks.shape[0] != n:
            raise InputError(f"got {masks.shape[0]} boxes for {n} inputs; give one (x0, y0, x1, y1) box per input.")
    m = torch.as_tensor(masks.copy() if hasattr(masks, "copy") and not isinstance(masks, Tensor) else masks)
    if m.ndim == 2 and m.shape[-1] == 4 and m.shape[0] == n and (m.shape[0], m.shape[1]) != (h, w):
        boxes = m.double()
        out = torch.zeros(n, h, w, dtype=torch.bool)
        for i, (x0, y0, x1, y1) in enumerate(boxes.tolist()):
            if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
                raise InputError(f"box {i} = {(x0, y0, x1, y1)} must satisfy 0 <= x0 < x1 <= {w}, 0 <= y0 < y1 <= {h}.")
            out[i, int(math.floor(y0)):int(math.ceil(y1)), int(math.floor(x0)):int(math.ceil(x1))] = True
        m = out
    if m.ndim == 2:
        m = m.expand(n, *m.shape)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3 or tuple(m.shape[-2:]) != (h, w) or m.shape[0] != n:
        raise InputError(
            f"masks must be (N, H, W) = ({n}, {h}, {w}) (the input's size), (H, W), or (N, 4) boxes; "
            f"got shape {tuple(m.shape)}."
        )
    m = m.to(x.device).bool() if m.dtype == torch.bool else (m.to(x.device) > 0.5)
    empty = (~m.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise InputError(f"mask of sample(s) {empty} is empty; a localization score needs at least one pixel inside.")
    return m


# ----------------------------------------------------------------------------- base class


class Metric(RecordsOptions):
    """Base of evaluation metrics; subclasses implement :meth:`_compute` and state their metadata
    (family, higher_is_better, needs) once, in ``@register_metric``, which sets these attributes."""

    name: ClassVar[str] = "metric"
    family: ClassVar[str] = ""
    higher_is_better: bool = True
    needs: ClassVar[tuple[str, ...]] = ()
    _options_with_defaults: ClassVar[bool] = True


    def __init__(
        self,
        *,
        batch_size: int | None = None,
        memory_budget: int | None = None,
        progress: bool = False,
        seed: int = 0,
        output: Any = None,
    ) -> None:
        """Common options of every metric; ``output`` selects the tensor to score when the model
        returns a dict, tuple or ``ModelOutput`` (see :mod:`perspicio.core.outputs`; default: the
        ``output`` option recorded in the explanation, if any)."""
        Engine(nn.Identity(), batch_size=batch_size, memory_budget=memory_budget)  # validates both
        check_int("seed", seed)
        OutputSelector(output)  # validates the spec
        self.batch_size = batch_size
        self.memory_budget = memory_budget
        self.progress = progress
        self.seed = seed
        self.output = output
        self.options: dict[str, Any] = {}

    def cost(self) -> tuple[int, int]:
        """(forward passes, re-explanations) per scored sample beyond the one forward of the inputs
        every metric makes: what :func:`~perspicio.metrics.compare` plans with. Metrics that only
        read the attributions cost nothing."""
        return 0, 0

    def __call__(
        self,
        model: Any,
        inputs: Any = None,
        explanation: Explanation | Tensor | None = None,
        *,
        target: Any = None,
        method: Any = None,
        masks: Any = None,
    ) -> MetricResult:
        """Score ``explanation`` of ``model`` on ``inputs``.

        Args:
            model: nn.Module, bundled ZooModel or a black-box callable (None for metrics that
                need no model: localization, complexity).
            inputs: (N, C, H, W); defaults to the explanation's inputs.
            explanation: an :class:`Explanation` or an attribution tensor (N, C, H, W) / (N, H, W).
            target: what was explained; defaults to the explanation's targets, else the predicted class.
            method: for metrics that re-run the method (robustness, randomization): a method name,
                a Method instance or ``fn(model, x, target) -> attributions``; defaults to the
                method recorded in the explanation.
            masks: ground truth for localization metrics: (N, H, W) masks or (N, 4) boxes.
        """
        ctx = self._context(model, inputs, explanation, target, method, masks)
        guard = model_guard(ctx.model) if ctx.model is not None else _nullcontext()
        with guard:
            with torch.no_grad():
                result = self._compute(ctx)
        details = dict(result.details)
        details.setdefault("passes", ctx.engine.stats())
        if ctx.explainer is not None and ctx.explainer.completeness_errors:
            details.setdefault("re_explanation_completeness_error", max(ctx.explainer.completeness_errors))
        return MetricResult(self.name, result.scores.detach().double().cpu(), self.higher_is_better, details, self.options)

    # ------------------------------------------------------------------ boundary
    def _context(self, model: Any, inputs: Any, explanation: Any, target: Any, method: Any, masks: Any) -> Context:
        uses_model = bool(set(self.needs) & {"model", "method", "parameters"})
        if model is None and not uses_model:
            module, labels, black_box = None, None, False
        else:
            module, labels, black_box = prepare_model(model)
        exp = explanation if isinstance(explanation, Explanation) else None
        if inputs is None:
            if exp is None or exp.inputs is None:
                raise InputError("inputs are required (the explanation does not carry its inputs).")
            inputs = exp.inputs
        x = as_batch(inputs, module)
        if explanation is None:
            raise InputError("an explanation (Explanation or attribution tensor) is required.")
        attr = exp.attributions if exp is not None else explanation
        if not isinstance(attr, Tensor):
            try:
                attr = torch.as_tensor(attr)
            except (TypeError, ValueError, RuntimeError):
                raise InputError(f"attributions must be a tensor or array; got {type(attr).__name__}.") from None
        if attr.shape[0] != x.shape[0]:
            raise InputError(f"got attributions for {attr.shape[0]} samples and {x.shape[0]} inputs.")
        if not torch.isfinite(attr).all():
            raise InputError("attributions contain NaN/Inf values.")
        attr = attr.detach().to(x.device).float()
        if target is None and exp is not None and exp.targets is not None:
            target = exp.targets
        output = self.output
        if output is None and exp is not None:
            output = exp.options.get("output")  # the tensor the method explained
        engine = Engine(module if module is not None else nn.Identity(), batch_size=self.batch_size,
                        memory_budget=self.memory_budget, progress=self.progress,
                        output=OutputSelector(output) if module is not None else None)
        if module is not None:
            with model_guard(module), torch.no_grad():
                out = engine.evaluate(x).detach()
            tgt = resolve_target(target, out, labels)
        else:  # attribution-only metrics (localization, complexity) need no model
            out = torch.zeros(x.shape[0], 0, device=x.device)
            tgt = ResolvedTarget(fn=lambda o: o.sum(1), indices=None, description="none")
        explainer = None
        if "method" in self.needs:
            if method is not None:
                explainer = method if isinstance(method, Explainer) else Explainer(method)
            elif exp is not None:
                explainer = Explainer.from_explanation(exp)
            else:
                raise OptionError(f"metric {self.name!r} re-runs the explanation method: pass method=... "
                                  "(a method name, a Method, or fn(model, x, target) -> attributions).")
            explainer.check_model(black_box, self.name)
            if output is not None and explainer.cls is not None:
                explainer.options.setdefault("output", output)  # re-runs explain the same tensor
        if "parameters" in self.needs and black_box:
            raise ModelError(f"metric {self.name!r} randomizes the model's parameters; a black-box callable has none. "
                             "Pass the nn.Module.")
        mask_t = None
        if "masks" in self.needs:
            if masks is None:
                raise InputError(f"metric {self.name!r} needs ground-truth masks=... ((N, H, W) masks or (N, 4) boxes).")
            mask_t = as_masks(masks, x)
        gen = torch.Generator().manual_seed(self.seed)
        return Context(module, x, attr, tgt, out, engine, gen, labels, black_box, exp, explainer, mask_t)

    def _compute(self, ctx: Context) -> MetricResult:
        raise NotImplementedError  # abstract: every registered metric overrides it


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def randn(gen: torch.Generator, shape: Sequence[int], device: torch.device) -> Tensor:
    """Standard normal noise from the metric's own generator (CPU), moved to ``device``."""
    return torch.randn(tuple(shape), generator=gen).to(device)


def rand(gen: torch.Generator, shape: Sequence[int], device: torch.device) -> Tensor:
    return torch.rand(tuple(shape), generator=gen).to(device)


__all__ = ["Context", "Explainer", "Metric", "MetricResult", "NotApplicable", "PerspicioError", "relevance_map"]
