"""Which operation is this torch function? Operation kinds as the propagators see them.

Every torch function call of a propagated forward pass is sorted into one *operation kind*
(:func:`op_kind`, from the one table of :mod:`perspicio.core.ops` that every operation-level
interpreter consults; :func:`perspicio.core.ops.register_operation` adds a function); a
:class:`~perspicio.methods.propagation.tracing.Propagator` has one override point per kind
(``on_affine``, ``on_sum``, ...). Calls are normalised into a :class:`Call`, and
arithmetic (``+ - * /`` in all their spellings) into an :class:`Arith`, before a propagator sees
them. Functions missing from the table have no rule: the propagator raises a clear error naming
them (or records a gradient fallback).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ...core import ops
from ...core.caches import Memo
from ...core.calls import memoised
from ...core.ops import (  # noqa: F401 - the kinds of the shared table, re-exported for propagators
    ACT,
    AFFINE,
    ARITH,
    BINARY,
    ELEMWISE,
    FUSED,
    MAXPOOL,
    NORM,
    REDUCE,
    SDPA,
    SOFTMAX,
    STRUCT,
)
from ...errors import ModelError

# ============================================================================ operation kinds

#: kinds of the shared table (:mod:`perspicio.core.ops`); arithmetic (``ARITH``) and products are
#: refined per call into the four kinds below, by which operands depend on the explained input
SCALE = "scale"  # linear, one input, elementwise constant factor (x * c, x / c, -x)
SUM = "sum"  # a + b, a - b (with constants allowed)
PRODUCT = "product"  # bilinear in two input-dependent operands: a * b, a @ b, einsum
DIV = "div"  # a / b with b input-dependent


def _key(func: Any) -> Any:
    if isinstance(func, tuple):
        return func
    if type(func).__name__ == "method-wrapper" and getattr(func, "__name__", "") == "__get__":
        return ("get", getattr(func.__self__, "__name__", "?"))
    return func


#: per-function memo of :func:`op_name` (about 300 calls per forward pass reach the mode, from a few
#: dozen distinct functions)
_NAMES = Memo("operation names", holds="readable names of torch functions")


def op_kind(func: Any) -> str | None:
    """The operation kind of a torch function in the shared table (None: perspicio has no rule for it)."""
    return ops.kind(func)


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


# ============================================================================ calls


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
    alpha = kwargs.get(
        "alpha", args[2] if len(args) > 2 and name in ("add", "sub", "subtract", "rsub") else 1.0
    )
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
    op = {
        "add": "add",
        "sub": "sub",
        "subtract": "sub",
        "mul": "mul",
        "multiply": "mul",
        "div": "div",
        "divide": "div",
        "true_divide": "div",
        "truediv": "div",
    }.get(base)
    if op is None:
        return None
    return Arith(op, a, b, float(alpha))


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


# ============================================================================ call arguments


def substitute(obj: Any, mapping: dict[int, Tensor]) -> Any:
    """Rebuild ``obj`` (args/kwargs, nested lists) with tensors replaced by id."""
    if isinstance(obj, Tensor):
        return mapping.get(id(obj), obj)
    if isinstance(obj, list):
        return [substitute(o, mapping) for o in obj]
    if isinstance(obj, tuple):
        return tuple(substitute(o, mapping) for o in obj)
    if isinstance(obj, dict):
        return {k: substitute(v, mapping) for k, v in obj.items()}
    return obj


def dim_arg(call: Call, pos: int = 1, name: str = "dim") -> int:
    """The ``dim`` argument of a call (keyword or position ``pos``); an error when it is missing."""
    if name in call.kwargs and call.kwargs[name] is not None:
        return int(call.kwargs[name])
    if len(call.args) > pos and call.args[pos] is not None:
        return int(call.args[pos])
    raise ModelError(f"{call.name}: softmax without an explicit dim is not supported.")


def lp_normalize_args(call: Call) -> tuple[float, int, float] | None:
    """``(p, dim, eps)`` of an ``F.normalize`` call (``x / max(||x||_p, eps)`` along ``dim``); None
    for any other call. A call writing into ``out=`` is refused."""
    if op_name(call.func) != "torch.nn.functional.normalize":
        return None
    bound = dict(zip(("input", "p", "dim", "eps", "out"), call.args))
    bound.update(call.kwargs)
    if bound.get("out") is not None:
        raise ModelError("F.normalize(..., out=...) is not supported on the explained path.")
    return float(bound.get("p", 2.0)), int(bound.get("dim", 1)), float(bound.get("eps", 1e-12))
