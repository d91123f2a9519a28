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
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

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
def model_guard(model: nn.Module, *, eval_mode: bool = True, freeze: bool = True) -> Iterator[nn.Module]:
    """Run the body with ``model`` in eval mode and frozen parameters; restore on exit.

    Entered on every call of every method, so it touches only what differs: a model already in
    eval mode is not switched (``model.eval()``, which respects overridden ``train`` methods, runs
    only if some module is training), and only flags and gradients that changed are written back.
    """
    with model_lock(model), _guarded(model, eval_mode=eval_mode, freeze=freeze):
        yield model


@contextmanager
def _guarded(model: nn.Module, *, eval_mode: bool, freeze: bool) -> Iterator[None]:
    mods = list(model.modules())
    training = [m.training for m in mods]
    params = list(model.parameters())
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
    for t in model.buffers():  # parameter-free models (e.g. a BlackBox) declare theirs with a buffer
        if t.is_floating_point():
            return t.dtype
    return torch.get_default_dtype()
