"""Token and channels-last maps: which layer outputs are image grids, and how to read them.

A layer of an image model can hand on a feature map in three layouts:

* ``"nchw"`` (N, C, H, W): convolutions;
* ``"nhwc"`` (N, H, W, C): channels last, e.g. the stages and blocks of timm's Swin;
* ``"tokens"`` (N, T, C): a vision transformer's token sequence, ``T = e + h * w``: ``e`` extra
  tokens first (class, distillation, register tokens - MMPretrain's ``--num-extra-tokens``), then
  the h x w patch grid in row-major order.

Anything else - attention weights (N, heads, T, T), queries/keys (N, heads, T, d), pooled
vectors - is not a map. A 4-D tensor is read as a map only when its two grid axes are the input's
height and width divided by one stride (within rounding); that is what tells (N, 7, 7, 768) (a Swin
stage at stride 32: channels last) from (N, 768, 7, 7), and rejects (N, 3, 197, 64) (the keys of
a ViT block) whatever its size. Where both readings fit (a 7 x 7 x 7 tensor) the module decides
(convolution, BatchNorm and pooling outputs are channels first), then the model's declared output
format (timm's ``output_fmt``), then the convention (channels first).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import LayerError, OptionError

KINDS = ("nchw", "nhwc", "tokens")
#: modules whose 4-D outputs are channels first whatever their sizes
_CHANNELS_FIRST = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.BatchNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.GroupNorm,
    nn.InstanceNorm2d,
)


@dataclass(frozen=True)
class Layout:
    """How one layer output is an image grid: ``kind`` (``"nchw"``, ``"nhwc"`` or ``"tokens"``),
    the ``grid`` (h, w) and, for tokens, the number of leading ``extra`` tokens."""

    kind: str
    grid: tuple[int, int]
    extra: int = 0

    def to_spatial(self, t: Tensor) -> Tensor:
        """``t`` as (N, C, h, w): channels moved first, extra tokens dropped, tokens on the grid."""
        h, w = self.grid
        if self.kind == "nchw":
            self._check(t, 4, (t.shape[2], t.shape[3]))
            return t
        if self.kind == "nhwc":
            self._check(t, 4, (t.shape[1], t.shape[2]))
            return t.permute(0, 3, 1, 2)
        self._check(t, 3, None)
        if t.shape[1] != self.extra + h * w:
            raise LayerError(
                f"a {tuple(t.shape)} token output does not hold {self.extra} extra token(s) and a "
                f"{h} x {w} patch grid ({self.extra + h * w} tokens)."
            )
        n, _, c = t.shape
        return t[:, self.extra :, :].reshape(n, h, w, c).permute(0, 3, 1, 2)

    def _check(self, t: Tensor, ndim: int, hw: tuple[int, int] | None) -> None:
        if t.ndim != ndim or (hw is not None and tuple(hw) != self.grid):
            raise LayerError(
                f"a {tuple(t.shape)} output is not the {self.describe()} map this layer was read as."
            )

    def describe(self) -> str:
        h, w = self.grid
        if self.kind == "tokens":
            return f"(N, {self.extra} extra + {h}x{w} tokens, C)"
        return "(N, C, H, W)" if self.kind == "nchw" else "(N, H, W, C) channels-last"


def fits_input(hw: Sequence[int], input_hw: Sequence[int]) -> bool:
    """Is (h, w) the input's (H, W) divided by one (nearly whole) stride, up to rounding (h*w > 1)?"""
    h, w = int(hw[0]), int(hw[1])
    big_h, big_w = int(input_hw[0]), int(input_hw[1])
    if h < 1 or w < 1 or h * w < 2 or h > big_h or w > big_w:
        return False
    # the stride each axis implies; the other axis must agree with it within one step of rounding
    if abs(big_w * h / big_h - w) > 1.0 + 1e-9 or abs(big_h * w / big_w - h) > 1.0 + 1e-9:
        return False
    # and the stride is close to a whole number (197 of 224 rows is no stride: attention over tokens)
    return all(
        abs(n - big / max(1, round(big / n))) <= max(2.0, 0.05 * n)
        for n, big in ((h, big_h), (w, big_w))
    )


def declared_extra_tokens(model: nn.Module) -> int | None:
    """The number of extra (non-patch) tokens the model states, if it states one: timm's
    ``num_prefix_tokens`` (class + distillation + register tokens), torchvision's ViT
    ``class_token``. Searched on the model and, for wrappers, its submodules (the first found)."""
    for m in model.modules():
        n = getattr(m, "num_prefix_tokens", None)
        if isinstance(n, int) and not isinstance(n, bool) and n >= 0:
            return n
        tok = getattr(m, "class_token", None)
        if isinstance(tok, Tensor) and tok.ndim == 3 and tok.shape[:2] == (1, 1):
            return 1
    return None


def declared_channels_last(model: nn.Module) -> bool:
    """Does the model state that its feature maps are channels last (timm ``output_fmt='NHWC'``)?"""
    fmt = getattr(model, "output_fmt", None)
    return str(getattr(fmt, "value", fmt)).upper() == "NHWC"


