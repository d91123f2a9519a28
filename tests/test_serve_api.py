"""perspicio serve: the JSON API through FastAPI's test client, with one real worker process.

Every endpoint, every bad input (oversized upload, decompression bomb, text file named .png,
unknown model/method/layer/target/sample), the queue limit (503 + Retry-After), a job over its
time limit (504, worker replaced), cancelling, the progress stream, the cache, and results equal
to the Python API's.
"""

from __future__ import annotations

import base64
import io
import json
import math
import time

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve_uploads import jpeg_bytes, png_bomb, png_bytes  # noqa: E402

from perspicio.serve.app import ServeConfig, create_app  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client():
    app = create_app(
        ServeConfig(
            workers=1,
            max_upload_bytes=2 * 2**20,
            max_pixels=4_000_000,
            time_limit=900,  # a loaded CI machine; the time-limit test sets its own
            tabular=False,  # the tabular tab has its own tests (test_serve_tabular.py)
            cached_models=False,  # cached torchvision/timm models: test_serve_models.py
        )
    )
    with TestClient(app) as c:
        assert app.state.pool.wait_ready(300)
        yield c


def assert_error(r, status: int, *fragments: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"]
    msg = body["error"]
    assert "\n" not in msg and "Traceback" not in msg and 'File "' not in msg
    for f in fragments:
        assert f in msg, msg


def values_of(m: dict) -> np.ndarray:
    h, w = m["shape"]
    return np.frombuffer(base64.b64decode(m["values"]), dtype="<f4").reshape(h, w)


# ---------------------------------------------------------------------------- listing endpoints


def test_models_methods_layers_labels(client: TestClient) -> None:
    models = client.get("/api/models").json()
    assert [m["id"] for m in models["models"]] == ["efficientnet_lite0"]
    assert "chelsea" in [s["name"] for s in models["samples"]]
    fams = {
        f["family"]: [m["name"] for m in f["methods"]]
        for f in client.get("/api/methods").json()["families"]
    }
    assert "gradcam" in fams["cam"] and "integrated_gradients" in fams["path"]
    assert "tree_shap" not in sum(fams.values(), [])  # needs a tree model, not for images
    layers = client.get("/api/layers", params={"model": "efficientnet_lite0"}).json()
    assert layers["default"] == "_act_head"
    assert [entry["name"] for entry in layers["layers"] if entry["default"]] == ["_act_head"]
    labels = client.get("/api/labels").json()["labels"]
    assert len(labels) == 1000 and labels[285] == "Egyptian cat"
    assert client.get("/openapi.json").status_code == 200
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/static/docs.js" in docs.text
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "app.css", "docs.js", "icon.svg"):
        assert client.get(f"/static/{name}").status_code == 200
    assert client.get("/api/samples/chelsea.png").headers["content-type"] == "image/png"


def test_predict_top5_from_sample_and_upload(client: TestClient) -> None:
    r = client.post("/api/predict", data={"sample": "chelsea"})
    top = r.json()["top"]
    assert len(top) == 5 and top[0]["label"] == "Egyptian cat"
    assert all(top[i]["probability"] >= top[i + 1]["probability"] for i in range(4))
    from perspicio import zoo

    buf = io.BytesIO()
    zoo.sample("chelsea").save(buf, format="PNG")
    up = client.post(
        "/api/predict", files={"file": ("anything.bin", buf.getvalue(), "text/plain")}
    ).json()
    assert [t["index"] for t in up["top"]] == [t["index"] for t in top]
    assert math.isclose(up["top"][0]["probability"], top[0]["probability"], rel_tol=1e-5)
    jpg = client.post("/api/predict", files={"file": ("x.jpg", jpeg_bytes(300, 200), "image/jpeg")})
    assert jpg.status_code == 200 and len(jpg.json()["top"]) == 5


# ---------------------------------------------------------------------------- explain / compare


