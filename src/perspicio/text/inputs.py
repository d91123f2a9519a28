"""Text inputs: tokenization with the model's tokenizer, the attention mask, special tokens,
truncation to the model's maximum length (with a warning naming what was dropped), and the
packed token tensor the methods see."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError, ModelError

__all__ = ["TokenBatch", "check_token_ids", "encode", "find_tokenizer", "is_text", "position_limit"]

#: tokenizers report this (or larger) as model_max_length when the length is unknown
_UNKNOWN_LENGTH = 10**9


def is_text(inputs: Any) -> bool:
    """True for a string or a non-empty list/tuple of strings."""
    if isinstance(inputs, str):
        return True
    return (
        isinstance(inputs, (list, tuple))
        and bool(inputs)
        and all(isinstance(s, str) for s in inputs)
    )


@dataclass(frozen=True)
class TokenBatch:
    """Tokenized texts. Tensors are (N, L), padded to the longest text; ``tokens[i]`` holds the
    token strings of the real (unpadded) positions of text ``i``; ``word_ids[i]`` the word each
    token belongs to (None for special tokens); ``dropped[i]`` how many tokens truncation removed."""

    texts: tuple[str, ...]
    input_ids: Tensor
    attention_mask: Tensor
    special: Tensor
    tokens: tuple[tuple[str, ...], ...]
    word_ids: tuple[tuple[int | None, ...], ...]
    token_type_ids: Tensor | None = None
    dropped: tuple[int, ...] = ()

    def __len__(self) -> int:
        return len(self.texts)

    def tensors(self) -> dict[str, Tensor]:
        """The model's keyword inputs."""
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out


def find_tokenizer(model: Any, tokenizer: Any = None) -> Any:
    """The tokenizer given, or the one a bundled model or a wrapper carries; a clear error otherwise."""
    if tokenizer is not None:
        if not callable(tokenizer) or not hasattr(tokenizer, "convert_ids_to_tokens"):
            raise InputError(
                f"tokenizer must be a Hugging Face tokenizer; got {type(tokenizer).__name__}."
            )
        return tokenizer
    for holder in (model, getattr(model, "preprocess", None)):
        tok = getattr(holder, "tokenizer", None)
        if tok is not None:
            return tok
    raise ModelError(
        f"text inputs need a tokenizer, and this model ({type(getattr(model, 'model', model)).__name__}) has none: "
        "pass tokenizer=AutoTokenizer.from_pretrained(...), or give token ids as a dict "
        "{'input_ids': ..., 'attention_mask': ...}."
    )


def _max_length(tokenizer: Any, model: Any, max_length: int | None) -> int | None:
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
            raise InputError(f"max_length must be an integer >= 2; got {max_length!r}.")
        return max_length
    pre = getattr(model, "preprocess", None)
    if isinstance(getattr(pre, "max_length", None), int):
        return pre.max_length
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and limit < _UNKNOWN_LENGTH:
        return limit
    return position_limit(getattr(model, "model", model))


def position_limit(model: Any) -> int | None:
    """The most tokens ``model`` takes: its config's ``max_position_embeddings`` (GPT-2's
    ``n_positions``), less the positions a RoBERTa-style embedding reserves (positions count from
    ``padding_idx + 1``); None when the model states none."""
    config = getattr(model, "config", None)
    pos = getattr(config, "max_position_embeddings", None)
    if not isinstance(pos, int) or isinstance(pos, bool):
        return None
    modules = model.named_modules() if isinstance(model, torch.nn.Module) else ()
    for name, m in modules:
        if (
            name.endswith("position_embeddings")
            and isinstance(m, torch.nn.Embedding)
            and m.num_embeddings == pos
            and m.padding_idx is not None
        ):
            return pos - (m.padding_idx + 1)
    return pos


def check_token_ids(model: Any, tensors: Mapping[str, Tensor]) -> None:
    """Token ids the model can embed, and no more tokens than it has positions: an
    :class:`InputError` naming the limit instead of an index error deep inside the model."""
    ids = tensors["input_ids"]
    limit = position_limit(model)
    if limit is not None and ids.shape[-1] > limit:
        raise InputError(
            f"input_ids has {ids.shape[-1]} tokens but the model takes at most {limit} "
            "(config.max_position_embeddings); pass shorter ids, or the text with max_length= "
            "(texts are truncated with a warning)."
        )
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    vocab = getattr(emb, "num_embeddings", None)
    if isinstance(vocab, int) and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InputError(
            f"input_ids holds ids from {int(ids.min())} to {int(ids.max())}; the model's vocabulary "
            f"has {vocab} tokens (0 to {vocab - 1})."
        )


