"""The Explanation object: immutable, indexable, honest about what it holds, saved atomically."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from perspicio import Explanation
from perspicio.errors import OptionError


def _exp(shape):
    n = shape[0]
    return Explanation(
        attributions=torch.arange(float(np.prod(shape))).reshape(shape),
        method="test",
        scores=torch.arange(float(n)),
        targets=torch.arange(n),
        inputs=torch.zeros(shape),
        target_names=tuple(f"c{i}" for i in range(n)),
        options={"a": 1},
    )


def test_immutable_and_indexing():
    e = _exp((3, 1, 4, 4))
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.method = "x"
    with pytest.raises(TypeError):
        e.options["a"] = 2
    one = e[1]
    assert len(one) == 1 and one.targets.tolist() == [1] and one.target_names == ("c1",)
    assert torch.equal(one.attributions, e.attributions[1:2])


def test_save_image_writes_png_npy_json(tmp_path):
    e = _exp((2, 1, 8, 8))
    files = e.save(tmp_path / "out" / "x")
    names = sorted(p.name for p in files)
    assert names == ["x.json", "x.npy", "x_0.png", "x_1.png"]
    assert np.array_equal(np.load(tmp_path / "out" / "x.npy"), e.attributions.numpy())
    assert json.loads((tmp_path / "out" / "x.json").read_text())["targets"] == [0, 1]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_save_tabular_has_no_png_and_overlay_refuses(tmp_path):
    e = _exp((2, 5))
    files = e.save(tmp_path / "t")
    assert sorted(p.name for p in files) == ["t.json", "t.npy"]
    assert e._repr_png_() is None
    with pytest.raises(OptionError, match="image attributions"):
        e.overlay()


def test_failed_save_leaves_nothing(tmp_path):
    e = _exp((1, 1, 4, 4))
    with pytest.raises(OptionError):
        e.save(tmp_path / "bad", format="nope")
    assert list(tmp_path.iterdir()) == []
