"""Faithfulness: does removing what the explanation calls important change the prediction?

Every metric here builds its perturbed copies chunk by chunk inside
:meth:`~perspicio.core.batching.Engine.map` (all samples x all steps form one
flat index space, so there is no Python loop over samples around model calls)
and draws its randomness from a local, seeded ``torch.Generator``.

Features are pixels (all channels of a pixel move together) or square patches;
pixel relevance is the attribution summed over channels (resized to the input
for maps at another resolution).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.baselines import gaussian_blur, make_baseline
from ..core.options import check_choice, check_float, check_int
from ..core.registry import register_metric
from ..errors import OptionError
from .base import SCORES, Context, Metric, MetricResult, attributions_like_input, rand, randn

REPLACEMENTS = ("zero", "blur", "mean")
ORDERS = ("morf", "lerf")
UNITS = ("pixel", "patch")


# ----------------------------------------------------------------------------- helpers


def replacement_image(x: Tensor, kind: str, sigma: float = 5.0) -> Tensor:
    """What removed features are replaced with: the baseline ``kind`` of :mod:`perspicio.core.baselines`
    ("zero" or "mean"), or for "blur" the metrics' blurred copy (``sigma`` in pixels, radius ceil(2 sigma),
    mirrored borders; see that module)."""
    if kind == "blur":
        return gaussian_blur(x, sigma, truncate=2.0, padding="reflect")
    return make_baseline(kind, x)


def feature_ranks(rel: Tensor, *, order: str = "morf", unit: str = "pixel", patch_size: int = 16) -> tuple[Tensor, int]:
    """Rank of every pixel's feature (0 = removed first) and the number of features.

    ``morf`` removes the most relevant first, ``lerf`` the least relevant first; ties
    keep raster order (stable sort). With ``unit="patch"`` a feature is a
    ``patch_size`` square (edge patches may be smaller) scored by its mean relevance.
    """
    n, h, w = rel.shape
    if unit == "patch":
        p = patch_size
        ones = torch.ones(1, 1, h, w, device=rel.device, dtype=rel.dtype)
        total = F.avg_pool2d(rel[:, None], p, ceil_mode=True, divisor_override=1)
        count = F.avg_pool2d(ones, p, ceil_mode=True, divisor_override=1)
        score = (total / count)[:, 0]
        ph, pw = score.shape[-2:]
        flat = score.reshape(n, -1)
    else:
        flat = rel.reshape(n, -1)
    key = -flat if order == "morf" else flat
    order_idx = torch.sort(key, dim=1, stable=True).indices
    ranks = torch.empty_like(order_idx)
    ranks.scatter_(1, order_idx, torch.arange(flat.shape[1], device=rel.device).expand(n, -1).contiguous())
    if unit == "patch":
        ranks = ranks.view(n, ph, pw).repeat_interleave(p, 1).repeat_interleave(p, 2)[:, :h, :w]
    else:
        ranks = ranks.view(n, h, w)
    return ranks, flat.shape[1]


def step_counts(n_features: int, steps: int, device: torch.device) -> Tensor:
    """Features removed after each of ``steps + 1`` steps: round(k * n / steps), k = 0..steps."""
    k = torch.arange(steps + 1, device=device, dtype=torch.float64)
    return torch.round(k * n_features / steps).long()


def auc(curve: Tensor) -> Tensor:
    """Trapezoidal area under curves (N, K+1) sampled at equally spaced points of [0, 1]."""
    k = curve.shape[1] - 1
    return (curve.sum(1) - (curve[:, 0] + curve[:, -1]) / 2) / k


def _check_common(score: str, order: str, unit: str, patch_size: int, replacement: str, steps: int | None = None) -> None:
    check_choice("score", score, SCORES)
    check_choice("order", order, ORDERS)
    check_choice("unit", unit, UNITS)
    check_choice("replacement", replacement, REPLACEMENTS)
    check_int("patch_size", patch_size, minimum=1)
    if steps is not None:
        check_int("steps", steps, minimum=1)


# ----------------------------------------------------------------------------- deletion / insertion


class _Curve(Metric):
    """Shared deletion/insertion pipeline (Petsiuk et al., RISE, BMVC 2018)."""

    insertion: bool = False

    def __init__(
        self,
        *,
        steps: int = 100,
        order: str = "morf",
        unit: str = "pixel",
        patch_size: int = 16,
        replacement: str | None = None,
        sigma: float = 5.0,
        score: str = "probability",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        replacement = replacement or ("blur" if self.insertion else "zero")
        _check_common(score, order, unit, patch_size, replacement, steps)
        check_float("sigma", sigma, minimum=0, strict=True, hint="blur width in pixels")
        self.steps, self.order, self.unit, self.patch_size = steps, order, unit, patch_size
        self.replacement, self.sigma, self.score = replacement, float(sigma), score
        # MoRF deletion wants a fast drop (low area); LeRF deletion wants the score to stay (high area)
        base = type(self).higher_is_better
        self.higher_is_better = base if order == "morf" else not base

    def cost(self) -> tuple[int, int]:
        """(forward passes, re-explanations) per scored sample: one pass per curve step."""
        return self.steps, 0

    def _compute(self, ctx: Context) -> MetricResult:
        x = ctx.x
        n = x.shape[0]
        ranks, n_feat = feature_ranks(ctx.relevance, order=self.order, unit=self.unit, patch_size=self.patch_size)
        if self.steps > n_feat:
            raise OptionError(f"steps={self.steps} exceeds the {n_feat} features ({self.unit}s) of the input.")
        counts = step_counts(n_feat, self.steps, x.device)
        # int32 ranks: the per-step comparison reads half the bytes
        ranks = ranks.to(torch.int32) if n_feat < 2**31 else ranks
        counts = counts.to(ranks.dtype)
        # removed (deletion) or not yet inserted features take these values (a broadcast 0 for zero)
        if self.replacement == "zero":
            fill = torch.zeros((), dtype=x.dtype, device=x.device)
        else:
            fill = replacement_image(x, self.replacement, self.sigma)
        s = self.steps
        # rows: sample-major, s perturbed copies per sample (the full image is ctx.output)
        offset = 0 if self.insertion else 1
        # build the batch in the memory format the engine runs the model in (no conversion copy)
        fmt = torch.channels_last if (x.ndim == 4 and ctx.engine.prefers_channels_last(x)) else torch.contiguous_format

        def make(start: int, stop: int) -> tuple[Tensor, Tensor]:
            batch = torch.empty((stop - start, *x.shape[1:]), dtype=x.dtype, device=x.device, memory_format=fmt)
            r = start
            while r < stop:  # the chunk's rows of one sample at a time: broadcast, no gathered copies
                i = r // s
                end = min(stop, (i + 1) * s)
                k = torch.arange(r - i * s + offset, end - i * s + offset, device=x.device)
                m = (ranks[i] < counts[k][:, None, None])[:, None]  # (rows, 1, H, W): feature already moved
                other = fill if fill.ndim == 0 else fill[i]
                if self.insertion:
                    torch.where(m, x[i], other, out=batch[r - start:end - start])
                else:
                    torch.where(m, other, x[i], out=batch[r - start:end - start])
                r = end
            return batch, torch.arange(start, stop, device=x.device) // s

        vals = ctx.forward_scores(make, n * s, self.score, description=self.name).view(n, s)
        full = ctx.scores(ctx.output, torch.arange(n, device=x.device), self.score).float()[:, None]
        curve = torch.cat([vals, full], 1) if self.insertion else torch.cat([full, vals], 1)
        fractions = (counts.double() / n_feat).cpu()
        return MetricResult(self.name, auc(curve), self.higher_is_better,
                            {"curve": curve.cpu(), "fraction": fractions})


@register_metric("deletion", family="faithfulness", model_agnostic=True, higher_is_better=False,
                 needs=("model",), paper="Petsiuk et al., RISE, BMVC 2018",
                 summary="Area under the score curve while removing features, most relevant first (lower is better)")
class Deletion(_Curve):
    """Deletion curve: replace features most-relevant-first (``order="morf"``) step by step;
    score = area under the target's score curve. ``order="lerf"`` removes the least relevant
    first (then a high area is good)."""

    insertion = False


@register_metric("insertion", family="faithfulness", model_agnostic=True, higher_is_better=True,
                 needs=("model",), paper="Petsiuk et al., RISE, BMVC 2018",
                 summary="Area under the score curve while inserting features into a blurred image, most relevant first")
class Insertion(_Curve):
    """Insertion curve: start from a blurred (or zero/mean) image and insert features
    most-relevant-first; score = area under the target's score curve (higher is better)."""

    insertion = True


