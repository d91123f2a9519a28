"""tree_shap: exact SHAP values of tree ensembles against shap's TreeExplainer, the libraries' own
pred_contrib(s)/pred_interactions, perspicio's shapley_exact on the same game, and a depth-2 tree
computed by hand. Small data: the whole file runs in well under a minute (numba compiles once)."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch

import perspicio
from perspicio.errors import InputError, ModelError, OptionError, TargetError
from perspicio.trees import read_model, tree_shap
from perspicio.trees.ensemble import LE, build_ensemble

shap = pytest.importorskip("shap")
xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")
from sklearn import ensemble as E  # noqa: E402
from sklearn import tree as T  # noqa: E402

warnings.filterwarnings("ignore", message=".*LightGBM binary classifier.*")

N, F = 300, 6


def rel(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a - b).max() / max(1e-12, np.abs(b).max()))


def as3(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a)
    return a[:, :, None] if a.ndim == 2 else a


def data(missing: bool, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(N, F))
    z = x.copy()
    if missing:
        x[rng.random(x.shape) < 0.12] = np.nan
    z0 = np.nan_to_num(x)
    yr = z0[:, 0] + z0[:, 1] * z0[:, 2] + np.sin(z0[:, 3]) + 0.1 * rng.normal(size=N)
    yb = (yr > np.median(yr)).astype(int)
    y3 = np.digitize(z[:, 0] + z[:, 4], [-0.6, 0.6])
    return x, yr, yb, y3


def fit(kind: str, task: str, missing: bool):
    x, yr, yb, y3 = data(missing)
    y = {"reg": yr, "bin": yb, "multi": y3}[task]
    if kind == "xgb":
        cls = xgb.XGBRegressor if task == "reg" else xgb.XGBClassifier
        return cls(n_estimators=25, max_depth=4, learning_rate=0.3, n_jobs=1).fit(x, y), x
    if kind == "lgb":
        cls = lgb.LGBMRegressor if task == "reg" else lgb.LGBMClassifier
        return cls(n_estimators=25, num_leaves=12, min_child_samples=5, verbose=-1, n_jobs=1).fit(
            x, y
        ), x
    sk = {
        "dt": (T.DecisionTreeRegressor, T.DecisionTreeClassifier, {"max_depth": 5}),
        "rf": (
            E.RandomForestRegressor,
            E.RandomForestClassifier,
            {"n_estimators": 15, "max_depth": 6},
        ),
        "et": (E.ExtraTreesRegressor, E.ExtraTreesClassifier, {"n_estimators": 15, "max_depth": 6}),
        "gb": (
            E.GradientBoostingRegressor,
            E.GradientBoostingClassifier,
            {"n_estimators": 15, "max_depth": 3},
        ),
        "hgb": (
            E.HistGradientBoostingRegressor,
            E.HistGradientBoostingClassifier,
            {"max_iter": 15, "max_depth": 4},
        ),
    }[kind]
    cls = sk[0] if task == "reg" else sk[1]
    return cls(random_state=0, **sk[2]).fit(x, y), x


def library_margin(m, x: np.ndarray) -> np.ndarray:
    """The library's own raw output (N, K)."""
    name = type(m).__name__
    if name.startswith("XGB"):
        out = m.get_booster().predict(xgb.DMatrix(x), output_margin=True)
    elif name.startswith("LGBM"):
        out = m.predict(x, raw_score=True)
    elif name.startswith("HistGradient"):
        out = m._raw_predict(x)
    elif name.startswith("GradientBoosting"):
        out = m.decision_function(x) if hasattr(m, "classes_") else m.predict(x)
    elif name == "IsolationForest":
        c = E._iforest._average_path_length([m.max_samples_])[0]
        out = -np.log2(-m.score_samples(x)) * c
    else:
        out = m.predict_proba(x) if hasattr(m, "classes_") else m.predict(x)
    out = np.asarray(out, dtype=np.float64)
    return out[:, None] if out.ndim == 1 else out


