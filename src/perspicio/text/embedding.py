"""Gradient, path, noise and propagation methods on text, through the word embeddings.

One mechanism for all of them: :class:`EmbeddingModel` runs the text model with the output of its
word-embedding layer replaced by a float tensor (N, L, D) - the model "from ``inputs_embeds``" -
while the token ids, the attention mask and the token types stay those of the text (so position
and segment embeddings, the mask and the special tokens are the model's own). Every method that
takes a float input (saliency, Input x Gradient, SmoothGrad, Integrated Gradients, GradientSHAP,
DeepLIFT, LRP, ...) then runs unchanged on the text's word embeddings, one text at a time; the
baseline of the methods that take one is the embedding of the baseline tokens (every real,
non-special token replaced by ``baseline_token``), as for layer Integrated Gradients. The
embedding dimension is reduced per token by :data:`TOKEN_REDUCTION`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.capture import Capture, StopForward
from ..core.explanation import Explanation
from ..errors import LayerError, OptionError
from .model import TokenModel

__all__ = [
    "EMBEDDING_INPUT_METHODS",
    "TOKEN_REDUCTION",
    "EmbeddingModel",
    "embedding_outputs",
    "reduce_tokens",
    "token_reduction",
]

#: how each method's attribution (N, L, D) on the word embeddings becomes one value per token:
#: "sum" over the embedding dimension for attributions that add up to a score difference or
#: relevance (Input x Gradient, Integrated Gradients, GradientSHAP, DeepLIFT, LRP) and for the
#: squared / variance statistics of noise tunnelling (their sum is a squared norm); "l2", the
#: Euclidean norm, for gradients (saliency, guided backprop, deconvnet): a gradient's signed sum
#: over the embedding dimension is no per-token importance - through a LayerNorm right after the
#: embeddings (BERT, MiniLM) it is exactly 0, since a LayerNorm's input gradient is orthogonal to
#: the all-ones vector. SmoothGrad reduces like its base method.
TOKEN_REDUCTION: dict[str, str | None] = {
    "saliency": "l2",
    "guided_backprop": "l2",
    "deconvnet": "l2",
    "input_x_gradient": "sum",
    "integrated_gradients": "sum",
    "gradient_shap": "sum",
    "deeplift": "sum",
    "lrp": "sum",
    "smoothgrad": None,  # as its base method
    "smoothgrad_sq": "sum",
    "vargrad": "sum",
}
#: the methods run through :class:`EmbeddingModel`
EMBEDDING_INPUT_METHODS = tuple(TOKEN_REDUCTION)


def token_reduction(method: str, options: dict[str, Any]) -> str:
    """The per-token reduction of ``method`` (SmoothGrad: that of its ``base``, default saliency)."""
    how = TOKEN_REDUCTION[method]
    if how is not None:
        return how
    base = options.get("base", "saliency")
    name = base if isinstance(base, str) else getattr(base, "name", None)
    if name not in TOKEN_REDUCTION or TOKEN_REDUCTION[name] is None:
        supported = sorted(k for k, v in TOKEN_REDUCTION.items() if v is not None)
        raise OptionError(
            f"{method} on text takes as base one of the methods that run on the word embeddings "
            f"({', '.join(supported)}); got {name or type(base).__name__!r}."
        )
    return TOKEN_REDUCTION[name]  # type: ignore[return-value]


def reduce_tokens(attributions: Tensor, how: str) -> Tensor:
    """(N, L, D) -> (N, L): the sum, or the Euclidean norm, over the embedding dimension."""
    if how == "sum":
        return attributions.sum(dim=-1)
    return attributions.pow(2).sum(dim=-1).sqrt()


def embedding_outputs(tm: TokenModel, layer: tuple[str, nn.Module], x: Tensor) -> Tensor:
    """The word-embedding layer's output (N, L, D) for packed token inputs ``x``, without gradients:
    the model runs only up to the layer (that the layer runs once per forward pass is checked by
    :class:`EmbeddingModel` on every call)."""
    name, module = layer
    with torch.no_grad(), Capture([module], stop_after=module) as cap:
        try:
            tm(x)
        except StopForward:
            pass
    if not cap.outputs[0]:
        raise LayerError(
            f"layer {name!r} did not run in the model's forward pass; pass the word-embedding layer as layer=."
        )
    out = cap.last(0)
    if out.ndim != 3 or tuple(out.shape[:2]) != tuple(x[:, 0].shape) or not out.is_floating_point():
        raise LayerError(
            f"layer {name!r} gives {tuple(out.shape)} {out.dtype} for token ids {tuple(x[:, 0].shape)}; the word-embedding "
            "layer gives one float vector per token (N, L, D)."
        )
    return out


class EmbeddingModel(nn.Module):
    """A text model as a function of its word embeddings: ``forward(e)`` with ``e`` (B, L, D) runs
    the packed-token model on the text's tokens ``ids`` (1, K, L) - repeated B times - with the
    output of ``layer`` replaced by ``e``. The replacement hook exists only during the call; the
    user's model (a child, through ``tm``) is not changed."""

    def __init__(self, tm: TokenModel, ids: Tensor, layer: tuple[str, nn.Module]) -> None:
        super().__init__()
        if ids.ndim != 3 or len(ids) != 1:
            raise ValueError(
                f"ids must be one text's packed tokens (1, K, L); got {tuple(ids.shape)}."
            )
        self.tm = tm
        self.ids = ids
        self.layer_name, self._layer = layer
        self.pooling = tm.pooling
        #: how errors name the model (the user's, not this wrapper)
        self.model_name = f"{type(tm.model).__name__} (run from its word embeddings)"

    def forward(self, embeds: Tensor) -> Any:
        if embeds.ndim != 3 or embeds.shape[1] != self.ids.shape[-1]:
            raise LayerError(
                f"the word embeddings of this text have shape (B, {self.ids.shape[-1]}, D); got {tuple(embeds.shape)}."
            )
        calls = [0]

        def replace(i: int, out: Tensor) -> Tensor:
            calls[0] += 1
            if out.shape[1:] != embeds.shape[1:]:
                raise LayerError(
                    f"layer {self.layer_name!r} gives {tuple(out.shape)}; the embeddings given are {tuple(embeds.shape)}."
                )
            return embeds

        ids = self.ids.expand(len(embeds), *self.ids.shape[1:])
        with Capture([self._layer], transform=replace, store=False):
            out = self.tm(ids)
        if calls[0] != 1:
            raise LayerError(
                f"layer {self.layer_name!r} runs {calls[0]} times per forward pass; pick a layer called once."
            )
        return out

    def token_mask(self, x: Tensor) -> Tensor:
        """(B, L) bool: True where the token is real (not padding)."""
        return self.tm.token_mask(self.ids.expand(len(x), *self.ids.shape[1:]))


