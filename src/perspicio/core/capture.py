"""Scoped capture of layer activations (and a handle to take their gradients).

Hooks are registered on ``__enter__`` and removed in ``finally``, also when the
model raises mid-forward. In gradient mode, an activation that does not yet
require grad (frozen parameters, plain input) is turned into a fresh leaf so
autograd only records the part of the network after the first captured layer;
the module's output is handed on as a copy, so in-place operations downstream
(e.g. ``ReLU(inplace=True)``) cannot alter the captured values.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import LayerError, suggest
from .caches import Cache

LayerSpec = "str | nn.Module | Sequence[str | nn.Module] | None"


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early (run up to a layer only)."""


def _first_tensor(out: object) -> Tensor | None:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if isinstance(o, Tensor):
                return o
    return None


class Capture:
    """Context manager recording the outputs of ``modules`` during forward passes.

    ``outputs[i]`` is the list of tensors module ``i`` produced (several if the
    module is called more than once); ``last(i)`` is the usual one to use.
    """

    def __init__(
        self,
        modules: Sequence[nn.Module],
        *,
        grad: bool = False,
        stop_after: nn.Module | None = None,
        transform: Callable[[int, Tensor], Tensor | None] | None = None,
        store: bool = True,
    ) -> None:
        self.modules = list(modules)
        self.grad = grad
        self.stop_after = stop_after
        self.transform = transform
        self.store = store
        self.outputs: list[list[Tensor]] = [[] for _ in self.modules]
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, i: int, module: nn.Module) -> Callable:
        def hook(mod: nn.Module, args: object, out: object) -> object:
            t = _first_tensor(out)
            if t is None:
                return None
            replaced = None
            if self.transform is not None:
                replaced = self.transform(i, t)
                if replaced is not None:
                    t = replaced
            if self.grad:
                if not t.requires_grad:
                    t = t.detach().requires_grad_(True)
                self.outputs[i].append(t)
                new = t.clone()
            else:
                if self.store:
                    self.outputs[i].append(t.detach().clone())
                new = replaced
            if self.stop_after is mod:
                raise StopForward
            if new is None:
                return None
            if isinstance(out, Tensor):
                return new
            seq = list(out)  # type: ignore[arg-type]
            seq[[j for j, o in enumerate(seq) if isinstance(o, Tensor)][0]] = new
            return type(out)(seq)  # type: ignore[call-arg]

        return hook

    def __enter__(self) -> Capture:
        try:
            for i, m in enumerate(self.modules):
                self._handles.append(m.register_forward_hook(self._hook(i, m)))
        except BaseException:
            self.remove()
            raise
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def last(self, i: int = 0) -> Tensor:
        if not self.outputs[i]:
            raise LayerError(
                f"layer {i} ({type(self.modules[i]).__name__}) was not reached in the forward pass "
                "or returned no tensor."
            )
        return self.outputs[i][-1]


def run_until(model: nn.Module, x: Tensor, capture: Capture) -> Tensor | None:
    """Run ``model(x)``; return its output, or None if a ``stop_after`` hook ended it early."""
    try:
        return model(x)
    except StopForward:
        return None


# ----------------------------------------------------------------------------- layers


def named_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if name}


def resolve_layer(model: nn.Module, layer: str | nn.Module) -> tuple[str, nn.Module]:
    """Return ``(dotted_name, module)`` for a name or a module of ``model``."""
    mods = named_modules(model)
    if isinstance(layer, nn.Module):
        for name, m in mods.items():
            if m is layer:
                return name, m
        if layer is model:
            raise LayerError("the layer is the whole model; pick an inner layer (see `perspicio layers`).")
        raise LayerError(f"the given {type(layer).__name__} module is not part of the model.")
    if not isinstance(layer, str):
        raise LayerError(f"layer must be a dotted module name or an nn.Module; got {type(layer).__name__}.")
    if layer in mods:
        return layer, mods[layer]
    raise LayerError(f"layer {layer!r} not found in {type(model).__name__}." + suggest(layer, mods, n=5))


@dataclass(frozen=True)
class LayerInfo:
    """One module call seen in a forward pass: name, type and output shape (batch of 1)."""

    name: str
    kind: str
    shape: tuple[int, ...] | None
    calls: int


