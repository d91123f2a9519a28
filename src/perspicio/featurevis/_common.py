"""Helpers shared by the feature-visualisation tools: model unwrapping, input space, units.

Every public function of :mod:`perspicio.featurevis` accepts a plain ``nn.Module``
or a bundled :class:`~perspicio.zoo.ZooModel`. From a zoo model we also take the
class labels and the pixel <-> model-input mapping (``preprocess.mean``/``std``),
so that images are synthesised, attacked and displayed in pixel space [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..core.capture import Capture, StopForward, resolve_layer
from ..core.options import check_int
from ..errors import InputError, LayerError, ModelError, OptionError


@dataclass(frozen=True)
class InputSpace:
    """Affine map between pixels in [0, 1] and the model's input: ``x = (p - mean) / std``.

    ``channels`` is the number of image channels; ``size`` the model's usual (H, W)
    (None if unknown).
    """

    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    size: tuple[int, int] | None = None

    def _stats(self, t: Tensor) -> tuple[Tensor, Tensor]:
        c = t.shape[-3]
        mean = torch.tensor(self.mean, dtype=t.dtype, device=t.device)
        std = torch.tensor(self.std, dtype=t.dtype, device=t.device)
        if mean.numel() == 1:
            mean, std = mean.expand(c), std.expand(c)
        if mean.numel() != c:
            raise InputError(f"the model's preprocessing has {mean.numel()} channels; the input has {c}.")
        return mean.view(c, 1, 1), std.view(c, 1, 1)

    def to_model(self, pixels: Tensor) -> Tensor:
        """Pixels in [0, 1] -> model input (differentiable)."""
        mean, std = self._stats(pixels)
        return (pixels - mean) / std

    def to_pixels(self, x: Tensor) -> Tensor:
        """Model input -> pixels (not clamped; differentiable)."""
        mean, std = self._stats(x)
        return x * std + mean


@dataclass(frozen=True)
class ModelBundle:
    """What the tools need from a model argument."""

    model: nn.Module
    labels: Sequence[str] | None
    space: InputSpace
    preprocess: Any
    name: str


def unwrap(model: Any) -> ModelBundle:
    """Accept an ``nn.Module`` or a zoo model (``.model``, ``.preprocess``, ``.labels``)."""
    if isinstance(model, ModelBundle):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module) and not isinstance(model, nn.Module):
        pre = getattr(model, "preprocess", None)
        mean = getattr(pre, "mean", None)
        std = getattr(pre, "std", None)
        size = getattr(pre, "size", None)
        space = InputSpace(tuple(mean), tuple(std), tuple(size) if size else None) if mean is not None and std is not None else InputSpace()
        labels = getattr(model, "labels", None)
        return ModelBundle(inner, labels, space, pre, str(getattr(model, "name", type(inner).__name__)))
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch nn.Module or a perspicio zoo model; got {type(model).__name__}.")
    return ModelBundle(model, None, InputSpace(), None, type(model).__name__)


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A local generator (never the global RNG); ``None`` draws a fresh seed from the OS."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(check_int("seed", seed, minimum=0))
    return g


class LayerGrab:
    """Scoped capture of one or more layers' outputs *without copies*, optionally stopping
    the forward pass after the last needed layer.

    Built on :class:`~perspicio.core.capture.Capture` (hooks removed in ``finally``).
    The grabbed tensors keep their autograd history, so objectives on them can be
    differentiated w.r.t. the input.
    """

    def __init__(self, modules: Sequence[nn.Module], *, stop_after: nn.Module | None = None) -> None:
        self.modules = list(modules)
        self.values: list[Tensor | None] = [None] * len(self.modules)
        self._cap = Capture(self.modules, transform=self._take, store=False, stop_after=stop_after)

    def _take(self, i: int, t: Tensor) -> None:
        self.values[i] = t
        return None

    def __enter__(self) -> LayerGrab:
        self._cap.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._cap.__exit__(*exc)

    def run(self, model: Callable[[Tensor], Tensor], x: Tensor) -> Tensor | None:
        """Forward ``x`` through ``model`` (a module or e.g. ``Engine.forward``); returns the
        output, or None when stopped early. The hooks must be active (inside ``with``)."""
        self.values = [None] * len(self.modules)
        try:
            return model(x)
        except StopForward:
            return None

    def get(self, i: int, names: Sequence[str] | None = None) -> Tensor:
        v = self.values[i]
        if v is None:
            label = names[i] if names is not None else type(self.modules[i]).__name__
            raise LayerError(f"layer {label!r} was not reached in the forward pass (or returned no tensor).")
        return v


def resolve(model: nn.Module, layer: Any) -> tuple[str, nn.Module]:
    """Resolve a layer name/module (clear error with suggestions)."""
    if layer is None:
        raise LayerError("a layer is required (a dotted module name; see `perspicio layers`).")
    return resolve_layer(model, layer)


@dataclass(frozen=True)
class Unit:
    """A unit of a layer: a channel (``position`` None) or one neuron (channel, i, j)/(feature,)."""

    channel: int
    position: tuple[int, int] | None = None

    def describe(self) -> str:
        return f"channel {self.channel}" if self.position is None else f"neuron {self.channel}@{self.position}"


def parse_unit(unit: Any) -> Unit:
    """``3`` -> channel 3; ``(3, 5, 7)`` -> neuron at channel 3, row 5, column 7."""
    if isinstance(unit, Unit):
        return unit
    if isinstance(unit, bool):
        raise OptionError(f"unit must be a channel index or (channel, row, col); got {unit!r}.")
    if isinstance(unit, int):
        return Unit(check_int("unit (channel index)", unit, minimum=0))
    if isinstance(unit, (tuple, list)) and len(unit) == 3 and all(isinstance(u, int) and not isinstance(u, bool) for u in unit):
        c, i, j = (check_int("unit index", u, minimum=0) for u in unit)
        return Unit(c, (i, j))
    if isinstance(unit, (tuple, list)) and len(unit) == 1:
        return parse_unit(unit[0])
    raise OptionError(f"unit must be a channel index or (channel, row, col); got {unit!r}.")


def check_unit(unit: Unit, act: Tensor, layer: str) -> None:
    """Range-check ``unit`` against an activation (N, C, ...) of ``layer``."""
    if act.ndim < 2:
        raise LayerError(f"layer {layer!r} has output shape {tuple(act.shape)}; expected (N, C, ...).")
    n_ch = act.shape[1]
    if unit.channel >= n_ch:
        raise OptionError(f"channel {unit.channel} is out of range: layer {layer!r} has {n_ch} channels (0..{n_ch - 1}).")
    if unit.position is not None:
        if act.ndim != 4:
            raise OptionError(f"a (channel, row, col) unit needs a spatial layer; {layer!r} has output shape {tuple(act.shape)}.")
        h, w = act.shape[2:]
        i, j = unit.position
        if i >= h or j >= w:
            raise OptionError(f"position ({i}, {j}) is out of range: layer {layer!r} has a {h}x{w} grid.")
