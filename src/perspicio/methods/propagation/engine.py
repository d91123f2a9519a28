"""Operation-level propagation: every torch operation of the forward pass is seen.

Module hooks miss functional calls (``F.relu``, ``x + y``, ``torch.cat``, ``q @ k``)
and mix up reused modules. Here a :class:`torch.overrides.TorchFunctionMode` is
active for exactly one forward pass; it receives every torch function call, sorts
it into an *operation kind* and hands it to a :class:`Propagator` (LRP,
DeepLIFT-Rescale, DeepLIFT-RevealCancel). A propagator computes the normal
result but wraps it in a custom autograd function whose backward implements its
rule, so the ordinary ``torch.autograd.grad`` walks the graph with relevances or
multipliers instead of gradients. Operations whose gradient already *is* the
right propagation (views, indexing, concatenation, padding: they only move
values) are left to autograd.

An operation that is on the input's path but has no rule raises
:class:`~perspicio.errors.ModelError` naming the operation, the module it was
called in and the source line - unless the user opted into a gradient
fallback, which is then recorded.

Everything is scoped: the mode, the module hooks used to name call sites (only when
every operation is labelled, e.g. LRP's ``record_layers``; otherwise the module is
looked up on the Python stack when an error or a fallback needs it), and the handler
state live for one ``with`` block and are removed in ``finally``.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ...core import kernels
from ...core.caches import Cache, Memo
from ...core.calls import memoised, out_of_place
from ...core.kernels import FusedCall
from ...core.ops import METADATA
from ...errors import ModelError

# ============================================================================ operation table

STRUCT = "structural"  # moves values only: the gradient is the right propagation
SCALE = "scale"  # linear, one input, elementwise constant factor (x * c, x / c, -x)
SUM = "sum"  # a + b, a - b (with constants allowed)
REDUCE = "reduce"  # parameter-free linear maps with non-negative weights: sum, mean, avg-pool, interpolate
AFFINE = "affine"  # conv, linear, matmul/einsum with a constant operand
PRODUCT = "product"  # bilinear in two input-dependent operands: a * b, a @ b, einsum
DIV = "div"  # a / b with b input-dependent
ACT = "activation"  # element-wise activations
ELEMWISE = "elementwise"  # other element-wise nonlinearities (exp, log, sqrt, pow, ...)
NORM = "norm"  # batch_norm (eval), layer_norm, group_norm, rms_norm
SOFTMAX = "softmax"
MAXPOOL = "maxpool"
SDPA = "sdpa"  # scaled_dot_product_attention, decomposed into products and softmax
FUSED = "fused"  # convolution + activation of perspicio's fused twin (core/kernels.py: FusedCall)

ARITH = "arith"  # parsed further into SCALE / SUM / PRODUCT / DIV


def _t(name: str) -> Any:
    return getattr(torch.Tensor, name, None)


def _f(name: str) -> Any:
    return getattr(F, name, None)


def _torch(name: str) -> Any:
    return getattr(torch, name, None)


def _build_table() -> dict[Any, str]:
    table: dict[Any, str] = {}

    def add(kind: str, *funcs: Any) -> None:
        for f in funcs:
            if f is not None:
                table[_key(f)] = kind

    struct_names = (
        "reshape view view_as reshape_as flatten unflatten squeeze unsqueeze permute transpose swapaxes swapdims "
        "movedim moveaxis t contiguous clone expand expand_as broadcast_to repeat repeat_interleave tile narrow "
        "select split chunk unbind tensor_split index_select gather take_along_dim flip roll masked_fill where "
        "float double half bfloat16 to type type_as diagonal tril triu unfold"
    ).split()
    for n in struct_names:
        add(STRUCT, _t(n), _torch(n))
    add(STRUCT, _t("__getitem__"), _t("__setitem__"), torch.cat, _torch("concat"), _torch("concatenate"),
        torch.stack, _torch("hstack"), _torch("vstack"), _torch("broadcast_tensors"), F.pad, F.dropout,
        _f("dropout1d"), F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.unfold, F.fold,
        F.pixel_shuffle, F.pixel_unshuffle, F.embedding, _torch("atleast_1d"), _torch("atleast_2d"))
    add(STRUCT, ("get", "T"), ("get", "mT"), ("get", "H"), ("get", "mH"))

    arith = (
        "add add_ __add__ __radd__ __iadd__ sub sub_ __sub__ __rsub__ __isub__ subtract mul mul_ __mul__ __rmul__ "
        "__imul__ multiply div div_ divide true_divide __truediv__ __rtruediv__ __rdiv__ __div__ __itruediv__ neg "
        "neg_ negative __neg__ rsub"
    ).split()
    for n in arith:
        add(ARITH, _t(n), _torch(n))

    for n in ("sum", "mean", "cumsum", "nansum"):
        add(REDUCE, _t(n), _torch(n))
    add(REDUCE, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
        F.adaptive_avg_pool3d, F.interpolate, _f("upsample"), _f("upsample_bilinear"), _f("upsample_nearest"))

    add(AFFINE, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, F.linear)
    for n in ("matmul", "mm", "bmm", "__matmul__", "__rmatmul__", "einsum", "inner", "outer", "dot", "mv"):
        add(AFFINE, _t(n), _torch(n))  # AFFINE with one input-dependent operand, PRODUCT with two

    act_f = ("relu relu6 hardtanh elu selu celu leaky_relu gelu silu mish hardswish hardsigmoid softplus "
             "logsigmoid softsign tanhshrink threshold prelu rrelu sigmoid tanh relu_ hardtanh_ elu_ leaky_relu_ "
             "threshold_ rrelu_ celu_ selu_").split()
    for n in act_f:
        add(ACT, _f(n))
    for n in ("relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip", "clip_",
              "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "hardtanh", "selu", "celu", "prelu", "rrelu"):
        add(ACT, _t(n), _torch(n))

    for n in ("exp exp_ log log_ log2 log10 sqrt sqrt_ rsqrt rsqrt_ abs abs_ square square_ sin cos erf erfc "
              "reciprocal reciprocal_ log1p expm1 pow pow_ __pow__ __rpow__ __ipow__ exp2 sinh cosh atan asin "
              "acos").split():
        add(ELEMWISE, _t(n), _torch(n))

    add(NORM, F.batch_norm, F.layer_norm, F.group_norm, _f("rms_norm"), torch.batch_norm, torch.layer_norm,
        torch.group_norm)
    add(SOFTMAX, F.softmax, torch.softmax, _t("softmax"))
    add(MAXPOOL, F.max_pool1d, F.max_pool2d, F.max_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
        F.adaptive_max_pool3d)
    add(SDPA, F.scaled_dot_product_attention)
    add(FUSED, kernels.FUSED_OP)
    return table


def _key(func: Any) -> Any:
    if isinstance(func, tuple):
        return func
    if type(func).__name__ == "method-wrapper" and getattr(func, "__name__", "") == "__get__":
        return ("get", getattr(func.__self__, "__name__", "?"))
    return func


OPS: dict[Any, str] = {}
#: per-function memo of :func:`op_kind` / :func:`op_name` (about 300 calls per forward pass reach the
#: mode, from a few dozen distinct functions)
_KINDS = Memo("operation kinds", holds="propagation operation kind of torch functions")
_NAMES = Memo("operation names", holds="readable names of torch functions")


def op_kind(func: Any) -> str | None:
    """The operation kind of a torch function (None if perspicio has no rule for it)."""
    return memoised(_KINDS, func, _op_kind)


def _op_kind(func: Any) -> str | None:
    if not OPS:
        OPS.update(_build_table())
    return OPS.get(_key(func))


def op_name(func: Any) -> str:
    """A readable name such as ``torch.nn.functional.conv2d`` or ``Tensor.__add__``."""
    return memoised(_NAMES, func, _op_name)


def _op_name(func: Any) -> str:
    key = _key(func)
    if isinstance(key, tuple):
        return f"Tensor.{key[1]}"
    if isinstance(func, torch._ops.OpOverloadPacket):
        return f"torch.ops.{func._qualified_op_name.replace('::', '.')}"
    name = getattr(func, "__name__", None) or repr(func)
    if name == "fn" and func is F.max_pool2d:
        name = "max_pool2d"
    for owner, prefix in ((torch.Tensor, "Tensor"), (F, "torch.nn.functional"), (torch, "torch")):
        if getattr(owner, name, None) is func:
            return f"{prefix}.{name}"
    mod = getattr(func, "__module__", None)
    return f"{mod}.{name}" if mod else name


# ============================================================================ tensor helpers


def iter_tensors(obj: Any) -> Iterator[Tensor]:
    """The tensors in ``obj`` (nested lists/tuples/dicts), depth first."""
    out: list[Tensor] = []
    _collect(obj, out)
    return iter(out)


def _collect(obj: Any, out: list[Tensor]) -> None:
    # a loop with a list instead of nested generators: called several times per intercepted operation
    if isinstance(obj, Tensor):
        out.append(obj)
        return
    if isinstance(obj, dict):
        obj = obj.values()
    elif not isinstance(obj, (list, tuple)):
        return
    for o in obj:
        if isinstance(o, Tensor):
            out.append(o)
        elif isinstance(o, (list, tuple, dict)):
            _collect(o, out)


def sum_to(t: Tensor, shape: Sequence[int]) -> Tensor:
    """Sum ``t`` over broadcast dimensions so it has ``shape`` (the adjoint of broadcasting)."""
    shape = tuple(shape)
    if tuple(t.shape) == shape:
        return t
    lead = t.ndim - len(shape)
    if lead > 0:
        t = t.sum(dim=tuple(range(lead)))
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and t.shape[i] != 1)
    if dims:
        t = t.sum(dim=dims, keepdim=True)
    return t.reshape(shape)


def safe_div(num: Tensor, den: Tensor, eps: float) -> Tensor:
    """``num / (den + eps * sign(den))`` with sign(0) = +1; for ``eps == 0`` zero where ``den == 0``."""
    if eps == 0:
        nz = den != 0
        return torch.where(nz, num / torch.where(nz, den, torch.ones_like(den)), torch.zeros_like(num))
    stab = den.abs().add_(eps).copysign_(den)  # den + eps * sign(den), sign(+0) = +1; three passes, one buffer
    return torch.div(num, stab, out=stab) if stab.shape == num.shape and not num.requires_grad else num / stab


# ============================================================================ autograd node


class Node(torch.autograd.Function):
    """Custom autograd function: ``rule.forward(*tensors)`` forward, ``rule.backward`` backward.

    ``rule`` is a small per-call object; its backward receives the saved inputs,
    the output and the incoming relevance/multiplier, and returns one tensor (or
    None) per input.
    """

    @staticmethod
    def forward(ctx: Any, rule: Any, *tensors: Tensor) -> Tensor:  # type: ignore[override]
        out = rule.forward(*tensors)
        if any(out is t for t in tensors):
            out = out.clone()
        ctx.rule = rule
        ctx.save_for_backward(*tensors, out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        *ins, out = ctx.saved_tensors
        grads = ctx.rule.backward(ins, out, grad)
        ctx.rule = None
        return (None, *grads)


def apply_node(rule: Any, *tensors: Tensor) -> Tensor:
    return Node.apply(rule, *tensors)


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
        where = f"module {self.module!r} ({self.kind})" if self.module else f"the top-level forward ({self.kind})"
        return where + (f" at {self.line}" if self.line else "")


# ============================================================================ the propagator base


@dataclass
class Call:
    """One intercepted operation, normalised."""

    func: Any
    args: tuple
    kwargs: dict
    name: str
    kind: str

    def run(self) -> Any:
        return self.func(*self.args, **self.kwargs)


@dataclass
class Arith:
    """``a (op) b`` with op in add/sub/mul/div; ``alpha`` scales ``b`` for add/sub."""

    op: str
    a: Any
    b: Any
    alpha: float = 1.0


def parse_arith(func: Any, args: tuple, kwargs: dict) -> Arith | None:
    name = getattr(func, "__name__", "")
    if kwargs.get("rounding_mode") is not None or kwargs.get("out") is not None:
        return None
    if name in ("neg", "neg_", "negative", "__neg__"):
        return Arith("mul", args[0], -1.0)
    if len(args) < 2 and "other" not in kwargs:
        return None
    a = args[0]
    b = args[1] if len(args) > 1 else kwargs["other"]
    alpha = kwargs.get("alpha", args[2] if len(args) > 2 and name in ("add", "sub", "subtract", "rsub") else 1.0)
    if name.startswith("__r") and name not in ("__rshift__",):
        a, b = b, a
    base = name.strip("_").rstrip("_")
    if base.startswith("i") and base[1:] in ("add", "sub", "mul", "truediv"):
        base = base[1:]
    if base.startswith("r") and base[1:] in ("add", "sub", "mul", "truediv", "div"):
        base = base[1:]
    if name == "rsub":
        a, b = b, a
        base = "sub"
    op = {"add": "add", "sub": "sub", "subtract": "sub", "mul": "mul", "multiply": "mul", "div": "div",
          "divide": "div", "true_divide": "div", "truediv": "div"}.get(base)
    if op is None:
        return None
    return Arith(op, a, b, float(alpha))


#: modules whose structure perspicio owns and never changes (private twins) -> their module index
#: (built on first use, then shared by every propagation through them)
_FROZEN_INDEX = Cache("frozen module indexes", holds="module/parameter name index of private twins",
                      key="twin (weak)", tied=True)


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

    def _index_modules(self) -> None:
        cached = _FROZEN_INDEX.get(self.model)
        if cached:
            self._module_names, self._param_names = cached
            return
        self._module_names, self._param_names = {}, {}
        for name, mod in self.model.named_modules():
            self._module_names.setdefault(id(mod), (name, mod))
            for p in (*mod._parameters.values(), *mod._buffers.values()):
                if p is not None:
                    self._param_names.setdefault(id(p), name)
        if cached is False:  # the root's entry without the root (the value must not keep its key)
            _FROZEN_INDEX.put(self.model, ({**self._module_names, id(self.model): ("", None)}, self._param_names))

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
        if kind is None:
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
            REDUCE: self.on_reduce, ACT: self.on_activation, ELEMWISE: self.on_elementwise, NORM: self.on_norm,
            SOFTMAX: self.on_softmax, MAXPOOL: self.on_maxpool,
        }[kind]
        return self._checked(call, handler)

    def _checked(self, call: Call, handler: Callable[[Call], Any]) -> Any:
        if call.kind not in self.supported:
            return self._unknown(call.func, call.args, call.kwargs, reason=f"{self.method} has no rule for {call.kind} operations")
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
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, call.args))
        bound.update(call.kwargs)
        q, k, v = bound["query"], bound["key"], bound["value"]
        mask, causal, scale = bound.get("attn_mask"), bound.get("is_causal", False), bound.get("scale")
        if bound.get("dropout_p", 0.0):
            return self._unknown(call.func, call.args, call.kwargs, reason="attention dropout must be 0 (eval mode)")
        if bound.get("enable_gqa", False) and q.shape[-3] != k.shape[-3]:
            return self._unknown(call.func, call.args, call.kwargs, reason="grouped-query attention is not decomposed")
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
        its own rule (the convolution with the fused call's extended kernel and symmetric padding,
        which compute exactly what the zero padding and the original kernel did)."""
        f = fused_call(call)
        if f is None:
            return self._unknown(call.func, call.args, call.kwargs, reason="unknown fused activation")
        z = self.dispatch(F.conv2d, f.conv_args(), {})
        return z if f.act is None else self.dispatch(f.act, (z, *f.act_args), f.act_kwargs)

    #: what the error for an operation without a rule suggests
    unknown_hint = ("Rewrite it with supported operations, or pass gradient_fallback=True to propagate its plain "
                    "gradient there (recorded in the explanation's provenance).")

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

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in METADATA:  # about 4 in 5 calls of a CNN's forward: straight through
            return func(*args, **(kwargs or {}))
        return self.propagator.dispatch(func, tuple(args), dict(kwargs or {}))


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

    mode = PropagationMode(propagator)
    try:
        for name, mod in model.named_modules() if propagator.track_modules else ():
            if name:
                handles.append(mod.register_forward_pre_hook(pre(name)))
                handles.append(mod.register_forward_hook(post, always_call=True))
        with mode:
            yield propagator
    finally:
        for h in handles:
            h.remove()
        stack.clear()
        propagator.release()
        while torch._C._len_torch_function_stack() > depth:  # pragma: no cover - defensive
            torch._C._pop_torch_function_stack()


# ============================================================================ fused convolutions


def fused_call(call: Call) -> FusedCall | None:
    """Describe a fused call (None for an activation perspicio does not know)."""
    return kernels.parse_fused_call(call.args, call.kwargs)