CASES = [
    (k, t, miss) for k in ("xgb", "lgb") for t in ("reg", "bin", "multi") for miss in (False, True)
]
CASES += [(k, t, False) for k in ("dt", "rf", "et", "gb") for t in ("reg", "bin", "multi")]
CASES += [
    ("dt", "multi", True),
    ("rf", "reg", True),
    ("hgb", "reg", False),
    ("hgb", "bin", True),
    ("hgb", "reg", True),
    ("hgb", "multi", True),
]


@pytest.mark.parametrize("kind,task,missing", CASES)
def test_path_dependent_equals_shap_and_efficiency(kind, task, missing):
    m, x = fit(kind, task, missing)
    ens = read_model(m)
    res = tree_shap(ens, x)
    # our margin is the library's (XGBoost sums in float32, hence the tolerance)
    assert rel(res.output, library_margin(m, x)) < 2e-6
    # efficiency to float64 rounding
    assert np.abs(res.values.sum(1) + res.base - res.output).max() < 1e-9 * max(
        1.0, np.abs(res.output).max()
    )
    if (kind, task) == ("gb", "multi"):  # shap supports binary GradientBoostingClassifier only
        ref = np.stack([_path_dependent_enumeration(ens, row) for row in x[:5]])
        assert rel(res.values[:5], ref) < 1e-9
        return
    ref = as3(shap.TreeExplainer(m).shap_values(x))  # XGBoost/LightGBM: their own pred_contrib(s)
    assert rel(res.values, ref) < 1e-6


def _path_dependent_enumeration(ens, row: np.ndarray) -> np.ndarray:
    """Shapley values (F, K) of the tree-path-dependent game by enumerating coalitions, with the game
    evaluated by a plain recursion over the ensemble's arrays (covers weight the unknown branches)."""

    def expect(n: int, s: int, t: int) -> np.ndarray:
        if ens.left[n] < 0:
            out = np.zeros(ens.n_outputs)
            k = ens.tree_output[t]
            out[k if k >= 0 else slice(None)] = ens.value[n, k] if k >= 0 else ens.value[n]
            return out
        f = ens.feature[n]
        if s >> f & 1:
            v = row[f]
            if np.isnan(v):
                return expect(ens.default[n], s, t)
            return expect(ens.left[n] if v <= ens.threshold[n] else ens.right[n], s, t)
        cl, cr = ens.left[n], ens.right[n]
        return (ens.cover[cl] * expect(cl, s, t) + ens.cover[cr] * expect(cr, s, t)) / ens.cover[n]

    f = ens.n_features
    vals = {
        s: ens.base_offset + sum(expect(ens.tree_start[t], s, t) for t in range(ens.n_trees))
        for s in range(1 << f)
    }
    phi = np.zeros((f, ens.n_outputs))
    for i in range(f):
        for s in range(1 << f):
            if not s >> i & 1:
                k = bin(s).count("1")
                phi[i] += (
                    math.factorial(k)
                    * math.factorial(f - k - 1)
                    / math.factorial(f)
                    * (vals[s | 1 << i] - vals[s])
                )
    return phi


def test_equals_xgboost_pred_contribs_and_pred_interactions_multiclass_with_missing():
    m, x = fit("xgb", "multi", True)
    b = m.get_booster()
    res = tree_shap(read_model(m), x[:80], interactions=True)
    contrib = b.predict(xgb.DMatrix(x[:80]), pred_contribs=True)  # (N, K, F + 1)
    inter = b.predict(xgb.DMatrix(x[:80]), pred_interactions=True)  # (N, K, F + 1, F + 1)
    assert rel(res.values, np.moveaxis(contrib[:, :, :-1], 1, 2)) < 1e-6
    assert rel(res.interactions, np.moveaxis(inter[:, :, :-1, :-1], 1, 3)) < 1e-6
    assert rel(res.base, contrib[0, :, -1]) < 1e-6
    # interaction rows sum to the SHAP values
    assert np.abs(res.interactions.sum(2) - res.values).max() < 1e-12