def trace_layers(model: nn.Module, x: Tensor) -> list[LayerInfo]:
    """Run one forward on ``x`` and list every named module in call-completion order."""
    mods = named_modules(model)
    order: list[str] = []
    shapes: dict[str, tuple[int, ...] | None] = {}
    calls: dict[str, int] = {}
    handles = []

    def make(name: str) -> Callable:
        def hook(mod: nn.Module, args: object, out: object) -> None:
            t = _first_tensor(out)
            shapes[name] = tuple(t.shape) if t is not None else None
            calls[name] = calls.get(name, 0) + 1
            if name in order:
                order.remove(name)
            order.append(name)

        return hook

    try:
        for name, m in mods.items():
            handles.append(m.register_forward_hook(make(name)))
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [LayerInfo(n, type(mods[n]).__name__, shapes[n], calls[n]) for n in order]


def _square_tokens(tokens: int) -> tuple[int, int] | None:
    for extra in (0, 1):
        side = math.isqrt(tokens - extra)
        if side > 1 and side * side == tokens - extra:
            return side, extra
    return None


def is_spatial(shape: tuple[int, ...] | None) -> bool:
    """True for (N, C, H, W) with H*W > 1, or (N, tokens, C) with a square token grid."""
    if shape is None:
        return False
    if len(shape) == 4:
        return shape[2] * shape[3] > 1
    if len(shape) == 3:
        return _square_tokens(shape[1]) is not None
    return False


#: per model, input shape and module tree: the automatic CAM layer's name
_AUTO_LAYER = Cache("auto layers", holds="automatic CAM layer names", key="model (weak), input shape, modules",
                    max_entries=4096)


def auto_layer(model: nn.Module, x: Tensor) -> str:
    """The last module (in forward order) whose output has a spatial grid, for CAMs.

    The answer is cached per model, input shape and module tree, so repeated calls do
    not pay an extra tracing forward pass.
    """
    key = (tuple(x.shape[1:]), x.dtype, str(x.device), hash(tuple(id(m) for m in model.modules())))
    hit = _AUTO_LAYER.get(model, key)
    return hit if hit is not None else _AUTO_LAYER.put(model, _trace_auto_layer(model, x), key)


def _trace_auto_layer(model: nn.Module, x: Tensor) -> str:
    infos = trace_layers(model, x[:1])
    four_d = [i for i in infos if i.shape is not None and len(i.shape) == 4 and is_spatial(i.shape)]
    pick = four_d or [i for i in infos if is_spatial(i.shape)]
    if not pick:
        raise LayerError(
            f"no layer of {type(model).__name__} has a spatial output (N, C, H, W) for a CAM; "
            "pass layer=... explicitly or use a gradient/perturbation method."
        )
    return pick[-1].name


def to_spatial(t: Tensor, reshape: object = "auto") -> Tensor:
    """Bring a captured activation to (N, C, h, w).

    (N, tokens, C) outputs of transformer blocks are reshaped to a square grid,
    dropping a leading class token when tokens = side^2 + 1. ``reshape`` may be
    "auto", a (h, w) tuple or a callable.
    """
    if callable(reshape):
        return reshape(t)
    if t.ndim == 4:
        return t
    if t.ndim == 3:
        n, tokens, c = t.shape
        if isinstance(reshape, (tuple, list)):
            h, w = reshape
            extra = tokens - h * w
        else:
            sq = _square_tokens(tokens)
            if sq is None:
                raise LayerError(
                    f"layer output {tuple(t.shape)} is (N, tokens, C) but {tokens} tokens are not a square grid "
                    "(plus an optional class token); pass reshape=(h, w)."
                )
            h = w = sq[0]
            extra = sq[1]
        if extra < 0:
            raise LayerError(f"reshape={reshape} needs {h * w} tokens; the layer has {tokens}.")
        return t[:, extra:, :].reshape(n, h, w, c).permute(0, 3, 1, 2)
    raise LayerError(
        f"layer output has shape {tuple(t.shape)}; a CAM needs a spatial output (N, C, H, W) "
        "or (N, tokens, C). Pick a convolutional layer (see `perspicio layers`)."
    )


@contextmanager
def capture(modules: Sequence[nn.Module], **kw: object) -> Iterator[Capture]:
    """Functional spelling of :class:`Capture`."""
    with Capture(modules, **kw) as cap:  # type: ignore[arg-type]
        yield cap
