"""Scoped capture of layer activations (and a handle to take their gradients).

Hooks are registered on ``__enter__`` and removed in ``finally``, also when the
model raises mid-forward. In gradient mode, an activation that does not yet
require grad (frozen parameters, plain input) is turned into a fresh leaf so
autograd only records the part of the network after the first captured layer;
the module's output is handed on as a copy, so in-place operations downstream
(e.g. ``ReLU(inplace=True)``) cannot alter the captured values.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import LayerError, suggest
from .caches import Cache
from .tokens import (
    Layout,
    declared_channels_last,
    declared_extra_tokens,
    fits_input,
    layout_of,
    token_layout,
)

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
    """Return ``(dotted_name, module)`` for a name or a module of ``model``.

    A name is either the dotted name of ``model.named_modules()`` (``"layer4.1.conv2"``,
    ``"features.8"``) or the expression a user writes in Python to reach the module:
    ``"layer4[-1]"``, ``"layer4[1].conv2"``, ``"features[8]"``, ``"blocks[-1].norm1"``,
    ``'stages["s1"]'``. ``[i]`` indexes a ``Sequential``/``ModuleList`` by position (negative
    from the end, as in Python); ``["key"]`` picks a child by name (``ModuleDict``). A leading
    ``model.`` (``"model.layer4[-1]"``, copied from code where the network is called ``model``)
    is read as the model itself when the model has no submodule called ``model`` (when it has
    one, e.g. a Hugging Face wrapper, the name is read literally). The returned name is always
    the canonical dotted one (``"layer4.1"``). A mistake raises :class:`LayerError` saying which
    step failed, with the close names and the submodules at that step.
    """
    mods = named_modules(model)
    if isinstance(layer, nn.Module):
        for name, m in mods.items():
            if m is layer:
                return name, m
        if layer is model:
            raise LayerError(
                "the layer is the whole model; pick an inner layer (see `perspicio layers`)."
            )
        raise LayerError(f"the given {type(layer).__name__} module is not part of the model.")
    if not isinstance(layer, str):
        raise LayerError(
            f"layer must be a dotted module name or an nn.Module; got {type(layer).__name__}."
        )
    if layer in mods:
        return layer, mods[layer]
    if len(_split_layers(layer)) > 1:
        raise LayerError(
            f"layer {layer!r} names several layers; this method takes one (the CAMs fuse several "
            "layers given as 'a,b' or a list)."
        )
    steps = _parse_layer(layer)
    if steps is None:
        raise LayerError(
            f"layer {layer!r} not found in {type(model).__name__}: not a module name. Write the dotted "
            "name of `perspicio layers` (layer4.1.conv2) or the Python form (layer4[-1].conv2)."
            + suggest(layer, mods, n=5)
        )
    if steps and steps[0] == "model" and "model" not in model._modules:
        steps = steps[1:]
    if not steps:
        raise LayerError(
            "the layer is the whole model; pick an inner layer (see `perspicio layers`)."
        )
    path, found = _walk(model, steps, layer, mods)
    # the canonical name: a module registered at two paths is named by its first, as named_modules does
    return next((n for n, m in mods.items() if m is found), path), found


def resolve_layers(
    model: nn.Module, layer: str | nn.Module | Sequence[str | nn.Module]
) -> list[tuple[str, nn.Module]]:
    """Several layers: a list of names/modules, or one string of names separated by commas
    (``"layer3,layer4[-1]"``, as the command line's ``--layer a,b`` passes them); each is resolved
    by :func:`resolve_layer`. The same layer given twice is an error."""
    if isinstance(layer, str):
        specs: list[str | nn.Module] = list(_split_layers(layer))
        if not specs:
            raise LayerError(f"layer {layer!r} names no layer.")
    elif isinstance(layer, (list, tuple)):
        specs = list(layer)
        if not specs:
            raise LayerError(
                "layer is an empty list; give at least one layer (or None for the automatic one)."
            )
    else:
        specs = [layer]  # type: ignore[list-item]
    out = [resolve_layer(model, spec) for spec in specs]
    names = [n for n, _ in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise LayerError(
            f"layer {', '.join(map(repr, twice))} is given more than once in {layer!r}."
        )
    return out


def _split_layers(text: str) -> list[str]:
    """``"a, b[0]"`` -> ``["a", "b[0]"]``: commas outside brackets and quotes separate layers."""
    parts, depth, quote, cur = [], 0, "", []
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    parts.append("".join(cur).strip())
    return [p for p in parts if p] if len(parts) > 1 else parts


_STEP = re.compile(
    r"""\.?(?P<name>[A-Za-z_0-9]+)"""  # a name (or a Sequential key such as 8)
    r"""|\[\s*(?P<index>[+-]?\d+)\s*\]"""  # [i], [-1]
    r"""|\[\s*(?P<q>['"])(?P<key>[^'"]*)(?P=q)\s*\]"""  # ["key"]
)


def _parse_layer(text: str) -> list[str | int] | None:
    """The steps of a Python-style module path (names and ``[i]`` indices), None if it is not one."""
    # spaces around dots and brackets carry no meaning ("layer4 [ -1 ]"); inside a name they do
    parts = re.split(r"""(['"][^'"]*['"])""", text.strip())
    text = "".join(
        p if i % 2 else re.sub(r"\s*([.\[\]])\s*", r"\1", p) for i, p in enumerate(parts)
    )
    steps: list[str | int] = []
    pos = 0
    while pos < len(text):
        m = _STEP.match(text, pos)
        if m is None or (m.group("name") is not None and pos > 0 and text[pos] != "."):
            return None
        if m.group("name") is not None and pos == 0 and text[0] == ".":
            return None
        if m.group("index") is not None:
            steps.append(int(m.group("index")))
        else:
            steps.append(m.group("name") if m.group("name") is not None else m.group("key"))
        pos = m.end()
    return steps or None


def _walk(
    model: nn.Module, steps: list[str | int], text: str, mods: dict[str, nn.Module]
) -> tuple[str, nn.Module]:
    """Follow ``steps`` from ``model`` as Python would: ``(dotted path, module)``; a LayerError names
    the step that failed."""
    cur, path = model, []
    for step in steps:
        children = [(k, m) for k, m in cur._modules.items() if m is not None]
        where = (
            f"{'.'.join(path)!r} ({type(cur).__name__})"
            if path
            else f"the model ({type(cur).__name__})"
        )
        kids = [k for k, _ in children]
        listing = (
            f" Its submodules: {', '.join(kids[:12])}{', ...' if len(kids) > 12 else ''}."
            if kids
            else " It has no submodules."
        )
        if isinstance(step, int):
            if not isinstance(cur, (nn.Sequential, nn.ModuleList)):
                raise LayerError(
                    f"layer {text!r} not found in {type(model).__name__}: {where} is not a Sequential "
                    f"or ModuleList, so [{step}] does not index it.{listing}"
                )
            if not -len(children) <= step < len(children):
                raise LayerError(
                    f"layer {text!r} not found in {type(model).__name__}: {where} has "
                    f"{len(children)} modules, so [{step}] is out of range "
                    f"({-len(children)}..{len(children) - 1})."
                )
            key, cur = children[step]
        else:
            lookup = dict(children)
            if step not in lookup:
                prefix = ".".join(path) + "." if path else ""
                close = difflib.get_close_matches(step, kids, n=5, cutoff=0.5)
                hint = (
                    f" Did you mean: {', '.join(prefix + c for c in close)}?"
                    if close
                    else suggest(prefix + step, mods, n=5)
                )
                raise LayerError(
                    f"layer {text!r} not found in {type(model).__name__}: {where} has no "
                    f"submodule {step!r}.{hint}{listing}"
                )
            key, cur = step, lookup[step]
        path.append(key)
    return ".".join(path), cur


@dataclass(frozen=True)
class LayerInfo:
    """One module call seen in a forward pass: name, type and output shape (batch of 1); the shape
    of its first tensor input and whether it is an element of a ``Sequential``/``ModuleList`` with
    modules of its own (a network's repeated block)."""

    name: str
    kind: str
    shape: tuple[int, ...] | None
    calls: int
    in_shape: tuple[int, ...] | None = None
    block: bool = False


def trace_layers(model: nn.Module, x: Tensor) -> list[LayerInfo]:
    """Run one forward on ``x`` and list every named module in call-completion order."""
    mods = named_modules(model)
    containers = {name for name, m in mods.items() if isinstance(m, (nn.Sequential, nn.ModuleList))}
    order: list[str] = []
    shapes: dict[str, tuple[int, ...] | None] = {}
    in_shapes: dict[str, tuple[int, ...] | None] = {}
    calls: dict[str, int] = {}
    handles = []

    def make(name: str) -> Callable:
        def hook(mod: nn.Module, args: object, out: object) -> None:
            t = _first_tensor(out)
            a = _first_tensor(args)
            shapes[name] = tuple(t.shape) if t is not None else None
            in_shapes[name] = tuple(a.shape) if a is not None else None
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
    return [
        LayerInfo(
            n,
            type(mods[n]).__name__,
            shapes[n],
            calls[n],
            in_shapes[n],
            n.rpartition(".")[0] in containers and any(True for _ in mods[n].children()),
        )
        for n in order
    ]


def _square_tokens(tokens: int) -> tuple[int, int] | None:
    for extra in (0, 1):
        side = math.isqrt(tokens - extra)
        if side > 1 and side * side == tokens - extra:
            return side, extra
    return None


def is_spatial(shape: tuple[int, ...] | None, input_hw: tuple[int, int] | None = None) -> bool:
    """True for a feature map: (N, C, H, W) with H*W > 1, or (N, tokens, C) with a square token grid;
    with the input's ``input_hw``, any layout :mod:`perspicio.core.tokens` reads (channels-last and
    non-square token grids need the model's trace: :func:`map_layers`)."""
    if shape is None:
        return False
    if input_hw is not None:
        return layout_of(shape, input_hw) is not None
    if len(shape) == 4:
        return shape[2] * shape[3] > 1
    if len(shape) == 3:
        return _square_tokens(shape[1]) is not None
    return False


@dataclass(frozen=True)
class MapTrace:
    """The feature maps of one model for one input shape: the traced layers, the layout of each
    layer that is an image grid (:class:`~perspicio.core.tokens.Layout`), the automatic CAM layer
    (None when there is none), its number of extra tokens (None: not a token map) and whether
    4-D maps that read both ways are taken as channels last; the lengths of its token sequences."""

    infos: tuple[LayerInfo, ...]
    layouts: dict[str, Layout]
    auto: str | None
    extra: int | None
    channels_last: bool = False
    token_counts: frozenset[int] = frozenset()


#: per model, input shape, module tree and extra_tokens option: its feature maps and automatic CAM layer
_AUTO_LAYER = Cache(
    "auto layers",
    holds="automatic CAM layers and layer layouts",
    key="model (weak), input shape, modules, extra_tokens",
    max_entries=4096,
)


def map_layers(model: nn.Module, x: Tensor, *, extra_tokens: int | None = None) -> MapTrace:
    """Trace ``model`` on ``x`` (once per model, input shape, module tree and ``extra_tokens``) and
    classify every layer output: channels-first map, channels-last map, token grid or none."""
    key = (
        tuple(x.shape[1:]),
        x.dtype,
        str(x.device),
        hash(tuple(id(m) for m in model.modules())),
        extra_tokens,
    )
    hit = _AUTO_LAYER.get(model, key)
    return (
        hit if hit is not None else _AUTO_LAYER.put(model, _trace_maps(model, x, extra_tokens), key)
    )


def auto_layer(model: nn.Module, x: Tensor, *, extra_tokens: int | None = None) -> str:
    """The automatic CAM layer: for a CNN the last module (in forward order) with a spatial
    output; for a transformer (token or channels-last maps) the output of its last block whose
    patch tokens the output depends on (class-token pooling ignores the last block's patch
    tokens, so it is then the block before: the last block's input).

    Cached per model, input shape, module tree and ``extra_tokens``.
    """
    trace = map_layers(model, x, extra_tokens=extra_tokens)
    if trace.auto is None:
        raise LayerError(
            f"no layer of {type(model).__name__} has a spatial output for a CAM (N, C, H, W), channels-last "
            "(N, H, W, C) or (N, tokens, C) on the input's grid; pass layer=... explicitly or use a "
            "gradient/perturbation method."
            + (
                " For a transformer whose extra tokens cannot be told from the patch grid, pass extra_tokens=..."
                if any(i.shape is not None and len(i.shape) == 3 for i in trace.infos)
                else ""
            )
        )
    return trace.auto


def _trace_maps(model: nn.Module, x: Tensor, extra_tokens: int | None) -> MapTrace:
    infos = tuple(trace_layers(model, x[:1]))
    if x.ndim != 4:  # not an image: (N, tokens, C) outputs with a square grid, as before
        layouts = {}
        for i in infos:
            sq = _square_tokens(i.shape[1]) if i.shape is not None and len(i.shape) == 3 else None
            if i.shape is not None and len(i.shape) == 4 and i.shape[2] * i.shape[3] > 1:
                layouts[i.name] = Layout("nchw", (i.shape[2], i.shape[3]))
            elif sq is not None:
                layouts[i.name] = Layout("tokens", (sq[0], sq[0]), sq[1])
        four = [n for n, lay in layouts.items() if lay.kind == "nchw"]
        return MapTrace(infos, layouts, (four or list(layouts) or [None])[-1], None)
    hw = tuple(x.shape[-2:])
    mods = named_modules(model)
    extra = extra_tokens if extra_tokens is not None else declared_extra_tokens(model)
    # both readings of a 4-D map fit (a 7 x 7 x 7 tensor): channels last if the model says so or has
    # maps that can only be channels last (Swin), else channels first
    nhwc = declared_channels_last(model) or any(
        i.shape is not None
        and len(i.shape) == 4
        and fits_input(i.shape[1:3], hw)
        and not fits_input(i.shape[2:], hw)
        for i in infos
    )
    layouts: dict[str, Layout] = {}
    counts = frozenset(i.shape[1] for i in infos if i.shape is not None and len(i.shape) == 3)
    for i in infos:
        if i.shape is not None and len(i.shape) == 4 and i.shape[0] == 1:
            lay = layout_of(
                i.shape, hw, module=mods[i.name], channels_last=nhwc, token_counts=counts
            )
            if lay is not None:
                layouts[i.name] = lay
    grids = list(dict.fromkeys(lay.grid for lay in layouts.values() if lay.kind == "nchw"))
    for i in infos:
        if i.shape is not None and len(i.shape) == 3:
            lay = layout_of(i.shape, hw, extra=extra, grids=grids)
            if lay is not None:
                layouts[i.name] = lay
    ordered = [i for i in infos if i.name in layouts]
    if not any(layouts[i.name].kind != "nchw" for i in ordered):  # a CNN: the last map, as always
        return MapTrace(infos, layouts, ordered[-1].name if ordered else None, None, nhwc, counts)
    blocks = [
        i
        for i in ordered
        if layouts[i.name].kind != "nchw" and i.block and i.calls == 1 and i.in_shape == i.shape
    ]
    candidates = blocks or [i for i in ordered if i.calls == 1]
    auto = _last_reaching_output(model, x[:1], [i.name for i in candidates[-4:]], layouts, mods)
    lay = layouts.get(auto) if auto is not None else None
    return MapTrace(
        infos,
        layouts,
        auto,
        lay.extra if lay is not None and lay.kind == "tokens" else None,
        nhwc,
        counts,
    )


def _output_total(out: object) -> Tensor | None:
    """Sum of every float tensor in a model output (tensor, tuple, dict, ModelOutput) that needs grad."""
    stack, total = [out], None
    while stack:
        o = stack.pop()
        if isinstance(o, Tensor):
            if o.requires_grad and o.is_floating_point():
                total = o.float().sum() if total is None else total + o.float().sum()
        elif isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, (tuple, list)):
            stack.extend(o)
    return total


def _last_reaching_output(
    model: nn.Module,
    x: Tensor,
    names: list[str],
    layouts: dict[str, Layout],
    mods: dict[str, nn.Module],
) -> str | None:
    """The last of ``names`` (forward order) whose patch positions the output depends on: one
    forward and one backward pass with all of them captured. A last block whose patch tokens never
    reach the output (class-token pooling) would give an all-zero Grad-CAM."""
    if not names:
        return None
    with torch.enable_grad(), Capture([mods[n] for n in names], grad=True) as cap:
        total = _output_total(model(x))
        acts = [cap.outputs[i][-1] if cap.outputs[i] else None for i in range(len(names))]
        present = [a for a in acts if a is not None]
        if total is None or not present:
            return names[-1]
        grads = iter(torch.autograd.grad(total, present, allow_unused=True))
    for name, a in reversed(
        list(zip(names, [next(grads) if a is not None else None for a in acts]))
    ):
        if a is not None and bool(layouts[name].to_spatial(a).detach().abs().amax() > 0):
            return name
    return names[-1]


def token_grid(
    model: nn.Module, x: Tensor, tokens: int, *, extra_tokens: int | None = None
) -> Layout:
    """How ``tokens`` per-token values of an image transformer (a rollout row, token relevance)
    lie on the patch grid of input ``x`` (N, C, H, W): the extra tokens stated by ``extra_tokens``
    or the model (timm ``num_prefix_tokens``, torchvision's class token), else inferred; the grid
    from the traced patch embedding (so non-square inputs work), else square. Use
    :func:`perspicio.core.tokens.token_map` to turn (N, T) values into an image map."""
    grids: list[tuple[int, int]] = []
    if x.ndim == 4:
        trace = map_layers(model, x, extra_tokens=extra_tokens)
        grids = [lay.grid for lay in trace.layouts.values() if lay.kind == "nchw"]
    extra = extra_tokens if extra_tokens is not None else declared_extra_tokens(model)
    lay = token_layout(tokens, x.shape[-2:], extra=extra, grids=grids) if x.ndim == 4 else None
    if lay is None:
        stated = f"after {extra} extra token(s) " if extra is not None else ""
        raise LayerError(
            f"{tokens} tokens are not {stated}a patch grid of the {tuple(x.shape[-2:])} input (traced patch "
            f"grids: {grids or 'none'}); pass extra_tokens=<number of class/distillation/register tokens>."
        )
    return lay


def layer_layout(
    model: nn.Module,
    x: Tensor,
    name: str,
    shape: Sequence[int],
    *,
    reshape: object = "auto",
    extra_tokens: int | None = None,
) -> Layout:
    """How the output (of ``shape``) of layer ``name`` is read as an image map for input ``x``.

    ``reshape``: ``"auto"`` (detect: :mod:`perspicio.core.tokens`), ``"nchw"``/``"nhwc"`` for a 4-D
    output, or ``(h, w)``: a token grid after ``T - h*w`` extra tokens (``extra_tokens`` when
    given). Errors name what the output looks like and the option that fixes it.
    """
    shape = tuple(int(s) for s in shape)
    where = f"layer {name!r}: output {shape}"
    if isinstance(reshape, (tuple, list)):
        if len(shape) != 3:
            raise LayerError(
                f"{where}: reshape=(h, w) reads (N, tokens, C) outputs; this one has {len(shape)} dims."
            )
        h, w = (int(v) for v in reshape)
        extra = shape[1] - h * w if extra_tokens is None else extra_tokens
        if extra < 0 or extra + h * w != shape[1]:
            raise LayerError(
                f"{where}: reshape={tuple(reshape)} needs {h * w} patch tokens"
                + (f" after {extra_tokens} extra token(s)" if extra_tokens is not None else "")
                + f"; the layer has {shape[1]} tokens."
            )
        return Layout("tokens", (h, w), extra)
    if reshape in ("nchw", "nhwc"):
        if len(shape) != 4:
            raise LayerError(
                f"{where}: reshape={reshape!r} reads 4-D outputs; this one has {len(shape)} dims."
            )
        return Layout(reshape, (shape[2], shape[3]) if reshape == "nchw" else (shape[1], shape[2]))
    if reshape != "auto":
        raise LayerError(
            f"reshape must be 'auto', 'nchw', 'nhwc', an (h, w) token grid or a callable; got {reshape!r}."
        )
    trace = map_layers(model, x, extra_tokens=extra_tokens)
    lay = trace.layouts.get(name)
    if lay is not None and _matches(lay, shape):
        return lay
    if x.ndim == 4:
        mods = named_modules(model)
        grids = [lay.grid for lay in trace.layouts.values() if lay.kind == "nchw"]
        extra = extra_tokens if extra_tokens is not None else declared_extra_tokens(model)
        lay = layout_of(
            shape,
            x.shape[-2:],
            extra=extra,
            grids=grids,
            module=mods.get(name),
            channels_last=trace.channels_last,
            token_counts=trace.token_counts,
        )
        if lay is not None:
            return lay
    elif len(shape) == 4 and shape[2] * shape[3] > 1:
        return Layout("nchw", (shape[2], shape[3]))
    elif len(shape) == 3 and _square_tokens(shape[1]) is not None:
        side, extra = _square_tokens(shape[1])
        return Layout("tokens", (side, side), extra)
    size = f" of the {tuple(x.shape[-2:])} input" if x.ndim == 4 else ""
    # globally pooled: the method says it has no extent
    if len(shape) == 4 and shape[2] * shape[3] == 1:
        return Layout("nchw", (1, 1))
    if len(shape) == 4:
        raise LayerError(
            f"{where} is not a feature map{size}: neither (N, C, H, W) nor channels-last (N, H, W, C) with "
            "a grid that is the input divided by a stride (attention weights, queries and keys look like this). "
            "Pick another layer (see `perspicio layers`) or pass reshape='nchw' / 'nhwc'."
        )
    if len(shape) == 3:
        raise LayerError(
            f"{where} is (N, tokens, C) but its {shape[1]} tokens are not a square grid{size} plus 0 or 1 "
            "extra token, nor a traced patch grid plus extra tokens; pass extra_tokens=... (class, "
            "distillation and register tokens) or reshape=(h, w)."
        )
    raise LayerError(
        f"{where}; a CAM needs a spatial output (N, C, H, W), channels-last (N, H, W, C) or (N, tokens, C). "
        "Pick a convolutional layer or a transformer block (see `perspicio layers`)."
    )


def _matches(lay: Layout, shape: tuple[int, ...]) -> bool:
    h, w = lay.grid
    if lay.kind == "tokens":
        return len(shape) == 3 and shape[1] == lay.extra + h * w
    return len(shape) == 4 and (shape[2:] if lay.kind == "nchw" else shape[1:3]) == (h, w)


def to_spatial(t: Tensor, reshape: object = "auto", layout: Layout | None = None) -> Tensor:
    """Bring a captured activation to (N, C, h, w) with its ``layout`` (:func:`layer_layout`).

    Without a layout (no model at hand): (N, tokens, C) outputs are reshaped to a square grid,
    dropping a leading class token when tokens = side^2 + 1; ``reshape`` may be "auto", a
    (h, w) tuple or a callable.
    """
    if callable(reshape):
        return reshape(t)
    if layout is not None:
        return layout.to_spatial(t)
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
