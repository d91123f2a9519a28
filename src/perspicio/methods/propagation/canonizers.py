"""Canonizers: scoped, undoable rewrites that give the model an LRP-friendly form.

:class:`MergeBatchNorm` folds each eval-mode BatchNorm into the convolution or
linear layer that feeds it (``W' = W * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``) and turns the BatchNorm into an exact identity
(mean 0, var 1, eps 0, gamma 1, beta 0). The function computed is the same; LRP
rules then see one affine operation instead of two. Pairs are found by tracing
one forward pass at the operation level (a BatchNorm whose input is the output
of a convolution/linear call that nothing else consumes), so functional calls
and models that are not ``nn.Sequential`` work. Layers without a bias get one
for the duration (EfficientNet's convolutions have none).

On exit every parameter and buffer is restored bit for bit (same tensor
objects, original values, ``bias`` removed again where it did not exist) - also
when the body raises.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from ...core import fold, fuse
from ...core.bnpairs import find_batchnorm_pairs, fingerprint, folded_affine
from ...core.caches import Cache, CacheInfo, register
from .operations import Call, op_name
from .tracing import freeze_index


class MergeBatchNorm:
    """Scoped merge of BatchNorm layers into their preceding convolution/linear.

    ``pairs``: explicit ``[(affine_module, batchnorm_module), ...]`` (modules or
    names); by default they are discovered by tracing ``sample`` through the model.
    Use as ``with MergeBatchNorm()(model, sample) as merged: ...``; ``merged`` is
    the list of merged ``(affine, batchnorm)`` names. :func:`identity_batchnorms`
    tells propagators which BatchNorm calls are now exact identities (skipped).
    """

    name = "merge_batchnorm"

    def __init__(self, pairs: list[tuple[Any, Any]] | None = None) -> None:
        self.pairs = pairs

    def __repr__(self) -> str:
        return "MergeBatchNorm()"

    @contextmanager
    def __call__(self, model: nn.Module, sample: Tensor) -> Iterator[list[tuple[str, str]]]:
        mods = dict(model.named_modules())
        names = {id(m): n for n, m in mods.items()}
        if self.pairs is None:
            pairs = [(mods[a], mods[b]) for a, b in find_batchnorm_pairs(model, sample)]
        else:
            pairs = [
                (mods[a] if isinstance(a, str) else a, mods[b] if isinstance(b, str) else b)
                for a, b in self.pairs
            ]
        undo: list[Any] = []
        merged: list[tuple[str, str]] = []
        pairs = [
            (lin, bn) for lin, bn in pairs if not (bn.training and bn.track_running_stats)
        ]  # batch stats
        keys = _state_keys(pairs)
        try:
            with torch.no_grad():
                for (lin, bn), key in zip(pairs, keys):
                    undo.append(_merge(lin, bn, key))
                    merged.append((names.get(id(lin), "?"), names.get(id(bn), "?")))
                    _IDENTITY.add(id(bn.running_mean))
            yield merged
        finally:
            with torch.no_grad():
                for _, bn in pairs:
                    _IDENTITY.discard(id(bn.running_mean))
                for restore in reversed(undo):
                    restore()


def _hooks(model: nn.Module) -> tuple:
    return tuple(
        ids
        for m in model.modules()
        for ids in (tuple(m._forward_hooks), tuple(m._forward_pre_hooks))
        if ids
    )


def model_state(model: nn.Module) -> tuple:
    """What a reference pass depends on besides the baseline: the values of the weights and
    buffers and every module's training flag (:func:`~perspicio.core.fold.model_state`), and
    the identities of the modules' forward hooks."""
    return fold.model_state(model), _hooks(model)


