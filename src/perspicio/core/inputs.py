"""Validation of inputs at the boundary: one place, clear messages."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..errors import InputError, ModelError
from .guard import model_device, model_dtype, model_modules, walk_has_meta

_CONV_NDIM = {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}


def expected_input(model: nn.Module) -> tuple[int, int] | None:
    """``(channels, ndim)`` the model expects if it starts with a convolution (its
    ``in_channels`` and its batched input rank: 3 for Conv1d, 4 for Conv2d, 5 for Conv3d),
    or what a black box declares (an ONNX session's input shape); else None."""
    declared = getattr(model, "expected_input", None)
    if declared is not None and not callable(declared):
        return declared
    for m in model_modules(model):
        for cls, ndim in _CONV_NDIM.items():
            if isinstance(m, cls):
                return m.in_channels, ndim
        if isinstance(m, nn.Linear):
            return None
    return None


def expected_channels(model: nn.Module) -> int | None:
    """in_channels of the first Conv layer, if the model starts with one."""
    exp = expected_input(model)
    return exp[0] if exp is not None else None


def check_model_usable(model: nn.Module) -> None:
    """Refuse models whose weights hold no data (the ``meta`` device) with a clear error."""
    if not walk_has_meta(model):
        return
    raise ModelError(
        f"the model ({type(model).__name__}) has parameters on the 'meta' device: they have shapes but no values "
        "(built under torch.device('meta') or with empty weights). Load real weights first, e.g. "
        "model.to_empty(device='cpu') then model.load_state_dict(...)."
    )


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
        check_model_usable(model)
        exp = expected_input(model)
        # checked whenever the input has the rank the first convolution takes (also for methods that
        # accept any rank - perturbations, Shapley values, LIME - so images with the wrong channel
        # count fail here, not deep inside torch)
        if exp is not None and x.ndim == exp[1] and x.shape[1] != exp[0]:
            raise InputError(
                f"the model expects {exp[0]} input channels; got {x.shape[1]} (input shape {tuple(x.shape)})."
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
