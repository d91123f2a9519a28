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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.explanation import Explanation
from ..core.maskers import MaskedGame
from ..core.options import check_float, check_int
from ..core.registry import register_method
from ..errors import OptionError
from .perturbation import FeatureMethod, FeatureResult

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
        check_float("tolerance", tolerance, minimum=0, strict=True, allow_none=True, hint="standard error")
        self.tolerance = tolerance
        self.round_pairs = check_int("round_pairs", round_pairs, minimum=2, allow_none=True)

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
    v(all); at least M + 2 are needed. Coalitions come in complementary pairs (z, 1 - z), grouped
    into strata by the smaller size t = 1..M/2; stratum t holds kernel mass K_t and N_t pairs.

    Budget allocation: a stratum is enumerated completely only when its proportional share of
    the pairs still unspent, B K_t / K_left, covers all N_t of its pairs (so enumerating it costs
    no more than sampling would have spent on it, and the other strata keep their share); strata
    are considered from the outside in (increasing N_t / K_t) and the first that fails stops
    the enumeration. The remaining pairs are split over the remaining strata in proportion to
    K_t (at least one each, at most N_t), and each stratum is sampled uniformly *without*
    replacement, its pairs weighted K_t / k_t. The estimate therefore moves smoothly from
    sampling to enumeration as the budget grows, and a full budget gives the exact Shapley
    value. Standard errors come from the delta method on the stratified sample (within-stratum
    covariance with the finite-population correction; strata with a single pair borrow the
    pooled within-stratum covariance, or with one pair in every stratum the strata are collapsed
    into one); they are zero only when every coalition was evaluated, and NaN when no variance
    can be estimated (a single sampled pair, possible only for M = 3).
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
        plan = allocate_pairs(m, (budget - 2) // 2)
        zs: list[Tensor] = []
        ws: list[Tensor] = []
        for stratum in plan:
            z = _stratum_pairs(m, stratum.size, stratum.count, stratum.population, generator)
            zs.append(torch.cat([z, ~z]))
            ws.append(torch.full((2 * len(z),), stratum.mass / (2 * len(z)), dtype=torch.float64))
        z_all = torch.cat(zs)
        w_all = torch.cat(ws)
        y = game(z_all) - v0
        zf = z_all.double()
        a = (zf * w_all[:, None]).T @ zf
        b = (zf * w_all[:, None]).T @ y
        phi, apply_l, undetermined = _constrained_solve(a, b, v1 - v0)
        se = _stratified_stderr(plan, zf, w_all, y - zf @ phi, apply_l, m)
        se[undetermined] = math.inf
        sampled = sum(2 * s.count for s in plan if s.count < s.population)
        return FeatureResult(values=phi, base_value=v0, stderr=se,
                             extras={"enumerated": len(z_all) - sampled, "sampled": sampled})


@dataclass(frozen=True)
class Stratum:
    """Complementary pairs whose smaller coalition has ``size`` features: ``count`` of the
    ``population`` pairs are evaluated; ``mass`` is the stratum's share of the Shapley kernel."""

    size: int
    count: int
    population: int
    mass: float


def allocate_pairs(m: int, pairs: int) -> list[Stratum]:
    """KernelSHAP's plan for ``pairs`` complementary pairs over M = ``m`` features (see :class:`KernelSHAP`).

    Needs ``pairs >= m // 2`` (one pair per stratum). The returned counts sum to at most ``pairs``
    (exactly ``pairs`` unless every coalition fits).
    """
    sizes = list(range(1, m // 2 + 1))
    if pairs < len(sizes):
        raise OptionError(f"kernel_shap needs at least {len(sizes)} coalition pairs for {m} features; got {pairs}.")
    # kernel mass of size s: (m - 1) / (s (m - s)), normalised over s = 1..m-1; a pair holds s and m - s
    raw = {s: (m - 1) / (s * (m - s)) for s in range(1, m)}
    total = sum(raw.values())
    mass = {t: (raw[t] + (raw[m - t] if 2 * t != m else 0.0)) / total for t in sizes}
    population = {t: math.comb(m, t) // (2 if 2 * t == m else 1) for t in sizes}
    plan: list[Stratum] = []
    left, mass_left = pairs, 1.0
    rest = list(sizes)  # increasing population / mass: outside in
    while rest:
        t = rest[0]
        share = left * mass[t] / mass_left
        if share < population[t] * (1 - 1e-12) or left - population[t] < len(rest) - 1:
            break
        plan.append(Stratum(t, population[t], population[t], mass[t]))
        left -= population[t]
        mass_left -= mass[t]
        rest.pop(0)
    if not rest:
        return plan
    # proportional allocation, at least one pair per stratum, at most its population
    share = {t: left * mass[t] / mass_left for t in rest}
    count = {t: min(population[t], max(1, math.floor(share[t]))) for t in rest}
    spare = left - sum(count.values())
    while spare > 0:
        open_ = [t for t in rest if count[t] < population[t]]
        if not open_:
            break
        t = max(open_, key=lambda s: (share[s] - count[s], -s))  # largest remainder first
        count[t] += 1
        spare -= 1
    while spare < 0:  # the minimum of one pair per stratum overshot: take from the largest shares
        t = max((s for s in rest if count[s] > 1), key=lambda s: (count[s] - share[s], s))
        count[t] -= 1
        spare += 1
    plan += [Stratum(t, count[t], population[t], mass[t]) for t in rest]
    return plan


def _stratum_pairs(m: int, t: int, k: int, population: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct pairs of stratum ``t`` (as their size-``t`` side; for t = M/2 the side holding
    feature 0), uniformly without replacement: (k, m) bool."""
    if population <= 4 * k:  # small or nearly full stratum: enumerate it and choose k
        first = [(0,) + c for c in itertools.combinations(range(1, m), t - 1)] if 2 * t == m \
            else list(itertools.combinations(range(m), t))
        combos = torch.tensor(first, dtype=torch.long)
        if k < population:
            pick = torch.randperm(population, generator=generator, device=generator.device).cpu()[:k]
            combos = combos[pick.sort().values]
        z = torch.zeros(len(combos), m, dtype=torch.bool)
        return z.scatter_(1, combos, True)
    seen: set[bytes] = set()
    rows: list[Tensor] = []
    while len(rows) < k:  # rejection of repeats; at least 3 in 4 draws are new
        draw = k - len(rows)
        blocks = m // t  # disjoint subsets cut from one random permutation: every feature covered evenly
        perms = -(-draw // blocks)
        order = torch.rand(perms, m, generator=generator, device=generator.device).argsort(dim=1).cpu()
        rank = order.argsort(dim=1)
        z = torch.cat([(rank >= j * t) & (rank < (j + 1) * t) for j in range(blocks)], dim=0)
        z = z.view(blocks, perms, m).transpose(0, 1).reshape(-1, m)[:draw]
        if 2 * t == m:
            z = torch.where(z[:, :1], z, ~z)
        for row in z:
            key = row.numpy().tobytes()
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return torch.stack(rows)


def _stratified_stderr(plan: list[Stratum], zf: Tensor, w: Tensor, res: Tensor, apply_l: Any, m: int) -> Tensor:
    """Delta-method standard errors of the constrained WLS solution under the stratified design.

    The normal equations' score is a sum over pairs of K_t / (2 k_t) g_p with
    g_p = z r(z) + (1 - z) r(1 - z) (r the residual); its covariance is the sum over strata of
    (1 - k_t / N_t) K_t^2 / (4 k_t) Cov_t(g), and the errors are the diagonal of L Cov L'.
    Residuals of sampled pairs are divided by sqrt(1 - h) (h the pair's leverage, as in HC2): a
    pair the fit must pass through (h = 1) leaves the features it moves with an infinite error,
    since nothing measures how far the estimate is from the truth.
    """
    grads: list[tuple[Stratum, Tensor]] = []
    sampled = torch.zeros(len(zf), dtype=torch.bool)
    start = 0
    for s in plan:
        if s.count < s.population:
            sampled[start:start + 2 * s.count] = True
        start += 2 * s.count
    if not bool(sampled.any()):
        return torch.zeros(m, dtype=torch.float64)  # every coalition evaluated: exact
    infl = apply_l(zf[sampled].T).T  # (n, m): change of phi per unit of each sampled row's score
    lev = w[sampled] * (infl * zf[sampled]).sum(dim=1)
    # a pair's leverage is the sum over its two coalitions (rows come as [z..., 1 - z...] per stratum)
    pair_lev = torch.zeros_like(lev)
    start = 0
    for s in plan:
        if s.count < s.population:
            k = s.count
            both = lev[start:start + k] + lev[start + k:start + 2 * k]
            pair_lev[start:start + k] = both
            pair_lev[start + k:start + 2 * k] = both
            start += 2 * k
    pinned = pair_lev > 1 - 1e-9
    unknown = (infl[pinned].abs() > 1e-9 * float(infl.abs().max())).any(dim=0)
    res = res.clone()
    res[sampled] = res[sampled] / torch.sqrt((1 - pair_lev).clamp_min(1e-9))
    start = 0
    for s in plan:
        n = 2 * s.count
        g = zf[start:start + n] * res[start:start + n, None]
        start += n
        if s.count < s.population:
            grads.append((s, g[:s.count] + g[s.count:]))
    se = _design_stderr(grads, apply_l, m)
    se[unknown] = math.inf
    return se


def _design_stderr(grads: list[tuple[Stratum, Tensor]], apply_l: Any, m: int) -> Tensor:
    """Standard errors from the per-pair scores of the sampled strata (see _stratified_stderr)."""
    cov = torch.zeros(m, m, dtype=torch.float64)
    pooled, dof = torch.zeros(m, m, dtype=torch.float64), 0
    for _, g in grads:
        if len(g) > 1:
            c = g - g.mean(dim=0)
            pooled += c.T @ c
            dof += len(g) - 1
    if dof == 0:  # one pair per stratum: collapse the strata into one (conservative)
        if len(grads) < 2:
            return torch.full((m,), float("nan"), dtype=torch.float64)  # a single sampled pair
        d = torch.cat([s.mass / 2 * g for s, g in grads])
        c = d - d.mean(dim=0)
        cov = c.T @ c * len(d) / (len(d) - 1)
        return torch.sqrt(apply_l(apply_l(cov).T).diagonal().clamp_min(0.0))
    pooled /= dof
    for s, g in grads:
        if len(g) > 1:
            c = g - g.mean(dim=0)
            within = c.T @ c / (len(g) - 1)
        else:
            within = pooled
        cov += (1 - s.count / s.population) * (s.mass / 2) ** 2 / s.count * within  # coalition weight K_t / (2 k_t)
    # L is linear: L cov L' from its action on the columns, then on the rows
    lc = apply_l(cov)
    return torch.sqrt(apply_l(lc.T).diagonal().clamp_min(0.0))


def _constrained_solve(a: Tensor, b: Tensor, total: float) -> tuple[Tensor, Any, Tensor]:
    """argmin phi' A phi - 2 b' phi subject to sum(phi) = total, the linear map L (r -> the change of
    phi for a change r of b) used for the delta-method errors, and a mask of the features the
    data do not determine.

    Writing phi = total / M + P u (P the projection off the all-ones vector) gives the normal
    equations (P A P) u = P (b - A 1 total / M). Directions where P A P vanishes (two features that are
    always in or out together, too few distinct coalitions) are not determined: they get the
    least-norm solution, i.e. the features involved share their part equally, and are flagged.
    """
    m = a.shape[0]
    ones = torch.ones(m, dtype=torch.float64)
    scale = float(a.diagonal().mean()) or 1.0
    proj = torch.eye(m, dtype=torch.float64) - 1.0 / m
    # the all-ones direction gets eigenvalue 1 so that only undetermined directions are small
    h = proj @ (a / scale) @ proj + 1.0 / m
    lam, vec = torch.linalg.eigh((h + h.T) / 2)
    keep = lam > 1e-9 * float(lam.max())
    vk = vec[:, keep] / lam[keep]

    def apply_l(r: Tensor) -> Tensor:
        pr = proj @ r / scale
        return vec[:, keep] @ (vk.T @ pr)

    base = ones * (total / m)
    phi = base + apply_l(b - a @ base)
    undetermined = (vec[:, ~keep] ** 2).sum(dim=1) > 1e-12
    return phi, apply_l, undetermined