@contextmanager
def propagation_module(
    model: nn.Module, sample: Tensor, state: tuple
) -> Iterator[tuple[nn.Module, int, int]]:
    """``(module, BatchNorms folded or merged, convolutions fused)``: the module to propagate
    through: the model's BatchNorm-folded inference twin - with its convolutions fused with
    their activations and zero paddings (:mod:`perspicio.core.fuse`) where it has any
    (:mod:`perspicio.core.fold`, a cached private copy: nothing of the user's model is touched
    and nothing is merged per call) when it has one and no forward hooks (the twin runs without
    them); otherwise the model itself with its eval BatchNorms merged for the call. Eval
    BatchNorm is affine, so either way the function is the same; folding saves a pass over
    every feature map forward and backward.

    A twin is built only for a model whose state is the same as in the previous call: copying
    and verifying the model costs a few propagations, which a sweep over many inputs repays and
    a training loop that explains after every optimizer step (new weights each call) would not.
    """
    stable = _LAST_STATE.get(model) == state
    _LAST_STATE.put(model, state)
    if not state[1]:
        twin = fold.current_twin(model, state[0])
        if twin is None and stable:
            twin = fold.inference_twin(model, sample, state[0])
        if twin is not None and twin[0] is not model:
            module = twin[0]
            fused, n = fuse.fused_twin(module, sample)
            if n:  # convolutions fused with their activations (and zero paddings folded)
                module = fused
            _own(module)
            yield module, twin[1], n
            return
    with MergeBatchNorm()(model, sample) as merged:
        yield model, len(merged), 0


#: per model: its state at the previous propagation call (see propagation_module)
_LAST_STATE = Cache(
    "propagation last state",
    holds="model state tokens at the previous LRP/DeepLIFT call",
    key="model (weak)",
    max_entries=4096,
)


#: twins whose tensors are registered as perspicio's own (see :func:`merged_tensor`)
_OWNED_TWINS = Cache(
    "owned twins",
    holds="private twins whose tensors are registered as perspicio's own",
    key="twin (weak)",
    tied=True,
)


def _own(twin: nn.Module) -> None:
    """Register a private twin's weights like merged weights: perspicio made them and never writes
    to them (the twin is rebuilt when the user's weights change), so rules may memoise W+ etc."""
    if _OWNED_TWINS.get(twin) is not None:
        return
    for t in (*twin.parameters(), *twin.buffers()):
        _own_tensor(t)
    _OWNED_TWINS.put(twin, True)
    freeze_index(twin)


#: ids of the running-mean buffers of BatchNorms currently merged (exact identities)
_IDENTITY: set[int] = set()


def is_identity_batchnorm(running_mean: Any) -> bool:
    """True if a ``batch_norm`` call with this running mean is a merged (identity) BatchNorm."""
    return running_mean is not None and id(running_mean) in _IDENTITY


#: per affine layer: (state key of the pair, merged weight, merged bias)
_MERGED = Cache(
    "merged batchnorm weights",
    holds="weights/biases of layers with their BatchNorm merged",
    key="layer (weak)",
    sized=True,
)


