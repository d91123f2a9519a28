"""``progress=callable``: every method reports its passes chunk by chunk to a function (what the
web app streams to the page), and bad values are refused clearly."""

from __future__ import annotations

import pytest
import torch

import perspicio
from perspicio.errors import OptionError


@pytest.mark.parametrize(
    ("method", "options", "passes"),
    [
        ("integrated_gradients", {"steps": 8, "batch_size": 3}, 8),
        ("occlusion", {"window": 4, "stride": 4, "batch_size": 5}, None),
        ("kernel_shap", {"budget": 40, "batch_size": 16, "feature_mask": "grid:4"}, None),
    ],
)
def test_a_callable_receives_every_chunk_of_passes(tiny_cnn, tiny_input, method, options, passes):
    calls: list[tuple[int, int, str]] = []
    e = perspicio.explain(
        tiny_cnn, tiny_input[:1], method=method, progress=lambda *a: calls.append(a), **options
    )
    plain = perspicio.explain(tiny_cnn, tiny_input[:1], method=method, **options)
    torch.testing.assert_close(e.attributions, plain.attributions)  # reporting changes nothing
    assert calls, "no progress was reported"
    # each group of passes (one engine call) starts at 0, never decreases and ends at its total,
    # in chunks no larger than the batch
    groups: list[list[tuple[int, int, str]]] = []
    for call in calls:
        if call[0] == 0:
            groups.append([])
        groups[-1].append(call)
    for seq in groups:
        assert len({(t, d) for _, t, d in seq}) == 1 and isinstance(seq[0][2], str) and seq[0][2]
        total = seq[0][1]
        dones = [d for d, _, _ in seq]
        assert dones[-1] == total and dones == sorted(dones)
        assert all(0 < b - a <= options["batch_size"] for a, b in zip(dones, dones[1:]))
    if passes is not None:
        assert sum(seq[0][1] for seq in groups) >= passes


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_progress_that_is_neither_a_flag_nor_a_callable_is_refused(tiny_cnn, tiny_input, bad):
    with pytest.raises(OptionError, match="progress must be True, False or a callable"):
        perspicio.explain(tiny_cnn, tiny_input[:1], method="saliency", progress=bad)
