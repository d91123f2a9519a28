"""Readers: XGBoost, LightGBM, scikit-learn and ONNX tree models -> :class:`TreeEnsemble`.

Each reader works from the library's documented model description - XGBoost's JSON model
(``Booster.save_raw("json")``, or a ``.json``/``.ubj`` file), LightGBM's ``dump_model()``, and
scikit-learn's public tree arrays (``tree_``; HistGradientBoosting's predictor nodes), ONNX
tree-ensemble operators (:mod:`perspicio.trees.onnx_reader`) - never by unpickling and never
through shap. Nothing here imports xgboost, lightgbm or scikit-learn at
module level.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelError
from .ensemble import (
    CAT_LEFT,
    CAT_RIGHT,
    LE,
    NAN_AS_ZERO,
    ZERO_MISSING,
    TreeEnsemble,
    bitset,
    build_ensemble,
)

SUPPORTED = (
    "xgboost Booster / XGBClassifier / XGBRegressor / XGBRanker (or a .json/.ubj model file)",
    "lightgbm Booster / LGBMClassifier / LGBMRegressor / LGBMRanker (or a LightGBM text model file)",
    "sklearn DecisionTreeClassifier/Regressor, ExtraTreeClassifier/Regressor",
    "RandomForestClassifier/Regressor, ExtraTreesClassifier/Regressor",
    "GradientBoostingClassifier/Regressor",
    "HistGradientBoostingClassifier/Regressor",
    "IsolationForest",
    "ONNX TreeEnsembleRegressor / TreeEnsembleClassifier / TreeEnsemble (an .onnx file or onnx.ModelProto)",
)

_XGB_LOGISTIC = ("binary:logistic", "reg:logistic", "binary:logitraw")
_XGB_LOG_LINK = ("count:poisson", "reg:gamma", "reg:tweedie", "survival:cox", "survival:aft")


def supported_models() -> str:
    return "; ".join(SUPPORTED)


def read_model(model: Any) -> TreeEnsemble:
    """The :class:`TreeEnsemble` of a supported tree model, model file, or a wrapper of one.

    Accepts the estimator itself, a bound method of it (``clf.predict_proba``), a perspicio
    ``BlackBox`` or tabular demo wrapping one, or a path to an XGBoost JSON/UBJSON or LightGBM
    text model file. Anything else raises :class:`~perspicio.errors.ModelError` naming what is supported.
    """
    if isinstance(model, TreeEnsemble):
        return model
    if isinstance(model, (str, os.PathLike)):
        return _read_file(Path(model))
    inner = _unwrap(model)
    cls = type(inner)
    mod = cls.__module__ or ""
    name = cls.__name__
    if mod.startswith("onnx") and name == "ModelProto":
        from .onnx_reader import read_onnx

        return read_onnx(inner)
    if mod.startswith("xgboost"):
        if name in (
            "Booster",
            "XGBClassifier",
            "XGBRegressor",
            "XGBModel",
            "XGBRFClassifier",
            "XGBRFRegressor",
            "XGBRanker",
        ):
            return read_xgboost(inner)
    elif mod.startswith("lightgbm"):
        if name in ("Booster", "LGBMClassifier", "LGBMRegressor", "LGBMRanker", "LGBMModel"):
            return read_lightgbm(inner)
    elif mod.startswith("sklearn"):
        reader = _SKLEARN.get(name)
        if reader is not None:
            _check_fitted(inner)
            return reader(inner)
    raise ModelError(
        f"tree_shap cannot read a {mod}.{name}; supported tree models: {supported_models()}."
    )


def _unwrap(model: Any) -> Any:
    """The estimator behind a BlackBox, a tabular demo (``.estimator``) or a bound method."""
    for _ in range(4):
        est = getattr(model, "estimator", None)
        if est is not None and type(model).__name__ == "TabularModel":
            model = est
            continue
        fn = getattr(model, "fn", None)
        if getattr(model, "is_black_box", False) and fn is not None:
            model = fn
            continue
        owner = getattr(model, "__self__", None)
        if owner is not None and callable(model) and not isinstance(owner, type):
            model = owner
            continue
        break
    return model


def _check_fitted(est: Any) -> None:
    if not any(hasattr(est, a) for a in ("tree_", "estimators_", "_predictors")):
        raise ModelError(f"the {type(est).__name__} is not fitted (call .fit first).")


def _read_file(path: Path) -> TreeEnsemble:
    if not path.is_file():
        raise ModelError(f"model file {str(path)!r} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from .onnx_reader import read_onnx

        return read_onnx(path)
    if suffix in (".json", ".ubj"):
        try:
            import xgboost
        except ImportError:
            if suffix == ".ubj":
                raise ModelError(
                    f"reading the UBJSON model {path.name} needs xgboost (pip install xgboost); "
                    "or save it as JSON."
                ) from None
            return _xgb_from_json(
                json.loads(path.read_text()), source=f"XGBoost model file {path.name}"
            )
        booster = xgboost.Booster()
        try:
            booster.load_model(str(path))
        except xgboost.core.XGBoostError as exc:
            # xgboost's message is "[time] source.cc:line: what" followed by a native backtrace
            text = str(exc).strip()
            what = re.sub(r"^\[[\d:]+\]\s+\S+:\d+:\s*", "", text.splitlines()[0] if text else "")
            raise ModelError(
                f"{path.name} is not a readable XGBoost model (corrupt or truncated?): {what}"
            ) from exc
        return read_xgboost(booster, source=f"XGBoost model file {path.name}")
    if suffix in (".txt", ".model", ".lgb", ".lgbm"):
        try:
            import lightgbm
        except ImportError:
            raise ModelError(
                f"reading the LightGBM model {path.name} needs lightgbm (pip install lightgbm)."
            ) from None
        try:
            booster = lightgbm.Booster(model_file=str(path))
        except Exception as exc:  # noqa: BLE001 - lightgbm raises its own error types
            raise ModelError(f"{path.name} is not a LightGBM text model: {exc}") from exc
        return read_lightgbm(booster, source=f"LightGBM model file {path.name}")
    raise ModelError(
        f"cannot tell the format of {path.name}: expected an XGBoost .json/.ubj, a LightGBM .txt or an "
        ".onnx model file. Pickled models are never read (unpickling runs code); load them yourself if you trust them."
    )


# ============================================================================ XGBoost


def read_xgboost(model: Any, source: str | None = None) -> TreeEnsemble:
    """Read an XGBoost ``Booster`` or scikit-learn wrapper from its JSON model.

    The trees used are those XGBoost's own ``predict`` uses: a scikit-learn wrapper fitted with
    early stopping predicts with the rounds up to ``best_iteration`` (``iteration_range``), so only
    those are read; a ``Booster`` (or a model file) predicts with every tree.
    """
    if hasattr(model, "get_booster"):
        try:
            booster = model.get_booster()
        except Exception as exc:  # noqa: BLE001 - xgboost raises sklearn's NotFittedError
            raise ModelError(
                f"the {type(model).__name__} is not fitted (call .fit or .load_model first)."
            ) from exc
    else:
        booster = model
    doc = json.loads(bytes(booster.save_raw("json")).decode())
    classes = getattr(model, "classes_", None)
    missing = getattr(model, "missing", np.nan)
    try:
        missing = float(missing) if missing is not None else float("nan")
    except (TypeError, ValueError):
        missing = float("nan")
    rounds = None
    if hasattr(model, "get_booster"):
        try:
            best = model.best_iteration
        except AttributeError:  # not fitted with early stopping
            best = None
        if best is not None:
            rounds = int(best) + 1
    ens = _xgb_from_json(
        doc,
        source=source or f"xgboost.{type(model).__name__}",
        classes=classes,
        feature_names=booster.feature_names,
        missing=missing,
        rounds=rounds,
    )
    # the base score's link depends on the objective: check it against XGBoost's own margin
    import xgboost

    probe = np.full((1, ens.n_features), np.nan, dtype=np.float32)
    dm = xgboost.DMatrix(
        probe,
        missing=np.nan,
        feature_names=booster.feature_names,
        feature_types=booster.feature_types,
    )
    theirs = np.asarray(
        booster.predict(
            dm, output_margin=True, validate_features=False, iteration_range=(0, rounds or 0)
        ),
        dtype=np.float64,
    ).reshape(1, -1)
    ours = ens.predict(probe)
    if theirs.shape == ours.shape and not np.allclose(theirs, ours, rtol=1e-5, atol=1e-5):
        ens.base_offset[:] += (theirs - ours)[0]
    return ens


def _xgb_from_json(
    doc: dict[str, Any],
    *,
    source: str,
    classes: Any = None,
    feature_names: Any = None,
    missing: float = float("nan"),
    rounds: int | None = None,
) -> TreeEnsemble:
    try:
        learner = doc["learner"]
        params = learner["learner_model_param"]
        gb = learner["gradient_booster"]
    except (KeyError, TypeError) as exc:
        raise ModelError(
            f"{source} is not an XGBoost JSON model (no learner/gradient_booster)."
        ) from exc
    kind = gb.get("name")
    weights = None
    if kind == "dart":
        weights = gb.get("weight_drop")
        gb = gb["gbtree"]
    elif kind != "gbtree":
        hint = " Explain it with method='linear_shap'." if kind == "gblinear" else ""
        raise ModelError(
            f"{source} uses the {kind!r} booster; only tree boosters (gbtree, dart) are tree "
            f"models.{hint}"
        )
    model = gb["model"]
    trees_json = model["trees"]
    info = model.get("tree_info", [0] * len(trees_json))
    if (
        rounds is not None
    ):  # the trees of the first `rounds` boosting rounds (iteration_range=(0, rounds))
        indptr = model.get("iteration_indptr")
        if indptr is None:
            per_round = int(
                model.get("gbtree_model_param", {}).get("num_parallel_tree", 1) or 1
            ) * max(1, int(learner["learner_model_param"].get("num_class", 0) or 0))
            end = rounds * per_round
        else:
            end = int(indptr[min(rounds, len(indptr) - 1)])
        trees_json, info = trees_json[:end], info[:end]
    n_features = int(params.get("num_feature", 0))
    n_out = max(int(params.get("num_class", 0) or 0), int(params.get("num_target", 1) or 1), 1)
    objective = learner.get("objective", {}).get("name", "")
    base = np.asarray(_parse_floats(params.get("base_score", "0")), dtype=np.float64)
    if objective in _XGB_LOGISTIC:
        base = np.log(base / (1.0 - base))
    elif objective in _XGB_LOG_LINK:
        base = np.log(base)
    if base.size not in (1, n_out):
        raise ModelError(f"{source}: base_score has {base.size} values for {n_out} outputs.")
    trees = []
    for i, t in enumerate(trees_json):
        tp = t.get("tree_param", {})
        width = int(tp.get("size_leaf_vector", "1") or 1)
        left = np.asarray(t["left_children"], dtype=np.int64)
        right = np.asarray(t["right_children"], dtype=np.int64)
        dl = np.asarray(t["default_left"], dtype=bool)
        cond = np.asarray(t["split_conditions"], dtype=np.float32).astype(np.float64)
        n = len(left)
        is_leaf = left < 0
        if width > 1:  # vector leaf (multi_strategy="multi_output_tree"): one leaf value per output
            if width != n_out:
                raise ModelError(f"{source}: vector leaves of size {width} for {n_out} outputs.")
            weights_v = (
                np.asarray(t["base_weights"], dtype=np.float32).astype(np.float64).reshape(n, width)
            )
            values = [np.where(is_leaf, weights_v[:, k], 0.0) for k in range(width)]
        else:
            values = [np.where(is_leaf, cond, 0.0)]
        if weights is not None:
            values = [v * float(weights[i]) for v in values]
        stype = np.asarray(t.get("split_type", [0] * n), dtype=np.int64)
        flags = np.zeros(n, dtype=np.uint8)
        cats: list[Any] = [None] * n
        if (stype == 1).any():
            nodes = t["categories_nodes"]
            segs = t["categories_segments"]
            sizes = t["categories_sizes"]
            allc = t["categories"]
            for nd, s0, sz in zip(nodes, segs, sizes):
                cats[int(nd)] = (bitset(allc[int(s0) : int(s0) + int(sz)]), None)
                flags[int(nd)] = CAT_RIGHT  # XGBoost: categories in the set go right
        structure = {
            "left": left,
            "right": np.where(is_leaf, -1, right),
            "default": np.where(dl, left, right),
            "feature": np.asarray(t["split_indices"], dtype=np.int64),
            "threshold": cond,
            "flags": flags,
            "cover": np.asarray(t["sum_hessian"], dtype=np.float64),
            "cats": cats,
        }
        if (
            width > 1
        ):  # the tree adds one scalar tree per output, all with the same structure and covers
            trees.extend({**structure, "value": values[k], "output": k} for k in range(width))
        else:
            trees.append(
                {**structure, "value": values[0], "output": int(info[i]) if n_out > 1 else 0}
            )
    transform = (
        "logistic"
        if objective in ("binary:logistic", "reg:logistic", "binary:logitraw")
        else "softmax"
        if objective in ("multi:softprob", "multi:softmax")
        else None
    )
    names = tuple(str(c) for c in classes) if classes is not None else None
    if names is not None and n_out == 1 and len(names) == 2:
        names = (names[1],)
    return build_ensemble(
        trees,
        n_features=n_features,
        n_outputs=n_out,
        base_offset=base,
        input_dtype="float32",
        transform=transform,
        nan_routing=True,
        inf_routing=False,  # a DMatrix (pred_contribs) refuses Inf unless missing=inf
        category_codes=True,
        categories=_xgb_categories(model.get("cats"), n_features),
        unknown_category_error=True,
        missing_value=missing,
        source=source,
        feature_names=tuple(feature_names) if feature_names else None,
        output_names=names,
    )


def _xgb_categories(cats: Any, n_features: int) -> tuple[Any, ...] | None:
    """The training categories XGBoost 3 stores per column (``model["cats"]["enc"]``): strings as
    UTF-8 bytes cut at ``offsets``, numbers as ``values``; None for numerical columns."""
    if not isinstance(cats, dict) or not isinstance(cats.get("enc"), list):
        return None
    out: list[Any] = []
    for enc in cats["enc"][:n_features]:
        values = enc.get("values") if isinstance(enc, dict) else None
        if not values:
            out.append(None)
            continue
        offsets = enc.get("offsets")
        if offsets:
            raw = bytes(int(v) & 0xFF for v in values)
            out.append(
                tuple(
                    raw[int(a) : int(b)].decode("utf-8", "replace")
                    for a, b in zip(offsets[:-1], offsets[1:])
                )
            )
        else:
            out.append(tuple(values))
    out += [None] * (n_features - len(out))
    return tuple(out) if any(c is not None for c in out) else None


def _parse_floats(s: Any) -> list[float]:
    if isinstance(s, (int, float)):
        return [float(s)]
    s = str(s).strip().strip("[]")
    return [float(v) for v in s.split(",") if v.strip()] or [0.0]


# ============================================================================ LightGBM


def read_lightgbm(model: Any, source: str | None = None) -> TreeEnsemble:
    """Read a LightGBM ``Booster`` or scikit-learn wrapper from ``dump_model()``."""
    if type(model).__name__ != "Booster":
        try:
            booster = model.booster_
        except Exception as exc:  # noqa: BLE001 - lightgbm raises its own NotFittedError
            raise ModelError(
                f"the {type(model).__name__} is not fitted (call .fit first)."
            ) from exc
    else:
        booster = model
    source = source or f"lightgbm.{type(model).__name__}"
    dump = booster.dump_model()
    per_iter = int(dump.get("num_tree_per_iteration", 1))
    n_out = max(per_iter, 1)
    n_features = int(dump["max_feature_idx"]) + 1
    infos = dump["tree_info"]
    scale = 1.0
    if dump.get("average_output"):
        scale = 1.0 / max(1, len(infos) // n_out)
    trees = []
    for i, ti in enumerate(infos):
        tree = _lgb_tree(ti["tree_structure"], source)
        tree["value"] = tree["value"] * scale
        tree["output"] = i % n_out
        trees.append(tree)
    objective = str(dump.get("objective", "")).split()
    head = objective[0] if objective else ""
    transform = None
    if head in (
        "binary",
        "cross_entropy",
        "xentropy",
        "multiclassova",
        "multiclass_ova",
        "ova",
        "ovr",
    ):
        sigmoid = [o for o in objective if o.startswith("sigmoid:")]
        if not sigmoid or float(sigmoid[0].split(":")[1]) == 1.0:
            transform = "logistic"
    elif head in ("multiclass", "softmax"):
        transform = "softmax"
    classes = getattr(model, "classes_", None)
    names = tuple(str(c) for c in classes) if classes is not None else None
    if names is not None and n_out == 1 and len(names) == 2:
        names = (names[1],)
    fnames = dump.get("feature_names")
    pandas_cats = dump.get("pandas_categorical") or getattr(booster, "pandas_categorical", None)
    return build_ensemble(
        trees,
        n_features=n_features,
        n_outputs=n_out,
        base_offset=0.0,
        input_dtype="float64",
        transform=transform,
        nan_routing=True,
        inf_routing=True,
        category_codes=True,
        categories=tuple(tuple(c) for c in pandas_cats) if pandas_cats else None,
        categories_by_order=True,
        source=source,
        feature_names=tuple(fnames) if fnames else None,
        output_names=names,
    )


def _lgb_tree(root: dict[str, Any], source: str) -> dict[str, Any]:
    left, right, default, feature, thr, flags, value, cover, cats = (
        [],
        [],
        [],
        [],
        [],
        [],
        [],
        [],
        [],
    )
    stack = [(root, -1, False)]
    # iterative pre-order: each node gets the next id; children ids are patched into the parent
    while stack:
        node, parent, is_left = stack.pop()
        i = len(left)
        if parent >= 0:
            (left if is_left else right)[parent] = i
        for arr, v in (
            (left, -1),
            (right, -1),
            (default, -1),
            (feature, -1),
            (thr, 0.0),
            (flags, 0),
            (value, 0.0),
            (cover, 0.0),
            (cats, None),
        ):
            arr.append(v)
        if "split_index" not in node:
            if node.get("leaf_coeff"):  # linear_tree=True: leaf_const + coeff . x in this leaf
                raise ModelError(
                    f"{source} has linear trees (linear_tree=True): its leaves are linear functions "
                    "of the inputs, not constants, so it is not a sum of piecewise-constant trees and "
                    "tree_shap cannot explain it exactly. Use a model-agnostic method (kernel_shap)."
                )
            value[i] = float(node.get("leaf_const", node.get("leaf_value", 0.0)))
            cover[i] = float(node.get("leaf_count", 0.0))
            continue
        feature[i] = int(node["split_feature"])
        cover[i] = float(node.get("internal_count", 0.0))
        dt = node.get("decision_type", "<=")
        mt = node.get("missing_type", "None")
        dl = bool(node.get("default_left", True))
        if dt == "==":
            cs = [int(c) for c in str(node["threshold"]).split("||") if c != ""]
            cats[i] = (bitset(cs), None)
            flags[i] = CAT_LEFT
            default[i] = -2  # NaN goes right for categorical splits
        elif dt == "<=":
            thr[i] = float(node["threshold"])
            flags[i] = LE | (NAN_AS_ZERO if mt == "None" else ZERO_MISSING if mt == "Zero" else 0)
            default[i] = -3 if dl else -2
        else:
            raise ModelError(f"{source}: unknown LightGBM decision_type {dt!r}.")
        stack.append((node["right_child"], i, False))
        stack.append((node["left_child"], i, True))
    left_a = np.asarray(left)
    right_a = np.asarray(right)
    default_a = np.asarray(default)
    default_a = np.where(default_a == -3, left_a, np.where(default_a == -2, right_a, -1))
    return {
        "left": left_a,
        "right": right_a,
        "default": default_a,
        "feature": np.asarray(feature),
        "threshold": np.asarray(thr),
        "flags": np.asarray(flags, dtype=np.uint8),
        "value": np.asarray(value),
        "cover": np.asarray(cover),
        "cats": cats,
    }


# ============================================================================ scikit-learn


def _routes(est: Any, n_features: int, value: float) -> bool:
    """Whether the estimator itself accepts inputs equal to ``value`` (NaN: newer scikit-learn
    trees route it; +-Inf: HistGradientBoosting does, the classic trees do not)."""
    try:
        est.predict(np.full((1, n_features), value))
    except Exception:  # noqa: BLE001 - any refusal means the value is not accepted
        return False
    return True


def _sk_tree(
    tree: Any,
    *,
    values: np.ndarray,
    scale: float = 1.0,
    output: int = -1,
    features: np.ndarray | None = None,
) -> dict[str, Any]:
    left = np.asarray(tree.children_left, dtype=np.int64)
    right = np.asarray(tree.children_right, dtype=np.int64)
    mgl = getattr(tree, "missing_go_to_left", None)
    if mgl is not None:
        default = np.where(np.asarray(mgl, dtype=bool), left, right)
    else:
        default = left.copy()
    feat = np.asarray(tree.feature, dtype=np.int64)
    if features is not None:
        feat = np.where(feat >= 0, np.asarray(features)[np.maximum(feat, 0)], feat)
    return {
        "left": left,
        "right": right,
        "default": default,
        "feature": feat,
        "threshold": np.asarray(tree.threshold, dtype=np.float64),
        "flags": np.full(len(left), LE, dtype=np.uint8),
        "value": values * scale,
        "cover": np.asarray(tree.weighted_n_node_samples, dtype=np.float64),
        "output": output,
    }


def _classifier_values(tree: Any) -> np.ndarray:
    v = np.asarray(tree.value, dtype=np.float64)
    if v.shape[1] != 1:
        raise ModelError("multi-output scikit-learn classifiers are not supported by tree_shap.")
    v = v[:, 0, :]
    s = v.sum(axis=1, keepdims=True)
    return np.divide(v, s, out=np.zeros_like(v), where=s > 0)


def _regressor_values(tree: Any) -> np.ndarray:
    return np.asarray(tree.value, dtype=np.float64)[:, :, 0]


def _sk_names(est: Any) -> tuple[str, ...] | None:
    names = getattr(est, "feature_names_in_", None)
    return tuple(str(n) for n in names) if names is not None else None


def _read_sk_single(est: Any) -> TreeEnsemble:
    is_clf = hasattr(est, "classes_")
    vals = _classifier_values(est.tree_) if is_clf else _regressor_values(est.tree_)
    return _sk_averaged_ensemble(est, [_sk_tree(est.tree_, values=vals)], is_clf)


def _read_sk_forest(est: Any) -> TreeEnsemble:
    is_clf = hasattr(est, "classes_")
    scale = 1.0 / len(est.estimators_)
    trees = []
    for e in est.estimators_:
        vals = _classifier_values(e.tree_) if is_clf else _regressor_values(e.tree_)
        trees.append(_sk_tree(e.tree_, values=vals, scale=scale))
    return _sk_averaged_ensemble(est, trees, is_clf)


def _sk_averaged_ensemble(est: Any, trees: list, is_clf: bool) -> TreeEnsemble:
    """The ensemble of a scikit-learn tree or forest (leaf values already scaled): no base value,
    class fractions as given (identity transform) for classifiers."""
    f = int(est.n_features_in_)
    return build_ensemble(
        trees,
        n_features=f,
        n_outputs=trees[0]["value"].shape[1],
        base_offset=0.0,
        input_dtype="float32",
        transform="identity" if is_clf else None,
        nan_routing=_routes(est, f, np.nan),
        inf_routing=_routes(est, f, np.inf),
        source=f"sklearn.{type(est).__name__}",
        feature_names=_sk_names(est),
        output_names=tuple(str(c) for c in est.classes_) if is_clf else None,
    )


def _read_sk_gb(est: Any) -> TreeEnsemble:
    init = est.init_
    if not (isinstance(init, str) and init == "zero") and type(init).__name__ not in (
        "DummyRegressor",
        "DummyClassifier",
    ):
        raise ModelError(
            f"{type(est).__name__} with init={type(init).__name__}: the initial prediction is not a "
            "constant, so the model is not a sum of trees plus a base value."
        )
    is_clf = hasattr(est, "classes_")
    lr = float(est.learning_rate)
    ests = est.estimators_
    n_out = ests.shape[1]
    f = int(est.n_features_in_)
    trees = []
    for row in ests:
        for k, e in enumerate(row):
            trees.append(
                _sk_tree(e.tree_, values=_regressor_values(e.tree_)[:, :1], scale=lr, output=k)
            )
    ens = build_ensemble(
        trees,
        n_features=f,
        n_outputs=n_out,
        base_offset=0.0,
        input_dtype="float32",
        transform=_gb_link(est, n_out) if is_clf else None,
        nan_routing=False,
        source=f"sklearn.{type(est).__name__}"
        + (" (exponential loss)" if str(getattr(est, "loss", "")) == "exponential" else ""),
        feature_names=_sk_names(est),
        output_names=_class_names(est, n_out),
    )
    # the constant initial raw prediction: the model's raw output minus the trees on one row
    probe = np.zeros((1, f))
    raw = est.decision_function(probe) if is_clf else est.predict(probe)
    ens.base_offset[:] = (
        np.asarray(raw, dtype=np.float64).reshape(-1)[:n_out] - ens.predict(probe)[0]
    )
    return ens


def _gb_link(est: Any, n_out: int) -> str | None:
    """The link of a GradientBoostingClassifier: logistic / softmax, or None for the exponential
    (AdaBoost) loss, whose probability is sigmoid(2 * margin) - not a link tree_shap implements."""
    if str(getattr(est, "loss", "log_loss")) == "exponential":
        return None
    return "logistic" if n_out == 1 else "softmax"


def _class_names(est: Any, n_out: int) -> tuple[str, ...] | None:
    classes = getattr(est, "classes_", None)
    if classes is None:
        return None
    names = tuple(str(c) for c in classes)
    return (names[1],) if n_out == 1 and len(names) == 2 else names


def _hgb_column_map(est: Any) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """(original column of each predictor column, raw categories per categorical predictor column).

    Recent scikit-learn fits on columns reordered by an internal ordinal encoder (categorical columns
    first, categories coded 0..k-1, unknown ones coded as missing); the trees refer to that order."""
    f = int(est.n_features_in_)
    pre = getattr(est, "_preprocessor", None)
    if pre is None:
        return np.arange(f), {}
    cat_cols: list[int] = []
    num_cols: list[int] = []
    encoder = None
    for name, trans, cols in pre.transformers_:
        idx = (
            np.flatnonzero(np.asarray(cols))
            if np.asarray(cols).dtype == bool
            else np.asarray(cols, dtype=int)
        )
        if name == "encoder":
            cat_cols, encoder = list(idx), trans
        elif name == "numerical":
            num_cols = list(idx)
        elif trans != "drop" and len(idx):
            raise ModelError(
                f"{type(est).__name__}: unexpected internal column transformer {name!r}."
            )
    cats: dict[int, np.ndarray] = {}
    for j, c in enumerate(getattr(encoder, "categories_", [])):
        raw = np.asarray(c)
        if raw.dtype.kind not in "iuf" or (
            raw.dtype.kind == "f" and not np.all(np.isnan(raw) | (raw == np.round(raw)))
        ):
            raise ModelError(
                f"{type(est).__name__}: categorical column {cat_cols[j]} has non-integer categories "
                f"({raw[:3].tolist()} ...); encode them as non-negative integers before fitting."
            )
        cats[j] = raw
    return np.asarray(cat_cols + num_cols, dtype=np.int64), cats


def _codes_to_raw(words: np.ndarray, raw: np.ndarray) -> np.ndarray:
    codes = [
        c for c in range(len(raw)) if c < 32 * len(words) and (int(words[c >> 5]) >> (c & 31)) & 1
    ]
    values = [int(raw[c]) for c in codes if not np.isnan(raw[c]) and raw[c] >= 0]
    return bitset(values)


def _read_sk_hgb(est: Any) -> TreeEnsemble:
    is_clf = hasattr(est, "classes_")
    f = int(est.n_features_in_)
    columns, raw_cats = _hgb_column_map(est)
    known, fmap = None, None
    try:
        known, fmap = est._bin_mapper.make_known_categories_bitsets()
    except AttributeError:
        pass
    trees = []
    n_out = len(est._predictors[0])
    for it in est._predictors:
        for k, pred in enumerate(it):
            nodes = pred.nodes
            is_leaf = nodes["is_leaf"].astype(bool)
            left = np.where(is_leaf, -1, nodes["left"].astype(np.int64))
            right = np.where(is_leaf, -1, nodes["right"].astype(np.int64))
            default = np.where(nodes["missing_go_to_left"].astype(bool), left, right)
            thr_field = "num_threshold" if "num_threshold" in nodes.dtype.names else "threshold"
            flags = np.full(len(nodes), LE, dtype=np.uint8)
            cats: list[Any] = [None] * len(nodes)
            feat = nodes["feature_idx"].astype(np.int64)
            if "is_categorical" in nodes.dtype.names:
                for i in np.flatnonzero(nodes["is_categorical"].astype(bool) & ~is_leaf):
                    words = np.asarray(
                        pred.raw_left_cat_bitsets[nodes["bitset_idx"][i]], dtype=np.uint32
                    )
                    kn = None
                    if known is not None:
                        kn = np.asarray(known[fmap[feat[i]]], dtype=np.uint32)
                    if raw_cats:  # codes of the internal encoder -> the raw category values
                        raw = raw_cats[int(feat[i])]
                        words = _codes_to_raw(words, raw)
                        kn = _codes_to_raw(
                            np.full(len(raw) // 32 + 1, 0xFFFFFFFF, dtype=np.uint32), raw
                        )
                    cats[i] = (words, kn)
                    flags[i] = CAT_LEFT
            feat = np.where(is_leaf, -1, columns[np.maximum(feat, 0)])
            trees.append(
                {
                    "left": left,
                    "right": right,
                    "default": default,
                    "feature": feat,
                    "threshold": nodes[thr_field].astype(np.float64),
                    "flags": flags,
                    "value": np.where(is_leaf, nodes["value"], 0.0).astype(np.float64),
                    "cover": nodes["count"].astype(np.float64),
                    "cats": cats,
                    "output": k,
                }
            )
    base = np.asarray(est._baseline_prediction, dtype=np.float64).reshape(-1)
    loss = getattr(getattr(est, "_loss", None), "__class__", type(None)).__name__
    transform = None
    if is_clf:
        transform = "logistic" if n_out == 1 else "softmax"
    return build_ensemble(
        trees,
        n_features=f,
        n_outputs=n_out,
        base_offset=base,
        input_dtype="float64",
        transform=transform,
        nan_routing=True,
        inf_routing=_routes(est, f, np.inf),
        source=f"sklearn.{type(est).__name__} ({loss})",
        feature_names=_sk_names(est),
        output_names=_class_names(est, n_out),
    )


def _avg_path_length(n: np.ndarray) -> np.ndarray:
    """c(n): average path length of an unsuccessful binary-search-tree search (Liu et al. 2008)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def _read_sk_iforest(est: Any) -> TreeEnsemble:
    scale = 1.0 / len(est.estimators_)
    trees = []
    for e, feats in zip(est.estimators_, est.estimators_features_):
        t = e.tree_
        left = np.asarray(t.children_left)
        right = np.asarray(t.children_right)
        depth = np.zeros(len(left))
        for i in range(len(left)):  # parents precede their children in scikit-learn trees
            if left[i] >= 0:
                depth[left[i]] = depth[i] + 1
                depth[right[i]] = depth[i] + 1
        vals = (depth + _avg_path_length(t.n_node_samples))[:, None]
        trees.append(_sk_tree(t, values=vals, scale=scale, features=np.asarray(feats)))
    f = int(est.n_features_in_)
    return build_ensemble(
        trees,
        n_features=f,
        n_outputs=1,
        base_offset=0.0,
        input_dtype="float32",
        transform=None,
        nan_routing=_routes(est, f, np.nan),
        inf_routing=_routes(est, f, np.inf),
        source="sklearn.IsolationForest (mean path length)",
        feature_names=_sk_names(est),
        output_names=("path_length",),
    )


_SKLEARN = {
    "DecisionTreeClassifier": _read_sk_single,
    "DecisionTreeRegressor": _read_sk_single,
    "ExtraTreeClassifier": _read_sk_single,
    "ExtraTreeRegressor": _read_sk_single,
    "RandomForestClassifier": _read_sk_forest,
    "RandomForestRegressor": _read_sk_forest,
    "ExtraTreesClassifier": _read_sk_forest,
    "ExtraTreesRegressor": _read_sk_forest,
    "GradientBoostingClassifier": _read_sk_gb,
    "GradientBoostingRegressor": _read_sk_gb,
    "HistGradientBoostingClassifier": _read_sk_hgb,
    "HistGradientBoostingRegressor": _read_sk_hgb,
    "IsolationForest": _read_sk_iforest,
}

__all__ = ["SUPPORTED", "read_lightgbm", "read_model", "read_xgboost", "supported_models"]