# ----------------------------------------------------------------------------- ROAD


_ROAD_KERNEL = ((1 / 12, 1 / 6, 1 / 12), (1 / 6, 0.0, 1 / 6), (1 / 12, 1 / 6, 1 / 12))


_OFFSETS = ((1, 1), (0, 1), (-1, 1), (1, -1), (0, -1), (-1, -1), (1, 0), (-1, 0))


def _impute_direct(x: Tensor, mask: Tensor) -> Tensor:
    """Exact solution of the imputation system with a sparse LU factorisation (scipy), per sample."""
    import numpy as np
    import scipy.sparse as sp
    from scipy.sparse.linalg import splu

    n, c, h, w = x.shape
    xs = x.detach().double().cpu().numpy().reshape(n, c, h * w)
    ms = mask.cpu().numpy().reshape(n, h * w)
    out = xs.copy()
    for i in range(n):  # one factorisation per sample, shared by its channels; no model calls here
        idx = np.flatnonzero(ms[i])
        nu = len(idx)
        if nu == 0:
            continue
        var = np.full(h * w, -1)
        var[idx] = np.arange(nu)
        ui, uj = idx // w, idx % w
        diag = np.zeros(nu)
        rhs = np.zeros((nu, c))
        rows, cols, vals = [np.arange(nu)], [np.arange(nu)], []
        for (dy, dx) in _OFFSETS:
            wt = 1 / 12 if dy and dx else 1 / 6
            ni, nj = ui + dy, uj + dx
            ok = (ni >= 0) & (ni < h) & (nj >= 0) & (nj < w)
            diag[ok] += wt
            src = np.flatnonzero(ok)
            nb = ni[ok] * w + nj[ok]
            unknown = ms[i][nb]
            rows.append(src[unknown])
            cols.append(var[nb[unknown]])
            vals.append(np.full(int(unknown.sum()), -wt))
            np.add.at(rhs, src[~unknown], wt * xs[i][:, nb[~unknown]].T)
        a = sp.csc_matrix((np.concatenate([diag, *vals]), (np.concatenate(rows), np.concatenate(cols))), shape=(nu, nu))
        out[i][:, idx] = splu(a).solve(rhs).T
    return torch.from_numpy(out.reshape(n, c, h, w)).to(x.device)


