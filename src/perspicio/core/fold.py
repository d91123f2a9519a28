"""Inference twin: a private copy of the model with eval-mode BatchNorm folded away.

Methods that only need model *outputs* - occlusion, RISE, Shapley values, LIME,
Score-CAM's masked passes, deletion/insertion curves - spend nearly all their time
in hundreds of forward passes. In an eval-mode network every BatchNorm that
directly follows a convolution or linear layer is an affine map that can be folded
into that layer's weights (``W' = W * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``); the folded network computes the same function
with one fewer pass over every feature map (1.2-1.3x faster forwards on the
bundled EfficientNet-Lite0, see docs/benchmarks.md).

The user's model is never touched: the twin is a deep copy, built once per model
and weight state (cached on a weak reference and rebuilt when any parameter or
buffer changes in place or is replaced), and checked against the original on the
first sample it sees - if the outputs differ by more than float rounding (e.g. the
model calls ``F.batch_norm`` itself, so the pair cannot be folded by swapping
modules) the original model is used instead. ``PERSPICIO_FOLD_BATCHNORM=0`` turns
folding off.
"""

from __future__ import annotations

import copy
import os
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .bnpairs import find_batchnorm_pairs, folded_affine

#: fold BatchNorm into the preceding layer for output-only passes (PERSPICIO_FOLD_BATCHNORM=0: off)
FOLD_BATCHNORM = os.environ.get("PERSPICIO_FOLD_BATCHNORM", "1") not in ("0", "false", "no")
#: models with more parameter bytes than this are not copied (the twin doubles their memory)
MAX_TWIN_BYTES = 512 * 2**20
#: largest accepted difference between twin and model, relative to the output's magnitude
TOLERANCE = 1e-4


@dataclass(frozen=True)
class Twin:
    """The module to run for pure outputs and how many BatchNorm layers it folded."""

    module: nn.Module | None  # None: run the model itself
    folded: int
    state: tuple


_TWINS: weakref.WeakKeyDictionary[nn.Module, Twin] = weakref.WeakKeyDictionary()


def _state(model: nn.Module) -> tuple:
    """Identity of the weights: storage pointer and in-place version of every tensor, and modes."""
    tensors = [*model.parameters(), *model.buffers()]
    return (
        tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors),
        tuple(m.training for m in model.modules()),
    )


def _fold_pair(affine: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> None:
    """Fold ``bn`` into ``affine`` in place (both already belong to the private copy)."""
    w, b = folded_affine(affine, bn)
    affine.weight = nn.Parameter(w, requires_grad=False)
    affine.bias = nn.Parameter(b, requires_grad=False)


def _build(model: nn.Module, sample: Tensor) -> tuple[nn.Module, int]:
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model, 0
    if any(m.training for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        return model, 0  # batch statistics: nothing to fold
    if sum(t.numel() * t.element_size() for t in model.parameters()) > MAX_TWIN_BYTES:
        return model, 0
    try:
        pairs = find_batchnorm_pairs(model, sample)
        if not pairs:
            return model, 0
        twin = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - an uncopyable or untraceable model simply runs unfolded
        return model, 0
    for p in twin.parameters():
        p.requires_grad_(False)
    for m in twin.modules():  # hooks (ours from a live Capture, or the user's) stay on the original only
        for hooks in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks, m._backward_pre_hooks,
                      m._forward_hooks_with_kwargs, m._forward_pre_hooks_with_kwargs, m._forward_hooks_always_called):
            hooks.clear()
    for affine_name, bn_name in pairs:
        _fold_pair(twin.get_submodule(affine_name), twin.get_submodule(bn_name))
        parent_name, _, child = bn_name.rpartition(".")
        setattr(twin.get_submodule(parent_name), child, nn.Identity())
    try:
        with torch.no_grad():
            ref, got = model(sample[:1]), twin(sample[:1])
    except Exception:  # noqa: BLE001 - e.g. forward() reads the BatchNorm's buffers itself
        return model, 0
    if not (isinstance(ref, Tensor) and isinstance(got, Tensor)) or ref.shape != got.shape:
        return model, 0
    scale = ref.detach().abs().max().clamp_min(1e-12)
    if not torch.isfinite(got).all() or ((got - ref).abs().max() / scale).item() > TOLERANCE:
        return model, 0
    return twin, len(pairs)


def inference_twin(model: nn.Module, sample: Tensor) -> tuple[nn.Module, int]:
    """``(module, folded)``: the cached (or newly built and verified) inference twin of
    ``model`` for inputs like ``sample`` - or ``model`` itself when nothing can be folded."""
    if not FOLD_BATCHNORM:
        return model, 0
    state = _state(model)
    twin = _TWINS.get(model)
    if twin is None or twin.state != state:
        module, folded = _build(model, sample)
        # the cache must not hold a strong reference to its own key: None stands for the model
        twin = _TWINS[model] = Twin(None if module is model else module, folded, state)
    return (model if twin.module is None else twin.module), twin.folded
