"""Differential sweep of tree_shap / linear_shap against the references on configurations the other
tree tests do not cover: rankers, pandas category columns (XGBoost's stored training categories,
LightGBM's ``pandas_categorical``), reordered DataFrame columns, nullable and non-numeric columns,
Inf where the library routes it, LightGBM linear trees and random-forest mode, the exponential loss
of GradientBoostingClassifier, unfitted wrappers, XGBoost ``gblinear`` in linear_shap, and cases
where shap itself is wrong (checked against enumeration of the game instead)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

import perspicio
from perspicio.errors import InputError, ModelError, OptionError
from perspicio.trees import read_model, tree_shap

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")
pd = pytest.importorskip("pandas")
pytest.importorskip("numba")
E = pytest.importorskip("sklearn.ensemble")


def close(ours, ref, rel: float = 1e-5, atol: float = 1e-6) -> None:
    ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape
    scale = max(1.0, float(np.abs(ref).max()))
    assert float(np.abs(ours - ref).max()) <= max(atol, rel * scale)


def _data(n: int = 300, f: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, f))
    y = x[:, 0] + x[:, 1] * x[:, 2] + np.sin(x[:, 3]) + 0.1 * rng.normal(size=n)
    return x, y


def _cat_frame(n: int = 400, seed: int = 1):
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "a": rng.normal(size=n),
            "c": pd.Categorical(rng.choice(["x", "y", "z", "w", "v"], n)),
            "d": pd.Categorical(rng.choice([10, 20, 30, 40], n)),
            "b": rng.normal(size=n),
        }
    )
    y = df.a + (df.c.cat.codes % 2) * 2 + (df.d.cat.codes == 2) * 1.5 + 0.1 * rng.normal(size=n)
    return df, np.asarray(y)


# ---------------------------------------------------------------------------- rankers


def test_xgboost_ranker_equals_pred_contribs():
    x, y = _data()
    m = xgb.XGBRanker(n_estimators=15, max_depth=3, n_jobs=1).fit(
        x, (y > np.median(y)).astype(int) + (y > 1), qid=np.repeat(np.arange(30), 10)
    )
    res = tree_shap(read_model(m), x[:40])
    c = m.get_booster().predict(xgb.DMatrix(x[:40]), pred_contribs=True)
    close(res.values[:, :, 0], c[:, :-1])
    close(np.broadcast_to(res.base, (40,)), c[:, -1])


def test_lightgbm_ranker_equals_pred_contrib():
    x, y = _data()
    m = lgb.LGBMRanker(n_estimators=15, min_child_samples=5, verbose=-1, n_jobs=1).fit(
        x, (y > np.median(y)).astype(int) + (y > 1), group=[10] * 30
    )
    e = perspicio.explain(m, x[:40], method="tree_shap")
    c = m.booster_.predict(x[:40], pred_contrib=True)
    close(e.attributions.numpy(), c[:, :-1], rel=1e-9)
    close(e.base_value.numpy(), c[:, -1], rel=1e-9)


# ---------------------------------------------------------------------------- pandas categories


def test_xgboost_pandas_categories_are_coded_by_the_training_categories():
    """A 'category' column is read as codes - of the categories the model was trained on (XGBoost
    re-codes a frame whose categories are listed in another order; so does perspicio)."""
    df, y = _cat_frame()
    m = xgb.XGBRegressor(
        enable_categorical=True, max_cat_to_onehot=1, n_estimators=15, max_depth=4, n_jobs=1
    ).fit(df, y)
    b = m.get_booster()
    ref = b.predict(xgb.DMatrix(df[:60], enable_categorical=True), pred_contribs=True)
    e = perspicio.explain(m, df[:60], method="tree_shap")
    close(e.attributions.numpy(), ref[:, :-1])
    assert e.extras["feature_names"][0] == ("a", "c", "d", "b")
    shuffled = df[:60].copy()
    shuffled["c"] = shuffled["c"].cat.set_categories(["z", "y", "x", "w", "v"])
    shuffled["d"] = shuffled["d"].cat.set_categories([40, 30, 20, 10])
    close(tree_shap(read_model(m), shuffled).values[:, :, 0], ref[:, :-1])
    unseen = df[:3].copy()
    unseen["c"] = pd.Categorical(["x", "q", None])
    with pytest.raises(InputError, match="'c'.*'q'.*not among the model's training categories"):
        perspicio.explain(m, unseen, method="tree_shap")


def test_lightgbm_pandas_categories_follow_pandas_categorical():
    df, y = _cat_frame()
    m = lgb.LGBMRegressor(
        n_estimators=15, min_data_per_group=5, cat_smooth=1, verbose=-1, n_jobs=1
    ).fit(df, y)
    rows = df[:60].copy()
    rows["c"] = rows["c"].cat.set_categories(["z", "y", "x", "w", "v", "new"])
    rows.loc[rows.index[:5], "c"] = "new"  # unknown to the model: missing, as LightGBM reads it
    rows.loc[rows.index[5:8], "d"] = np.nan
    ref = m.booster_.predict(rows, pred_contrib=True)
    e = perspicio.explain(m, rows, method="tree_shap")
    close(e.attributions.numpy(), ref[:, :-1], rel=1e-9)
    close(e.scores.numpy(), m.predict(rows, raw_score=True), rel=1e-9)


def test_dataframe_columns_reordered_nullable_and_non_numeric():
    x, y = _data()
    cols = [f"f{i}" for i in range(5)]
    m = xgb.XGBRegressor(n_estimators=10, max_depth=3, n_jobs=1).fit(
        pd.DataFrame(x, columns=cols), y
    )
    with pytest.raises(InputError, match="features in another order.*df\\[model_feature_names\\]"):
        perspicio.explain(m, pd.DataFrame(x[:4], columns=cols)[cols[::-1]], method="tree_shap")
    nullable = pd.DataFrame(x[:4], columns=cols).astype("Float64")
    nullable.iloc[0, 1] = pd.NA
    holes = x[:4].copy()
    holes[0, 1] = np.nan
    ref = m.get_booster().predict(xgb.DMatrix(holes, feature_names=cols), pred_contribs=True)
    close(tree_shap(read_model(m), nullable).values[:, :, 0], ref[:, :-1])
    close(perspicio.explain(m, nullable, method="tree_shap").attributions.numpy(), ref[:, :-1])
    text = pd.DataFrame(x[:2], columns=cols).astype(object)
    text.iloc[0, 2] = "abc"
    with pytest.raises(InputError, match="column 'f2'.*not numeric"):
        perspicio.explain(m, text, method="tree_shap")


# ---------------------------------------------------------------------------- Inf


def test_inf_is_routed_where_the_library_routes_it():
    x, y = _data()
    rows = x[:6].copy()
    rows[0, 2], rows[1, 3], rows[2], rows[3] = np.inf, -np.inf, np.inf, -np.inf
    m = lgb.LGBMRegressor(n_estimators=15, verbose=-1, n_jobs=1).fit(x, y)
    close(
        tree_shap(read_model(m), rows).values[:, :, 0],
        m.booster_.predict(rows, pred_contrib=True)[:, :-1],
        rel=1e-9,
    )
    h = E.HistGradientBoostingRegressor(max_iter=10, random_state=0).fit(x, y)
    close(tree_shap(read_model(h), rows).output[:, 0], h._raw_predict(rows)[:, 0], rel=1e-12)
    # XGBoost's DMatrix (hence pred_contribs) and scikit-learn's trees refuse Inf: so do we
    for model in (
        xgb.XGBRegressor(n_estimators=3, n_jobs=1).fit(x, y),
        E.RandomForestRegressor(n_estimators=3, random_state=0).fit(x, y),
    ):
        with pytest.raises(InputError, match="Inf value"):
            perspicio.explain(model, rows, method="tree_shap")


# ---------------------------------------------------------------------------- model kinds


def test_lightgbm_linear_trees_are_refused():
    x, y = _data()
    m = lgb.LGBMRegressor(linear_tree=True, n_estimators=5, verbose=-1, n_jobs=1).fit(x, y)
    with pytest.raises(ModelError, match="linear trees.*kernel_shap"):
        perspicio.explain(m, x[:3], method="tree_shap")


def test_lightgbm_random_forest_mode_explains_the_average():
    """In rf mode LightGBM's raw_score and pred_contrib are sums over the trees, n_iter times the
    average that predict() returns (and that the link is applied to): we explain the average."""
    x, y = _data()
    m = lgb.LGBMRegressor(
        boosting_type="rf", bagging_freq=1, bagging_fraction=0.7, n_estimators=12, verbose=-1
    ).fit(x, y)
    res = tree_shap(read_model(m), x[:30])
    close(res.output[:, 0], m.predict(x[:30]), rel=1e-9)
    close(res.values[:, :, 0] * 12, m.booster_.predict(x[:30], pred_contrib=True)[:, :-1], rel=1e-9)


def test_gradient_boosting_exponential_loss_has_no_logistic_link():
    x, y = _data()
    m = E.GradientBoostingClassifier(loss="exponential", n_estimators=10, random_state=0).fit(
        x, y > 0
    )
    res = tree_shap(read_model(m), x[:20])
    close(res.output[:, 0], m.decision_function(x[:20]), rel=1e-12)
    with pytest.raises(OptionError, match="exponential loss.*no known link"):
        perspicio.explain(
            m,
            x[:3],
            method="tree_shap",
            feature_perturbation="interventional",
            background=x[:20],
            model_output="probability",
        )


def test_unfitted_wrappers_are_a_model_error():
    for model in (xgb.XGBRegressor(), xgb.XGBRanker(), lgb.LGBMClassifier()):
        with pytest.raises(ModelError, match="not fitted"):
            read_model(model)


def test_xgboost_gblinear_in_linear_shap_includes_the_base_score():
    """intercept_ leaves out base_score; the margin (and pred_contribs, whose values are w x: the
    interventional game with a zero background) must include it."""
    x, y = _data()
    for model, target in (
        (xgb.XGBRegressor(booster="gblinear", n_estimators=10), y * 10 + 50),
        (xgb.XGBClassifier(booster="gblinear", n_estimators=10), (y > 0).astype(int)),
        (xgb.XGBClassifier(booster="gblinear", n_estimators=10), np.digitize(y, [-0.5, 0.5])),
    ):
        model.fit(x, target)
        dm = xgb.DMatrix(x[:20])
        margin = model.get_booster().predict(dm, output_margin=True).reshape(20, -1)
        contrib = model.get_booster().predict(dm, pred_contribs=True).reshape(20, -1, 6)
        e = perspicio.explain(model, x[:20], method="linear_shap", background=np.zeros((1, 5)))
        close(e.extras["all_values"].numpy(), np.moveaxis(contrib[:, :, :-1], 1, 2))
        close(e.extras["all_base_values"].numpy(), contrib[0, :, -1])
        close(e.scores.numpy(), margin[np.arange(20), e.targets.numpy()])
        with pytest.raises(ModelError, match="gblinear.*linear_shap"):
            perspicio.explain(model, x[:3], method="tree_shap")


# ---------------------------------------------------------------------------- where shap is wrong


def _path_dependent_interactions(ens, row):
    """Interaction values by enumerating the path-dependent game (routing by the ensemble's kernel,
    which matches the library's margins bit for bit)."""
    from perspicio.trees._kernels import _route, node_table

    ni, f = node_table(ens), ens.n_features

    def expect(n, s):
        if ens.left[n] < 0:
            return float(ens.value[n, 0])
        if s >> ens.feature[n] & 1:
            return expect(_route(row, n, ni, ens.threshold, ens.cat_bits), s)
        cl, cr = ens.left[n], ens.right[n]
        return (ens.cover[cl] * expect(cl, s) + ens.cover[cr] * expect(cr, s)) / ens.cover[n]

    v = {s: sum(expect(ens.tree_start[t], s) for t in range(ens.n_trees)) for s in range(1 << f)}
    out = np.zeros((f, f))
    for i, j in itertools.combinations(range(f), 2):
        for s in range(1 << f):
            if s >> i & 1 or s >> j & 1:
                continue
            k = bin(s).count("1")
            w = math.factorial(k) * math.factorial(f - k - 2) / (2 * math.factorial(f - 1))
            out[i, j] += w * (v[s | 1 << i | 1 << j] - v[s | 1 << i] - v[s | 1 << j] + v[s])
        out[j, i] = out[i, j]
    return out


def test_lightgbm_zero_missing_and_categorical_interactions_equal_enumeration():
    """shap 0.51 computes LightGBM interaction values itself and routes missing-type Zero and
    categorical splits differently from LightGBM; ours equal the enumerated game (and sum to
    LightGBM's own pred_contrib)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 4))
    x[rng.random(x.shape) < 0.3] = 0.0
    x[:, 1] = rng.integers(0, 40, 500)
    y = x[:, 0] + np.isin(x[:, 1], [1, 5, 7, 20, 33]) * 2 * x[:, 2] + (x[:, 3] == 0)
    m = lgb.LGBMRegressor(
        n_estimators=10,
        num_leaves=8,
        zero_as_missing=True,
        min_data_per_group=5,
        cat_smooth=1,
        verbose=-1,
        n_jobs=1,
    ).fit(x, y, categorical_feature=[1])
    rows = x[:4].copy()
    rows[0, 1], rows[1, 1], rows[2, 0] = 2.7, np.nan, np.nan
    ens = read_model(m)
    res = tree_shap(ens, rows, interactions=True)
    close(
        res.interactions.sum(2)[:, :, 0], m.booster_.predict(rows, pred_contrib=True)[:, :-1], 1e-9
    )
    for r in range(len(rows)):
        inter = res.interactions[r, :, :, 0]
        off = inter - np.diag(np.diag(inter))
        close(off, _path_dependent_interactions(ens, rows[r]), rel=1e-9)


def test_isolation_forest_with_bootstrap_is_additive():
    """shap's expected_value for a bootstrapped IsolationForest does not add up to the output; ours
    does, and the values still equal shap's."""
    shap = pytest.importorskip("shap")
    x, _ = _data()
    m = E.IsolationForest(n_estimators=10, bootstrap=True, random_state=0).fit(x)
    res = tree_shap(read_model(m), x[:30])
    c = E._iforest._average_path_length([m.max_samples_])[0]
    path = -np.log2(-m.score_samples(x[:30])) * c
    close(res.values.sum(1)[:, 0] + res.base[0], path, rel=1e-12)
    close(res.values[:, :, 0], shap.TreeExplainer(m).shap_values(x[:30]), rel=1e-9)


def test_interventional_multi_output_forest_equals_enumeration():
    """shap 0.51's interventional values of multi-output scikit-learn forests differ from the game;
    ours equal it, enumerated with the forest's own predict."""
    x, y = _data()
    m = E.RandomForestRegressor(n_estimators=5, max_depth=5, random_state=0).fit(
        x, np.c_[y, -2 * y + x[:, 4]]
    )
    bg = x[100:130]
    res = tree_shap(read_model(m), x[:2], feature_perturbation="interventional", background=bg)
    f = x.shape[1]
    for r in range(2):
        v = {}
        for s in range(1 << f):
            keep = ((s >> np.arange(f)) & 1).astype(bool)
            v[s] = m.predict(np.where(keep[None], x[r][None], bg)).mean(0)
        phi = np.zeros((f, 2))
        for i in range(f):
            for s in range(1 << f):
                if not s >> i & 1:
                    k = bin(s).count("1")
                    w = math.factorial(k) * math.factorial(f - k - 1) / math.factorial(f)
                    phi[i] += w * (v[s | 1 << i] - v[s])
        close(res.values[r], phi, rel=1e-12)
