"""Targets for sentence encoders: similarity to another sentence and zero-shot label sentences."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.outputs import OutputSelector
from ..errors import TargetError

__all__ = ["ScoreHead", "ZeroShot", "ZeroShotHead"]


class ZeroShot:
    """Zero-shot classes given as label sentences (``ZeroShot(["a positive review", "a negative
    review"])``): the score of label ``c`` is the cosine similarity between the input's embedding
    and the embedding of sentence ``c``. ``target`` picks the label explained (an index or the
    sentence; None: the most similar label of each input)."""

    def __init__(self, labels: Sequence[str], target: int | str | None = None) -> None:
        if isinstance(labels, str) or not isinstance(labels, Sequence) or len(labels) < 1:
            raise TargetError(f"ZeroShot needs a list of label sentences; got {labels!r}.")
        if not all(isinstance(s, str) and s.strip() for s in labels):
            raise TargetError(
                f"ZeroShot label sentences must be non-empty strings; got {list(labels)!r}."
            )
        if target is not None and not isinstance(target, (int, str)):
            raise TargetError(
                f"ZeroShot target must be None, a label index or a label sentence; got {target!r}."
            )
        if isinstance(target, str) and target not in labels:
            raise TargetError(
                f"ZeroShot target {target!r} is not one of the label sentences {list(labels)!r}."
            )
        self.labels = tuple(labels)
        self.target = target

    def __repr__(self) -> str:
        return f"ZeroShot({list(self.labels)!r}, target={self.target!r})"


class ZeroShotHead:
    """``output=`` for a zero-shot target: the selected embedding (N, D) -> cosine similarities
    (N, labels) to the label sentences' embeddings ``references`` (labels, D)."""

    __name__ = "zero_shot"

    def __init__(self, references: Tensor, select: Any = None) -> None:
        self.references = references.detach()
        self.select = OutputSelector(select)

    def __call__(self, raw: Any) -> Tensor:
        emb = self.select(raw)
        emb = emb.reshape(emb.shape[0], -1)
        ref = self.references.to(emb.device, emb.dtype)
        return F.normalize(emb, dim=1) @ F.normalize(ref, dim=1).T

    def __repr__(self) -> str:
        return f"ZeroShotHead({len(self.references)} labels)"


class ScoreHead:
    """``output=`` that computes a callable target inside the model's output: the selected output
    (N, ...) -> ``fn(output)`` as (N, 1). Methods that propagate through the model's operations
    (DeepLIFT, LRP) then propagate through the target's operations too, instead of linearising it
    at the output (a cosine similarity is scale-invariant: its gradient times the embedding sums to
    0, so LRP's starting relevance would vanish)."""

    __name__ = "score"

    def __init__(self, fn: Any, select: Any = None) -> None:
        if not callable(fn):
            raise TargetError(f"ScoreHead needs a callable target; got {fn!r}.")
        self.fn = fn
        self.select = OutputSelector(select)

    def __call__(self, raw: Any) -> Tensor:
        out = self.select(raw)
        s = self.fn(out)
        if not isinstance(s, Tensor) or s.shape != (out.shape[0],):
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise TargetError(
                f"a callable target must return one score per input, shape ({out.shape[0]},); got {got}."
            )
        return s[:, None]

    def __repr__(self) -> str:
        return f"ScoreHead({getattr(self.fn, '__name__', 'callable')})"


def embed(model: torch.nn.Module, x: Tensor, select: Any = None) -> Tensor:
    """The selected output of ``model`` (the packed-token adapter) on ``x``, without gradients."""
    from ..core.guard import model_guard

    with model_guard(model), torch.no_grad():
        return OutputSelector(select)(model(x), len(x)).detach()
