"""Complexity: how concentrated is the explanation? (no model calls)

Both metrics work on the per-pixel magnitude |sum over channels of the attribution|
(resized to the input for maps at another resolution).
"""

from __future__ import annotations

import math

import torch

from ..core.registry import register_metric
from .base import Context, Metric, MetricResult


@register_metric("sparseness", family="complexity", higher_is_better=True, needs=(),
                 paper="Chalasani et al., ICML 2020",
                 summary="Gini index of the absolute relevance (1 = one pixel carries everything, 0 = uniform)")
class Sparseness(Metric):
    """Gini index of |relevance|: G = sum_i (2i - n - 1) a_(i) / (n sum_i a_i), a sorted
    ascending, i = 1..n. A constant (or all-zero) map scores 0."""

    def _compute(self, ctx: Context) -> MetricResult:
        a = ctx.relevance.abs().flatten(1).double()
        n = a.shape[1]
        s = a.sort(dim=1).values
        i = torch.arange(1, n + 1, dtype=torch.float64, device=a.device)
        total = s.sum(1)
        g = ((2 * i - n - 1) * s).sum(1) / (n * total.clamp_min(1e-300))
        return MetricResult(self.name, torch.where(total > 0, g, torch.zeros_like(g)), self.higher_is_better, {})


@register_metric("entropy", family="complexity", higher_is_better=False, needs=(),
                 paper="Bhatt et al., IJCAI 2020",
                 summary="Shannon entropy (nats) of the fractional contribution |a_i| / sum |a|")
class Entropy(Metric):
    """Complexity as entropy: -sum_i p_i log p_i with p_i = |a_i| / sum_j |a_j|. A constant
    map has the maximum, log(n); an all-zero map is treated as uniform (log(n))."""

    def _compute(self, ctx: Context) -> MetricResult:
        a = ctx.relevance.abs().flatten(1).double()
        n = a.shape[1]
        total = a.sum(1, keepdim=True)
        p = a / total.clamp_min(1e-300)
        h = -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(1)
        return MetricResult(self.name, torch.where(total[:, 0] > 0, h, torch.full_like(h, math.log(n))),
                            self.higher_is_better, {})
