"""Localization: does the explanation point at the object, given a ground-truth mask or box?

Ground truth is validated at the boundary (:func:`~perspicio.metrics.base.as_masks`):
(N, H, W) or (H, W) masks at the input's size, or (N, 4) boxes ``(x0, y0, x1, y1)``
in pixels; an empty mask is an error. Pixel relevance is the attribution summed over
channels (resized to the input). No model calls.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.options import check_int
from ..core.registry import register_metric
from .base import Context, Metric, MetricResult


def bounding_boxes(masks: Tensor) -> Tensor:
    """The smallest axis-aligned box around each (N, H, W) mask, as a mask."""
    rows = masks.any(2)
    cols = masks.any(1)
    h, w = masks.shape[-2:]
    ar_h = torch.arange(h, device=masks.device)
    ar_w = torch.arange(w, device=masks.device)
    big = torch.iinfo(torch.long).max
    y0 = torch.where(rows, ar_h, big).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values
    x0 = torch.where(cols, ar_w, big).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values
    inside_r = (ar_h[None] >= y0[:, None]) & (ar_h[None] <= y1[:, None])
    inside_c = (ar_w[None] >= x0[:, None]) & (ar_w[None] <= x1[:, None])
    return inside_r[:, :, None] & inside_c[:, None, :]


class _Localization(Metric):
    """Shared base of the localization metrics (registered with ``needs=("masks",)``)."""


@register_metric("pointing_game", family="localization", higher_is_better=True, needs=("masks",),
                 paper="Zhang et al., ECCV 2016",
                 summary="Hit if the explanation's maximum falls inside the (dilated) ground-truth mask")
class PointingGame(_Localization):
    """Pointing game: 1 if the most relevant pixel lies in the mask dilated by ``tolerance``
    pixels (15 in the paper), else 0. When several pixels share the maximum, the score is
    the fraction of them inside (the expected hit under random tie-breaking), so a constant
    map scores the mask's area fraction, i.e. chance."""

    def __init__(self, *, tolerance: int = 15, **common: Any) -> None:
        super().__init__(**common)
        check_int("tolerance", tolerance, minimum=0, hint="pixels")
        self.tolerance = tolerance

    def _compute(self, ctx: Context) -> MetricResult:
        rel = ctx.relevance.flatten(1)
        mask = ctx.masks
        if self.tolerance:
            t = self.tolerance
            yy, xx = torch.meshgrid(torch.arange(-t, t + 1), torch.arange(-t, t + 1), indexing="ij")
            disk = ((yy**2 + xx**2) <= t * t).float().to(mask.device)[None, None]
            mask = F.conv2d(mask.float()[:, None], disk, padding=t)[:, 0] > 0
        is_max = rel == rel.max(1, keepdim=True).values
        hits = (is_max & mask.flatten(1)).sum(1).double() / is_max.sum(1).double()
        return MetricResult(self.name, hits, self.higher_is_better, {})


@register_metric("energy_pointing_game", family="localization", higher_is_better=True, needs=("masks",),
                 paper="Wang et al., Score-CAM, CVPRW 2020",
                 summary="Share of positive relevance inside the ground-truth bounding box")
class EnergyPointingGame(_Localization):
    """Energy-based pointing game: sum of positive relevance inside the object's bounding box
    over the total positive relevance (masks are turned into their bounding boxes, as the
    paper works with boxes). A map with no positive relevance scores 0."""

    def _compute(self, ctx: Context) -> MetricResult:
        pos = ctx.relevance.clamp_min(0).flatten(1).double()
        box = bounding_boxes(ctx.masks).flatten(1)
        total = pos.sum(1)
        inside = (pos * box).sum(1)
        return MetricResult(self.name, torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total)),
                            self.higher_is_better, {})


@register_metric("relevance_mass", family="localization", higher_is_better=True, needs=("masks",),
                 paper="Arras et al., Information Fusion 2022",
                 summary="Relevance mass accuracy: share of positive relevance inside the ground-truth mask")
class RelevanceMass(_Localization):
    """Relevance mass accuracy: R_within / R_total over positive relevance, with the exact mask."""

    def _compute(self, ctx: Context) -> MetricResult:
        pos = ctx.relevance.clamp_min(0).flatten(1).double()
        m = ctx.masks.flatten(1)
        total = pos.sum(1)
        inside = (pos * m).sum(1)
        return MetricResult(self.name, torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total)),
                            self.higher_is_better, {})


@register_metric("relevance_rank", family="localization", higher_is_better=True, needs=("masks",),
                 paper="Arras et al., Information Fusion 2022",
                 summary="Relevance rank accuracy: share of the K most relevant pixels inside the mask (K = mask size)")
class RelevanceRank(_Localization):
    """Relevance rank accuracy: with K the number of mask pixels, the fraction of the K
    highest-relevance pixels that lie inside the mask (ties broken in raster order)."""

    def _compute(self, ctx: Context) -> MetricResult:
        rel = ctx.relevance.flatten(1)
        m = ctx.masks.flatten(1)
        k = m.sum(1)
        order = torch.sort(-rel, dim=1, stable=True).indices
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(rel.shape[1], device=rel.device).expand_as(order).contiguous())
        top = ranks < k[:, None]
        return MetricResult(self.name, (top & m).sum(1).double() / k.double(), self.higher_is_better, {})


def cell_energy(rel: Tensor, cells: Tensor) -> Tensor:
    """Share of positive relevance of each (N, H, W) map inside each of its (N, H, W) cell masks."""
    pos = rel.clamp_min(0).flatten(1).double()
    total = pos.sum(1)
    inside = (pos * cells.flatten(1)).sum(1)
    return torch.where(total > 0, inside / total.clamp_min(1e-300), torch.zeros_like(total))
