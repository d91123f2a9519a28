"""ONNX models: tree ensembles read as data (`perspicio.trees.onnx_reader`) and explained exactly by
tree_shap; other ONNX models run with onnxruntime as black boxes.

Three ways: hand-built graphs (onnx.helper) with hand-computed values and every node mode checked
against onnxruntime on boundary values and NaN; models converted by skl2onnx / onnxmltools whose
values equal tree_shap (and shap's TreeExplainer) on the original model and add up to
onnxruntime's own output; bad files and unsupported graphs give one-line errors; the command line
end to end."""

from __future__ import annotations

import importlib
import json
import os
import warnings

import numpy as np
import pytest

from perspicio.errors import ModelError, OptionError


def _need(name: str):
    # CI installs '.[test]' (which has the onnx extra and the converters): there they must not skip
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(name)


onnx = _need("onnx")
ort = _need("onnxruntime")
_need("numba")
_need("sklearn")
from onnx import TensorProto as TP  # noqa: E402
from onnx import helper as oh  # noqa: E402

from perspicio.trees.onnx_reader import has_covers, read_onnx, with_covers  # noqa: E402
from perspicio.trees.readers import read_model  # noqa: E402
from perspicio.trees.treeshap import tree_shap  # noqa: E402

IV = "interventional"


def _session(model):
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


def _graph(op, attrs, *, n_features=2, dtype=TP.FLOAT, ml_opset=3, outputs=None):
    """X (N, n_features) -> one ai.onnx.ml tree op; a classifier also outputs its labels."""
    classifier = op == "TreeEnsembleClassifier"
    outs = ["label", "scores"] if classifier else ["scores"]
    node = oh.make_node(op, ["X"], outs, domain="ai.onnx.ml", **attrs)
    out_dtype = dtype if op == "TreeEnsemble" else TP.FLOAT  # the opset-1 ops output float
    vi = [oh.make_tensor_value_info("scores", out_dtype, [None, None])]
    if classifier:
        vi.insert(0, oh.make_tensor_value_info("label", TP.INT64, [None]))
    g = oh.make_graph(
        [node], "g", [oh.make_tensor_value_info("X", dtype, [None, n_features])], outputs or vi
    )
    return oh.make_model(
        g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("ai.onnx.ml", ml_opset)]
    )


def _ort_scores(model, x):
    s = _session(model)
    out = s.run(None, {s.get_inputs()[0].name: x})
    return np.asarray(out[-1], dtype=np.float64).reshape(len(x), -1)


# a depth-2 tree: x0 <= 0.5 (NaN -> true) ? (x1 < 2 ? 1 : 3) : 10, base 0.5, covers 10 -> 6 (4, 2), 4
DEPTH2 = dict(
    nodes_treeids=[0] * 5,
    nodes_nodeids=[0, 1, 2, 3, 4],
    nodes_featureids=[0, 1, 0, 0, 0],
    nodes_modes=["BRANCH_LEQ", "BRANCH_LT", "LEAF", "LEAF", "LEAF"],
    nodes_values=[0.5, 2.0, 0, 0, 0],
    nodes_truenodeids=[1, 2, 0, 0, 0],
    nodes_falsenodeids=[4, 3, 0, 0, 0],
    nodes_missing_value_tracks_true=[1, 0, 0, 0, 0],
    target_treeids=[0, 0, 0],
    target_nodeids=[2, 3, 4],
    target_ids=[0, 0, 0],
    target_weights=[1.0, 3.0, 10.0],
    base_values=[0.5],
    n_targets=1,
)


