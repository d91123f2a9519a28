"""What scalar per sample is explained.

Every target spec (None, an int, a list/tensor of ints, a class name, a callable,
or one of the target objects below) is turned at the boundary into a
:class:`ResolvedTarget`: a function mapping the model output to one score per
sample, plus the class index per sample when the target is a class.
Segmentation regions, detection scores and embedding similarity are just other
callables.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

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
        return output.reshape(output.shape[0], -1).gather(1, idx[:, None]).squeeze(1)


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


def _check_classes(idx: Tensor, output: Tensor) -> None:
    n_classes = output.shape[1]
    bad = (idx < 0) | (idx >= n_classes)
    if bad.any():
        raise TargetError(
            f"target index {int(idx[bad][0])} is out of range: the model has {n_classes} outputs (0..{n_classes - 1})."
        )


def _name_to_index(name: str, labels: Sequence[str] | None) -> int:
    if labels is None:
        raise TargetError(f"target {name!r} is a class name but the model has no class labels; pass an index.")
    lowered = [str(label).lower() for label in labels]
    key = name.strip().lower()
    if key in lowered:
        return lowered.index(key)
    if key.isdigit():
        return int(key)
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


def resolve_target(
    target: object, output: Tensor, labels: Sequence[str] | None = None
) -> ResolvedTarget:
    """Validate ``target`` against the model ``output`` (N, ...) and resolve it."""
    n = output.shape[0]
    if isinstance(target, ResolvedTarget):
        return target
    if callable(target) and not isinstance(target, (Tensor, str)):
        scores = target(output)
        if not isinstance(scores, Tensor) or scores.shape != (n,):
            got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise TargetError(f"a callable target must return one scalar per sample, shape ({n},); got {got}.")
        name = getattr(target, "__name__", type(target).__name__)
        return ResolvedTarget(fn=target, indices=None, description=f"callable {name}")
    if output.ndim != 2:
        raise TargetError(
            f"class targets need a (N, classes) output; this model returns {tuple(output.shape)}. "
            "Pass a callable target that maps the output to one score per sample."
        )
    if target is None or (isinstance(target, str) and target.lower() in ("top1", "pred", "auto")):
        idx = output.argmax(dim=1)
    elif isinstance(target, str):
        idx = torch.full((n,), _name_to_index(target, labels), dtype=torch.long)
    elif isinstance(target, bool):
        raise TargetError(f"target must be a class index, name or callable; got {target!r}.")
    elif isinstance(target, int):
        idx = torch.full((n,), target, dtype=torch.long)
    elif isinstance(target, (Sequence, Tensor)) and not isinstance(target, str):
        items = [
            _name_to_index(t, labels) if isinstance(t, str) else t for t in (target.tolist() if isinstance(target, Tensor) else target)
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
