"""Closed-form SHAP values of linear models f(x) = W x + b (margins: log-odds for logistic models).

- ``interventional``: features outside a coalition take background values independently of
  the others, so ``phi_i = w_i (x_i - mean_i)`` and the base value is ``f(mean)``.
- ``correlation_dependent``: features outside S take their conditional expectation given x_S
  under a Gaussian with the background's mean and covariance. For a linear model
  ``v(S) - v(empty) = c_S . (x - mean)`` with ``c_S`` supported on S,
  ``c_S[S] = Sigma_SS^+ Sigma_{S,:} w``, so the Shapley values are a fixed linear map of the
  centred row: ``phi = T (x - mean)`` with ``T[i] = sum_S w(|S|) (c_{S+i} - c_S)``. ``T`` is
  enumerated exactly over all 2^F coalitions up to ``EXACT_MAX_FEATURES`` features, otherwise
  estimated from antithetic random permutations (Strumbelj & Kononenko 2014), each telescoping
  to ``T`` summing to ``w`` over its rows (efficiency is exact for every estimate).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ModelError, OptionError

EXACT_MAX_FEATURES = 12
PERTURBATIONS = ("interventional", "correlation_dependent")


@dataclass(frozen=True)
class LinearModel:
    """Weights (K, F) and intercepts (K,) of a linear model's margin outputs."""

    weight: np.ndarray
    bias: np.ndarray
    source: str
    output_names: tuple[str, ...] | None = None
    feature_names: tuple[str, ...] | None = None

    @property
    def n_features(self) -> int:
        return self.weight.shape[1]

    def predict(self, x: np.ndarray) -> np.ndarray:
        return x @ self.weight.T + self.bias


def read_linear(model: Any) -> LinearModel:
    """A scikit-learn linear model (``coef_``/``intercept_``) or a torch ``nn.Linear``."""
    from .readers import _unwrap

    model = _unwrap(model)
    try:
        from torch import nn

        if isinstance(model, nn.Linear):
            w = model.weight.detach().cpu().double().numpy()
            b = (
                model.bias.detach().cpu().double().numpy()
                if model.bias is not None
                else np.zeros(w.shape[0])
            )
            return LinearModel(w, b, "torch.nn.Linear")
        if isinstance(model, nn.Sequential) and len(model) == 1 and isinstance(model[0], nn.Linear):
            return read_linear(model[0])
    except ImportError:  # pragma: no cover - torch is a core dependency
        pass
    if (type(model).__module__ or "").startswith("xgboost"):
        return _read_xgb_linear(model)
    coef = getattr(model, "coef_", None)
    if coef is None:
        raise ModelError(
            f"linear_shap needs a linear model: a scikit-learn estimator with coef_ and intercept_ "
            f"(LinearRegression, Ridge, Lasso, ElasticNet, LogisticRegression, SGD*, LinearSVC ...) or "
            f"a torch nn.Linear; got {type(model).__module__}.{type(model).__name__}."
        )
    w = np.atleast_2d(np.asarray(coef, dtype=np.float64))
    b = np.asarray(getattr(model, "intercept_", 0.0), dtype=np.float64).reshape(-1)
    if b.size == 1 and w.shape[0] > 1:
        b = np.repeat(b, w.shape[0])
    if b.size != w.shape[0]:
        raise ModelError(
            f"{type(model).__name__}: intercept_ has {b.size} values for {w.shape[0]} outputs."
        )
    classes = getattr(model, "classes_", None)
    names = None
    if classes is not None:
        names = tuple(str(c) for c in classes)
        if w.shape[0] == 1 and len(names) == 2:
            names = (names[1],)
    fnames = getattr(model, "feature_names_in_", None)
    return LinearModel(
        w,
        b,
        f"{type(model).__module__.split('.')[0]}.{type(model).__name__}",
        names,
        tuple(str(n) for n in fnames) if fnames is not None else None,
    )