def test_equals_lightgbm_pred_contrib_multiclass_with_missing():
    m, x = fit("lgb", "multi", True)
    res = tree_shap(read_model(m), x)
    pc = m.predict(x, pred_contrib=True).reshape(len(x), 3, F + 1)
    assert rel(res.values, np.moveaxis(pc[:, :, :-1], 1, 2)) < 1e-9
    assert rel(res.base, pc[0, :, -1]) < 1e-9


@pytest.mark.parametrize(
    "kind,task,missing",
    [
        ("xgb", "bin", True),
        ("xgb", "multi", False),
        ("lgb", "reg", True),
        ("rf", "multi", False),
        ("gb", "bin", False),
        ("dt", "reg", False),
    ],
)
def test_path_dependent_interactions_equal_shap(kind, task, missing):
    m, x = fit(kind, task, missing)
    res = tree_shap(read_model(m), x[:60], interactions=True)
    ref = shap.TreeExplainer(m).shap_interaction_values(x[:60])
    ref = np.asarray(ref)
    if ref.ndim == 3:
        ref = ref[..., None]
    assert rel(res.interactions, ref) < 1e-6
    assert np.abs(res.interactions.sum(2) - res.values).max() < 1e-9


@pytest.mark.parametrize(
    "kind,task,missing",
    [
        ("xgb", "bin", True),
        ("xgb", "multi", True),
        ("xgb", "reg", False),
        ("lgb", "bin", True),
        ("lgb", "multi", False),
        ("rf", "multi", False),
        ("et", "reg", False),
        ("gb", "bin", False),
        ("dt", "bin", True),
    ],
)
def test_interventional_equals_shap(kind, task, missing):
    m, x = fit(kind, task, missing)
    bg = x[-40:]
    res = tree_shap(read_model(m), x[:60], feature_perturbation="interventional", background=bg)
    ref = as3(shap.TreeExplainer(m, bg, feature_perturbation="interventional").shap_values(x[:60]))
    assert rel(res.values, ref) < 1e-6
    # base value: the mean background margin; efficiency against the library's margin
    assert np.abs(res.base - library_margin(m, bg).mean(0)).max() < 1e-6 * max(
        1.0, np.abs(res.base).max()
    )
    assert np.abs(res.values.sum(1) + res.base - res.output).max() < 1e-9 * max(
        1.0, np.abs(res.output).max()
    )


@pytest.mark.parametrize("kind", ["xgb", "lgb", "gb"])
def test_interventional_probability_equals_shap_binary(kind):
    m, x = fit(kind, "bin", kind != "gb")
    bg = x[-30:]
    res = tree_shap(
        read_model(m),
        x[:40],
        feature_perturbation="interventional",
        background=bg,
        model_output="probability",
    )
    ex = shap.TreeExplainer(
        m, bg, feature_perturbation="interventional", model_output="probability"
    )
    assert rel(res.values[:, :, 0], ex.shap_values(x[:40])) < 1e-6
    prob = m.predict_proba(x[:40])[:, 1]
    assert np.abs(res.values.sum(1)[:, 0] + res.base[0] - prob).max() < 1e-6


def test_interventional_probability_softmax_is_efficient():
    m, x = fit("xgb", "multi", True)
    bg = x[-20:]
    res = tree_shap(
        read_model(m),
        x[:20],
        feature_perturbation="interventional",
        background=bg,
        model_output="probability",
    )
    prob = m.predict_proba(x[:20])
    assert np.abs(res.values.sum(1) + res.base - prob).max() < 1e-6
    assert np.abs(res.values.sum(1) + res.base - res.output).max() < 1e-9


def _margin_fn(m):
    return lambda a: library_margin(m, np.asarray(a))


