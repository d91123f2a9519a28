"""Convolution kernels as images.

First-layer filters of an RGB network are shown as colour tiles (one per output
channel); deeper filters as one grey tile per (output, input) channel pair. Display
scaling is symmetric around zero, so a zero weight is mid-grey in every tile and the
sign of a weight is never hidden by a per-tile min-max stretch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from ..errors import LayerError, OptionError
from ._common import resolve, unwrap

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass(frozen=True)
class Kernels:
    """Weights of a convolution layer and their display tiles.

    ``weights`` is (out, in/groups, kh, kw) as in the layer. ``tiles`` are in [0, 1]:
    (out, kh, kw, 3) RGB when ``rgb`` (a first layer with 3 input channels), else
    (out, in, kh, kw) grey. ``scale`` is the weight magnitude mapped to 0 or 1 (0.5 is zero).
    """

    layer: str
    weights: Tensor
    tiles: Tensor
    rgb: bool
    scale: Tensor

    @property
    def norms(self) -> Tensor:
        """L2 norm of each output channel's filter (out,)."""
        return self.weights.flatten(1).norm(dim=1)


def first_conv(model: nn.Module) -> str:
    """Name of the first 2-D convolution in ``model``'s module order."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    raise LayerError(f"{type(model).__name__} has no nn.Conv2d layer to show kernels of.")


def kernels(model: Any, layer: Any = None, *, per_filter: bool = False, rgb: bool | None = None) -> Kernels:
    """The filters of a convolution ``layer`` (default: the first Conv2d), scaled for display.

    ``per_filter=True`` scales each output filter by its own max |w| (shows the shape of
    weak filters); otherwise one scale for the whole layer (shows relative strength).
    ``rgb=None`` shows colour tiles exactly when the layer has 3 input channels.
    """
    net = unwrap(model).model
    name, module = resolve(net, layer if layer is not None else first_conv(net))
    if not isinstance(module, nn.Conv2d):
        raise LayerError(f"layer {name!r} is a {type(module).__name__}; kernels needs an nn.Conv2d.")
    w = module.weight.detach().clone().float().cpu()
    in_ch = w.shape[1]
    use_rgb = in_ch == 3 if rgb is None else bool(rgb)
    if use_rgb and in_ch != 3:
        raise OptionError(f"rgb=True needs a layer with 3 input channels; {name!r} has {in_ch}.")
    if per_filter:
        scale = w.flatten(1).abs().amax(dim=1).clamp_min(1e-12)
        scaled = w / scale.view(-1, 1, 1, 1)
    else:
        scale = w.abs().max().clamp_min(1e-12).reshape(1)
        scaled = w / scale
    tiles = (scaled * 0.5 + 0.5).clamp(0, 1)
    if use_rgb:
        tiles = tiles.permute(0, 2, 3, 1).contiguous()
    return Kernels(layer=name, weights=w, tiles=tiles, rgb=use_rgb, scale=scale)


def conv_layers(model: Any) -> list[str]:
    """Names of all Conv2d layers (for menus and the CLI)."""
    net = unwrap(model).model
    return [n for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]


__all__ = ["Kernels", "conv_layers", "first_conv", "kernels"]