def _merge_value(
    values: list[Any], rows: list[int], lengths: list[int] | None = None
) -> tuple[bool, Any]:
    """(kept, merged) for one extras entry of every text: per-row tensors (first dim = the text's
    rows, the same trailing shape; per-token ones - dim 1 the text's ``lengths`` - padded with zeros
    to the longest) are concatenated, per-operation records (tuples of dicts of such
    tensors, the same operations) joined entry by entry, equal values kept once; anything else
    (per-token tensors of texts of different lengths) is dropped."""
    first = values[0]
    if isinstance(first, Tensor):
        if not all(
            isinstance(v, Tensor) and v.ndim >= 1 and len(v) == r for v, r in zip(values, rows)
        ):
            return False, None
        if lengths is not None and all(
            v.ndim >= 2 and v.shape[1] == n for v, n in zip(values, lengths)
        ):
            width = max(
                lengths
            )  # per-token values (rows, L_i, ...): padded with zeros like the attributions
            values = [
                torch.nn.functional.pad(v, (0, 0) * (v.ndim - 2) + (0, width - v.shape[1]))
                for v in values
            ]
        if all(v.shape[1:] == values[0].shape[1:] for v in values):
            return True, torch.cat(values)
        return False, None
    if isinstance(first, tuple) and first and all(isinstance(d, dict) for d in first):
        if not all(isinstance(v, tuple) and len(v) == len(first) for v in values):
            return False, None
        merged = []
        for j, d in enumerate(first):
            entry: dict[str, Any] = {}
            for key in d:
                kept, value = _merge_value([v[j].get(key) for v in values], rows, lengths)
                if not kept:
                    return False, None
                entry[key] = value
            merged.append(entry)
        return True, tuple(merged)
    try:
        same = all(bool(v == first) for v in values[1:])
    except (RuntimeError, TypeError, ValueError):
        same = False
    return (True, first) if same else (False, None)


def merge_extras(
    extras: list[dict[str, Any]], rows: list[int], lengths: list[int] | None = None
) -> dict[str, Any]:
    """The extras of per-text explanations as one dict (see :func:`_merge_value`); entries that
    cannot be joined are dropped."""
    out: dict[str, Any] = {}
    for key in extras[0]:
        if not all(key in e for e in extras):
            continue
        kept, value = _merge_value([e[key] for e in extras], rows, lengths)
        if kept:
            out[key] = value
    return out


def merge_per_text(
    parts: list[tuple[Explanation, Tensor]], inputs: Tensor, lengths: list[int] | None = None
) -> Explanation:
    """One explanation from per-text ones: attributions (rows, L) concatenated (each padded to the
    batch's length), scores / targets / base values concatenated, per-row provenance lists joined
    and pass counters summed."""
    first = parts[0][0]

    def cat(name: str) -> Any:
        vals = [getattr(e, name) for e, _ in parts]
        if any(v is None for v in vals):
            return None
        return torch.cat([torch.as_tensor(v).reshape(-1) for v in vals])

    names = (
        None
        if first.target_names is None
        else tuple(n for e, _ in parts for n in (e.target_names or ()))
    )
    counters = ("seconds", "forward_samples", "backward_samples")
    prov = dict(first.provenance)
    for key, value in first.provenance.items():
        vals = [e.provenance.get(key) for e, _ in parts]
        if key in counters and all(isinstance(v, (int, float)) for v in vals):
            prov[key] = sum(vals)
        elif key == "chunk_sizes" or (
            isinstance(value, list)
            and all(
                isinstance(v, list) and len(v) == len(e.attributions)
                for v, (e, _) in zip(vals, parts)
            )
        ):
            prov[key] = [item for v in vals for item in (v or [])]
    return first.replace(
        extras=merge_extras([e.extras for e, _ in parts], [len(a) for _, a in parts], lengths),
        attributions=torch.cat([a for _, a in parts]),
        scores=cat("scores"),
        targets=cat("targets"),
        base_value=cat("base_value"),
        target_names=names,
        inputs=inputs,
        provenance=prov,
    )
