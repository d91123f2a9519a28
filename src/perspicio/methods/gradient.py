"""Gradient attributions: saliency, Input x Gradient, guided backprop, deconvnet,
Guided Grad-CAM and neuron gradients.

All of them are "one gradient of one scalar per sample with respect to the input",
computed in chunks through the shared :class:`~perspicio.core.batching.Engine`
(one forward + one backward pass per sample). They differ in

* what is differentiated: a class/target score (:class:`GradientBase`) or a unit of an
  inner layer (:class:`NeuronObjective`, for the ``neuron_*`` methods);
* how gradients pass through rectifiers (``rule``: ``None``, ``"guided"`` or
  ``"deconv"``, see :mod:`perspicio.core.relu_override`);
* how the gradient becomes an attribution (:meth:`GradientBase.finish`).

The helpers here (:class:`NeuronObjective`, :func:`target_grads`) are shared by the
path methods (:mod:`perspicio.methods.path`); target slicing and row scoring are in
:mod:`perspicio.core.targets`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..core.batching import Engine
from ..core.capture import Capture, StopForward, auto_layer, resolve_layer
from ..core.explanation import Explanation
from ..core.inputs import as_batch, expected_input
from ..core.options import check_choice
from ..core.registry import register_method
from ..core.relu_override import rectifier_override
from ..core.targets import (
    ResolvedTarget,
    check_target_count,
    resolve_target,
    row_scores,
    slice_target,
)
from ..errors import InputError, LayerError, ModelError, OptionError, TargetError
from .base import Method

REDUCTIONS = (None, "sum", "mean", "max", "l2")


def gradient_inputs(method: Method, inputs: Any) -> Tensor:
    """Inputs of a gradient or path method: any float batch (N, ...) - images (N, C, H, W),
    signals, tabular rows (N, F), token embeddings (N, L, D).

    A model that starts with a convolution keeps the rank that convolution takes (a missing
    batch dimension is a clear error, not a convolution of an unbatched image); integer token
    ids for a model with an embedding layer are refused (ids have no gradient).
    """
    exp = expected_input(method.model)
    x = as_batch(inputs, method.model, ndim=exp[1] if exp is not None else None, keep_integer=True)
    if x.ndim < 2:
        raise InputError(
            f"{method.name} needs a batch (N, ...) with at least one feature per sample; got shape "
            f"{tuple(x.shape)}. Add a batch dimension with x.unsqueeze(0)."
        )
    if not x.is_floating_point():
        if any(isinstance(m, nn.Embedding) for m in method.model.modules()):
            raise InputError(
                f"{method.name} differentiates the score with respect to the input, and integer token ids "
                f"({x.dtype}) have no gradient: explain text with perspicio.explain(model, 'a sentence', ...) "
                "(gradients on the word embeddings), or use layer_integrated_gradients with the embedding layer."
            )
        x = as_batch(x.float(), method.model, ndim=None)
    return x


# ============================================================================ shared helpers


def input_grad(engine: Engine, scores: Tensor, inputs: Tensor) -> Tensor:
    """d(sum scores)/d inputs, with a clear error when there is no gradient path."""
    if not scores.requires_grad:
        raise ModelError(
            "the target score does not depend differentiably on the input (no gradient path): the model "
            "may detach, use torch.no_grad, argmax or integer ops. Use a perturbation method instead."
        )
    return engine.grad(scores.sum(), inputs, inputs.shape[0])[0]


def target_grads(engine: Engine, scores: Tensor, inputs: Tensor, per_input: int) -> list[Tensor]:
    """Input gradients for ``per_input`` targets sharing ONE forward pass.

    ``scores`` holds ``len(inputs) * per_input`` scores, row ``i * per_input + t`` being
    target ``t`` of input ``i``; one backward pass per target (graph retained between
    them) gives the ``per_input`` gradients w.r.t. ``inputs``. With one target this is
    :func:`input_grad`.
    """
    if per_input == 1:
        return [input_grad(engine, scores, inputs)]
    if not scores.requires_grad:
        return [input_grad(engine, scores, inputs)]  # raises the clear no-gradient-path error
    grads = []
    for t in range(per_input):
        engine.backwards += inputs.shape[0]
        grads.append(
            torch.autograd.grad(scores[t::per_input].sum(), inputs, retain_graph=t < per_input - 1)[
                0
            ]
        )
    return grads


def interleave(parts: list[Tensor]) -> Tensor:
    """Stack per-target results ``parts[t]`` (n, ...) into input-major rows (n * T, ...)."""
    return torch.stack(parts, 1).reshape(-1, *parts[0].shape[1:])


def resolve_on_output(
    method: Method, x: Tensor, target: Any, engine: Engine
) -> tuple[ResolvedTarget, Tensor]:
    """One chunked no-grad forward pass on ``x``: the resolved target and the scores at ``x``."""
    check_target_count(target, len(x))
    out = engine.map(
        lambda s, e: engine.forward(x[s:e]), len(x), sample=x[:1], description="scores"
    )
    tgt = resolve_target(target, out, method.labels)
    return tgt, row_scores(tgt, out, torch.arange(len(x), device=out.device)).detach()


class NeuronObjective:
    """One unit or channel of a layer's output as the explained scalar (neuron methods).

    ``neuron`` is an int (a channel along dim 1: its mean over the other dims), a tuple
    (one unit of the layer output without the batch dimension), a callable mapping the
    layer output (B, ...) to (B,), or None (per sample, the channel with the largest
    mean activation at the input). ``layer`` None picks the last spatial layer, as CAMs do.
    The forward pass stops at the layer: later layers are never run.
    """

    def __init__(self, model: nn.Module, layer: Any, neuron: Any) -> None:
        self.model = model
        ok = (
            neuron is None
            or callable(neuron)
            or (isinstance(neuron, int) and not isinstance(neuron, bool))
        )
        if isinstance(neuron, (tuple, list)):
            ok = len(neuron) > 0 and all(
                isinstance(i, int) and not isinstance(i, bool) for i in neuron
            )
            neuron = tuple(neuron)
        if not ok:
            raise OptionError(
                f"neuron must be None, a channel index (int), a unit index (tuple of ints) or a callable; got {neuron!r}."
            )
        self.neuron = neuron
        self.layer_spec = layer
        self._layer = resolve_layer(model, layer) if layer not in (None, "auto") else None
        self.channels: Tensor | None = None

    def prepare(self, x: Tensor, engine: Engine) -> None:
        """Resolve the layer and, for ``neuron=None``, the channel of each sample."""
        if self._layer is None:
            if x.ndim != 4:
                raise LayerError(
                    f"the neuron methods pick a layer automatically for images only; inputs of shape "
                    f"{tuple(x.shape)} need layer=... (see `perspicio layers`)."
                )
            self._layer = resolve_layer(self.model, auto_layer(self.model, x))
        self.channels = None
        if self.neuron is None:
            acts = engine.map(
                lambda s, e: self.activation(x[s:e], engine),
                len(x),
                sample=x[:1],
                description="layer",
            )
            self.channels = (
                acts.reshape(acts.shape[0], acts.shape[1], -1).mean(2).argmax(1)
                if acts.ndim > 2
                else acts.argmax(1)
            )

    @property
    def layer_name(self) -> str:
        return self._layer[0] if self._layer is not None else str(self.layer_spec)

    def activation(self, batch: Tensor, engine: Engine) -> Tensor:
        """The layer output for ``batch`` (graph kept if ``batch`` requires grad)."""
        module = self._layer[1]
        with Capture([module], grad=True, stop_after=module) as cap:
            try:
                engine.forward(batch)
            except StopForward:
                pass
            return cap.last(0)

    def __call__(self, act: Tensor, rows: Tensor) -> Tensor:
        n = act.shape[0]
        if callable(self.neuron):
            s = self.neuron(act)
            if not isinstance(s, Tensor) or s.shape != (n,):
                raise OptionError(f"a callable neuron must map the layer output to shape ({n},).")
            return s
        if isinstance(self.neuron, tuple):
            shape = tuple(act.shape[1:])
            if len(self.neuron) != len(shape) or any(
                not -d <= i < d for i, d in zip(self.neuron, shape)
            ):
                raise OptionError(
                    f"neuron {self.neuron} is not a unit of layer {self.layer_name!r} with output shape {shape} (batch dim excluded)."
                )
            return act[(slice(None), *self.neuron)]
        channels = (
            self.channels[rows]
            if self.channels is not None
            else torch.full((n,), self.neuron, device=act.device)
        )
        if act.ndim < 2 or not bool(((channels >= 0) & (channels < act.shape[1])).all()):
            raise OptionError(
                f"neuron channel {self.neuron} is out of range for layer {self.layer_name!r} with output shape {tuple(act.shape[1:])}."
            )
        picked = act[torch.arange(n, device=act.device), channels]
        return picked.reshape(n, -1).mean(1)

    def scores(self, batch: Tensor, rows: Tensor, engine: Engine) -> Tensor:
        return self(self.activation(batch, engine), rows)

    def describe(self) -> Any:
        if self.channels is not None:
            return {"layer": self.layer_name, "channels": self.channels.tolist()}
        return {
            "layer": self.layer_name,
            "neuron": self.neuron
            if not callable(self.neuron)
            else getattr(self.neuron, "__name__", "callable"),
        }


def no_target(method: Method, target: Any) -> None:
    if target is not None:
        raise TargetError(
            f"{method.name} explains the unit of `layer` chosen by `neuron`; target must be None (got {target!r})."
        )


# ============================================================================ gradient methods


class GradientBase(Method):
    """One gradient per sample w.r.t. the input; subclasses set ``rule`` and override :meth:`finish`."""

    #: rectifier backward rule: None (true gradient), "guided" or "deconv"
    rule: ClassVar[str | None] = None
    input_ndim = None  # any float batch (N, ...); see gradient_inputs

    def _prepare_inputs(self, inputs: Any) -> Any:
        return gradient_inputs(self, inputs)

    def finish(self, x: Tensor, grads: Tensor) -> Tensor:
        """Turn the input gradient into the attribution (identity here)."""
        return grads

    def gradients(
        self, x: Tensor, target: Any, engine: Engine, targets_per_input: int = 1
    ) -> tuple[Tensor, Tensor, Tensor | None, dict]:
        """Input gradients of the target score, in chunks: (grads, scores, class indices, provenance).

        With ``targets_per_input=T`` the rows of ``x`` come in groups of T copies of one
        input (several targets per input): each input is run forward once and
        backpropagated T times.
        """
        n, per = len(x), targets_per_input
        check_target_count(target, n)
        scores: list[Tensor] = []
        indices: list[Tensor] = []
        calls = [0]
        xu = x[::per] if per > 1 else x

        def chunk(start: int, stop: int) -> Tensor:
            xc = xu[start:stop].detach().requires_grad_(True)
            with self._scope() as mode:
                out = engine.forward(xc)
                if per > 1:
                    out = out.repeat_interleave(per, dim=0)
                tgt = resolve_target(
                    slice_target(target, start * per, stop * per, n), out, self.labels
                )
                s = row_scores(tgt, out, torch.arange(len(out), device=out.device))
                g = interleave(target_grads(engine, s, xc, per))
            calls[0] += getattr(mode, "calls", 0)
            scores.append(s.detach())
            if tgt.indices is not None:
                indices.append(tgt.indices)
            return g

        grads = engine.map(chunk, len(xu), sample=x[:1], grad=True, description=self.name)
        if self.rule and calls[0] == 0:
            raise ModelError(
                f"{self.name} changes the gradient only where it passes a rectifier (ReLU, ReLU6, clamp(min=0), "
                f"...), and {getattr(self.model, 'model_name', None) or type(self.model).__name__} ran none for this input (GELU, SiLU, tanh are not "
                "rectifiers): the result would be plain saliency. Use saliency or input_x_gradient."
            )
        idx = torch.cat(indices) if len(indices) and sum(len(i) for i in indices) == n else None
        prov = {"rectifier_overrides": calls[0]} if self.rule else {}
        return grads, torch.cat(scores), idx, prov

    def _scope(self) -> Any:
        from contextlib import nullcontext

        return rectifier_override(self.rule) if self.rule else nullcontext()

    shares_forward_across_targets = True

    def _explain(
        self, x: Tensor, target: Any, engine: Engine, targets_per_input: int = 1
    ) -> Explanation:
        grads, scores, idx, prov = self.gradients(x, target, engine, targets_per_input)
        return Explanation(
            attributions=self.finish(x, grads).detach(),
            method=self.name,
            scores=scores,
            targets=idx,
            provenance=prov,
        )


def reduce_channels(a: Tensor, reduce: str | None) -> Tensor:
    """Reduce (N, C, ...) over channels keeping the dim: sum, mean, max or l2 (None: keep)."""
    if reduce is None:
        return a
    if reduce == "sum":
        return a.sum(1, keepdim=True)
    if reduce == "mean":
        return a.mean(1, keepdim=True)
    if reduce == "max":
        return a.amax(1, keepdim=True)
    return a.pow(2).sum(1, keepdim=True).sqrt()


@register_method(
    "saliency",
    family="gradient",
    needs_gradients=True,
    summary="Saliency: gradient of the target score w.r.t. the input (absolute by default)",
    paper="Simonyan et al., ICLR Workshop 2014",
)
class Saliency(GradientBase):
    """Vanilla gradient dS/dx.

    ``absolute`` takes |dS/dx| (the paper's saliency; Captum's default); ``reduce``
    optionally reduces channels ("max" over |grad| is the paper's map; "sum", "mean",
    "l2") to (N, 1, H, W) - inputs with channels at dim 1 (N, C, ...) only; by default
    the attribution keeps the input's shape (tabular rows (N, F) included).
    """

    def __init__(
        self, model: nn.Module, *, absolute: bool = True, reduce: str | None = None, **common: Any
    ) -> None:
        super().__init__(model, **common)
        check_choice("reduce", reduce, REDUCTIONS)
        self.absolute = bool(absolute)
        self.reduce = reduce

    def _prepare_inputs(self, inputs: Any) -> Any:
        x = super()._prepare_inputs(inputs)
        if self.reduce is not None and x.ndim < 3:
            raise OptionError(
                f"reduce={self.reduce!r} reduces the channels (dim 1) of inputs (N, C, ...); inputs of "
                f"shape {tuple(x.shape)} have none: leave reduce=None."
            )
        return x

    def finish(self, x: Tensor, grads: Tensor) -> Tensor:
        return reduce_channels(grads.abs() if self.absolute else grads, self.reduce)


@register_method(
    "input_x_gradient",
    family="gradient",
    needs_gradients=True,
    summary="Input x Gradient: element-wise product of the input and the gradient",
    paper="Shrikumar et al., 2016",
)
class InputXGradient(GradientBase):
    """x * dS/dx: first-order Taylor contribution of each feature (relative to an all-zero input)."""

    def finish(self, x: Tensor, grads: Tensor) -> Tensor:
        return x * grads


@register_method(
    "guided_backprop",
    family="gradient",
    needs_gradients=True,
    summary="Guided backpropagation: only positive gradients through active rectifiers",
    paper="Springenberg et al., ICLR Workshop 2015",
)
class GuidedBackprop(GradientBase):
    """Gradient where every rectifier (ReLU, ReLU6, clamp(min=0), ...) passes back
    ``1[x > 0] * relu(grad)``. Functional calls are overridden as well as modules."""

    rule = "guided"
    needs_rectifiers = True


@register_method(
    "deconvnet",
    family="gradient",
    needs_gradients=True,
    summary="Deconvnet: rectified gradients through rectifiers, forward mask ignored",
    paper="Zeiler & Fergus, ECCV 2014",
)
class Deconvnet(GradientBase):
    """Gradient where every rectifier passes back ``relu(grad)`` regardless of its input."""

    rule = "deconv"
    needs_rectifiers = True


@register_method(
    "guided_gradcam",
    family="gradient",
    needs_gradients=True,
    needs_layer=True,
    summary="Guided Grad-CAM: guided backpropagation times the upsampled Grad-CAM map",
    paper="Selvaraju et al., ICCV 2017",
)
class GuidedGradCAM(GradientBase):
    """Guided backprop (input-shaped) multiplied element-wise by Grad-CAM at ``layer``
    (ReLU'd, upsampled to the input with ``upsample``; None = the automatic CAM layer).

    Captum upsamples the Grad-CAM map with nearest neighbours; pass
    ``upsample="nearest"`` to reproduce it. The default (bilinear) gives smoother maps.
    """

    rule = "guided"
    shares_forward_across_targets = False  # Grad-CAM part runs per row
    input_ndim = 4

    def _prepare_inputs(self, inputs: Any) -> Any:
        x = gradient_inputs(self, inputs)
        if x.ndim != 4:
            raise InputError(
                f"guided_gradcam multiplies guided backpropagation by a Grad-CAM map: images (N, C, H, W) "
                f"only; got shape {tuple(x.shape)}. Use guided_backprop or saliency."
            )
        return x

    def __init__(
        self, model: nn.Module, layer: Any = None, *, upsample: str = "bilinear", **common: Any
    ) -> None:
        super().__init__(model, **common)
        from .cam import UPSAMPLE_MODES

        check_choice("upsample", upsample, UPSAMPLE_MODES)
        self.layer_spec = layer
        self.upsample = upsample
        if layer not in (None, "auto"):
            resolve_layer(self.model, layer)

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        from .cam import GradCAM

        cam = GradCAM(
            self.model,
            self.layer_spec,
            relu=True,
            upsample=self.upsample,
            labels=self.labels,
            batch_size=self.batch_size,
            memory_budget=self.memory_budget,
            output=self.output,
        )._explain(x, target, engine)
        same = cam.targets if cam.targets is not None else target
        grads, scores, idx, prov = self.gradients(x, same, engine)
        return Explanation(
            attributions=(grads * cam.attributions).detach(),
            method=self.name,
            scores=scores,
            targets=idx,
            layer=cam.layer,
            raw=cam.raw,
            provenance=prov,
            extras={"gradcam": cam.attributions, "guided_backprop": grads.detach()},
        )


@register_method(
    "neuron_gradient",
    family="gradient",
    needs_gradients=True,
    needs_layer=True,
    summary="Neuron gradient: gradient of one unit/channel of a layer w.r.t. the input",
    paper="Erhan et al., 2009; Simonyan et al., 2014",
)
class NeuronGradient(GradientBase):
    """d(neuron)/dx for a unit or channel of ``layer`` (see :class:`NeuronObjective`);
    the model is run only up to that layer. ``target`` must be None."""

    shares_forward_across_targets = False
    targets_are_classes = False  # targets are the explained channels

    def __init__(
        self,
        model: nn.Module,
        layer: Any = None,
        *,
        neuron: Any = None,
        absolute: bool = False,
        **common: Any,
    ) -> None:
        super().__init__(model, **common)
        self.objective = NeuronObjective(self.model, layer, neuron)
        self.absolute = bool(absolute)

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        no_target(self, target)
        obj = self.objective
        obj.prepare(x, engine)
        scores: list[Tensor] = []

        def chunk(start: int, stop: int) -> Tensor:
            xc = x[start:stop].detach().requires_grad_(True)
            s = obj.scores(xc, torch.arange(start, stop, device=x.device), engine)
            g = input_grad(engine, s, xc)
            scores.append(s.detach())
            return g

        grads = engine.map(chunk, len(x), sample=x[:1], grad=True, description=self.name)
        attr = grads.abs() if self.absolute else grads
        return Explanation(
            attributions=attr.detach(),
            method=self.name,
            scores=torch.cat(scores),
            targets=obj.channels,
            layer=obj.layer_name,
            provenance={"neuron": obj.describe()},
        )
