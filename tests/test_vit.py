"""Vision transformers: token maps, channels-last maps, extra tokens and the automatic CAM layer.

Shapes on timm / torchvision / Hugging Face ViTs and a timm Swin with random weights (nothing
downloads); exact values on hand-set token models; behaviour on the tiny ViT trained on the digits
(tests/test_vit_digits.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import perspicio
from perspicio.core.capture import auto_layer, layer_layout, map_layers
from perspicio.core.tokens import Layout, fits_input, layout_of, token_layout, token_map
from perspicio.errors import LayerError, OptionError
from perspicio.methods import AblationCAM, GradCAM, HiResCAM

timm = pytest.importorskip("timm")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def small_vit(**kw) -> nn.Module:
    """A 32 x 32 timm ViT: 8 x 8 patches -> a 4 x 4 grid, 2 blocks, random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = timm.create_model(
            "vit_tiny_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            num_classes=5,
            **kw,
        )
    return m.eval()


def small_swin() -> nn.Module:
    """A 56 x 56 timm Swin: 4 x 4 patches, window 7, two stages (14 x 14 then 7 x 7, channels last)."""
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
        )
    return m.eval()


def image(size: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=_gen(1))


# ---------------------------------------------------------------------------- reading one shape


def test_fits_input_and_layouts_of_shapes() -> None:
    assert (
        fits_input((14, 14), (224, 224))
        and fits_input((7, 10), (224, 320))
        and fits_input((8, 8), (225, 225))
    )
    assert not fits_input((197, 64), (224, 224))  # the keys of a ViT block: not an image grid
    assert not fits_input((1, 1), (224, 224)) and not fits_input((300, 300), (224, 224))
    hw = (224, 224)
    assert layout_of((1, 768, 7, 7), hw) == Layout("nchw", (7, 7))
    assert layout_of((1, 7, 7, 768), hw) == Layout(
        "nhwc", (7, 7)
    )  # Swin: channels last, never (C=7, H=7, W=768)
    assert layout_of((1, 3, 197, 64), hw) is None  # (N, heads, T, d)
    assert layout_of((1, 3, 197, 197), hw) is None  # attention weights
    # both readings fit: the module, then the model's declaration, then channels first decide
    assert layout_of((1, 7, 7, 7), hw) == Layout("nchw", (7, 7))
    assert layout_of((1, 7, 7, 7), hw, channels_last=True) == Layout("nhwc", (7, 7))
    assert layout_of((1, 7, 7, 7), hw, channels_last=True, module=nn.Conv2d(7, 7, 1)) == Layout(
        "nchw", (7, 7)
    )
    # tokens: declared extra tokens, a traced (non-square) patch grid, or a square grid with 0/1 extra
    assert token_layout(197, hw) == Layout("tokens", (14, 14), 1)
    assert token_layout(201, hw, extra=5) == Layout("tokens", (14, 14), 5)
    assert token_layout(201, hw) is None  # 5 register tokens cannot be guessed without the grid
    assert token_layout(201, hw, grids=[(14, 14)]) == Layout("tokens", (14, 14), 5)
    assert token_layout(141, (224, 320), grids=[(10, 14)]) == Layout("tokens", (10, 14), 1)
    assert token_layout(198, hw, extra=1) is None


def test_layout_to_spatial_and_token_map_exact() -> None:
    t = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(
        2, 6, 3
    )  # 2 extra tokens + a 2 x 2 grid, C = 3
    lay = Layout("tokens", (2, 2), 2)
    a = lay.to_spatial(t)
    assert a.shape == (2, 3, 2, 2)
    for i in range(2):
        for c in range(3):
            assert torch.equal(a[i, c].flatten(), t[i, 2:, c])
    nhwc = torch.randn(2, 3, 4, 5, generator=_gen())
    assert torch.equal(Layout("nhwc", (3, 4)).to_spatial(nhwc), nhwc.permute(0, 3, 1, 2))
    with pytest.raises(LayerError, match="extra token"):
        Layout("tokens", (2, 2), 1).to_spatial(t)
    scores = torch.tensor([[9.0, 9.0, 1.0, 2.0, 3.0, 4.0]])
    m = token_map(scores, lay)
    assert torch.equal(m, torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]]))
    assert torch.equal(token_map(scores[:, 2:], lay), m)  # patch tokens only
    up = token_map(scores, lay, (4, 4), mode="nearest")
    assert torch.equal(
        up[0, 0], torch.tensor([[1.0, 1, 2, 2], [1, 1, 2, 2], [3, 3, 4, 4], [3, 3, 4, 4]])
    )
    with pytest.raises(LayerError, match="do not match"):
        token_map(torch.ones(1, 5), lay)


