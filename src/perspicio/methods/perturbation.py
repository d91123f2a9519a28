"""Model-agnostic perturbation methods: occlusion, feature ablation, RISE.

They need only model outputs, so they accept any ``nn.Module`` and any black-box
callable (see :mod:`perspicio.core.blackbox`). Masked copies of the input go through
the one batching engine (chunked under ``batch_size`` / the memory budget, counted
in the provenance). :class:`FeatureMethod` is the shared base of every method that
plays the masked-model game over features (feature ablation, Shapley estimators,
LIME): it picks the masker from the input (image, tabular, other tensor, text),
resolves the target once, and lets a subclass override one function,
:meth:`FeatureMethod.solve`.

Attribution layout: ``.attributions`` has the input's shape; each element carries the
value of the feature it belongs to (Captum's convention), so per-feature values
(``extras["values"]``, one (M,) tensor per sample) are what sum to f(x) - base_value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batching import Engine
from ..core.explanation import Explanation
from ..core.incremental import box_batch
from ..core.inputs import as_batch
from ..core.maskers import (
    ImageMasker,
    MaskedGame,
    TabularMasker,
    TensorMasker,
    TextMasker,
    constant_baseline,
    image_baseline,
)
from ..core.options import check_float, check_int
from ..core.registry import register_method
from ..core.targets import ResolvedTarget, resolve_target
from ..errors import InputError, OptionError
from .base import Method


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(int(seed))


def sample_score(tgt: ResolvedTarget, n: int) -> Callable[[Tensor], Tensor]:
    """Score of sample ``n``'s target on a batch of outputs for perturbed copies of sample ``n``."""
    if tgt.indices is not None:
        c = int(tgt.indices[n])
        return lambda out: out.reshape(out.shape[0], -1)[:, c]
    return tgt.fn


def first_forward(x: Any, target: Any, engine: Engine, labels: Sequence[str] | None) -> tuple[Tensor, ResolvedTarget, Tensor]:
    """The model output on the inputs, the resolved target and its scores (no gradients)."""
    with torch.no_grad():
        out = engine.evaluate(x)
    tgt = resolve_target(target, out, labels)
    return out, tgt, tgt(out).detach()


# ============================================================================ masker-driven methods


@dataclass
class FeatureResult:
    """What a solver returns for one sample: per-feature values and optional extras."""

    values: Tensor  # (M,) float64
    base_value: float | None = None
    stderr: Tensor | None = None
    extras: dict[str, Any] = field(default_factory=dict)


