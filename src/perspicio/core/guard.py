"""Scoped model state: everything a method changes on the user's model is undone.

``model_guard`` puts the model in eval mode, stops parameters from requiring
gradients (we only ever need gradients w.r.t. inputs or activations) and, on exit,
restores every module's ``training`` flag, every parameter's ``requires_grad`` and
``.grad`` exactly as found - also when the body raises.

Threads: a model's flags and gradients are shared by every thread that uses it, so the guard
also holds a per-model re-entrant lock for the whole call (:func:`model_lock`). Calls on the same
model from several threads run one after the other, each seeing and restoring the model exactly as
its caller left it; calls on different models run in parallel. Nested calls in one thread (a metric
that calls a method) re-enter the lock.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

#: the walks of the models this thread is inside a guarded call (or a :func:`shared_walk`) of,
#: innermost last: a method call walks its model once - the guard's walk serves the input checks and
#: layer searches of the same call. Lives only for the call; structure does not change inside one
#: (methods add hooks, not modules).
_WALKS = threading.local()

#: one re-entrant lock per live model (weak keys: an entry dies with its model; no bytes held)
_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_MUTEX = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises perspicio's calls on ``model`` across threads."""
    with _LOCKS_MUTEX:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextmanager
def model_guard(
    model: nn.Module, *, eval_mode: bool = True, freeze: bool = True
) -> Iterator[nn.Module]:
    """Run the body with ``model`` in eval mode and frozen parameters; restore on exit.

    Entered on every call of every method, so it touches only what differs: a model already in
    eval mode is not switched (``model.eval()``, which respects overridden ``train`` methods, runs
    only if some module is training), and only flags and gradients that changed are written back.
    ``freeze=False`` (methods that never differentiate) leaves the parameters alone: neither their
    ``requires_grad`` nor their gradients are read or written.
    """
    with model_lock(model), _guarded(model, eval_mode=eval_mode, freeze=freeze):
        yield model


#: nn.Module's traversal: a model whose modules override none of it is walked through the
#: ``_modules`` / ``_parameters`` dicts directly - the same modules and parameters in the same order
#: as the generators, about 3x faster (MiniLM: 122 modules, 80 us instead of 230 us); a model that
#: overrides any of it is walked by the generators
_NAMED_MODULES = nn.Module.named_modules
_MODULES = nn.Module.modules
_ROOT_PARAMETERS = ("parameters", "named_parameters", "_named_members")
_ROOT_BUFFERS = ("buffers", "named_buffers")


class _Walk:
    """One traversal of a model: ``named_modules()`` and ``modules()`` as lists; ``parameters()`` read
    on first use (a guard that does not freeze never needs them)."""

    __slots__ = ("model", "named", "modules", "generators", "_parameters", "_meta")

    def __init__(
        self,
        model: nn.Module,
        named: list[tuple[str, nn.Module]],
        generators: bool,
    ) -> None:
        self.model = model
        self.named = named
        self.modules = [m for _, m in named] if not generators else list(model.modules())
        #: the model (or one of its modules) overrides the traversal: its generators are the truth
        self.generators = generators
        self._parameters: list[nn.Parameter] | None = None
        self._meta: bool | None = None

    @property
    def has_meta(self) -> bool:
        """Whether a parameter or buffer is on the ``meta`` device (shapes without values)."""
        if self._meta is None:
            self._meta = any(t.is_meta for t in _tensors(self.model, self.modules, self.generators))
        return self._meta

    @property
    def parameters(self) -> list[nn.Parameter]:
        """``list(model.parameters())``: every parameter once, in module order."""
        if self._parameters is None:
            if self.generators:
                self._parameters = list(self.model.parameters())
            else:
                params: list[nn.Parameter] = []
                held: set[int] = set()
                for m in self.modules:
                    for p in m._parameters.values():
                        if p is not None and id(p) not in held:
                            held.add(id(p))
                            params.append(p)
                self._parameters = params
        return self._parameters


def _shared(model: nn.Module) -> _Walk | None:
    """The walk of ``model`` this thread is inside a guarded call (or shared walk) of, else None."""
    for m, walk in reversed(getattr(_WALKS, "stack", ())):
        if m is model:
            return walk
    return None


def _current(model: nn.Module) -> _Walk:
    """The walk of ``model``: the guard's inside a guarded call of it, else a new one."""
    walk = _shared(model)
    return walk if walk is not None else _walk(model)


def walk_has_meta(model: nn.Module) -> bool:
    """Whether a parameter or buffer of ``model`` is on the ``meta`` device (inside a guarded call:
    answered once per call, see :func:`checked_before`)."""
    return _current(model).has_meta


