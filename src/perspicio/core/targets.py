"""What scalar per sample is explained.

Every target spec (None, an int, a list/tensor of ints, a class name, a callable,
or one of the target objects below) is turned at the boundary into a
:class:`ResolvedTarget`: a function mapping the model output to one score per
sample, plus the class index per sample when the target is a class.
Segmentation regions, detection scores and embedding similarity are just other
callables.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import TargetError, suggest

TargetSpec = "int | str | Sequence[int] | Tensor | Callable[[Tensor], Tensor] | None"


@dataclass(frozen=True)
class ResolvedTarget:
    """A validated target: ``fn(output) -> (N,)`` and, for class targets, the indices."""

    fn: Callable[[Tensor], Tensor]
    indices: Tensor | None
    description: str
    #: (output, scores) of the gradient-free output a callable target was resolved on: its scores
    #: are not computed twice for the same output (:func:`row_scores`)
    resolved_on: tuple[Tensor, Tensor] | None = field(default=None, repr=False, compare=False)

    def __call__(self, output: Tensor) -> Tensor:
        return self.fn(output)


class ClassScore:
    """Score of one class per sample: ``output[n, indices[n]]`` (logit by default)."""

    def __init__(self, indices: Tensor) -> None:
        self.indices = indices

    def __call__(self, output: Tensor) -> Tensor:
        idx = self.indices.to(output.device)
        if len(idx) != output.shape[0]:
            # batched perturbation copies of one sample: repeat the index
            idx = idx.repeat_interleave(output.shape[0] // len(idx))
        return pick(output, idx)


def pick(output: Tensor, indices: Tensor) -> Tensor:
    """``output[r, indices[r]]`` for every row ``r`` (the output flattened per row): the one
    place a class score is read from an output."""
    return output.reshape(output.shape[0], -1).gather(1, indices.to(output.device)[:, None]).squeeze(1)


def row_scores(target: ResolvedTarget, output: Tensor, rows: Tensor | None = None) -> Tensor:
    """Target score of each output row; row ``r`` belongs to input sample ``rows[r]`` (default: row
    ``r`` is sample ``r``).

    Class targets read ``output[r, indices[rows[r]]]``; a callable target is applied to the whole
    output and must return one score per row.
    """
    if target.indices is not None:
        idx = target.indices.to(output.device)
        return pick(output, idx[rows.to(output.device)] if rows is not None else idx)
    if target.resolved_on is not None and target.resolved_on[0] is output:
        return target.resolved_on[1]
    scores = target.fn(output)
    if not isinstance(scores, Tensor) or scores.shape != (output.shape[0],):
        raise TargetError(f"a callable target must return one scalar per row, shape ({output.shape[0]},).")
    return scores


def check_target_count(target: Any, n: int) -> None:
    """A list/tensor target must hold one entry per input or a single one."""
    if isinstance(target, Tensor) and target.ndim == 0:
        return
    if isinstance(target, (list, tuple, Tensor)) and len(target) not in (1, n):
        raise TargetError(f"got {len(target)} targets for {n} inputs; give one per input or a single one.")


def slice_target(target: Any, start: int, stop: int, n: int) -> Any:
    """The part of a per-input target spec that belongs to inputs ``start:stop`` of ``n``.

    A list, tuple or tensor with one entry per input (``n > 1``) is sliced; anything else (one
    target for all, a 0-d tensor, a name, a callable) applies to every chunk unchanged.
    """
    if isinstance(target, Tensor) and target.ndim == 0:
        return target
    if isinstance(target, (list, tuple, Tensor)) and n > 1 and len(target) == n:
        return target[start:stop]
    return target


class RegionTarget:
    """Segmentation target: sum of class ``cls`` logits over a boolean ``mask`` (H, W).

    ``output`` must be (N, classes, H, W), as from a segmentation network.
    """

    def __init__(self, cls: int, mask: Tensor) -> None:
        self.cls = int(cls)
        self.mask = torch.as_tensor(mask).bool()

    def __call__(self, output: Tensor) -> Tensor:
        if output.ndim != 4:
            raise TargetError(f"RegionTarget needs a (N, classes, H, W) output; got shape {tuple(output.shape)}")
        m = self.mask.to(output.device)
        return (output[:, self.cls] * m).sum(dim=(1, 2))


class EmbeddingSimilarity:
    """Cosine similarity between the model's embedding output and a reference embedding."""

    def __init__(self, reference: Tensor) -> None:
        self.reference = torch.as_tensor(reference).flatten()

    def __call__(self, output: Tensor) -> Tensor:
        ref = self.reference.to(output.device, output.dtype)
        return torch.nn.functional.cosine_similarity(output.reshape(output.shape[0], -1), ref[None], dim=1)


