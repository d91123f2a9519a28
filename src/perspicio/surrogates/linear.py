"""Distil a model into a sparse global linear model (L1-penalised, scikit-learn).

Classes: an L1 logistic regression of the model's class; scores: a Lasso regression of the chosen
score. Features are standardised on the training rows, so the penalty treats them alike and the
coefficients (per standard deviation) are comparable; the equation is also given in raw units.
Fidelity is measured exactly as for trees (``fidelity.py``): on held-out rows only.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core.options import check_float, check_int
from ..errors import ModelError, OptionError
from ._design import Design, Options, Task, require_sklearn, setup
from .fidelity import Fidelity, agreement, r2, r2_fidelity
from .tree import _accuracy, dump_json, summary_lines, versions

if TYPE_CHECKING:
    from typing_extensions import Unpack

#: penalties tried (largest first) when ``max_features`` asks for the densest model within a size
L1_GRID = tuple(float(v) for v in np.logspace(1, -4, 41))


@dataclass(frozen=True, eq=False)
class LinearSurrogate:
    """A sparse linear model imitating a model; see :func:`distill_linear`.

    ``coefficients`` (S, F): per standard deviation of each feature, one row per series (the
    log-odds of the second class for two classes, one row per class for more, the score for
    regression); ``raw_coefficients``/``raw_intercept`` are the same model in the features' units.
    """

    model: Any
    fidelity: Fidelity
    train_fidelity: float
    accuracy: dict[str, Any] | None
    kind: str
    feature_names: tuple[str, ...]
    class_names: tuple[str, ...]
    l1: float
    coefficients: np.ndarray
    intercept: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    options: dict[str, Any]
    _design: Design = field(repr=False)
    _task: Task = field(repr=False)

    @property
    def series(self) -> list[str]:
        if self.kind == "score":
            return [self.class_names[0]]
        classes = [self.class_names[int(c)] for c in self.model.classes_]
        return (
            [f"log-odds of {classes[1]}"]
            if len(classes) == 2
            else [f"score of {c}" for c in classes]
        )

    @property
    def raw_coefficients(self) -> np.ndarray:
        return self.coefficients / self.scale

    @property
    def raw_intercept(self) -> np.ndarray:
        return self.intercept - (self.coefficients * (self.mean / self.scale)).sum(1)

    @property
    def n_features_used(self) -> int:
        return int(np.any(self.coefficients != 0, axis=0).sum())

    def predict(self, features: Any) -> np.ndarray:
        """Class names (classes) or scores for rows of interpretable features."""
        z = (np.asarray(features, dtype=np.float64) - self.mean) / self.scale
        pred = self.model.predict(z)
        return np.array([self.class_names[int(p)] for p in pred]) if self.kind == "class" else pred

    def terms(self) -> list[tuple[str, list[float]]]:
        """(feature, standardised coefficient per series) for every feature used, largest first."""
        used = np.flatnonzero(np.any(self.coefficients != 0, axis=0))
        order = used[np.argsort(-np.abs(self.coefficients[:, used]).max(0), kind="stable")]
        return [(self.feature_names[j], [float(v) for v in self.coefficients[:, j]]) for j in order]

    def equation(self) -> str:
        """The model in the features' raw units, one line per series."""
        lines = []
        raw, b = self.raw_coefficients, self.raw_intercept
        for s, name in enumerate(self.series):
            parts = [f"{b[s]:.4g}"]
            for feat, _ in self.terms():
                c = raw[s, self.feature_names.index(feat)]
                if c != 0:
                    parts.append(f"{'-' if c < 0 else '+'} {abs(c):.4g} * {feat}")
            lines.append(f"{name} = " + " ".join(parts))
        return "\n".join(lines)

    def title(self) -> str:
        return (
            f"sparse linear surrogate ({self.n_features_used} of {len(self.feature_names)} features)\nfidelity "
            f"{self.fidelity.value:.3f} [{self.fidelity.low:.3f}, {self.fidelity.high:.3f}] on "
            f"{self.fidelity.n} held-out rows"
        )

    def figure(self) -> Any:
        """The non-zero coefficients per standard deviation of their feature, as bars."""
        from .plots import coefficient_figure

        what = self.series[0] if len(self.series) == 1 else "score"
        return coefficient_figure(
            self.terms(),
            self.series,
            title=self.title(),
            xlabel=f"change of {what} per standard deviation of the feature",
        )

    def to_dict(self) -> dict[str, Any]:
        d = self._design
        return {
            "surrogate": "sparse_linear",
            "kind": self.kind,
            "series": self.series,
            "feature_names": list(self.feature_names),
            "features": d.source,
            "l1": self.l1,
            "fidelity": self.fidelity.to_dict(),
            "train_fidelity": self.train_fidelity,
            "accuracy": self.accuracy,
            "rows": {"train": d.n_train, "neighbours": d.n_neighbours, "held_out": len(d.z_test)},
            "terms": [{"feature": f, "coefficients": c} for f, c in self.terms()],
            "intercept": self.intercept.tolist(),
            "raw_intercept": self.raw_intercept.tolist(),
            "raw_coefficients": {
                f: self.raw_coefficients[:, self.feature_names.index(f)].tolist()
                for f, _ in self.terms()
            },
            "feature_mean": self.mean.tolist(),
            "feature_scale": self.scale.tolist(),
            "equation": self.equation(),
            "options": self.options,
            "versions": versions(),
        }

    def to_json(self, path: str | Path | None = None) -> str:
        return dump_json(self.to_dict(), path)

    def __str__(self) -> str:
        return "\n".join([*summary_lines(self), self.equation()])


