"""The one conversion of perspicio's values to JSON, and an atomic JSON writer.

Explanations' and metric results' summaries, comparison tables, benchmark results and the CLI's
number files all go through :func:`to_jsonable`, so a tensor, a numpy value, a NaN, a dtype or a
callable reads the same in every JSON file perspicio writes.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor


def to_jsonable(value: Any, *, max_elements: int | None = None) -> Any:
    """``value`` as plain JSON data (dicts, lists, str, int, float, bool, None).

    - tensors and numpy arrays become nested lists; with ``max_elements`` a larger one becomes a
      short description ``"Tensor(2, 3, 224, 224)"`` (option values such as a baseline image);
    - NaN and infinite floats become None (JSON has no such numbers); numpy scalars become Python
      numbers;
    - mappings (keys as strings), lists and tuples are converted element-wise;
    - paths, dtypes and devices become their string; anything else its ``__name__`` (a function,
      a class) or its type's name (an object such as a method instance).
    """
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        v = float(value)
        return v if math.isfinite(v) else None
    if isinstance(value, Tensor) or _is_ndarray(value):
        shape = tuple(value.shape)
        size = math.prod(shape)
        if max_elements is not None and size > max_elements:
            return f"Tensor{shape}"
        data = value.detach().cpu().tolist() if isinstance(value, Tensor) else value.tolist()
        return to_jsonable(data)
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v, max_elements=max_elements) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v, max_elements=max_elements) for v in value]
    if isinstance(value, (Path, torch.dtype, torch.device)):
        return str(value)
    return getattr(value, "__name__", None) or type(value).__name__


def _is_ndarray(value: Any) -> bool:
    return (
        type(value).__module__ == "numpy" and hasattr(value, "tolist") and hasattr(value, "shape")
    )


def write_json(path: str | Path, data: Any, *, indent: int = 1) -> Path:
    """Write ``to_jsonable(data)`` to ``path`` through a temporary file renamed at the end (a
    failure never leaves a half-written file); parent directories are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(
            json.dumps(to_jsonable(data), indent=indent, allow_nan=False), encoding="utf-8"
        )
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path
