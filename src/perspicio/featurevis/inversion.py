"""Feature inversion: reconstruct an input from a layer's activations.

Given an image ``x`` and a layer ``f``, find pixels ``p`` in [0, 1] minimising

    ||f(p) - f(x)||^2 / ||f(x)||^2  +  tv * TV(p)  +  l2 * ||p - 0.5||^2

from a random start (Mahendran & Vedaldi, CVPR 2015: inversion with a natural-image
prior; here total variation). The network runs only up to the layer. The match is
reported as the cosine similarity between ``f(p)`` and ``f(x)`` (per image) and the
relative error of the first term.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import progress_bar
from ..core.guard import model_device, model_guard
from ..core.inputs import as_batch
from ..core.options import check_float, check_int
from ._common import LayerGrab, make_generator, resolve, unwrap
from .maximize import ImageParam, total_variation


@dataclass(frozen=True)
class InversionResult:
    """``pixels`` (N, C, H, W) reconstructed in [0, 1]; ``inputs`` as fed to the model;
    ``original`` the original image's pixels; ``cosine`` and ``relative_error`` of the
    activation match per image; ``history`` the loss per step."""

    layer: str
    pixels: Tensor
    inputs: Tensor
    original: Tensor
    cosine: Tensor
    relative_error: Tensor
    history: Tensor
    options: dict[str, Any]


def _acts(grab: LayerGrab, net: torch.nn.Module, x: Tensor, name: str) -> Tensor:
    grab.run(net, x)
    return grab.get(0, [name])


def invert(
    model: Any,
    inputs: Tensor,
    layer: Any,
    *,
    steps: int = 200,
    lr: float = 0.05,
    tv: float = 0.02,
    l2: float = 0.0,
    param: str = "pixel",
    seed: int | None = 0,
    progress: bool = False,
) -> InversionResult:
    """Reconstruct ``inputs`` (N, C, H, W, model space) from ``layer``'s activations."""
    bundle = unwrap(model)
    net = bundle.model
    name, module = resolve(net, layer)
    x = as_batch(inputs, net)
    steps = check_int("steps", steps, minimum=1)
    lr = check_float("lr", lr, minimum=0, strict=True)
    tv = check_float("tv", tv, minimum=0)
    l2 = check_float("l2", l2, minimum=0)
    gen = make_generator(seed)
    image = ImageParam(tuple(x.shape), param, gen, device=model_device(net))
    opt = torch.optim.Adam(image.parameters(), lr=lr)
    history = []
    with model_guard(net), LayerGrab([module], stop_after=module) as grab:
        with torch.no_grad():
            target = _acts(grab, net, x, name).detach().clone()
        t_flat = target.flatten(1)
        t_norm = t_flat.pow(2).sum(1).clamp_min(1e-12)
        with progress_bar(progress, steps, f"inverting {name}") as advance:
            for _ in range(steps):
                pixels = image()
                a = _acts(grab, net, bundle.space.to_model(pixels), name).flatten(1)
                match = (a - t_flat).pow(2).sum(1) / t_norm
                loss = match.mean()
                if tv:
                    loss = loss + tv * total_variation(pixels).mean()
                if l2:
                    loss = loss + l2 * (pixels - 0.5).pow(2).flatten(1).mean(1).mean()
                params = list(image.parameters())
                for p, g in zip(params, torch.autograd.grad(loss, params)):
                    p.grad = g
                opt.step()
                history.append(float(loss.detach()))
                advance(1)
        with torch.no_grad():
            pixels = image().detach()
            xr = bundle.space.to_model(pixels)
            a = _acts(grab, net, xr, name).flatten(1)
            cos = F.cosine_similarity(a, t_flat, dim=1)
            rel = ((a - t_flat).pow(2).sum(1) / t_norm).sqrt()
    original = bundle.space.to_pixels(x).clamp(0, 1) if bundle.preprocess is not None else x
    return InversionResult(
        layer=name, pixels=pixels, inputs=xr, original=original.detach(), cosine=cos, relative_error=rel,
        history=torch.tensor(history),
        options={"steps": steps, "lr": lr, "tv": tv, "l2": l2, "param": param, "seed": seed},
    )


__all__ = ["InversionResult", "invert"]
