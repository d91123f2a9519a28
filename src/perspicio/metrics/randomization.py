"""Randomization sanity checks (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

An explanation that stays the same when the model's weights are replaced by random
ones does not explain the model. Two variants:

* cascading: randomize the layers from the output towards the input, one group
  after the other, keeping earlier randomizations;
* independent: randomize one group at a time, the rest left trained.

After each step the method is re-run and its map compared with the original one
by Spearman rank correlation, SSIM and top-k intersection. Everything happens on a
``copy.deepcopy`` of the model; the user's model is only read.

Layers are the modules that own parameters, in registration order; ``steps``
groups them into that many contiguous blocks (each module alone when ``steps`` is
at least their number). A randomized parameter is redrawn from a normal
distribution with the original tensor's mean and standard deviation (a
scale-preserving re-initialisation; with a single element, N(0, |w|)), from the
metric's seeded generator. Buffers (BatchNorm running statistics) are kept.

The per-sample score is the mean Spearman correlation over the cascading steps
(lower is better: a faithful explanation decorrelates quickly).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.options import check_choice, check_float, check_int
from ..core.registry import register_metric
from ..errors import ModelError, OptionError
from .base import Context, Metric, MetricResult, relevance_map

MODES = ("cascading", "independent", "both")
SIMILARITIES = ("spearman", "ssim", "topk")


def parametric_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules owning parameters directly, in registration order (input side first)."""
    return [(n, m) for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


def layer_groups(model: nn.Module, steps: int) -> list[list[str]]:
    """Module names split into ``steps`` contiguous groups, output side first."""
    names = [n for n, _ in parametric_modules(model)][::-1]
    if not names:
        raise ModelError("the model has no parameters to randomize.")
    k = min(steps, len(names))
    bounds = [round(i * len(names) / k) for i in range(k + 1)]
    return [names[bounds[i]:bounds[i + 1]] for i in range(k)]


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator) -> None:
    """Redraw every direct parameter of ``module`` in place (mean/std of the original)."""
    for p in module.parameters(recurse=False):
        flat = p.detach().double().flatten()
        if flat.numel() > 1:
            mean, std = float(flat.mean()), float(flat.std())
        else:
            mean, std = 0.0, float(flat.abs().sum())
        new = torch.randn(p.shape, generator=generator, dtype=torch.float64) * std + mean
        p.copy_(new.to(p.device, p.dtype))


# ----------------------------------------------------------------------------- similarities