def encode(
    tokenizer: Any, texts: str | Sequence[str], *, model: Any = None, max_length: int | None = None
) -> TokenBatch:
    """Tokenize ``texts`` (a string or a list of strings); empty texts are refused; texts longer
    than the model's maximum length are truncated with a warning naming how many tokens went."""
    if isinstance(texts, str):
        texts = [texts]
    if not is_text(texts):
        raise InputError(
            f"text inputs must be a string or a non-empty list of strings; got {type(texts).__name__}."
        )
    for i, t in enumerate(texts):
        if not t.strip():
            raise InputError(f"text {i} is empty; there is nothing to explain.")
    limit = _max_length(tokenizer, model, max_length)

    def tokenized(truncate: bool) -> Any:
        if getattr(tokenizer, "pad_token_id", 0) is None:
            return _padded_without_pad_token(tokenizer, list(texts), limit if truncate else None)
        return tokenizer(
            list(texts),
            padding=True,
            truncation=truncate,
            max_length=limit if truncate else None,
            return_tensors="pt",
            return_special_tokens_mask=True,
        )

    # untruncated first: the lengths tell what a limit drops; only a text over it is tokenized again
    enc = tokenized(False)
    lengths = enc["attention_mask"].sum(1).tolist()
    dropped = tuple(max(0, n - limit) for n in lengths) if limit else tuple(0 for _ in lengths)
    for i, d in enumerate(dropped):
        if d:
            warnings.warn(
                f"text {i} has {lengths[i]} tokens but the model takes at most {limit}: the last {d} token(s) "
                "were dropped (truncated).",
                stacklevel=3,
            )
    if any(dropped):
        enc = tokenized(True)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    if int(mask.sum(1).min()) == 0:
        raise InputError("a text has no tokens after tokenization.")
    tokens, words = [], []
    for i in range(len(texts)):
        n = int(mask[i].sum())
        real = ids[i][mask[i].bool()].tolist()
        tokens.append(tuple(tokenizer.convert_ids_to_tokens(real)))
        try:
            wid = enc.word_ids(i)
            words.append(tuple(w for w, m in zip(wid, mask[i].tolist()) if m))
        except (
            ValueError,
            AttributeError,
        ):  # slow tokenizers have no word ids: merged by '##' pieces
            words.append(tuple([None] * n))
    return TokenBatch(
        texts=tuple(texts),
        input_ids=ids,
        attention_mask=mask,
        special=enc["special_tokens_mask"].bool() & mask.bool(),
        tokens=tuple(tokens),
        word_ids=tuple(words),
        token_type_ids=enc.get("token_type_ids"),
        dropped=dropped,
    )


class _Padded(dict):
    """Tokenizer output padded here (the tokenizer has no pad token), with per-text word ids."""

    def __init__(self, tensors: dict[str, Tensor], word_ids: list[list[int | None]]) -> None:
        super().__init__(tensors)
        self._word_ids = word_ids

    def word_ids(self, i: int) -> list[int | None]:
        return self._word_ids[i]


def _padded_without_pad_token(tokenizer: Any, texts: list[str], max_length: int | None) -> Any:
    """Texts tokenized one by one and padded here, for a tokenizer without a pad token (GPT-2):
    the padded positions get id ``eos_token_id`` (else 0), attention mask 0 and never take part
    in an explanation (every method masks them or explains each text at its own length)."""
    encs = [
        tokenizer(
            t,
            truncation=max_length is not None,
            max_length=max_length,
            return_special_tokens_mask=True,
        )
        for t in texts
    ]
    width = max(len(e["input_ids"]) for e in encs)
    fill = getattr(tokenizer, "eos_token_id", None)
    fill = 0 if fill is None else int(fill)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    keys = [
        k
        for k in ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")
        if k in encs[0]
    ]
    pads = {"input_ids": fill, "attention_mask": 0, "token_type_ids": 0, "special_tokens_mask": 1}
    out: dict[str, Tensor] = {}
    for k in keys:
        rows = []
        for e in encs:
            row, gap = list(e[k]), [pads[k]] * (width - len(e[k]))
            rows.append(gap + row if left else row + gap)
        out[k] = torch.tensor(rows, dtype=torch.long)
    words = []
    for e in encs:
        try:
            wid = list(e.word_ids())
        except (ValueError, AttributeError):
            wid = [None] * len(e["input_ids"])
        gap = [None] * (width - len(wid))
        words.append(gap + wid if left else wid + gap)
    return _Padded(out, words)


def from_mapping(inputs: Mapping[str, Any]) -> dict[str, Tensor]:
    """Dict inputs (``input_ids`` and optionally ``attention_mask``, ``token_type_ids``) checked."""
    if "input_ids" not in inputs:
        raise InputError(f"dict inputs need 'input_ids'; got keys {sorted(inputs)}.")
    out: dict[str, Tensor] = {}
    ids = torch.as_tensor(inputs["input_ids"])
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.is_floating_point() or ids.numel() == 0:
        raise InputError(
            f"input_ids must be integer token ids (N, L); got {tuple(ids.shape)} {ids.dtype}."
        )
    out["input_ids"] = ids.long()
    for key in ("attention_mask", "token_type_ids"):
        if key in inputs and inputs[key] is not None:
            t = torch.as_tensor(inputs[key]).long()
            t = t[None] if t.ndim == 1 else t
            if t.shape != ids.shape:
                raise InputError(
                    f"{key} must have the shape of input_ids {tuple(ids.shape)}; got {tuple(t.shape)}."
                )
            out[key] = t
    unknown = sorted(set(inputs) - {"input_ids", "attention_mask", "token_type_ids"})
    if unknown:
        raise InputError(
            f"dict inputs take input_ids, attention_mask and token_type_ids; got also {unknown}."
        )
    out.setdefault("attention_mask", torch.ones_like(out["input_ids"]))
    return out
