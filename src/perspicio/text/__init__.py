"""Text models: tokenized inputs, per-token explanations, word merging and zero-shot targets.

``perspicio.explain(model, "a sentence", method=...)`` comes here for text (and for dict token
inputs); see :func:`explain_text`.
"""

from __future__ import annotations

from .explain import BASELINE_TOKENS, explain_text, merge_words, token_baseline, token_scores
from .inputs import TokenBatch, encode, find_tokenizer, is_text
from .model import TokenModel, embedding_layer, pack
from .targets import ZeroShot, ZeroShotHead

__all__ = [
    "BASELINE_TOKENS",
    "TokenBatch",
    "TokenModel",
    "ZeroShot",
    "ZeroShotHead",
    "embedding_layer",
    "encode",
    "explain_text",
    "find_tokenizer",
    "is_text",
    "merge_words",
    "pack",
    "token_baseline",
    "token_scores",
]
