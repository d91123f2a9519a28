"""LIME: a locally weighted linear surrogate over interpretable binary features.

Images (superpixels), tabular rows (columns or groups, removed ones taking background or
baseline values) and text (tokens) share one procedure, over the masked-model game of
:mod:`perspicio.core.maskers`: draw ``budget`` coalitions z (the first is the unperturbed
input; each other one removes a uniformly random number 1..M of uniformly chosen features),
weight them with the exponential kernel sqrt(exp(-d^2 / width^2)) of the cosine distance d
between z and the all-ones vector, and fit a weighted ridge regression (alpha = 1, intercept
not penalised) of the target score on z. Optionally only ``num_features`` features are kept
(forward selection or highest weights, as in the LIME paper) and the surrogate refit on them.

Deliberate difference from the ``lime`` package for tabular data: ``lime``'s
LimeTabularExplainer samples each feature from training statistics and explains the
discretised "same quartile as x" indicators; here a removed column takes the background
rows' values (interventional, as for Shapley values), so tabular, image and text LIME are the
same estimator over different maskers. The default sampling is the paper's (and
``lime``'s text explainer's): remove a uniformly random number of features; ``lime``'s image
explainer instead drops each superpixel independently with probability 1/2, available as
``sampling="bernoulli"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.maskers import MaskedGame
from ..core.options import check_choice, check_float, check_int
from ..core.registry import register_method
from ..errors import OptionError
from .perturbation import FeatureMethod, FeatureResult

SELECTIONS = ("auto", "none", "forward_selection", "highest_weights")
SAMPLINGS = ("count", "bernoulli")


def weighted_ridge(x: Tensor, y: Tensor, w: Tensor, alpha: float = 1.0) -> tuple[Tensor, float]:
    """Coefficients and intercept of argmin sum_i w_i (y_i - b - x_i beta)^2 + alpha |beta|^2."""
    sw = w.sum()
    xm = (w[:, None] * x).sum(0) / sw
    ym = (w * y).sum() / sw
    xc, yc = x - xm, y - ym
    xtw = (xc * w[:, None]).T
    k = x.shape[1]
    beta = torch.linalg.solve(xtw @ xc + alpha * torch.eye(k, dtype=x.dtype), xtw @ yc) if k else torch.zeros(0, dtype=x.dtype)
    return beta, float(ym - xm @ beta)


def weighted_r2(x: Tensor, y: Tensor, w: Tensor, beta: Tensor, intercept: float) -> float:
    """Weighted coefficient of determination of the surrogate on its own samples."""
    pred = x @ beta + intercept
    ym = (w * y).sum() / w.sum()
    ss_tot = float((w * (y - ym) ** 2).sum())
    ss_res = float((w * (y - pred) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else (1.0 if ss_res == 0 else 0.0)


@register_method("lime", family="surrogate", model_agnostic=True,
                 summary="LIME: kernel-weighted ridge surrogate on random feature removals, with its R^2",
                 paper="Ribeiro et al., KDD 2016")
class LIME(FeatureMethod):
    """Local surrogate: attributions are the ridge coefficients of the selected features.

    Options: ``budget`` samples (default 1000), ``kernel_width`` (default 0.25, in cosine-distance
    units, as LIME for images; LIME's text default 25 on distances x 100 is the same), ``alpha``
    (ridge penalty, 1), ``num_features`` (keep only K features; default all) and
    ``feature_selection`` (``"auto"``: forward selection for K <= 6, else highest weights) and
    ``sampling`` (``"count"``: a uniform number 1..M of features removed, the paper's scheme;
    ``"bernoulli"``: each feature removed with probability 1/2).
    Extras per sample: ``intercept``, ``r2`` (weighted R^2 on the samples) and ``selected``.
    """

    def __init__(self, model: nn.Module, *, kernel_width: float = 0.25, alpha: float = 1.0,
                 num_features: int | None = None, feature_selection: str = "auto", sampling: str = "count",
                 **common: Any) -> None:
        super().__init__(model, **common)
        check_float("kernel_width", kernel_width, minimum=0, strict=True)
        check_float("alpha", alpha, minimum=0, hint="ridge penalty")
        check_choice("feature_selection", feature_selection, SELECTIONS)
        check_choice("sampling", sampling, SAMPLINGS)
        self.sampling = sampling
        self.kernel_width = float(kernel_width)
        self.alpha = float(alpha)
        self.num_features = check_int("num_features", num_features, minimum=1, allow_none=True)
        self.feature_selection = feature_selection

    def sample(self, m: int, n: int, generator: torch.Generator) -> Tensor:
        """n coalitions (n, m): the input itself, then random removals of features."""
        if self.sampling == "bernoulli":
            z = torch.rand(n - 1, m, generator=generator, device=generator.device).cpu() < 0.5
            return torch.cat([torch.ones(1, m, dtype=torch.bool), z])
        removed = torch.randint(1, m + 1, (n - 1,), generator=generator, device=generator.device).cpu()
        order = torch.rand(n - 1, m, generator=generator, device=generator.device).argsort(dim=1).cpu()
        z = order.argsort(dim=1) >= removed[:, None]
        return torch.cat([torch.ones(1, m, dtype=torch.bool), z])

    def kernel(self, z: Tensor) -> Tensor:
        m = z.shape[1]
        d = 1.0 - torch.sqrt(z.double().sum(1) / m)  # cosine distance to the all-ones vector
        return torch.sqrt(torch.exp(-(d**2) / self.kernel_width**2))

    def select(self, x: Tensor, y: Tensor, w: Tensor) -> list[int]:
        m = x.shape[1]
        k = self.num_features
        if k is None or k >= m or self.feature_selection == "none":
            return list(range(m))
        method = self.feature_selection
        if method == "auto":
            method = "forward_selection" if k <= 6 else "highest_weights"
        if method == "highest_weights":
            beta, _ = weighted_ridge(x, y, w, self.alpha)
            return sorted(torch.argsort(beta.abs(), descending=True)[:k].tolist())
        chosen: list[int] = []
        for _ in range(k):
            best, best_score = -1, -float("inf")
            for j in range(m):
                if j in chosen:
                    continue
                cols = chosen + [j]
                beta, b0 = weighted_ridge(x[:, cols], y, w, self.alpha)
                score = weighted_r2(x[:, cols], y, w, beta, b0)
                if score > best_score:
                    best, best_score = j, score
            chosen.append(best)
        return sorted(chosen)

    def solve(self, game: MaskedGame, generator: torch.Generator) -> FeatureResult:
        m = game.n_features
        n = self.budget if self.budget is not None else 1000
        if n < 2:
            raise OptionError(f"budget={n} is below the minimum lime needs: 2 samples (the input and one perturbation).")
        z = self.sample(m, n, generator)
        y = game(z)
        w = self.kernel(z)
        x = z.double()
        cols = self.select(x, y, w)
        beta, intercept = weighted_ridge(x[:, cols], y, w, self.alpha)
        values = torch.zeros(m, dtype=torch.float64)
        values[cols] = beta
        r2 = weighted_r2(x[:, cols], y, w, beta, intercept)
        return FeatureResult(values=values, extras={
            "intercept": intercept, "r2": r2, "selected": tuple(cols),
            "local_prediction": intercept + float(beta.sum()),
        })
