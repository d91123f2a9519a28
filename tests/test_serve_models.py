"""perspicio serve offers the torchvision (and timm) classifiers whose weights are cached, and
loads them with ``weights_only=True`` only.

A temporary ``TORCH_HOME`` holds two planted checkpoints under torchvision's hub file names: a
randomly initialised ResNet-18 state dict (plain tensors) and, for ResNet-34, a pickle that would
create a file if it were ever unpickled with code. Both are listed (the app looks at file names,
never at contents), and so are timm's ``.tv_in1k`` tags, which read the same files; ResNet-18
predicts and explains exactly as the Python API does (timm's too); ResNet-34 is refused with a
one-line JSON error, as torchvision's and as timm's model, and the pickle never runs.
"""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
tvm = pytest.importorskip("torchvision.models")

from fastapi.testclient import TestClient  # noqa: E402
from test_serve_api import assert_error, values_of  # noqa: E402

from perspicio.serve.app import ServeConfig, create_app  # noqa: E402

pytestmark = pytest.mark.slow


class Trap:
    """Unpickling this creates ``path``: a stand-in for code hidden in a checkpoint."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.path),))


def hub_file(arch: str) -> str:
    from urllib.parse import urlparse

    return os.path.basename(urlparse(tvm.get_model_weights(arch).DEFAULT.url).path)


@pytest.fixture(scope="module")
def torch_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    net = tvm.resnet18(weights=None)
    torch.save(net.state_dict(), checkpoints / hub_file("resnet18"))
    marker = home / "the-pickle-ran"
    torch.save({"fc.weight": Trap(str(marker))}, checkpoints / hub_file("resnet34"))
    old = os.environ.get("TORCH_HOME")
    os.environ["TORCH_HOME"] = str(home)  # read by torch.hub.get_dir here and in the workers
    try:
        yield home, marker
    finally:
        if old is None:
            del os.environ["TORCH_HOME"]
        else:
            os.environ["TORCH_HOME"] = old


@pytest.fixture(scope="module")
def client(torch_home):
    app = create_app(
        ServeConfig(workers=1, time_limit=900, tabular=False, text=False, preload=False)
    )
    with TestClient(app) as c:
        assert app.state.pool.wait_ready(300)
        yield c


def test_cached_torchvision_models_are_listed(client: TestClient, torch_home) -> None:
    models = {m["id"]: m for m in client.get("/api/models").json()["models"]}
    assert list(models)[0] == "efficientnet_lite0"
    assert {"torchvision:resnet18", "torchvision:resnet34"} <= set(models)
    assert "torchvision:resnet50" not in models  # not cached: never offered, never fetched
    # timm's torchvision-weight tags read the same hub files (timm's cfg url is torchvision's)
    assert {"timm:resnet18.tv_in1k", "timm:resnet34.tv_in1k"} <= set(models)
    assert models["torchvision:resnet18"]["cached"] is True
    assert "IMAGENET1K_V1" in models["torchvision:resnet18"]["description"]
    assert str(torch_home[0]) not in str(models)  # no path reaches the page


def test_cached_model_predicts_and_explains_as_the_python_api(client: TestClient) -> None:
    import perspicio
    from perspicio import zoo
    from perspicio.zoo.sources import resolve_model

    zm = resolve_model("torchvision:resnet18", device="cpu")
    x = zm.preprocess(zoo.sample("chelsea"))
    with torch.no_grad():
        probs = zm.model(x).softmax(dim=1)[0]
    top = client.post(
        "/api/predict", data={"model": "torchvision:resnet18", "sample": "chelsea"}
    ).json()["top"]
    ref = probs.topk(5)
    assert [t["index"] for t in top] == ref.indices.tolist()
    np.testing.assert_allclose([t["probability"] for t in top], ref.values.tolist(), rtol=1e-5)
    layers = client.get("/api/layers", params={"model": "torchvision:resnet18"}).json()
    assert layers["default"] == "layer4"
    r = client.post(
        "/api/explain",
        data={
            "model": "torchvision:resnet18",
            "sample": "chelsea",
            "methods": "gradcam",
            "target": "3",
        },
    ).json()
    e = perspicio.explain(zm, x, method="gradcam", target=3)
    np.testing.assert_allclose(
        values_of(r["methods"][0]), e.attributions[0].sum(0).numpy(), rtol=1e-4, atol=1e-6
    )
    assert "--model torchvision:resnet18" in r["cli"]
    tm = resolve_model("timm:resnet18.tv_in1k", device="cpu")
    with torch.no_grad():
        tprobs = tm.model(tm.preprocess(zoo.sample("chelsea"))).softmax(dim=1)[0]
    ttop = client.post(
        "/api/predict", data={"model": "timm:resnet18.tv_in1k", "sample": "chelsea"}
    ).json()["top"]
    assert [t["index"] for t in ttop] == tprobs.topk(5).indices.tolist()


def test_a_checkpoint_that_is_not_plain_tensors_is_refused(client: TestClient, torch_home) -> None:
    _, marker = torch_home
    r = client.post("/api/predict", data={"model": "torchvision:resnet34", "sample": "chelsea"})
    assert_error(r, 422, "could not be read as plain tensors", "weights_only=True")
    assert "<torch hub cache>/checkpoints/resnet34-" in r.json()["error"]
    assert str(torch_home[0]) not in r.text  # the server's folders stay on the server
    r = client.post("/api/predict", data={"model": "timm:resnet34.tv_in1k", "sample": "chelsea"})
    assert_error(r, 422, "could not be read as plain tensors")
    assert not marker.exists()


def test_nothing_is_listed_without_a_cache(tmp_path: Path, monkeypatch) -> None:
    from perspicio.serve.cached import torchvision_cached

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torchvision_cached() == {}
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "hub" / "checkpoints" / hub_file("alexnet")).write_bytes(b"")
    assert list(torchvision_cached()) == ["torchvision:alexnet"]
