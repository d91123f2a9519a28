"""Which BatchNorm layers can be folded into the layer before them, found by tracing.

One forward pass of one sample is traced at the operation level (a ``TorchFunctionMode``):
a BatchNorm call qualifies when its input is the output of a convolution/linear call whose
weight is used once and whose output nothing else consumes, and the BatchNorm itself is
called once. Functional calls and models that are not ``nn.Sequential`` work. Used by the
inference twin (:mod:`perspicio.core.fold`) and the LRP ``MergeBatchNorm`` canonizer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from . import ops
from .caches import Cache, state_tokens


class _PairTracer(TorchFunctionMode):
    """Records affine outputs, BatchNorm inputs and how often each tensor is consumed."""

    def __init__(self) -> None:
        super().__init__()
        self.keep: list[Tensor] = []  # keeps ids unique during the trace
        self.uses: dict[int, int] = {}
        self.affine_out: dict[int, Tensor] = {}  # id(output) -> weight
        self.weight_calls: dict[int, int] = {}
        self.bn_calls: list[tuple[Tensor, Tensor | None]] = []  # (input, running_mean)
        self.bn_count: dict[int, int] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, (Tensor, list, tuple)):  # a consumer (not a shape query such as x.dim())
            for a in (*args, *kwargs.values()):
                items = a if isinstance(a, (list, tuple)) else (a,)
                for t in items:
                    if isinstance(t, Tensor):
                        self.uses[id(t)] = self.uses.get(id(t), 0) + 1
                        self.keep.append(t)
        if ops.has_flag(func, ops.FOLDS_BATCHNORM) and isinstance(out, Tensor):
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            if isinstance(w, nn.Parameter):
                self.affine_out[id(out)] = w
                self.weight_calls[id(w)] = self.weight_calls.get(id(w), 0) + 1
                self.keep.append(out)
        elif func is F.batch_norm:
            x = args[0]
            rm = args[1] if len(args) > 1 else kwargs.get("running_mean")
            self.bn_calls.append((x, rm))
            if rm is not None:
                self.bn_count[id(rm)] = self.bn_count.get(id(rm), 0) + 1
        return out


#: per model and (input shape, dtype, module set): the mergeable pairs
_CACHE = Cache(
    "batchnorm pairs",
    holds="(affine, BatchNorm) module names",
    key="model (weak), input shape, modules",
    max_entries=1024,
)


def find_batchnorm_pairs(model: nn.Module, sample: Tensor) -> list[tuple[str, str]]:
    """``(affine_module_name, batchnorm_module_name)`` pairs that can be merged.

    One forward of one sample is traced (cached per model, module set and input shape).
    """
    mods = dict(model.named_modules())
    key = (tuple(sample.shape[1:]), sample.dtype, tuple(id(m) for m in mods.values()))
    hit = _CACHE.get(model, key)
    if hit is not None:
        return hit
    owner: dict[int, str] = {}
    bn_owner: dict[int, str] = {}
    for name, m in mods.items():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            owner[id(m.weight)] = name
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
            bn_owner[id(m.running_mean)] = name
    tracer = _PairTracer()
    with torch.no_grad(), tracer:
        model(sample[:1])
    pairs = []
    for x, rm in tracer.bn_calls:
        if rm is None or id(rm) not in bn_owner or tracer.bn_count.get(id(rm)) != 1:
            continue
        w = tracer.affine_out.get(id(x))
        if w is None or id(w) not in owner or tracer.weight_calls.get(id(w)) != 1:
            continue
        if tracer.uses.get(id(x), 0) != 1:  # the affine output also feeds something else
            continue
        pairs.append((owner[id(w)], bn_owner[id(rm)]))
    return _CACHE.put(model, pairs, key)


def folded_affine(lin: nn.Module, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """``(W * s, (b - mean) * s + beta)`` with ``s = gamma / sqrt(var + eps)``: the weight and bias
    of ``lin`` with the eval-mode ``bn`` after it folded in (computed in float64)."""
    w = lin.weight
    var = bn.running_var if bn.running_var is not None else torch.ones_like(bn.running_mean)
    scale = torch.rsqrt(var.double() + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.double()
    shift = -bn.running_mean.double() * scale
    if bn.bias is not None:
        shift = shift + bn.bias.double()
    b_old = lin.bias.double() if lin.bias is not None else torch.zeros_like(shift)
    new_w = (w.double() * scale.view((-1,) + (1,) * (w.ndim - 1))).to(w.dtype)
    return new_w.detach(), (b_old * scale + shift).to(w.dtype).detach()


def fingerprint(tensors: list[Tensor | None]) -> tuple:
    """Identity of tensors' current values for caches of derived values: one token per tensor
    (:func:`~perspicio.core.caches.state_tokens`) that changes with any change of its storage,
    shape, strides, dtype, device or any of its bytes - also writes through ``.data``, which do not
    bump the version counter, and edits that keep every norm and sum (a row swap, a sign flip)."""
    return state_tokens(tensors)


def flat_fingerprint(tensors: list[Tensor | None]) -> tuple:
    """:func:`fingerprint` of a whole model's tensors (the same tokens; kept as a separate name for
    the model-level state)."""
    return state_tokens(tensors)
