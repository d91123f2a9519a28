"""Occlusion, feature ablation, RISE, maskers: exact values, Captum oracle, lifecycle, errors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import perspicio
from perspicio.core.baselines import gaussian_blur
from perspicio.core.maskers import check_feature_mask, image_feature_mask
from perspicio.errors import InputError, ModelError, OptionError


class Linear(nn.Module):
    """f(x) = x . w (flattened) per sample, one output."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.flatten(1) * self.w.flatten()).sum(1, keepdim=True)


@pytest.fixture(scope="module")
def small_image(chelsea_batch):
    """chelsea at 64 x 64 (the model is fully convolutional): cheap for many evaluations."""
    return F.interpolate(chelsea_batch, size=(64, 64), mode="bilinear", align_corners=False)


# ----------------------------------------------------------------------------- exact values


def test_occlusion_exact_on_linear_model():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1, 6, 6, generator=g)
    x = torch.randn(2, 1, 6, 6, generator=g)
    model = Linear(w)
    # window 1: attribution = w * x exactly
    e = perspicio.explain(model, x, method="occlusion", window=1, target=0)
    torch.testing.assert_close(e.attributions, x * w, rtol=0, atol=1e-6)
    # overlapping windows: each window's drop is the sum of w*x over it; each pixel averages the
    # drops of the windows covering it. Starts are 0, s, 2s, ... up to ceil((D - w) / s) steps, so
    # with window 4 and stride 3 on 6 pixels the second window (start 3) is clipped at the border.
    wx = (x * w)[0, 0]
    for window, stride, starts in ((2, 1, range(5)), (4, 3, (0, 3))):
        e = perspicio.explain(model, x, method="occlusion", window=window, stride=stride, target=0)
        total = torch.zeros(6, 6)
        count = torch.zeros(6, 6)
        for i in starts:
            for j in starts:
                total[i:i + window, j:j + window] += wx[i:i + window, j:j + window].sum()
                count[i:i + window, j:j + window] += 1
        torch.testing.assert_close(e.attributions[0, 0], total / count, rtol=0, atol=1e-5)
        assert e.provenance["evaluations"] == 2 * len(starts) ** 2


def test_feature_ablation_exact_with_groups_and_background():
    w = torch.tensor([1.0, -2.0, 3.0, 0.5])
    f = lambda a: a @ w.numpy()  # noqa: E731 - a black-box numpy function
    x = np.array([[1.0, 2.0, 3.0, 4.0]])
    bg = np.array([[0.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]])
    e = perspicio.explain(f, x, method="feature_ablation", background=bg, feature_mask=[0, 0, 1, 2])
    # removing group {0,1} replaces x0, x1 by each background row: drop = w.(x - mean bg) on the group
    drop01 = 1 * (1 - 1) + -2 * (2 - 1)
    expected = [drop01, drop01, 3 * (3 - 1), 0.5 * (4 - 1)]
    np.testing.assert_allclose(e.attributions[0].numpy(), expected, atol=1e-12)


# ----------------------------------------------------------------------------- Captum oracle


def test_occlusion_equals_captum(zoo_model, small_image):
    """Same windows, same formula; the only differences are float32 rounding from batches of different
    composition (logits of ~10 agree to ~1e-5; the formula itself is exact in test_occlusion_exact_on_linear_model)."""
    captum = pytest.importorskip("captum.attr")
    model = zoo_model.model
    ours = perspicio.explain(zoo_model, small_image, method="occlusion", window=20, stride=16, target=281, batch_size=16)
    ref = captum.Occlusion(model).attribute(small_image, sliding_window_shapes=(3, 20, 20), strides=(3, 16, 16),
                                            target=281, perturbations_per_eval=16)
    torch.testing.assert_close(ours.attributions, ref, rtol=1e-4, atol=1e-4)
    assert ours.provenance["evaluations"] == 16  # starts 0, 16, 32, 48 (clipped) in each spatial dim


def test_feature_ablation_equals_captum(zoo_model, small_image):
    captum = pytest.importorskip("captum.attr")
    mask = image_feature_mask(small_image[0], "slic:10")
    ours = perspicio.explain(zoo_model, small_image, method="feature_ablation", feature_mask=mask, target=281,
                             batch_size=16)
    ref = captum.FeatureAblation(zoo_model.model).attribute(small_image, target=281, feature_mask=mask[None, None],
                                                            perturbations_per_eval=16)
    torch.testing.assert_close(ours.attributions, ref, rtol=1e-4, atol=1e-4)  # float32 batch rounding only


