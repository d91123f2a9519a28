"""The adapter between a Hugging Face-style text model and perspicio's methods, which take one
tensor: the token inputs packed as (N, K, L) integers (row 0 ``input_ids``, then
``attention_mask`` and, when used, ``token_type_ids``)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ModelError

__all__ = ["TokenModel", "embedding_layer", "pack"]


def pack(tensors: dict[str, Tensor], keys: tuple[str, ...]) -> Tensor:
    """(N, K, L) integer tensor of ``tensors[key]`` for ``key`` in ``keys``."""
    return torch.stack([tensors[k].long() for k in keys], dim=1)


class TokenModel(nn.Module):
    """``model(**{key: x[:, i]})`` for packed token inputs ``x`` (N, K, L).

    Tells the attention methods which tokens are real (:meth:`token_mask`) and how the model
    pools (``pooling``, read from the wrapped model). It holds the user's model as a child and
    changes nothing in it.
    """

    def __init__(
        self, model: nn.Module, keys: tuple[str, ...] = ("input_ids", "attention_mask")
    ) -> None:
        super().__init__()
        # the wrapper's own flag follows the model's (it has no layers of its own): a training-mode
        # wrapper around an eval-mode model made the guard run model.eval() on every call
        self.training = model.training
        if "input_ids" not in keys or "attention_mask" not in keys:
            raise ModelError(f"packed keys must include input_ids and attention_mask; got {keys}.")
        self.model = model
        self.keys = tuple(keys)
        self.pooling = getattr(model, "pooling", None)

    def forward(self, x: Tensor) -> Any:
        x = (
            x.long() if x.is_floating_point() else x
        )  # perturbation methods hand on float copies of the ids
        return self.model(**{k: x[:, i] for i, k in enumerate(self.keys)})

    def token_mask(self, x: Tensor) -> Tensor:
        """(N, L) bool: True where the token is real (not padding)."""
        return x[:, self.keys.index("attention_mask")] != 0


def embedding_layer(model: nn.Module) -> nn.Module:
    """The token (word) embedding layer: ``get_input_embeddings()``, else the only ``nn.Embedding``
    whose rows outnumber the positions (a clear error when it cannot be told)."""
    get = getattr(model, "get_input_embeddings", None)
    if callable(get):
        layer = get()
        if isinstance(layer, nn.Module):
            return layer
    embs = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    if len(embs) == 1:
        return embs[0]
    if embs:
        biggest = max(embs, key=lambda m: m.num_embeddings)
        if sum(m.num_embeddings == biggest.num_embeddings for m in embs) == 1:
            return biggest
    raise ModelError(
        f"cannot tell the token embedding layer of {type(model).__name__}: it has no get_input_embeddings() "
        f"and {len(embs)} nn.Embedding layers; pass layer=<the word embedding module>."
    )