class FeatureMethod(Method):
    """Base of methods over features of a masker (ablation, Shapley values, LIME).

    Shared options (the same names in every method of this family):
        feature_mask: integer ids grouping input elements into features, shape of one sample or
            broadcastable (images: (H, W)); or for images a spec string ``"slic:50"``, ``"quickshift"``,
            ``"felzenszwalb"``, ``"patch:16"``, ``"grid:4"``, ``"pixel"``; or for tabular a mapping
            ``{group name: [columns]}``. Default: one feature per column (tabular), per element
            (other tensors), :attr:`default_image_features` for images.
        baseline: what removed features become without a background: images a name of
            :mod:`perspicio.core.baselines` (``"zero"``, ``"mean"``, ``"blur[:sigma]"``, ...), a number or
            a tensor; others a number or a tensor (default 0).
        background: (K, *sample shape) reference rows; removed features take each row's values and
            the game averages over them (interventional). ``background_size`` caps K (seeded subsample).
        feature_names: names of the features (tabular columns).
        tokenizer, mask_token: for text inputs (str or list of str): ``tokenizer(text) -> tokens``
            (default whitespace split); removed tokens become ``mask_token`` or are deleted if None.
        budget: number of masked-model evaluations (coalitions) the method may spend.
        seed: seed of the local random generator (runs are bit-reproducible).
    """

    input_ndim = None
    default_image_features = "slic:50"

    def __init__(
        self,
        model: nn.Module,
        *,
        feature_mask: Any = None,
        baseline: Any = None,
        background: Any = None,
        background_size: int | None = 100,
        feature_names: Sequence[str] | None = None,
        tokenizer: Callable[[str], Sequence[str]] | None = None,
        mask_token: str | None = "[MASK]",
        budget: int | None = None,
        seed: int = 0,
        **common: Any,
    ) -> None:
        super().__init__(model, **common)
        self.feature_mask = feature_mask
        self.baseline = baseline
        self.background = background
        self.background_size = check_int("background_size", background_size, minimum=1, allow_none=True)
        self.feature_names = list(feature_names) if feature_names is not None else None
        self.tokenizer = tokenizer
        self.mask_token = mask_token
        self.budget = check_int("budget", budget, minimum=1, allow_none=True)
        self.seed = check_int("seed", seed, minimum=0)
        if background is not None and baseline is not None:
            raise OptionError("pass either background (reference rows) or baseline (one replacement), not both.")
        if tokenizer is not None and not callable(tokenizer):
            raise OptionError(f"tokenizer must be a callable str -> list[str]; got {type(tokenizer).__name__}.")

    # ----------------------------------------------------------------- override point
    def solve(self, game: MaskedGame, generator: torch.Generator) -> FeatureResult:
        """Per-feature values of one sample's game."""
        raise NotImplementedError  # abstract: every registered subclass overrides it

    # ----------------------------------------------------------------- pipeline
    def _prepare_inputs(self, inputs: Any) -> Any:
        if isinstance(inputs, str):
            return [inputs]
        if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(s, str) for s in inputs):
            return list(inputs)
        self._columns = None
        if hasattr(inputs, "columns") and hasattr(inputs, "to_numpy"):  # pandas DataFrame: names for this call
            self._columns = [str(c) for c in inputs.columns]
            inputs = inputs.to_numpy()
        x = as_batch(inputs, self.model, ndim=None)
        if x.ndim == 1:
            raise InputError(f"inputs must have a batch dimension: (N, features) for tabular data; got shape "
                             f"{tuple(x.shape)}. Use x[None] for one row.")
        return x

    def masker_for(self, x: Tensor | list[str]) -> Any:
        """The masker implied by the inputs and the shared options."""
        if isinstance(x, list):
            return TextMasker(self.tokenizer, self.mask_token)
        sample_shape = tuple(x.shape[1:])
        names = self.feature_names if self.feature_names is not None else getattr(self, "_columns", None)
        background = None
        if self.background is not None:
            from ..core.maskers import as_background

            if x.ndim == 2:
                return TabularMasker(self.background, self.feature_mask, n_columns=x.shape[1],
                                     feature_names=names, background_size=self.background_size, seed=self.seed)
            bg = self.background
            bg = torch.as_tensor(np.asarray(bg)) if not isinstance(bg, Tensor) else bg
            if tuple(bg.shape[1:]) != sample_shape:
                raise OptionError(f"background must have shape (K, {', '.join(map(str, sample_shape))}); "
                                  f"got {tuple(bg.shape)}.")
            background = as_background(bg.reshape(bg.shape[0], -1), int(np.prod(sample_shape)),
                                       background_size=self.background_size, seed=self.seed)
            background = background.reshape(-1, *sample_shape)
        if x.ndim == 2:
            return TabularMasker(None, self.feature_mask, n_columns=x.shape[1], feature_names=names,
                                 baseline=self.baseline)
        if x.ndim == 4 and background is None:
            features = self.feature_mask if self.feature_mask is not None else self.default_image_features
            return ImageMasker(features, self.baseline if self.baseline is not None else "zero")
        if isinstance(self.feature_mask, str):
            raise OptionError(f"feature_mask={self.feature_mask!r} is an image spec; inputs of shape {tuple(x.shape)} "
                              "need an integer feature_mask.")
        return TensorMasker(self.feature_mask, self.baseline, background, feature_names=names)

    def _explain(self, x: Any, target: Any, engine: Engine) -> Explanation:
        _, tgt, scores = first_forward(x, target, engine, self.labels)
        masker = self.masker_for(x)
        text = isinstance(x, list)
        n = len(x)
        attrs, values, stderrs, bases, masks, names, fvals, sample_extras = [], [], [], [], [], [], [], []
        evaluations = 0
        dev = x.device if isinstance(x, Tensor) else torch.device("cpu")
        for i in range(n):
            bound = masker.bind(x[i], i)
            game = MaskedGame(bound, engine, sample_score(tgt, i), description=f"{self.name} [{i + 1}/{n}]")
            gen = make_generator(self.seed * 1_000_003 + i, dev)
            res = self.solve(game, gen)
            evaluations += game.evaluations
            attrs.append(bound.scatter(res.values.to(dev)))
            values.append(res.values)
            stderrs.append(res.stderr)
            bases.append(res.base_value)
            masks.append(bound.feature_mask)
            names.append(tuple(bound.feature_names) if bound.feature_names is not None else None)
            fvals.append(bound.feature_values)
            sample_extras.append(res.extras)
        if text:
            width = max(a.shape[0] for a in attrs)
            attributions = torch.zeros(n, width, dtype=torch.float64)
            for i, a in enumerate(attrs):
                attributions[i, : a.shape[0]] = a
        else:
            attributions = torch.stack(attrs)
        extras: dict[str, Any] = {"values": tuple(values), "feature_names": tuple(names)}
        if any(s is not None for s in stderrs):
            extras["stderr"] = tuple(stderrs)
        if not text:
            extras["feature_masks"] = tuple(masks)
            if all(v is not None for v in fvals):
                extras["feature_values"] = tuple(fvals)
        else:
            extras["texts"] = tuple(x)
            extras["tokens"] = names
        for key in sample_extras[0] if sample_extras else ():
            extras[key] = tuple(e[key] for e in sample_extras)
        base_value = None
        provenance: dict[str, Any] = {"evaluations": evaluations}
        if all(b is not None for b in bases):
            base_value = torch.tensor(bases, dtype=torch.float64)
            total = torch.stack([v.sum() for v in values])
            provenance["efficiency_error"] = float((total - (scores.cpu().double() - base_value)).abs().max())
        return Explanation(
            attributions=attributions.detach(),
            method=self.name,
            scores=scores,
            targets=tgt.indices,
            base_value=base_value,
            extras=extras,
            provenance=provenance,
        )


