"""Fidelity: how well a surrogate imitates the model, on held-out rows, with a confidence interval.

Classes: the fraction of held-out rows where the surrogate predicts the model's class
(agreement), with a Wilson score interval. Scores: the R^2 of the surrogate's prediction of the
model's score, with a seeded bootstrap percentile interval (rows resampled with replacement).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

#: bootstrap resamples for the R^2 interval
BOOTSTRAP = 1000


@dataclass(frozen=True)
class Fidelity:
    """One fidelity number: ``value`` in ``[low, high]`` (``level`` confidence) on ``n`` rows.

    ``measure`` is ``"agreement"`` (classes) or ``"r2"`` (scores); ``interval`` names how the
    interval was computed (``"wilson"`` or ``"bootstrap"``).
    """

    value: float
    low: float
    high: float
    n: int
    measure: str
    interval: str
    level: float = 0.95

    def __float__(self) -> float:
        return self.value

    def __str__(self) -> str:
        what = "agreement" if self.measure == "agreement" else "R^2"
        how = "Wilson" if self.interval == "wilson" else f"bootstrap of {BOOTSTRAP}"
        return (
            f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}] ({what} on {self.n} held-out rows, "
            f"{how} {self.level:.0%} interval)"
        )

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            "value": self.value,
            "low": self.low,
            "high": self.high,
            "n": self.n,
            "measure": self.measure,
            "interval": self.interval,
            "level": self.level,
        }


def wilson(successes: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (Wilson, JASA 1927): unlike the normal
    approximation it stays inside [0, 1] and is not degenerate at 0 or n successes."""
    if n <= 0:
        return math.nan, math.nan
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def agreement(pred: np.ndarray, reference: np.ndarray, level: float = 0.95) -> Fidelity:
    """Fraction of rows where ``pred`` equals ``reference``, with its Wilson interval."""
    n = len(reference)
    k = int(np.sum(np.asarray(pred) == np.asarray(reference)))
    low, high = wilson(k, n, level)
    return Fidelity(k / n if n else math.nan, low, high, n, "agreement", "wilson", level)


def r2(pred: np.ndarray, reference: np.ndarray) -> float:
    """Coefficient of determination of ``pred`` against ``reference``. A constant reference has no
    variance to explain: 1.0 when ``pred`` equals it exactly, else 0.0 (scikit-learn's
    ``r2_score`` convention, ``force_finite=True``)."""
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    total = float(np.sum((ref - ref.mean()) ** 2))
    resid = float(np.sum((ref - pred) ** 2))
    if total == 0.0:
        return 1.0 if resid == 0.0 else 0.0
    return 1.0 - resid / total


def r2_fidelity(
    pred: np.ndarray, reference: np.ndarray, *, seed: int = 0, level: float = 0.95
) -> Fidelity:
    """R^2 of ``pred`` against ``reference`` with a seeded bootstrap percentile interval."""
    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    n = len(ref)
    value = r2(pred, ref)
    idx = np.random.default_rng(seed).integers(0, n, size=(BOOTSTRAP, n))
    p, r = pred[idx], ref[idx]
    total = ((r - r.mean(1, keepdims=True)) ** 2).sum(1)
    resid = ((r - p) ** 2).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        constant = np.where(resid == 0, 1.0, 0.0)  # as r2(): a constant resample
        boot = np.where(total > 0, 1.0 - resid / np.where(total > 0, total, 1.0), constant)
    if len(boot) == 0:
        low = high = math.nan
    else:
        alpha = (1 - level) / 2
        low, high = (float(v) for v in np.quantile(boot, [alpha, 1 - alpha]))
    return Fidelity(value, low, high, n, "r2", "bootstrap", level)
