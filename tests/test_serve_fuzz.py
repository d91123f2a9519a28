"""perspicio serve: malformed requests get a JSON 4xx naming the problem (a bad-input sweep of
the API; see also test_serve_api.py). No worker is started: every case is refused before a job
would be submitted."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")

from fastapi.testclient import TestClient  # noqa: E402

from perspicio.serve.app import ServeConfig, create_app  # noqa: E402


class NoPool:
    """Stands in for the worker pool: any job submitted is a test failure."""

    workers = 0

    def submit(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a malformed request reached the worker pool")

    def busy(self) -> int:
        return 0

    def pending(self) -> int:
        return 0


@pytest.fixture(scope="module")
def client():
    app = create_app(ServeConfig(cached_models=False), pool=NoPool())
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def assert_error(r: Any, status: int, *fragments: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert list(body) == ["error"]
    msg = body["error"]
    assert "\n" not in msg and "Traceback" not in msg, msg
    for f in fragments:
        assert f in msg, msg


POSTS = [
    ("/api/predict", {"sample": "chelsea"}),
    ("/api/explain", {"sample": "chelsea", "methods": "gradcam"}),
    ("/api/compare", {"sample": "chelsea", "methods": "gradcam"}),
    ("/api/tabular/explain", {"model": "breast_cancer_mlp", "row": "0"}),
    ("/api/text/explain", {"text": "a cat", "methods": "attention_rollout", "target": "a dog"}),
]


@pytest.mark.parametrize("path,fields", POSTS, ids=[p for p, _ in POSTS])
def test_a_misspelt_field_is_refused_not_ignored(client, path, fields) -> None:
    key = "target" if "target" in fields else "sample" if "sample" in fields else "row"
    bad = {**fields, key[:-2] + key[-1] + key[-2]: fields[key]}  # target -> targte
    bad.pop(key)
    r = client.post(path, data=bad)
    assert_error(r, 422, f"unknown field {key[:-2] + key[-1] + key[-2]!r}", f"Did you mean: {key}")


@pytest.mark.parametrize("path,fields", POSTS, ids=[p for p, _ in POSTS])
@pytest.mark.parametrize(
    "content_type,body",
    [
        ("application/json", b'{"sample": "chelsea"}'),
        ("application/json", b"{not json"),
        ("text/plain", b"sample=chelsea"),
    ],
    ids=["json", "malformed-json", "text"],
)
def test_a_body_that_is_not_a_form_is_415(client, path, fields, content_type, body) -> None:
    r = client.post(path, content=body, headers={"content-type": content_type})
    assert_error(r, 415, "form", content_type)


def test_a_correct_form_still_passes_the_field_check(client) -> None:
    # refused later, by the sample check (no job is submitted)
    r = client.post("/api/predict", data={"sample": "nope", "model": "efficientnet_lite0"})
    assert_error(r, 422, "unknown sample")
    r = client.post("/api/predict", files={"file": ("a.png", b"text", "image/png")})
    assert_error(r, 415, "not a PNG or JPEG")
