"""Which BatchNorm layers can be folded into the layer before them, found by tracing.

One forward pass of one sample is traced at the operation level (a ``TorchFunctionMode``):
a BatchNorm call qualifies when its input is the output of a convolution/linear call whose
weight is used once and whose output nothing else consumes, and the BatchNorm itself is
called once. Functional calls and models that are not ``nn.Sequential`` work. Used by the
inference twin (:mod:`perspicio.core.fold`) and the LRP ``MergeBatchNorm`` canonizer.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

_AFFINE_FUNCS = (F.conv1d, F.conv2d, F.conv3d, F.linear)


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

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, (Tensor, list, tuple)):  # a consumer (not a shape query such as x.dim())
            for a in (*args, *kwargs.values()):
                items = a if isinstance(a, (list, tuple)) else (a,)
                for t in items:
                    if isinstance(t, Tensor):
                        self.uses[id(t)] = self.uses.get(id(t), 0) + 1
                        self.keep.append(t)
        if func in _AFFINE_FUNCS and isinstance(out, Tensor):
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


_CACHE: weakref.WeakKeyDictionary[nn.Module, dict[Any, list[tuple[str, str]]]] = weakref.WeakKeyDictionary()


def find_batchnorm_pairs(model: nn.Module, sample: Tensor) -> list[tuple[str, str]]:
    """``(affine_module_name, batchnorm_module_name)`` pairs that can be merged.

    One forward of one sample is traced (cached per model, module set and input shape).
    """
    mods = dict(model.named_modules())
    key = (tuple(sample.shape[1:]), sample.dtype, tuple(id(m) for m in mods.values()))
    cache = _CACHE.setdefault(model, {})
    if key in cache:
        return cache[key]
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
    cache[key] = pairs
    return pairs


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
    """Identity of tensors' current values for caches of derived weights: storage, in-place
    version counter, and each tensor's L2 norm - the norm because writes through ``.data``
    (``p.data.mul_(2)``, EMA updates) change the values without bumping the version counter."""
    it = iter(_norms(tensors))
    return tuple(None if t is None else (t.data_ptr(), t._version, t.dtype, str(t.device),
                                         next(it) if t.is_floating_point() else None)
                 for t in tensors)


def flat_fingerprint(tensors: list[Tensor | None]) -> tuple:
    """:func:`fingerprint` as one tuple per field (storages, versions, dtypes and devices, norms,
    which entries are None) instead of one tuple per tensor: the same information, built in
    a fraction of the time for the few hundred tensors of a whole model."""
    present = [t for t in tensors if t is not None]
    return (tuple([t.data_ptr() for t in present]), tuple([t._version for t in present]),
            tuple([(t.dtype, t.device) for t in present]), tuple(_norms(present)),
            tuple([t is None for t in tensors]))


def _norms(tensors: list[Tensor | None]) -> list[float]:
    """The L2 norm of each floating-point tensor (in order; None and integer tensors skipped), in
    one batched multi-tensor norm."""
    floats = [t.detach() for t in tensors if t is not None and t.is_floating_point()]
    return torch.stack(torch._foreach_norm(floats)).tolist() if floats else []