def test_hand_built_depth2_tree_exact_values_with_a_missing_value():
    model = _graph("TreeEnsembleRegressor", DEPTH2)
    ens = read_onnx(model)
    x = np.array([[np.nan, 1.0], [0.0, 1.0], [1.0, 5.0]], dtype=np.float32)
    np.testing.assert_array_equal(ens.predict(x)[:, 0], [1.5, 1.5, 10.5])
    np.testing.assert_array_equal(ens.predict(x), _ort_scores(model, x))
    # interventional, one background row b = (1, 5): f(b) = 10.5, f(x0, b1) = 3.5 (NaN goes
    # left), f(b0, x1) = 10.5, f(x) = 1.5 -> phi0 = ((3.5-10.5) + (1.5-10.5))/2 = -8,
    # phi1 = ((10.5-10.5) + (1.5-3.5))/2 = -1
    r = tree_shap(ens, x[:1], feature_perturbation=IV, background=np.array([[1.0, 5.0]]))
    np.testing.assert_allclose(r.values[0, :, 0], [-8.0, -1.0], rtol=0, atol=1e-12)
    assert r.base[0] == pytest.approx(10.5)
    # the converters' hit rates (all 1) are no covers: path-dependent is refused in one line
    assert not has_covers(ens)
    with pytest.raises(OptionError, match="no node covers") as exc:
        tree_shap(ens, x)
    assert "\n" not in str(exc.value) and "interventional" in str(exc.value)


def test_consistent_hit_rates_are_covers_path_dependent_by_hand():
    model = _graph(
        "TreeEnsembleRegressor", {**DEPTH2, "nodes_hitrates": [10.0, 6.0, 4.0, 2.0, 4.0]}
    )
    ens = read_onnx(model)
    assert has_covers(ens)
    r = tree_shap(ens, np.array([[0.0, 1.0]]))
    # v({}) = (4*1 + 2*3 + 4*10)/10 + .5 = 5.5, v({0}) = 10/6 + .5, v({1}) = .6*1 + .4*10 + .5 = 5.1,
    # v({0,1}) = 1.5
    v0, v1, v01, ve = 10 / 6 + 0.5, 5.1, 1.5, 5.5
    want = [((v0 - ve) + (v01 - v1)) / 2, ((v1 - ve) + (v01 - v0)) / 2]
    np.testing.assert_allclose(r.values[0, :, 0], want, rtol=1e-12)
    assert r.base[0] == pytest.approx(5.5)


def _one_split(mode, mtt, *, v5=False, members=None):
    """A single split on x0 at 0.5: true -> 1, false -> 2 (opset-1 or opset-5 encoding)."""
    if not v5:
        return _graph(
            "TreeEnsembleRegressor",
            dict(
                nodes_treeids=[0, 0, 0],
                nodes_nodeids=[0, 1, 2],
                nodes_featureids=[0, 0, 0],
                nodes_modes=[mode, "LEAF", "LEAF"],
                nodes_values=[0.5, 0, 0],
                nodes_truenodeids=[1, 0, 0],
                nodes_falsenodeids=[2, 0, 0],
                nodes_missing_value_tracks_true=[mtt, 0, 0],
                target_treeids=[0, 0],
                target_nodeids=[1, 2],
                target_ids=[0, 0],
                target_weights=[1.0, 2.0],
                n_targets=1,
            ),
            n_features=1,
        )
    modes = ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ"]
    code = modes.index(mode) if mode in modes else 6
    attrs = dict(
        tree_roots=[0],
        nodes_featureids=[0],
        nodes_modes=onnx.numpy_helper.from_array(np.array([code], np.uint8)),
        nodes_splits=onnx.numpy_helper.from_array(np.array([0.5], np.float32)),
        nodes_truenodeids=[0],
        nodes_trueleafs=[1],
        nodes_falsenodeids=[1],
        nodes_falseleafs=[1],
        nodes_missing_value_tracks_true=[mtt],
        leaf_targetids=[0, 0],
        leaf_weights=onnx.numpy_helper.from_array(np.array([1.0, 2.0], np.float32)),
        n_targets=1,
    )
    if members is not None:
        attrs["membership_values"] = onnx.numpy_helper.from_array(np.array(members, np.float32))
    return _graph("TreeEnsemble", attrs, n_features=1, ml_opset=5)