def checked_before(model: nn.Module) -> None:
    """Inside a guarded call of ``model``, whose every tensor was checked off the ``meta`` device
    before (a method checks its model when built): only a model moved to ``meta`` since - its first
    tensor there - is refused by the call's checks; the full scan, one access per parameter and
    buffer, is not repeated on every call."""
    walk = _shared(model)
    if walk is not None and walk._meta is None:
        walk._meta = model_device(model).type == "meta"


def model_modules(model: nn.Module) -> Iterable[nn.Module]:
    """``model.modules()``: inside a guarded call of ``model`` the guard's walk, else the generator
    (a caller that stops early does not pay for a whole walk)."""
    walk = _shared(model)
    return walk.modules if walk is not None else model.modules()


def module_tree(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``list(model.named_modules())``: every module once (the first name it is reached by),
    pre-order. Inside a guarded call of ``model`` the guard's walk is reused."""
    return list(_current(model).named)


def _modules_and_parameters(model: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
    """``list(model.modules())`` and ``list(model.parameters())`` (every parameter once, in module
    order)."""
    walk = _current(model)
    return walk.modules, walk.parameters


def _walk(model: nn.Module) -> _Walk:
    """The modules and their names in one pass over the ``_modules`` dicts; the generators when the
    model or one of its modules overrides the traversal."""
    root = type(model)
    if root.modules is not _MODULES or any(
        getattr(root, n) is not getattr(nn.Module, n) for n in _ROOT_PARAMETERS
    ):
        return _Walk(model, list(model.named_modules()), generators=True)
    named: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    stack: list[tuple[str, nn.Module]] = [("", model)]
    while stack:
        name, m = stack.pop()
        if id(m) in seen:
            continue
        if type(m).named_modules is not _NAMED_MODULES:  # a module that walks its own way
            return _Walk(model, list(model.named_modules()), generators=True)
        seen.add(id(m))
        named.append((name, m))
        prefix = name + "." if name else ""
        children = [(prefix + k, c) for k, c in m._modules.items() if c is not None]
        children.reverse()
        stack.extend(children)
    return _Walk(model, named, generators=False)


def model_tensors(model: nn.Module) -> list[Tensor]:
    """Every parameter and buffer of ``model``: ``[*model.parameters(), *model.buffers()]`` up to
    order and repeats, read from the module dicts in one walk (the generators for models that
    override the traversal). For checks over all of a model's tensors (e.g. the meta device)."""
    walk = _current(model)
    return _tensors(model, walk.modules, walk.generators)


def _tensors(model: nn.Module, modules: list[nn.Module], generators: bool) -> list[Tensor]:
    root = type(model)
    if generators or any(getattr(root, n) is not getattr(nn.Module, n) for n in _ROOT_BUFFERS):
        return [*model.parameters(), *model.buffers()]
    return [t for m in modules for d in (m._parameters, m._buffers) for t in d.values() if t is not None]


@contextmanager
def shared_walk(model: Any) -> Iterator[None]:
    """In the body, the module tree and model checks of ``model`` come from one walk (for a method's
    constructor: its model check and layer searches; the body must not add or remove modules)."""
    if not isinstance(model, nn.Module):
        yield
        return
    stack = getattr(_WALKS, "stack", None)
    if stack is None:
        stack = _WALKS.stack = []
    stack.append((model, _current(model)))
    try:
        yield
    finally:
        stack.pop()


@contextmanager
def _guarded(model: nn.Module, *, eval_mode: bool, freeze: bool) -> Iterator[None]:
    with shared_walk(model):  # a nested call (a metric calling a method) reuses the outer walk
        walk = _current(model)
        mods = walk.modules
        # without freezing, parameters are left alone: not read, not written (nothing differentiates)
        params = walk.parameters if freeze else []
        training = [m.training for m in mods]
        requires = [p.requires_grad for p in params]
        grads = [p.grad for p in params]
        try:
            if eval_mode and any(training):
                model.eval()
            if freeze:
                for p, req in zip(params, requires):
                    if req:
                        p.requires_grad_(False)
            # gradients must work even when the caller is inside no_grad() or inference_mode()
            with torch.inference_mode(False), torch.enable_grad():
                yield
        finally:
            for m, flag in zip(mods, training):
                if m.training != flag:
                    m.training = flag
            for p, req, g in zip(params, requires, grads):
                if p.requires_grad != req:
                    p.requires_grad_(req)
                if p.grad is not g:
                    p.grad = g


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def model_dtype(model: nn.Module) -> torch.dtype:
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    # parameter-free models (e.g. a BlackBox) declare theirs with a buffer
    for t in model.buffers():
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()