def distill_linear(
    model: Any,
    data: Any = None,
    *,
    l1: float = 0.01,
    max_features: int | None = None,
    **options: Unpack[Options],
) -> LinearSurrogate:
    """Fit a sparse linear model imitating ``model``; fidelity on held-out rows.

    ``l1``: penalty strength lambda on standardised features - scikit-learn's ``Lasso(alpha=l1)``
    for scores, ``LogisticRegression`` with ``C = 1 / (n_rows * l1)`` for classes (the same
    objective: mean loss + lambda * |w|_1). ``max_features``: instead of ``l1``, the weakest
    penalty of a fixed grid whose model uses at most that many features. Other arguments as in
    :func:`~perspicio.surrogates.distill_tree`.
    """
    require_sklearn()
    max_features = check_int("max_features", max_features, minimum=1, allow_none=True)
    if max_features is None:
        l1 = check_float("l1", l1, minimum=0, strict=True)
    design, tsk, recorded = setup(model, data, dict(options), ("l1", "max_features"))
    seed = recorded["seed"]
    if tsk.kind == "class" and len(np.unique(tsk.y_train)) < 2:
        raise ModelError(
            "the model predicts one class on every training row: a linear classifier needs two; "
            "pass rows where its prediction varies."
        )
    mean = design.z_train.mean(0)
    scale = design.z_train.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = (design.z_train - mean) / scale
    if max_features is None:
        est = _fit(z, tsk, float(l1), seed)
    else:
        est, l1 = None, None
        for lam in L1_GRID:  # strongest penalty first: models grow along the grid
            cand = _fit(z, tsk, lam, seed)
            if np.any(np.atleast_2d(cand.coef_) != 0, axis=0).sum() > max_features:
                break
            est, l1 = cand, lam
        if est is None:
            raise OptionError(
                f"no penalty on the grid gives a model with at most {max_features} features."
            )
    zt = (design.z_test - mean) / scale
    pred_test = est.predict(zt)
    pred_train = est.predict(z[: design.n_train])
    if tsk.kind == "class":
        fid = agreement(pred_test, tsk.y_test)
        train_fid = float(np.mean(pred_train == tsk.y_train[: design.n_train]))
    else:
        fid = r2_fidelity(pred_test, tsk.y_test, seed=seed)
        train_fid = r2(pred_train, tsk.y_train[: design.n_train])
    coef = np.atleast_2d(np.asarray(est.coef_, dtype=np.float64))
    intercept = np.atleast_1d(np.asarray(est.intercept_, dtype=np.float64))
    recorded.update(l1=l1, max_features=max_features)
    return LinearSurrogate(
        est,
        fid,
        train_fid,
        _accuracy(design, tsk, pred_test),
        tsk.kind,
        tuple(design.feature_names),
        tuple(tsk.names),
        float(l1),
        coef,
        intercept,
        mean,
        scale,
        recorded,
        design,
        tsk,
    )


def _fit(z: np.ndarray, tsk: Task, lam: float, seed: int) -> Any:
    import sklearn
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso, LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if tsk.kind == "score":
            return Lasso(alpha=lam, max_iter=20000, random_state=seed).fit(z, tsk.y_train)
        binary = len(np.unique(tsk.y_train)) == 2
        kw: dict[str, Any] = {
            "C": 1.0 / (len(z) * lam),
            "random_state": seed,
            "max_iter": 5000,
            "solver": "liblinear" if binary else "saga",
        }
        if binary:
            kw["intercept_scaling"] = (
                100.0  # liblinear penalises the intercept as a feature: make that negligible
            )
        major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
        if (major, minor) >= (1, 8):
            kw["l1_ratio"] = 1.0
        else:  # pragma: no cover - older scikit-learn spells the L1 penalty this way
            kw["penalty"] = "l1"
        return LogisticRegression(**kw).fit(z, tsk.y_train)
