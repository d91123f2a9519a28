"""The completeness metric on LRP (issue 19): LRP has no baseline, it conserves its output
relevance; the metric measures that instead of reporting n/a while the docs say LRP conserves."""

from __future__ import annotations

import pytest
import torch

import perspicio
from perspicio.metrics import get as get_metric
from perspicio.metrics.base import NotApplicable


def test_completeness_of_lrp_is_its_conservation(tiny_cnn, tiny_input) -> None:
    exp = perspicio.explain(tiny_cnn, tiny_input, method="lrp")
    assert exp.base_value is None
    res = get_metric("completeness")()(tiny_cnn, tiny_input, exp)
    total = exp.attributions.double().flatten(1).sum(1)
    expected = (total - exp.extras["output_relevance"].double()).abs()
    assert torch.allclose(res.scores, expected)
    assert torch.allclose(res.details["delta_output"].double(), exp.extras["output_relevance"].double())


def test_completeness_of_a_cam_is_still_not_applicable(tiny_cnn, tiny_input) -> None:
    exp = perspicio.explain(tiny_cnn, tiny_input, method="gradcam")
    with pytest.raises(NotApplicable, match="output relevance"):
        get_metric("completeness")()(tiny_cnn, tiny_input, exp)
