"""Which tensor of the model's output is explained.

Most classifiers return one tensor, but many models do not: a tuple of heads, a dict,
a Hugging Face ``ModelOutput``, or a torchvision detector's list of per-image dicts.
The ``output=`` option of every method and metric names the tensor to explain:

* a key (``output="logits"``) for dicts, ``ModelOutput`` and objects with attributes;
* an index (``output=0``) for tuples and lists (for a dict: the position among its values);
* a path of keys and indices (``output=("hidden_states", -1)``);
* a callable mapping the raw output to a tensor (``output=perspicio.detections``).

The selection is applied by the :class:`~perspicio.core.batching.Engine` to every model
output - ordinary, output-only (the private twins), incremental and compiled passes alike -
so the model itself is never wrapped: layer names still refer to it, and the caches keyed
by the model keep working. Without ``output=``, a model that returns anything but a tensor
gets an :class:`~perspicio.errors.ModelError` naming the structure it returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import ModelError, OptionError
from .options import check_int

#: what ``output=`` accepts
OutputSpec = "str | int | Sequence[str | int] | Callable[[Any], Tensor] | None"

_MAX_LISTED = 6  # entries listed per level when describing an output


def check_output_spec(spec: Any) -> None:
    """Raise :class:`OptionError` unless ``spec`` is a valid ``output=`` value."""
    if spec is None or callable(spec) or isinstance(spec, str):
        return
    if isinstance(spec, int) and not isinstance(spec, bool):
        return
    if isinstance(spec, (list, tuple)) and spec and all(
        isinstance(s, str) or (isinstance(s, int) and not isinstance(s, bool)) for s in spec
    ):
        return
    raise OptionError(
        "output must be a key (str), an index (int), a sequence of keys/indices, or a callable that "
        f"maps the model's output to the tensor to explain; got {spec!r}."
    )


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ("," if t.ndim == 1 else "") + ")"


def describe_output(obj: Any, depth: int = 0) -> str:
    """A short description of a model output's structure, e.g.
    ``dict with keys 'logits' (tensor (1, 10)), 'hidden' (tuple of 3 tensors)``."""
    if isinstance(obj, Tensor):
        return f"tensor {_shape(obj)}"
    name = type(obj).__name__
    if isinstance(obj, Mapping):
        items = list(obj.items())
        if depth >= 2:
            return f"{name} with {len(items)} keys"
        listed = ", ".join(f"{k!r} ({describe_output(v, depth + 1)})" for k, v in items[:_MAX_LISTED])
        more = f", ... ({len(items)} keys)" if len(items) > _MAX_LISTED else ""
        return f"{name} with keys {listed}{more}" if items else f"empty {name}"
    if isinstance(obj, (list, tuple)):
        if not obj:
            return f"empty {name}"
        if all(isinstance(v, Tensor) for v in obj):
            shapes = {_shape(v) for v in obj}
            return f"{name} of {len(obj)} tensor{'s' if len(obj) > 1 else ''}" + (f" {shapes.pop()}" if len(shapes) == 1 else "")
        if depth >= 2:
            return f"{name} of {len(obj)} items"
        kinds = {type(v).__name__ for v in obj}
        if len(obj) > 1 and len(kinds) == 1 and all(isinstance(v, Mapping) for v in obj):
            return f"{name} of {len(obj)} {kinds.pop()}s, the first {describe_output(obj[0], depth + 1)}"
        listed = ", ".join(f"[{i}] {describe_output(v, depth + 1)}" for i, v in enumerate(obj[:_MAX_LISTED]))
        more = ", ..." if len(obj) > _MAX_LISTED else ""
        return f"{name} of {len(obj)} item{'s' if len(obj) > 1 else ''}: {listed}{more}"
    if obj is None:
        return "None"
    return name


def _is_detection(obj: Any) -> bool:
    return (isinstance(obj, (list, tuple)) and bool(obj) and all(isinstance(v, Mapping) for v in obj)
            and {"boxes", "scores", "labels"} <= set(obj[0].keys()))


def _suggestion(obj: Any, n: int | None) -> str:
    """``output=...`` to suggest for a non-tensor output."""
    if _is_detection(obj):
        return ("it looks like detections (a list of dicts with boxes, scores and labels, one per image): pass "
                "output=perspicio.detections and e.g. target=perspicio.BoxScoreTarget(boxes, labels)")

    def fits(v: Any) -> bool:
        return isinstance(v, Tensor) and v.ndim >= 1 and (n is None or v.shape[0] == n)

    pick: str | None = None
    if isinstance(obj, Mapping):
        keys = [k for k, v in obj.items() if fits(v)]
        for k in keys:
            if str(k).lower() in ("logits", "logit", "out", "output", "scores", "pred", "preds"):
                pick = repr(k)
                break
        if pick is None and keys:
            pick = repr(keys[0])
    elif isinstance(obj, (list, tuple)):
        idx = [i for i, v in enumerate(obj) if fits(v)]
        pick = str(idx[0]) if idx else None
    if pick is None:
        return "pass output=... (a key, an index or a callable that returns the tensor to explain)"
    return f"pass output={pick} (a key, an index or a callable)"


def non_tensor_error(obj: Any, n: int | None = None) -> ModelError:
    """The error for a model output that is not a tensor and no ``output=`` selection."""
    return ModelError(f"the model returned a {describe_output(obj)}; {_suggestion(obj, n)}.")


def _step(obj: Any, key: str | int) -> Any:
    """``obj[key]`` for one step of a selection path, with clear errors."""
    if isinstance(key, str):
        if isinstance(obj, Mapping):
            if key in obj:
                return obj[key]
            raise ModelError(f"output key {key!r} not found; the model returned a {describe_output(obj)}.")
        if hasattr(obj, key) and not isinstance(obj, (Tensor, list, tuple)):
            return getattr(obj, key)
        if isinstance(obj, tuple) and hasattr(obj, "_fields") and key in obj._fields:  # namedtuple
            return getattr(obj, key)
        raise ModelError(f"output key {key!r} cannot select from the model's output, a {describe_output(obj)}; "
                         "use an index or a callable.")
    if isinstance(obj, Mapping):
        to_tuple = getattr(obj, "to_tuple", None)  # Hugging Face ModelOutput: positions skip None fields
        values = list(to_tuple()) if callable(to_tuple) else list(obj.values())
    elif isinstance(obj, (list, tuple)):
        values = list(obj)
    else:
        raise ModelError(f"output index {key} cannot select from the model's output, a {describe_output(obj)}; "
                         "use a key or a callable.")
    if not -len(values) <= key < len(values):
        raise ModelError(f"output index {key} is out of range: the model returned a {describe_output(obj)}.")
    return values[key]


class OutputSelector:
    """Maps a model's raw output to the tensor to explain (see the module docstring).

    ``OutputSelector(None)`` passes tensors through and raises the descriptive
    :class:`ModelError` for anything else.
    """

    def __init__(self, spec: Any = None) -> None:
        check_output_spec(spec)
        self.spec = spec

    def __call__(self, raw: Any, n: int | None = None) -> Tensor:
        """The selected tensor of ``raw``, the output for a batch of ``n`` inputs (checked when given)."""
        spec = self.spec
        if spec is None:
            if isinstance(raw, Tensor):
                return raw
            raise non_tensor_error(raw, n)
        if callable(spec):
            out = spec(raw)
            what = f"output={getattr(spec, '__name__', type(spec).__name__)}"
        else:
            out = raw
            for key in (spec if isinstance(spec, (list, tuple)) else (spec,)):
                out = _step(out, key)
            what = f"output={spec!r}"
        if not isinstance(out, Tensor):
            raise ModelError(f"{what} selected a {describe_output(out)} from the model's output; it must select a "
                             "tensor with one row per input.")
        if n is not None and (out.ndim == 0 or out.shape[0] != n):
            raise ModelError(f"{what} selected a tensor of shape {tuple(out.shape)} for a batch of {n} input(s); "
                             f"it must have one row per input (shape ({n}, ...)).")
        return out

    def __repr__(self) -> str:
        return f"OutputSelector({self.spec!r})"


# ============================================================================ detection


class Detections:
    """``output=`` for torchvision-style detectors, which return one dict per image with
    ``boxes`` (D, 4) as (x1, y1, x2, y2), ``scores`` (D,) and ``labels`` (D,).

    Returns one tensor (N, max_detections, 6): rows ``(x1, y1, x2, y2, score, label)`` in the
    detector's order (highest score first), padded with rows of zeros and label -1. Scores and
    boxes keep their gradients, so Grad-CAM and other gradient methods can explain a detection
    score (see :class:`~perspicio.core.targets.BoxScoreTarget`). The fixed size lets the
    outputs of perturbed copies be batched together; detections beyond ``max_detections`` (the
    default equals torchvision's ``box_detections_per_img``) are dropped.
    """

    def __init__(self, max_detections: int = 100) -> None:
        check_int("max_detections", max_detections, minimum=1)
        self.max_detections = max_detections
        self.__name__ = "detections"

    def __call__(self, output: Any) -> Tensor:
        if not _is_detection(output):
            raise ModelError(f"detections expects a list of dicts with 'boxes', 'scores' and 'labels' (one per image); "
                             f"the model returned a {describe_output(output)}.")
        rows = []
        for det in output:
            boxes, scores, labels = det["boxes"], det["scores"], det["labels"]
            k = min(len(scores), self.max_detections)
            t = torch.cat([boxes[:k].reshape(k, 4), scores[:k, None], labels[:k, None].to(scores.dtype)], dim=1)
            pad = t.new_zeros(self.max_detections - k, 6)
            pad[:, 5] = -1
            rows.append(torch.cat([t, pad]))
        return torch.stack(rows)

    def __repr__(self) -> str:
        return f"Detections(max_detections={self.max_detections})"


#: ``output=perspicio.detections``: torchvision detector outputs as one (N, 100, 6) tensor
detections = Detections()


def select_output(raw: Any, output: Any = None, n: int | None = None) -> Tensor:
    """``raw`` reduced to the tensor to explain by an ``output=`` spec (functional form)."""
    return (output if isinstance(output, OutputSelector) else OutputSelector(output))(raw, n)


__all__ = ["Detections", "OutputSelector", "check_output_spec", "describe_output", "detections", "select_output"]
