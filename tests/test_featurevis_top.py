"""Top-activating scan: equals a full in-memory sort for any batch size and source; streaming;
bad inputs (empty folder, unreadable and non-image files, channel out of range, layer not reached)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from perspicio.errors import InputError, LayerError, OptionError
from perspicio.featurevis import receptive_field, top_activating
from perspicio.zoo.registry import ZooModel


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.act = nn.ReLU()
        self.unused = nn.Conv2d(4, 4, 1)  # never called in forward
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            for p in [*self.conv.parameters(), *self.head.parameters(), *self.unused.parameters()]:
                p.copy_(torch.randn(p.shape, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).mean(dim=(2, 3)))


def _data(n: int = 37, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 12, 12, generator=g)
    if n > 30:
        x[5] = x[17]  # exact ties: must resolve to the earlier item
        x[30] = x[17]
    return x


def _reference(model: nn.Module, x: torch.Tensor, unit, k: int, reduce: str = "max"):
    with torch.no_grad():
        a = model.act(model.conv(x))
    if isinstance(unit, tuple):
        c, i, j = unit
        v = a[:, c, i, j]
    else:
        flat = a[:, unit].flatten(1)
        v = flat.amax(1) if reduce == "max" else flat.mean(1)
    order = torch.sort(v, descending=True, stable=True).indices[:k]
    return v[order], order


@pytest.mark.parametrize("batch_size", [1, 4, 7, 37, 100])
@pytest.mark.parametrize("unit", [2, (1, 3, 4)])
def test_tensor_scan_equals_full_sort(batch_size: int, unit) -> None:
    model = Net().eval()
    x = _data()
    x0 = x.clone()
    r = top_activating(model, x, "act", unit, k=6, batch_size=batch_size)
    ref_v, ref_i = _reference(model, x, unit, 6)
    assert torch.equal(r.indices, ref_i)
    torch.testing.assert_close(r.values, ref_v, rtol=1e-5, atol=1e-5)  # conv sums differ by batch size in the last bit
    assert torch.equal(r.inputs, x[ref_i])
    assert torch.equal(x, x0)
    assert r.scanned == 37
    assert r.stats["forward_samples"] == 37


def test_ties_break_by_dataset_order_and_reduce_mean() -> None:
    model = Net().eval()
    x = _data()
    r = top_activating(model, x, "act", 0, k=37, batch_size=5)
    pos = {int(i): n for n, i in enumerate(r.indices)}
    assert pos[5] < pos[17] < pos[30] and pos[30] - pos[5] == 2
    r = top_activating(model, x, "act", 3, k=5, batch_size=3, reduce="mean")
    ref_v, ref_i = _reference(model, x, 3, 5, reduce="mean")
    assert torch.equal(r.indices, ref_i)


def test_dataloader_and_patches_follow_receptive_field() -> None:
    model = Net().eval()
    x = _data()
    loader = DataLoader(TensorDataset(x, torch.zeros(len(x))), batch_size=8)
    r = top_activating(model, loader, "act", 2, k=4)
    ref_v, ref_i = _reference(model, x, 2, 4)
    assert torch.equal(r.indices, ref_i)
    rf = receptive_field(model, "act", (3, 12, 12))
    with torch.no_grad():
        a = model.act(model.conv(x[ref_i]))[:, 2]
    for n in range(4):
        flat = int(a[n].flatten().argmax())
        pos = (flat // a.shape[-1], flat % a.shape[-1])
        assert tuple(r.positions[n].tolist()) == pos
        assert r.boxes[n] == rf.box(*pos)
        t, left, b, rt = r.boxes[n]
        assert torch.equal(r.patches[n], x[ref_i[n], :, t:b, left:rt])


def _zoo(model: nn.Module) -> ZooModel:
    from perspicio.zoo import ImagePreprocess

    return ZooModel(model=model, preprocess=ImagePreprocess(size=(12, 12)), labels=["a", "b"], name="net")


def test_folder_skips_and_reports_bad_files(tmp_path) -> None:
    rng = np.random.default_rng(0)
    for i in range(9):
        Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(tmp_path / f"img{i:02d}.png")
    (tmp_path / "broken.png").write_bytes(b"not really a png")
    (tmp_path / "notes.txt").write_text("hello")
    sub = tmp_path / "sub"
    sub.mkdir()
    Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(sub / "deep.jpg")
    zm = _zoo(Net().eval())
    for bs in (1, 3, 50):
        r = top_activating(zm, tmp_path, "act", 1, k=3, batch_size=bs)
        assert r.scanned == 10
        skipped = {p.split("/")[-1] for p, _ in r.skipped}
        assert skipped == {"broken.png", "notes.txt"}
        # reference: the same files loaded by hand
        files = sorted([*tmp_path.glob("img*.png"), sub / "deep.jpg"], key=str)
        x = torch.cat([zm.preprocess(Image.open(f)) for f in files])
        ref_v, ref_i = _reference(zm.model, x, 1, 3)
        assert [s.split("/")[-1] for s in r.sources] == [files[i].name for i in ref_i.tolist()]
        torch.testing.assert_close(r.values, ref_v)
        assert float(r.pixels.min()) >= 0 and float(r.pixels.max()) <= 1


def test_bad_inputs(tmp_path) -> None:
    model = Net().eval()
    x = _data(5)
    with pytest.raises(OptionError, match="channel 9 is out of range.*4 channels"):
        top_activating(model, x, "act", 9)
    with pytest.raises(OptionError, match="out of range"):
        top_activating(model, x, "act", (0, 9, 0))
    with pytest.raises(LayerError, match="not reached"):
        top_activating(model, x, "unused", 0)
    with pytest.raises(LayerError, match="not found"):
        top_activating(model, x, "actt", 0)
    with pytest.raises(InputError, match="empty"):
        top_activating(_zoo(model), tmp_path, "act", 0)
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no image files"):
        top_activating(_zoo(model), tmp_path, "act", 0)
    (tmp_path / "b.png").write_bytes(b"garbage")
    with pytest.raises(InputError, match="could be read"):
        top_activating(_zoo(model), tmp_path, "act", 0)
    with pytest.raises(OptionError, match="preprocess"):
        top_activating(model, tmp_path, "act", 0)
    with pytest.raises(OptionError, match="k must be"):
        top_activating(model, x, "act", 0, k=0)
    with pytest.raises(InputError, match="iterable"):
        top_activating(model, 3.5, "act", 0)


def test_bundled_model_on_photo_crops(zoo_model, assert_no_hooks) -> None:
    """Truncated scan on the bundled model: crops of the sample photos, streamed in chunks."""
    from perspicio.featurevis._data import photo_crops
    from perspicio.zoo import ImagePreprocess

    pre = ImagePreprocess(size=(96, 96))
    x, names = photo_crops(pre, grid=2)
    r1 = top_activating(zoo_model, x, "_blocks.3", 5, k=4, batch_size=4)
    r2 = top_activating(zoo_model, x, "_blocks.3", 5, k=4, batch_size=30)
    assert torch.equal(r1.indices, r2.indices)
    assert r1.field is not None and r1.field.size == (35.0, 35.0)
    assert all(p.shape[-1] <= 35 and p.shape[-2] <= 35 for p in r1.patches)
    assert_no_hooks(zoo_model.model)
    assert not zoo_model.model.training
