"""compare: a cheap default metric set, a plan before the work, a line per finished step."""

from __future__ import annotations

import re

import pytest
import torch

from perspicio.core.registry import METRICS
from perspicio.metrics import compare
from perspicio.metrics.evaluate import (
    DEFAULT_METRICS,
    EXPENSIVE_METRICS,
    _make_metric,
    resolve_metrics,
)
from perspicio.metrics.plan import AUTO_STEPS_ESTIMATE, method_passes


def test_default_metrics_are_cheap_and_expensive_ones_are_opt_in():
    assert set(DEFAULT_METRICS).isdisjoint(EXPENSIVE_METRICS)
    assert set(EXPENSIVE_METRICS) <= set(METRICS.names())
    for name in DEFAULT_METRICS:
        forward, again = _make_metric(name, {}, 0, None).cost()
        assert again == 0, f"{name} re-explains: not cheap"
        assert forward <= 100
    for name in EXPENSIVE_METRICS:
        forward, again = _make_metric(name, {}, 0, None).cost()
        assert again > 0 or forward >= 9, name
    assert "max_sensitivity" in resolve_metrics("default,max_sensitivity")  # opt in by name


@pytest.mark.parametrize("name,options", [("deletion", {"steps": 10}), ("insertion", {"steps": 7}),
                                          ("average_drop", {}), ("faithfulness_correlation", {"runs": 5}),
                                          ("infidelity", {"samples": 6}), ("road", {"percentages": (0.2, 0.5)}),
                                          ("sparseness", {}), ("completeness", {"baseline": "zero"})])
def test_metric_cost_states_the_passes_it_really_runs(name, options, tiny_cnn, tiny_input):
    import perspicio

    x = tiny_input[:3]
    exp = perspicio.explain(tiny_cnn, x, method="integrated_gradients", steps=32)
    scorer = _make_metric(name, dict(options), 0, None)
    res = scorer(tiny_cnn, x, exp)
    forward, again = scorer.cost()
    assert again == 0
    # the engine counts the samples it evaluated beyond the first forward of the inputs
    assert res.details["passes"]["forward_samples"] - len(x) == forward * len(x)


def test_method_pass_estimates_follow_their_options(tiny_input):
    from perspicio.core.registry import METHODS

    def passes(name, **opts):
        e = METHODS.get(name)
        return method_passes(e.cls, e.family, opts, tiny_input)

    assert passes("gradcam") == (1, 1)
    assert passes("integrated_gradients") == (AUTO_STEPS_ESTIMATE, AUTO_STEPS_ESTIMATE)  # steps="auto"
    assert passes("integrated_gradients", steps=8) == (8, 8)
    assert passes("rise", budget=300) == (300, 0)
    h, w = tiny_input.shape[-2:]
    assert passes("occlusion", window=4, stride=2) == (((h - 4) // 2 + 1) * ((w - 4) // 2 + 1) + 1, 0)


def test_compare_prints_its_plan_and_one_line_per_finished_step(tiny_cnn, tiny_input, capsys):
    comp = compare(tiny_cnn, tiny_input[:2], methods="gradcam,saliency", metrics="deletion,sparseness",
                   metric_options={"deletion": {"steps": 8}}, progress=True)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("compare: 2 methods x 2 metrics on 2 inputs") and "measured" in lines[0]
    assert "gradcam 1f+1b" in lines[1] and "est." in lines[1]
    assert "deletion 8f" in lines[2]
    assert "estimated total" in lines[3] and "max_sensitivity" in lines[3]
    steps = [ln for ln in lines if ln.startswith("compare [")]
    assert [int(re.match(r"compare \[(\d+)/6\]", s).group(1)) for s in steps] == list(range(1, 7))
    assert "gradcam: explained in" in steps[0] and "gradcam deletion = " in steps[1]
    assert lines[-1].startswith("compare: done in")
    assert comp.value("gradcam", "deletion") == comp.value("gradcam", "deletion")  # computed


def test_compare_is_silent_without_progress(tiny_cnn, tiny_input, capsys):
    compare(tiny_cnn, tiny_input[:1], methods="gradcam", metrics="sparseness")
    assert capsys.readouterr().err == ""


def test_plan_measurement_leaves_the_model_untouched(tiny_cnn, tiny_input, assert_no_hooks):
    tiny_cnn.train()
    before = {k: v.clone() for k, v in tiny_cnn.state_dict().items()}
    compare(tiny_cnn, tiny_input[:1], methods="gradcam", metrics="sparseness", progress=True)
    assert tiny_cnn.training
    assert all(torch.equal(before[k], v) for k, v in tiny_cnn.state_dict().items())
    assert all(p.grad is None for p in tiny_cnn.parameters())
    assert_no_hooks(tiny_cnn)