@register_method("feature_ablation", family="perturbation", model_agnostic=True,
                 summary="Feature ablation: score drop when each feature (group) is replaced by the baseline/background",
                 paper="Zeiler & Fergus, ECCV 2014 (occlusion by feature groups)")
class FeatureAblation(FeatureMethod):
    """phi_i = v(all) - v(all without i): the target's drop when feature i alone is removed.

    With a background set, v averages over its rows (interventional). Costs M + 1 evaluations.
    """

    default_image_features = "patch:16"

    def solve(self, game: MaskedGame, generator: torch.Generator) -> FeatureResult:
        m = game.n_features
        z = torch.ones(m + 1, m, dtype=torch.bool)
        z[1:] = ~torch.eye(m, dtype=torch.bool)
        if self.budget is not None and self.budget < m + 1:
            raise OptionError(f"budget={self.budget} is below what feature_ablation needs: M + 1 = {m + 1} "
                              f"evaluations for {m} features.")
        v = game(z)
        return FeatureResult(values=v[0] - v[1:])


# ============================================================================ occlusion


def _window_shape(spec: Any, shape: Sequence[int], name: str) -> tuple[int, ...]:
    """int -> full extent on the leading (channel) dim, the int on the others; tuple -> trailing dims."""
    shape = tuple(shape)
    nd = len(shape)
    if isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        k = nd - 1 if nd >= 2 else nd
        spec = (int(spec),) * k
    if not isinstance(spec, (tuple, list)) or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in spec):
        raise OptionError(f"{name} must be an int or a tuple of ints; got {spec!r}.")
    spec = tuple(int(v) for v in spec)
    if len(spec) > nd:
        raise OptionError(f"{name}={spec} has more dimensions than one input sample {shape}.")
    return shape[: nd - len(spec)] + spec


@register_method("occlusion", family="perturbation", model_agnostic=True,
                 summary="Occlusion: score drop under a sliding window of baseline values, averaged over overlaps",
                 paper="Zeiler & Fergus, ECCV 2014")