@pytest.mark.parametrize(
    "kind,task,missing",
    [
        ("gb", "multi", False),
        ("rf", "multi", False),
        ("hgb", "bin", False),
        ("hgb", "multi", True),
        ("hgb", "reg", True),
    ],
)
def test_interventional_equals_shapley_exact_on_the_same_game(kind, task, missing):
    """Also where shap's TreeExplainer fails (multi-class GradientBoosting, HistGradientBoosting with NaN)."""
    m, x = fit(kind, task, missing)
    bg = x[-25:]
    res = tree_shap(read_model(m), x[:3], feature_perturbation="interventional", background=bg)
    if missing:  # shapley_exact refuses NaN inputs: the same game enumerated here
        for r in range(3):
            vals = {}
            for mask in range(1 << F):
                keep = ((mask >> np.arange(F)) & 1).astype(bool)
                vals[mask] = library_margin(m, np.where(keep[None, :], x[r][None, :], bg)).mean(0)
            for k in range(res.values.shape[2]):
                ref = np.diag(
                    _interaction_index({s: float(v[k]) for s, v in vals.items()}, F)
                ).copy()
                ref += [
                    _interaction_index({s: float(v[k]) for s, v in vals.items()}, F)[i].sum()
                    - _interaction_index({s: float(v[k]) for s, v in vals.items()}, F)[i, i]
                    for i in range(F)
                ]
                assert rel(res.values[r, :, k], ref) < 1e-9
        return
    for k in range(res.values.shape[2]):
        e = perspicio.explain(_margin_fn(m), x[:3], method="shapley_exact", background=bg, target=k)
        assert rel(res.values[:, :, k], e.attributions.numpy()) < 1e-9
        assert rel(np.full(3, res.base[k]), e.base_value.numpy()) < 1e-9


def _interaction_index(values_of: dict[int, float], m: int) -> np.ndarray:
    """Shapley interaction values by enumeration (off-diagonal: the Shapley interaction index / 2 summed
    both ways; diagonal: the rest of the Shapley value)."""
    phi = np.zeros((m, m))
    sv = np.zeros(m)
    for i in range(m):
        for mask in range(1 << m):
            if mask >> i & 1:
                continue
            s = bin(mask).count("1")
            sv[i] += (
                math.factorial(s)
                * math.factorial(m - s - 1)
                / math.factorial(m)
                * (values_of[mask | 1 << i] - values_of[mask])
            )
    for i, j in itertools.combinations(range(m), 2):
        tot = 0.0
        for mask in range(1 << m):
            if mask >> i & 1 or mask >> j & 1:
                continue
            s = bin(mask).count("1")
            w = math.factorial(s) * math.factorial(m - s - 2) / (2 * math.factorial(m - 1))
            tot += w * (
                values_of[mask | 1 << i | 1 << j]
                - values_of[mask | 1 << i]
                - values_of[mask | 1 << j]
                + values_of[mask]
            )
        phi[i, j] = phi[j, i] = tot
    for i in range(m):
        phi[i, i] = sv[i] - phi[i].sum() + phi[i, i]
    return phi


@pytest.mark.parametrize("kind", ["xgb", "hgb"])
def test_interventional_interactions_equal_enumeration(kind):
    """shap has no interventional interaction values: check against the definition, enumerated."""
    m, x = fit(kind, "reg", True)
    bg = np.nan_to_num(x[-12:])
    res = tree_shap(
        read_model(m),
        x[:4],
        feature_perturbation="interventional",
        background=bg,
        interactions=True,
    )
    for r in range(4):
        vals = {}
        for mask in range(1 << F):
            keep = ((mask >> np.arange(F)) & 1).astype(bool)
            rows = np.where(keep[None, :], x[r][None, :], bg)
            vals[mask] = float(library_margin(m, rows)[:, 0].mean())
        ref = _interaction_index(vals, F)
        assert rel(res.interactions[r, :, :, 0], ref) < 2e-6
    assert np.abs(res.interactions.sum(2) - res.values).max() < 1e-12


def _hand_tree():
    """Depth-2 tree on x0, x1 (XGBoost-style `<` splits, NaN goes left at the root, right below):

    node0: x0 < 0.5 (cover 10)
      node1: x1 < 0.5 (cover 4) -> leaf3 = 1 (cover 1), leaf4 = 3 (cover 3)
      node2: x1 < 0.5 (cover 6) -> leaf5 = 5 (cover 3), leaf6 = 9 (cover 3)
    """
    tree = {
        "left": [1, 3, 5, -1, -1, -1, -1],
        "right": [2, 4, 6, -1, -1, -1, -1],
        "default": [1, 4, 6, -1, -1, -1, -1],
        "feature": [0, 1, 1, -1, -1, -1, -1],
        "threshold": [0.5, 0.5, 0.5, 0, 0, 0, 0],
        "value": [0, 0, 0, 1.0, 3.0, 5.0, 9.0],
        "cover": [10, 4, 6, 1, 3, 3, 3],
        "output": 0,
    }
    return build_ensemble(
        [tree], n_features=2, n_outputs=1, base_offset=0.0, source="hand-made tree"
    )