# ----------------------------------------------------------------------------- RISE


def test_rise_masks_and_unbiasedness():
    model = Linear(torch.ones(1, 16, 16))

    class Const(nn.Module):
        def forward(self, x):
            return torch.full((x.shape[0], 1), 2.5)

    x = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    e = perspicio.explain(Const(), x, method="rise", budget=400, cells=4, seed=0, target=0)
    # constant model: saliency = 2.5 * mean(M) / p ~ 2.5 everywhere
    assert abs(float(e.attributions.mean()) - 2.5) < 0.1
    # masks are smooth values in [0, 1] with mean ~ p
    from perspicio.methods import RISE

    rise = RISE(model, cells=4, p=0.3)
    grids = (torch.rand(300, 4, 4, generator=torch.Generator().manual_seed(1)) < 0.3).float()
    shifts = torch.randint(0, 4, (300, 2), generator=torch.Generator().manual_seed(2))
    m = rise.masks(0, 300, grids, shifts, (16, 16))
    assert m.shape == (300, 1, 16, 16) and float(m.min()) >= 0 and float(m.max()) <= 1
    assert abs(float(m.mean()) - 0.3) < 0.03
    assert len(torch.unique(m)) > 10  # bilinear, not binary


def test_rise_finds_the_region_the_model_uses():
    w = torch.zeros(1, 16, 16)
    w[0, :, :6] = 1.0  # the model only reads the left 6 columns
    x = torch.ones(1, 1, 16, 16)
    e = perspicio.explain(Linear(w), x, method="rise", budget=500, cells=4, seed=0, target=0)
    s = e.attributions[0, 0]
    # S = E[f M] / p = E[f] + Cov(f, M) / p: E[f] = 0.5 * 96 = 48 far from the region, more inside it
    assert abs(float(s[:, 12:].mean()) - 48) < 4
    assert float(s[:, :4].mean()) - float(s[:, 12:].mean()) > 5


def test_rise_reproducible_and_chunk_invariant(tiny_cnn, tiny_input):
    a = perspicio.explain(tiny_cnn, tiny_input, method="rise", budget=50, cells=3, seed=4)
    b = perspicio.explain(tiny_cnn, tiny_input, method="rise", budget=50, cells=3, seed=4, batch_size=7)
    c = perspicio.explain(tiny_cnn, tiny_input, method="rise", budget=50, cells=3, seed=5)
    torch.testing.assert_close(a.attributions, b.attributions, rtol=1e-6, atol=1e-6)
    assert not torch.equal(a.attributions, c.attributions)
    assert a.attributions.shape == tiny_input.shape
    assert a.provenance["forward_samples"] == 2 + 2 * 50


# ----------------------------------------------------------------------------- maskers


def test_image_feature_masks():
    img = torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(0)) * 0.1
    img[0, :20] += 1.0  # four flat coloured quadrants the segmenters must separate
    img[1, :, :24] += 1.0
    patch = image_feature_mask(img, "patch:16")
    assert patch.shape == (40, 48) and int(patch.max()) == 3 * 3 - 1
    grid = image_feature_mask(img, "grid:4")
    assert int(grid.max()) == 15
    for spec in ("slic:20", "quickshift", "felzenszwalb"):
        seg = image_feature_mask(img, spec)
        check_feature_mask(seg, (40, 48))  # contiguous ids
        assert seg.shape == (40, 48) and int(seg.max()) >= 3, spec
        assert len(torch.unique(seg[:20, :24])) < len(torch.unique(seg)), spec
    with pytest.raises(OptionError, match="unknown feature_mask"):
        image_feature_mask(img, "superpixels")


def test_baselines(tiny_cnn):
    from perspicio.core.maskers import image_baseline

    img = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(image_baseline(img, "zero"), torch.zeros_like(img))
    torch.testing.assert_close(image_baseline(img, "mean")[:, 0, 0], img.mean(dim=(1, 2)))
    blurred = image_baseline(img, "blur:1.5")
    assert blurred.std() < img.std()
    const = torch.full((1, 3, 5, 5), 2.0)
    torch.testing.assert_close(gaussian_blur(const, 1.0), const)
    torch.testing.assert_close(image_baseline(img, torch.tensor([1.0, 2.0, 3.0]))[:, 4, 4], torch.tensor([1.0, 2.0, 3.0]))