BOUNDARY = np.array(
    [[-1.0], [0.5], [np.nextafter(np.float32(0.5), np.float32(1))], [1.0], [3.0], [np.nan]],
    dtype=np.float32,
)


@pytest.mark.parametrize("mtt", [0, 1])
@pytest.mark.parametrize(
    "mode", ["BRANCH_LEQ", "BRANCH_LT", "BRANCH_GTE", "BRANCH_GT", "BRANCH_EQ", "BRANCH_NEQ"]
)
def test_every_node_mode_routes_as_onnxruntime(mode, mtt):
    for v5 in (False, True):
        model = _one_split(mode, mtt, v5=v5)
        ens = read_onnx(model)
        np.testing.assert_array_equal(ens.predict(BOUNDARY), _ort_scores(model, BOUNDARY))
        # the explained game is the same function: values add up to onnxruntime's output
        r = tree_shap(ens, BOUNDARY, feature_perturbation=IV, background=BOUNDARY)
        np.testing.assert_allclose(
            r.base + r.values.sum(1), _ort_scores(model, BOUNDARY), rtol=0, atol=1e-12
        )


@pytest.mark.parametrize("mtt", [0, 1])
def test_branch_member_as_onnxruntime(mtt):
    # two MEMBER nodes would share membership_values, separated by NaN; one set here: {0.5, 3}
    model = _one_split("BRANCH_MEMBER", mtt, v5=True, members=[3.0, 0.5])
    ens = read_onnx(model)
    np.testing.assert_array_equal(ens.predict(BOUNDARY)[:, 0], [2, 1, 2, 2, 1, 1 if mtt else 2])
    np.testing.assert_array_equal(ens.predict(BOUNDARY), _ort_scores(model, BOUNDARY))


def test_two_member_sets_in_order():
    """Two MEMBER nodes read their sets from membership_values in order (NaN-separated)."""
    attrs = dict(
        tree_roots=[0],
        nodes_featureids=[0, 1],
        nodes_modes=onnx.numpy_helper.from_array(np.array([6, 6], np.uint8)),
        nodes_splits=onnx.numpy_helper.from_array(np.zeros(2, np.float32)),
        nodes_truenodeids=[1, 0],
        nodes_trueleafs=[0, 1],
        nodes_falsenodeids=[2, 1],
        nodes_falseleafs=[1, 1],
        nodes_missing_value_tracks_true=[0, 1],
        leaf_targetids=[0, 0, 0],
        leaf_weights=onnx.numpy_helper.from_array(np.array([1.0, 2.0, 5.0], np.float32)),
        membership_values=onnx.numpy_helper.from_array(
            np.array([1.0, 2.0, np.nan, 7.0], np.float32)
        ),
        n_targets=1,
    )
    model = _graph("TreeEnsemble", attrs, n_features=2, ml_opset=5)
    ens = read_onnx(model)
    grid = np.array(
        [[a, b] for a in (0.0, 1.0, 2.0, 1.5, np.nan) for b in (7.0, 6.0, np.nan)], np.float32
    )
    want = [(1 if b in (7.0,) or np.isnan(b) else 2) if a in (1.0, 2.0) else 5 for a, b in grid]
    np.testing.assert_array_equal(ens.predict(grid)[:, 0], want)
    np.testing.assert_array_equal(ens.predict(grid), _ort_scores(model, grid))


