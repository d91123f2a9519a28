"""Activation maximisation: synthesise inputs that maximise a class, a channel, a neuron, or
a weighted combination of them.

Objectives are small objects that can be added and weighted
(``ClassLogit(285) + 0.5 * Channel("_blocks.10", 7)``). The image is optimised in a
parameterisation (raw pixels through a sigmoid, or a decorrelated Fourier space:
spectrum scaled by 1/frequency and colours mixed by the square root of natural-image
colour covariance, so plain gradient steps act like a whitened optimiser); at each step
it is randomly jittered, scaled and rotated (transformation robustness), and total
variation and L2 penalties keep it smooth and bounded. Randomness comes from a local
generator seeded by ``seed``; the global RNG is untouched.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batching import progress_bar
from ..core.guard import model_device, model_guard
from ..core.options import check_choice, check_float, check_int
from ..errors import OptionError, TargetError
from ._common import (
    LayerGrab,
    ModelBundle,
    Unit,
    check_unit,
    make_generator,
    resolve,
    unwrap,
)

# ----------------------------------------------------------------------------- objectives


class Objective:
    """A differentiable score per sample, (N,), to be maximised.

    ``layers`` names the layers it reads; ``needs_output`` whether it reads the model
    output. Objectives combine with ``+``, ``-`` and multiplication by numbers.
    """

    layers: tuple[Any, ...] = ()
    needs_output: bool = False

    def __call__(self, acts: dict[Any, Tensor], output: Tensor | None) -> Tensor:
        raise NotImplementedError  # abstract

    def describe(self) -> str:
        return type(self).__name__

    def terms(self) -> list[tuple[float, Objective]]:
        return [(1.0, self)]

    def __add__(self, other: Objective) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return Sum(self.terms() + other.terms())

    def __radd__(self, other: Any) -> Objective:
        if other == 0:  # sum([...]) support
            return self
        return NotImplemented

    def __mul__(self, w: float) -> Objective:
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            return NotImplemented
        return Sum([(float(w) * a, o) for a, o in self.terms()])

    __rmul__ = __mul__

    def __neg__(self) -> Objective:
        return -1.0 * self

    def __sub__(self, other: Objective) -> Objective:
        return self + (-other)


class Sum(Objective):
    """Weighted sum of objectives."""

    def __init__(self, terms: Sequence[tuple[float, Objective]]) -> None:
        self._terms = list(terms)
        layers: list[Any] = []
        for _, o in self._terms:
            layers += [lay for lay in o.layers if lay not in layers]
        self.layers = tuple(layers)
        self.needs_output = any(o.needs_output for _, o in self._terms)

    def terms(self) -> list[tuple[float, Objective]]:
        return list(self._terms)

    def __call__(self, acts: dict[Any, Tensor], output: Tensor | None) -> Tensor:
        return sum(w * o(acts, output) for w, o in self._terms)  # type: ignore[return-value]

    def describe(self) -> str:
        return " + ".join(f"{w:g}*{o.describe()}" if w != 1 else o.describe() for w, o in self._terms)


class ClassLogit(Objective):
    """The logit of class ``cls`` (an int, or one per sample)."""

    needs_output = True

    def __init__(self, cls: int | Sequence[int]) -> None:
        self.cls = cls

    def _idx(self, output: Tensor) -> Tensor:
        idx = torch.as_tensor(self.cls, dtype=torch.long, device=output.device).flatten()
        if len(idx) == 1:
            idx = idx.expand(output.shape[0])
        if len(idx) != output.shape[0]:
            raise TargetError(f"{len(idx)} classes for {output.shape[0]} images; give one class or one per image.")
        if output.ndim != 2 or bool(((idx < 0) | (idx >= output.shape[1])).any()):
            raise TargetError(f"class {self.cls} is out of range for a model output of shape {tuple(output.shape)}.")
        return idx

    def __call__(self, acts: dict[Any, Tensor], output: Tensor | None) -> Tensor:
        return output.gather(1, self._idx(output)[:, None])[:, 0]

    def describe(self) -> str:
        return f"logit[{self.cls}]"


class ClassLogProb(ClassLogit):
    """Log-softmax of class ``cls``: raises the class against all others."""

    def __call__(self, acts: dict[Any, Tensor], output: Tensor | None) -> Tensor:
        return output.log_softmax(dim=1).gather(1, self._idx(output)[:, None])[:, 0]

    def describe(self) -> str:
        return f"logprob[{self.cls}]"


class Channel(Objective):
    """Mean activation of channel ``channel`` of ``layer`` (over all positions)."""

    def __init__(self, layer: Any, channel: int) -> None:
        self.layers = (layer,)
        self.channel = check_int("channel", channel, minimum=0)

    def __call__(self, acts: dict[Any, Tensor], output: Tensor | None) -> Tensor:
        a = acts[self.layers[0]]
        check_unit(Unit(self.channel), a, str(self.layers[0]))
        return a[:, self.channel].reshape(a.shape[0], -1).mean(dim=1)

    def describe(self) -> str:
        return f"{self.layers[0]}:{self.channel}"


class Neuron(Objective):
    """One neuron: channel ``channel`` of ``layer`` at grid cell (row, col) (default: centre)."""

    def __init__(self, layer: Any, channel: int, row: int | None = None, col: int | None = None) -> None:
        self.layers = (layer,)
        self.channel = check_int("channel", channel, minimum=0)
        self.row, self.col = row, col

    def __call__(self, acts: dict[Any, Tensor], output: Tensor | None) -> Tensor:
        a = acts[self.layers[0]]
        if a.ndim != 4:
            check_unit(Unit(self.channel), a, str(self.layers[0]))
            return a[:, self.channel].reshape(a.shape[0], -1)[:, 0]
        i = a.shape[2] // 2 if self.row is None else self.row
        j = a.shape[3] // 2 if self.col is None else self.col
        check_unit(Unit(self.channel, (i, j)), a, str(self.layers[0]))
        return a[:, self.channel, i, j]

    def describe(self) -> str:
        return f"{self.layers[0]}:{self.channel}@({self.row},{self.col})"


class Custom(Objective):
    """Any callable ``fn(acts, output) -> (N,)`` reading the given ``layers``."""

    def __init__(self, fn: Callable[[dict[Any, Tensor], Tensor | None], Tensor], layers: Sequence[Any] = (), needs_output: bool = True) -> None:
        self.fn = fn
        self.layers = tuple(layers)
        self.needs_output = needs_output

    def __call__(self, acts: dict[Any, Tensor], output: Tensor | None) -> Tensor:
        return self.fn(acts, output)


def as_objective(target: Any) -> Objective:
    """An Objective from an Objective, a class index, or a list of class indices (one per image)."""
    if isinstance(target, Objective):
        return target
    if isinstance(target, bool):
        raise TargetError(f"objective must be an Objective or class index; got {target!r}.")
    if isinstance(target, int) or (isinstance(target, (list, tuple)) and all(isinstance(t, int) for t in target) and target):
        return ClassLogit(target)
    raise TargetError(f"objective must be an Objective (ClassLogit, Channel, Neuron, ...) or a class index; got {target!r}.")


# ----------------------------------------------------------------------------- parameterisations

#: Symmetric square root of the RGB covariance of scikit-image's bundled photos (chelsea,
#: coffee, astronaut, rocket, motorcycle; pixels in [0, 1]), scaled to unit max column norm.
#: Recomputed from the photos in tests/test_featurevis_maximize.py.
COLOR_SQRT = (
    (0.8979, 0.4019, 0.1794),
    (0.4019, 0.5925, 0.4341),
    (0.1794, 0.4341, 0.6776),
)
PARAMETERISATIONS = ("fourier", "pixel")


class ImageParam(nn.Module):
    """An image batch as a function of free parameters; ``forward()`` gives pixels in [0, 1]."""

    def __init__(self, shape: Sequence[int], kind: str, generator: torch.Generator, *, scale: float = 0.01, decay: float = 1.0, device: Any = "cpu") -> None:
        super().__init__()
        check_choice("param", kind, PARAMETERISATIONS)
        n, c, h, w = shape
        self.kind, self.shape = kind, tuple(shape)
        if kind == "pixel":
            init = torch.randn(shape, generator=generator) * scale * 10
            self.raw = nn.Parameter(init.to(device))
        else:
            fy = torch.fft.fftfreq(h)[:, None]
            fx = torch.fft.rfftfreq(w)[None, :]
            freq = torch.sqrt(fy * fy + fx * fx).clamp_min(1.0 / max(h, w))
            amp = 1.0 / freq**decay
            self.register_buffer("spectrum_scale", (amp / amp.pow(2).mean().sqrt()).to(device))  # unit RMS
            init = torch.randn((n, c, h, w // 2 + 1, 2), generator=generator) * scale
            self.raw = nn.Parameter(init.to(device))
        mix = torch.tensor(COLOR_SQRT) if c == 3 else torch.eye(c)
        self.register_buffer("color", mix.to(device))

    def linear(self) -> Tensor:
        """The pre-sigmoid image (N, C, H, W)."""
        n, c, h, w = self.shape
        if self.kind == "pixel":
            return self.raw
        spec = torch.view_as_complex(self.raw) * self.spectrum_scale
        img = torch.fft.irfft2(spec, s=(h, w), norm="ortho") * math.sqrt(2.0)  # rfft keeps half the spectrum
        return torch.einsum("ij,njhw->nihw", self.color, img)

    def forward(self) -> Tensor:
        return torch.sigmoid(self.linear())


# ----------------------------------------------------------------------------- transforms and penalties


def random_transform(img: Tensor, generator: torch.Generator, *, jitter: int, scales: Sequence[float], angles: Sequence[float]) -> Tensor:
    """One random affine transform per image: scale, rotation (degrees) and translation up to
    ``jitter`` pixels, sampled bilinearly with reflection at the borders (differentiable)."""
    n, _, h, w = img.shape
    if jitter == 0 and not scales and not angles:
        return img

    def pick(options: Sequence[float], default: float) -> Tensor:
        if not options:
            return torch.full((n,), default)
        idx = torch.randint(len(options), (n,), generator=generator)
        return torch.tensor([float(o) for o in options])[idx]

    s = pick(scales, 1.0)
    a = pick(angles, 0.0) * math.pi / 180
    if jitter:
        t = torch.randint(-jitter, jitter + 1, (n, 2), generator=generator).float()
    else:
        t = torch.zeros(n, 2)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    theta[:, 0, 2] = 2 * t[:, 0] / w
    theta[:, 1, 2] = 2 * t[:, 1] / h
    theta = theta.to(img)
    grid = F.affine_grid(theta, list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def total_variation(img: Tensor) -> Tensor:
    """Mean absolute difference of neighbouring pixels, per image (N,)."""
    dy = (img[:, :, 1:, :] - img[:, :, :-1, :]).abs().flatten(1).mean(1)
    dx = (img[:, :, :, 1:] - img[:, :, :, :-1]).abs().flatten(1).mean(1)
    return dx + dy


# ----------------------------------------------------------------------------- optimiser


@dataclass(frozen=True)
class MaximizeResult:
    """A synthesised batch: ``pixels`` in [0, 1], ``inputs`` as fed to the model, the
    objective per step (``history``, batch mean, on the transformed image), the final
    objective per image on the untransformed image, and ``probabilities`` of the final
    images when the model output was computed."""

    pixels: Tensor
    inputs: Tensor
    history: Tensor
    objective: Tensor
    probabilities: Tensor | None
    description: str
    options: dict[str, Any]


def _evaluate(bundle: ModelBundle, objective: Objective, layers: list[tuple[str, nn.Module]], keys: list[Any], x: Tensor) -> tuple[Tensor, Tensor | None]:
    stop = layers[0][1] if (not objective.needs_output and len(layers) == 1) else None
    with LayerGrab([m for _, m in layers], stop_after=stop) as grab:
        out = grab.run(bundle.model, x)
        acts = {key: grab.get(i, [n for n, _ in layers]) for i, key in enumerate(keys)}
    return objective(acts, out), out


def objective_layers(net: nn.Module, objective: Objective) -> tuple[list[tuple[str, nn.Module]], list[Any]]:
    layers = [resolve(net, lay) for lay in objective.layers]
    return layers, list(objective.layers)


def maximize(
    model: Any,
    objective: Any,
    *,
    shape: Sequence[int] | None = None,
    batch: int = 1,
    param: str = "fourier",
    steps: int = 256,
    lr: float = 0.05,
    jitter: int = 8,
    scales: Sequence[float] = (0.9, 0.95, 1.0, 1.05, 1.1),
    angles: Sequence[float] = (-10, -5, 0, 5, 10),
    tv: float = 0.0,
    l2: float = 0.0,
    seed: int | None = 0,
    progress: bool = False,
    callback: Callable[[int, Tensor], None] | None = None,
) -> MaximizeResult:
    """Synthesise ``batch`` images maximising ``objective`` (an :class:`Objective` or a class index).

    ``shape`` is (C, H, W) (default: the zoo model's input size with 3 channels);
    ``param`` "fourier" (decorrelated, default) or "pixel"; ``jitter`` (pixels),
    ``scales`` and ``angles`` (degrees) are the random transforms; ``tv`` and ``l2`` weight
    the penalties. Adam with learning rate ``lr`` for ``steps`` steps.
    """
    bundle = unwrap(model)
    net = bundle.model
    obj = as_objective(objective)
    steps = check_int("steps", steps, minimum=1)
    batch = check_int("batch", batch, minimum=1)
    jitter = check_int("jitter", jitter, minimum=0)
    lr = check_float("lr", lr, minimum=0, strict=True)
    tv = check_float("tv", tv, minimum=0)
    l2 = check_float("l2", l2, minimum=0)
    scales = [check_float("scales", s, minimum=0, strict=True) for s in scales]
    angles = [float(a) for a in angles]
    if shape is None:
        size = bundle.space.size or (224, 224)
        shape = (len(bundle.space.mean) if len(bundle.space.mean) > 1 else 3, *size)
    if len(shape) != 3 or any(int(s) < 1 for s in shape):
        raise OptionError(f"shape must be (C, H, W); got {tuple(shape)}.")
    shape = tuple(int(s) for s in shape)
    layers, keys = objective_layers(net, obj)
    device = model_device(net)
    gen = make_generator(seed)
    image = ImageParam((batch, *shape), param, gen, device=device)
    opt = torch.optim.Adam(image.parameters(), lr=lr)
    history = []
    with model_guard(net):
        with progress_bar(progress, steps, f"maximizing {obj.describe()}") as advance:
            for step in range(steps):
                pixels = image()
                moved = random_transform(pixels, gen, jitter=jitter, scales=scales, angles=angles)
                score, _ = _evaluate(bundle, obj, layers, keys, bundle.space.to_model(moved))
                loss = -score.mean()
                if tv:
                    loss = loss + tv * total_variation(pixels).mean()
                if l2:
                    loss = loss + l2 * (pixels - 0.5).pow(2).flatten(1).mean(1).mean()
                opt.zero_grad(set_to_none=True)
                grads = torch.autograd.grad(loss, list(image.parameters()))
                for p, g in zip(image.parameters(), grads):
                    p.grad = g
                opt.step()
                history.append(float(score.detach().mean()))
                if callback is not None:
                    callback(step, pixels.detach())
                advance(1)
        with torch.no_grad():
            pixels = image().detach()
            x = bundle.space.to_model(pixels)
            final, out = _evaluate(bundle, obj, layers, keys, x)
    probs = out.softmax(dim=1) if out is not None and out.ndim == 2 else None
    return MaximizeResult(
        pixels=pixels, inputs=x.detach(), history=torch.tensor(history), objective=final.detach(),
        probabilities=probs.detach() if probs is not None else None, description=obj.describe(),
        options={"param": param, "steps": steps, "lr": lr, "jitter": jitter, "scales": list(scales),
                 "angles": angles, "tv": tv, "l2": l2, "seed": seed, "shape": list(shape), "batch": batch},
    )


__all__ = [
    "COLOR_SQRT", "Channel", "ClassLogProb", "ClassLogit", "Custom", "ImageParam", "MaximizeResult", "Neuron",
    "Objective", "Sum", "as_objective", "maximize", "random_transform", "total_variation",
]
