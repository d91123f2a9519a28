"""Incremental inference (core/incremental.py): copies that differ from one image inside a box
must give the same outputs as the ordinary batch, for every kind of layer the interpreter
follows and for the ones it hands back to the dense path."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import perspicio.core.incremental as inc
from perspicio import explain
from perspicio.core import caches
from perspicio.core.batching import Engine


class SameConv(nn.Conv2d):
    """TensorFlow 'same' padding through F.pad (asymmetric for stride 2), as the bundled model."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]), (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(F.pad(x, pads))


class Block(nn.Module):
    def __init__(self, c: int, inplace: bool) -> None:
        super().__init__()
        self.expand = nn.Conv2d(c, 2 * c, 1)
        self.dw = nn.Conv2d(2 * c, 2 * c, 3, padding=2, dilation=2, groups=2 * c)
        self.project = nn.Conv2d(2 * c, c, 1, bias=False)
        self.act = nn.ReLU6(inplace=inplace)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.expand(x))
        y = F.hardswish(self.dw(y)) * 0.5 - 0.1
        return x + self.project(y)


class Net(nn.Module):
    def __init__(self, inplace: bool = False, extra: str = "") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stem = SameConv(3, 8, 3, stride=2, padding=0)
        self.b1 = Block(8, inplace)
        self.down = nn.Conv2d(8, 12, 5, stride=2, padding=2)
        self.b2 = Block(12, inplace)
        self.scale = nn.Parameter(torch.rand(1, 12, 1, 1, generator=g) + 0.5)
        self.pos = nn.Parameter(torch.randn(1, 12, 16, 16, generator=g) * 0.1)
        self.head = nn.Linear(12, 5)
        self.extra = extra
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x), inplace=True)
        x = self.b1(x)
        x = self.down(x)
        if self.extra == "relu_":
            x.relu_()
        elif self.extra == "roll":
            x = torch.roll(x, 1, dims=-1)
        elif self.extra == "pos":
            x = x + self.pos  # varies over space: handled densely
        x = self.b2(x) * self.scale
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _boxes(gen: torch.Generator, n: int, size: int, h: int, w: int) -> tuple[list[int], list[int]]:
    rows = torch.randint(0, size - h + 1, (n,), generator=gen).tolist()
    cols = torch.randint(0, size - w + 1, (n,), generator=gen).tolist()
    rows[:2], cols[:2] = [0, size - h], [size - w, 0]  # both borders
    return rows, cols


@pytest.mark.parametrize("extra", ["", "relu_", "roll", "pos"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_boxes_equal_dense_batch(extra: str, channels_last: bool, inplace: bool) -> None:
    net = Net(inplace, extra).eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 64, 64, generator=gen)
    rows, cols = _boxes(gen, 7, 64, 9, 13)
    data = torch.randn(7, 3, 9, 13, generator=gen)
    if channels_last:
        x, data = x.contiguous(memory_format=torch.channels_last), data.contiguous(memory_format=torch.channels_last)
    x_before = x.clone()
    dense = inc.Boxes(x, data, rows, cols, inc.BaseCache()).dense()
    for r, c, d, full in zip(rows, cols, data, dense):  # the dense batch itself is right
        assert torch.equal(full[:, r:r + 9, c:c + 13], d)
    with torch.no_grad():
        ref = net(dense)
        cache = inc.BaseCache()
        if extra == "relu_":  # an in-place op on a copy cannot be followed: the caller goes dense
            with pytest.raises(inc.Unsupported):
                inc.evaluate_boxes(net, x, data, rows, cols, cache)
            return
        for _ in range(2):  # the second batch reuses the cached activations of the unchanged image
            out = inc.evaluate_boxes(net, x, data, rows, cols, cache)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(x, x_before)


def test_box_arithmetic_against_every_output_position() -> None:
    # a single convolution: exactly the outputs whose receptive field meets the box change
    for k, s, p, d in [(3, 1, 1, 1), (3, 2, 1, 1), (5, 2, 2, 1), (3, 1, 2, 2), (4, 3, 0, 1), (1, 2, 0, 1)]:
        n_in = 23
        n_out = (n_in + 2 * p - d * (k - 1) - 1) // s + 1
        for start in range(0, n_in - 4):
            starts, size = inc._out_boxes([start], 4, n_out, k, s, p, d)
            touched = [o for o in range(n_out) if any(start <= o * s - p + d * j < start + 4 for j in range(k))]
            lo, hi = starts[0], starts[0] + size - 1
            assert lo <= min(touched) and max(touched) <= hi and 0 <= lo and hi < n_out, (k, s, p, d, start)
            assert size == max(touched) - min(touched) + 1


def test_engine_evaluate_around_and_verification(monkeypatch) -> None:
    net = Net().eval()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 64, 64, generator=gen)
    batch = x.expand(6, 3, 64, 64).clone()
    for i in range(6):
        batch[i, :, 8 * i:8 * i + 6, 40 - 5 * i:48 - 5 * i] = 0.0
    with torch.no_grad():
        ref = net(batch)
        eng = Engine(net, batch_size=6)
        torch.testing.assert_close(eng.evaluate(batch, around=(x,)), ref, atol=1e-5, rtol=1e-5)
    assert eng.stats()["incremental_samples"] == 6 and eng.forwards == 6

    # an interpreter that got a model wrong is caught on its first batch and switched off
    wrong = Net().eval()
    right = inc.handler

    def wrong_handler(func):
        if func is F.hardswish:
            return lambda f, a, k: inc._pointwise(torch.sigmoid, a, {})
        return right(func)

    monkeypatch.setattr(inc, "handler", wrong_handler)
    with torch.no_grad():
        ref = wrong(batch)
        eng = Engine(wrong, batch_size=6)
        torch.testing.assert_close(eng.evaluate(batch, around=(x,)), ref, atol=1e-6, rtol=1e-6)
    assert caches.entry("incremental verification", wrong) is False and "incremental_samples" not in eng.stats()


