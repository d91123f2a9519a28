"""ImageNet-style preprocessing: images -> normalised float tensor (N, 3, 224, 224).

Resizing is done in torch, not Pillow: the uint8 image becomes a float tensor in
[0, 1] and is resized to exactly ``size`` (the aspect ratio is not kept, nothing is
cropped) with ``F.interpolate(mode="bilinear", antialias=True, align_corners=False)``.
The antialiased bilinear filter matches Pillow's ``BILINEAR`` resize to within
rounding, and keeps one code path for images and tensors. Then each channel is
normalised with the ImageNet mean and standard deviation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError, OptionError
from .images import load_image

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImagePreprocess"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _pair(size: Any) -> tuple[int, int]:
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise OptionError(f"size must be a positive int or (height, width), got {size!r}")
    return int(size[0]), int(size[1])


def _triple(values: Any, name: str, positive: bool) -> tuple[float, float, float]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        out = ()
    if len(out) != 3 or not all(np.isfinite(out)) or (positive and min(out) <= 0):
        need = "three positive numbers" if positive else "three numbers"
        raise OptionError(f"{name} must be {need} (one per RGB channel), got {values!r}")
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class ImagePreprocess:
    """Callable turning images into a normalised batch for an ImageNet classifier.

    ``preprocess(images)`` accepts one image or a list/tuple of them, where an image
    is a ``PIL.Image`` or anything :func:`~perspicio.zoo.load_image` accepts (path,
    sample name, numpy array), or a float tensor in [0, 1] / uint8 tensor of shape
    (3, H, W) or (N, 3, H, W). It returns a float32 tensor (N, 3, *size) on
    ``device``.

    Attributes: ``size`` (height, width), ``mean`` and ``std`` (RGB tuples),
    ``device``.
    """

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    device: str = "cpu"

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _pair(self.size))
        object.__setattr__(self, "mean", _triple(self.mean, "mean", positive=False))
        object.__setattr__(self, "std", _triple(self.std, "std", positive=True))
        object.__setattr__(self, "device", str(self.device))

    # ------------------------------------------------------------------ main API

    def __call__(self, images: Any) -> torch.Tensor:
        batch = self.to_unit_tensor(images)
        return self.normalize(batch)

    def to_unit_tensor(self, images: Any) -> torch.Tensor:
        """Images -> resized float tensor (N, 3, *size) in [0, 1], not normalised."""
        if isinstance(images, torch.Tensor):
            batch = self._tensor_batch(images)
            return self._resize(batch).to(self.device)
        if isinstance(images, (list, tuple)):
            if not images:
                raise InputError("expected at least one image, got an empty list")
            items = list(images)
        else:
            items = [images]
        tensors = []
        for i, item in enumerate(items):
            try:
                image = load_image(item)
            except InputError as exc:
                if len(items) == 1:
                    raise
                raise InputError(f"image {i} of the batch: {exc}") from exc
            tensors.append(self._resize(_pil_to_unit(image)))
        return torch.cat(tensors).to(self.device)

    def normalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """(x - mean) / std per channel for (3, H, W) or (N, 3, H, W) in [0, 1]."""
        mean, std = self._stats(tensor)
        return (tensor - mean) / std

    def denormalize(self, tensor: torch.Tensor) -> torch.Tensor:
        """Undo :meth:`normalize` and clamp to [0, 1], for display.

        Accepts (3, H, W) or (N, 3, H, W); returns a new tensor of the same shape,
        dtype and device.
        """
        mean, std = self._stats(tensor)
        return (tensor * std + mean).clamp(0.0, 1.0)

    # ------------------------------------------------------------------ helpers

    def _stats(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(tensor, torch.Tensor):
            raise InputError(f"expected a torch.Tensor, got {type(tensor).__name__}")
        if tensor.ndim not in (3, 4) or tensor.shape[-3] != 3:
            raise InputError(
                f"expected a tensor of shape (3, H, W) or (N, 3, H, W), got {tuple(tensor.shape)}"
            )
        if not tensor.is_floating_point():
            raise InputError(f"expected a floating-point tensor, got dtype {tensor.dtype}")
        shape = (3, 1, 1)
        mean = torch.tensor(self.mean, dtype=tensor.dtype, device=tensor.device).view(shape)
        std = torch.tensor(self.std, dtype=tensor.dtype, device=tensor.device).view(shape)
        return mean, std

    def _resize(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[-2:]) == self.size:
            return batch
        return F.interpolate(
            batch, size=self.size, mode="bilinear", antialias=True, align_corners=False
        ).clamp_(0.0, 1.0)

    @staticmethod
    def _tensor_batch(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.ndim == 3:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 4 or tensor.shape[1] != 3 or tensor.shape[0] == 0:
            raise InputError(
                "expected an image tensor of shape (3, H, W) or (N, 3, H, W), "
                f"got {tuple(tensor.shape)}"
            )
        if tensor.dtype == torch.uint8:
            return tensor.float().div_(255.0)
        if not tensor.is_floating_point():
            raise InputError(f"expected a uint8 or float image tensor, got dtype {tensor.dtype}")
        tensor = tensor.detach().float()
        if not torch.isfinite(tensor).all():
            raise InputError("the image tensor contains NaN or infinite values")
        low, high = tensor.min().item(), tensor.max().item()
        if low < -1e-3 or high > 1.0 + 1e-3:
            raise InputError(
                f"a float image tensor must hold values in [0, 1], got [{low:.4g}, {high:.4g}]"
            )
        return tensor.clamp(0.0, 1.0)

    def __repr__(self) -> str:
        return (
            f"ImagePreprocess(size={self.size}, mean={self.mean}, std={self.std}, "
            f"device={self.device!r}; bilinear antialiased resize, no crop)"
        )


def _pil_to_unit(image: Image.Image) -> torch.Tensor:
    array = np.array(image, dtype=np.uint8, copy=True)  # (H, W, 3), writable
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).float().div_(255.0)