def test_hand_computed_depth_two_tree():
    ens = _hand_tree()
    x = np.array([[0.0, 1.0]])  # -> leaf4 = 3
    res = tree_shap(ens, x, interactions=True)
    # path-dependent game (covers as the distribution):
    #   v({})   = 0.4 (0.25 * 1 + 0.75 * 3) + 0.6 (0.5 * 5 + 0.5 * 9) = 1.0 + 4.2 = 5.2
    #   v({0})  = 0.25 * 1 + 0.75 * 3 = 2.5          (x0 = 0 fixes the left branch)
    #   v({1})  = 0.4 * 3 + 0.6 * 9 = 6.6            (x1 = 1 takes the right leaf on both sides)
    #   v({0,1}) = 3
    #   phi0 = ((2.5 - 5.2) + (3 - 6.6)) / 2 = -3.15;  phi1 = ((6.6 - 5.2) + (3 - 2.5)) / 2 = 0.95
    #   phi01 = (3 - 2.5 - 6.6 + 5.2) / 2 = -0.45; diagonals -3.15 + 0.45 = -2.7 and 0.95 + 0.45 = 1.4
    assert res.base[0] == pytest.approx(5.2, abs=1e-12)
    assert res.values[0, :, 0] == pytest.approx([-3.15, 0.95], abs=1e-12)
    assert res.interactions[0, :, :, 0] == pytest.approx(
        np.array([[-2.7, -0.45], [-0.45, 1.4]]), abs=1e-12
    )
    # interventional with one background row b = (1, 0) -> leaf5 = 5:
    #   v({}) = 5, v({0}) = f(0, 0) = 1, v({1}) = f(1, 1) = 9, v({0,1}) = 3
    #   phi0 = ((1 - 5) + (3 - 9)) / 2 = -5;  phi1 = ((9 - 5) + (3 - 1)) / 2 = 3
    iv = tree_shap(ens, x, feature_perturbation="interventional", background=np.array([[1.0, 0.0]]))
    assert iv.base[0] == pytest.approx(5.0)
    assert iv.values[0, :, 0] == pytest.approx([-5.0, 3.0], abs=1e-12)
    # missing x0 follows the default (left) branch: same leaf as x0 = 0
    assert tree_shap(ens, np.array([[np.nan, 1.0]])).values[0, :, 0] == pytest.approx(
        [-3.15, 0.95], abs=1e-12
    )


def test_hand_tree_le_splits_route_ties_left():
    ens = _hand_tree()
    flags = ens.flags.copy()
    flags[ens.left >= 0] = LE
    import dataclasses

    le = dataclasses.replace(ens, flags=flags, _cache={})
    assert ens.predict(np.array([[0.5, 0.5]]))[0, 0] == 9.0  # 0.5 < 0.5 is false: right, right
    assert le.predict(np.array([[0.5, 0.5]]))[0, 0] == 1.0  # 0.5 <= 0.5: left, left


# ---------------------------------------------------------------------------- categorical splits


def test_lightgbm_categorical_equals_pred_contrib():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(400, 4))
    x[:, 1] = rng.integers(0, 12, size=400)
    x[rng.random(400) < 0.1, 1] = np.nan
    y = np.nan_to_num(x[:, 0]) + np.isin(x[:, 1], [1, 4, 7, 9]) * 2.0 + 0.1 * rng.normal(size=400)
    m = lgb.LGBMRegressor(
        n_estimators=20,
        num_leaves=8,
        min_child_samples=5,
        min_data_per_group=5,
        cat_smooth=1,
        verbose=-1,
        n_jobs=1,
    ).fit(x, y, categorical_feature=[1])
    ens = read_model(m)
    assert (ens.cat_len > 0).any()
    xt = x.copy()
    xt[:5, 1] = [-1, 25, 3.7, np.nan, 0]  # negative, unseen, fractional, missing
    res = tree_shap(ens, xt)
    assert rel(res.output[:, 0], m.predict(xt, raw_score=True)) < 1e-12
    pc = m.predict(xt, pred_contrib=True)
    assert rel(res.values[:, :, 0], pc[:, :-1]) < 1e-9