def noisy_linear_imputation(
    x: Tensor,
    mask: Tensor,
    *,
    noise: float = 0.01,
    generator: torch.Generator | None = None,
    solver: str = "auto",
    tol: float = 1e-7,
    max_iter: int = 5000,
) -> Tensor:
    """Fill the pixels where ``mask`` (N, H, W) is True with ROAD's noisy linear imputation.

    Each removed pixel becomes the weighted mean of its 8 neighbours (weights 1/6 for
    edge neighbours, 1/12 for diagonal ones, renormalised at the border) - a sparse
    linear system over all removed pixels at once (Rong et al., ICML 2022) - plus
    Gaussian noise of std ``noise``. The system is symmetric positive definite.
    ``solver="direct"`` factorises it with scipy's sparse LU (exact, fast); ``"cg"``
    runs conjugate gradients on the device for all samples and channels together (a
    3x3 convolution per iteration; no scipy needed, slow for large holes); ``"auto"``
    uses scipy when it is installed.
    """
    if solver == "auto":
        try:
            import scipy.sparse.linalg  # noqa: F401

            solver = "direct"
        except ImportError:
            solver = "cg"
    if solver not in ("direct", "cg"):
        raise OptionError(f"solver must be 'auto', 'direct' or 'cg'; got {solver!r}.")
    if solver == "direct":
        out = _impute_direct(x, mask)
        u = mask.to(out.dtype)[:, None].expand_as(out)
        return _add_noise(out, u, noise, generator).to(x.dtype)
    n, c, h, w = x.shape
    dt = torch.float64
    kern = torch.tensor(_ROAD_KERNEL, dtype=dt, device=x.device).view(1, 1, 3, 3)
    u = mask.to(dt)[:, None].expand(n, c, h, w).reshape(n * c, 1, h, w)
    xv = x.to(dt).reshape(n * c, 1, h, w)
    s = F.conv2d(torch.ones(1, 1, h, w, dtype=dt, device=x.device), kern, padding=1)

    def conv(z: Tensor) -> Tensor:
        return F.conv2d(z, kern, padding=1)

    def A(z: Tensor) -> Tensor:
        return u * (s * z - conv(u * z))

    b = u * conv(xv * (1 - u))
    z = torch.zeros_like(xv)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(dim=(1, 2, 3))
    bnorm = rs.sqrt().clamp_min(1e-30)
    for _ in range(max_iter):
        if bool((rs.sqrt() <= tol * bnorm).all()):
            break
        ap = A(p)
        pap = (p * ap).sum(dim=(1, 2, 3))
        alpha = torch.where(pap > 0, rs / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap))
        z = z + alpha.view(-1, 1, 1, 1) * p
        r = r - alpha.view(-1, 1, 1, 1) * ap
        rs_new = (r * r).sum(dim=(1, 2, 3))
        beta = torch.where(rs > 0, rs_new / torch.where(rs > 0, rs, torch.ones_like(rs)), torch.zeros_like(rs))
        p = r + beta.view(-1, 1, 1, 1) * p
        rs = rs_new
    out = (xv * (1 - u) + z * u).view(n, c, h, w)
    return _add_noise(out, u.view(n, c, h, w), noise, generator).to(x.dtype)


