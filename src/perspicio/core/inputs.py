"""Validation of inputs at the boundary: one place, clear messages."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError
from .guard import model_device, model_dtype


def expected_channels(model: nn.Module) -> int | None:
    """in_channels of the first Conv layer, if the model starts with one."""
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return m.in_channels
        if isinstance(m, nn.Linear):
            return None
    return None


def as_batch(
    inputs: Any, model: nn.Module | None = None, *, ndim: int | None = 4, keep_integer: bool = False
) -> Tensor:
    """Turn ``inputs`` into a float tensor on the model's device, checked for shape and finiteness.

    Never modifies ``inputs``; returns a new tensor only when dtype/device differ.
    With ``keep_integer`` integer inputs (token ids for an embedding layer) keep their dtype.
    """
    if isinstance(inputs, Tensor):
        x = inputs.detach()
    else:
        try:
            import numpy as np

            if isinstance(inputs, np.ndarray):
                x = torch.from_numpy(np.ascontiguousarray(inputs))
            else:
                raise TypeError
        except TypeError:
            raise InputError(
                f"inputs must be a torch.Tensor or numpy array of shape (N, C, H, W); got {type(inputs).__name__}. "
                "For image files use perspicio.zoo.load_image and the model's preprocess."
            ) from None
    if ndim is not None and x.ndim != ndim:
        hint = " Add a batch dimension with x.unsqueeze(0)." if x.ndim == ndim - 1 else ""
        raise InputError(f"inputs must have {ndim} dimensions (N, C, H, W); got shape {tuple(x.shape)}.{hint}")
    if x.ndim == 0 or x.shape[0] == 0:
        raise InputError(f"inputs must hold at least one sample; got shape {tuple(x.shape)}.")
    if x.is_complex():
        raise InputError("complex inputs are not supported.")
    if model is not None:
        if ndim == 4:
            ch = expected_channels(model)
            if ch is not None and x.shape[1] != ch:
                raise InputError(
                    f"the model expects {ch} input channels; got {x.shape[1]} (input shape {tuple(x.shape)})."
                )
        if keep_integer and not x.is_floating_point() and x.dtype != torch.bool:
            return x.to(device=model_device(model))
        x = x.to(device=model_device(model), dtype=model_dtype(model))
    elif not x.is_floating_point():
        x = x.float()
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise InputError(f"inputs contain {bad} NaN/Inf value(s); explanations of non-finite inputs are meaningless.")
    return x