def test_explain_equals_the_python_api(client: TestClient, zoo_model, chelsea_batch) -> None:
    import perspicio

    r = client.post(
        "/api/explain",
        data={"sample": "chelsea", "methods": "gradcam,input_x_gradient", "target": "281"},
    )
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["target"] == {"index": 281, "name": "tabby"} and res["cached"] is False
    assert res["cli"] == (
        "perspicio explain chelsea --model efficientnet_lite0 --method gradcam,input_x_gradient "
        "--target 281"
    )
    by = {m["method"]: m for m in res["methods"]}
    for method in ("gradcam", "input_x_gradient"):
        ref = (
            perspicio.explain(zoo_model, chelsea_batch, method=method, target=281)
            .attributions[0]
            .sum(0)
            .numpy()
        )
        got = values_of(by[method])
        assert got.shape == ref.shape == (224, 224)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6 * float(np.abs(ref).max()))
    assert by["gradcam"]["signed"] is False and by["gradcam"]["cmap"] == "jet"
    assert by["input_x_gradient"]["signed"] is True and by["input_x_gradient"]["legend"]["low"] < 0
    assert by["gradcam"]["layer"] == "_act_head"
    from PIL import Image

    heat = Image.open(io.BytesIO(base64.b64decode(by["gradcam"]["heat_png"])))
    photo = Image.open(io.BytesIO(base64.b64decode(res["image"]["png"])))
    assert heat.size == photo.size == (224, 224)
    again = client.post(
        "/api/explain",
        data={"sample": "chelsea", "methods": "gradcam,input_x_gradient", "target": "281"},
    )
    assert again.json()["cached"] is True and again.json()["methods"] == res["methods"]
    assert client.get("/api/status").json()["cache"]["hits"] >= 1


def test_explain_with_a_layer_and_a_class_name(
    client: TestClient, zoo_model, chelsea_batch
) -> None:
    import perspicio

    layer = "_blocks.15"
    r = client.post(
        "/api/explain",
        data={"sample": "chelsea", "methods": "gradcam", "target": "tiger cat", "layer": layer},
    )
    assert r.status_code == 200, r.text
    m = r.json()["methods"][0]
    assert r.json()["target"]["index"] == 282 and m["layer"] == layer
    ref = perspicio.explain(
        zoo_model, chelsea_batch, method="gradcam", target=282, layer=layer
    ).attributions[0, 0]
    np.testing.assert_allclose(values_of(m), ref.numpy(), rtol=1e-4, atol=1e-7)
    assert "--layer _blocks.15" in r.json()["cli"]


def test_compare_ranks_as_the_python_api(client: TestClient, zoo_model, chelsea_batch) -> None:
    from perspicio.metrics.evaluate import compare
    from perspicio.serve.work import TRUST_METRIC_OPTIONS, TRUST_METRICS

    r = client.post(
        "/api/compare",
        data={"sample": "chelsea", "methods": "gradcam,hirescam", "wait": "false"},
    )
    assert r.status_code == 202, r.text
    with client.stream("GET", r.json()["events"]) as s:
        data = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert data[-1]["type"] == "result", data[-1]
    res = data[-1]["result"]
    # progress per step of the comparison: each method explained, then scored by each metric
    steps = [d for d in data if d["type"] == "progress" and "done" in d]
    assert [d["done"] for d in steps] == list(range(1, 11))
    assert all(d["total"] == 10 and d["estimate"] for d in steps)  # 2 x (1 + 4 metrics)
    assert steps[0]["step"].startswith("gradcam: explained in ")
    assert steps[1]["step"].startswith("gradcam deletion = ")
    assert steps[5]["step"].startswith("hirescam: explained in ")
    ref = compare(
        zoo_model,
        chelsea_batch,
        methods=["gradcam", "hirescam"],
        metrics=list(TRUST_METRICS),
        target=285,
        seed=0,
        metric_options=TRUST_METRIC_OPTIONS,
    )
    assert [row["method"] for row in res["table"]] == [row["method"] for row in ref.records()]
    for row, want in zip(res["table"], ref.records()):
        for metric in TRUST_METRICS:
            assert math.isclose(row[metric], want[metric], rel_tol=1e-4, abs_tol=1e-6), (
                metric,
                row,
                want,
            )
    assert (
        set(res["curves"]) == {"deletion", "insertion"}
        and len(res["curves"]["deletion"]["gradcam"]) == 26
    )
    assert set(res["plain"]) == set(TRUST_METRICS) and all(res["plain"].values())
    assert "--metric-option deletion.steps=25" in res["cli"] and res["cli"].startswith(
        "perspicio compare chelsea"
    )


def test_progress_stream_ends_with_the_result(client: TestClient) -> None:
    r = client.post(
        "/api/explain", data={"sample": "coffee", "methods": "gradcam,hirescam", "wait": "false"}
    )
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    events = []
    with client.stream("GET", f"/api/jobs/{job}/events") as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
    assert events[0] == "state" and events[-1] == "result" and "progress" in events
    state = client.get(f"/api/jobs/{job}").json()
    assert state["state"] == "done" and len(state["result"]["methods"]) == 2
    assert_error(client.get("/api/jobs/nosuchjob"), 404, "no such job")


