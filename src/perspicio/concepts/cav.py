"""Concept activation vectors (Kim et al., ICML 2018): the normal of a linear classifier that
separates a layer's activations for a concept's images from those for a random set.

The classifier is ``"logistic"`` (L2-regularised logistic regression with scikit-learn's objective,
C = 1, solved by Newton's method here: deterministic) or ``"sgd"`` (scikit-learn's
``SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3)`` as in the TCAV reference code, seeded),
or any callable ``fit(X, y, seed) -> weight vector`` (or ``(weights, intercept)``: the
intercept only enters the reported training accuracy, taken as 0 when not returned). The CAV is
the weight vector scaled to unit length and oriented from the random set towards the concept.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import OptionError

Classifier = "str | Callable[[np.ndarray, np.ndarray, int], np.ndarray]"

CLASSIFIERS = ("logistic", "sgd")


def _sklearn() -> Any:
    try:
        import sklearn.linear_model as lm
    except ImportError as exc:
        raise OptionError(
            "concept activation vectors are fitted with scikit-learn, which is not installed; "
            "install it with: pip install 'perspicio[concepts]'"
        ) from exc
    return lm


@dataclass(frozen=True)
class CAV:
    """One concept activation vector: unit ``vector`` (flattened layer shape), the classifier's
    intercept (in the units of the unscaled weights) and its accuracy on the training sets."""

    vector: Tensor
    intercept: float
    accuracy: float


def check_classifier(classifier: Any) -> Any:
    if callable(classifier):
        return classifier
    if classifier not in CLASSIFIERS:
        raise OptionError(
            f"classifier must be one of {', '.join(CLASSIFIERS)} or a callable fit(X, y, seed); got {classifier!r}."
        )
    return classifier


def fit_cav(
    positive: Tensor,
    negative: Tensor,
    *,
    classifier: Any = "logistic",
    seed: int = 0,
    C: float = 1.0,
) -> CAV:
    """Fit the CAV separating ``positive`` (concept) from ``negative`` (random) activations.

    Rows are samples; any trailing shape is flattened. Labels: concept 1, random 0; the
    returned vector points towards the concept.
    """
    pos = positive.detach().reshape(positive.shape[0], -1).double().cpu().numpy()
    neg = negative.detach().reshape(negative.shape[0], -1).double().cpu().numpy()
    X = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(len(pos), dtype=np.int64), np.zeros(len(neg), dtype=np.int64)])
    classifier = check_classifier(classifier)
    intercept = 0.0
    if callable(classifier):
        fitted = classifier(X, y, seed)
        if isinstance(fitted, tuple) and len(fitted) == 2 and np.ndim(fitted[1]) == 0:
            fitted, intercept = fitted[0], float(fitted[1])  # (weights, intercept)
        w = np.asarray(fitted, dtype=np.float64).reshape(-1)
        if w.shape != (X.shape[1],) or not np.all(np.isfinite(w)):
            raise OptionError(
                f"the CAV classifier must return a finite weight vector of length {X.shape[1]}; got shape {w.shape}."
            )
    else:
        # the L2-regularised solution (and every SGD iterate) lies in the span of the rows of X: fit in
        # the coordinates of that span (at most as many as samples) instead of the layer's dimension
        basis = _row_space(X)
        Z = X @ basis
        if classifier == "logistic":
            beta, intercept = logistic_regression(Z, y, C=C)
        else:
            clf = _sklearn().SGDClassifier(alpha=0.01, max_iter=1000, tol=1e-3, random_state=seed)
            clf.fit(Z, y)
            beta = np.asarray(clf.coef_, dtype=np.float64).reshape(-1)
            intercept = float(np.asarray(clf.intercept_).reshape(-1)[0])
        w = basis @ beta
    norm = float(np.linalg.norm(w))
    if norm == 0.0:
        raise OptionError(
            "the CAV classifier returned a zero weight vector: the concept and random activations are not separable at all."
        )
    accuracy = float(np.mean(((X @ w + intercept) > 0).astype(np.int64) == y))
    return CAV(torch.from_numpy(w / norm), intercept, accuracy)


def _row_space(X: np.ndarray) -> np.ndarray:
    """Orthonormal basis (D, r) of the span of the rows of ``X`` (right singular vectors)."""
    if X.shape[1] <= X.shape[0]:
        return np.eye(X.shape[1])
    _, s, vt = np.linalg.svd(X, full_matrices=False)
    r = int(np.sum(s > s[0] * max(X.shape) * np.finfo(np.float64).eps)) if s[0] > 0 else 1
    return vt[:r].T


def logistic_regression(
    Z: np.ndarray, y: np.ndarray, *, C: float = 1.0, tol: float = 1e-10, max_iter: int = 100
) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression, ``min sum log(1 + exp(-s_i (z_i.b + c))) + |b|^2 / (2C)``
    with an unpenalised intercept (scikit-learn's objective), solved by Newton's method with
    backtracking: deterministic and exact to ``tol`` on the gradient. Returns (weights, intercept)."""
    n, d = Z.shape
    A = np.concatenate([Z, np.ones((n, 1))], axis=1)
    reg = np.full(d + 1, 1.0 / C)
    reg[-1] = 0.0
    theta = np.zeros(d + 1)

    def objective(t: np.ndarray) -> float:
        m = A @ t
        return float(np.sum(np.logaddexp(0.0, m) - y * m) + 0.5 * np.sum(reg * t * t))

    f = objective(theta)
    for _ in range(max_iter):
        p = 0.5 * (1.0 + np.tanh(0.5 * (A @ theta)))  # sigmoid without overflow
        grad = A.T @ (p - y) + reg * theta
        if np.max(np.abs(grad)) < tol:
            break
        hess = (A * (p * (1 - p))[:, None]).T @ A + np.diag(reg)
        step = np.linalg.solve(hess + 1e-12 * np.eye(d + 1), grad)
        decrement = float(grad @ step)  # Newton decrement squared: twice the predicted decrease
        if decrement < 1e-24:
            break
        t = 1.0
        while t >= 1e-8:
            cand = theta - t * step
            fc = objective(cand)
            if fc <= f - 1e-4 * t * decrement:
                break
            t *= 0.5
        else:  # no decrease left at this precision: converged
            break
        theta, f = cand, fc
    return theta[:-1], float(theta[-1])