def test_average_two_targets_base_values_and_double_input():
    attrs = dict(
        nodes_treeids=[0, 0, 0, 1, 1, 1],
        nodes_nodeids=[0, 1, 2, 0, 1, 2],
        nodes_featureids=[0, 0, 0, 1, 0, 0],
        nodes_modes=["BRANCH_GT", "LEAF", "LEAF", "BRANCH_LEQ", "LEAF", "LEAF"],
        nodes_values=[0.0, 0, 0, 1.0, 0, 0],
        nodes_truenodeids=[1, 0, 0, 1, 0, 0],
        nodes_falsenodeids=[2, 0, 0, 2, 0, 0],
        nodes_missing_value_tracks_true=[0, 0, 0, 1, 0, 0],
        target_treeids=[0, 0, 0, 0, 1, 1],
        target_nodeids=[1, 1, 2, 2, 1, 2],
        target_ids=[0, 1, 0, 1, 1, 0],
        target_weights=[4.0, 0.5, -2.0, 6.0, 8.0, 1.0],
        base_values=[0.25, -1.0],
        n_targets=2,
        aggregate_function="AVERAGE",
    )
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 2))
    x[::4, 1] = np.nan
    x[1] = [0.0, 1.0]  # both thresholds exactly
    for dtype, np_dtype in ((TP.FLOAT, np.float32), (TP.DOUBLE, np.float64)):
        model = _graph("TreeEnsembleRegressor", attrs, dtype=dtype)
        ens = read_onnx(model)
        assert ens.input_dtype == ("float32" if dtype == TP.FLOAT else "float64")
        xs = x.astype(np_dtype)
        np.testing.assert_allclose(ens.predict(xs), _ort_scores(model, xs), rtol=1e-6)
        # by hand: tree 0 adds (4, 0.5) or (-2, 6), tree 1 (0, 8) or (1, 0), averaged; base (0.25, -1)
        assert ens.predict(np.array([[1.0, 0.0]]))[0].tolist() == [0.25 + 2, -1 + 4.25]
        r = tree_shap(ens, xs, feature_perturbation=IV, background=xs[:10])
        np.testing.assert_allclose(r.base + r.values.sum(1), _ort_scores(model, xs), atol=1e-6)
    # onnxruntime writes 0 (not the base) where no reached leaf carries the output: refused
    attrs = {k: v for k, v in attrs.items()}
    for k in ("target_treeids", "target_nodeids", "target_ids", "target_weights"):
        attrs[k] = attrs[k][:1] + attrs[k][2:]  # tree 0's first leaf no longer scores output 1
    with pytest.raises(ModelError, match="writes 0 instead of the base"):
        read_onnx(_graph("TreeEnsembleRegressor", attrs))


