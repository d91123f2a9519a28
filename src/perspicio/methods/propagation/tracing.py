"""How a forward pass reaches a propagator: the torch function mode and the dispatch by kind.

Module hooks miss functional calls (``F.relu``, ``x + y``, ``torch.cat``, ``q @ k``) and mix up
reused modules. Here a :class:`torch.overrides.TorchFunctionMode` is active for exactly one
forward pass (:func:`propagating`); it receives every torch function call and hands it to a
:class:`Propagator` (LRP, DeepLIFT-Rescale, DeepLIFT-RevealCancel), which sorts it into an
operation kind (:mod:`.operations`), strips in-place variants, decomposes scaled-dot-product
attention and fused convolutions (:mod:`.fused`) and calls the override point of that kind.

An operation that is on the input's path but has no rule raises
:class:`~perspicio.errors.ModelError` naming the operation, the module it was called in and the
source line - unless the user opted into a gradient fallback, which is then recorded.

Everything is scoped: the mode, the module hooks used to name call sites (only when every
operation is labelled, e.g. LRP's ``record_layers``; otherwise the module is looked up on the
Python stack when an error or a fallback needs it), and the handler state live for one ``with``
block and are removed in ``finally``.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ...core.caches import Cache
from ...core.calls import out_of_place
from ...core.guard import module_tree
from ...core.ops import METADATA
from ...errors import ModelError
from .fused import split_fused
from .operations import (
    ACT,
    AFFINE,
    ARITH,
    BINARY,
    DIV,
    ELEMWISE,
    FUSED,
    MAXPOOL,
    NORM,
    PRODUCT,
    REDUCE,
    SCALE,
    SDPA,
    SOFTMAX,
    STRUCT,
    SUM,
    Arith,
    Call,
    iter_tensors,
    op_kind,
    op_name,
    parse_arith,
)
from .transformer_rules import module_substitute

# ============================================================================ call sites


_PKG_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def source_line() -> str:
    """``file:line`` of the innermost frame outside torch and perspicio (the model's code)."""
    for frame in reversed(traceback.extract_stack()):
        path = os.path.abspath(frame.filename)
        if path.startswith(_PKG_DIR) or path.startswith(_TORCH_DIR) or "contextlib" in path:
            continue
        return f"{os.path.basename(path)}:{frame.lineno}"
    return "?"


@dataclass
class Site:
    """Where an operation was called: innermost module (name, type) and source line."""

    module: str
    kind: str
    line: str = ""

    def __str__(self) -> str:
        where = (
            f"module {self.module!r} ({self.kind})"
            if self.module
            else f"the top-level forward ({self.kind})"
        )
        return where + (f" at {self.line}" if self.line else "")


# ============================================================================ the propagator


#: modules whose structure perspicio owns and never changes (private twins) -> their module index
#: (built on first use, then shared by every propagation through them)
_FROZEN_INDEX = Cache(
    "frozen module indexes",
    holds="module/parameter name index of private twins",
    key="twin (weak)",
    tied=True,
)


def freeze_index(module: nn.Module) -> None:
    """Declare ``module``'s submodules, parameters and buffers fixed, so that call sites are
    indexed once instead of on every propagation."""
    if _FROZEN_INDEX.get(module) is None:
        _FROZEN_INDEX.put(module, False)  # False: frozen, not indexed yet


class Propagator:
    """Receives every operation of one forward pass; subclasses implement the rules.

    One override point per operation kind (``on_affine``, ``on_sum``, ...). The
    base class classifies calls, strips in-place variants, decomposes
    scaled-dot-product attention and handles operations without a rule.
    """

    method = "propagation"
    #: operation kinds this propagator has a rule for (others: error or fallback)
    supported: frozenset[str] = frozenset()

    def __init__(self, model: nn.Module, *, gradient_fallback: bool = False) -> None:
        self.model = model
        self.gradient_fallback = bool(gradient_fallback)
        self.fallbacks: list[str] = []
        self.module_stack: list[tuple[str, nn.Module]] = []
        #: keep ``module_stack`` with module hooks while running (needed only where every operation is
        #: labelled by its module, e.g. LRP's ``record_layers``); otherwise the module of an operation is
        #: looked up lazily on the Python stack (errors, fallbacks), and modules run without hooks
        self.track_modules = False
        self._module_names: dict[int, tuple[str, nn.Module]] | None = None
        self._param_names: dict[int, str] | None = None
        self.count: dict[str, int] = {}
        #: > 0 while a module that runs as one substitute function computes its own output
        self.substituting = 0

    def _index_modules(self) -> None:
        cached = _FROZEN_INDEX.get(self.model)
        if cached:
            self._module_names, self._param_names = cached
            return
        self._module_names, self._param_names = {}, {}
        for name, mod in module_tree(self.model):  # inside a method call: the guard's walk
            self._module_names.setdefault(id(mod), (name, mod))
            for p in (*mod._parameters.values(), *mod._buffers.values()):
                if p is not None:
                    self._param_names.setdefault(id(p), name)
        if cached is False:  # the root's entry without the root (the value must not keep its key)
            _FROZEN_INDEX.put(
                self.model, ({**self._module_names, id(self.model): ("", None)}, self._param_names)
            )

    @property
    def module_names(self) -> dict[int, tuple[str, nn.Module]]:
        """``id(module) -> (name, module)`` for every module of the model (built on first use)."""
        if self._module_names is None:
            self._index_modules()
        return self._module_names  # type: ignore[return-value]

    @property
    def param_names(self) -> dict[int, str]:
        """``id(parameter or buffer) -> name of the module owning it`` (built on first use)."""
        if self._param_names is None:
            self._index_modules()
        return self._param_names  # type: ignore[return-value]

    def release(self) -> None:
        """Drop what only the forward pass needed (called when :func:`propagating` exits).

        The autograd nodes of the pass hold their rules and the rules this propagator; a
        propagator that still held the pass's tensors would close a reference cycle through
        the graph, which only the garbage collector frees - after a forward pass without its
        backward (an error in between), every feature map of the pass would stay allocated."""

    # ------------------------------------------------------------------ helpers
    def is_var(self, t: Any) -> bool:
        """True if ``t`` depends on the explained input (default: requires grad)."""
        return isinstance(t, Tensor) and t.requires_grad

    def current_module(self) -> tuple[str, nn.Module] | None:
        """(name, module) of the innermost submodule of the model running now (None: top level)."""
        if self.track_modules:
            return self.module_stack[-1] if self.module_stack else None
        frame = sys._getframe(1)
        names = self.module_names
        while frame is not None:
            owner = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
            if owner is not None and id(owner) in names:
                found = names[id(owner)]
                return found if found[0] else None  # the model itself: top level
            frame = frame.f_back
        return None

    def site(self, with_line: bool = True) -> Site:
        current = self.current_module()
        if current is not None:
            name, mod = current
            return Site(name, type(mod).__name__, source_line() if with_line else "")
        return Site("", type(self.model).__name__, source_line() if with_line else "")

    def label(self, name: str, weight: Tensor | None = None) -> str:
        if weight is not None and id(weight) in self.param_names:
            where = self.param_names[id(weight)]
        else:
            current = self.current_module()
            where = current[0] if current is not None else ""
        short = name.rsplit(".", 1)[-1]
        return f"{short} @ {where or '<model>'}"

    def any_var(self, args: tuple, kwargs: dict) -> bool:
        """Does any tensor in ``args``/``kwargs`` (nested lists/tuples/dicts) depend on the input?"""
        is_var = self.is_var
        for a in args:
            if isinstance(a, Tensor):
                if is_var(a):
                    return True
            elif isinstance(a, (list, tuple, dict)) and any(is_var(t) for t in iter_tensors(a)):
                return True
        return bool(kwargs) and any(is_var(t) for t in iter_tensors(kwargs))

    # ------------------------------------------------------------------ dispatch
    def dispatch(self, func: Any, args: tuple, kwargs: dict) -> Any:
        kind = op_kind(func)
        if not self.any_var(args, kwargs):
            return self.on_constant(func, args, kwargs)
        if kind is None or kind == BINARY:  # no rule (maximum, minimum: none yet)
            return self._unknown(func, args, kwargs)
        func, args, kwargs = out_of_place(func, args, kwargs)
        call = Call(func, args, kwargs, op_name(func), kind)
        if kind == ARITH:
            return self._arith(call)
        if kind == AFFINE:
            variables = [t for t in iter_tensors(args) if self.is_var(t)]
            if len(variables) >= 2:
                call.kind = PRODUCT
                return self._checked(call, self.on_product)
            return self._checked(call, self.on_affine)
        if kind == SDPA:
            return self._sdpa(call)
        if kind == FUSED:
            return self.on_fused(call)
        if kind == STRUCT:
            return self.on_struct(call)
        handler = {
            REDUCE: self.on_reduce,
            ACT: self.on_activation,
            ELEMWISE: self.on_elementwise,
            NORM: self.on_norm,
            SOFTMAX: self.on_softmax,
            MAXPOOL: self.on_maxpool,
        }[kind]
        return self._checked(call, handler)

    def addmm(self, args: tuple, kwargs: dict) -> Any:
        """``torch.addmm(b, x, W)`` (Hugging Face's ``Conv1D`` in GPT-2): ``x @ W`` then ``+ b``,
        each dispatched with its rule (the affine rule with the bias as an added constant)."""
        names = ("input", "mat1", "mat2")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        beta, alpha = bound.get("beta", 1), bound.get("alpha", 1)
        if beta != 1 or alpha != 1 or set(bound) - {*names, "beta", "alpha"}:
            return self.dispatch(torch.addmm, args, kwargs)
        product = self.dispatch(torch.matmul, (bound["mat1"], bound["mat2"]), {})
        return self.dispatch(torch.add, (product, bound["input"]), {})

    def _checked(self, call: Call, handler: Callable[[Call], Any]) -> Any:
        if call.kind not in self.supported:
            return self._unknown(
                call.func,
                call.args,
                call.kwargs,
                reason=f"{self.method} has no rule for {call.kind} operations",
            )
        return handler(call)

    def _arith(self, call: Call) -> Any:
        ar = parse_arith(call.func, call.args, call.kwargs)
        if ar is None:
            return self._unknown(call.func, call.args, call.kwargs)
        va, vb = self.is_var(ar.a), self.is_var(ar.b)
        if ar.op in ("add", "sub"):
            call.kind = SUM
            return self._checked(call, lambda c: self.on_sum(c, ar))
        if ar.op == "mul":
            if va and vb:
                call.kind = PRODUCT
                return self._checked(call, self.on_product)
            call.kind = SCALE
            return self._checked(call, lambda c: self.on_scale(c, ar.a if va else ar.b))
        # division
        if vb:
            call.kind = DIV
            return self._checked(call, lambda c: self.on_div(c, ar))
        call.kind = SCALE
        return self._checked(call, lambda c: self.on_scale(c, ar.a))

    def _sdpa(self, call: Call) -> Any:
        """softmax(q k^T * scale + mask) v, dispatched op by op so each gets its rule."""
        names = (
            "query",
            "key",
            "value",
            "attn_mask",
            "dropout_p",
            "is_causal",
            "scale",
            "enable_gqa",
        )
        bound = dict(zip(names, call.args))
        bound.update(call.kwargs)
        q, k, v = bound["query"], bound["key"], bound["value"]
        mask, causal, scale = (
            bound.get("attn_mask"),
            bound.get("is_causal", False),
            bound.get("scale"),
        )
        if bound.get("dropout_p", 0.0):
            return self._unknown(
                call.func, call.args, call.kwargs, reason="attention dropout must be 0 (eval mode)"
            )
        if bound.get("enable_gqa", False) and q.shape[-3] != k.shape[-3]:
            return self._unknown(
                call.func,
                call.args,
                call.kwargs,
                reason="grouped-query attention is not decomposed",
            )
        d = q.shape[-1]
        scale = float(scale) if scale is not None else 1.0 / float(d) ** 0.5
        kt = self.dispatch(torch.transpose, (k, -2, -1), {})
        scores = self.dispatch(torch.matmul, (q, kt), {})
        scores = self.dispatch(torch.mul, (scores, scale), {})
        L, S = q.shape[-2], k.shape[-2]
        if causal:
            keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
            scores = self.dispatch(torch.Tensor.masked_fill, (scores, ~keep, float("-inf")), {})
        if mask is not None:
            if mask.dtype == torch.bool:
                scores = self.dispatch(torch.Tensor.masked_fill, (scores, ~mask, float("-inf")), {})
            else:
                scores = self.dispatch(torch.add, (scores, mask), {})
        attn = self.dispatch(torch.softmax, (scores, -1), {})
        return self.dispatch(torch.matmul, (attn, v), {})

    def on_fused(self, call: Call) -> Any:
        """A fused convolution + activation, split into the two operations, each dispatched with
        its own rule (:func:`.fused.split_fused`)."""
        known, out = split_fused(self.dispatch, call)
        if not known:
            return self._unknown(
                call.func, call.args, call.kwargs, reason="unknown fused activation"
            )
        return out

    #: what the error for an operation without a rule suggests
    unknown_hint = (
        "Rewrite it with supported operations, or pass gradient_fallback=True to propagate its plain "
        "gradient there (recorded in the explanation's provenance)."
    )

    def _on_path(self, args: tuple, kwargs: dict, out: Any) -> bool:
        """Is this call's result on the explained path (not a shape query, comparison, argmax, ...)?"""
        return any(t.requires_grad or self.is_var(t) for t in iter_tensors(out))

    def _unknown(self, func: Any, args: tuple, kwargs: dict, reason: str = "") -> Any:
        out = func(*args, **kwargs)
        if not self._on_path(args, kwargs, out):
            return out
        name = op_name(func)
        site = self.site()
        if self.gradient_fallback:
            self.fallbacks.append(f"{name} in {site}")
            return self.fallback(func, args, kwargs, out)
        why = f" ({reason})" if reason else ""
        raise ModelError(
            f"{self.method}: operation {name} called in {site} has no propagation rule{why}. {self.unknown_hint}"
        )

    # ------------------------------------------------------------------ override points
    def on_constant(self, func: Any, args: tuple, kwargs: dict) -> Any:
        """An operation whose inputs do not depend on the explained input."""
        return func(*args, **kwargs)

    def fallback(self, func: Any, args: tuple, kwargs: dict, out: Any) -> Any:
        """Gradient fallback for an operation without a rule: autograd's own backward."""
        return out

    def on_struct(self, call: Call) -> Any:
        return call.run()

    def on_affine(self, call: Call) -> Any:
        return call.run()

    def on_sum(self, call: Call, ar: Arith) -> Any:
        return call.run()

    def on_scale(self, call: Call, x: Tensor) -> Any:
        return call.run()

    def on_reduce(self, call: Call) -> Any:
        return call.run()

    # Operation kinds a propagator has no rule for: the clear "no propagation rule" error
    # naming the operation and its call site (or the recorded gradient fallback).
    def on_product(self, call: Call) -> Any:
        return self._unknown(call.func, call.args, call.kwargs)

    def on_div(self, call: Call, ar: Arith) -> Any:
        return self._unknown(call.func, call.args, call.kwargs)

    def on_activation(self, call: Call) -> Any:
        return self._unknown(call.func, call.args, call.kwargs)

    def on_elementwise(self, call: Call) -> Any:
        return self._unknown(call.func, call.args, call.kwargs)

    def on_norm(self, call: Call) -> Any:
        return self._unknown(call.func, call.args, call.kwargs)

    def on_softmax(self, call: Call) -> Any:
        return self._unknown(call.func, call.args, call.kwargs)

    def on_maxpool(self, call: Call) -> Any:
        return self._unknown(call.func, call.args, call.kwargs)


class PropagationMode(TorchFunctionMode):
    """Routes every torch function call to a :class:`Propagator` while active."""

    #: the :data:`perspicio.core.kernels.SEES_FUSED_CALLS` protocol: fused twins make their fused calls
    #: (dense kernel) under this mode, and :meth:`Propagator.on_fused` gives them their rules
    handles_fused_convolutions = True

    def __init__(self, propagator: Propagator) -> None:
        super().__init__()
        self.propagator = propagator

    def __torch_function__(
        self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        if func in METADATA:  # about 4 in 5 calls of a CNN's forward: straight through
            return func(*args, **(kwargs or {}))
        if self.propagator.substituting:  # inside a module run as one function (its own
            with torch.no_grad():  # operations only give the output the substitute is checked on)
                return func(*args, **(kwargs or {}))
        if func is torch.addmm or func is Tensor.addmm:
            return self.propagator.addmm(tuple(args), dict(kwargs or {}))
        return self.propagator.dispatch(func, tuple(args), dict(kwargs or {}))


def _substituted(model: nn.Module) -> list[nn.Module]:
    """The modules of ``model`` that propagate as one function (:func:`.transformer_rules.module_substitute`)."""
    return [m for _, m in module_tree(model) if module_substitute(m) is not None]


@contextmanager
def propagating(model: nn.Module, propagator: Propagator) -> Iterator[Propagator]:
    """Scope in which ``model``'s forward passes go through ``propagator``.

    Module hooks (to name call sites, only if ``propagator.track_modules``) and the
    torch function mode are removed on exit, also when the body raises; torch's mode
    stack is left as found.
    """
    depth = torch._C._len_torch_function_stack()
    handles: list[Any] = []
    stack = propagator.module_stack

    def pre(name: str) -> Callable:
        def hook(mod: nn.Module, args: Any) -> None:
            stack.append((name, mod))

        return hook

    def post(mod: nn.Module, args: Any, out: Any) -> None:
        if stack:
            stack.pop()

    def enter_substitute(mod: nn.Module, args: Any) -> None:
        propagator.substituting += 1

    def run_substitute(fn: Callable) -> Callable:
        def hook(mod: nn.Module, args: Any, out: Any) -> Any:
            propagator.substituting -= 1
            if propagator.substituting or not args or not isinstance(out, Tensor):
                return None
            new = fn(args[0])  # under the mode: the substitute's own rule
            tol = 1e-4 * float(out.detach().abs().max().clamp_min(1))
            if new.shape != out.shape or not torch.allclose(
                new.detach(), out.detach(), rtol=0, atol=tol
            ):
                raise ModelError(
                    f"{propagator.method}: module {type(mod).__name__} was read as one operation "
                    "(a tanh-GELU or an RMSNorm) but does not compute it; rewrite it with supported "
                    "operations, or pass gradient_fallback=True."
                )
            return new

        return hook

    mode = PropagationMode(propagator)
    try:
        for name, mod in model.named_modules() if propagator.track_modules else ():
            if name:
                handles.append(mod.register_forward_pre_hook(pre(name)))
                handles.append(mod.register_forward_hook(post, always_call=True))
        for mod in _substituted(model):
            fn = module_substitute(mod)
            handles.append(mod.register_forward_pre_hook(enter_substitute))
            handles.append(mod.register_forward_hook(run_substitute(fn), always_call=True))
        with mode:
            yield propagator
    finally:
        for h in handles:
            h.remove()
        stack.clear()
        propagator.substituting = 0
        propagator.release()
        while torch._C._len_torch_function_stack() > depth:  # pragma: no cover - defensive
            torch._C._pop_torch_function_stack()
