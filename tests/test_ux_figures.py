"""Figures of issue 19: signed maps diverging around zero, unsigned sequential, a colorbar per
map, titles saying logit (or the channel of a neuron method), no empty grid slots."""

from __future__ import annotations

import torch

import perspicio
from perspicio.viz.plots import (
    SIGNED_CMAP,
    UNSIGNED_CMAP,
    comparison_figure,
    explanation_figure,
    is_signed,
)


def _colorbars(fig):
    return [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]


def test_signed_and_unsigned_maps_get_their_own_scales(tiny_cnn, tiny_input) -> None:
    cam = perspicio.explain(tiny_cnn, tiny_input, method="gradcam")
    ig = perspicio.explain(tiny_cnn, tiny_input, method="integrated_gradients")
    assert not is_signed(cam.attributions[0]) and is_signed(ig.attributions[0])
    fig = comparison_figure([cam, ig], image=tiny_input[0])
    bars = _colorbars(fig)
    assert len(bars) == 2
    cmaps = [b._colorbar.cmap.name for b in bars]
    lows = [b._colorbar.norm.vmin for b in bars]
    assert cmaps == [UNSIGNED_CMAP, SIGNED_CMAP] and lows == [0, -1]
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    # a bare nn.Module: what its outputs are is not known, so the score is called the model's output
    assert any("output" in t for t in titles) and not any("score" in t for t in titles)
    fig = comparison_figure([cam.with_score_unit("logit", [0.25, 0.5])], image=tiny_input[0])
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert any(f"logit {float(cam.scores[0]):.4g}, probability 0.250" in t for t in titles)


def test_comparison_grid_has_no_empty_slots(tiny_cnn, tiny_input) -> None:
    exps = [
        perspicio.explain(tiny_cnn, tiny_input, method=m)
        for m in ("gradcam", "saliency", "gradcampp", "xgradcam", "hirescam")
    ]
    fig = comparison_figure(exps, image=tiny_input[0])
    images = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    assert len(images) == 6  # the input and five maps: a 2 x 3 grid, nothing empty


def test_neuron_maps_are_titled_by_channel(tiny_cnn, tiny_input) -> None:
    n = perspicio.explain(tiny_cnn, tiny_input, method="neuron_gradient", layer="conv2", neuron=3)
    fig = explanation_figure(n, image=tiny_input[0])
    titles = " ".join(ax.get_title() for ax in fig.axes)
    assert "channel 3 of conv2" in titles and "class" not in titles
    assert torch.is_tensor(n.attributions)


def test_overlay_keeps_negative_evidence_of_signed_maps() -> None:
    import numpy as np

    from perspicio.viz.overlay import overlay

    attr = torch.tensor([[[-1.0, 0.0, 1.0]]])
    px = np.asarray(overlay(attr))[0]
    assert not np.array_equal(px[0], px[1])  # -1 and 0 differ (a clipped scale paints both alike)
    assert px[0][2] > px[0][0] and px[2][0] > px[2][2]  # negative blue, positive red
    cam = torch.tensor([[[0.0, 0.5, 1.0]]])
    assert np.asarray(overlay(cam)).shape == (1, 3, 3)
