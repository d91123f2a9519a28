"""Heatmap overlays: attribution maps scaled for display and blended over images."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor


def normalize_map(attr: Tensor, *, positive: bool = True, clip: float | str | None = "auto") -> Tensor:
    """Sum over channels and scale each sample to [0, 1].

    With ``positive=True`` negative evidence is clipped (CAM convention); otherwise
    the map is scaled by its maximum absolute value into [-1, 1].
    ``clip`` is a percentile (e.g. 99.5) used as the top of the scale so that a few
    outlier pixels do not darken the rest; "auto" clips multi-channel (pixel-level,
    gradient-style) attributions at 99.5 and leaves single-channel maps (CAMs) at their max.
    Accepts (C, H, W) or (N, C, H, W); returns (N, H, W) or (H, W) accordingly.
    """
    single = attr.ndim == 3
    a = attr[None] if single else attr
    if clip == "auto":
        clip = 99.5 if a.shape[1] > 1 else None
    a = a.detach().float().sum(dim=1)
    flat = a.flatten(1)

    def top(values: Tensor) -> Tensor:
        if clip is None:
            return values.max(1, keepdim=True).values
        return torch.quantile(values, float(clip) / 100.0, dim=1, keepdim=True)

    if positive:
        flat = flat.clamp_min(0)
        lo = flat.min(1, keepdim=True).values
        hi = top(flat)
        flat = ((flat - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
    else:
        flat = (flat / top(flat.abs()).clamp_min(1e-12)).clamp(-1, 1)
    out = flat.view_as(a)
    return out[0] if single else out


def to_image_array(image: Any, size: tuple[int, int] | None = None) -> np.ndarray:
    """Any image-like (PIL, HxWx3 array, 3xHxW tensor) to a float HxWx3 array in [0, 1].

    Tensors that are not in [0, 1] (e.g. normalised network inputs) are min-max scaled.
    """
    if isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    elif isinstance(image, Tensor):
        t = image.detach().float().cpu()
        if t.ndim == 4:
            t = t[0]
        if t.ndim == 3 and t.shape[0] in (1, 3):
            t = t.permute(1, 2, 0)
        arr = t.numpy()
        if arr.min() < 0 or arr.max() > 1:
            arr = (arr - arr.min()) / max(float(arr.max() - arr.min()), 1e-12)
    else:
        arr = np.asarray(image, dtype=np.float32)
        if arr.max() > 1.0:
            arr = arr / 255.0
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    arr = arr[..., :3]
    if size is not None and arr.shape[:2] != size:
        pil = Image.fromarray((np.clip(arr, 0, 1) * 255).astype(np.uint8)).resize((size[1], size[0]), Image.BILINEAR)
        arr = np.asarray(pil, dtype=np.float32) / 255.0
    return np.clip(arr, 0.0, 1.0)


def colorize(heat: np.ndarray, cmap: str = "jet") -> np.ndarray:
    """Map an (H, W) array in [0, 1] to RGB floats with a matplotlib colormap."""
    from matplotlib import colormaps

    return colormaps[cmap](np.clip(heat, 0, 1))[..., :3]


#: colour maps: signed maps (negative evidence kept) diverge around zero, unsigned ones are sequential
SIGNED_CMAP = "RdBu_r"
UNSIGNED_CMAP = "inferno"


def is_signed(attr: Any) -> bool:
    """True when the channel-summed map has negative values of consequence (above 1e-3 of its
    largest magnitude): IG, LRP, DeepLIFT, Shapley and LIME maps; CAMs and |gradient| maps are not."""
    a = attr.detach().float()
    a = a.sum(0) if a.ndim == 3 else a
    big = float(a.abs().max())
    return big > 0 and float(a.min()) < -1e-3 * big


def overlay(attr: Tensor, image: Any = None, *, cmap: str | None = None, alpha: float = 0.5,
            positive: bool | None = None) -> Image.Image:
    """Blend the display-normalised map ``attr`` ((C, H, W) or (H, W)) over ``image``.

    The map is resized to the image (bilinear) when their sizes differ; with no
    image the coloured heatmap alone is returned. ``positive=None`` and ``cmap=None`` follow the
    map: signed maps keep their negative evidence on a diverging scale centred at 0
    (:data:`SIGNED_CMAP`), unsigned ones use :data:`UNSIGNED_CMAP`.
    """
    if positive is None:
        positive = not is_signed(attr)
    if cmap is None:
        cmap = UNSIGNED_CMAP if positive else SIGNED_CMAP
    a = attr if attr.ndim == 3 else attr[None]
    heat_t = normalize_map(a, positive=positive)
    if image is not None:
        bg = to_image_array(image)
        if tuple(heat_t.shape) != bg.shape[:2]:
            heat_t = F.interpolate(heat_t[None, None], size=bg.shape[:2], mode="bilinear", align_corners=False)[0, 0]
    heat = heat_t.cpu().numpy()
    if not positive:
        heat = (heat + 1) / 2
    colored = colorize(heat, cmap)
    if image is None:
        blended = colored
    else:
        blended = (1 - alpha) * bg + alpha * colored
    return Image.fromarray((np.clip(blended, 0, 1) * 255).round().astype(np.uint8))