def _read_xgb_linear(model: Any) -> LinearModel:
    """An XGBoost ``gblinear`` model: weights from its JSON model; the intercept is the margin at
    x = 0 (the stored bias plus ``base_score`` through the objective's link, which ``intercept_``
    leaves out)."""
    import json

    import xgboost

    name = type(model).__name__
    try:
        booster = model.get_booster() if hasattr(model, "get_booster") else model
        doc = json.loads(bytes(booster.save_raw("json")).decode())
    except Exception as exc:  # noqa: BLE001 - xgboost raises sklearn's NotFittedError
        raise ModelError(f"the {name} is not fitted (call .fit or .load_model first).") from exc
    learner = doc["learner"]
    gb = learner["gradient_booster"]
    if gb.get("name") != "gblinear":
        raise ModelError(
            f"xgboost.{name} uses the {gb.get('name')!r} booster: it is a tree model, explain it "
            "with method='tree_shap' (linear_shap reads booster='gblinear' models)."
        )
    params = learner["learner_model_param"]
    f = int(params["num_feature"])
    k = max(int(params.get("num_class", 0) or 0), int(params.get("num_target", 1) or 1), 1)
    weights = np.asarray(gb["model"]["weights"], dtype=np.float64)
    if weights.size != (f + 1) * k:
        raise ModelError(
            f"xgboost.{name}: {weights.size} gblinear weights for {f} features x {k} outputs."
        )
    w = weights[: f * k].reshape(f, k).T.copy()
    zero = xgboost.DMatrix(np.zeros((1, f), dtype=np.float32), feature_names=booster.feature_names)
    b = np.asarray(
        booster.predict(zero, output_margin=True, validate_features=False), dtype=np.float64
    ).reshape(-1)
    classes = getattr(model, "classes_", None)
    names = None
    if classes is not None:
        names = tuple(str(c) for c in classes)
        if k == 1 and len(names) == 2:
            names = (names[1],)
    fn = booster.feature_names
    return LinearModel(w, b, f"xgboost.{name} (gblinear)", names, tuple(fn) if fn else None)


def _coalition_vector(cov: np.ndarray, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """c_S (F,): zero outside S, Sigma_SS^+ Sigma_{S,:} w on S."""
    c = np.zeros(len(w))
    if s.any():
        idx = np.flatnonzero(s)
        c[idx] = np.linalg.pinv(cov[np.ix_(idx, idx)], hermitian=True) @ (cov[idx] @ w)
    return c


def correlation_transform(
    cov: np.ndarray,
    w: np.ndarray,
    *,
    nsamples: int = 1000,
    generator: np.random.Generator | None = None,
) -> tuple[np.ndarray, bool]:
    """T (F, F) with phi = T (x - mean) for weights ``w`` (F,); (T, exact)."""
    f = len(w)
    if f <= EXACT_MAX_FEATURES:
        t = np.zeros((f, f))
        memo: dict[int, np.ndarray] = {}

        def c_of(mask: int) -> np.ndarray:
            if mask not in memo:
                memo[mask] = _coalition_vector(cov, w, ((mask >> np.arange(f)) & 1).astype(bool))
            return memo[mask]

        weights = [1.0 / (f * math.comb(f - 1, k)) for k in range(f)]
        for mask in range(1 << f):
            size = bin(mask).count("1")
            for i in range(f):
                if not (mask >> i) & 1:
                    t[i] += weights[size] * (c_of(mask | (1 << i)) - c_of(mask))
        return t, True
    if generator is None:
        generator = np.random.default_rng(0)
    if nsamples < 2:
        raise OptionError(f"nsamples must be >= 2 (antithetic permutation pairs); got {nsamples}.")
    t = np.zeros((f, f))
    pairs = nsamples // 2
    for _ in range(pairs):
        perm = generator.permutation(f)
        for order in (perm, perm[::-1]):
            s = np.zeros(f, dtype=bool)
            prev = np.zeros(f)
            for i in order:
                s[i] = True
                cur = _coalition_vector(cov, w, s)
                t[i] += cur - prev
                prev = cur
    return t / (2 * pairs), False


def linear_shap(
    model: LinearModel,
    x: np.ndarray,
    background: np.ndarray,
    *,
    feature_perturbation: str = "interventional",
    nsamples: int = 1000,
    generator: np.random.Generator | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(values (N, F, K), base (K,), stats) of a linear model's margins."""
    if feature_perturbation not in PERTURBATIONS:
        raise OptionError(
            f"feature_perturbation must be one of {', '.join(PERTURBATIONS)}; got {feature_perturbation!r}."
        )
    mean = background.mean(axis=0)
    base = model.predict(mean[None])[0]
    centred = x - mean
    stats: dict[str, Any] = {"background_rows": int(len(background))}
    if feature_perturbation == "interventional":
        return centred[:, :, None] * model.weight.T[None], base, stats
    if len(background) < 2:
        raise OptionError(
            "feature_perturbation='correlation_dependent' needs at least 2 background rows (a covariance)."
        )
    cov = np.cov(background, rowvar=False).reshape(model.n_features, model.n_features)
    values = np.empty((len(x), model.n_features, model.weight.shape[0]))
    exact = True
    for k, w in enumerate(model.weight):
        t, exact = correlation_transform(cov, w, nsamples=nsamples, generator=generator)
        values[:, :, k] = centred @ t.T
    stats["transform"] = (
        "exact" if exact else f"sampled ({nsamples // 2} antithetic permutation pairs)"
    )
    return values, base, stats


__all__ = [
    "EXACT_MAX_FEATURES",
    "LinearModel",
    "correlation_transform",
    "linear_shap",
    "read_linear",
]
