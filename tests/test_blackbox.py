"""The black-box adapter, the tabular demo zoo and the tabular CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import perspicio
from perspicio.core.blackbox import BlackBox
from perspicio.errors import ModelError, OptionError, UnknownNameError


def test_sklearn_estimator_and_predict_proba():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4))
    y = (x[:, 0] - x[:, 2] > 0).astype(int)
    clf = LogisticRegression().fit(x, y)
    for model in (clf, clf.predict_proba):
        bb = BlackBox(model)
        out = bb(torch.as_tensor(x[:5]))
        np.testing.assert_allclose(out.numpy(), clf.predict_proba(x[:5]))
        assert out.dtype == torch.float64
    e = perspicio.explain(clf, x[:3], method="kernel_shap", background=x[:20], budget=16)
    assert e.attributions.shape == (3, 4)
    assert e.targets.tolist() == clf.predict(x[:3]).tolist()


def test_regression_output_becomes_a_column():
    bb = BlackBox(lambda a: a.sum(1))
    assert bb(torch.ones(3, 2)).shape == (3, 1)


def test_torch_callable_and_text():
    bb = BlackBox(lambda t: t * 2, inputs="torch")
    assert torch.equal(bb(torch.ones(2, 3)), torch.full((2, 3), 2.0))
    txt = BlackBox(lambda texts: [[len(t)] for t in texts])
    assert txt(["ab", "abcd"]).tolist() == [[2.0], [4.0]]


def test_fake_onnx_session():
    class Input:
        name = "x"
        type = "tensor(float)"

    class Output:
        def __init__(self, name, type_):
            self.name, self.type = name, type_

    class Session:
        def get_inputs(self):
            return [Input()]

        def get_outputs(self):
            return [Output("label", "tensor(int64)"), Output("scores", "tensor(float)")]

        def run(self, outputs, feeds):
            a = feeds["x"]
            assert a.dtype == np.float32 and outputs == ["scores"]  # the label is never explained
            return [a[:, :2] * 3]

    bb = BlackBox(Session())
    assert bb.dtype == torch.float32
    np.testing.assert_allclose(bb(torch.ones(4, 3)).numpy(), np.full((4, 2), 3.0))
    e = perspicio.explain(Session(), np.ones((1, 3)), method="occlusion", target=1)
    np.testing.assert_allclose(e.attributions.numpy(), [[0, 3, 0]])


def test_a_converted_classifier_session_explains_its_probabilities_not_its_label():
    """skl2onnx writes the integer label first; the session wrapper explains the probability
    tensor, and a ZipMap-only graph is refused with the remedy."""
    ort = pytest.importorskip("onnxruntime")
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 4)).astype(np.float32)
    clf = LogisticRegression().fit(x, (x[:, 0] + x[:, 1] > 0).astype(int))
    plain = skl2onnx.to_onnx(clf, x[:1], options={"zipmap": False})
    session = ort.InferenceSession(plain.SerializeToString(), providers=["CPUExecutionProvider"])
    bb = BlackBox(session)
    np.testing.assert_allclose(bb(torch.as_tensor(x[:5])).numpy(), clf.predict_proba(x[:5]), atol=1e-5)
    zipped = skl2onnx.to_onnx(clf, x[:1])
    session = ort.InferenceSession(zipped.SerializeToString(), providers=["CPUExecutionProvider"])
    with pytest.raises(ModelError, match="no floating-point tensor output.*zipmap"):
        BlackBox(session)


def test_validation_errors():
    with pytest.raises(ModelError, match=r"returned shape \(2,\) for 3 inputs"):
        BlackBox(lambda a: a[:2, 0])(torch.ones(3, 2))
    with pytest.raises(ModelError, match="NaN"):
        BlackBox(lambda a: np.full((len(a), 2), np.nan))(torch.ones(3, 2))
    bb = BlackBox(lambda a: np.ones((len(a), 2 if len(a) < 3 else 3)))
    bb(torch.ones(2, 1))
    with pytest.raises(ModelError, match="earlier calls returned"):
        bb(torch.ones(3, 1))
    with pytest.raises(ModelError, match="failed on a batch"):
        BlackBox(lambda a: 1 / 0)(torch.ones(1, 2))
    with pytest.raises(ModelError, match="nn.Module or a callable"):
        BlackBox(object())
    with pytest.raises(OptionError, match="inputs must be"):
        BlackBox(lambda a: a, inputs="jax")
    # the wrong shape surfaces through explain() as the same clear error
    with pytest.raises(ModelError, match="one row per input"):
        perspicio.explain(lambda a: np.ones(1), np.ones((2, 3)), method="kernel_shap")


def test_gradient_method_refuses_black_box_with_the_alternatives():
    with pytest.raises(ModelError, match="kernel_shap"):
        perspicio.explain(lambda a: a, np.ones((1, 3, 8, 8)), method="gradcam")


# ----------------------------------------------------------------------------- tabular zoo


def test_tabular_zoo_cache_and_determinism(tmp_path, monkeypatch):
    from perspicio.zoo.tabular import cache_dir, load_tabular

    monkeypatch.setenv("PERSPICIO_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    a = load_tabular("diabetes", "mlp")
    files = list((tmp_path / "tabular").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"
    b = load_tabular("diabetes", "mlp")  # from the cache
    c = load_tabular("diabetes", "mlp", cache=False)  # retrained: same seed, same weights
    for p, q, r in zip(a.model.parameters(), b.model.parameters(), c.model.parameters()):
        assert torch.equal(p, q) and torch.equal(p, r)
    assert a.task == "regression" and a.score() > 0.1
    g = load_tabular("diabetes", "gbm")
    assert isinstance(g.model, BlackBox) and g.score() > 0.1
    assert len(list((tmp_path / "tabular").iterdir())) == 1  # the GBM is retrained, never pickled to the cache
    with pytest.raises(UnknownNameError, match="breast_cancer"):
        load_tabular("breast-cancers")


def test_explain_tabular_cli(tmp_path, monkeypatch):
    from perspicio.cli import main

    monkeypatch.setenv("PERSPICIO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    code = main(["explain-tabular", "--data", "diabetes", "--model", "gbm", "--method", "kernel_shap",
                 "--rows", "0,1,2", "--budget", "64", "--background-size", "20", "--out", str(out)])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {"row0_waterfall.png", "beeswarm.png", "bar.png", "summary.json"} <= names
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["rows"]) == 3
    row = summary["rows"][0]
    assert abs(sum(row["values"].values()) - (row["prediction"] - row["base_value"])) < 1e-9
    assert main(["explain-tabular", "--data", "diabetes", "--method", "gradcam", "--out", str(out)]) == 2
