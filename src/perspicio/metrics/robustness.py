"""Robustness: does the explanation stay put when the input barely changes?

Max- and average-sensitivity (Yeh et al., NeurIPS 2019): draw ``samples`` inputs
uniformly from the L-infinity ball of ``radius`` around x, re-run the explanation
method on all of them (one call per engine chunk, the target class held fixed),
and measure ||phi(x + d) - phi(x)|| / ||phi(x)|| (Frobenius norms, as in Captum's
``sensitivity_max``). Noise is drawn as one (N, samples, C, H, W) tensor from the
metric's seeded generator, so results do not depend on the chunk size.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..core.options import check_float, check_int
from ..core.registry import register_metric
from ..core.targets import ResolvedTarget
from ..errors import OptionError
from .base import Context, Metric, MetricResult, rand


class _Sensitivity(Metric):
    reduce = "max"

    def __init__(self, *, samples: int = 10, radius: float = 0.02, **common: Any) -> None:
        super().__init__(**common)
        check_int("samples", samples, minimum=1)
        check_float("radius", radius, minimum=0, strict=True, hint="L-inf noise bound in input units")
        self.samples, self.radius = samples, float(radius)

    def cost(self) -> tuple[int, int]:
        """(forward passes, re-explanations) per scored sample: the method re-run per perturbation."""
        return 0, self.samples

    def _compute(self, ctx: Context) -> MetricResult:
        x = ctx.x
        n, s = x.shape[0], self.samples
        noise = (rand(ctx.generator, (n, s, *x.shape[1:]), x.device) * 2 - 1) * self.radius
        base = ctx.attributions
        tgt = ctx.target
        passes = {"forward_samples": 0, "backward_samples": 0}

        def run(start: int, stop: int) -> Tensor:
            r = torch.arange(start, stop, device=x.device)
            img, j = r // s, r % s
            xs = x[img] + noise[img, j]
            t: Any
            if tgt.indices is not None:
                t = tgt.indices.to(x.device)[img]
            else:
                t = ResolvedTarget(fn=tgt.fn, indices=None, description=tgt.description)
            attr, cost = ctx.explainer(ctx.model, xs, t, ctx.labels, source=ctx.model)  # type: ignore[misc]
            for key, v in cost.items():
                passes[key] += v
            if attr.shape[1:] != base.shape[1:]:
                raise OptionError(
                    f"the method returned attributions of shape {tuple(attr.shape[1:])} on perturbed inputs "
                    f"but {tuple(base.shape[1:])} originally."
                )
            a = attr.to(x.device).float()
            return (a - base[img]).flatten(1).norm(dim=1) / base[img].flatten(1).norm(dim=1).where(
                base[img].flatten(1).norm(dim=1) > 0, torch.ones(len(img), device=x.device))

        sens = ctx.engine.map(run, n * s, sample=x[:1], grad=True, description=self.name).view(n, s)
        ctx.engine.forwards += passes["forward_samples"]
        ctx.engine.backwards += passes["backward_samples"]
        value = sens.max(1).values if self.reduce == "max" else sens.mean(1)
        return MetricResult(self.name, value.double(), self.higher_is_better, {"sensitivities": sens.cpu()})


@register_metric("max_sensitivity", family="robustness", higher_is_better=False, needs=("model", "method"),
                 paper="Yeh et al., NeurIPS 2019",
                 summary="Largest relative change of the explanation under small uniform input noise")
class MaxSensitivity(_Sensitivity):
    """Max-sensitivity: max over noisy copies of ||phi(x + d) - phi(x)|| / ||phi(x)||, d ~ U[-radius, radius]."""

    reduce = "max"


@register_metric("avg_sensitivity", family="robustness", higher_is_better=False, needs=("model", "method"),
                 paper="Yeh et al., NeurIPS 2019",
                 summary="Average relative change of the explanation under small uniform input noise")
class AvgSensitivity(_Sensitivity):
    """Average-sensitivity: mean over noisy copies of ||phi(x + d) - phi(x)|| / ||phi(x)||."""

    reduce = "mean"