# ---------------------------------------------------------------------------- hand-set token model

A0 = np.arange(27, dtype=np.float64).reshape(3, 3, 3) % 5 - 2.0
W = np.array([[1.0, -1.0, 0.5], [0.0, 2.0, -1.0]])


class RegisterViT(nn.Module):
    """Tokens = [class, 2 registers, the 9 pixels of a 3 x 3 input]; the head reads the mean of the
    patch tokens plus the class token. States ``num_prefix_tokens = 3`` as timm does."""

    num_prefix_tokens = 3

    def __init__(self) -> None:
        super().__init__()
        self.extra = nn.Parameter(torch.full((1, 3, 3), 0.5))
        self.block = nn.Identity()
        self.head = nn.Linear(3, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor(W, dtype=torch.float32))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.extra.expand(len(x), -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        tokens = self.block(tokens)
        return self.head(tokens[:, 3:].mean(1) + tokens[:, 0])


def test_gradcam_exact_with_declared_extra_tokens() -> None:
    x = torch.tensor(A0[None], dtype=torch.float32)
    m = RegisterViT()
    expected = np.einsum("k,kij->ij", W[1] / 9.0, A0)
    e = GradCAM(m, layer="block", relu=False)(x, target=1)  # 12 tokens: 3 declared extra + 3 x 3
    assert e.raw.shape == (1, 1, 3, 3)
    np.testing.assert_allclose(e.attributions[0, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    # the option says the same; a wrong count is refused with the remedy
    e2 = HiResCAM(m, layer="block", relu=False, extra_tokens=3)(x, target=1)
    np.testing.assert_allclose(e2.attributions[0, 0].numpy(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(LayerError, match="extra_tokens=.*reshape="):
        GradCAM(m, layer="block", extra_tokens=2)(x, target=1)
    with pytest.raises(LayerError, match="patch tokens after 2 extra"):
        GradCAM(m, layer="block", extra_tokens=2, reshape=(3, 3))(x, target=1)
    # Ablation-CAM zeroes a channel on every token, extra tokens included
    e3 = AblationCAM(m, layer="block", relu=False)(x, target=1)
    pooled = A0.mean(axis=(1, 2)) + 0.5
    w = W[1] * pooled / (W[1] @ pooled)
    np.testing.assert_allclose(
        e3.attributions[0, 0].numpy(), np.einsum("k,kij->ij", w, A0), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("bad", [-1, 1.5, "two", True])
def test_extra_tokens_option_is_validated(bad: object) -> None:
    with pytest.raises(OptionError, match="extra_tokens"):
        GradCAM(RegisterViT(), layer="block", extra_tokens=bad)


@pytest.mark.parametrize("bad", ["chw", (3,), (0, 3), 7])
def test_reshape_option_is_validated(bad: object) -> None:
    with pytest.raises(OptionError, match="reshape"):
        GradCAM(RegisterViT(), layer="block", reshape=bad)


# ---------------------------------------------------------------------------- timm / torchvision / HF


@pytest.mark.parametrize(
    ("kw", "auto", "extra"),
    [
        (
            {},
            "blocks.0",
            1,
        ),  # class-token pooling: the last block's patch tokens never reach the head
        ({"reg_tokens": 4}, "blocks.0", 5),  # class + 4 register tokens (timm num_prefix_tokens)
        (
            {"global_pool": "avg", "class_token": False},
            "blocks.1",
            0,
        ),  # mean pooling: the last block
    ],
)
def test_timm_vit_auto_layer_is_a_block_on_the_patch_grid(kw: dict, auto: str, extra: int) -> None:
    m = small_vit(**kw)
    x = image(32)
    trace = map_layers(m, x)
    assert trace.auto == auto and trace.extra == extra
    assert trace.layouts[auto] == Layout("tokens", (4, 4), extra)
    e = perspicio.explain(m, x, method="gradcam", target=2)
    assert (
        e.layer == auto and e.raw.shape == (2, 1, 4, 4) and e.attributions.shape == (2, 1, 32, 32)
    )
    assert float(e.raw.amax()) > 0  # not the all-zero map of a layer the output does not read
    # the option with the declared count gives the same map
    e2 = perspicio.explain(m, x, method="gradcam", target=2, extra_tokens=extra)
    assert torch.equal(e.attributions, e2.attributions)


def test_timm_deit_distilled_has_two_extra_tokens() -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = timm.create_model(
            "deit_tiny_distilled_patch16_224",
            pretrained=False,
            img_size=32,
            patch_size=8,
            embed_dim=32,
            depth=2,
            num_heads=2,
            num_classes=5,
        ).eval()
    x = image(32, 1)
    assert map_layers(m, x).layouts[auto_layer(m, x)] == Layout("tokens", (4, 4), 2)
    e = perspicio.explain(m, x, method="gradcam", target=0)
    assert e.raw.shape == (1, 1, 4, 4)


def test_attention_internals_are_not_maps() -> None:
    m = small_vit()
    x = image(32, 1)
    # timm's k_norm (an Identity) hands on the keys (N, heads, 17, 16): read as an image it was a striped map
    with pytest.raises(LayerError, match="not a feature map"):
        GradCAM(m, layer="blocks.1.attn.k_norm")(x, target=0)
    assert "blocks.1.attn.k_norm" not in map_layers(m, x).layouts


@pytest.mark.slow
def test_timm_vit_tiny_224_auto_layer() -> None:
    """The model of the issue: was blocks.11.attn.k_norm (N, 3, 197, 64) read as a 197 x 64 image."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    x = image(224, 1)
    assert auto_layer(m, x) == "blocks.10"
    e = perspicio.explain(m, x, method="gradcam", target=3)
    assert e.raw.shape == (1, 1, 14, 14) and e.attributions.shape == (1, 1, 224, 224)
    assert float(e.raw.amax()) > 0


def test_torchvision_vit_auto_layer() -> None:
    from torchvision.models import VisionTransformer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = VisionTransformer(
            image_size=32,
            patch_size=8,
            num_layers=3,
            num_heads=2,
            hidden_dim=32,
            mlp_dim=64,
            num_classes=5,
        ).eval()
        nn.init.normal_(m.heads.head.weight)  # torchvision initialises the head to zero
    x = image(32)
    assert (
        auto_layer(m, x) == "encoder.layers.encoder_layer_1"
    )  # was conv_proj, the patch embedding
    e = perspicio.explain(m, x, method="gradcam", target=1)
    assert (
        e.raw.shape == (2, 1, 4, 4)
        and e.attributions.shape == (2, 1, 32, 32)
        and float(e.raw.amax()) > 0
    )


@pytest.mark.slow
def test_huggingface_vit_auto_layer() -> None:
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = transformers.ViTForImageClassification(cfg).eval()
    x = image(32)
    layer = auto_layer(m, x)
    assert layer.endswith(".0") and map_layers(m, x).layouts[layer] == Layout("tokens", (4, 4), 1)
    e = perspicio.explain(m, x, method="gradcam", target=1, output="logits")
    assert e.raw.shape == (2, 1, 4, 4) and float(e.raw.amax()) > 0


def test_swin_channels_last_maps() -> None:
    m = small_swin()
    x = image(56)
    trace = map_layers(m, x)
    assert trace.channels_last
    assert trace.auto == "layers.1.blocks.0"
    assert trace.layouts["layers.1.blocks.0"] == Layout("nhwc", (7, 7))
    assert trace.layouts["patch_embed.proj"] == Layout(
        "nchw", (14, 14)
    )  # the convolution stays channels first
    e = perspicio.explain(m, x, method="gradcam", target=0)
    assert (
        e.layer == "layers.1.blocks.0"
        and e.raw.shape == (2, 1, 7, 7)
        and e.attributions.shape == (2, 1, 56, 56)
    )
    # the final norm (N, 7, 7, 48) is read channels last: the same map as permuting it by hand
    e_norm = GradCAM(m, layer="norm")(x, target=0)
    by_hand = GradCAM(m, layer="norm", reshape=lambda t: t.permute(0, 3, 1, 2))(x, target=0)
    assert e_norm.raw.shape == (2, 1, 7, 7)
    torch.testing.assert_close(e_norm.attributions, by_hand.attributions)
    # Ablation-CAM zeroes channels on the last axis
    ab = AblationCAM(m, layer="norm")(x[:1], target=0)
    assert ab.raw.shape == (1, 1, 7, 7)
    assert layer_layout(m, x, "norm", (2, 7, 7, 48)) == Layout("nhwc", (7, 7))


def test_auto_layer_leaves_the_model_as_found() -> None:
    m = small_vit()
    m.train()
    m.head.weight.requires_grad_(False)
    x = image(32)
    perspicio.explain(m, x, method="gradcam", target=0)
    assert m.training and all(mod.training for mod in m.modules())
    assert not m.head.weight.requires_grad and m.blocks[0].attn.qkv.weight.requires_grad
    assert all(p.grad is None for p in m.parameters())
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