def test_progress_reports_each_chunk_of_a_methods_passes(client: TestClient) -> None:
    """Inside one method the page sees its passes advance chunk by chunk (the methods' progress
    callback), not only 'method k of n'."""
    import json

    r = client.post("/api/explain", data={"sample": "coffee", "methods": "occlusion", "wait": "false"})
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    events, kind = [], None
    with client.stream("GET", f"/api/jobs/{job}/events") as s:
        for line in s.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "progress":
                events.append(json.loads(line[6:]))
    passes = [e for e in events if "passes_total" in e]
    assert passes, events
    assert all(e["method"] == "occlusion" and e["pass_stage"] for e in passes)
    dones = [e["passes"] for e in passes if e["passes_total"] == passes[-1]["passes_total"]]
    assert dones == sorted(dones) and dones[-1] == passes[-1]["passes_total"] and len(set(dones)) >= 2


# ---------------------------------------------------------------------------- bad input


def test_bad_uploads(client: TestClient) -> None:
    assert_error(
        client.post(
            "/api/predict", files={"file": ("cat.png", b"I am text, not a picture", "image/png")}
        ),
        415,
        "not a PNG or JPEG",
    )
    assert_error(
        client.post("/api/predict", files={"file": ("bomb.png", png_bomb(20_000), "image/png")}),
        413,
        "refused before decoding",
    )
    big = png_bytes(8, 8) + b"\x00" * (3 * 2**20)
    assert_error(
        client.post("/api/predict", files={"file": ("big.png", big, "image/png")}), 413, "limit"
    )

    def chunks():  # no Content-Length: the body is counted while it is read
        yield (
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n'
            b"Content-Type: image/png\r\n\r\n"
        )
        for _ in range(40):
            yield b"\x00" * 100_000

    assert_error(
        client.post(
            "/api/predict",
            content=chunks(),
            headers={"content-type": "multipart/form-data; boundary=xyz"},
        ),
        413,
        "limit",
    )
    assert_error(
        client.post("/api/predict", files={"file": ("x.png", png_bytes(10, 10)[:30], "image/png")}),
        400,
        "cannot be decoded",
    )
    assert_error(client.post("/api/predict", data={}), 422, "either an image file")
    assert_error(
        client.post("/api/predict", data={"sample": "../../etc/passwd"}), 422, "unknown sample"
    )


def test_bad_names(client: TestClient) -> None:
    assert_error(
        client.post("/api/explain", data={"sample": "chelsea", "methods": "gradcma"}),
        422,
        "unknown method 'gradcma'",
        "gradcam",
    )
    assert_error(
        client.post(
            "/api/explain", data={"sample": "chelsea", "methods": "gradcam", "layer": "_blocks.99"}
        ),
        422,
        "unknown layer '_blocks.99'",
    )
    assert_error(
        client.post(
            "/api/explain", data={"sample": "chelsea", "methods": "gradcam", "target": "1000"}
        ),
        422,
        "out of range",
    )
    assert_error(
        client.post(
            "/api/explain", data={"sample": "chelsea", "methods": "gradcam", "target": "tabyy"}
        ),
        422,
        "unknown class name",
    )
    assert_error(
        client.post("/api/explain", data={"sample": "chelsea", "methods": "tree_shap"}), 422, "tree"
    )
    assert_error(
        client.post("/api/explain", data={"sample": "chelsea", "methods": ""}), 422, "at least one"
    )
    assert_error(
        client.post("/api/explain", data={"sample": "chelsea", "model": "/etc/passwd"}),
        422,
        "unknown model",
    )
    assert_error(
        client.get("/api/layers", params={"model": "torchvision:resnet18"}), 422, "unknown model"
    )
    assert_error(client.get("/static/..%2Fapp.py"), 404)
    assert_error(client.get("/api/samples/..%2F..%2Fsecret.png"), 404, "Not Found")
    assert_error(client.get("/api/nothing"), 404)


