"""perspicio serve, tabular tab: /api/tabular/* through FastAPI's test client with one real worker.

The worker compiles the TreeSHAP kernels in the background at start; the first tree request made
while it compiles waits for it (and says how long). Results are checked by additivity
(base + sum of attributions = the explained score), by the score matching the reported
probability (tree margins are log-odds), and for the MLP against the Python API.
"""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("sklearn")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve_api import assert_error  # noqa: E402

from perspicio.serve.app import ServeConfig, create_app  # noqa: E402
from perspicio.serve.tabular import available_models  # noqa: E402

pytestmark = pytest.mark.slow

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def client():
    app = create_app(ServeConfig(workers=1, time_limit=600, preload=False))
    with TestClient(app) as c:
        assert app.state.pool.wait_ready(300)
        # asked at once: the worker has only just started compiling
        c.first_status = c.get("/api/tabular/models").json()  # type: ignore[attr-defined]
        yield c


def test_models_and_compile_state(client):
    body = client.first_status
    ids = [m["id"] for m in body["models"]]
    assert ids == available_models()
    assert "breast_cancer_mlp" in ids and "breast_cancer_gbm" in ids
    assert {m["method"] for m in body["models"]} <= {"tree_shap", "deeplift"}
    assert body["tree_kernels"]["state"] in ("compiling", "ready")


def test_rows(client):
    r = client.get("/api/tabular/rows", params={"model": "breast_cancer_gbm"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["features"]) == 30 and body["labels"] == ["malignant", "benign"]
    assert len(body["rows"]) == 114
    assert all(len(row["values"]) == 30 for row in body["rows"])
    assert {row["true"] for row in body["rows"]} == {"malignant", "benign"}


def check_row(body: dict, row: int) -> None:
    assert body["row"] == row
    attr = np.array([f["attribution"] for f in body["features"]])
    assert len(attr) == 30
    assert body["base_value"] + attr.sum() == pytest.approx(body["score"], abs=1e-4)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
    for name in ("waterfall", "force", "beeswarm"):
        assert base64.b64decode(body["images"][name])[:8] == PNG
    assert f"--rows {row}" in body["cli"]


def test_tree_request_during_compile_waits(client):
    model = (
        "breast_cancer_xgb" if "breast_cancer_xgb" in available_models() else "breast_cancer_gbm"
    )
    r = client.post("/api/tabular/explain", data={"model": model, "row": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    check_row(body, 3)
    assert body["method"] == "tree_shap"
    p = body["probabilities"]["benign"]
    assert body["score"] == pytest.approx(math.log(p / (1 - p)), rel=1e-4)
    if client.first_status["tree_kernels"]["state"] == "compiling":
        assert body["waited_for_compile"] > 0
    state = client.get("/api/tabular/models").json()["tree_kernels"]
    assert state["state"] == "ready" and state["seconds"] > 0
    # the same request again: from the result cache
    again = client.post("/api/tabular/explain", data={"model": model, "row": "3"}).json()
    assert again["cached"] is True and again["score"] == body["score"]


def test_mlp_equals_python_api(client):
    import torch

    import perspicio
    from perspicio.zoo.tabular import load_tabular

    r = client.post("/api/tabular/explain", data={"model": "breast_cancer_mlp", "row": "10"})
    assert r.status_code == 200, r.text
    body = r.json()
    check_row(body, 10)
    assert body["method"] == "deeplift" and body["explained"] == "logit of benign"
    d = load_tabular("breast_cancer", "mlp")
    e = perspicio.explain(
        d,
        d.X_test,
        method="deeplift",
        baseline=d.background(100).mean(0, keepdims=True),
        target=1,
    )
    got = np.array([f["attribution"] for f in body["features"]])
    np.testing.assert_allclose(got, e.attributions[10].double().numpy(), rtol=1e-5, atol=1e-6)
    logits = d.predict(d.X_test[10:11])[0]
    assert body["score"] == pytest.approx(float(logits[1]), rel=1e-5)
    p = torch.softmax(torch.as_tensor(logits), 0).numpy()
    assert body["probabilities"]["benign"] == pytest.approx(float(p[1]), rel=1e-5)


def test_bad_input(client):
    r = client.post("/api/tabular/explain", data={"model": "breast_cancer_xbg", "row": "0"})
    assert_error(r, 422, "unknown tabular model", "breast_cancer_xgb")
    assert_error(client.get("/api/tabular/rows", params={"model": "iris"}), 422, "unknown")
    r = client.post("/api/tabular/explain", data={"model": "breast_cancer_mlp", "row": "114"})
    assert_error(r, 422, "out of range", "0 to 113")
    r = client.post("/api/tabular/explain", data={"model": "breast_cancer_mlp", "row": "-1"})
    assert_error(r, 422, "out of range")
    for bad in ("abc", "1.5", ""):
        r = client.post("/api/tabular/explain", data={"model": "breast_cancer_mlp", "row": bad})
        assert_error(r, 422, "row must be a whole number")
    assert_error(client.post("/api/tabular/explain", data={"model": "breast_cancer_mlp"}), 422)