def test_occlusion_and_ablation_on_bundled_model(zoo_model, chelsea_batch, monkeypatch) -> None:
    x = chelsea_batch[..., 32:160, 48:176]
    runs = {}
    for flag in (True, False):
        monkeypatch.setattr(inc, "INCREMENTAL", flag)
        runs[flag] = (explain(zoo_model, x, method="occlusion", window=16, stride=16, target=285),
                      explain(zoo_model, x, method="feature_ablation", feature_mask="patch:16", target=285))
    for fast, dense in zip(runs[True], runs[False]):
        assert fast.provenance["incremental_samples"] > 0 and "incremental_samples" not in dense.provenance
        scale = dense.attributions.abs().max()
        torch.testing.assert_close(fast.attributions / scale, dense.attributions / scale, atol=1e-5, rtol=0)


def test_engine_splits_mixed_batches(monkeypatch) -> None:
    # copies close to the sample, copies close to the baseline and global changes in one batch
    net = Net().eval()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 64, 64, generator=gen)
    baseline = torch.zeros_like(x)
    batch = torch.stack([x.clone(), baseline.clone(), x.clone(), x * 0.5, baseline.clone(), x.clone()])
    batch[0, :, 3:10, 50:60] = 0.0  # one patch removed
    batch[1, :, 40:50, 2:9] = x[:, 40:50, 2:9]  # one patch kept
    batch[4, :, 60:64, 60:64] = x[:, 60:64, 60:64]  # a corner kept
    # batch[3] differs everywhere; batch[2] and batch[5] equal the sample
    with torch.no_grad():
        ref = net(batch)
        eng = Engine(net, batch_size=8)  # groups of 3 and 2 local copies: too small, one dense batch
        torch.testing.assert_close(eng.evaluate(batch, around=(x, baseline)), ref, atol=1e-5, rtol=1e-5)
        assert "incremental_samples" not in eng.stats() and eng.forwards == 6
        monkeypatch.setattr(inc, "MIN_GROUP", 1)
        eng = Engine(net, batch_size=8)
        torch.testing.assert_close(eng.evaluate(batch, around=(x, baseline)), ref, atol=1e-5, rtol=1e-5)
    assert eng.stats()["incremental_samples"] == 5 and eng.forwards == 6


def test_batch_dependent_constants_are_not_cached() -> None:
    # a per-channel constant computed from the batch itself changes from batch to batch: the cached
    # base activation must not be reused for it
    class BatchCentred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            y = y - y.mean(dim=(0, 2, 3), keepdim=True)
            return F.relu(y).mean(dim=(2, 3))

    net = BatchCentred().eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(1, 3, 32, 32, generator=gen)
    cache = inc.BaseCache()
    with torch.no_grad():
        for scale in (1.0, 5.0):
            rows, cols = [0, 10, 20], [5, 15, 25]
            data = torch.randn(3, 3, 6, 6, generator=gen) * scale
            out = inc.evaluate_boxes(net, x, data, rows, cols, cache)
            ref = net(inc.Boxes(x, data, rows, cols, inc.BaseCache()).dense())
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_models_without_convolutions_run_dense_batches() -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4)).eval()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(8))
    e = explain(net, x, method="occlusion", window=4, stride=4, target=2)
    assert "incremental_samples" not in e.provenance and e.provenance["forward_samples"] == 17


def test_slower_interpreter_is_measured_and_dropped(monkeypatch) -> None:
    # batch 1 warms up, batch 2 runs dense and batch 3 incremental, both timed; when the
    # interpreter is slower for this model and box size, later batches run dense
    import time

    real = inc.evaluate_boxes

    def slow(*args, **kwargs):
        time.sleep(0.2)
        return real(*args, **kwargs)

    monkeypatch.setattr(inc, "evaluate_boxes", slow)
    net = Net().eval()
    x = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(9))
    eng = Engine(net, batch_size=4)
    data = torch.zeros(4, 3, 8, 8)
    with torch.no_grad():
        outs = [eng.evaluate_boxes(x, data, [0, 8, 16, 24], [0, 8, 16, 24]) for _ in range(5)]
        ref = net(inc.Boxes(x[None], data, [0, 8, 16, 24], [0, 8, 16, 24], inc.BaseCache()).dense())
    for out in outs:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert caches.entry("incremental timing", net, ((1, 3, 64, 64), (8, 8))) is False
    assert eng.stats()["incremental_samples"] == 8  # batches 1 and 3 only