class Occlusion(Method):
    """Slide a ``window`` with ``stride`` over each sample (windows are clipped at the far border
    so every element is covered); each element gets the mean over the windows covering it of
    f(x) - f(x with the window set to ``baseline``). Matches Captum's Occlusion.

    ``window``/``stride``: an int applies to all dims but the first (channels) for inputs with 2+
    dims per sample; a tuple gives the trailing dims. Default window: 1/8 of the spatial size for
    images (stride half the window), 1 otherwise. ``baseline``: 0 by default; for images also
    a name of :mod:`perspicio.core.baselines` (``"mean"``, ``"blur"``, ...); or a tensor broadcastable to a sample.
    """

    input_ndim = None

    def __init__(self, model: nn.Module, *, window: Any = None, stride: Any = None, baseline: Any = None,
                 **common: Any) -> None:
        super().__init__(model, **common)
        for name, v in (("window", window), ("stride", stride)):
            if v is not None:
                _window_shape(v, (1 << 30,) * 8, name)  # type check only
                if any(int(a) < 1 for a in ([v] if isinstance(v, (int, np.integer)) else v)):
                    raise OptionError(f"{name} must be positive; got {v!r}.")
        self.window = window
        self.stride = stride
        self.baseline = baseline

    def _prepare_inputs(self, inputs: Any) -> Tensor:
        x = as_batch(inputs, self.model, ndim=None)
        if x.ndim < 2:
            raise InputError(f"inputs must have a batch dimension; got shape {tuple(x.shape)}.")
        return x

    def windows(self, shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...], list[tuple[slice, ...]]]:
        shape = tuple(shape)
        if self.window is None:
            if len(shape) == 3:
                side = max(1, min(shape[1:]) // 8)
                window = (shape[0], side, side)
            else:
                window = shape[:-1] + (1,) if len(shape) >= 2 else (1,)
        else:
            window = _window_shape(self.window, shape, "window")
        if self.stride is None:
            stride = tuple(max(1, w // 2) if (len(shape) == 3 and self.window is None) else 1 for w in window)
            stride = tuple(s if w < d else 1 for s, w, d in zip(stride, window, shape))
        else:
            stride = _window_shape(self.stride, shape, "stride")
        for w, s, d in zip(window, stride, shape):
            if w > d:
                raise OptionError(f"window {window} is larger than the input sample {shape}.")
            if s > w and w < d:
                raise OptionError(f"stride {stride} is larger than window {window}: some elements would never be "
                                  "occluded.")
        starts = [[i * s for i in range(math.ceil((d - w) / s) + 1)] for d, w, s in zip(shape, window, stride)]
        grids = torch.cartesian_prod(*[torch.tensor(s) for s in starts]) if len(starts) > 1 else torch.tensor(starts[0])[:, None]
        slices = [tuple(slice(int(a), min(int(a) + w, d)) for a, w, d in zip(pos, window, shape)) for pos in grids]
        return window, stride, slices

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        _, tgt, scores = first_forward(x, target, engine, self.labels)
        window, stride, slices = self.windows(x.shape[1:])
        attributions = torch.zeros_like(x)
        for i in range(len(x)):
            xi = x[i]
            if xi.ndim == 3 and (self.baseline is None or isinstance(self.baseline, str)):
                base = image_baseline(xi, self.baseline)
            else:
                base = constant_baseline(self.baseline if self.baseline is not None else 0.0, xi)
            score = sample_score(tgt, i)

            def run(start: int, stop: int, xi: Tensor = xi, base: Tensor = base, score: Any = score) -> Tensor:
                if xi.ndim == 3:  # an image: only the window and its halo change in the early layers
                    def fill(j: int, crop: Tensor, top: int, left: int, start: int = start, base: Tensor = base) -> None:
                        sl = slices[start + j]
                        local = (sl[0], slice(sl[1].start - top, sl[1].stop - top),
                                 slice(sl[2].start - left, sl[2].stop - left))
                        crop[local] = base[sl]

                    boxes = [(sl[1].start, sl[2].start, sl[1].stop - sl[1].start, sl[2].stop - sl[2].start)
                             for sl in slices[start:stop]]
                    rows, cols, data = box_batch(xi, boxes, fill)
                    return score(engine.evaluate_boxes(xi, data, rows, cols))
                batch = xi.expand(stop - start, *xi.shape).clone()
                for j, sl in enumerate(slices[start:stop]):
                    batch[(j, *sl)] = base[sl]
                return score(engine.evaluate(batch))

            occluded = engine.map(run, len(slices), sample=x[:1], description=f"occlusion [{i + 1}/{len(x)}]",
                                  local=xi.ndim == 3)
            diff = (scores[i] - occluded).to(x.dtype)
            total = torch.zeros_like(xi)
            count = torch.zeros_like(xi)
            for d, sl in zip(diff, slices):
                total[sl] += d
                count[sl] += 1
            attributions[i] = total / count.clamp_min(1)
        return Explanation(
            attributions=attributions, method=self.name, scores=scores, targets=tgt.indices,
            provenance={"evaluations": len(slices) * len(x), "window": window, "stride": stride},
        )


# ============================================================================ RISE


@register_method("rise", family="perturbation", model_agnostic=True,
                 summary="RISE: saliency as the score-weighted mean of random smooth masks",
                 paper="Petsiuk et al., BMVC 2018")
class RISE(Method):
    """S = 1 / (budget * p) * sum_i f(x * M_i + baseline * (1 - M_i)) M_i.

    Each mask M_i is a random ``cells`` x ``cells`` binary grid (cells kept with probability ``p``),
    bilinearly upsampled to (cells + 1) x the cell size and cropped at a random shift, so masks are
    smooth and not aligned to the grid. Masks are drawn on the model's device from a local generator
    seeded with ``seed``; ``budget`` is the number of masks (model evaluations). Images only.
    Returns the map broadcast over channels, shape (N, C, H, W).
    """

    input_ndim = 4

    def __init__(self, model: nn.Module, *, budget: int = 1000, cells: int = 7, p: float = 0.5,
                 baseline: Any = None, seed: int = 0, **common: Any) -> None:
        super().__init__(model, **common)
        self.budget = check_int("budget", budget, minimum=1)
        self.cells = check_int("cells", cells, minimum=1)
        check_float("p", p, minimum=0, maximum=1, strict=True, hint="probability of keeping a cell")
        self.p = float(p)
        self.baseline = baseline
        self.seed = check_int("seed", seed, minimum=0)

    def masks(self, start: int, stop: int, grids: Tensor, shifts: Tensor, size: tuple[int, int]) -> Tensor:
        """Smooth masks (stop - start, 1, H, W) from the pre-drawn grids and shifts."""
        h, w = size
        ch, cw = math.ceil(h / self.cells), math.ceil(w / self.cells)
        up = F.interpolate(grids[start:stop, None], size=((self.cells + 1) * ch, (self.cells + 1) * cw),
                           mode="bilinear", align_corners=False)
        rows = shifts[start:stop, 0, None] + torch.arange(h, device=up.device)[None]  # (B, H)
        cols = shifts[start:stop, 1, None] + torch.arange(w, device=up.device)[None]  # (B, W)
        b = torch.arange(stop - start, device=up.device)[:, None, None]
        return up[b, 0, rows[:, :, None], cols[:, None, :]][:, None]

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        _, tgt, scores = first_forward(x, target, engine, self.labels)
        n, _, h, w = x.shape
        ch, cw = math.ceil(h / self.cells), math.ceil(w / self.cells)
        saliency = torch.zeros(n, 1, h, w, dtype=torch.float64, device=x.device)
        for i in range(n):
            gen = make_generator(self.seed * 1_000_003 + i, x.device)
            grids = (torch.rand(self.budget, self.cells, self.cells, generator=gen, device=x.device) < self.p).to(x.dtype)
            shifts = torch.stack([
                torch.randint(0, ch, (self.budget,), generator=gen, device=x.device),
                torch.randint(0, cw, (self.budget,), generator=gen, device=x.device),
            ], dim=1)
            xi = x[i]
            base = image_baseline(xi, self.baseline)
            score = sample_score(tgt, i)
            acc = saliency[i]

            def run(start: int, stop: int, xi: Tensor = xi, base: Tensor = base, score: Any = score,
                    acc: Tensor = acc, grids: Tensor = grids, shifts: Tensor = shifts) -> Tensor:
                m = self.masks(start, stop, grids, shifts, (h, w))
                s = score(engine.evaluate(base + (xi - base) * m))
                acc += torch.einsum("b,bchw->chw", s.double(), m.double())
                return s

            engine.map(run, self.budget, sample=x[:1], description=f"RISE [{i + 1}/{n}]")
        saliency /= self.budget * self.p
        attributions = saliency.to(x.dtype).expand(-1, x.shape[1], -1, -1).clone()
        return Explanation(
            attributions=attributions, method=self.name, scores=scores, targets=tgt.indices,
            raw=saliency.to(x.dtype),
            provenance={"evaluations": self.budget * n},
        )
