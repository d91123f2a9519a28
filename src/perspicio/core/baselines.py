"""Baselines: what an input becomes when a feature is "absent".

One vocabulary for every method and metric that needs a reference input (Integrated
Gradients, GradientSHAP, DeepLIFT, DeepSHAP backgrounds, occlusion/Shapley/LIME image
maskers, the deletion/insertion/ROAD-style metrics). Names are case-insensitive.

=====================  ===================================================================
spec                   meaning (for a batch ``x``)
=====================  ===================================================================
``None``, ``"zero"``   zeros (``"zeros"`` is an alias)
``"black"``            a black image in the model's input space: ``(0 - mean) / std`` per
                       channel for a model with ImageNet-style preprocessing (the bundled
                       models, see :func:`black_value`), otherwise each channel's minimum
                       over the batch
``"mean"``             inputs with channels and spatial/sequence axes ``(N, C, ...)``: each
                       sample's per-channel mean; rows ``(N, F)``: each feature's batch mean
``"blur"``             images ``(N, C, H, W)`` Gaussian-blurred (:func:`gaussian_blur`: radius
``"blur:SIGMA"``       ceil(3 sigma), border pixels repeated), sigma in pixels; default
                       sigma = longest side / 16
``"uniform"``          seeded uniform noise within each sample's per-channel value range
                       ``(N, C, ...)``; rows ``(N, F)``: within each feature's batch range
a number               that constant everywhere
a tensor / array       broadcast to the input's shape (one per sample, or one for all)
a callable             ``f(x) -> tensor`` (methods that take a baseline per call)
=====================  ===================================================================

The deletion/insertion metrics take ``replacement=`` "zero", "mean" or "blur"; their
"blur" is the same function with their ``sigma`` option (default 5 px), a radius of
ceil(2 sigma) and mirrored borders (``gaussian_blur(x, sigma, truncate=2, padding="reflect")``),
the kernel their published numbers were measured with.

Unified meanings (before one vocabulary, each family had its own): ``"blur"`` was
sigma = side/16 in IG, side/20 (radius round(3 sigma)) in DeepLIFT and side/32 (mirrored
borders) in the image maskers; ``"black"`` was refused by DeepLIFT; ``"uniform"`` used
each sample's range over all channels in IG and the batch's per-channel range in DeepLIFT;
IG refused ``"mean"``. Every method's and metric's default gives the same numbers as before
(DeepSHAP's default ``"uniform"`` background is drawn per sample, where the two meanings agree).
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import OptionError, suggest

#: the baseline names, in the order the documentation lists them
BASELINES = ("zero", "black", "mean", "blur", "uniform")
_ALIASES = {"zeros": "zero"}
_SPEC = re.compile(r"\s*([a-z_]+)\s*(?:[:=]\s*(.*?))?\s*")


def parse_baseline(spec: str, name: str = "baseline") -> tuple[str, float | None]:
    """``(name, sigma)`` of a baseline name such as ``"blur:3"``; raises :class:`OptionError` listing the names."""
    m = _SPEC.fullmatch(spec.lower())
    key = _ALIASES.get(m.group(1), m.group(1)) if m else spec.strip().lower()
    if not m or key not in BASELINES:
        raise OptionError(
            f"unknown {name} {spec!r}; {name} must be one of {', '.join(BASELINES)} (blur may be 'blur:SIGMA'), "
            "a number, a tensor that broadcasts to the input, or a callable." + suggest(key, BASELINES))
    arg = m.group(2)
    if arg is None:
        return key, None
    try:
        value = float(arg)
    except ValueError:
        value = -1.0
    if key != "blur" or not value > 0:
        raise OptionError(f"{name} {spec!r}: only 'blur:SIGMA' takes a parameter, a positive number.")
    return key, value


def check_baseline(spec: Any, name: str = "baseline", *, allow_callable: bool = True) -> None:
    """Validate a baseline spec at construction (tensors are checked against the input later)."""
    if spec is None or isinstance(spec, (Tensor, np.ndarray)):
        return
    if isinstance(spec, str):
        parse_baseline(spec, name)
        return
    if isinstance(spec, (int, float)) and not isinstance(spec, bool):
        return
    if allow_callable and callable(spec):
        return
    raise OptionError(f"{name} must be a name ({', '.join(BASELINES)}), a number or a tensor"
                      + (" or a callable" if allow_callable else "") + f"; got {type(spec).__name__}.")


def gaussian_blur(x: Tensor, sigma: float, *, truncate: float = 3.0, padding: str = "replicate") -> Tensor:
    """Separable Gaussian blur of images (N, C, H, W), radius ceil(``truncate`` * sigma).

    ``padding="replicate"`` repeats the border pixels (the ``"blur"`` baseline); ``"reflect"``
    mirrors them, cutting the kernel to the image (and renormalising it) where the image is
    smaller than the kernel (the metrics' blurred replacement). A constant image stays constant.
    """
    radius = max(1, int(math.ceil(truncate * sigma)))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    reflect = padding == "reflect"
    pad_h = min(radius, x.shape[-2] - 1) if reflect else radius
    pad_w = min(radius, x.shape[-1] - 1) if reflect else radius
    y = F.pad(x, (pad_w, pad_w, 0, 0), mode="reflect" if reflect and pad_w > 0 else "replicate")
    kw = k[radius - pad_w: radius + pad_w + 1]
    y = F.conv2d(y, (kw / kw.sum()).view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, pad_h, pad_h), mode="reflect" if reflect and pad_h > 0 else "replicate")
    kh = k[radius - pad_h: radius + pad_h + 1]
    return F.conv2d(y, (kh / kh.sum()).view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def black_value(model: Any) -> Tensor | None:
    """(0 - mean) / std per channel when ``model`` is a bundled model with ImageNet-style preprocessing."""
    pre = getattr(model, "preprocess", None)
    mean, std = getattr(pre, "mean", None), getattr(pre, "std", None)
    if mean is None or std is None:
        return None
    return -torch.as_tensor(mean, dtype=torch.float64) / torch.as_tensor(std, dtype=torch.float64)


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    """Axes "mean" and "uniform" reduce over: spatial/sequence axes, or the batch for rows."""
    return tuple(range(2, x.ndim)) if x.ndim >= 3 else (0,)


def make_baseline(
    spec: Any, x: Tensor, *, black: Tensor | None = None, generator: torch.Generator | None = None,
    seed: int = 0, name: str = "baseline",
) -> Tensor:
    """The baseline of ``spec`` (see the module's table) for inputs ``x``, as a tensor of x's shape.

    ``black``: the per-channel black value of the model (:func:`black_value`); ``generator``
    (or ``seed``): the random stream of ``"uniform"``.
    """
    if spec is None:
        spec = "zero"
    if isinstance(spec, str):
        key, sigma = parse_baseline(spec, name)
        if key == "zero":
            return torch.zeros_like(x)
        if not x.is_floating_point():
            raise OptionError(f"{name} {spec!r} needs float inputs; for token ids pass a tensor (e.g. pad ids) or 'zero'.")
        if key == "black":
            if black is not None and x.ndim == 4 and black.numel() == x.shape[1]:
                value = black.to(x).view(1, -1, 1, 1)
            elif x.ndim >= 2:
                value = x.amin(dim=[d for d in range(x.ndim) if d != 1], keepdim=True)
            else:
                value = x.min()
            return value.expand_as(x).clone()
        if key == "mean":
            return x.mean(dim=_reduce_dims(x), keepdim=True).expand_as(x).clone()
        if key == "blur":
            if x.ndim != 4:
                raise OptionError(f"{name} 'blur' needs image inputs (N, C, H, W); got shape {tuple(x.shape)}.")
            return gaussian_blur(x, sigma if sigma is not None else max(x.shape[-2:]) / 16)
        # uniform
        if generator is None:
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
        if x.ndim >= 2:
            dims = _reduce_dims(x)
            lo, hi = x.amin(dim=dims, keepdim=True), x.amax(dim=dims, keepdim=True)
        else:
            lo, hi = x.min(), x.max()
        u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu").to(x.device)
        return lo + (hi - lo) * u
    if isinstance(spec, (int, float)) and not isinstance(spec, bool) and x.is_floating_point():
        return torch.full_like(x, float(spec))
    if callable(spec) and not isinstance(spec, (Tensor, np.ndarray)):
        value = spec(x)
        if not isinstance(value, Tensor):
            raise OptionError(f"a callable {name} must return a tensor; got {type(value).__name__}.")
        spec = value
    return broadcast_baseline(spec, x, name)


def broadcast_baseline(spec: Any, x: Tensor, name: str = "baseline") -> Tensor:
    """A number, tensor or array broadcast to ``x``'s shape (checked: shape, finite values)."""
    try:
        b = torch.as_tensor(spec).to(device=x.device, dtype=x.dtype if x.is_floating_point() else None)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise OptionError(f"{name} must be a name, a number or a tensor; got {type(spec).__name__}.") from exc
    try:
        shape = torch.broadcast_shapes(b.shape, x.shape)
    except RuntimeError:
        shape = None
    if shape != x.shape:
        raise OptionError(f"{name} of shape {tuple(b.shape)} does not broadcast to the input shape {tuple(x.shape)}.")
    if b.is_floating_point() and not torch.isfinite(b).all():
        raise OptionError(f"{name} contains NaN/Inf values.")
    return b.expand_as(x).clone()