def _add_noise(out: Tensor, u: Tensor, noise: float, generator: torch.Generator | None) -> Tensor:
    if not noise:
        return out
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    return out + noise * u * torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device)


@register_metric("road", family="faithfulness", model_agnostic=True, higher_is_better=False,
                 needs=("model",), paper="Rong et al., ICML 2022",
                 summary="ROAD: remove-and-debias with noisy linear imputation, mean score over removal fractions")
class ROAD(Metric):
    """ROAD (RemOve And Debias): remove the top-p fraction of pixels (``order="morf"``) for
    each p in ``percentages``, impute them with noisy linear imputation (which leaks no
    shape information about the removed region), and score the target. The per-sample
    score is the mean target score over the fractions (lower is better for MoRF)."""

    def __init__(
        self,
        *,
        percentages: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
        order: str = "morf",
        noise: float = 0.01,
        score: str = "probability",
        **common: Any,
    ) -> None:
        super().__init__(**common)
        check_choice("score", score, SCORES)
        check_choice("order", order, ORDERS)
        if not percentages or not all(isinstance(p, (int, float)) and 0 < p < 1 for p in percentages):
            raise OptionError(f"percentages must be fractions in (0, 1); got {percentages!r}.")
        check_float("noise", noise, minimum=0)
        self.percentages, self.order, self.noise, self.score = tuple(float(p) for p in percentages), order, float(noise), score
        self.higher_is_better = order != "morf"

    def cost(self) -> tuple[int, int]:
        """(forward passes, re-explanations) per scored sample: one pass per removal fraction."""
        return len(self.percentages), 0

    def _compute(self, ctx: Context) -> MetricResult:
        x = ctx.x
        n = x.shape[0]
        ranks, n_feat = feature_ranks(ctx.relevance, order=self.order)
        counts = torch.tensor([int(n_feat * p) for p in self.percentages], device=x.device)
        k = len(self.percentages)
        # imputation depends only on (sample, fraction): computed once, in chunks of the engine's size
        rows = torch.arange(n * k, device=x.device)
        img_all, p_all = rows // k, rows % k
        imputed = []
        size = ctx.engine.chunk_size(x[:1])
        for start in range(0, n * k, size):
            img, pi = img_all[start:start + size], p_all[start:start + size]
            m = ranks[img] < counts[pi][:, None, None]
            imputed.append(noisy_linear_imputation(x[img], m, noise=self.noise, generator=ctx.generator))
        imputed_t = torch.cat(imputed)

        def make(start: int, stop: int) -> tuple[Tensor, Tensor]:
            return imputed_t[start:stop], img_all[start:stop]

        vals = ctx.forward_scores(make, n * k, self.score, description="road").view(n, k)
        return MetricResult(self.name, vals.mean(1), self.higher_is_better,
                            {"curve": vals.cpu(), "fraction": list(self.percentages)})


# ----------------------------------------------------------------------------- infidelity


@register_metric("infidelity", family="faithfulness", model_agnostic=True, higher_is_better=False,
                 needs=("model",), paper="Yeh et al., NeurIPS 2019",
                 summary="Infidelity: expected squared error between attribution . noise and the output change")
