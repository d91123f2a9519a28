"""Differential sweep of the transformer support on architectures the other tests do not build.

Tiny randomly initialised Hugging Face and timm models (nothing downloads). Each check compares
perspicio with an independent reference computed here: Hugging Face's ``output_attentions=True``
(eager attention), the formulas of Abnar & Zuidema (rollout) and Chefer et al. (gradient-weighted
relevance) written out from those attentions and their autograd gradients, timm's eager attention
(read before its dropout) for the fused ``F.scaled_dot_product_attention`` path. Architectures the
attention methods cannot read (windowed attention) must be refused with a perspicio error.
"""

from __future__ import annotations

import pytest
import torch
from conftest import hook_report
from torch import nn

import perspicio
from perspicio.errors import ModelError, OptionError

transformers = pytest.importorskip("transformers")

V = 100  # vocabulary of the tiny text models


def _eager(config):
    config._attn_implementation = "eager"
    return config


def _build(cls, config) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return cls(_eager(config)).eval()


_SMALL = dict(
    vocab_size=V,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=32,
)


def _text_model(arch: str) -> tuple[nn.Module, str]:
    """(model, output key) of a tiny text model."""
    t = transformers
    if arch == "bert":
        return _build(
            t.BertForSequenceClassification, t.BertConfig(**_SMALL, num_labels=3)
        ), "logits"
    if arch == "roberta":
        cfg = t.RobertaConfig(**_SMALL, num_labels=3, pad_token_id=1)
        return _build(t.RobertaForSequenceClassification, cfg), "logits"
    if arch == "xlm_roberta":
        cfg = t.XLMRobertaConfig(**_SMALL, num_labels=3, pad_token_id=1)
        return _build(t.XLMRobertaForSequenceClassification, cfg), "logits"
    if arch == "distilbert":
        cfg = t.DistilBertConfig(
            vocab_size=V,
            dim=32,
            n_layers=2,
            n_heads=4,
            hidden_dim=64,
            max_position_embeddings=32,
            num_labels=3,
        )
        return _build(t.DistilBertForSequenceClassification, cfg), "logits"
    if arch == "albert":  # one layer module called num_hidden_layers times
        return _build(
            t.AlbertModel, t.AlbertConfig(**_SMALL, embedding_size=16)
        ), "last_hidden_state"
    if arch == "electra":
        cfg = t.ElectraConfig(**_SMALL, num_labels=3, embedding_size=16)
        return _build(t.ElectraForSequenceClassification, cfg), "logits"
    if arch == "deberta_v2":  # relative (disentangled) attention
        cfg = t.DebertaV2Config(
            **_SMALL, num_labels=3, relative_attention=True, pos_att_type=["p2c", "c2p"]
        )
        return _build(t.DebertaV2ForSequenceClassification, cfg), "logits"
    if arch == "gpt2":  # causal decoder, pools the last real token
        cfg = t.GPT2Config(
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=32,
            num_labels=3,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
        )
        return _build(t.GPT2ForSequenceClassification, cfg), "logits"
    raise AssertionError(arch)


TEXT_ARCHS = (
    "bert",
    "roberta",
    "xlm_roberta",
    "distilbert",
    "albert",
    "electra",
    "deberta_v2",
    "gpt2",
)