class BoxScoreTarget:
    """Detection target: how strongly the detector still finds the given boxes.

    For each reference box (x1, y1, x2, y2) with its label, the detection of the same label
    that overlaps it most, with an intersection over union of at least ``iou_threshold``,
    contributes its score (plus that IoU with ``add_iou=True``, so the box's position counts
    too); a reference box without such a detection contributes 0. The target is the sum over
    the reference boxes, per sample - the same boxes for every input of the batch.

    Works on the output of :data:`perspicio.detections` (``output=perspicio.detections``):
    (N, D, 6) rows of (x1, y1, x2, y2, score, label). On the clean input every reference box
    must be matched (a :class:`TargetError` lists those that are not); on perturbed copies an
    unmatched box simply scores 0.

    pytorch-grad-cam's ``FasterRCNNBoxScoreTarget`` adds the IoU to the score (``add_iou=True``
    here) and takes the detection of highest IoU among all labels, scoring 0 if its label
    differs; this target looks for the best overlap among detections of the box's own label.
    """

    def __init__(self, boxes: Any, labels: Any, iou_threshold: float = 0.5, *, add_iou: bool = False) -> None:
        try:
            b = torch.as_tensor(boxes, dtype=torch.float64)
            lab = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TargetError(f"BoxScoreTarget needs boxes (B, 4) and labels (B,); got {boxes!r}, {labels!r}.") from exc
        if b.ndim == 1:
            b = b[None]
        lab = lab.reshape(-1)
        if b.ndim != 2 or b.shape[-1] != 4 or len(b) == 0:
            raise TargetError(f"BoxScoreTarget boxes must be (B, 4) as (x1, y1, x2, y2); got shape {tuple(b.shape)}.")
        if lab.is_floating_point() or lab.dtype == torch.bool or len(lab) != len(b):
            raise TargetError(f"BoxScoreTarget needs one integer label per box; got {len(lab)} label(s) "
                              f"({lab.dtype}) for {len(b)} box(es).")
        if not bool(torch.isfinite(b).all()) or bool(((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1])).any()):
            raise TargetError("BoxScoreTarget boxes must be finite with x2 > x1 and y2 > y1; got "
                              f"{b.tolist()}.")
        if isinstance(iou_threshold, bool) or not isinstance(iou_threshold, (int, float)) or not 0 <= iou_threshold <= 1:
            raise TargetError(f"iou_threshold must be a number in [0, 1]; got {iou_threshold!r}.")
        self.boxes = b
        self.labels = lab.long()
        self.iou_threshold = float(iou_threshold)
        self.add_iou = bool(add_iou)
        self.__name__ = f"BoxScoreTarget({len(b)} box{'es' if len(b) > 1 else ''})"

    def _check(self, output: Tensor) -> None:
        if not isinstance(output, Tensor) or output.ndim != 3 or output.shape[-1] != 6:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise TargetError("BoxScoreTarget scores detections as (N, D, 6) rows (x1, y1, x2, y2, score, label): "
                              f"pass output=perspicio.detections; got an output of shape {got}.")

    def match(self, output: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(index, iou, matched)``, each (N, B): per sample and reference box the detection that
        matches it, their IoU, and whether the match is valid (same label, IoU >= threshold)."""
        self._check(output)
        det = output[..., :4]
        det_labels = output[..., 5]
        ref = self.boxes.to(device=output.device, dtype=output.dtype)
        lo = torch.maximum(det[:, None, :, :2], ref[None, :, None, :2])  # (N, B, D, 2)
        hi = torch.minimum(det[:, None, :, 2:], ref[None, :, None, 2:])
        inter = (hi - lo).clamp_min(0).prod(-1)
        area_det = (det[..., 2:] - det[..., :2]).clamp_min(0).prod(-1)  # (N, D)
        area_ref = (ref[:, 2:] - ref[:, :2]).prod(-1)  # (B,)
        iou = inter / (area_det[:, None, :] + area_ref[None, :, None] - inter).clamp_min(1e-12)
        same = det_labels[:, None, :] == self.labels.to(output.device, output.dtype)[None, :, None]
        valid = same & (det_labels[:, None, :] >= 0) & (iou >= self.iou_threshold)
        best = torch.where(valid, iou.detach(), torch.full_like(iou, -1.0)).argmax(-1)  # (N, B)
        return best, iou.gather(2, best[..., None]).squeeze(-1), valid.any(-1)

    def __call__(self, output: Tensor) -> Tensor:
        best, iou, matched = self.match(output)
        scores = output[..., 4][:, None, :].expand(-1, len(self.boxes), -1).gather(2, best[..., None]).squeeze(-1)
        if self.add_iou:
            scores = scores + iou
        return torch.where(matched, scores, torch.zeros_like(scores)).sum(1)

    def validate(self, output: Tensor) -> None:
        """Raise a :class:`TargetError` if a reference box matches no detection on the clean output."""
        _, _, matched = self.match(output)
        if bool(matched.all()):
            return
        n, b = (~matched).nonzero()[0].tolist()
        box = [round(v, 2) for v in self.boxes[b].tolist()]
        raise TargetError(
            f"BoxScoreTarget: reference box {b} {box} (label {int(self.labels[b])}) matches no detection of that label "
            f"with IoU >= {self.iou_threshold} in sample {n} ({int((~matched).sum())} unmatched box/sample pair(s)); "
            "pass boxes and labels the model predicts (e.g. from its output on the input)."
        )

    def __repr__(self) -> str:
        return (f"BoxScoreTarget(boxes={self.boxes.tolist()}, labels={self.labels.tolist()}, "
                f"iou_threshold={self.iou_threshold}, add_iou={self.add_iou})")


def _check_classes(idx: Tensor, output: Tensor) -> None:
    n_classes = output.shape[1]
    bad = (idx < 0) | (idx >= n_classes)
    if bad.any():
        raise TargetError(
            f"target index {int(idx[bad][0])} is out of range: the model has {n_classes} outputs (0..{n_classes - 1})."
        )


def target_names(labels: Sequence[str] | None, indices: Tensor | None) -> tuple[str, ...] | None:
    """Class names of target ``indices`` (an index past the labels is named by its number); None without labels."""
    if labels is None or indices is None:
        return None
    return tuple(str(labels[i]) if i < len(labels) else str(i) for i in indices.tolist())


def name_to_index(name: str, labels: Sequence[str] | None) -> int:
    """The class index of a class name (case-insensitive) or of a string of digits."""
    if labels is None:
        raise TargetError(f"target {name!r} is a class name but the model has no class labels; pass an index.")
    lowered = [str(label).lower() for label in labels]
    key = name.strip().lower()
    if key in lowered:
        return lowered.index(key)
    if key.isdigit():
        return int(key)
    words = [label for label in labels if key in str(label).lower().replace(",", " ").replace("-", " ").split()]
    if words:  # the name is a word of some labels ("cat" -> "tabby cat", "Egyptian cat")
        more = f" (and {len(words) - 5} more)" if len(words) > 5 else ""
        raise TargetError(f"unknown class name {name!r}. Classes with that word: "
                          f"{', '.join(map(str, words[:5]))}{more}.")
    raise TargetError(f"unknown class name {name!r}." + suggest(key, lowered))


def split_multi_target(target: object, n: int) -> tuple[list[object] | Tensor, int] | None:
    """Several targets per input: ``[[3, 5], [1, 2]]`` (N lists of T) or an (N, T) tensor.

    Returns ``(flat, T)`` where ``flat`` holds N*T targets in input-major order (row
    ``i * T + t`` explains input ``i`` for its ``t``-th target), or None when
    ``target`` is not a multi-target spec. One list of T targets (or a (1, T) tensor)
    applies to every input.
    """
    if isinstance(target, Tensor):
        if target.ndim != 2:
            return None
        rows: list[list[object]] = target.tolist()
    elif isinstance(target, (list, tuple)) and target and all(
        isinstance(t, (list, tuple)) or (isinstance(t, Tensor) and t.ndim == 1) for t in target
    ):
        rows = [t.tolist() if isinstance(t, Tensor) else list(t) for t in target]
    else:
        return None
    lengths = {len(r) for r in rows}
    if len(lengths) != 1 or 0 in lengths:
        raise TargetError(f"multi-target lists must all have the same, non-zero length; got lengths {sorted(lengths)}.")
    if len(rows) == 1:
        rows = rows * n
    if len(rows) != n:
        raise TargetError(f"got target lists for {len(rows)} inputs but {n} inputs; give one list per input or one for all.")
    per = lengths.pop()
    flat = [t for r in rows for t in r]
    return (torch.as_tensor(flat, dtype=torch.long) if isinstance(target, Tensor) else flat), per


class FiniteScores:
    """A callable target whose scores are checked: NaN or Inf scores make every attribution
    meaningless, so they raise a :class:`TargetError` naming the target (on the clean output
    and on every perturbed or interpolated batch)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str) -> None:
        self.fn = fn
        self.name = name
        self.__name__ = name

    def __call__(self, output: Tensor) -> Tensor:
        scores = self.fn(output)
        if isinstance(scores, Tensor) and scores.is_floating_point() and not bool(torch.isfinite(scores.detach()).all()):
            bad = (~torch.isfinite(scores.detach())).nonzero().flatten().tolist()
            raise TargetError(
                f"the target callable {self.name} returned NaN/Inf for {len(bad)} of {scores.numel()} row(s) "
                f"(first: row {bad[0]}, value {scores.detach().flatten()[bad[0]].item()}); "
                "attributions of a non-finite score are meaningless."
            )
        return scores