class Infidelity(Metric):
    """Infidelity (Yeh et al. 2019): E_I[(I . phi - (f(x) - f(x - I)))^2] with Gaussian
    perturbations I ~ N(0, noise^2) per feature.

    A feature is an input element when the attributions have the input's shape, and a
    pixel (the same noise on every channel) for single-channel maps. With
    ``normalize=True`` (default, since map scales are arbitrary) phi is first rescaled by
    the optimal beta = E[I.phi d] / E[(I.phi)^2], as Captum's ``normalize`` option does.
    Noise is drawn as one (N, samples, *feature_shape) tensor from the seeded generator.
    """

    def __init__(self, *, samples: int = 32, noise: float = 0.1, normalize: bool = True,
                 score: str = "logit", **common: Any) -> None:
        super().__init__(**common)
        check_int("samples", samples, minimum=1)
        check_choice("score", score, SCORES)
        check_float("noise", noise, minimum=0, strict=True, hint="std of the perturbation")
        self.samples, self.noise, self.normalize, self.score = samples, float(noise), bool(normalize), score

    def cost(self) -> tuple[int, int]:
        """(forward passes, re-explanations) per scored sample: one pass per perturbation."""
        return self.samples, 0

    def _compute(self, ctx: Context) -> MetricResult:
        x = ctx.x
        n, s = x.shape[0], self.samples
        a = attributions_like_input(ctx.attributions, x)
        pert = randn(ctx.generator, (n, s, *a.shape[1:]), x.device) * self.noise
        dots = (pert * a[:, None]).flatten(2).sum(2).double()

        def make(start: int, stop: int) -> tuple[Tensor, Tensor]:
            r = torch.arange(start, stop, device=x.device)
            img, j = r // s, r % s
            return x[img] - pert[img, j], img

        fx = ctx.scores(ctx.output, torch.arange(n, device=x.device), self.score).double()
        f_pert = ctx.forward_scores(make, n * s, self.score, description="infidelity").view(n, s).double()
        diff = fx[:, None] - f_pert
        if self.normalize:
            beta = (dots * diff).mean(1) / (dots * dots).mean(1).clamp_min(1e-30)
            beta = torch.where((dots * dots).mean(1) > 0, beta, torch.zeros_like(beta))
            dots = dots * beta[:, None]
        else:
            beta = torch.ones(n, dtype=torch.float64)
        value = ((dots - diff) ** 2).mean(1)
        return MetricResult(self.name, value, self.higher_is_better, {"beta": beta.cpu()})


# ----------------------------------------------------------------------------- faithfulness correlation


@register_metric("faithfulness_correlation", family="faithfulness", model_agnostic=True, higher_is_better=True,
                 needs=("model",), paper="Bhatt et al., IJCAI 2020",
                 summary="Pearson correlation between attribution mass of random subsets and the score drop when they are removed")