def _tokens(arch: str) -> dict[str, torch.Tensor]:
    """Two texts of different lengths (the second padded), token types for BERT."""
    ids = torch.randint(5, V, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    if arch == "gpt2":  # decoders are padded on the left
        mask[1, :3] = 0
        ids[1, :3] = 0
    else:
        mask[1, 6:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if arch == "bert":
        types = torch.zeros_like(ids)
        types[:, 5:] = 1
        out["token_type_ids"] = types
    return out


def _score(arch: str, out) -> torch.Tensor:
    if arch == "albert":
        return out.last_hidden_state[:, 0].sum(-1)
    return out.logits[:, 1]


def _target(arch: str):
    return (lambda o: o[:, 0].sum(-1)) if arch == "albert" else 1


def _hand_rollout(atts) -> torch.Tensor:
    r = None
    for a in atts:
        a = a.double()
        m = 0.5 * a.mean(1) + 0.5 * torch.eye(a.shape[-1], dtype=torch.float64)
        m = m / m.sum(-1, keepdim=True)
        r = m if r is None else m @ r
    return r


def _hand_chefer(atts, grads) -> torch.Tensor:
    r = None
    for a, g in zip(atts, grads):
        a, g = a.double(), g.double()
        cam = torch.stack([(g[:, h] * a[:, h]).clamp(min=0) for h in range(a.shape[1])]).mean(0)
        if r is None:
            r = torch.eye(a.shape[-1], dtype=torch.float64).expand_as(cam).clone()
        r = r + cam @ r
    return r


def _query_rows(arch: str, mask: torch.Tensor) -> list[int]:
    """The query the paper's setting reads: [CLS] (token 0), or a decoder's last real token."""
    if arch == "gpt2":
        return [int(torch.nonzero(m).max()) for m in mask]
    return [0] * len(mask)


@pytest.fixture(scope="module", params=TEXT_ARCHS)
def text_case(request):
    model, key = _text_model(request.param)
    return request.param, model, key, _tokens(request.param)


def test_attention_equals_output_attentions(text_case) -> None:
    arch, model, key, inputs = text_case
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions
    e = perspicio.explain(model, inputs, method="attention", output=key)
    stack = e.extras["attentions"]
    assert stack.shape == (2, len(ref), *ref[0].shape[1:])
    assert float((stack - torch.stack(ref, 1)).abs().max()) <= 1e-6
    # single layers and heads through layer= / head= (the stack above holds every one)
    for layer, head in ((0, 3), (-1, 1)):
        one = perspicio.explain(
            model, inputs, method="attention", output=key, layer=layer, head=head, query="cls"
        )
        want = ref[layer][:, head, 0] * inputs["attention_mask"]
        assert float((one.attributions - want).abs().max()) <= 1e-6


def test_rollout_equals_abnar_zuidema(text_case) -> None:
    arch, model, key, inputs = text_case
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions
    e = perspicio.explain(model, inputs, method="attention_rollout", output=key)
    assert e.extras["causal"] == (arch == "gpt2")
    rows = _query_rows(arch, mask)
    assert e.extras["query_weights"].argmax(1).tolist() == rows
    for i in range(2):  # each text on its own real tokens: padding takes no part
        real = mask[i]
        r = _hand_rollout([a[i : i + 1][:, :, real][:, :, :, real] for a in ref])[0]
        q = int(real[: rows[i]].sum())  # the query's index among the real tokens
        assert float((e.attributions[i][real].double() - r[q]).abs().max()) <= 1e-6
        assert bool((e.attributions[i][~real] == 0).all())


def test_transformer_attribution_equals_chefer(text_case) -> None:
    arch, model, key, inputs = text_case
    mask = inputs["attention_mask"]
    out = model(**inputs, output_attentions=True)
    score = _score(arch, out)
    grads = torch.autograd.grad(score.sum(), list(out.attentions))
    r = _hand_chefer([a.detach() for a in out.attentions], grads)
    e = perspicio.explain(
        model, inputs, method="transformer_attribution", output=key, target=_target(arch)
    )
    rows = _query_rows(arch, mask.bool())
    want = torch.stack([r[i, q] for i, q in enumerate(rows)]) * mask
    assert float((e.attributions.double() - want).abs().max()) <= 1e-6
    assert float((e.scores - score.detach()).abs().max()) <= 1e-6
    assert all(p.grad is None for p in model.parameters())


def test_decoder_query_is_the_last_real_token_and_options_still_choose() -> None:
    model, key = _text_model("gpt2")
    inputs = _tokens("gpt2")
    e = perspicio.explain(model, inputs, method="attention_rollout", output=key)
    assert e.extras["query_weights"].argmax(1).tolist() == [8, 8]
    cls = perspicio.explain(model, inputs, method="attention_rollout", output=key, query="cls")
    # a causal model's first token sees only itself: its rollout row is the unit vector
    assert cls.attributions[0].tolist() == [1.0] + [0.0] * 8
    last = perspicio.explain(model, inputs, method="attention_rollout", output=key, query="last")
    assert torch.equal(last.attributions, e.attributions)
    bert, bkey = _text_model("bert")
    b = perspicio.explain(bert, _tokens("bert"), method="attention_rollout", output=bkey)
    assert not b.extras["causal"] and b.extras["query_weights"].argmax(1).tolist() == [0, 0]
    with pytest.raises(OptionError, match="'last'"):
        perspicio.explain(model, inputs, method="attention_rollout", output=key, query="first")


def test_shared_layers_are_read_at_every_call() -> None:
    model, key = _text_model("albert")
    inputs = _tokens("albert")
    e = perspicio.explain(model, inputs, method="attention", output=key, layer=1)
    names = e.extras["attention_layers"]
    assert len(names) == 2 and names[0] == names[1]  # one module, two calls
    with torch.no_grad():
        ref = model(**inputs, output_attentions=True).attentions
    want = ref[1].mean(1)[:, 0] * inputs["attention_mask"]
    assert float((e.attributions - want).abs().max()) <= 1e-6
    with pytest.raises(OptionError, match=r"runs 2 times.*layer=\[0, 1\]"):
        perspicio.explain(model, inputs, method="attention", output=key, layer=names[0])


def test_text_model_left_as_found() -> None:
    model, key = _text_model("gpt2")
    inputs = _tokens("gpt2")
    model.train()
    hooks = hook_report(model)
    flags = [m.training for m in model.modules()]
    needs = [p.requires_grad for p in model.parameters()]
    try:
        for method in ("attention", "attention_rollout", "transformer_attribution"):
            perspicio.explain(model, inputs, method=method, output=key, target=1)
            assert [m.training for m in model.modules()] == flags
            assert [p.requires_grad for p in model.parameters()] == needs
            assert all(p.grad is None for p in model.parameters())
            assert hook_report(model) == hooks
            assert not torch.overrides._get_current_function_mode_stack()
    finally:
        model.eval()


# ---------------------------------------------------------------------------- vision


def _hf_vision(arch: str) -> nn.Module:
    t = transformers
    kw = dict(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=5,
    )
    if arch == "vit":
        return _build(t.ViTForImageClassification, t.ViTConfig(**kw))
    if arch == "deit":  # class + distillation token
        return _build(t.DeiTForImageClassificationWithTeacher, t.DeiTConfig(**kw))
    if arch == "swin":
        cfg = t.SwinConfig(
            image_size=32,
            patch_size=4,
            embed_dim=16,
            depths=[1, 1],
            num_heads=[2, 2],
            window_size=4,
            num_labels=5,
        )
        return _build(t.SwinForImageClassification, cfg)
    raise AssertionError(arch)


def _pixels(size: int = 32) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch,extra", [("vit", 1), ("deit", 2)])
def test_hf_vision_attention_rollout_and_chefer(arch: str, extra: int) -> None:
    model = _hf_vision(arch)
    x = _pixels()
    out = model(pixel_values=x, output_attentions=True)
    atts = out.attentions
    grads = torch.autograd.grad(out.logits[:, 1].sum(), list(atts))
    e = perspicio.explain(model, x, method="attention", output="logits")
    assert float((e.extras["attentions"] - torch.stack(atts, 1).detach()).abs().max()) <= 1e-6
    assert e.provenance["extra_tokens"] == extra
    r = perspicio.explain(model, x, method="attention_rollout", output="logits")
    roll = _hand_rollout([a.detach() for a in atts])
    assert float((r.extras["relevance_matrix"].double() - roll).abs().max()) <= 1e-6
    # the class token's row over the 16 patches, extra tokens dropped, row-major on the 4 x 4 grid
    assert r.raw.shape == (2, 1, 4, 4)
    assert float((r.raw.flatten(1).double() - roll[:, 0, extra:]).abs().max()) <= 1e-6
    c = perspicio.explain(model, x, method="transformer_attribution", output="logits", target=1)
    chef = _hand_chefer([a.detach() for a in atts], grads)
    assert float((c.raw.flatten(1).double() - chef[:, 0, extra:]).abs().max()) <= 1e-6
    # extra_tokens given explicitly is honoured (and a wrong count is refused)
    same = perspicio.explain(
        model, x, method="attention_rollout", output="logits", extra_tokens=extra
    )
    assert torch.equal(same.raw, r.raw)
    with pytest.raises(perspicio.errors.LayerError, match="extra_tokens"):
        perspicio.explain(model, x, method="attention_rollout", output="logits", extra_tokens=3)


def test_hf_deit_gradcam_auto_layer_drops_both_extra_tokens() -> None:
    from perspicio.core.capture import Capture, auto_layer, resolve_layer

    model = _hf_vision("deit")
    x = _pixels()
    name = auto_layer(model, x)
    e = perspicio.explain(model, x, method="gradcam", target=1, output="logits")
    assert e.layer == name and e.raw.shape == (2, 1, 4, 4)
    # Grad-CAM by hand on the auto layer's tokens: 2 extra tokens dropped, 16 patches on the grid
    with Capture([resolve_layer(model, name)[1]], grad=True) as cap:
        y = model(pixel_values=x).logits[:, 1]
    act = cap.last(0)
    (g,) = torch.autograd.grad(y.sum(), act)
    assert act.shape[1] == 18
    a = act[:, 2:].detach().reshape(2, 4, 4, -1).permute(0, 3, 1, 2)
    w = g[:, 2:].reshape(2, 4, 4, -1).permute(0, 3, 1, 2).mean((2, 3), keepdim=True)
    cam = (w * a).sum(1, keepdim=True).clamp(min=0)
    assert float((e.raw - cam).abs().max()) <= 1e-5 * max(1.0, float(cam.abs().max()))


@pytest.mark.parametrize("method", ["attention", "attention_rollout", "transformer_attribution"])
def test_windowed_attention_is_refused_clearly(method: str) -> None:
    model = _hf_vision("swin")
    with pytest.raises(ModelError, match="windowed or grouped attention"):
        perspicio.explain(model, _pixels(), method=method, output="logits", target=1)
    assert not hook_report(model)
    assert not torch.overrides._get_current_function_mode_stack()


# ---------------------------------------------------------------------------- timm


def _timm(name: str = "vit_tiny_patch16_224", **kw) -> nn.Module:
    timm = pytest.importorskip("timm")
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=4, num_classes=5)
    args.update(kw)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(name, pretrained=False, **args).eval()


def _timm_eager_attention(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """timm's own eager attention (fused_attn off), read at the input of its attention dropout."""
    got: list[torch.Tensor] = []
    blocks = list(model.blocks)
    hooks = [
        b.attn.attn_drop.register_forward_hook(lambda m, a, o: got.append(a[0])) for b in blocks
    ]
    try:
        for b in blocks:
            b.attn.fused_attn = False
        with torch.no_grad():
            model(x)
    finally:
        for b in blocks:
            b.attn.fused_attn = True
        for h in hooks:
            h.remove()
    return got


@pytest.mark.parametrize(
    "name,kw,extra",
    [
        ("vit_tiny_patch16_224", {}, 1),
        ("deit_tiny_distilled_patch16_224", {}, 2),
        ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),
    ],
)
def test_timm_fused_attention_equals_eager_and_extra_tokens(
    name: str, kw: dict, extra: int
) -> None:
    model = _timm(name, **kw)
    assert all(b.attn.fused_attn for b in model.blocks)  # F.scaled_dot_product_attention
    x = _pixels()
    eager = _timm_eager_attention(model, x)
    e = perspicio.explain(model, x, method="attention")
    assert float((e.extras["attentions"] - torch.stack(eager, 1)).abs().max()) <= 1e-6
    assert e.provenance["extra_tokens"] == extra and e.raw.shape == (2, 1, 4, 4)
    r = perspicio.explain(model, x, method="attention_rollout")
    roll = _hand_rollout(eager)
    assert float((r.raw.flatten(1).double() - roll[:, 0, extra:]).abs().max()) <= 1e-6
    same = perspicio.explain(model, x, method="attention_rollout", extra_tokens=extra)
    assert torch.equal(same.raw, r.raw)


def test_timm_pooling_heads_and_global_average_pooling() -> None:
    x = _pixels()
    # attention pooling (MAP): its latent-query attention is no self-attention and is left out
    m = _timm(global_pool="map")
    e = perspicio.explain(m, x, method="attention_rollout")
    assert e.extras["attention_layers"] == ("blocks.0.attn", "blocks.1.attn")
    skipped = e.extras["skipped_attention_layers"]
    assert len(skipped) == 1 and skipped[0].startswith("attn_pool")
    # the output is pooled from the patch tokens, not the class token: query = their mean
    w = e.extras["query_weights"][0]
    assert float(w[0]) == 0.0 and torch.allclose(w[1:], torch.full((16,), 1 / 16, dtype=w.dtype))
    # naming the modules by hand keeps the refusal of the non-square map
    with pytest.raises(ModelError, match="self-attention"):
        perspicio.explain(
            m,
            x,
            method="attention_rollout",
            attention_modules=["blocks.0.attn", "blocks.1.attn", "attn_pool"],
        )
    gap = _timm(global_pool="avg")  # class token kept, mean-pooled patch tokens
    e = perspicio.explain(gap, x, method="attention_rollout")
    assert float(e.extras["query_weights"][0, 0]) == 0.0 and e.provenance["extra_tokens"] == 1


def test_timm_swin_is_refused_and_its_cam_reads_channels_last() -> None:
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = timm.create_model(
            "swin_tiny_patch4_window7_224",
            pretrained=False,
            img_size=56,
            embed_dim=24,
            depths=(1, 1),
            num_heads=(1, 2),
            num_classes=5,
        ).eval()
    x = _pixels(56)
    with pytest.raises(ModelError, match="windowed or grouped attention"):
        perspicio.explain(m, x, method="attention_rollout")
    e = perspicio.explain(m, x, method="gradcam", target=0)
    assert e.layer == "layers.1.blocks.0" and e.raw.shape == (2, 1, 7, 7)


# ---------------------------------------------------------------------------- bad token inputs


@pytest.mark.parametrize("method", ["attention_rollout", "integrated_gradients", "lrp"])
def test_token_ids_beyond_the_model_are_input_errors(method: str) -> None:
    from perspicio.errors import InputError

    bert, key = _text_model("bert")  # 32 positions
    ids = torch.randint(5, V, (1, 33), generator=torch.Generator().manual_seed(0))
    with pytest.raises(InputError, match="33 tokens but the model takes at most 32"):
        perspicio.explain(bert, {"input_ids": ids}, method=method, output=key, target=0)
    with pytest.raises(InputError, match="vocabulary has 100 tokens"):
        perspicio.explain(
            bert, {"input_ids": torch.tensor([[5, 100]])}, method=method, output=key, target=0
        )
    # RoBERTa counts positions from padding_idx + 1: 32 positions hold 30 tokens
    roberta, key = _text_model("roberta")
    with pytest.raises(InputError, match="31 tokens but the model takes at most 30"):
        perspicio.explain(roberta, {"input_ids": ids[:, :31]}, method=method, output=key, target=0)
    e = perspicio.explain(roberta, {"input_ids": ids[:, :30]}, method=method, output=key, target=0)
    assert e.attributions.shape == (1, 30)


# ---------------------------------------------------------------------------- AttnLRP vs lxt


class _ViTFromTokens(nn.Module):
    """A Hugging Face ViT classifier from its embedding output (class token + patches + position):
    the transformer blocks, the final LayerNorm, the class token, the classifier."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.vit.vit.layers:
            h = layer(h)
        return self.vit.classifier(self.vit.vit.layernorm(h)[:, 0])


def _lxt_vit(vit: nn.Module, h0: torch.Tensor, cls: int, eps: float) -> torch.Tensor:
    """The same forward written with lxt's explicit AttnLRP functions (GELU: identity rule)."""
    lf = pytest.importorskip("lxt.explicit.functional")

    class GeluIdentity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            return torch.nn.functional.gelu(x)

        @staticmethod
        def backward(ctx, r):  # noqa: ANN001, ANN205
            return r

    def norm(u, ln):  # noqa: ANN001, ANN202
        return lf.layer_norm_grad_fn.apply(u, ln.weight, ln.bias, ln.eps, eps)

    def lin(u, layer):  # noqa: ANN001, ANN202
        return lf.linear_epsilon(u, layer.weight, layer.bias, epsilon=eps)

    x = h0.clone().requires_grad_(True)
    n, t, d = x.shape
    heads = vit.config.num_attention_heads
    h = x
    for layer in vit.vit.layers:
        a = norm(h, layer.layernorm_before)
        sa = layer.attention

        def split(u):  # noqa: ANN001, ANN202
            return u.view(n, t, heads, d // heads).transpose(1, 2)

        q, k, v = split(lin(a, sa.q_proj)), split(lin(a, sa.k_proj)), split(lin(a, sa.v_proj))
        s = lf.mul2(lf.matmul(q, k.transpose(-1, -2), epsilon=eps), (d // heads) ** -0.5)
        ctx = lf.matmul(lf.softmax(s, -1), v, epsilon=eps).transpose(1, 2).reshape(n, t, d)
        h = lf.add2(lin(ctx, sa.o_proj), h, epsilon=eps)
        b = GeluIdentity.apply(lin(norm(h, layer.layernorm_after), layer.mlp.fc1))
        h = lf.add2(lin(b, layer.mlp.fc2), h, epsilon=eps)
    y = lin(norm(h, vit.vit.layernorm)[:, 0], vit.classifier)[:, cls]
    y.backward(y.detach())
    return x.grad


def _vit_with_biases() -> nn.Module:
    vit = _hf_vision("vit").double()
    with torch.no_grad():  # Hugging Face initialises biases to 0: give the rules some to handle
        g = torch.Generator().manual_seed(3)
        for name, p in vit.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return vit


def test_attnlrp_on_hf_vit_agrees_with_lxt() -> None:
    pytest.importorskip("lxt")
    vit = _vit_with_biases()
    with torch.no_grad():
        h0 = vit.vit.embeddings(_pixels()[:1].double())
    ours = perspicio.explain(
        _ViTFromTokens(vit).eval(), h0, method="lrp", composite="attnlrp", target=2, epsilon=1e-12
    ).attributions
    theirs = _lxt_vit(vit, h0, 2, eps=1e-12)
    assert float((ours - theirs).abs().max()) <= 1e-7 * float(theirs.abs().max())


def test_attnlrp_on_hf_vit_conserves_where_the_rules_promise() -> None:
    from perspicio.methods.propagation.transformer_rules import relevance_budget

    vit = _hf_vision("vit").double()
    with torch.no_grad():
        for name, p in vit.named_parameters():
            if name.endswith("bias"):
                p.zero_()
        h0 = vit.vit.embeddings(_pixels()[:1].double())
    model = _ViTFromTokens(vit).eval()
    # CP-LRP (softmax a constant gate): every rule conserves
    e = perspicio.explain(
        model,
        h0,
        method="lrp",
        composite="attnlrp",
        attention="constant",
        target=2,
        epsilon=1e-12,
    )
    score = float(e.scores[0])
    assert abs(float(e.attributions.sum()) - score) <= 1e-9 * max(1.0, abs(score))
    # AttnLRP: the softmaxes keep their Taylor bias terms, and nothing else keeps anything
    e = perspicio.explain(
        model, h0, method="lrp", composite="attnlrp", target=2, epsilon=1e-12, record_layers=True
    )
    budget = relevance_budget(e)
    kept = {k for k, v in budget.absorbed.items() if float(v.abs().max()) > 1e-9 * abs(score)}
    assert kept == {"softmax"} and abs(float(budget.residual[0])) <= 1e-9 * max(1.0, abs(score))


class _GPT2FromEmbeds(nn.Module):
    """GPT-2's sequence classifier from its token embeddings (the last token's score)."""

    def __init__(self, gpt2: nn.Module) -> None:
        super().__init__()
        self.gpt2 = gpt2

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.gpt2.score(self.gpt2.transformer(inputs_embeds=e).last_hidden_state[:, -1])


def _lxt_gpt2(gpt2: nn.Module, e: torch.Tensor, cls: int, eps: float) -> torch.Tensor:
    """GPT-2 written with lxt's explicit functions: Conv1D as linear_epsilon with W^T, the causal
    mask on the scores, tanh-GELU with the identity rule."""
    lf = pytest.importorskip("lxt.explicit.functional")

    class GeluIdentity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):  # noqa: ANN001, ANN205
            return torch.nn.functional.gelu(x, approximate="tanh")

        @staticmethod
        def backward(ctx, r):  # noqa: ANN001, ANN205
            return r

    def norm(u, ln):  # noqa: ANN001, ANN202
        return lf.layer_norm_grad_fn.apply(u, ln.weight, ln.bias, ln.eps, eps)

    def conv(u, c):  # noqa: ANN001, ANN202
        return lf.linear_epsilon(u, c.weight.T, c.bias, epsilon=eps)

    x = e.clone().requires_grad_(True)
    n, t, d = x.shape
    heads = gpt2.config.n_head
    tr = gpt2.transformer
    h = lf.add2(x, tr.wpe.weight[:t][None].detach().expand(n, t, d), epsilon=eps)
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    for blk in tr.h:
        qkv = conv(norm(h, blk.ln_1), blk.attn.c_attn)
        q, k, v = (u.view(n, t, heads, d // heads).transpose(1, 2) for u in qkv.split(d, dim=2))
        s = lf.mul2(lf.matmul(q, k.transpose(-1, -2), epsilon=eps), (d // heads) ** -0.5)
        s = s.masked_fill(~causal, torch.finfo(s.dtype).min)
        ctx = lf.matmul(lf.softmax(s, -1), v, epsilon=eps).transpose(1, 2).reshape(n, t, d)
        h = lf.add2(conv(ctx, blk.attn.c_proj), h, epsilon=eps)
        b = GeluIdentity.apply(conv(norm(h, blk.ln_2), blk.mlp.c_fc))
        h = lf.add2(conv(b, blk.mlp.c_proj), h, epsilon=eps)
    y = lf.linear_epsilon(norm(h, tr.ln_f)[:, -1], gpt2.score.weight, None, epsilon=eps)[:, cls]
    y.backward(y.detach())
    return x.grad


def test_attnlrp_on_gpt2_agrees_with_lxt_and_the_text_route() -> None:
    """GPT-2's Conv1D (torch.addmm) and gelu_new (written out with pow and tanh) get AttnLRP's
    rules: the affine rule, and the identity rule of one tanh-GELU."""
    pytest.importorskip("lxt")
    gpt2, key = _text_model("gpt2")
    gpt2 = gpt2.double()
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for name, p in gpt2.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    ids = torch.randint(5, V, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        e0 = gpt2.transformer.wte(ids)
    hooks = hook_report(gpt2)
    ours = perspicio.explain(
        _GPT2FromEmbeds(gpt2).eval(),
        e0,
        method="lrp",
        composite="attnlrp",
        target=1,
        epsilon=1e-12,
    ).attributions
    theirs = _lxt_gpt2(gpt2, e0, 1, eps=1e-12)
    assert float((ours - theirs).abs().max()) <= 1e-7 * float(theirs.abs().max())
    text = perspicio.explain(
        gpt2, {"input_ids": ids}, method="lrp", output=key, target=1, epsilon=1e-12
    )
    assert text.extras["tokens"][0] == tuple(str(i) for i in ids[0].tolist())
    assert float((text.attributions[0] - ours[0].sum(-1)).abs().max()) <= 1e-12
    assert hook_report(gpt2) == hooks


def test_hand_written_norms_and_activations_run_as_one_operation() -> None:
    """ALBERT's gelu_new and Llama's RMSNorm (x * rsqrt(mean(x^2) + eps)) propagate as F.gelu /
    F.rms_norm: no operation without a rule, and a bias-free model conserves under CP-LRP."""
    t = transformers
    albert = _build(
        t.AlbertForSequenceClassification, t.AlbertConfig(**_SMALL, embedding_size=16, num_labels=3)
    )
    llama = _build(
        t.LlamaForSequenceClassification,
        t.LlamaConfig(**_SMALL, num_key_value_heads=2, num_labels=3, pad_token_id=0),
    )
    ids = torch.randint(5, V, (1, 7), generator=torch.Generator().manual_seed(2))
    for model in (albert, llama):
        model = model.double()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("bias") or "position_embeddings" in name or "token_type" in name:
                    p.zero_()
        e = perspicio.explain(
            model,
            {"input_ids": ids},
            method="lrp",
            output="logits",
            target=1,
            attention="constant",
            epsilon=1e-12,
        )
        score = float(e.scores[0])
        assert abs(score) > 1e-6
        assert abs(float(e.attributions.sum()) - score) <= 1e-8 * max(1.0, abs(score))
        assert not hook_report(model)
