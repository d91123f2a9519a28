"""Small command-line points of issue 19: both spellings of --method/--methods (and
--metric/--metrics) everywhere, and class-name suggestions that match words inside labels."""

from __future__ import annotations

import pytest

from perspicio.cli import cli
from perspicio.core.targets import name_to_index
from perspicio.errors import TargetError


@pytest.mark.parametrize("command", ["explain", "compare", "benchmark pointing-game", "run"])
@pytest.mark.parametrize("spelling", ["--method", "--methods"])
def test_method_and_methods_are_both_accepted(command, spelling) -> None:
    cmd = cli
    for part in command.split():
        cmd = cmd.commands[part]
    ctx = cmd.make_context(command, [spelling, "saliency,gradcam"], resilient_parsing=True)
    assert "saliency,gradcam" in ctx.params["methods"]


@pytest.mark.parametrize("spelling", ["--metric", "--metrics"])
def test_metric_and_metrics_are_both_accepted(spelling) -> None:
    ctx = cli.commands["compare"].make_context(
        "compare", [spelling, "deletion"], resilient_parsing=True
    )
    assert ctx.params["metrics"] == ("deletion",)


def test_class_name_suggestions_match_words_inside_labels() -> None:
    labels = [
        "crate",
        "oxcart",
        "castle",
        "tabby cat",
        "tiger cat",
        "Egyptian cat",
        "hot pot, hotpot",
        "cab",
    ]
    with pytest.raises(TargetError) as err:
        name_to_index("cat", labels)
    msg = str(err.value)
    assert (
        "tabby cat" in msg and "Egyptian cat" in msg and "crate" not in msg and "oxcart" not in msg
    )
    assert name_to_index("Tabby Cat", labels) == 3
    with pytest.raises(TargetError, match="Did you mean: castle"):
        name_to_index("castel", labels)  # no label has the word: closest spellings


def test_methods_table_columns_hold_long_names() -> None:
    from perspicio.methods import methods_table

    lines = methods_table().splitlines()
    rows = [ln for ln in lines if not ln.startswith(" ")]
    starts = {
        ln.index(ln.split()[1], len(ln.split()[0])) for ln in rows
    }  # where the family column starts
    assert len(starts) == 1  # one column for every name, the longest included


def test_a_second_maximize_run_does_not_overwrite_the_first(tmp_path) -> None:
    from perspicio.cli.features import free_stem

    assert free_stem(tmp_path, "maximize") == "maximize"
    (tmp_path / "maximize.png").write_bytes(b"")
    assert free_stem(tmp_path, "maximize") == "maximize-2"
    (tmp_path / "maximize-2.json").write_text("{}")
    assert free_stem(tmp_path, "maximize") == "maximize-3"


def test_option_flags_are_read_in_any_case() -> None:
    from perspicio.cli.common import parse_extra

    got = parse_extra(("eigen_smooth=true", "aug_smooth=False", "x=NONE", "steps=32", "name=layer4[-1]"))
    assert got == {"eigen_smooth": True, "aug_smooth": False, "x": None, "steps": 32, "name": "layer4[-1]"}
