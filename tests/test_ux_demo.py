"""The default demo of ``perspicio explain`` (issue 19): families that differ, coinciding maps
named, targets labelled as logit/probability or as channels."""

from __future__ import annotations

import perspicio
from perspicio.cli.explain import DEMO_METHODS, coinciding, describe_target
from perspicio.core.registry import METHODS


def test_demo_methods_are_one_per_family() -> None:
    families = [METHODS.get(m).family for m in DEMO_METHODS]
    assert (
        len(set(families)) == 5 and len(DEMO_METHODS) == 6
    )  # two CAMs: gradient-based and Score-CAM
    assert "scorecam" in DEMO_METHODS and "integrated_gradients" in DEMO_METHODS


def test_coinciding_names_maps_equal_up_to_a_factor(tiny_cnn, tiny_input) -> None:
    g = perspicio.explain(tiny_cnn, tiny_input, method="gradcam")
    s = perspicio.explain(tiny_cnn, tiny_input, method="saliency")
    scaled = g.replace(method="scaled", attributions=g.attributions * 7.0)
    assert coinciding([g, s, scaled]) == [("gradcam", "scaled")]


def test_targets_are_described_with_their_unit(tiny_cnn, tiny_input) -> None:
    e = perspicio.explain(tiny_cnn, tiny_input[:1], method="saliency", target=1)
    probs = tiny_cnn(tiny_input[:1]).softmax(1)[0].detach()
    # a bare module's output is not known to be a logit; the CLI records the unit it reads
    assert describe_target(e, probs).startswith(f"target 1 (output {float(e.scores[0]):.4g}")
    e = e.with_score_unit("logit", [float(probs[1])])
    text = describe_target(e, probs)
    assert (
        f"logit {float(e.scores[0]):.4g}" in text and f"probability {float(probs[1]):.3f}" in text
    )
    n = perspicio.explain(
        tiny_cnn, tiny_input[:1], method="neuron_gradient", layer="conv2", neuron=3
    )
    assert describe_target(n, probs).startswith("channel 3 of layer")


def test_hidden_progress_bars_leave_no_blank_lines(capsys) -> None:
    from perspicio.core.batching import progress_bar

    with progress_bar(True, 3, "work") as advance:  # pytest's captured output is not a terminal
        advance(3)
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
