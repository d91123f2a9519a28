"""Explaining text models: strings (or dict token inputs) in, one attribution per token out.

:func:`explain_text` tokenizes, packs the token tensors for the model (:class:`TokenModel`), turns
sentence targets into embedding targets, runs the method and returns an
:class:`~perspicio.Explanation` whose ``attributions`` are (N, L) per token (padded with zeros;
``extras["tokens"][i]`` are text ``i``'s token strings), optionally merged into words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..core.explanation import Explanation
from ..core.guard import model_lock
from ..core.targets import EmbeddingSimilarity
from ..errors import InputError, ModelError, OptionError
from .embedding import (
    EMBEDDING_INPUT_METHODS,
    EmbeddingModel,
    embedding_outputs,
    merge_per_text,
    reduce_tokens,
    token_reduction,
)
from .inputs import TokenBatch, check_token_ids, encode, find_tokenizer, from_mapping, is_text
from .model import TokenModel, embedding_layer, pack
from .targets import ScoreHead, ZeroShot, ZeroShotHead, embed

__all__ = [
    "BASELINE_TOKENS",
    "explain_text",
    "merge_words",
    "text_method",
    "token_baseline",
    "token_scores",
]

#: layer Integrated Gradients on the word-embedding layer (or ``layer=``), on the padded batch
EMBEDDING_METHODS = ("layer_integrated_gradients",)
#: methods that remove tokens (replaced by the baseline token) through the packed ids
TOKEN_PERTURBATION_METHODS = (
    "feature_ablation",
    "occlusion",
    "kernel_shap",
    "shapley_exact",
    "shapley_sampling",
    "lime",
)

#: baseline_token names -> tokenizer attribute of the token id
BASELINE_TOKENS = {"pad": "pad_token_id", "mask": "mask_token_id", "unk": "unk_token_id"}


def token_baseline(x: Tensor, special: Tensor, token_id: int) -> Tensor:
    """Packed baseline: every real, non-special token id replaced by ``token_id``; special tokens,
    padding and the attention mask (and token types) unchanged."""
    b = x.clone()
    real = x[:, 1] != 0
    replace = real & ~special
    b[:, 0] = torch.where(replace, torch.full_like(x[:, 0], token_id), x[:, 0])
    return b


def _baseline_id(tokenizer: Any, spec: Any) -> int:
    if isinstance(spec, int) and not isinstance(spec, bool):
        return spec
    if isinstance(spec, str) and spec.lower() in BASELINE_TOKENS:
        tid = (
            getattr(tokenizer, BASELINE_TOKENS[spec.lower()], None)
            if tokenizer is not None
            else None
        )
        if tid is None:
            if spec.lower() == "pad" and tokenizer is None:
                return 0
            raise OptionError(
                f"baseline_token {spec!r}: the tokenizer has no {spec.lower()} token "
                f"({BASELINE_TOKENS[spec.lower()]} is None); pass another of 'pad', 'mask', 'unk', a token "
                "of the vocabulary or a token id (e.g. tokenizer.eos_token_id for GPT-2)."
            )
        return int(tid)
    if isinstance(spec, str) and tokenizer is not None:
        tid = tokenizer.convert_tokens_to_ids(spec)
        if tid is not None and tid != getattr(tokenizer, "unk_token_id", None):
            return int(tid)
    raise OptionError(
        f"baseline_token must be 'pad', 'mask', 'unk', a token of the vocabulary or a token id; got {spec!r}."
    )


def merge_words(
    attributions: Tensor,
    word_ids: Sequence[Sequence[int | None]],
    tokens: Sequence[Sequence[str]],
    tokenizer: Any = None,
) -> tuple[Tensor, tuple[tuple[str, ...], ...]]:
    """Sum the attributions of the sub-word pieces of each word. ``word_ids`` come from a fast
    tokenizer (None for special tokens, which stay words of their own); without them, pieces
    starting with '##' join the previous token (WordPiece). Returns (N, W) and the word strings:
    with ``tokenizer``, its ``convert_tokens_to_string`` of the pieces, stripped (WordPiece
    ``un ##for`` -> ``unfor``, byte-level BPE ``Ġb or ing`` -> ``boring``); without, the pieces
    joined with WordPiece's ``##`` dropped. Special tokens keep their token string."""
    rows, names = [], []
    for i, (wid, toks) in enumerate(zip(word_ids, tokens)):
        groups: list[list[int]] = []
        last: Any = object()
        for j, (w, tok) in enumerate(zip(wid, toks)):
            joins = (
                (w is not None and w == last)
                if any(v is not None for v in wid)
                else (tok.startswith("##") and j)
            )
            if joins and groups:
                groups[-1].append(j)
            else:
                groups.append([j])
            last = w
        rows.append(torch.stack([attributions[i, g].sum() for g in groups]))
        names.append(
            tuple(_word_string([toks[j] for j in g], wid[g[0]], tokenizer) for g in groups)
        )
    width = max(len(r) for r in rows)
    out = attributions.new_zeros(len(rows), width)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out, tuple(names)


def _word_string(pieces: list[str], word_id: int | None, tokenizer: Any) -> str:
    """The text of a word from its pieces (see :func:`merge_words`)."""
    convert = getattr(tokenizer, "convert_tokens_to_string", None)
    if word_id is not None and callable(convert):
        try:
            text = convert(list(pieces))
        except (TypeError, ValueError, KeyError, AttributeError):
            text = None
        if isinstance(text, str) and text.strip():
            return text.strip()
    return "".join(p[2:] if k and p.startswith("##") else p for k, p in enumerate(pieces))


def token_scores(explanation: Explanation, index: int = 0) -> list[tuple[str, float]]:
    """(token, attribution) pairs of text ``index`` of a text explanation."""
    tokens = explanation.extras.get("tokens")
    if tokens is None:
        raise InputError("this explanation has no tokens (it was not computed on text).")
    a = explanation.attributions[index]
    return [(t, float(a[j])) for j, t in enumerate(tokens[index])]


def _text_methods() -> list[str]:
    from ..core.registry import METHODS

    return sorted(
        {e.name for e in METHODS.entries() if e.family == "attention"}
        | set(EMBEDDING_METHODS)
        | set(EMBEDDING_INPUT_METHODS)
        | set(TOKEN_PERTURBATION_METHODS)
    )


#: why a method that exists for images does not run on text
_NOT_FOR_TEXT = {
    "guided_gradcam": "it multiplies by a Grad-CAM map of an image",
    "neuron_gradient": "it explains a unit of an inner layer, not a target score",
    "neuron_integrated_gradients": "it explains a unit of an inner layer, not a target score",
    "deep_shap": "its background would be a set of texts of this text's length; use deeplift with baseline_token",
    "rise": "its masks are image masks; use feature_ablation, kernel_shap or lime on tokens",
}


def text_method(method: str) -> Any:
    """The registry entry of ``method`` if :func:`explain_text` takes it, else an :class:`OptionError`
    saying why (and which methods do)."""
    from ..core.registry import METHODS

    entry = METHODS.get(method)
    if entry.family == "attention" or entry.name in _text_methods():
        return entry
    why = _NOT_FOR_TEXT.get(entry.name)
    raise OptionError(
        f"method {entry.name!r} does not take text{f' ({why})' if why else ''}; methods for text: "
        f"{', '.join(_text_methods())}."
    )


def _word_embedding_layer(inner: nn.Module, tm: TokenModel, layer: Any) -> tuple[str, nn.Module]:
    """(name, module) of the word-embedding layer: ``layer`` (a name in the user's model or in the
    packed-token adapter, or a module), else the model's own (:func:`embedding_layer`)."""
    from ..core.capture import resolve_layer
    from ..errors import LayerError

    spec = layer if layer is not None else embedding_layer(inner)
    try:
        return resolve_layer(inner, spec)
    except LayerError:
        if isinstance(spec, nn.Module):
            raise
        name, module = resolve_layer(tm, spec)  # "model.encoder...": a name in the adapter
        return resolve_layer(inner, module)


#: methods that run the model once per row of one text (saliency, ..., DeepLIFT's two passes):
#: the rows of one text (its targets) run in chunks of this size without the engine's memory probe
_ONE_PASS_METHODS = (
    "saliency",
    "input_x_gradient",
    "guided_backprop",
    "deconvnet",
    "deeplift",
    "lrp",
)
_ONE_PASS_BATCH = 16


def _per_text_embeddings(
    entry: Any,
    tm: TokenModel,
    labels: Any,
    x: Tensor,
    special: Tensor,
    target: Any,
    token_id: int,
    layer: tuple[str, nn.Module],
    options: dict[str, Any],
) -> Explanation:
    """Gradient, path, noise and propagation methods on the word embeddings, one text at a time:
    the method runs on :class:`EmbeddingModel` (the model from its word embeddings, this text's
    mask and token types fixed) with the text's word embeddings as input and, for methods with a
    baseline, the embeddings of the baseline tokens (special tokens kept) as the baseline."""
    from ..methods.base import build
    from ..methods.gradient import check_target_count, slice_target

    if "baseline" in options:
        raise OptionError(
            "on text the baseline is the embedding of the baseline tokens: choose them with baseline_token= "
            "('pad', 'mask', 'unk', a token or an id), not baseline=."
        )
    if "reduce" in options:
        raise OptionError(
            "on text the embedding dimension is reduced per token (saliency: the L2 norm, see docs/text.md); "
            "reduce= is for image channels."
        )
    name = entry.name
    how = token_reduction(name, options)
    cls = entry.cls
    takes_baseline = "baseline" in cls.option_names()
    base_takes_baseline = False  # SmoothGrad around a method with a baseline (IG, DeepLIFT, ...)
    base = options.get("base", "saliency")
    if name in ("smoothgrad", "smoothgrad_sq", "vargrad") and isinstance(base, str):
        from ..core.registry import METHODS

        base_takes_baseline = "baseline" in METHODS.get(base).cls.option_names()
        if "baseline" in (options.get("base_options") or {}):
            raise OptionError(
                "on text the baseline is the embedding of the baseline tokens: choose them with baseline_token=, "
                "not base_options={'baseline': ...}."
            )
    if name == "lrp" and options.get("composite") is None and options.get("rule") is None:
        options = {**options, "composite": "attnlrp"}
    if name in _ONE_PASS_METHODS:
        # one forward (two for DeepLIFT) per target of one text: no chunking to size, so no memory probe
        options = {**options, "batch_size": options.get("batch_size") or _ONE_PASS_BATCH}
    check_target_count(target, len(x))
    parts = []
    for i in range(len(x)):
        n_real = int((x[i, 1] != 0).sum())
        xi = x[i : i + 1, :, :n_real]  # the text's own tokens: padding takes no part
        bi = token_baseline(xi, special[i : i + 1, :n_real], token_id)
        emb = embedding_outputs(tm, layer, torch.cat([xi, bi]))
        ex, eb = emb[:1], emb[1:]
        opts = dict(options)
        if takes_baseline:
            opts["baseline"] = eb
        elif base_takes_baseline:
            opts["base_options"] = {**(opts.get("base_options") or {}), "baseline": eb}
        wrapped = EmbeddingModel(tm, xi, layer)
        method = build(cls, wrapped, labels=labels, **opts)
        if name == "lrp" and method.composite.norm == "identity":
            raise OptionError(
                f"composite {method.composite.name!r} passes relevance through LayerNorm unchanged "
                "(norm='identity'), which on a transformer divides by near-zero pre-normalisation sums at the "
                "residual adds (token relevances of 1e6-1e11 on MiniLM): use composite='attnlrp' (the default "
                "on text) or pass norm='linear'."
            )
        e = method(ex, target=slice_target(target, i, i + 1, len(x)))
        a = reduce_tokens(e.attributions.detach(), how)
        row = torch.zeros(len(a), x.shape[-1], dtype=a.dtype, device=a.device)
        row[:, :n_real] = a
        parts.append((e, row))
    e = merge_per_text(parts, x, [int((x[i, 1] != 0).sum()) for i in range(len(x))])
    extras = dict(e.extras)
    extras["baseline"] = token_baseline(x, special, token_id)  # the packed baseline tokens
    extras["embedding_layer"] = layer[0]
    extras["token_reduction"] = how
    return e.replace(extras=extras, layer=layer[0])


def _per_text(
    cls: Any,
    tm: TokenModel,
    labels: Any,
    x: Tensor,
    special: Tensor,
    target: Any,
    token_id: int,
    options: dict[str, Any],
) -> Explanation:
    """Token perturbations (feature ablation, Shapley values, LIME), one text at a time: a token
    position (its id, mask and type entries) is one feature, replaced by ``token_id``; the mask and
    special tokens equal the input at the baseline, so they never move the score."""
    from ..methods.base import build
    from ..methods.gradient import check_target_count, slice_target

    check_target_count(target, len(x))
    parts = []
    for i in range(len(x)):
        xi = x[i : i + 1]
        n_real = int((xi[0, 1] != 0).sum())
        xi = xi[:, :, :n_real]  # the text's own tokens: padding is not a feature
        base = token_baseline(xi, special[i : i + 1, :n_real], token_id)[0]
        opts = {**options, "baseline": base}
        if "feature_mask" in options:
            raise OptionError(
                "on text every token position is one feature (merge_words=True sums the pieces of a word "
                "afterwards); feature_mask= is for tensors and images."
            )
        if cls.name != "occlusion":  # occlusion slides a window of tokens (window=, stride=) instead
            opts["feature_mask"] = torch.arange(n_real, device=x.device).expand(x.shape[1], n_real)
        e = build(cls, tm, labels=labels, **opts)(xi, target=slice_target(target, i, i + 1, len(x)))
        a = torch.zeros(len(e.attributions), x.shape[-1], dtype=e.attributions.dtype)
        a[:, :n_real] = e.attributions[:, 0]
        parts.append((e, a))
    return merge_per_text(parts, x)


def _check_sentence_embedding(emb: Tensor, select: Any, what: str) -> None:
    """A sentence target compares one embedding per text: per-token states (N, L, D) are refused
    (texts of different lengths could not be compared, and the tokens would need a pooling)."""
    if emb.ndim != 2:
        from ..errors import TargetError

        raise TargetError(
            f"{what} compares one embedding per text, but the model's output"
            f"{f' ({select!r})' if select is not None else ''} is {tuple(emb.shape[1:])} per text - per-token states, "
            "not a sentence embedding: choose a pooled output (e.g. output='pooler_output'), a callable output= that "
            "pools the tokens, or a sentence-embedding model (perspicio.zoo.load('minilm'))."
        )


def explain_text(
    model: Any,
    inputs: str | Sequence[str] | Mapping[str, Any],
    method: str = "attention_rollout",
    target: Any = None,
    *,
    tokenizer: Any = None,
    merge_words: bool = False,
    max_length: int | None = None,
    baseline_token: Any = "pad",
    layer: Any = None,
    **options: Any,
) -> Explanation:
    """Explain a text model on ``inputs`` (strings, or a dict with ``input_ids``/``attention_mask``).

    Args:
        model: a bundled text model (``perspicio.zoo.load("minilm")``) or a Hugging Face model taking
            ``input_ids``/``attention_mask`` (its output selected by ``output=`` as usual).
        target: for classifiers a class index or name; for sentence encoders another sentence (str:
            the cosine similarity of the embeddings, :class:`EmbeddingSimilarity`), a
            :class:`ZeroShot`, or any callable on the output.
        tokenizer: a Hugging Face tokenizer (bundled models bring theirs).
        merge_words: sum the attributions of sub-word pieces into words.
        max_length: longest input in tokens (default: the model's); longer texts are truncated with
            a warning naming how many tokens were dropped.
        baseline_token: what replaces the tokens at the baseline of Integrated Gradients and
            perturbation methods: "pad" (default), "mask", "unk", a token or a token id. Special
            tokens ([CLS], [SEP]) and the attention mask are kept.
        **options: the method's options (e.g. ``steps``, ``query``, ``layer`` for ``attention``).
    """
    from ..core.blackbox import unwrap_model
    from ..core.guard import shared_walk
    from ..methods.base import build

    if not isinstance(merge_words, bool):
        raise OptionError(f"merge_words must be True or False; got {merge_words!r}.")
    inner, labels = unwrap_model(model)
    if not isinstance(inner, nn.Module) or getattr(inner, "is_black_box", False):
        raise ModelError(
            "explain_text needs a torch text model; for a black-box callable on strings use a "
            "model-agnostic method (occlusion, lime, kernel_shap) through perspicio.explain."
        )
    entry = text_method(method)
    if labels is None:  # Hugging Face classifiers name their classes in the config
        id2label = getattr(getattr(inner, "config", None), "id2label", None)
        if isinstance(id2label, Mapping) and id2label and all(isinstance(k, int) for k in id2label):
            labels = [str(id2label[i]) for i in range(max(id2label) + 1) if i in id2label] or None
    batch: TokenBatch | None = None
    if is_text(inputs):
        tok = find_tokenizer(model, tokenizer)
        batch = encode(tok, inputs, model=model, max_length=max_length)
        tensors = batch.tensors()
        special = batch.special
    elif isinstance(inputs, Mapping):
        tok = tokenizer or getattr(getattr(model, "preprocess", None), "tokenizer", None)
        tensors = from_mapping(inputs)
        special = torch.zeros_like(tensors["input_ids"], dtype=torch.bool)
        if tok is not None and hasattr(tok, "all_special_ids"):
            special = torch.isin(tensors["input_ids"], torch.tensor(tok.all_special_ids))
    else:
        raise InputError(
            f"text inputs must be a string, a list of strings or a dict of token tensors; got "
            f"{type(inputs).__name__}."
        )
    check_token_ids(inner, tensors)
    keys = tuple(tensors)
    tm = TokenModel(inner, keys)
    device = next((p.device for p in inner.parameters()), torch.device("cpu"))
    x = pack(tensors, keys).to(device)
    special = special.to(device)

    select = options.pop("output", None)
    sentence_name = None  # a sentence target's name, for methods that name no callable target
    if isinstance(target, ZeroShot):
        if tok is None:
            raise ModelError("a ZeroShot target needs the tokenizer (pass tokenizer=...).")
        lab = encode(tok, list(target.labels), model=model, max_length=max_length)
        refs = embed(tm, pack(lab.tensors(), keys).to(device), select)
        _check_sentence_embedding(refs, select, "a ZeroShot target")
        options["output"] = ZeroShotHead(refs, select)
        labels = target.labels
        target = target.target
    else:
        if select is not None:
            options["output"] = select
        if isinstance(target, str) and not (labels and target in list(labels)):
            if tok is None:
                raise ModelError("a sentence target needs the tokenizer (pass tokenizer=...).")
            other = encode(tok, [target], model=model, max_length=max_length)
            ref = embed(tm, pack(other.tensors(), keys).to(device), select)
            _check_sentence_embedding(ref, select, f"the sentence target {target!r}")
            if entry.name in EMBEDDING_INPUT_METHODS:  # the similarity inside the output (below)
                options["output"] = ZeroShotHead(ref, select)
                labels, target = (f"similarity to {target!r}",), 0
            else:
                sim = EmbeddingSimilarity(ref[0])
                sim.__name__ = f"similarity to {target!r}"  # type: ignore[attr-defined]
                sentence_name = sim.__name__
                target = sim
        if (
            entry.name in EMBEDDING_INPUT_METHODS
            and callable(target)
            and not isinstance(target, Tensor)
        ):
            # a callable target becomes part of the output, so DeepLIFT and LRP propagate through
            # its operations (a cosine similarity is not linear at the output)
            options["output"] = ScoreHead(target, select)
            labels, target = (getattr(target, "__name__", "target"),), 0
    if (
        entry.family == "attention"
    ):  # every attention map is kept anyway: one chunk, no memory probe
        options.setdefault("batch_size", len(x))
    cls = entry.cls
    if entry.name in EMBEDDING_METHODS:
        options["layer"] = _word_embedding_layer(inner, tm, layer)[1]
        options["baseline"] = token_baseline(x, special, _baseline_id(tok, baseline_token))
    elif layer is not None and entry.name not in EMBEDDING_INPUT_METHODS:
        options["layer"] = layer
    with model_lock(inner):
        if entry.name in TOKEN_PERTURBATION_METHODS:
            e = _per_text(
                cls, tm, labels, x, special, target, _baseline_id(tok, baseline_token), options
            )
        elif entry.name in EMBEDDING_INPUT_METHODS:
            e = _per_text_embeddings(
                entry,
                tm,
                labels,
                x,
                special,
                target,
                _baseline_id(tok, baseline_token),
                _word_embedding_layer(inner, tm, layer),
                options,
            )
        else:
            with shared_walk(tm):  # the method's construction and call walk the model once
                e = build(cls, tm, labels=labels, **options)(x, target=target)
    attr = e.attributions
    if attr.ndim == 3 and entry.name in EMBEDDING_METHODS:
        attr = attr.sum(dim=-1)  # per token: the sum over the embedding dimensions
    elif attr.ndim == 3:
        attr = attr[:, 0]  # perturbations of the packed ids: the input_ids row
    per = len(attr) // len(x)  # several targets per text: rows text-major
    mask = (x[:, keys.index("attention_mask")] != 0).repeat_interleave(per, dim=0)
    attr = attr * mask
    if batch is not None:
        tokens, word_ids = batch.tokens, batch.word_ids
    else:
        ids = [x[i, 0][x[i, keys.index("attention_mask")] != 0].tolist() for i in range(len(x))]
        tokens = tuple(
            tuple(tok.convert_ids_to_tokens(r)) if tok is not None else tuple(str(t) for t in r)
            for r in ids
        )
        word_ids = tuple(tuple([None] * len(r)) for r in ids)
    if per > 1:
        tokens = tuple(t for t in tokens for _ in range(per))
        word_ids = tuple(w for w in word_ids for _ in range(per))
        special = special.repeat_interleave(per, dim=0)
    extras = {
        **e.extras,
        "tokens": tokens,
        "token_mask": mask,
        "special_tokens": special,
        "word_ids": word_ids,
    }
    if batch is not None:
        extras["texts"] = batch.texts
        extras["dropped_tokens"] = batch.dropped
    if merge_words:
        extras["pieces"], extras["piece_attributions"] = tokens, attr
        attr, words = merge_words_fn(attr, word_ids, tokens, tok)
        extras["tokens"] = words
        extras["token_mask"] = torch.tensor(
            [[j < len(w) for j in range(attr.shape[1])] for w in words]
        )
    options_out = {**e.options, "merge_words": merge_words, "baseline_token": baseline_token}
    names = e.target_names
    if names is None and sentence_name is not None:  # every method names a sentence target alike
        names = (sentence_name,) * len(attr)
    return e.replace(attributions=attr, extras=extras, options=options_out, target_names=names)


merge_words_fn = merge_words