def test_cors_is_off(client: TestClient) -> None:
    r = client.get("/api/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    pre = client.options(
        "/api/explain",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in pre.headers


# ---------------------------------------------------------------------------- scheduling


def test_queue_limit_answers_503_with_retry_after(client: TestClient) -> None:
    pool = client.app.state.pool
    old = pool.queue_limit
    pool.queue_limit = 0
    try:
        first = client.post(
            "/api/explain", data={"sample": "rocket", "methods": "gradcampp", "wait": "false"}
        )
        assert first.status_code == 202
        r = client.post(
            "/api/explain", data={"sample": "rocket", "methods": "xgradcam", "wait": "false"}
        )
        assert_error(r, 503, "busy")
        assert int(r.headers["retry-after"]) >= 1
    finally:
        pool.queue_limit = old
    with client.stream("GET", f"/api/jobs/{first.json()['job']}/events") as s:
        assert "event: result" in "\n".join(s.iter_lines())


def test_cancel_and_time_limit_replace_the_worker(client: TestClient) -> None:
    pool = client.app.state.pool
    spawned = pool.spawned
    r = client.post(
        "/api/explain", data={"sample": "astronaut", "methods": "scorecam", "wait": "false"}
    )
    job = r.json()["job"]
    for _ in range(600):  # wait until it runs
        if client.get(f"/api/jobs/{job}").json().get("state") == "running":
            break
        time.sleep(0.05)
    assert client.delete(f"/api/jobs/{job}").status_code == 200
    for _ in range(200):
        state = client.get(f"/api/jobs/{job}")
        if state.status_code != 200:
            break
        time.sleep(0.05)
    assert_error(state, 409, "cancelled")
    old = pool.time_limit
    pool.time_limit = 0.5
    try:
        t0 = time.monotonic()
        r = client.post(
            "/api/explain", data={"sample": "astronaut", "methods": "scorecam", "target": "1"}
        )
        assert_error(r, 504, "time limit of 0.5 s")
        assert time.monotonic() - t0 < 120
    finally:
        pool.time_limit = old
    assert pool.spawned == spawned + 2 and pool.timeouts >= 1
    ok = client.post("/api/predict", data={"sample": "astronaut"})  # the replacement worker answers
    assert ok.status_code == 200, ok.text


def test_no_traceback_reaches_the_client(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from perspicio.serve import app as app_module

    def boom(name: str):
        raise RuntimeError("secret internal detail\nline two")

    monkeypatch.setattr(app_module, "_sample_pixels", boom)
    quiet = TestClient(
        client.app, raise_server_exceptions=False
    )  # answer as a deployed server would
    r = quiet.post("/api/predict", data={"sample": "chelsea"})
    assert_error(r, 500, "internal error (RuntimeError)")
    assert "secret" not in r.text


def test_events_are_json(client: TestClient) -> None:
    r = client.post(
        "/api/explain",
        data={"sample": "chelsea", "methods": "gradcam", "target": "281", "wait": "false"},
    )
    body = r.json()
    if body.get("cached"):  # answered from the cache of the first explain test
        assert body["result"]["target"]["index"] == 281
        return
    with client.stream("GET", body["events"]) as s:
        data = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: ")]
    assert data[-1]["type"] == "result" and data[-1]["result"]["target"]["index"] == 281


def test_models_table_from_the_command_line(tmp_path) -> None:
    from click.testing import CliRunner
    from conftest import TinyCNN

    from perspicio.cli import cli
    from perspicio.cli.serve import is_loopback, model_table

    path = tmp_path / "tiny.pt"
    torch.jit.script(TinyCNN()).save(str(path))
    table = model_table((str(path),))
    assert table == {"efficientnet_lite0": "efficientnet_lite0", "tiny.pt": str(path.resolve())}
    app = create_app(ServeConfig(models=table))
    listed = TestClient(app).get("/api/models").json()["models"]  # no lifespan: no worker needed
    assert [m["id"] for m in listed] == ["efficientnet_lite0", "tiny.pt"]
    assert str(tmp_path) not in json.dumps(listed) and listed[1]["id"] == "tiny.pt"
    assert is_loopback("127.0.0.1") and is_loopback("::1") and not is_loopback("0.0.0.0")
    res = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0"])
    assert res.exit_code != 0 and "--allow-remote" in str(res.exception or res.output)


def test_compare_steps_turn_lines_into_progress_events() -> None:
    from perspicio.serve.work import CompareSteps

    events: list[dict] = []
    other = io.StringIO()
    steps = CompareSteps(events.append, {"stage": "compare"})
    steps.stderr = other
    steps.write("compare: 1 methods x 1 metrics on 1 input (m: 1 ms per forward)\n  methods ")
    steps.write("(passes per sample): gradcam 1f+1b  -> est. 5 ms\n")
    steps.write("  estimated total 1.2 s; expensive metrics not chosen (opt in by name): x\n")
    steps.write("compare [1/2] gradcam: explained in 10 ms\ncompare [2/2] gradcam del")
    assert [e.get("done") for e in events] == [None, 1]
    steps.write("etion = 0.1 (5 ms)\nsome warning from another thread\n")
    steps.flush()
    assert events == [
        {"stage": "compare", "estimate": "1.2 s"},
        {
            "stage": "compare",
            "done": 1,
            "total": 2,
            "step": "gradcam: explained in 10 ms",
            "estimate": "1.2 s",
        },
        {
            "stage": "compare",
            "done": 2,
            "total": 2,
            "step": "gradcam deletion = 0.1 (5 ms)",
            "estimate": "1.2 s",
        },
    ]
    assert other.getvalue() == "some warning from another thread\n"
