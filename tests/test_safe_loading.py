"""Files from caches are data, never code: planted pickles whose __reduce__ would run a payload
must not run it (tabular demo cache, torchvision and timm hub checkpoints)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from perspicio.errors import ModelError
from perspicio.zoo.sources import resolve_model


class Payload:
    """Unpickling this calls Path.touch(marker): the file appears iff the pickle was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def plant_pickle(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(Payload(marker)))


def plant_torch_checkpoint(path: Path, marker: Path) -> None:
    """A torch.save zip checkpoint (what a hub file looks like) whose pickle carries the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"fc.bias": torch.zeros(3), "evil": Payload(marker)}, path)


def test_payload_is_live(tmp_path):
    # the planted files are real exploits: plain unpickling runs them
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.exists()


# ----------------------------------------------------------------------------- tabular cache


@pytest.mark.parametrize("dataset", ["breast_cancer", "diabetes"])
def test_tabular_gbm_never_unpickles_the_cache(dataset, tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    import sklearn
    from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor

    from perspicio.zoo import tabular

    cache = tmp_path / "cache"
    monkeypatch.setenv("PERSPICIO_CACHE", str(cache))
    marker = tmp_path / "pwned"
    stem = f"{dataset}_gbm_seed0_v{tabular.CACHE_VERSION}_sklearn{sklearn.__version__}"
    for name in (stem + ".pkl", stem + ".pt", stem + ".json", stem + ".npz", "gbm.pkl"):
        plant_pickle(cache / "tabular" / name, marker)
    planted = {p: p.read_bytes() for p in (cache / "tabular").iterdir()}
    demo = tabular.load_tabular(dataset, "gbm")
    assert not marker.exists(), "load_tabular executed a pickle from the cache"
    # the same model the old cache held: scikit-learn's estimator trained with random_state=seed
    cls = GradientBoostingClassifier if demo.task == "classification" else GradientBoostingRegressor
    ref = cls(n_estimators=100, max_depth=3, learning_rate=0.1, random_state=0).fit(demo.X_train, demo.y_train)
    expected = ref.predict_proba(demo.X_test) if demo.task == "classification" else ref.predict(demo.X_test)[:, None]
    np.testing.assert_array_equal(demo.predict(demo.X_test), expected)
    again = tabular.load_tabular(dataset, "gbm")
    np.testing.assert_array_equal(again.predict(demo.X_test), demo.predict(demo.X_test))
    assert not marker.exists()
    assert {p: p.read_bytes() for p in (cache / "tabular").iterdir()} == planted  # nothing new cached


def test_tabular_mlp_refuses_a_pickled_cache_file(tmp_path, monkeypatch):
    pytest.importorskip("sklearn")
    import sklearn

    from perspicio.zoo import tabular

    cache = tmp_path / "cache"
    monkeypatch.setenv("PERSPICIO_CACHE", str(cache))
    reference = tabular.load_tabular("diabetes", "mlp", cache=False)
    marker = tmp_path / "pwned"
    path = cache / "tabular" / f"diabetes_mlp_seed0_v{tabular.CACHE_VERSION}_sklearn{sklearn.__version__}.pt"
    plant_torch_checkpoint(path, marker)
    demo = tabular.load_tabular("diabetes", "mlp")
    assert not marker.exists()
    np.testing.assert_array_equal(demo.predict(demo.X_test), reference.predict(reference.X_test))


# ----------------------------------------------------------------------------- torchvision hub cache


def test_torchvision_checkpoint_loaded_as_tensors_only(hub_dir, tmp_path):
    tvm = pytest.importorskip("torchvision.models")
    fake = tvm.resnet18(weights=None)
    with torch.no_grad():
        fake.fc.bias.normal_(generator=torch.Generator().manual_seed(0))
    ckpt = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(fake.state_dict(), ckpt)
    zm = resolve_model("torchvision:resnet18")
    for key, value in fake.state_dict().items():
        assert torch.equal(zm.model.state_dict()[key], value), key
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(zm.model(x), fake.eval()(x))
    assert sorted(p.name for p in hub_dir.rglob("*.*")) == ["resnet18-f37072fd.pth"]  # nothing downloaded


@pytest.mark.parametrize("weights_tag,filename", [("", "resnet18-f37072fd.pth"),
                                                  (".IMAGENET1K_V1", "resnet18-f37072fd.pth")])
def test_torchvision_refuses_a_pickle_payload(hub_dir, tmp_path, weights_tag, filename):
    pytest.importorskip("torchvision")
    marker = tmp_path / "pwned"
    plant_torch_checkpoint(hub_dir / "checkpoints" / filename, marker)
    with pytest.raises(ModelError, match="weights_only=True") as exc:
        resolve_model(f"torchvision:resnet18{weights_tag}")
    assert not marker.exists(), "the hub checkpoint's pickle was executed"
    assert filename in str(exc.value) and "never unpickles" in str(exc.value)
    # a legacy (non-zip) pickle file is refused the same way
    plant_pickle(hub_dir / "checkpoints" / filename, marker)
    with pytest.raises(ModelError, match="weights_only=True"):
        resolve_model(f"torchvision:resnet18{weights_tag}")
    assert not marker.exists()


def test_torchvision_loader_is_restored_after_the_build(hub_dir):
    pytest.importorskip("torchvision")
    import torchvision.models._api as api

    before = api.load_state_dict_from_url
    tvm = pytest.importorskip("torchvision.models")
    ckpt = hub_dir / "checkpoints" / "resnet18-f37072fd.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(tvm.resnet18(weights=None).state_dict(), ckpt)
    resolve_model("torchvision:resnet18")
    assert api.load_state_dict_from_url is before


# ----------------------------------------------------------------------------- timm


def test_timm_refuses_a_pickle_payload(hub_dir, tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    hf = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hf, "try_to_load_from_cache", lambda *a, **k: None)
    url = timm.models.get_pretrained_cfg("resnet18").url
    marker = tmp_path / "pwned"
    plant_torch_checkpoint(hub_dir / "checkpoints" / os.path.basename(url), marker)
    with pytest.raises(ModelError):
        resolve_model("timm:resnet18")
    assert not marker.exists()