def test_text_masker_and_attributions():
    words = {"great": 2.0, "bad": -3.0}

    def clf(texts):
        return np.array([[sum(words.get(t, 0.0) for t in s.split())] for s in texts])

    e = perspicio.explain(clf, "a great but bad movie", method="feature_ablation", target=0)
    np.testing.assert_allclose(e.attributions[0].numpy(), [0, 2, 0, -3, 0])
    assert e.extras["tokens"][0] == ("a", "great", "but", "bad", "movie")
    e = perspicio.explain(clf, ["great great", "bad"], method="shapley_exact", target=0, mask_token=None)
    np.testing.assert_allclose(e.attributions.numpy(), [[2, 2], [-3, 0]])
    assert e.extras["texts"] == ("great great", "bad")


# ----------------------------------------------------------------------------- bad input and lifecycle


def test_bad_inputs():
    model = Linear(torch.ones(1, 6, 6))
    x = torch.ones(1, 1, 6, 6)
    with pytest.raises(OptionError, match="feature_mask has shape"):
        perspicio.explain(model, x, method="feature_ablation", feature_mask=torch.zeros(5, 5, dtype=torch.long))
    with pytest.raises(OptionError, match="contiguous"):
        perspicio.explain(model, x, method="feature_ablation", feature_mask=torch.arange(36).view(6, 6) * 2)
    with pytest.raises(OptionError, match="window"):
        perspicio.explain(model, x, method="occlusion", window=7)
    with pytest.raises(OptionError, match="stride"):
        perspicio.explain(model, x, method="occlusion", window=2, stride=3)
    with pytest.raises(OptionError, match="budget"):
        perspicio.explain(model, x, method="rise", budget=0)
    with pytest.raises(InputError):
        perspicio.explain(model, torch.ones(1, 6, 6), method="rise")
    with pytest.raises(OptionError, match="baseline"):
        perspicio.explain(model, x, method="feature_ablation", baseline="grey")
    with pytest.raises(OptionError, match="below what feature_ablation needs"):
        perspicio.explain(model, x, method="feature_ablation", feature_mask="grid:2", budget=3)


@pytest.mark.parametrize("method,kw", [
    ("occlusion", {"window": 4, "stride": 4}),
    ("feature_ablation", {"feature_mask": "grid:2"}),
    ("rise", {"budget": 8, "cells": 2}),
    ("kernel_shap", {"feature_mask": "grid:2", "budget": 10}),
    ("shapley_sampling", {"feature_mask": "grid:2", "budget": 10}),
    ("shapley_exact", {"feature_mask": "grid:2"}),
    ("lime", {"feature_mask": "grid:2", "budget": 10}),
])
def test_lifecycle(method, kw, tiny_cnn, tiny_input, assert_no_hooks):
    model = copy.deepcopy(tiny_cnn).train()
    model.conv1.weight.requires_grad_(False)
    grad = torch.ones_like(model.fc.weight)
    model.fc.weight.grad = grad
    x = tiny_input.clone()
    e = perspicio.explain(model, x, method=method, **kw)
    assert e.attributions.shape == x.shape
    assert torch.equal(x, tiny_input)
    assert model.training and model.conv2.training
    assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad
    assert model.fc.weight.grad is grad
    assert_no_hooks(model)

    class Boom(Exception):
        pass

    def explode(mod, args, out):
        if out.shape[0] > 2:
            raise Boom

    handle = model.conv2.register_forward_hook(explode)
    try:
        with pytest.raises(Boom):
            perspicio.explain(model, x, method=method, **kw)
    finally:
        handle.remove()
    assert model.training and model.fc.weight.grad is grad and not model.conv1.weight.requires_grad
    assert_no_hooks(model)


def test_gradient_methods_refuse_black_boxes():
    f = lambda a: a.sum(1, keepdims=True)  # noqa: E731
    with pytest.raises(ModelError, match="black-box"):
        perspicio.explain(f, np.ones((1, 4)), method="gradcam")