def check_extra_tokens(value: object) -> int | None:
    """Validate an ``extra_tokens`` option: ``"auto"``/None (detect) or a non-negative int."""
    if value is None or value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise OptionError(
            f"extra_tokens must be 'auto' or a non-negative int (class, distillation and register "
            f"tokens before the patch grid); got {value!r}."
        )
    return int(value)


def layout_of(
    shape: Sequence[int] | None,
    input_hw: Sequence[int],
    *,
    extra: int | None = None,
    grids: Iterable[tuple[int, int]] = (),
    module: nn.Module | None = None,
    channels_last: bool = False,
    token_counts: Collection[int] = (),
) -> Layout | None:
    """The layout of a layer output of ``shape`` for an input of spatial size ``input_hw``, or None.

    ``extra``: the number of extra tokens (None: inferred - ``T - h*w`` for a traced patch grid in
    ``grids``, else a square grid with 0 or 1 extra token); ``grids``: (h, w) grids of channels-first
    maps seen in the same model (the patch embedding), which makes non-square token grids
    readable; ``module``: the module that produced it; ``channels_last``: the model declares NHWC;
    ``token_counts``: lengths of the model's token sequences - a 4-D output with a token axis
    (queries, keys, attention weights: (N, heads, T, d)) is not a map unless a convolution, norm
    or pooling made it.
    """
    if shape is None:
        return None
    shape = tuple(int(s) for s in shape)
    if len(shape) == 4:
        conv = isinstance(module, _CHANNELS_FIRST)
        tokens = set(token_counts) if not conv else set()
        first = fits_input(shape[2:], input_hw) and not tokens & set(shape[2:])
        last = fits_input(shape[1:3], input_hw) and not tokens & set(shape[1:3])
        if first and last:
            if conv or not channels_last:
                return Layout("nchw", (shape[2], shape[3]))
            return Layout("nhwc", (shape[1], shape[2]))
        if first:
            return Layout("nchw", (shape[2], shape[3]))
        if last:
            return Layout("nhwc", (shape[1], shape[2]))
        return None
    if len(shape) == 3:
        return token_layout(shape[1], input_hw, extra=extra, grids=grids)
    return None


def token_layout(
    tokens: int,
    input_hw: Sequence[int],
    *,
    extra: int | None = None,
    grids: Iterable[tuple[int, int]] = (),
) -> Layout | None:
    """How ``tokens`` tokens split into extra tokens and a patch grid fitting the input, or None."""
    fitting = [tuple(g) for g in grids if fits_input(g, input_hw)]
    if extra is not None:
        for g in fitting:
            if g[0] * g[1] == tokens - extra:
                return Layout("tokens", g, extra)
        side = math.isqrt(max(tokens - extra, 0))
        if side > 1 and side * side == tokens - extra and fits_input((side, side), input_hw):
            return Layout("tokens", (side, side), extra)
        return None
    for g in fitting:
        e = tokens - g[0] * g[1]
        if 0 <= e <= max(8, tokens // 4):
            return Layout("tokens", g, e)
    for e in (0, 1):
        side = math.isqrt(max(tokens - e, 0))
        if side > 1 and side * side == tokens - e and fits_input((side, side), input_hw):
            return Layout("tokens", (side, side), e)
    return None


def patch_tokens(layout: Layout, t: Tensor) -> Tensor:
    """The patch-grid part of a per-token tensor (N, T, ...) (extra tokens dropped)."""
    return t[:, layout.extra :] if layout.kind == "tokens" else t


def token_map(
    scores: Tensor, layout: Layout, size: Sequence[int] | None = None, *, mode: str = "bilinear"
) -> Tensor:
    """Per-token scores (N, T) (or (N, h*w) without the extra tokens) as an image map (N, 1, h, w),
    upsampled to ``size`` (H, W) when given - how rollout and transformer attribution of a ViT are
    shown over the image."""
    if layout.kind != "tokens":
        raise LayerError(f"token_map needs a token layout; got {layout.describe()}.")
    h, w = layout.grid
    if scores.ndim != 2 or scores.shape[1] not in (h * w, layout.extra + h * w):
        raise LayerError(
            f"token scores of shape {tuple(scores.shape)} do not match {layout.describe()}."
        )
    if scores.shape[1] != h * w:
        scores = scores[:, layout.extra :]
    m = scores.reshape(len(scores), 1, h, w)
    if size is not None and tuple(size) != (h, w):
        kw = {} if mode in ("nearest", "area") else {"align_corners": False}
        m = F.interpolate(
            m.to(torch.promote_types(m.dtype, torch.float32)), size=tuple(size), mode=mode, **kw
        )
    return m


__all__ = [
    "KINDS",
    "Layout",
    "check_extra_tokens",
    "declared_channels_last",
    "declared_extra_tokens",
    "fits_input",
    "layout_of",
    "patch_tokens",
    "token_layout",
    "token_map",
]