def _state_keys(pairs: list[tuple[nn.Module, nn.Module]]) -> list[tuple]:
    """Per pair, the fingerprint of the six tensors its merge is computed from (one batched
    norm over all pairs: a per-pair call costs more in overhead than in arithmetic)."""
    tensors = [
        t
        for lin, bn in pairs
        for t in (lin.weight, lin.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
    ]
    fp = fingerprint(tensors)
    return [fp[6 * i : 6 * i + 6] + (bn.eps,) for i, (_, bn) in enumerate(pairs)]


def _merged_values(
    lin: nn.Module, bn: nn.modules.batchnorm._BatchNorm, key: tuple
) -> tuple[Tensor, Tensor]:
    """``(W * s, (b - mean) * s + beta)``, cached while none of the tensors changes (``key``)."""
    hit = _MERGED.get(lin)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    new_w, new_b = folded_affine(lin, bn)
    _MERGED.put(lin, (key, new_w, new_b), size=nbytes_pair(new_w, new_b))
    for t in (new_w, new_b):
        _own_tensor(t)
    return new_w, new_b


def nbytes_pair(w: Tensor, b: Tensor) -> int:
    return w.numel() * w.element_size() + b.numel() * b.element_size()


class _OwnedTensors:
    """Storage pointer -> perspicio's own tensor there (weakly): merged weights and private twins'
    tensors. Lives as long as those tensors (dead entries are dropped every 4096 insertions); reads
    are single dict lookups, writes take the lock."""

    name = "owned tensors"

    def __init__(self) -> None:
        self.table: dict[int, weakref.ref] = {}
        self._lock = threading.Lock()
        register(self)

    def add(self, t: Tensor) -> None:
        with self._lock:
            if (
                len(self.table) >= 4096
            ):  # drop the entries of tensors that are gone (rebuilt twins, old merges)
                for ptr in [p for p, ref in self.table.items() if ref() is None]:
                    del self.table[ptr]
            self.table[t.data_ptr()] = weakref.ref(t)

    def clear(self) -> None:
        with self._lock:
            self.table.clear()

    def info(self) -> CacheInfo:
        return CacheInfo(
            self.name,
            "storage pointer -> perspicio's own tensor (weak reference)",
            "storage pointer",
            len(self.table),
            0,
            None,
            None,
            "with the tensors",
        )


#: storage pointer -> the merged weight/bias tensor perspicio computed and holds (weakly)
_OWNED = _OwnedTensors()


def _own_tensor(t: Tensor) -> None:
    _OWNED.add(t)


def merged_tensor(t: Tensor) -> Tensor | None:
    """The canonizer's own merged tensor whose storage ``t`` (a parameter) currently holds, or None.

    Such tensors are computed once per set of layer/BatchNorm states and never written to, so
    values derived from them may be kept across calls (see ``rules.derived``).
    """
    ref = _OWNED.table.get(t.data_ptr())
    owned = ref() if ref is not None else None
    if (
        owned is None
        or owned.shape != t.shape
        or owned.stride() != t.stride()
        or owned.dtype != t.dtype
        or owned.device != t.device
    ):  # e.g. a transposed view of a square weight: not the same tensor
        return None
    return owned


#: per affine layer without a bias: the Parameter that holds its merged bias (it wraps the cached
#: merged bias), reused across calls instead of a new Parameter per layer and call
_BIAS_PARAMS = Cache(
    "merged bias parameters",
    holds="Parameters wrapping merged biases (memory: merged weights)",
    key="layer (weak)",
    tied=True,
)


def _bias_parameter(lin: nn.Module, value: Tensor) -> nn.Parameter:
    p = _BIAS_PARAMS.get(lin)
    if (
        p is None
        or p.data_ptr() != value.data_ptr()
        or p.shape != value.shape
        or p.dtype != value.dtype
    ):
        p = nn.Parameter(value, requires_grad=False)
        _BIAS_PARAMS.put(lin, p)
    return p


def _merge(lin: nn.Module, bn: nn.modules.batchnorm._BatchNorm, key: tuple) -> Any:
    """Merge ``bn`` into ``lin``; return the function that undoes it exactly.

    The parameters and buffers keep their identity; only the tensors they point to
    (``.data``) are swapped, so restoring puts back the very same memory.
    """
    new_w, new_b = _merged_values(lin, bn, key)
    swaps: list[tuple[Tensor, Tensor]] = []  # (parameter/buffer, original data)

    def swap(t: Tensor, value: Tensor) -> None:
        swaps.append((t, t.data))
        t.data = value

    had_bias = lin.bias is not None
    eps = bn.eps
    try:
        swap(lin.weight, new_w)
        if had_bias:
            swap(lin.bias, new_b)
        else:
            lin.bias = _bias_parameter(lin, new_b)
        swap(bn.running_mean, torch.zeros_like(bn.running_mean))
        swap(bn.running_var, torch.ones_like(bn.running_var))
        if bn.weight is not None:
            swap(bn.weight, torch.ones_like(bn.weight))
        if bn.bias is not None:
            swap(bn.bias, torch.zeros_like(bn.bias))
        bn.eps = 0.0
    except BaseException:
        _restore(lin, bn, swaps, had_bias, eps)
        raise

    def restore() -> None:
        _restore(lin, bn, swaps, had_bias, eps)

    return restore


def _restore(
    lin: nn.Module, bn: nn.Module, swaps: list[tuple[Tensor, Tensor]], had_bias: bool, eps: float
) -> None:
    for t, data in reversed(swaps):
        t.data = data
    if not had_bias:
        lin.bias = None
    bn.eps = eps


def merged_batchnorm(call: Call) -> bool:
    """True for a ``batch_norm`` call of a BatchNorm currently merged by the canonizer."""
    if not op_name(call.func).endswith("batch_norm"):
        return False
    rm = call.args[1] if len(call.args) > 1 else call.kwargs.get("running_mean")
    return is_identity_batchnorm(rm)