def test_xgboost_categorical_equals_pred_contribs():
    pd = pytest.importorskip("pandas")
    rng = np.random.default_rng(4)
    n = 400
    cat = rng.integers(0, 8, size=n)
    df = pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "c": pd.Categorical(cat, categories=list(range(8))),
            "b": rng.normal(size=n),
        }
    )
    y = df["a"] + np.isin(cat, [2, 5, 6]) * 2.0 + 0.1 * rng.normal(size=n)
    m = xgb.XGBRegressor(
        n_estimators=20,
        max_depth=3,
        enable_categorical=True,
        tree_method="hist",
        max_cat_to_onehot=1,
        n_jobs=1,
    ).fit(df, y)
    ens = read_model(m)
    assert (ens.cat_len > 0).any()
    codes = df.assign(c=df["c"].cat.codes.astype(float)).to_numpy(dtype=np.float64)
    codes[:3, 1] = np.nan
    dfm = df.copy()
    dfm.loc[:2, "c"] = np.nan
    dm = xgb.DMatrix(dfm, enable_categorical=True)
    res = tree_shap(ens, codes)
    assert rel(res.output[:, 0], m.get_booster().predict(dm, output_margin=True)) < 2e-6
    assert rel(res.values[:, :, 0], m.get_booster().predict(dm, pred_contribs=True)[:, :-1]) < 1e-6


def test_hist_gradient_boosting_categorical_routes_like_sklearn_and_is_exact():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(400, 3))
    x[:, 2] = rng.integers(0, 6, size=400)
    y = x[:, 0] + np.isin(x[:, 2], [1, 3]) * 2.0
    m = E.HistGradientBoostingRegressor(max_iter=15, categorical_features=[2], random_state=0).fit(
        x, y
    )
    ens = read_model(m)
    assert (ens.cat_len > 0).any()
    xt = x[:40].copy()
    xt[:5, 2] = [
        np.nan,
        -1,
        17,
        2,
        2.5,
    ]  # missing, negative, unknown and fractional: missing_go_to_left
    res = tree_shap(ens, xt, feature_perturbation="interventional", background=x[-10:])
    assert rel(res.output[:, 0], m.predict(xt)) < 1e-12
    e = perspicio.explain(m.predict, xt[1:6], method="shapley_exact", background=x[-10:])
    assert rel(res.values[1:6, :, 0], e.attributions.numpy()) < 1e-9


# ---------------------------------------------------------------------------- files and the method


def test_model_files_read_without_unpickling(tmp_path):
    m, x = fit("xgb", "multi", True)
    ref = tree_shap(read_model(m), x[:20]).values
    for suffix in (".json", ".ubj"):
        path = tmp_path / f"model{suffix}"
        m.save_model(path)
        assert rel(tree_shap(read_model(path), x[:20]).values, ref) < 1e-12
    ml, xl = fit("lgb", "bin", True)
    path = tmp_path / "model.txt"
    ml.booster_.save_model(str(path))
    assert (
        rel(tree_shap(read_model(str(path)), xl).values, tree_shap(read_model(ml), xl).values)
        < 1e-12
    )
    (tmp_path / "model.pkl").write_bytes(b"not read")
    with pytest.raises(ModelError, match="Pickled models are never read"):
        read_model(tmp_path / "model.pkl")


