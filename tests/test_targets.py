"""core/targets.py: target slicing, row scoring and class names, each in one place."""

from __future__ import annotations

import pytest
import torch

import perspicio
from perspicio.core.targets import ResolvedTarget, resolve_target, row_scores, slice_target
from perspicio.errors import TargetError


def test_slice_target() -> None:
    assert slice_target([3, 4, 5], 1, 3, 3) == [4, 5]
    assert slice_target((3, 4, 5), 0, 1, 3) == (3,)
    assert slice_target(torch.tensor([3, 4, 5]), 1, 2, 3).tolist() == [4]
    assert slice_target([3], 1, 2, 3) == [3]  # one target for every input
    t0 = torch.tensor(7)
    assert slice_target(t0, 1, 2, 3) is t0  # a 0-d tensor is one target
    assert slice_target("tabby", 1, 2, 3) == "tabby"
    assert slice_target([3], 0, 1, 1) == [3]


def test_row_scores() -> None:
    out = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    tgt = resolve_target([2, 0], out)
    assert row_scores(tgt, out).tolist() == [3.0, 4.0]
    # rows 0..3 are copies of samples 0, 0, 1, 1
    four = out.repeat_interleave(2, dim=0)
    assert row_scores(tgt, four, torch.tensor([0, 0, 1, 1])).tolist() == [3.0, 3.0, 4.0, 4.0]
    summed = resolve_target(lambda o: o.sum(1), out)
    assert row_scores(summed, out).tolist() == [6.0, 15.0]
    bad = ResolvedTarget(fn=lambda o: o, indices=None, description="bad")
    with pytest.raises(TargetError, match="one scalar per row"):
        row_scores(bad, out)


LABELS = [f"class_{i}" for i in range(5)]


@pytest.mark.parametrize("method", ["saliency", "lrp", "deeplift", "occlusion", "integrated_gradients", "smoothgrad"])
def test_method_call_names_the_class_targets(tiny_cnn, method: str) -> None:
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    e = perspicio.explain(tiny_cnn, x, method=method, target=[3, 1], labels=LABELS)
    assert e.targets.tolist() == [3, 1]
    assert e.target_names == ("class_3", "class_1")
    e = perspicio.explain(tiny_cnn, x, method=method, target=[3, 1])
    assert e.target_names is None  # no labels, no names


@pytest.mark.parametrize("method", ["neuron_gradient", "neuron_integrated_gradients"])
def test_neuron_methods_have_no_class_names(tiny_cnn, method: str) -> None:
    """Their targets are the explained channels, not classes: labels must not name them."""
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    e = perspicio.explain(tiny_cnn, x, method=method, labels=LABELS)
    assert e.targets is not None and e.target_names is None
