"""Inference twin: a private copy of the model with eval-mode BatchNorm folded away.

Methods that only need model *outputs* - occlusion, RISE, Shapley values, LIME,
Score-CAM's masked passes, deletion/insertion curves - spend nearly all their time
in hundreds of forward passes. In an eval-mode network every BatchNorm that
directly follows a convolution or linear layer is an affine map that can be folded
into that layer's weights (``W' = W * s``, ``b' = (b - mean) * s + beta`` with
``s = gamma / sqrt(var + eps)``); the folded network computes the same function
with one fewer pass over every feature map (faster forwards: docs/benchmarks.md).

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
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .bnpairs import find_batchnorm_pairs, flat_fingerprint, folded_affine
from .caches import Cache, register

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
    churn: int = 0  # consecutive rebuilds for attribute changes alone


#: a model whose attributes change between calls this many times in a row (it stores something
#: on itself in forward) runs unfolded instead of being copied again on every call
MAX_CHURN = 3


#: per model: its inference twin (None: run the model itself) for one weight state
_TWINS = Cache("inference twins", holds="BatchNorm-folded private copies of models", key="model (weak)", sized=True)


#: module attributes that are not the model's own settings
_INTERNAL = frozenset({"training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules",
                       "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook", "_forward_hooks",
                       "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                       "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
                       "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_perspicio_compiled"})
_SCALARS = (bool, int, float, str, bytes, type(None))


def _setting(v: Any) -> Any:
    return v if isinstance(v, _SCALARS) else (id(v), v._version) if isinstance(v, Tensor) else id(v)


def _state(model: nn.Module) -> tuple:
    """Identity of what the model computes besides its code: the weights (a token per tensor that
    changes with any change of its storage, layout or bytes, :func:`~perspicio.core.caches.state_tokens`),
    the modes, and every module's other attributes (a flag such as
    ``model.use_tta = True`` changes the function as much as a weight does; plain values are
    compared by value, objects by identity).

    Taken on every propagation call, so it reads the modules' dictionaries directly (one pass,
    no generators; a shared tensor simply appears twice) and keeps one flat tuple per field."""
    tensors: list[Tensor | None] = []
    training, settings = [], []
    for m in model.modules():
        d = m.__dict__
        training.append(d["training"])
        tensors.extend(d["_parameters"].values())
        tensors.extend(d["_buffers"].values())
        settings.append(tuple([(k, _setting(v)) for k, v in d.items() if k not in _INTERNAL]))
    return flat_fingerprint(tensors), tuple(training), tuple(settings)


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
    return (twin, len(pairs)) if outputs_match(got, ref) else (model, 0)


def outputs_match(got: object, ref: object, tolerance: float = TOLERANCE) -> bool:
    """Whether a faster path's outputs equal the model's up to float rounding: same shape, finite,
    max difference at most ``tolerance`` of the reference's largest magnitude. The one check behind
    every substitute this library runs for the user's model (folded twin, compiled twin,
    incremental boxes)."""
    if not (isinstance(ref, Tensor) and isinstance(got, Tensor)) or ref.shape != got.shape:
        return False
    scale = ref.detach().abs().max().clamp_min(1e-12)
    return bool(torch.isfinite(got).all()) and ((got - ref).abs().max() / scale).item() <= tolerance


def model_state(model: nn.Module) -> tuple:
    """What the model computes besides its code: the weights' and buffers' values
    (:func:`~perspicio.core.bnpairs.fingerprint`), every module's training flag and its other
    attributes."""
    return _state(model)


def current_twin(model: nn.Module, state: tuple) -> tuple[nn.Module, int] | None:
    """``(module, folded)`` if a twin (or the decision to run the model itself) is cached for
    ``model`` in ``state`` (:func:`model_state`); None if one would have to be built."""
    twin = _TWINS.get(model) if FOLD_BATCHNORM else None
    if twin is None or twin.state != state:
        return None
    return (model if twin.module is None else twin.module), twin.folded


def inference_twin(model: nn.Module, sample: Tensor, state: tuple | None = None) -> tuple[nn.Module, int]:
    """``(module, folded)``: the cached (or newly built and verified) inference twin of
    ``model`` for inputs like ``sample`` - or ``model`` itself when nothing can be folded.
    ``state``: :func:`model_state`, when the caller has just taken it."""
    if not FOLD_BATCHNORM:
        return model, 0
    state = _state(model) if state is None else state
    twin = _TWINS.get(model)
    if twin is None or twin.state != state:
        churn = twin.churn + 1 if twin is not None and twin.state[:2] == state[:2] else 0
        module, folded = _build(model, sample) if churn < MAX_CHURN else (model, 0)
        # the cache must not hold a strong reference to its own key: None stands for the model
        twin = _TWINS.put(model, Twin(None if module is model else module, folded, state, churn))
    return (model if twin.module is None else twin.module), twin.folded


# ============================================================================ compiled twin (opt-in)

#: batches smaller than this run uncompiled (compiling costs 10-50 s per shape)
MIN_COMPILED_BATCH = 8
#: compiled graphs kept per twin (least recently used shape first out)
MAX_COMPILED_PER_TWIN = 4


class _CompiledGraphs:
    """The compiled graphs of private twins, kept on each twin itself (``_perspicio_compiled``): a
    cache keyed on the twin would keep it alive through the compiled wrapper, which references it.
    So they live exactly as long as their twin (which the inference/fused twin caches bound), at
    most :data:`MAX_COMPILED_PER_TWIN` per twin; this registry entry lists and clears them."""

    name = "compiled graphs"

    def __init__(self) -> None:
        self._modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self._lock = threading.Lock()
        register(self)

    def entries(self, module: nn.Module) -> OrderedDict:
        with self._lock:
            return module.__dict__.get("_perspicio_compiled", OrderedDict())

    def put(self, module: nn.Module, key: tuple, value: tuple) -> None:
        with self._lock:
            entries = module.__dict__.setdefault("_perspicio_compiled", OrderedDict())
            entries[key] = value
            while len(entries) > MAX_COMPILED_PER_TWIN:
                entries.popitem(last=False)
            self._modules.add(module)

    def clear(self) -> None:
        with self._lock:
            for m in list(self._modules):
                m.__dict__.pop("_perspicio_compiled", None)
            self._modules.clear()

    def info(self) -> Any:
        from .caches import CacheInfo

        with self._lock:
            n = sum(len(m.__dict__.get("_perspicio_compiled", ())) for m in list(self._modules))
        return CacheInfo(self.name, "torch.compile graphs of private twins (on the twin)", "twin, input shape",
                         n, 0, None, MAX_COMPILED_PER_TWIN, "with its twin; LRU per twin")


COMPILED = _CompiledGraphs()


def compiled_outputs(module: nn.Module, x: Tensor) -> Tensor | None:
    """``module(x)`` through ``torch.compile`` (inductor), or None when that is not worth it or not
    possible (the caller then runs ``module`` itself).

    One compiled graph per module, sample shape, dtype and memory format, for the first batch
    size of at least :data:`MIN_COMPILED_BATCH` seen; shorter batches of at least half that size
    are padded to it, longer ones split, so nothing recompiles. The first compiled batch is
    checked against ``module`` (relative tolerance :data:`TOLERANCE`); a failure to compile (no
    C++ compiler, an unsupported operation) or a mismatch warns once and disables compilation for
    that module and shape. Only for private inference twins, never the user's model.
    """
    if len(x) < MIN_COMPILED_BATCH // 2:
        return None
    key = (tuple(x.shape[1:]), x.dtype, str(x.device), x.is_contiguous())
    entries = COMPILED.entries(module)
    entry = entries.get(key)
    if entry is not None:
        entries.move_to_end(key)
    if entry is None:
        if len(x) < MIN_COMPILED_BATCH:
            return None
        try:
            from torch._inductor import config as inductor_config

            fn = torch.compile(module, dynamic=False)
            # freezing: the twin's weights are constants (private, never written), so inductor may
            # fold and pre-pack them for oneDNN (measured in docs/benchmarks.md, "Speed-layer notes")
            with inductor_config.patch(freezing=True):
                got = fn(x)
            if not outputs_match(got, module(x)):
                raise RuntimeError("compiled outputs differ from the model's")
        except Exception as exc:  # noqa: BLE001 - any compiler failure means: run uncompiled
            msg = (str(exc).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"compile=True: torch.compile could not be used ({type(exc).__name__}: {msg}); "
                          "running the model uncompiled.", RuntimeWarning, stacklevel=3)
            COMPILED.put(module, key, (None, 0))
            return None
        COMPILED.put(module, key, (fn, len(x)))
        return got
    fn, size = entry
    if fn is None or len(x) < size // 2:
        return None
    parts = []
    for start in range(0, len(x), size):
        piece = x[start:start + size]
        n = len(piece)
        if n < size // 2:
            parts.append(module(piece))
            continue
        if n < size:
            piece = torch.cat([piece, piece[-1:].expand(size - n, *piece.shape[1:])])
        parts.append(fn(piece)[:n])
    return torch.cat(parts)