def test_registered_method_targets_names_and_interactions():
    pd = pytest.importorskip("pandas")
    m, x = fit("xgb", "multi", False)
    df = pd.DataFrame(x[:5], columns=[f"f{i}" for i in range(F)])
    e = perspicio.explain(m, df, method="tree_shap")
    margin = library_margin(m, x[:5])
    assert e.targets.tolist() == margin.argmax(1).tolist()  # None: the predicted class
    assert e.extras["feature_names"][0] == tuple(df.columns)
    assert e.provenance["efficiency_error"] < 1e-12
    torch.testing.assert_close(e.base_value + e.attributions.sum(1), e.scores, rtol=0, atol=1e-12)
    e2 = perspicio.explain(m.predict_proba, x[:5], method="tree_shap", target=2, interactions=True)
    assert e2.targets.tolist() == [2] * 5
    torch.testing.assert_close(
        e2.extras["interactions"].sum(2), e2.attributions, rtol=0, atol=1e-12
    )
    assert e2.extras["all_values"].shape == (5, F, 3)
    # a perspicio BlackBox around predict_proba, and the tabular demo, are read through to the estimator
    from perspicio.core.blackbox import BlackBox

    e3 = perspicio.explain(BlackBox(m.predict_proba), x[:5], method="tree_shap", target=2)
    torch.testing.assert_close(e3.attributions, e2.attributions)
    with pytest.raises(TargetError, match="not a callable"):
        perspicio.explain(m, x[:2], method="tree_shap", target=lambda out: out.sum(1))


def test_tabular_demo_gbm_is_read_through():
    from perspicio.zoo.tabular import load_tabular

    demo = load_tabular("breast_cancer", "gbm")
    e = perspicio.explain(
        demo, demo.X_test[:4], method="tree_shap", feature_names=list(demo.feature_names)
    )
    assert e.attributions.shape == (4, 30)
    raw = demo.estimator.decision_function(demo.X_test[:4])
    torch.testing.assert_close(e.scores, torch.from_numpy(raw), rtol=0, atol=1e-9)


def test_isolation_forest_equals_shap():
    x, *_ = data(False)
    m = E.IsolationForest(n_estimators=20, max_features=0.8, random_state=0).fit(x)
    res = tree_shap(read_model(m), x[:50])
    assert rel(res.values[:, :, 0], shap.TreeExplainer(m).shap_values(x[:50])) < 1e-6
    assert rel(res.output, library_margin(m, x[:50])) < 1e-9


# ---------------------------------------------------------------------------- bad input


def test_unreadable_model_names_the_supported_ones():
    from sklearn.svm import SVR

    x, yr, *_ = data(False)
    with pytest.raises(
        ModelError, match="cannot read a sklearn.svm.*XGBClassifier.*LGBMRegressor.*RandomForest"
    ):
        perspicio.explain(SVR().fit(x, yr), x[:2], method="tree_shap")
    with pytest.raises(ModelError, match="supported tree models"):
        perspicio.explain(torch.nn.Linear(F, 1), x[:2], method="tree_shap")


def test_feature_count_mismatch_and_nan_the_model_cannot_route():
    m, x = fit("gb", "reg", False)
    with pytest.raises(InputError, match="5 columns.*trained on 6 features"):
        perspicio.explain(m, x[:2, :5], method="tree_shap")
    bad = x[:3].copy()
    bad[0, 1] = np.nan
    with pytest.raises(InputError, match="cannot route missing values"):
        perspicio.explain(m, bad, method="tree_shap")
    with pytest.raises(InputError, match="background rows.*cannot route missing values"):
        perspicio.explain(
            m, x[:2], method="tree_shap", feature_perturbation="interventional", background=bad
        )
    with pytest.raises(InputError, match="background rows have 5 columns"):
        perspicio.explain(
            m,
            x[:2],
            method="tree_shap",
            feature_perturbation="interventional",
            background=x[:3, :5],
        )


def test_option_errors():
    m, x = fit("xgb", "bin", False)
    with pytest.raises(OptionError, match="needs background"):
        perspicio.explain(m, x[:2], method="tree_shap", feature_perturbation="interventional")
    with pytest.raises(OptionError, match="probability.*interventional"):
        perspicio.explain(m, x[:2], method="tree_shap", model_output="probability")
    with pytest.raises(OptionError, match="feature_perturbation must be one of"):
        perspicio.explain(m, x[:2], method="tree_shap", feature_perturbation="independent")
    mr, xr = fit("xgb", "reg", False)
    with pytest.raises(OptionError, match="no known link"):
        perspicio.explain(
            mr,
            xr[:2],
            method="tree_shap",
            feature_perturbation="interventional",
            background=xr[:5],
            model_output="probability",
        )


