"""Exact explanations of tree ensembles and linear models.

- :func:`read_model` turns an XGBoost, LightGBM or scikit-learn tree model (or an XGBoost
  JSON/UBJSON or LightGBM text model file) into one array form, :class:`TreeEnsemble`;
- :func:`tree_shap` computes exact SHAP values and interaction values on it (numba kernels);
- :mod:`perspicio.trees.linear` holds the closed-form SHAP values of linear models.

The registered methods are ``tree_shap`` and ``linear_shap`` (:mod:`perspicio.methods.tree`).
numba, xgboost and lightgbm are imported only when needed.
"""

from __future__ import annotations

from .ensemble import TreeEnsemble
from .readers import read_model, supported_models
from .treeshap import TreeShapResult, tree_shap

__all__ = ["TreeEnsemble", "TreeShapResult", "read_model", "supported_models", "tree_shap"]