def test_cover_rows_give_sklearns_path_dependent_values(tmp_path):
    from skl2onnx import to_onnx
    from sklearn.tree import DecisionTreeRegressor

    x, y = _regression()
    tree = DecisionTreeRegressor(max_depth=4, random_state=0).fit(x, y)
    path = tmp_path / "tree.onnx"
    path.write_bytes(to_onnx(tree, x[:1], target_opset=_SKL_OPSET).SerializeToString())
    ens = read_onnx(path, cover_rows=x)  # the training rows: sklearn's covers are their counts
    np.testing.assert_array_equal(np.sort(ens.cover), np.sort(tree.tree_.weighted_n_node_samples))
    ours = tree_shap(ens, x[:15])
    theirs = tree_shap(read_model(tree), x[:15])
    # ONNX stores the leaf values in float32: equal to 1e-6 relative, not to float64 rounding
    scale = np.abs(theirs.values).max()
    np.testing.assert_allclose(ours.values, theirs.values, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(ours.base, theirs.base, rtol=1e-6)
    assert has_covers(with_covers(read_onnx(path), x[:5]))


# ----------------------------------------------------------------------------- converters

_SKL_OPSET = {"": 17, "ai.onnx.ml": 3}


def _regression():
    from sklearn.datasets import make_regression

    x, y = make_regression(160, 5, random_state=0)
    return x.astype(np.float32), y


def _classification(n_classes):
    from sklearn.datasets import make_classification

    x, y = make_classification(
        160, 5, n_informative=3, n_redundant=0, n_classes=n_classes, random_state=1
    )
    return x.astype(np.float32), y


def _sklearn_case(kind):
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.tree import DecisionTreeRegressor

    if kind == "dt_regressor":
        x, y = _regression()
        return DecisionTreeRegressor(max_depth=4, random_state=0).fit(x, y), x
    if kind.startswith("rf"):
        x, y = _classification(int(kind[-1]))
        return RandomForestClassifier(5, max_depth=4, random_state=0).fit(x, y), x
    x, y = _classification(int(kind[-1]))
    return GradientBoostingClassifier(n_estimators=6, max_depth=3, random_state=0).fit(x, y), x


def _ort_probabilities(path, x):
    s = _session(path.read_bytes())
    outs = s.run(None, {s.get_inputs()[0].name: x})
    p = outs[1]
    if isinstance(p, list):  # ZipMap: one {class: probability} dict per row
        p = [[d[k] for k in sorted(d)] for d in p]
    return np.asarray(p, dtype=np.float64).reshape(len(x), -1)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dt_regressor", "rf2", "rf3", "gb2", "gb3"])
def test_skl2onnx_models_equal_the_original_and_add_up_to_onnxruntime(kind, tmp_path):
    from skl2onnx import to_onnx

    est, x = _sklearn_case(kind)
    path = tmp_path / f"{kind}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path.write_bytes(to_onnx(est, x[:1], target_opset=_SKL_OPSET).SerializeToString())
    ens = read_model(str(path))
    orig = read_model(est)
    assert ens.n_outputs == orig.n_outputs and ens.transform == orig.transform
    rows, bg = x[:20], x[100:140]
    ours = tree_shap(ens, rows, feature_perturbation=IV, background=bg)
    theirs = tree_shap(orig, rows, feature_perturbation=IV, background=bg)
    scale = np.abs(theirs.values).max()
    np.testing.assert_allclose(ours.values, theirs.values, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(ours.base, theirs.base, rtol=1e-6, atol=1e-6 * scale)
    if kind == "dt_regressor":
        ort_out = _ort_scores(path.read_bytes(), rows)
        np.testing.assert_allclose(ours.base + ours.values.sum(1), ort_out, rtol=1e-6)
        return
    probs = _ort_probabilities(path, rows)
    if ens.transform == "identity":  # forests: the margin is onnxruntime's probabilities
        np.testing.assert_allclose(ours.base + ours.values.sum(1), probs, atol=1e-6)
    else:  # boosting: the probability game adds up to onnxruntime's probabilities
        p = tree_shap(ens, rows, feature_perturbation=IV, background=bg, model_output="probability")
        np.testing.assert_allclose(
            p.base + p.values.sum(1), probs[:, -p.values.shape[2] :], atol=1e-6
        )
        ours_p = tree_shap(
            orig, rows, feature_perturbation=IV, background=bg, model_output="probability"
        )
        np.testing.assert_allclose(p.values, ours_p.values, atol=1e-6)


@pytest.mark.parametrize("kind", ["rf3", "gb2"])
def test_onnx_values_equal_shaps_tree_explainer(kind, tmp_path):
    shap = _need("shap")
    from skl2onnx import to_onnx

    est, x = _sklearn_case(kind)
    path = tmp_path / "m.onnx"
    path.write_bytes(to_onnx(est, x[:1], target_opset=_SKL_OPSET).SerializeToString())
    rows, bg = x[:10], x[100:130]
    ours = tree_shap(read_model(path), rows, feature_perturbation=IV, background=bg)
    expl = shap.TreeExplainer(est, data=bg.astype(np.float64), feature_perturbation=IV)
    theirs = np.asarray(expl.shap_values(rows.astype(np.float64), check_additivity=False))
    theirs = theirs.reshape(len(rows), x.shape[1], -1)
    np.testing.assert_allclose(ours.values, theirs, rtol=1e-6, atol=1e-7)


def _boosting_case(kind):
    import lightgbm as lgb
    import xgboost as xgb

    if kind == "xgb_regressor":
        x, y = _regression()
        return xgb.XGBRegressor(n_estimators=8, max_depth=3, n_jobs=1).fit(x, y), x
    n = int(kind[-1])
    x, y = _classification(n)
    x[::7, 2] = np.nan  # trained with missing values: their default directions are in the file
    if kind.startswith("xgb"):
        return xgb.XGBClassifier(n_estimators=8, max_depth=3, n_jobs=1).fit(x, y), x
    return lgb.LGBMClassifier(n_estimators=8, num_leaves=6, verbose=-1, n_jobs=1).fit(x, y), x


@pytest.mark.parametrize("kind", ["xgb2", "xgb3", "xgb_regressor", "lgb2", "lgb3"])
def test_onnxmltools_models_equal_the_original(kind, tmp_path):
    _need("xgboost")
    _need("lightgbm")
    _need("onnxmltools")
    from onnxmltools.convert import convert_lightgbm, convert_xgboost
    from onnxmltools.convert.common.data_types import FloatTensorType

    est, x = _boosting_case(kind)
    types = [("input", FloatTensorType([None, x.shape[1]]))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind.startswith("xgb"):
            onx = convert_xgboost(est, initial_types=types, target_opset=15)
        else:
            onx = convert_lightgbm(est, initial_types=types, target_opset=15, zipmap=False)
    path = tmp_path / f"{kind}.onnx"
    path.write_bytes(onx.SerializeToString())
    ens, orig = read_model(path), read_model(est)
    rows, bg = x[:21], x[100:140]  # rows 0, 7, 14 have a missing value
    ours = tree_shap(ens, rows, feature_perturbation=IV, background=bg)
    theirs = tree_shap(orig, rows, feature_perturbation=IV, background=bg)
    scale = np.abs(theirs.values).max()
    np.testing.assert_allclose(ours.values, theirs.values, rtol=1e-6, atol=1e-6 * scale)
    np.testing.assert_allclose(ours.base, theirs.base, rtol=1e-6, atol=1e-6 * scale)
    s = _session(path.read_bytes())
    out = np.asarray(s.run(None, {"input": rows})[-1], dtype=np.float64).reshape(len(rows), -1)
    if kind == "xgb_regressor":
        np.testing.assert_allclose(ours.base + ours.values.sum(1), out, rtol=1e-5)
    else:
        p = tree_shap(ens, rows, feature_perturbation=IV, background=bg, model_output="probability")
        np.testing.assert_allclose(
            p.base + p.values.sum(1), out[:, -p.values.shape[2] :], atol=1e-6
        )


# ----------------------------------------------------------------------------- errors


def _one_line(exc_info, *words):
    msg = str(exc_info.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_bad_files_give_one_line_errors(tmp_path):
    good = _graph("TreeEnsembleRegressor", DEPTH2).SerializeToString()
    cases = {
        "text.onnx": b"a,b,label\n1,2,0\n",
        "empty.onnx": b"",
        "truncated.onnx": good[: len(good) // 2],
        "tiny.onnx": b"\x08\x07",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ModelError) as exc:
            read_model(tmp_path / name)
        _one_line(exc, name, "not an ONNX model")
    with pytest.raises(ModelError) as exc:
        read_model(tmp_path / "missing.onnx")
    _one_line(exc, "does not exist")


def test_corrupted_files_fail_with_model_errors_only():
    """Every prefix of a converted file and random one-byte corruptions: a ModelError in one line
    (or a model that still parses), never another exception."""
    from skl2onnx import to_onnx

    est, x = _sklearn_case("rf3")
    data = to_onnx(est, x[:1], target_opset=_SKL_OPSET).SerializeToString()
    rng = np.random.default_rng(0)
    cases = [data[:n] for n in range(0, len(data), max(1, len(data) // 150))]
    for _ in range(300):
        b = bytearray(data)
        b[rng.integers(len(b))] = rng.integers(256)
        cases.append(bytes(b))
    refused = 0
    for c in cases:
        try:
            read_onnx(c)
        except ModelError as exc:
            refused += 1
            assert "\n" not in str(exc)
    assert refused > len(cases) // 2


def _with_nodes(before=(), after=(), attrs=DEPTH2, out_name="scores"):
    """DEPTH2 with extra nodes before (X -> ... -> Xt) and after (scores -> ... -> out)."""
    tree_in = "Xt" if before else "X"
    tree_out = "raw" if after else "scores"
    node = oh.make_node(
        "TreeEnsembleRegressor", [tree_in], [tree_out], domain="ai.onnx.ml", **attrs
    )
    g = oh.make_graph(
        [*before, node, *after],
        "g",
        [oh.make_tensor_value_info("X", TP.FLOAT, [None, 2])],
        [oh.make_tensor_value_info(out_name, TP.FLOAT, [None, 1])],
    )
    return oh.make_model(
        g, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("ai.onnx.ml", 3)]
    )


def test_unsupported_graphs_and_attributes_are_refused_in_one_line():
    scaler = oh.make_node(
        "Scaler", ["X"], ["Xt"], domain="ai.onnx.ml", offset=[0.0, 1.0], scale=[2.0, 1.0]
    )
    with pytest.raises(ModelError) as exc:
        read_onnx(_with_nodes(before=[scaler]))
    _one_line(exc, "Scaler", "before the tree ensemble")
    sigmoid = oh.make_node("Sigmoid", ["raw"], ["scores"])
    with pytest.raises(ModelError) as exc:
        read_onnx(_with_nodes(after=[sigmoid]))
    _one_line(exc, "Sigmoid")
    for key, value, word in (
        ("aggregate_function", "MIN", "MIN"),
        ("post_transform", "PROBIT", "PROBIT"),
        ("target_ids", [0, 0, 3], "output 3"),
        ("nodes_featureids", [0, 5, 0, 0, 0], "feature 5"),
        ("nodes_truenodeids", [1, 7, 0, 0, 0], "node 7"),
    ):
        with pytest.raises(ModelError) as exc:
            read_onnx(_graph("TreeEnsembleRegressor", {**DEPTH2, key: value}))
        _one_line(exc, word)
    # two ensembles in one graph; an integer input
    a = oh.make_node("TreeEnsembleRegressor", ["X"], ["s1"], domain="ai.onnx.ml", **DEPTH2)
    b = oh.make_node("TreeEnsembleRegressor", ["X"], ["scores"], domain="ai.onnx.ml", **DEPTH2)
    g = oh.make_graph(
        [a, b],
        "g",
        [oh.make_tensor_value_info("X", TP.FLOAT, [None, 2])],
        [oh.make_tensor_value_info("scores", TP.FLOAT, [None, 1])],
    )
    with pytest.raises(ModelError) as exc:
        read_onnx(oh.make_model(g, opset_imports=[oh.make_opsetid("ai.onnx.ml", 3)]))
    _one_line(exc, "2 tree-ensemble operators")
    with pytest.raises(ModelError) as exc:
        read_onnx(_graph("TreeEnsembleRegressor", DEPTH2, dtype=TP.INT64))
    _one_line(exc, "int64", "float and double")
    # shape-only ops and neutral arithmetic after the ensemble are fine (onnxmltools writes them)
    one = oh.make_tensor("one", TP.FLOAT, [], [1.0])
    mul = oh.make_node("Mul", ["raw", "one"], ["scores"])
    model = _with_nodes(after=[mul])
    model.graph.initializer.append(one)
    assert read_onnx(model).predict(np.zeros((1, 2)))[0, 0] == 1.5
    cast = oh.make_node("Cast", ["X"], ["Xt"], to=TP.DOUBLE)
    assert read_onnx(_with_nodes(before=[cast])).input_dtype == "float32"


def test_missing_onnx_package_names_the_extra(monkeypatch, tmp_path):
    import builtins

    real = builtins.__import__

    def fake(name, *args, **kwargs):
        if name == "onnx" or name.startswith("onnx."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake)
    (tmp_path / "m.onnx").write_bytes(b"\x08\x07")
    with pytest.raises(ModelError) as exc:
        read_model(tmp_path / "m.onnx")
    _one_line(exc, "perspicio[onnx]")


# ----------------------------------------------------------------------------- black boxes, CLI


def _logreg_file(tmp_path):
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x, y = _classification(3)
    clf = LogisticRegression(max_iter=500).fit(x, y)
    path = tmp_path / "logreg.onnx"
    path.write_bytes(to_onnx(clf, x[:1], target_opset=_SKL_OPSET).SerializeToString())
    return clf, x, path


def test_other_onnx_models_run_with_onnxruntime_as_black_boxes(tmp_path):
    import perspicio
    from perspicio.zoo.tabular import OnnxModel, load_model_file

    clf, x, path = _logreg_file(tmp_path)
    model = load_model_file(path)
    assert isinstance(model, OnnxModel) and model.labels == ("0", "1", "2")
    assert model.n_features == 5 and "prob" in model.output_name
    np.testing.assert_allclose(model(x[:7]), clf.predict_proba(x[:7]), atol=1e-5)
    e = perspicio.explain(model, x[:2], method="kernel_shap", background=x[100:110], target=1)
    np.testing.assert_allclose(e.base_value + e.attributions.sum(1), model(x[:2])[:, 1], atol=1e-5)
    # a tree ONNX file is read as data instead
    est, xr = _sklearn_case("dt_regressor")
    from skl2onnx import to_onnx

    (tmp_path / "t.onnx").write_bytes(
        to_onnx(est, xr[:1], target_opset=_SKL_OPSET).SerializeToString()
    )
    assert type(load_model_file(tmp_path / "t.onnx")).__name__ == "TreeEnsemble"


def _csv(path, x):
    cols = [f"c{i}" for i in range(x.shape[1])]
    rows = "\n".join(",".join("" if np.isnan(v) else f"{v:.9g}" for v in r) for r in x)
    path.write_text(",".join(cols) + "\n" + rows + "\n")


@pytest.mark.slow
def test_cli_end_to_end_on_a_converted_forest(tmp_path, capsys):
    from skl2onnx import to_onnx

    from perspicio.cli import main

    est, x = _sklearn_case("rf3")
    model = tmp_path / "forest.onnx"
    model.write_bytes(to_onnx(est, x[:1], target_opset=_SKL_OPSET).SerializeToString())
    data = tmp_path / "rows.csv"
    _csv(data, x[:30])
    args = ["explain-tabular", "--model", str(model), "--data", str(data), "--no-interactions"]
    # no covers in the file: without --background the interventional game runs on 100 rows of
    # --data (here all 30), with a one-line note naming --background
    assert main([*args, "--rows", "0:2", "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err.strip()
    assert "stores no node covers" in err and "--background" in err
    first = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert first["summary"]["options"]["feature_perturbation"] == "interventional"
    out = tmp_path / "b"
    assert main([*args, "--background", "10", "--rows", "0:6", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "tree_shap" and len(summary["rows"]) == 6
    assert summary["summary"]["options"]["feature_perturbation"] == "interventional"
    probs = _ort_probabilities(model, x[:6].astype(np.float32))
    for i, r in enumerate(summary["rows"]):
        total = sum(r["values"].values()) + r["base_value"]
        assert total == pytest.approx(r["prediction"], abs=1e-9)
        assert r["prediction"] == pytest.approx(probs[i].max(), abs=1e-6)  # predicted class
    assert {"beeswarm.png", "bar.png", "force.html"} <= {p.name for p in out.iterdir()}


def test_cli_runs_other_onnx_models_with_kernel_shap(tmp_path):
    from perspicio.cli import main

    clf, x, path = _logreg_file(tmp_path)
    data = tmp_path / "rows.csv"
    _csv(data, x[:10])
    out = tmp_path / "out"
    args = ["explain-tabular", "--model", str(path), "--data", str(data), "--rows", "0:2"]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "kernel_shap"
    p = clf.predict_proba(x[:2])
    for i, r in enumerate(summary["rows"]):
        assert sum(r["values"].values()) + r["base_value"] == pytest.approx(
            r["prediction"], abs=1e-5
        )
        assert r["prediction"] == pytest.approx(p[i].max(), abs=1e-5)