@pytest.mark.parametrize("task", ["bin", "multi"])
def test_xgboost_early_stopping_uses_the_best_iteration_like_predict(task):
    """A wrapper fitted with early stopping predicts with the rounds up to best_iteration
    (iteration_range): so do the values; a Booster (or a model file) predicts with every tree."""
    x, _, yb, y3 = data(True, seed=1)
    y = yb if task == "bin" else y3
    m = xgb.XGBClassifier(
        n_estimators=200,
        max_depth=3,
        learning_rate=0.5,
        early_stopping_rounds=3,
        n_jobs=1,
        num_parallel_tree=2,
    ).fit(x[:200], y[:200], eval_set=[(x[200:], y[200:])], verbose=False)
    b = m.get_booster()
    best = m.best_iteration
    assert 0 < best + 1 < b.num_boosted_rounds()  # early stopping did cut rounds
    res = tree_shap(read_model(m), x)
    dm = xgb.DMatrix(x)
    assert rel(res.output, m.predict(x, output_margin=True).reshape(len(x), -1)) < 2e-6
    contrib = b.predict(dm, pred_contribs=True, iteration_range=(0, best + 1))
    contrib = contrib[:, None] if contrib.ndim == 2 else contrib  # (N, K, F + 1)
    assert rel(res.values, np.moveaxis(contrib[:, :, :-1], 1, 2)) < 1e-6
    full = tree_shap(read_model(b), x)  # the Booster: every tree, as Booster.predict
    all_trees = b.predict(dm, pred_contribs=True)
    all_trees = all_trees[:, None] if all_trees.ndim == 2 else all_trees
    assert rel(full.values, np.moveaxis(all_trees[:, :, :-1], 1, 2)) < 1e-6
    e = perspicio.explain(m, x[:5], method="tree_shap")
    assert e.provenance["efficiency_error"] < 1e-9


def test_xgboost_vector_leaf_trees_are_one_tree_per_output():
    """multi_strategy='multi_output_tree': each tree holds a vector per leaf; XGBoost has no
    pred_contribs for them (nor shap): checked against the margins and enumeration of both games."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(300, 4))
    x[rng.random(x.shape) < 0.1] = np.nan
    z = np.nan_to_num(x)
    y = np.stack([z[:, 0] * z[:, 2], z[:, 1] - z[:, 3], z[:, 0]], 1)
    m = xgb.XGBRegressor(
        n_estimators=8,
        max_depth=3,
        tree_method="hist",
        multi_strategy="multi_output_tree",
        n_jobs=1,
    ).fit(x, y)
    ens = read_model(m)
    assert ens.n_outputs == 3
    res = tree_shap(ens, x[:6], interactions=True)
    assert rel(res.output, m.predict(x[:6], output_margin=True)) < 2e-6
    assert np.abs(res.values.sum(1) + res.base - res.output).max() < 1e-9
    ref = np.stack([_path_dependent_enumeration(ens, row) for row in x[:3]])
    assert rel(res.values[:3], ref) < 1e-9
    assert np.abs(res.interactions.sum(2) - res.values).max() < 1e-12
    bg = np.nan_to_num(x[-10:])
    iv = tree_shap(ens, x[:2], feature_perturbation="interventional", background=bg)
    for r in range(2):
        vals = {}
        for mask in range(16):
            keep = ((mask >> np.arange(4)) & 1).astype(bool)
            vals[mask] = m.predict(
                np.where(keep[None, :], x[r][None, :], bg), output_margin=True
            ).mean(0)
        for k in range(3):
            ref_k = _interaction_index({s: float(v[k]) for s, v in vals.items()}, 4).sum(1)
            assert rel(iv.values[r, :, k], ref_k) < 2e-6
