"""Feature maps: a layer's activations for one input, as a grid of channels.

The network runs only up to the layer. Channels are chosen by the user or as the
top-k by mean activation. Each map is also placed on the input at the right
scale: the value at grid cell ``i`` sits at the centre of that cell's receptive
field (computed from the layers by :mod:`.receptive_field`), not at a naive
``(i + 0.5) * H / h`` that ignores padding offsets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.guard import model_guard
from ..core.inputs import as_batch
from ..core.options import check_int
from ..errors import LayerError, OptionError
from ._common import LayerGrab, resolve, unwrap
from .receptive_field import ReceptiveField, receptive_field


@dataclass(frozen=True)
class FeatureMaps:
    """Activations of ``layer`` for one input.

    ``activations`` (C, h, w) is the whole layer; ``channels`` the shown channels with
    their ``means``; ``maps`` (k, h, w) their activations; ``placed`` (k, H, W) the
    maps resampled onto the input grid; ``pixels`` (C_in, H, W) the input in [0, 1].
    """

    layer: str
    activations: Tensor
    channels: Tensor
    means: Tensor
    maps: Tensor
    placed: Tensor
    pixels: Tensor
    field: ReceptiveField | None


def place_on_input(maps: Tensor, field: ReceptiveField | None, size: Sequence[int]) -> Tensor:
    """Resample maps (k, h, w) to the input grid ``size`` using the receptive-field centres.

    Without a field, falls back to bilinear interpolation of the whole grid.
    """
    k, h, w = maps.shape
    H, W = int(size[0]), int(size[1])
    if field is None or len(field.grid) != 2 or 0.0 in field.jump:
        return F.interpolate(maps[None], size=(H, W), mode="bilinear", align_corners=False)[0]
    coords = []
    for n, full, s, j, z in zip((h, w), (H, W), field.start, field.jump, field.size):
        centre0 = s + z / 2 - 0.5  # pixel-centre coordinate of cell 0's field centre
        pix = torch.arange(full, dtype=maps.dtype, device=maps.device)
        u = (pix - centre0) / j  # position in cells
        coords.append(2 * u / max(n - 1, 1) - 1 if n > 1 else torch.zeros_like(u))
    gy, gx = torch.meshgrid(coords[0], coords[1], indexing="ij")
    grid = torch.stack([gx, gy], dim=-1)[None].expand(k, H, W, 2)
    return F.grid_sample(maps[:, None], grid, mode="bilinear", padding_mode="border", align_corners=True)[:, 0]


def feature_maps(
    model: Any,
    inputs: Tensor,
    layer: Any,
    *,
    channels: Sequence[int] | None = None,
    top_k: int = 16,
    index: int = 0,
) -> FeatureMaps:
    """Activations of ``layer`` for sample ``index`` of ``inputs`` (N, C, H, W).

    ``channels`` picks channels; otherwise the ``top_k`` channels with the largest mean
    activation are shown (sorted, largest first).
    """
    bundle = unwrap(model)
    net = bundle.model
    name, module = resolve(net, layer)
    x = as_batch(inputs, net)
    index = check_int("index", index, minimum=0)
    if index >= x.shape[0]:
        raise OptionError(f"index {index} is out of range for {x.shape[0]} input(s).")
    x = x[index:index + 1]
    with model_guard(net), torch.no_grad(), LayerGrab([module], stop_after=module) as grab:
        grab.run(net, x)
        act = grab.get(0, [name]).detach().clone()
    if act.ndim != 4:
        raise LayerError(f"layer {name!r} has output shape {tuple(act.shape)}; feature maps need (N, C, h, w).")
    act = act[0]
    c = act.shape[0]
    means = act.mean(dim=(1, 2))
    if channels is not None:
        chosen = [int(ch) for ch in channels]
        bad = [ch for ch in chosen if not 0 <= ch < c]
        if bad or not chosen:
            raise OptionError(f"channel {bad[0] if bad else '(none)'} is out of range: layer {name!r} has {c} channels (0..{c - 1}).")
        idx = torch.tensor(chosen, dtype=torch.long)
    else:
        k = min(check_int("top_k", top_k, minimum=1), c)
        idx = torch.sort(means, descending=True, stable=True).indices[:k].cpu()
    maps = act[idx.to(act.device)]
    try:
        field = receptive_field(net, name, tuple(x.shape[1:]))
    except LayerError:
        field = None
    placed = place_on_input(maps, field, x.shape[-2:])
    pixels = bundle.space.to_pixels(x[0]).clamp(0, 1) if bundle.preprocess is not None else x[0]
    return FeatureMaps(
        layer=name, activations=act, channels=idx, means=means[idx.to(means.device)], maps=maps,
        placed=placed, pixels=pixels.detach(), field=field,
    )


__all__ = ["FeatureMaps", "feature_maps", "place_on_input"]
