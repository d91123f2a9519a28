"""Exact SHAP values of tree ensembles (``tree_shap``) and linear models (``linear_shap``).

Both methods need the model's *structure*, not just its outputs, so they read it before the
base class sees the model: the constructor turns the user's estimator (an XGBoost/LightGBM/
scikit-learn model, a bound ``predict_proba``, a ``BlackBox`` or tabular demo wrapping one, or a
model file) into perspicio's array form and hands the base class a small ``nn.Module`` computing
the explained output (:class:`TreeOutput`, :class:`LinearOutput`) from that form. Guard, targets
and provenance then work as for every other method, the explained scores are exactly the output
the values add up to, and no hook in ``BlackBox`` is needed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn

from ..core.batching import Engine
from ..core.explanation import Explanation
from ..core.registry import register_method
from ..core.targets import resolve_target
from ..errors import InputError, OptionError, TargetError
from .base import Method


class TreeOutput(nn.Module):
    """The margin (or probability) output of a :class:`~perspicio.trees.TreeEnsemble` as a module."""

    is_black_box = False

    def __init__(self, ensemble: Any, model_output: str = "raw") -> None:
        super().__init__()
        self.ensemble = ensemble
        self.model_output = model_output
        self.register_buffer("_anchor", torch.zeros(0, dtype=torch.float64), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        from ..trees.treeshap import _TRANSFORM_CODES, _link

        out = self.ensemble.predict(x.detach().cpu().double().numpy())
        if self.model_output == "probability":
            out = _link(out, _TRANSFORM_CODES[self.ensemble.transform])
        return torch.from_numpy(out)

    def extra_repr(self) -> str:
        return f"{self.ensemble.source}, {self.ensemble.n_trees} trees, output={self.model_output}"


class LinearOutput(nn.Module):
    """The margin output W x + b of a linear model as a module (float64)."""

    def __init__(self, linear: Any) -> None:
        super().__init__()
        self.linear = linear
        self.register_buffer("_anchor", torch.zeros(0, dtype=torch.float64), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.linear.predict(x.detach().cpu().double().numpy()))


class _StructuredSHAP(Method):
    """Shared boundary of the two structure-reading methods: rows, names, targets, the Explanation."""

    input_ndim = None
    _options_exclude = ("self", "model")

    def _names(self, n_features: int, stored: Sequence[str] | None) -> tuple[str, ...] | None:
        names = (
            self.feature_names
            if self.feature_names is not None
            else getattr(self, "_columns", None) or stored
        )
        if names is None:
            return None
        names = tuple(str(v) for v in names)
        if len(names) != n_features:
            raise OptionError(
                f"feature_names has {len(names)} names; the model has {n_features} features."
            )
        return names

    #: whether ``_prepare_rows`` takes a DataFrame as it is (tree ensembles read category columns
    #: and check the column order as the model's library does); else it gets the frame's values
    reads_frames: ClassVar[bool] = False

    def _prepare_inputs(self, inputs: Any) -> Tensor:
        self._columns = None
        if hasattr(inputs, "columns") and hasattr(inputs, "to_numpy"):
            self._columns = [str(c) for c in inputs.columns]
            if not self.reads_frames:
                inputs = inputs.to_numpy(dtype=np.float64, na_value=np.nan)
        return torch.from_numpy(self._prepare_rows(inputs))

    def _prepare_rows(self, inputs: Any) -> np.ndarray:
        raise NotImplementedError  # abstract

    def _build(
        self,
        x: Tensor,
        target: Any,
        values: np.ndarray,
        base: np.ndarray,
        output: np.ndarray,
        names: tuple[str, ...] | None,
        stats: dict[str, Any],
        interactions: np.ndarray | None = None,
    ) -> Explanation:
        out_t = torch.from_numpy(np.ascontiguousarray(output))
        if callable(target) and not isinstance(target, (Tensor, str)):
            raise TargetError(
                f"{self.name} explains the model's outputs one at a time: pass a class index, a name or "
                "None (the predicted class), not a callable."
            )
        tgt = resolve_target(target, out_t, self.labels)
        idx = tgt.indices
        rows = torch.arange(len(x))
        vals = torch.from_numpy(np.ascontiguousarray(values))[rows, :, idx]  # (N, F)
        base_t = torch.from_numpy(np.ascontiguousarray(base))[idx]
        scores = out_t[rows, idx]
        eff = float((vals.sum(dim=1) + base_t - scores).abs().max())
        stored = tuple(names) if names is not None else None
        extras: dict[str, Any] = {
            "values": tuple(vals),
            "feature_names": tuple(stored for _ in range(len(x))),
            "feature_values": tuple(x.double()),
            "all_values": torch.from_numpy(np.ascontiguousarray(values)),
            "all_base_values": torch.from_numpy(np.ascontiguousarray(base)),
        }
        if interactions is not None:
            extras["interactions"] = torch.from_numpy(np.ascontiguousarray(interactions))[
                rows, :, :, idx
            ]
        return Explanation(
            attributions=vals.clone(),
            method=self.name,
            scores=scores,
            targets=idx,
            base_value=base_t,
            extras=extras,
            provenance={"efficiency_error": eff, **stats},
        )


@register_method(
    "tree_shap",
    family="tree",
    needs="tree model",
    summary="TreeSHAP: exact Shapley (and interaction) values of tree ensembles, path-dependent or interventional",
    paper="Lundberg et al., Nature MI 2020; Yang, 2021 (Fast TreeSHAP)",
)
class TreeSHAP(_StructuredSHAP):
    """Exact SHAP values of XGBoost, LightGBM and scikit-learn tree ensembles, read from the trees.

    Options:
        feature_perturbation: ``"tree_path_dependent"`` (default; training covers stand in for the
            data, no background) or ``"interventional"`` (absent features take each ``background``
            row's values; the base value is the mean background output).
        model_output: ``"raw"`` (the margin: log-odds / raw scores / forest-averaged probabilities)
            or ``"probability"`` (interventional only).
        interactions: also compute SHAP interaction values, ``extras["interactions"]`` (N, F, F),
            whose rows sum to the SHAP values.
        background: (K, F) rows for the interventional game (all rows are used; the cost per
            explained row does not grow with K).
        feature_names: column names (default: the DataFrame's columns, else the model's own).

    ``target`` selects the output as elsewhere: None is the predicted class (the largest
    output); single-output models (regression, binary boosting margins) have one output, 0.
    ``base_value + attributions.sum(1) == scores`` to float64 rounding.
    """

    reads_frames = True

    def __init__(
        self,
        model: Any,
        *,
        feature_perturbation: str = "tree_path_dependent",
        model_output: str = "raw",
        interactions: bool = False,
        background: Any = None,
        feature_names: Sequence[str] | None = None,
        **common: Any,
    ) -> None:
        from ..trees.readers import read_model
        from ..trees.treeshap import OUTPUTS, PERTURBATIONS

        if feature_perturbation not in PERTURBATIONS:
            raise OptionError(
                f"feature_perturbation must be one of {', '.join(PERTURBATIONS)}; "
                f"got {feature_perturbation!r}."
            )
        if model_output not in OUTPUTS:
            raise OptionError(
                f"model_output must be one of {', '.join(OUTPUTS)}; got {model_output!r}."
            )
        if not isinstance(interactions, bool):
            raise OptionError(f"interactions must be True or False; got {interactions!r}.")
        ens = read_model(model)
        if feature_perturbation == "interventional" and background is None:
            raise OptionError(
                "feature_perturbation='interventional' needs background= rows (K, features)."
            )
        if feature_perturbation == "tree_path_dependent" and background is not None:
            raise OptionError(
                "background= is used only with feature_perturbation='interventional'."
            )
        if model_output == "probability" and feature_perturbation != "interventional":
            raise OptionError(
                "model_output='probability' needs feature_perturbation='interventional' (the path-dependent "
                "game is defined on the additive margin)."
            )
        self.ensemble = ens
        self.background_rows = (
            ens.prepare(background, "background rows") if background is not None else None
        )
        common.setdefault("labels", ens.output_names)
        super().__init__(TreeOutput(ens, model_output), **common)
        self.feature_perturbation = feature_perturbation
        self.model_output = model_output
        self.interactions = interactions
        self.background = background
        self.feature_names = list(feature_names) if feature_names is not None else None

    def _prepare_rows(self, inputs: Any) -> np.ndarray:
        if (
            isinstance(inputs, (str, list))
            and inputs
            and all(isinstance(s, str) for s in np.ravel(inputs))
        ):
            raise InputError("tree_shap explains tabular rows (N, features), not text.")
        return self.ensemble.prepare(inputs)

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        from ..trees.treeshap import tree_shap

        res = tree_shap(
            self.ensemble,
            x.numpy(),
            feature_perturbation=self.feature_perturbation,
            background=self.background_rows,
            interactions=self.interactions,
            model_output=self.model_output,
        )
        names = self._names(self.ensemble.n_features, self.ensemble.feature_names)
        stats = {"model": self.ensemble.source, **res.stats}
        return self._build(
            x, target, res.values, res.base, res.output, names, stats, res.interactions
        )


@register_method(
    "linear_shap",
    family="tree",
    needs="linear model",
    summary="LinearSHAP: closed-form Shapley values of linear/logistic models, interventional or correlation-aware",
    paper="Lundberg & Lee, NeurIPS 2017; Strumbelj & Kononenko, KAIS 2014",
)
class LinearSHAP(_StructuredSHAP):
    """Exact SHAP values of a linear model's margin (scikit-learn ``coef_``/``intercept_`` or ``nn.Linear``).

    Options:
        background: (K, F) rows (required): their mean (and covariance for the correlation-aware variant).
        feature_perturbation: ``"interventional"`` (phi = w * (x - mean), the default) or
            ``"correlation_dependent"`` (absent features take their Gaussian conditional expectation;
            the transform is exact up to 12 features, otherwise estimated from ``nsamples``
            antithetic permutations drawn with ``seed``).
        feature_names: column names.
    """

    def __init__(
        self,
        model: Any,
        *,
        background: Any = None,
        feature_perturbation: str = "interventional",
        nsamples: int = 1000,
        seed: int = 0,
        feature_names: Sequence[str] | None = None,
        **common: Any,
    ) -> None:
        from ..trees.linear import PERTURBATIONS, read_linear

        if feature_perturbation not in PERTURBATIONS:
            raise OptionError(
                f"feature_perturbation must be one of {', '.join(PERTURBATIONS)}; "
                f"got {feature_perturbation!r}."
            )
        if background is None:
            raise OptionError(
                "linear_shap needs background= rows (K, features): the base value is the output at "
                "their mean."
            )
        if isinstance(nsamples, bool) or not isinstance(nsamples, int) or nsamples < 2:
            raise OptionError(f"nsamples must be an integer >= 2; got {nsamples!r}.")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise OptionError(f"seed must be a non-negative integer; got {seed!r}.")
        lin = read_linear(model)
        self.linear = lin
        self.background_rows = self._rows(background, "background rows")
        common.setdefault("labels", lin.output_names)
        super().__init__(LinearOutput(lin), **common)
        self.background = background
        self.feature_perturbation = feature_perturbation
        self.nsamples = nsamples
        self.seed = seed
        self.feature_names = list(feature_names) if feature_names is not None else None

    def _rows(self, a: Any, what: str) -> np.ndarray:
        if hasattr(a, "to_numpy"):
            a = a.to_numpy()
        elif isinstance(a, Tensor):
            a = a.detach().cpu().numpy()
        try:
            a = np.asarray(a, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InputError(
                f"{what} must be a numeric array (N, {self.linear.n_features})."
            ) from exc
        if a.ndim == 1:
            a = a[None]
        f = self.linear.n_features
        if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] != f:
            raise InputError(
                f"{what} must have shape (N, {f}) for this {self.linear.source}; got {a.shape}."
            )
        if not np.isfinite(a).all():
            raise InputError(
                f"{what} contain NaN/Inf; a linear model has no route for missing values."
            )
        return np.ascontiguousarray(a)

    def _prepare_rows(self, inputs: Any) -> np.ndarray:
        return self._rows(inputs, "inputs")

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        from ..trees.linear import linear_shap

        xs = x.numpy()
        values, base, stats = linear_shap(
            self.linear,
            xs,
            self.background_rows,
            feature_perturbation=self.feature_perturbation,
            nsamples=self.nsamples,
            generator=np.random.default_rng(self.seed),
        )
        names = self._names(self.linear.n_features, self.linear.feature_names)
        return self._build(
            x,
            target,
            values,
            base,
            self.linear.predict(xs),
            names,
            {"model": self.linear.source, **stats},
        )
