"""A tiny vision transformer trained on scikit-learn's 8 x 8 digits, for behaviour tests and demos.

No pretrained ViT ships offline, and a ViT with random weights cannot show whether an explanation
looks at the right place. This one trains in seconds on the digits (deterministically from
``seed``: local generators only, the global RNG untouched) and is cached like the digits CNN
(``$PERSPICIO_CACHE/digits/``, weights only, loaded with ``weights_only=True``; a corrupt or stale
file is rebuilt). Nothing downloads.

Architecture (the usual pre-norm ViT, written with plain tensor operations so that every method
sees the attention: ``q @ k^T``, ``softmax``, ``@ v``): 2 x 2 patches of the 8 x 8 image -> a
4 x 4 grid of 16 patch tokens (a 2 x 2 convolution), a class token in front (``num_prefix_tokens
= 1``, as timm states it), learned position embeddings, ``depth`` blocks of multi-head
self-attention and a GELU MLP with LayerNorms before each, a final LayerNorm and a linear head
on the class token. Module names follow timm (``blocks.0.attn.qkv``, ``blocks.1.norm1``, ...).

    from perspicio.zoo.vit import load_digits_vit
    demo = load_digits_vit()             # ZooModel: .model, .preprocess, .labels
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .digits import DigitsPreprocess, cache_dir, cached_weights, digits_data
from .registry import ZooModel

#: bump when the architecture or the training recipe changes (invalidates the cache)
VERSION = 1


class Attention(nn.Module):
    """Multi-head self-attention with explicit products: softmax(q k^T / sqrt(d)) v."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        n, t, c = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(n, t, c))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    """Tiny ViT for (N, 1, 8, 8) digits: 2 x 2 patches, class token, ``depth`` blocks, 10 classes."""

    num_prefix_tokens = 1

    def __init__(
        self,
        dim: int = 32,
        depth: int = 2,
        heads: int = 4,
        hidden: int = 64,
        patch: int = 2,
        size: int = 8,
        classes: int = 10,
    ) -> None:
        super().__init__()
        grid = size // patch
        self.patch_embed = nn.Conv2d(1, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, hidden) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], dim=1) + self.pos_embed
        return self.head(self.norm(self.blocks(tokens))[:, 0])


def _fresh() -> DigitsViT:
    """A new DigitsViT with the global RNG state restored (our weights come from a local generator)."""
    with torch.random.fork_rng(devices=[]):
        return DigitsViT()


def train_digits_vit(seed: int = 0, epochs: int = 30) -> DigitsViT:
    """Train :class:`DigitsViT` on the digits train split (AdamW, one-cycle schedule, batch 100),
    deterministically.

    The tensors are tiny, so torch's intra-op threads cost more than they give (on a busy 2-core
    machine a step took 10x longer with 2 threads than with 1): training runs on one thread and
    the process's thread count is restored afterwards.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(seed, epochs)
    finally:
        torch.set_num_threads(threads)


def _initialised(seed: int, g: torch.Generator | None = None) -> DigitsViT:
    """A DigitsViT with the weights training starts from (drawn from ``g``, else from ``seed``)."""
    g = g if g is not None else torch.Generator().manual_seed(seed)
    model = _fresh()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # weights: clipped normal with std 1/sqrt(fan-in); class token and positions: std 0.02
            if p.ndim >= 2:
                std = 0.02 if name in ("cls_token", "pos_embed") else (1.0 / p[0].numel()) ** 0.5
                p.copy_(torch.randn(p.shape, generator=g).clamp_(-2, 2) * std)
            elif name.endswith("bias"):
                p.zero_()
    return model


def _train(seed: int, epochs: int, batch: int = 100) -> DigitsViT:
    g = torch.Generator().manual_seed(seed)
    model = _initialised(seed, g)
    x, y = digits_data("train", seed)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
    steps = epochs * -(-len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=5e-3, total_steps=steps, pct_start=0.15)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for start in range(0, len(x), batch):
            b = perm[start : start + batch]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


def load_digits_vit(
    seed: int = 0, *, device: str = "cpu", retrain: bool = False, pretrained: bool = True
) -> ZooModel:
    """The digits ViT as a :class:`~perspicio.zoo.ZooModel` (trained and cached on first use;
    ``pretrained=False``: the untrained model, initialised from ``seed`` as training starts)."""
    path = cache_dir() / "digits" / f"digits_vit_v{VERSION}_seed{seed}.pt"
    if pretrained:
        model = cached_weights(path, _fresh(), lambda: train_digits_vit(seed), retrain=retrain)
    else:
        model = _initialised(seed)
    return ZooModel(
        model=model.to(device).eval(),
        preprocess=DigitsPreprocess(),  # type: ignore[arg-type]
        labels=[str(i) for i in range(10)],
        name="digits_vit",
    )


__all__ = ["DigitsViT", "load_digits_vit", "train_digits_vit"]