def _callable_name(target: object) -> str:
    return getattr(target, "__name__", None) or type(target).__name__


def normalize_target(target: Any) -> Any:
    """A single class index given as a 0-d tensor/array or a numpy integer becomes an int, a numpy
    array of indices a tensor; anything else is returned as is."""
    single = _as_index(target)
    if single is not None:
        return single
    if type(target).__module__ == "numpy" and getattr(target, "ndim", 0) >= 1:
        return torch.as_tensor(target)
    return target


def _as_index(target: object) -> int | None:
    """A single class index given as a 0-d tensor or array, or a numpy integer; else None."""
    if isinstance(target, Tensor) and target.ndim == 0:
        if target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
            raise TargetError(f"a tensor target must hold integer class indices; got {target!r}.")
        return int(target.item())
    if isinstance(target, numbers.Integral) and not isinstance(target, (bool, int)):
        return int(target)  # numpy integers
    if type(target).__module__ == "numpy" and getattr(target, "ndim", None) == 0:
        kind = getattr(getattr(target, "dtype", None), "kind", "")
        if kind in ("i", "u"):
            return int(target)  # type: ignore[call-overload]
        raise TargetError(f"an array target must hold integer class indices; got {target!r}.")
    return None


def resolve_target(
    target: object, output: Tensor, labels: Sequence[str] | None = None
) -> ResolvedTarget:
    """Validate ``target`` against the model ``output`` (N, ...) and resolve it."""
    if isinstance(target, ResolvedTarget):
        return target
    if not isinstance(output, Tensor):
        from .outputs import non_tensor_error

        raise non_tensor_error(output)
    n = output.shape[0]
    if callable(target) and not isinstance(target, (Tensor, str)):
        name = target.name if isinstance(target, FiniteScores) else _callable_name(target)
        checked = target if isinstance(target, FiniteScores) else FiniteScores(target, name)
        validate = getattr(target, "validate", None)
        if callable(validate):  # target objects may check the clean output (e.g. BoxScoreTarget)
            validate(output)
        scores = checked(output)
        if not isinstance(scores, Tensor) or scores.shape != (n,):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise TargetError(f"a callable target must return one scalar per sample, shape ({n},); got {got}.")
        # kept only without a graph: a graph held by the target would outlive its chunk
        kept = (output, scores) if not scores.requires_grad else None
        return ResolvedTarget(fn=checked, indices=None, description=f"callable {name}", resolved_on=kept)
    target = normalize_target(target)
    if output.ndim != 2:
        raise TargetError(
            f"class targets need a (N, classes) output; this model returns {tuple(output.shape)}. "
            "Pass a callable target that maps the output to one score per sample."
        )
    if target is None or (isinstance(target, str) and target.lower() in ("top1", "pred", "auto")):
        idx = output.argmax(dim=1)
    elif isinstance(target, str):
        idx = torch.full((n,), name_to_index(target, labels), dtype=torch.long)
    elif isinstance(target, bool):
        raise TargetError(f"target must be a class index, name or callable; got {target!r}.")
    elif isinstance(target, int):
        idx = torch.full((n,), target, dtype=torch.long)
    elif isinstance(target, (Sequence, Tensor)) and not isinstance(target, str):
        items = [
            name_to_index(t, labels) if isinstance(t, str) else t for t in (target.tolist() if isinstance(target, Tensor) else target)
        ]
        try:
            idx = torch.as_tensor(items, dtype=torch.long).flatten()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TargetError(f"target list must hold class indices or names; got {target!r}.") from exc
        if len(idx) == 1:
            idx = idx.expand(n)
        if len(idx) != n:
            raise TargetError(f"got {len(idx)} targets for {n} inputs; give one per input or a single one.")
    else:
        raise TargetError(f"target must be None, an int, a class name, a list of ints, or a callable; got {type(target).__name__}.")
    idx = idx.to(output.device)
    _check_classes(idx, output)
    names = None
    if labels is not None:
        names = [str(labels[i]) for i in idx.tolist()]
    desc = ", ".join(f"{i}" + (f" ({nm})" if names else "") for i, nm in zip(idx.tolist(), names or [None] * n))
    return ResolvedTarget(fn=ClassScore(idx), indices=idx, description=desc)