class FaithfulnessCorrelation(Metric):
    """Faithfulness correlation (Bhatt et al. 2020): for ``runs`` random feature subsets S
    of size ``fraction`` of all features, correlate sum_{i in S} phi_i with
    f(x) - f(x with S replaced). Features are pixels or ``patch_size`` patches."""

    def __init__(self, *, runs: int = 50, fraction: float = 0.1, unit: str = "patch", patch_size: int = 16,
                 replacement: str = "zero", sigma: float = 5.0, score: str = "logit", **common: Any) -> None:
        super().__init__(**common)
        check_int("runs", runs, minimum=2)
        check_float("fraction", fraction, minimum=0, maximum=1, strict=True)
        _check_common(score, "morf", unit, patch_size, replacement)
        self.runs, self.fraction, self.unit, self.patch_size = runs, float(fraction), unit, patch_size
        self.replacement, self.sigma, self.score = replacement, float(sigma), score

    def cost(self) -> tuple[int, int]:
        """(forward passes, re-explanations) per scored sample: one pass per random subset."""
        return self.runs, 0

    def _features(self, rel: Tensor) -> tuple[Tensor, Tensor]:
        """Feature id per pixel (H, W) and relevance per feature (N, F)."""
        n, h, w = rel.shape
        if self.unit == "pixel":
            return torch.arange(h * w, device=rel.device).view(h, w), rel.reshape(n, -1)
        p = self.patch_size
        pw = math.ceil(w / p)
        rows = torch.arange(h, device=rel.device) // p
        cols = torch.arange(w, device=rel.device) // p
        fid = rows[:, None] * pw + cols[None, :]
        total = F.avg_pool2d(rel[:, None], p, ceil_mode=True, divisor_override=1)[:, 0]
        return fid, total.reshape(n, -1)

    def _compute(self, ctx: Context) -> MetricResult:
        x = ctx.x
        n, r = x.shape[0], self.runs
        fid, feat_rel = self._features(ctx.relevance)
        n_feat = feat_rel.shape[1]
        k = max(1, int(round(self.fraction * n_feat)))
        chosen = rand(ctx.generator, (n, r, n_feat), x.device).topk(k, dim=2).indices
        sel = torch.zeros(n, r, n_feat, dtype=torch.bool, device=x.device)
        sel.scatter_(2, chosen, True)
        mass = (sel.double() * feat_rel[:, None].double()).sum(2)
        repl = replacement_image(x, self.replacement, self.sigma)

        def make(start: int, stop: int) -> tuple[Tensor, Tensor]:
            rr = torch.arange(start, stop, device=x.device)
            img, j = rr // r, rr % r
            m = sel[img, j][:, fid][:, None]
            return torch.where(m, repl[img], x[img]), img

        fx = ctx.scores(ctx.output, torch.arange(n, device=x.device), self.score).double()
        drop = fx[:, None] - ctx.forward_scores(make, n * r, self.score, description=self.name).view(n, r).double()
        corr = pearson(mass, drop)
        return MetricResult(self.name, corr, self.higher_is_better, {"subset_size": k})


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation; NaN when a row is constant."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    den = (a.pow(2).sum(1) * b.pow(2).sum(1)).sqrt()
    num = (a * b).sum(1)
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.full_like(den, math.nan))


# ----------------------------------------------------------------------------- average drop


@register_metric("average_drop", family="faithfulness", model_agnostic=True, higher_is_better=False,
                 needs=("model",), paper="Chattopadhay et al., Grad-CAM++, WACV 2018",
                 summary="Average drop in confidence (%) when only the explanation-weighted image is shown; also increase in confidence")
class AverageDrop(Metric):
    """Average drop (Grad-CAM++ paper): the input is masked by the explanation map scaled to
    [0, 1] (positive part, min-max per sample): x' = b + m * (x - b) with baseline b
    (zero/mean/blur). Per sample: 100 * max(0, Y - O) / Y with Y, O the target's scores
    on x and x'. ``details["increase"]`` holds the increase-in-confidence indicator (O > Y)."""

    def __init__(self, *, replacement: str = "zero", sigma: float = 5.0, score: str = "probability", **common: Any) -> None:
        super().__init__(**common)
        check_choice("replacement", replacement, REPLACEMENTS)
        check_choice("score", score, SCORES)
        self.replacement, self.sigma, self.score = replacement, float(sigma), score

    def cost(self) -> tuple[int, int]:
        """(forward passes, re-explanations) per scored sample: the masked input once."""
        return 1, 0

    def _compute(self, ctx: Context) -> MetricResult:
        x = ctx.x
        n = x.shape[0]
        rel = ctx.relevance.clamp_min(0).flatten(1)
        lo, hi = rel.min(1, keepdim=True).values, rel.max(1, keepdim=True).values
        m = ((rel - lo) / (hi - lo).clamp_min(1e-12)).view(n, 1, *x.shape[-2:])
        base = replacement_image(x, self.replacement, self.sigma)

        def make(start: int, stop: int) -> tuple[Tensor, Tensor]:
            return base[start:stop] + m[start:stop] * (x[start:stop] - base[start:stop]), torch.arange(start, stop, device=x.device)

        idx = torch.arange(n, device=x.device)
        y = ctx.scores(ctx.output, idx, self.score).double()
        o = ctx.forward_scores(make, n, self.score, description=self.name).double()
        if self.score == "logit" and bool((y <= 0).any()):
            raise OptionError("average_drop divides by the original score, which must be positive; use score='probability'.")
        drop = 100 * (y - o).clamp_min(0) / y
        increase = (o > y).double()
        return MetricResult(self.name, drop, self.higher_is_better,
                            {"increase": increase.cpu(), "increase_rate": float(increase.mean()),
                             "original": y.cpu(), "masked": o.cpu()})