def _ranks(v: Tensor) -> Tensor:
    """Average ranks along dim 1 (ties share their mean rank), as Spearman needs."""
    n, m = v.shape
    order = v.argsort(dim=1, stable=True)
    sorted_v = v.gather(1, order)
    pos = torch.arange(m, device=v.device, dtype=torch.float64).expand(n, m)
    # mean position within runs of equal values
    new_run = torch.ones_like(sorted_v, dtype=torch.bool)
    new_run[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    run_id = new_run.long().cumsum(1) - 1
    sums = torch.zeros(n, m, dtype=torch.float64, device=v.device).scatter_add_(1, run_id, pos)
    cnts = torch.zeros(n, m, dtype=torch.float64, device=v.device).scatter_add_(1, run_id, torch.ones_like(pos))
    mean_rank = (sums / cnts.clamp_min(1)).gather(1, run_id)
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(1, order, mean_rank)
    return ranks


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Spearman rank correlation of (N, ...) maps (NaN if a map is constant)."""
    from .faithfulness import pearson

    return pearson(_ranks(a.flatten(1).double()), _ranks(b.flatten(1).double()))


def ssim(a: Tensor, b: Tensor, *, sigma: float = 1.5, data_range: float = 1.0) -> Tensor:
    """Mean SSIM (Wang et al. 2004) of (N, H, W) maps with an 11x11 Gaussian window (sigma 1.5),
    K1 = 0.01, K2 = 0.03, population statistics, computed over the valid (unpadded) region."""
    a, b = a.double()[:, None], b.double()[:, None]
    radius = 5
    t = torch.arange(-radius, radius + 1, dtype=torch.float64, device=a.device)
    g = torch.exp(-(t**2) / (2 * sigma**2))
    g = g / g.sum()
    win = (g[:, None] * g[None, :]).view(1, 1, 11, 11)

    def filt(z: Tensor) -> Tensor:
        return F.conv2d(z, win)

    if a.shape[-1] < 11 or a.shape[-2] < 11:
        raise OptionError(f"SSIM needs maps of at least 11x11 pixels; got {tuple(a.shape[-2:])}.")
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a**2
    var_b = filt(b * b) - mu_b**2
    cov = filt(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.flatten(1).mean(1)


def topk_intersection(a: Tensor, b: Tensor, fraction: float) -> Tensor:
    """Fraction of the top-k pixels of ``a`` that are also among the top-k of ``b``."""
    fa, fb = a.flatten(1), b.flatten(1)
    k = max(1, int(round(fraction * fa.shape[1])))
    ia = torch.zeros_like(fa, dtype=torch.bool).scatter_(1, fa.topk(k, dim=1).indices, True)
    ib = torch.zeros_like(fb, dtype=torch.bool).scatter_(1, fb.topk(k, dim=1).indices, True)
    return (ia & ib).sum(1).double() / k


def _unit_scale(m: Tensor) -> Tensor:
    flat = m.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).view_as(m)


# ----------------------------------------------------------------------------- metric


@register_metric("randomization", family="randomization", higher_is_better=False,
                 needs=("model", "method", "parameters"), paper="Adebayo et al., NeurIPS 2018",
                 summary="Model-parameter randomization sanity check (cascading and independent), on a copy of the model")
class Randomization(Metric):
    """Cascading/independent model-parameter randomization test; score = mean Spearman
    correlation between original and cascading-randomized maps (lower is better).

    ``details`` holds, per mode, the randomized layer names per step and the Spearman,
    SSIM and top-k similarities per step and sample, plus the randomized maps of sample 0
    (for the report's sanity-check panel). ``absolute=True`` compares |maps| (Adebayo
    et al. report both)."""

    def __init__(self, *, mode: str = "both", steps: int = 5, similarity: str = "spearman",
                 absolute: bool = True, topk: float = 0.1, keep_maps: bool = True, **common: Any) -> None:
        super().__init__(**common)
        check_choice("mode", mode, MODES)
        check_choice("similarity", similarity, SIMILARITIES)
        check_int("steps", steps, minimum=1)
        check_float("topk", topk, minimum=0, maximum=1, strict=True)
        self.mode, self.steps, self.similarity = mode, steps, similarity
        self.absolute, self.topk, self.keep_maps = bool(absolute), float(topk), bool(keep_maps)

    def cost(self) -> tuple[int, int]:
        """(forward passes, re-explanations) per scored sample: the method re-run on each randomized
        copy (``steps`` layer groups, per mode)."""
        return 0, self.steps * (2 if self.mode == "both" else 1)

    def _maps(self, attr: Tensor, x: Tensor) -> Tensor:
        m = relevance_map(attr, x)
        return m.abs() if self.absolute else m

    def _similarities(self, ref: Tensor, new: Tensor) -> dict[str, Tensor]:
        return {
            "spearman": spearman(ref, new),
            "ssim": ssim(_unit_scale(ref), _unit_scale(new)) if min(ref.shape[-2:]) >= 11 else torch.full((len(ref),), math.nan, dtype=torch.float64),
            "topk": topk_intersection(ref, new, self.topk),
        }

    def _compute(self, ctx: Context) -> MetricResult:
        x, user_model = ctx.x, ctx.model
        ref = self._maps(ctx.attributions, x)
        groups = layer_groups(user_model, self.steps)
        modes = ("cascading", "independent") if self.mode == "both" else (self.mode,)
        target: Any = ctx.target.indices if ctx.target.indices is not None else ctx.target
        details: dict[str, Any] = {"layers": groups}
        total = {"forward_samples": 0, "backward_samples": 0}
        for mode in modes:
            work = copy.deepcopy(user_model)  # the user's model is never written to
            mods = dict(work.named_modules())
            originals = dict(user_model.named_modules())
            per_step: dict[str, list[Tensor]] = {k: [] for k in SIMILARITIES}
            maps = []
            for group in groups:
                with torch.no_grad():
                    if mode == "independent":  # undo the previous group's randomization
                        for a, b in zip(work.parameters(), user_model.parameters()):
                            a.copy_(b)
                    for name in group:
                        randomize_(mods[name], ctx.generator)
                attr, cost = ctx.explainer(work, x, target, ctx.labels, source=user_model)  # type: ignore[misc]
                for key, v in cost.items():
                    total[key] += v
                new = self._maps(attr.to(x.device), x)
                for key, v in self._similarities(ref, new).items():
                    per_step[key].append(v.cpu())
                if self.keep_maps:
                    maps.append(relevance_map(attr.to(x.device), x)[0].cpu())
            del originals
            details[mode] = {k: torch.stack(v, 1) for k, v in per_step.items()}  # (N, steps)
            if self.keep_maps:
                details[f"_{mode}_maps"] = torch.stack(maps)
        ctx.engine.forwards += total["forward_samples"]
        ctx.engine.backwards += total["backward_samples"]
        main = details["cascading"] if "cascading" in details else details["independent"]
        score = main[self.similarity].double().nanmean(1)
        return MetricResult(self.name, score, self.higher_is_better, details)
