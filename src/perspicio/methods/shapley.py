"""Shapley values of the masked-model game: exact, permutation sampling, KernelSHAP.

All three estimate the Shapley values of the same game (see :class:`~perspicio.core.maskers.MaskedGame`):
v(S) = mean over the replacement rows (the full background set, or the one baseline) of the
target score with the features outside S removed. They share the evaluator and differ only in
the sampler/solver (:meth:`solve`). Each returns ``base_value`` = v(empty set) and satisfies
efficiency: sum_i phi_i = v(all) - v(empty) = f(x) - base_value - exactly for ``shapley_exact``
and ``kernel_shap`` (a constrained solve) and for ``shapley_sampling`` too, because every
permutation's marginal contributions telescope; its standard errors measure the remaining
Monte-Carlo error per feature.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import torch
from torch import Tensor, nn

from ..core.explanation import Explanation
from ..core.maskers import MaskedGame
from ..core.registry import register_method
from ..errors import OptionError
from .perturbation import FeatureMethod, FeatureResult, check_int

#: largest number of features shapley_exact enumerates (2^20 coalitions)
MAX_EXACT_FEATURES = 20


def shapley_weights(m: int) -> Tensor:
    """w(s) = s! (m - s - 1)! / m! for coalition sizes s = 0..m-1 (float64)."""
    s = torch.arange(m, dtype=torch.float64)
    return torch.exp(torch.lgamma(s + 1) + torch.lgamma(m - s) - math.lgamma(m + 1))


def coalitions_from_ints(ints: Tensor, m: int) -> Tensor:
    """Bit i of each integer -> membership of feature i: (B, m) bool."""
    return ((ints[:, None] >> torch.arange(m)) & 1).bool()


def exact_shapley(values: Tensor, m: int) -> Tensor:
    """Shapley values from the values (2^m,) of all coalitions indexed by bitmask."""
    # index bits are little-endian, so in the (2,)*m C-order view bit i is axis m - 1 - i
    size = torch.zeros(1, dtype=torch.long)
    for _ in range(m):
        size = torch.cat([size, size + 1])  # popcount of 0..2^m - 1
    w = shapley_weights(m)
    cube = values.reshape((2,) * m)
    sizes = size.reshape((2,) * m)
    phi = torch.empty(m, dtype=torch.float64)
    for i in range(m):
        axis = m - 1 - i
        without = sizes.select(axis, 0)
        phi[i] = (w[without] * (cube.select(axis, 1) - cube.select(axis, 0))).sum()
    return phi


def efficiency_error(explanation: Explanation) -> Tensor:
    """|sum_i phi_i - (f(x) - base_value)| per sample, from the per-feature values."""
    if explanation.base_value is None or "values" not in explanation.extras:
        raise OptionError(f"{explanation.method} explanations have no base value: efficiency does not apply.")
    total = torch.stack([v.sum() for v in explanation.extras["values"]])
    return (total - (explanation.scores.detach().cpu().double() - explanation.base_value.double())).abs()


def _default_budget(m: int) -> int:
    return 2 * m + 2048


def _check_budget(name: str, budget: int, minimum: int, m: int, what: str) -> None:
    if budget < minimum:
        raise OptionError(f"budget={budget} is below the minimum {name} needs for {m} features: {minimum} "
                          f"evaluations ({what}).")


@register_method("shapley_exact", family="shapley", model_agnostic=True,
                 summary="Exact Shapley values by enumerating all 2^M coalitions (M <= 20)",
                 paper="Shapley, 1953; Lundberg & Lee, NeurIPS 2017")
class ShapleyExact(FeatureMethod):
    """phi_i = sum_{S not containing i} |S|! (M - |S| - 1)! / M! (v(S + i) - v(S)).

    Costs 2^M evaluations; refuses more than 20 features. Default image features: a 3 x 3 grid.
    """

    default_image_features = "grid:3"

    def solve(self, game: MaskedGame, generator: torch.Generator) -> FeatureResult:
        m = game.n_features
        if m > MAX_EXACT_FEATURES:
            raise OptionError(f"shapley_exact enumerates 2^M coalitions and supports up to {MAX_EXACT_FEATURES} "
                              f"features; this input has {m}. Group features with feature_mask, or use "
                              "kernel_shap / shapley_sampling.")
        if self.budget is not None:
            _check_budget("shapley_exact", self.budget, 1 << m, m, "all 2^M coalitions")
        ints = torch.arange(1 << m)
        values = game(coalitions_from_ints(ints, m))
        phi = exact_shapley(values, m)
        return FeatureResult(values=phi, base_value=float(values[0]), stderr=torch.zeros(m, dtype=torch.float64))


@register_method("shapley_sampling", family="shapley", model_agnostic=True,
                 summary="Shapley values from antithetic permutation sampling, with standard errors",
                 paper="Castro et al., 2009; Mitchell et al., JMLR 2022 (antithetic permutations)")
class ShapleySampling(FeatureMethod):
    """Average marginal contributions along random permutations, each paired with its reverse.

    Each permutation costs M - 1 evaluations (v(empty) and v(all) are evaluated once), so
    ``budget`` (default 2M + 2048) buys floor((budget - 2) / (M - 1)) permutations, rounded down
    to whole antithetic pairs (minimum budget: 2M). The standard error of each value is the
    standard deviation of the pair means over sqrt(pairs). With ``tolerance``, sampling stops
    once every standard error is below it (checked after each round of ``round_pairs`` pairs).
    """

    def __init__(self, model: nn.Module, *, tolerance: float | None = None, round_pairs: int | None = None,
                 **common: Any) -> None:
        super().__init__(model, **common)
        if tolerance is not None and (not isinstance(tolerance, (int, float)) or tolerance <= 0):
            raise OptionError(f"tolerance must be a positive number (standard error); got {tolerance!r}.")
        self.tolerance = tolerance
        self.round_pairs = check_int("round_pairs", round_pairs, 2)

    def solve(self, game: MaskedGame, generator: torch.Generator) -> FeatureResult:
        m = game.n_features
        ends = game(torch.stack([torch.zeros(m, dtype=torch.bool), torch.ones(m, dtype=torch.bool)]))
        v0, v1 = float(ends[0]), float(ends[1])
        if m == 1:
            return FeatureResult(values=torch.tensor([v1 - v0], dtype=torch.float64), base_value=v0,
                                 stderr=torch.zeros(1, dtype=torch.float64), extras={"permutations": 0})
        budget = self.budget if self.budget is not None else _default_budget(m)
        _check_budget("shapley_sampling", budget, 2 * m, m, "v(empty), v(all) and one antithetic pair of permutations")
        total_pairs = (budget - 2) // (2 * (m - 1))
        per_round = self.round_pairs or (max(2, math.ceil(total_pairs / 8)) if self.tolerance else total_pairs)
        pair_means: list[Tensor] = []
        done = 0
        while done < total_pairs:
            k = min(per_round, total_pairs - done)
            perms = torch.rand(k, m, generator=generator, device=generator.device).argsort(dim=1).cpu()
            perms = torch.cat([perms, perms.flip(1)])  # antithetic: each permutation and its reverse
            ranks = perms.argsort(dim=1)
            steps = torch.arange(1, m)
            z = (ranks[:, None, :] < steps[None, :, None]).reshape(-1, m)  # prefixes of size 1..m-1
            inner = game(z).view(2 * k, m - 1)
            chain = torch.cat([torch.full((2 * k, 1), v0, dtype=torch.float64), inner,
                               torch.full((2 * k, 1), v1, dtype=torch.float64)], dim=1)
            contrib = torch.zeros(2 * k, m, dtype=torch.float64).scatter_(1, perms, chain.diff(dim=1))
            pair_means.append(0.5 * (contrib[:k] + contrib[k:]))
            done += k
            if self.tolerance is not None and done >= 2:
                d = torch.cat(pair_means)
                if float((d.std(dim=0) / math.sqrt(len(d))).max()) < self.tolerance:
                    break
        d = torch.cat(pair_means)
        phi = d.mean(dim=0)
        se = d.std(dim=0) / math.sqrt(len(d)) if len(d) > 1 else torch.full((m,), float("nan"), dtype=torch.float64)
        return FeatureResult(values=phi, base_value=v0, stderr=se, extras={"permutations": 2 * len(d)})


@register_method("kernel_shap", family="shapley", model_agnostic=True,
                 summary="KernelSHAP: Shapley-kernel weighted regression, paired sampling, exact efficiency",
                 paper="Lundberg & Lee, NeurIPS 2017; Covert & Lee, AISTATS 2021")
class KernelSHAP(FeatureMethod):
    """Weighted least squares fit of v(z) ~ v(empty) + z . phi with the Shapley kernel weights,
    subject to sum(phi) = v(all) - v(empty) (solved exactly by a Lagrange multiplier).

    ``budget`` (default 2M + 2048, at most 2^M) counts all evaluations including v(empty) and
    v(all); at least M + 2 are needed. Coalition sizes are enumerated completely, from the
    outside in ({1, M-1}, {2, M-2}, ...) while the budget allows; the remaining sizes are
    sampled in complementary pairs (z, 1 - z), with the pair's size stratified over the
    remaining kernel mass and each sample weighted equally. With a full budget the result is
    the exact Shapley value. Standard errors come from the delta method on the sampled pairs
    (zero when everything was enumerated).
    """

    def solve(self, game: MaskedGame, generator: torch.Generator) -> FeatureResult:
        m = game.n_features
        ends = game(torch.stack([torch.zeros(m, dtype=torch.bool), torch.ones(m, dtype=torch.bool)]))
        v0, v1 = float(ends[0]), float(ends[1])
        if m == 1:
            return FeatureResult(values=torch.tensor([v1 - v0], dtype=torch.float64), base_value=v0,
                                 stderr=torch.zeros(1, dtype=torch.float64))
        full = (1 << m) if m < 62 else 1 << 62
        budget = min(self.budget if self.budget is not None else _default_budget(m), full)
        _check_budget("kernel_shap", budget, min(m + 2, full), m, "v(empty), v(all) and M coalitions for the regression")
        left = budget - 2
        sizes = torch.arange(1, m, dtype=torch.float64)
        mass = (m - 1) / (sizes * (m - sizes))
        mass = mass / mass.sum()  # kernel mass of each size 1..m-1
        zs: list[Tensor] = []
        ws: list[Tensor] = []
        remaining = set(range(1, m))
        for s in range(1, m // 2 + 1):
            partner = m - s
            count = math.comb(m, s) * (1 if s == partner else 2)
            if count > left:
                break
            for size in {s, partner}:
                combos = torch.tensor(list(itertools.combinations(range(m), size)), dtype=torch.long)
                z = torch.zeros(len(combos), m, dtype=torch.bool)
                z.scatter_(1, combos, True)
                zs.append(z)
                ws.append(torch.full((len(z),), float(mass[size - 1]) / len(z), dtype=torch.float64))
                remaining.discard(size)
            left -= count
        n_pairs = left // 2 if remaining else 0
        sampled = None
        if n_pairs > 0:
            rem = sorted(remaining)
            p = mass[[s - 1 for s in rem]]
            r_mass = float(p.sum())
            # systematic (stratified) allocation of the pairs over the remaining sizes
            expected = torch.cumsum(p / r_mass * n_pairs, 0)
            u = float(torch.rand(1, generator=generator, device=generator.device))
            cuts = torch.floor(expected + u).long()
            counts = torch.diff(torch.cat([torch.tensor([int(math.floor(u))]), cuts])).tolist()
            counts[-1] += n_pairs - sum(counts)
            size_of_pair = torch.repeat_interleave(torch.tensor(rem), torch.tensor(counts))
            order = torch.rand(n_pairs, m, generator=generator, device=generator.device).argsort(dim=1).cpu()
            z = order.argsort(dim=1) < size_of_pair[:, None]  # a uniform subset of the pair's size
            sampled = torch.cat([z, ~z])
            zs.append(sampled)
            ws.append(torch.full((2 * n_pairs,), r_mass / (2 * n_pairs), dtype=torch.float64))
        z_all = torch.cat(zs) if zs else torch.zeros(0, m, dtype=torch.bool)
        w_all = torch.cat(ws) if ws else torch.zeros(0, dtype=torch.float64)
        y = game(z_all) - v0
        zf = z_all.double()
        a = (zf * w_all[:, None]).T @ zf
        b = (zf * w_all[:, None]).T @ y
        phi, apply_l = _constrained_solve(a, b, v1 - v0)
        if sampled is not None and n_pairs > 1:
            n_enum = len(z_all) - 2 * n_pairs
            res = y[n_enum:] - zf[n_enum:] @ phi
            g = ws[-1][0] * (zf[n_enum:] * res[:, None])
            g = g[:n_pairs] + g[n_pairs:]  # one term per pair
            d = apply_l((g - g.mean(dim=0)).T)  # (m, n_pairs)
            se = torch.sqrt((d**2).sum(dim=1) * n_pairs / (n_pairs - 1))
        else:
            se = torch.zeros(m, dtype=torch.float64)
        return FeatureResult(values=phi, base_value=v0, stderr=se,
                             extras={"enumerated": len(z_all) - (2 * n_pairs if sampled is not None else 0),
                                     "sampled": 2 * n_pairs if sampled is not None else 0})


def _constrained_solve(a: Tensor, b: Tensor, total: float) -> tuple[Tensor, Any]:
    """argmin phi' A phi - 2 b' phi subject to sum(phi) = total, and the linear map
    r -> A^-1 r - A^-1 1 (1' A^-1 r) / (1' A^-1 1) used for the delta-method errors."""
    m = a.shape[0]
    ones = torch.ones(m, dtype=torch.float64)
    scale = float(a.diagonal().mean()) or 1.0

    def inv(r: Tensor) -> Tensor:
        try:
            return torch.linalg.solve(a / scale, r) / scale
        except RuntimeError:  # singular (too few distinct coalitions): least-norm solution
            return torch.linalg.pinv(a / scale) @ r / scale

    ainv_1 = inv(ones)
    denom = float(ones @ ainv_1)

    def apply_l(r: Tensor) -> Tensor:
        ar = inv(r)
        return ar - ainv_1[:, None] * (ones @ ar)[None] / denom if ar.ndim == 2 else ar - ainv_1 * (ones @ ar) / denom

    ainv_b = inv(b)
    phi = ainv_b - ainv_1 * (float(ones @ ainv_b) - total) / denom
    return phi, apply_l
