"""Noise tunnelling: SmoothGrad, SmoothGrad-squared and VarGrad around ANY attribution method.

For each input, ``samples`` noisy copies ``x + N(0, sigma^2)`` with
``sigma = noise * (max(x) - min(x))`` (Smilkov et al. 2017: noise relative to the
input range) are explained by the ``base`` method, and the per-feature statistics of
the attributions are returned:

* ``smoothgrad``:    mean_s A(x + e_s)
* ``smoothgrad_sq``: mean_s A(x + e_s)^2
* ``vargrad``:       var_s A(x + e_s)  (population variance, Adebayo et al. 2018)

All ``N * samples`` noisy copies are handed to the base method in ONE call, so they
are chunked by its batching engine like any other batch. The target is resolved
once on the clean input (e.g. the predicted class of ``x``, not of each noisy copy).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..core.batching import Engine
from ..core.explanation import Explanation
from ..core.options import check_choice, check_float, check_int
from ..core.registry import METHODS, register_method
from ..core.targets import check_target_count, resolve_target, row_scores
from ..errors import InputError, OptionError
from .base import Method, build
from .gradient import gradient_inputs, resolve_on_output

VARIANTS = ("smoothgrad", "smoothgrad_sq", "vargrad")


@register_method(
    "smoothgrad",
    family="noise",
    needs_gradients=True,
    summary="SmoothGrad: any attribution method averaged over noisy copies of the input",
    paper="Smilkov et al., 2017",
)
class SmoothGrad(Method):
    """Noise tunnel around the method ``base`` (default: signed saliency): a registered name, a
    :class:`Method` class, or a Method instance constructed on the same model (used as it is).

    Options: ``samples`` noisy copies per input, ``noise`` (std relative to the input's
    value range, >= 0), ``seed``, ``variant`` (smoothgrad / smoothgrad_sq / vargrad),
    ``base_options`` (dict of options for the base method, e.g. ``{"steps": 16}``).
    """

    default_variant = "smoothgrad"
    input_ndim = None  # any float batch (N, ...) the base method takes

    def _prepare_inputs(self, inputs: Any) -> Any:
        return gradient_inputs(self, inputs)

    def __init__(
        self,
        model: nn.Module,
        *,
        base: str | type[Method] | Method = "saliency",
        samples: int = 25,
        noise: float = 0.15,
        seed: int = 0,
        variant: str | None = None,
        base_options: dict[str, Any] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(model, **common)
        check_int("samples", samples, minimum=1)
        check_float("noise", noise, minimum=0, hint="relative to the input range")
        check_int("seed", seed)
        variant = self.default_variant if variant is None else variant
        check_choice("variant", variant, VARIANTS)
        if base_options is not None and not isinstance(base_options, dict):
            raise OptionError(
                f"base_options must be a dict of options for {base!r}; got {type(base_options).__name__}."
            )
        self.base_method, self.base = self._base_method(base, base_options)
        self.samples = samples
        self.noise = float(noise)
        self.seed = seed
        self.variant = variant

    def _base_method(self, base: Any, base_options: dict[str, Any] | None) -> tuple[Method, str]:
        """The base method (built, or the given instance) and its name."""
        if isinstance(base, Method):
            if base_options:
                raise OptionError(
                    "base_options apply to a base given by name or class; "
                    f"the {base.name!r} instance passed as base is already constructed."
                )
            if base.model is not self.model:
                raise OptionError(
                    f"the base method instance ({base.name!r}) explains another model than this one."
                )
            cls = type(base)
        elif isinstance(base, type) and issubclass(base, Method):
            cls = base
        elif isinstance(base, str):
            cls = METHODS.get(base).cls
        else:
            raise OptionError(
                "base must be a method name, a Method class or a Method instance; "
                f"got {type(base).__name__}."
            )
        if issubclass(cls, SmoothGrad):
            raise OptionError(
                f"base must be an attribution method, not another noise wrapper ({cls.name!r})."
            )
        if isinstance(base, Method):
            return base, cls.name
        opts = {"absolute": False} if cls.name == "saliency" else {}
        opts.update(base_options or {})
        for key in ("batch_size", "memory_budget", "progress", "output"):
            if key in cls.option_names():
                opts.setdefault(key, getattr(self, key))
        return build(cls, self.model, labels=self.labels, **opts), cls.name

    @property
    def options(self) -> dict[str, Any]:
        return self._options

    @options.setter
    def options(self, value: dict[str, Any]) -> None:
        # a base given as a class or an instance is recorded by name (and an instance's options
        # as base_options), so the recorded options reproduce the call and stay JSON-ready
        value = dict(value)
        base = value.get("base")
        if base is not None and not isinstance(base, str):
            value["base"] = getattr(self, "base", getattr(base, "name", str(base)))
            if isinstance(base, Method):
                value["base_options"] = dict(base.options)
        self._options = value

    def _noise(self, x: Tensor, sigma: Tensor, generator: torch.Generator) -> Tensor:
        """Noise for the ``N * samples`` copies (row ``i * samples + s`` belongs to input ``i``)."""
        shape = (len(x) * self.samples, *x.shape[1:])
        eps = torch.randn(shape, generator=generator, dtype=x.dtype)
        return eps.to(x.device) * sigma.repeat_interleave(self.samples).view(
            -1, *[1] * (x.ndim - 1)
        )

    shares_forward_across_targets = True

    def _explain(
        self, x: Tensor, target: Any, engine: Engine, targets_per_input: int = 1
    ) -> Explanation:
        if not x.is_floating_point():
            raise InputError(
                "noise tunnelling needs float inputs; for token ids use a layer method on the embedding."
            )
        takes_target = "neuron" not in type(self.base_method).option_names()
        per = targets_per_input if takes_target else 1
        # several targets per input: the same noisy copies serve all of them (row (i, t) equals a
        # single-target call on input i alone), handed to the base method as an (N*S, T) target
        xr, x = x, x[::per]
        n, S = len(x), self.samples
        flat = x.reshape(n, -1)
        sigma = self.noise * (flat.max(1).values - flat.min(1).values)
        noisy = x.repeat_interleave(S, dim=0) + self._noise(
            x, sigma, torch.Generator().manual_seed(self.seed)
        )
        tgt = None
        scores = torch.full((len(xr),), float("nan"), device=x.device)
        rows_target = target
        if takes_target and per > 1:
            check_target_count(target, n * per)
            out = engine.map(
                lambda s, e: engine.forward(x[s:e]), n, sample=x[:1], description="scores"
            )
            out = out.repeat_interleave(per, dim=0)
            tgt = resolve_target(target, out, self.labels)
            scores = row_scores(tgt, out, torch.arange(len(out), device=out.device)).detach()
            rows_target = tgt.indices.view(n, 1, per).expand(n, S, per).reshape(n * S, per)
        elif takes_target:
            check_target_count(target, n)
            tgt, scores = resolve_on_output(self, x, target, engine)
            rows_target = tgt.indices.repeat_interleave(S) if tgt.indices is not None else tgt.fn
        res = self.base_method(noisy, target=rows_target)
        a = res.attributions.reshape(n, S, per, *res.attributions.shape[1:])
        if self.variant == "smoothgrad":
            attr = a.mean(1)
        elif self.variant == "smoothgrad_sq":
            attr = (a * a).mean(1)
        else:
            attr = a.var(1, unbiased=False)
        attr = attr.reshape(n * per, *attr.shape[2:])
        if not takes_target:
            scores = res.scores.reshape(n, S).mean(1)
        prov = {
            "base": self.base,
            "variant": self.variant,
            "samples": S,
            "noise": self.noise,
            "seed": self.seed,
            "noise_sigma": sigma.tolist(),
            "forward_samples": engine.forwards + res.provenance.get("forward_samples", 0),
            "backward_samples": engine.backwards + res.provenance.get("backward_samples", 0),
            "chunk_sizes": list(engine.chunk_sizes) + list(res.provenance.get("chunk_sizes", [])),
        }
        indices = tgt.indices if tgt is not None else None
        return Explanation(
            attributions=attr.detach(),
            method=self.name,
            scores=scores,
            targets=indices,
            layer=res.layer,
            provenance=prov,
            extras={"base_provenance": dict(res.provenance)},
        )


@register_method(
    "smoothgrad_sq",
    family="noise",
    needs_gradients=True,
    summary="SmoothGrad-squared: mean of squared attributions over noisy copies",
    paper="Hooker et al., NeurIPS 2019",
)
class SmoothGradSquared(SmoothGrad):
    """SmoothGrad with ``variant="smoothgrad_sq"``: mean_s A(x + e_s)^2."""

    default_variant = "smoothgrad_sq"


@register_method(
    "vargrad",
    family="noise",
    needs_gradients=True,
    summary="VarGrad: variance of attributions over noisy copies",
    paper="Adebayo et al., 2018",
)
class VarGrad(SmoothGrad):
    """SmoothGrad with ``variant="vargrad"``: var_s A(x + e_s)."""

    default_variant = "vargrad"
