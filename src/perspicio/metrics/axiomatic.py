"""Axiomatic checks: completeness (conservation) of attributions.

Methods such as Integrated Gradients, DeepLIFT and Shapley estimators promise
sum_i phi_i = f(x) - f(baseline); their :class:`~perspicio.Explanation` carries ``base_value`` =
f(baseline) per sample. LRP has no baseline (no ``base_value``): it conserves the relevance it
starts from at the output (``extras["output_relevance"]``, the logit for class targets), and its
completeness error is measured against that. Methods without either promise (CAMs, plain
gradients) make the metric :class:`~perspicio.metrics.base.NotApplicable` unless a ``baseline``
is given explicitly.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.registry import register_metric
from ..errors import OptionError
from .base import Context, Metric, MetricResult, NotApplicable


@register_metric("completeness", family="axiomatic", higher_is_better=False, needs=("model", "base_value"),
                 paper="Sundararajan et al., ICML 2017; Bach et al., PLoS ONE 2015",
                 summary="Completeness error |sum(attributions) - (f(x) - f(baseline))| for methods that conserve")
class Completeness(Metric):
    """Completeness error |sum phi - (f(x) - f(x0))| of the target's score (the quantity the
    method explains: logit for class targets, or the callable's value).

    f(x0) is the explanation's ``base_value``; with ``baseline`` ("zero" or a tensor) it is
    computed instead. ``relative=True`` divides by |f(x) - f(x0)|. For methods over feature
    groups (superpixels: Shapley, LIME), whose pixel maps repeat each group's value, the sum is
    taken over the per-feature values in ``extras["values"]``.
    """

    def __init__(self, *, baseline: Any = None, relative: bool = False, **common: Any) -> None:
        super().__init__(**common)
        if baseline is not None and not (isinstance(baseline, Tensor) or baseline == "zero"):
            raise OptionError(f"baseline must be None, 'zero' or a tensor; got {baseline!r}.")
        self.baseline, self.relative = baseline, bool(relative)

    def cost(self) -> tuple[int, int]:
        """(forward passes, re-explanations) per scored sample: the baseline's pass when one is given."""
        return (1 if self.baseline is not None else 0), 0

    def _compute(self, ctx: Context) -> MetricResult:
        x = ctx.x
        n = x.shape[0]
        idx = torch.arange(n, device=x.device)
        fx = ctx.scores(ctx.output, idx, "logit").double()
        base = None
        if self.baseline is not None:
            x0 = torch.zeros_like(x) if isinstance(self.baseline, str) else self.baseline.to(x.device, x.dtype).expand_as(x)
            base = ctx.forward_scores(lambda a, b: (x0[a:b], idx[a:b]), n, "logit", description="baseline").double()
        elif ctx.explanation is not None and ctx.explanation.base_value is not None:
            bv = torch.as_tensor(ctx.explanation.base_value).to(x.device).double().flatten()
            base = bv.expand(n) if bv.numel() == 1 else bv
        relevance = ctx.explanation.extras.get("output_relevance") if ctx.explanation is not None else None
        if base is None and relevance is not None:  # LRP: conservation of the output relevance, no baseline
            start = torch.as_tensor(relevance).to(x.device).double().flatten()
            base = fx - (start.expand(n) if start.numel() == 1 else start)
        if base is None:
            method = ctx.explanation.method if ctx.explanation is not None else "these attributions"
            raise NotApplicable(
                f"completeness is not defined for {method}: the explanation has no base_value (IG, DeepLIFT and "
                "Shapley methods set it) nor output relevance (LRP); pass baseline='zero' to force it."
            )
        if base.shape != (n,):
            raise OptionError(f"base_value must hold one value per sample ({n}); got shape {tuple(base.shape)}.")
        values = ctx.explanation.extras.get("values") if ctx.explanation is not None else None
        if values is not None and len(values) == n:  # feature-group methods: one value per feature
            total = torch.stack([torch.as_tensor(v).double().sum() for v in values]).to(x.device)
        else:
            total = ctx.attributions.double().flatten(1).sum(1)
        err = (total - (fx - base)).abs()
        if self.relative:
            err = err / (fx - base).abs().clamp_min(1e-12)
        return MetricResult(self.name, err, self.higher_is_better,
                            {"sum_attributions": total.cpu(), "delta_output": (fx - base).cpu()})
