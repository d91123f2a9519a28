"""The one set of option validators (core/options.py) and the one JSON conversion (core/jsonable.py)
behave as documented."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from perspicio.core.jsonable import to_jsonable, write_json
from perspicio.core.options import check_choice, check_float, check_int
from perspicio.errors import OptionError


def test_check_int_accepts_python_and_numpy_integers_within_bounds() -> None:
    assert check_int("steps", 3, minimum=1) == 3
    out = check_int("steps", np.int64(7), minimum=1, maximum=7)
    assert out == 7 and type(out) is int
    assert check_int("seed", -5) == -5  # no bound given: any integer
    assert check_int("budget", None, minimum=1, allow_none=True) is None


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({"minimum": 1}, True, "steps must be an integer >= 1; got True."),  # bool is not a count
        ({"minimum": 1}, False, "steps must be an integer >= 1; got False."),
        ({"minimum": 1}, 0, "steps must be an integer >= 1; got 0."),
        ({"minimum": 1}, 2.0, "steps must be an integer >= 1; got 2.0."),
        ({"minimum": 1}, "3", "steps must be an integer >= 1; got '3'."),
        ({"minimum": 1, "maximum": 24}, 25, "steps must be an integer in 1..24; got 25."),
        ({"maximum": 4}, 5, "steps must be an integer <= 4; got 5."),
        ({}, None, "steps must be an integer; got None."),
        ({"minimum": 1, "allow_none": True}, 0, "steps must be an integer >= 1 or None; got 0."),
        ({"minimum": 0, "hint": "pixels"}, -1, "steps must be an integer >= 0 (pixels); got -1."),
    ],
)
def test_check_int_refuses_with_a_message_naming_the_option(kwargs, value, message) -> None:
    with pytest.raises(OptionError) as err:
        check_int("steps", value, **kwargs)
    assert str(err.value) == message


def test_check_float_accepts_reals_within_bounds() -> None:
    assert check_float("noise", 0, minimum=0) == 0.0
    out = check_float("noise", np.float32(0.5), minimum=0, maximum=1, strict=True)
    assert out == 0.5 and type(out) is float
    assert (
        check_float("noise", 1, minimum=0, maximum=1, strict=True) == 1.0
    )  # the maximum is inclusive
    assert check_float("tolerance", None, minimum=0, strict=True, allow_none=True) is None


@pytest.mark.parametrize(
    ("kwargs", "value", "message"),
    [
        ({"minimum": 0, "strict": True}, 0, "radius must be a positive number; got 0."),
        ({"minimum": 0, "strict": True}, True, "radius must be a positive number; got True."),
        ({"minimum": 0}, -0.1, "radius must be a number >= 0; got -0.1."),
        ({"minimum": 2, "strict": True}, 2, "radius must be a number > 2; got 2."),
        (
            {"minimum": 0, "maximum": 1, "strict": True},
            0.0,
            "radius must be a number in (0, 1]; got 0.0.",
        ),
        ({"minimum": 0, "maximum": 1}, 1.5, "radius must be a number in [0, 1]; got 1.5."),
        ({}, math.nan, "radius must be a finite number; got nan."),
        ({"minimum": 0}, math.inf, "radius must be a number >= 0; got inf."),
        ({}, "0.5", "radius must be a finite number; got '0.5'."),
        (
            {"minimum": 0, "strict": True, "hint": "pixels"},
            -1,
            "radius must be a positive number (pixels); got -1.",
        ),
    ],
)
def test_check_float_refuses_with_a_message_naming_the_option(kwargs, value, message) -> None:
    with pytest.raises(OptionError) as err:
        check_float("radius", value, **kwargs)
    assert str(err.value) == message


def test_check_choice() -> None:
    assert check_choice("reduce", None, (None, "sum")) is None
    assert check_choice("reduce", "sum", (None, "sum")) == "sum"
    with pytest.raises(OptionError) as err:
        check_choice("reduce", "max", (None, "sum"))
    assert str(err.value) == "reduce must be one of None, sum; got 'max'."
    with pytest.raises(OptionError, match="reduce must be one of"):
        check_choice("reduce", torch.ones(2), ("sum",))  # a tensor is compared without raising
    with pytest.raises(OptionError, match="flag must be one of"):
        check_choice("flag", True, (1, 2))  # a bool is not the integer 1


def test_methods_report_the_validators_messages(tiny_cnn) -> None:
    """Methods and metrics validate through the one module: same message shape everywhere."""
    import perspicio
    from perspicio import metrics

    with pytest.raises(OptionError, match=r"^samples must be an integer >= 1; got True\.$"):
        perspicio.explain(tiny_cnn, torch.rand(1, 3, 8, 8), method="smoothgrad", samples=True)
    with pytest.raises(OptionError, match=r"^budget must be an integer >= 1 or None; got 0\.$"):
        perspicio.explain(tiny_cnn, torch.rand(1, 3, 8, 8), method="kernel_shap", budget=0)
    with pytest.raises(OptionError, match=r"^radius must be a positive number \(L-inf"):
        metrics.get("max_sensitivity")(radius=0)


def test_to_jsonable() -> None:
    data = {
        "t": torch.tensor([1.0, float("nan")]),
        "big": torch.zeros(3, 30),
        "a": np.arange(3),
        "i": np.int64(4),
        "f": np.float32(0.25),
        "inf": float("inf"),
        "nested": ({"x": (1, 2)}, [True, None]),
        "dtype": torch.float16,
        "fn": len,
        "obj": object(),
        5: "int key",
    }
    assert to_jsonable(data, max_elements=64) == {
        "t": [1.0, None],
        "big": "Tensor(3, 30)",
        "a": [0, 1, 2],
        "i": 4,
        "f": 0.25,
        "inf": None,
        "nested": [{"x": [1, 2]}, [True, None]],
        "dtype": "torch.float16",
        "fn": "len",
        "obj": "object",
        "5": "int key",
    }
    assert len(to_jsonable(torch.zeros(3, 30))) == 3  # no limit: every number
    json.dumps(to_jsonable(data), allow_nan=False)


def test_write_json_is_atomic(tmp_path) -> None:
    path = write_json(tmp_path / "sub" / "x.json", {"v": torch.tensor(0.5), "nan": math.nan})
    assert json.loads(path.read_text()) == {"v": 0.5, "nan": None}

    class Unreadable(dict):
        def items(self):
            raise RuntimeError("cannot be read")

    with pytest.raises(RuntimeError):
        write_json(path, Unreadable())  # a failure keeps the old file and leaves no temporary
    assert json.loads(path.read_text()) == {"v": 0.5, "nan": None}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
