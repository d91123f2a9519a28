"""Class activation maps.

All CAMs share one pipeline, owned by :class:`CAMBase`: capture the layer's
activations ``A`` (N, K, h, w) (and their gradients ``G`` when needed) in one
forward (+ one backward) pass, combine them into a map (N, h, w), optionally
apply ReLU, upsample to the input size. A variant overrides one function:
:meth:`CAMBase.channel_weights` (map = sum_k w_k A_k),
:meth:`CAMBase.weighted_activations` (map = sum_k of an element-wise product) or
:meth:`CAMBase.combine`. The pipeline adds, for every variant, several layers fused
(``layer="layer3,layer4[-1]"`` or a list), ``eigen_smooth`` and ``aug_smooth``
(MMPretrain's vis_cam / pytorch-grad-cam options; definitions in :class:`CAMBase`).

Differences from pytorch-grad-cam, on purpose: maps are returned raw
(unnormalised) and upsampled with torch's bilinear interpolation; Score-CAM
weights follow the paper (softmax over classes of the masked input's output);
the sign of every principal-component map (Eigen-CAM, EigenGrad-CAM,
``eigen_smooth``), arbitrary in an SVD, is fixed so the map correlates positively
with the channel sum of the decomposed activations (:func:`principal_map`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..core.batching import Engine
from ..core.capture import (
    Capture,
    auto_layer,
    is_spatial,
    layer_layout,
    resolve_layer,
    resolve_layers,
    to_spatial,
    trace_layers,
)
from ..core.explanation import Explanation
from ..core.registry import register_method
from ..core.targets import BoxScoreTarget, RegionTarget, ResolvedTarget, resolve_target
from ..core.tokens import Layout, check_extra_tokens
from ..errors import LayerError, ModelError, OptionError, TargetError
from .base import Method

UPSAMPLE_MODES = ("bilinear", "bicubic", "nearest", "area")
EPS = 1e-7
#: ``aug_smooth``'s test-time augmentations: (horizontal flip?, factor multiplying the input
#: tensor), the identity first (pytorch-grad-cam's HorizontalFlip x Multiply([0.9, 1, 1.1]))
AUGMENTATIONS: tuple[tuple[bool, float], ...] = tuple(
    (flip, factor) for flip in (False, True) for factor in (1.0, 0.9, 1.1)
)


class CAMBase(Method):
    """Shared CAM pipeline; subclasses set ``uses_gradients`` and override one hook.

    Options of every CAM:

    * ``layer``: None (the automatic layer, see :func:`~perspicio.core.capture.auto_layer`), a
      module, or a name - the dotted name of ``perspicio layers`` (``"layer4.1"``,
      ``"features.8"``) or the Python expression (``"layer4[-1]"``, ``"features[8]"``,
      ``"blocks[-1].norm1"``, ``"model.layer4[-1]"``; see
      :func:`~perspicio.core.capture.resolve_layer`). Several layers - a list, or one string
      ``"layer3,layer4[-1]"`` as ``perspicio explain --layer a,b`` passes it - are fused: the
      result is the mean of the per-layer maps, each scaled to [0, 1] per sample at the input
      size; ``raw`` is then None and ``extras["layer_maps"]`` holds the per-layer raw maps.
    * ``relu``, ``upsample``.
    * ``eigen_smooth``: replace the channel sum ``sum_k W_k`` of the weighted activations
      ``W_k`` (``w_k A_k`` for channel-weight CAMs, e.g. ``g_k A_k`` for HiResCAM) by their first
      principal component, per image: the (h*w, K) matrix of ``W``, centred over the h*w
      positions, is projected on its first right-singular vector (pytorch-grad-cam's
      ``eigen_smooth``). The SVD's sign is fixed so the result correlates positively with
      ``sum_k W_k`` (:func:`principal_map`). Eigen-CAM and EigenGrad-CAM are such projections
      already: for them the option changes nothing.
    * ``aug_smooth``: test-time augmentation. The CAM is computed on six copies of the input -
      unflipped and horizontally flipped, each multiplied by 1.0, 0.9 and 1.1 (the model's input
      tensor, after its preprocessing, as pytorch-grad-cam does) - each map at the input size is
      flipped back, scaled to [0, 1] per sample, and the six are averaged. The target is
      resolved on the input as given and the same class is explained on every copy (a callable
      target scores each copy's output; region and box targets, which name positions, are
      refused). ``raw`` is None; ``extras["aug_maps"]`` holds the six un-normalised maps, flipped
      back, in the order of :data:`AUGMENTATIONS`. Costs six times the passes.
    * ``reshape`` says how the layer output is a map - ``"auto"`` (detected:
      :mod:`perspicio.core.tokens`), ``"nchw"``/``"nhwc"`` for a 4-D output, ``(h, w)`` for a
      token grid, or a callable returning (N, C, h, w); ``extra_tokens`` is the number of class,
      distillation and register tokens before a transformer's patch tokens (``"auto"``: what the
      model declares - timm's ``num_prefix_tokens``, torchvision's class token - else inferred
      from the patch embedding's grid).
    """

    uses_gradients = True

    def __init__(
        self,
        model: nn.Module,
        layer: str | nn.Module | Sequence[str | nn.Module] | None = None,
        *,
        relu: bool = True,
        upsample: str = "bilinear",
        eigen_smooth: bool = False,
        aug_smooth: bool = False,
        reshape: Any = "auto",
        extra_tokens: int | str = "auto",
        **common: Any,
    ) -> None:
        super().__init__(model, **common)
        if upsample not in UPSAMPLE_MODES:
            raise OptionError(
                f"upsample must be one of {', '.join(UPSAMPLE_MODES)}; got {upsample!r}."
            )
        for name, flag in (("eigen_smooth", eigen_smooth), ("aug_smooth", aug_smooth)):
            if not isinstance(flag, bool):
                raise OptionError(f"{name} must be True or False; got {flag!r}.")
        self.layer_spec = layer
        self.relu = bool(relu)
        self.upsample = upsample
        self.eigen_smooth = eigen_smooth
        self.aug_smooth = aug_smooth
        if not (
            callable(reshape)
            or reshape in ("auto", "nchw", "nhwc")
            or (
                isinstance(reshape, (tuple, list))
                and len(reshape) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in reshape)
            )
        ):
            raise OptionError(
                f"reshape must be 'auto', 'nchw', 'nhwc', an (h, w) token grid or a callable; "
                f"got {reshape!r}."
            )
        self.reshape = reshape
        self.extra_tokens = check_extra_tokens(extra_tokens)
        self._layers = (
            resolve_layers(self.model, layer) if layer is not None and layer != "auto" else None
        )

    # ----------------------------------------------------------------- override points
    def channel_weights(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        """Weights (N, K) of the channels; the map is relu(sum_k w_k A_k)."""
        raise NotImplementedError(
            f"{type(self).__name__} is a CAM without weights: a CAM overrides channel_weights(), "
            "weighted_activations() or combine() (docs/architecture.md, 'Add a CAM')."
        )

    def weighted_activations(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        """Weighted activations (N, K, h, w) whose channel sum is the map (``w_k A_k`` by default)."""
        return self.channel_weights(acts, grads, ctx)[:, :, None, None] * acts

    def combine(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        """Map (N, h, w) from activations (N, K, h, w) and gradients: the channel sum of the weighted
        activations, or with ``eigen_smooth`` their first principal component."""
        weighted = self.weighted_activations(acts, grads, ctx)
        return principal_map(weighted) if self.eigen_smooth else weighted.sum(dim=1)

    # ----------------------------------------------------------------- pipeline
    def layers(self, x: Tensor) -> list[tuple[str, nn.Module]]:
        if self._layers is None:
            name = auto_layer(self.model, x, extra_tokens=self.extra_tokens)
            return [resolve_layer(self.model, name)]
        return self._layers

    def _explain(
        self, x: Tensor, target: Any, engine: Engine, targets_per_input: int = 1
    ) -> Explanation:
        if not self.aug_smooth:
            return self._explain_once(x, target, engine, targets_per_input)
        if isinstance(target, (RegionTarget, BoxScoreTarget)):
            raise TargetError(
                f"aug_smooth flips the input, but a {type(target).__name__} names positions in the "
                "unflipped input: the flipped copies would explain the mirrored region. Use "
                "aug_smooth=False with this target."
            )
        base = self._explain_once(
            x, target, engine, targets_per_input
        )  # the input as given: target, scores
        same = (
            base.targets if base.targets is not None else target
        )  # the same classes on every copy
        maps = []
        for flip, factor in AUGMENTATIONS:
            if (flip, factor) == (False, 1.0):
                e = base
            else:
                xa = x.flip(-1) if flip else x
                e = self._explain_once(
                    xa * factor if factor != 1.0 else xa, same, engine, targets_per_input
                )
            maps.append(e.attributions.flip(-1) if flip else e.attributions)
        return base.replace(
            attributions=torch.stack([_minmax(m) for m in maps]).mean(0),
            raw=None,
            extras={**base.extras, "aug_maps": tuple(maps)},
        )

    def _explain_once(
        self, x: Tensor, target: Any, engine: Engine, targets_per_input: int
    ) -> Explanation:
        """The CAM of ``x`` as given (one forward, and one backward pass for gradient CAMs)."""
        layers = self.layers(x)
        modules = [m for _, m in layers]
        grad = self.uses_gradients
        with Capture(modules, grad=grad) as cap:
            if grad:
                out = engine.forward(x)
            else:
                with torch.no_grad():
                    out = engine.forward(x)
            tgt = resolve_target(target, out, self.labels)
            scores = tgt(out)
            acts_raw = [cap.last(i) for i in range(len(modules))]
            if grad:
                if not scores.requires_grad:
                    which = "the automatic CAM layer" if self._layers is None else "layer"
                    raise ModelError(
                        f"the target score does not depend on {which} {', '.join(n for n, _ in layers)!r}: "
                        "no gradient path. Pass layer=... with a layer the score is computed from "
                        "(e.g. the backbone's last block; see `perspicio layers`)."
                    )
                grads_raw = engine.grad(scores.sum(), acts_raw, len(x))
            else:
                grads_raw = [None] * len(modules)
        maps, raws = [], []
        for (name, _), a, g in zip(layers, acts_raw, grads_raw):
            if a.shape[0] != len(x):
                raise LayerError(self._batch_mismatch(name, a, x))
            try:
                layout = (
                    None
                    if callable(self.reshape)
                    else layer_layout(
                        self.model,
                        x,
                        name,
                        a.shape,
                        reshape=self.reshape,
                        extra_tokens=self.extra_tokens,
                    )
                )
                A = to_spatial(a.detach(), self.reshape, layout)
            except LayerError as exc:
                raise LayerError(
                    str(exc) if str(exc).startswith("layer ") else f"layer {name!r}: {exc}"
                ) from None
            if A.shape[-2] * A.shape[-1] < 2:
                raise LayerError(
                    f"layer {name!r} has no spatial extent (output {tuple(a.shape)}): a CAM over a "
                    "1x1 map is constant. Pick an earlier convolutional layer (see `perspicio layers`)."
                )
            G = to_spatial(g.detach(), self.reshape, layout) if g is not None else None
            ctx = _Context(
                x=x,
                target=tgt,
                output=out.detach(),
                engine=engine,
                layer=name,
                method=self,
                group=targets_per_input,
                layout=layout,
            )
            cam = self.combine(A, G, ctx)
            if self.relu:
                cam = cam.clamp_min(0)
            raws.append(cam[:, None])
            maps.append(self._upsample(cam[:, None], x.shape[-2:]))
        if len(maps) == 1:
            attributions, raw = maps[0], raws[0]
        else:  # multi-layer fusion: mean of per-sample [0, 1]-scaled maps
            attributions = torch.stack([_minmax(m) for m in maps]).mean(0)
            raw = None
        names = tuple(n for n, _ in layers)
        return Explanation(
            attributions=attributions.detach(),
            method=self.name,
            scores=scores.detach(),
            targets=tgt.indices,
            raw=raw.detach() if raw is not None else None,
            layer=names[0] if len(names) == 1 else names,
            extras={"layer_maps": tuple(r.detach() for r in raws)} if len(raws) > 1 else {},
        )

    def _batch_mismatch(self, name: str, a: Tensor, x: Tensor) -> str:
        """Message for a layer whose output does not have one row per input (per-proposal features
        of a detector's ROI head, a layer that flattens the batch): its map would not belong to any
        input. Suggests the last layer with a spatial output per input."""
        chosen = "the automatic CAM layer" if self._layers is None else "layer"
        msg = (
            f"{chosen} {name!r} outputs {a.shape[0]} rows of shape {tuple(a.shape[1:])} for {len(x)} input(s): "
            "its maps do not belong to the inputs (e.g. per-proposal features of a detector)."
        )
        try:
            infos = trace_layers(self.model, x[:1])
        except Exception:  # noqa: BLE001 - the suggestion is best-effort
            infos = []
        fits = [
            i.name
            for i in infos
            if i.shape is not None and i.shape[0] == 1 and is_spatial(i.shape) and i.calls == 1
        ]
        return msg + (
            f" Pass layer=... with one row per input, e.g. {fits[-1]!r}."
            if fits
            else " Pass layer=..."
        )

    def _upsample(self, cam: Tensor, size: torch.Size) -> Tensor:
        if tuple(cam.shape[-2:]) == tuple(size):
            return cam
        kw = {} if self.upsample in ("nearest", "area") else {"align_corners": False}
        return F.interpolate(cam, size=tuple(size), mode=self.upsample, **kw)


class _Context:
    """What a CAM variant may need besides A and G (input, target, output, engine)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)

    x: Tensor
    target: ResolvedTarget
    output: Tensor
    engine: Engine
    layer: str
    method: CAMBase
    group: int  # rows come in groups of this many copies of one input (several targets per input)
    layout: Layout | None  # how the layer output is a map (None: a callable reshape)


def _minmax(m: Tensor) -> Tensor:
    flat = m.flatten(1)
    lo, hi = flat.min(1).values, flat.max(1).values
    return (m - lo.view(-1, 1, 1, 1)) / (hi - lo).clamp_min(EPS).view(-1, 1, 1, 1)


# ============================================================================ gradient CAMs


@register_method(
    "gradcam",
    family="cam",
    needs_gradients=True,
    needs_layer=True,
    summary="Grad-CAM: channels weighted by their spatially averaged gradient",
    paper="Selvaraju et al., ICCV 2017",
)
class GradCAM(CAMBase):
    """Grad-CAM: w_k = mean_ij dS/dA_kij; map = ReLU(sum_k w_k A_k)."""

    def channel_weights(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        return grads.mean(dim=(2, 3))


@register_method(
    "gradcampp",
    family="cam",
    needs_gradients=True,
    needs_layer=True,
    summary="Grad-CAM++: positive gradients weighted by higher-order alpha coefficients",
    paper="Chattopadhyay et al., WACV 2018",
)
class GradCAMPlusPlus(CAMBase):
    """Grad-CAM++ with the exponential-score closed form of the paper (Eq. 19):
    alpha = g^2 / (2 g^2 + sum_ab A_ab g^3), w_k = sum_ij alpha_kij ReLU(g_kij)."""

    def channel_weights(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        g2 = grads.pow(2)
        g3 = g2 * grads
        denom = 2 * g2 + acts.sum(dim=(2, 3), keepdim=True) * g3
        alpha = torch.where(
            grads != 0,
            g2 / torch.where(denom != 0, denom, torch.ones_like(denom)),
            torch.zeros_like(g2),
        )
        return (alpha * grads.clamp_min(0)).sum(dim=(2, 3))


@register_method(
    "xgradcam",
    family="cam",
    needs_gradients=True,
    needs_layer=True,
    summary="XGrad-CAM: gradients weighted by normalised activations (axiom-based)",
    paper="Fu et al., BMVC 2020",
)
class XGradCAM(CAMBase):
    """XGrad-CAM: w_k = sum_ij (A_kij / sum_ij A_kij) * g_kij."""

    def channel_weights(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        total = acts.sum(dim=(2, 3), keepdim=True)
        return (grads * acts / (total + EPS)).sum(dim=(2, 3))


@register_method(
    "layercam",
    family="cam",
    needs_gradients=True,
    needs_layer=True,
    summary="LayerCAM: element-wise positive gradients times activations",
    paper="Jiang et al., IEEE TIP 2021",
)
class LayerCAM(CAMBase):
    """LayerCAM: map = ReLU(sum_k ReLU(g_k) * A_k), element-wise (no spatial averaging)."""

    def weighted_activations(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        return grads.clamp_min(0) * acts


@register_method(
    "hirescam",
    family="cam",
    needs_gradients=True,
    needs_layer=True,
    summary="HiResCAM: element-wise gradients times activations (faithful to the model)",
    paper="Draelos & Carin, 2020",
)
class HiResCAM(CAMBase):
    """HiResCAM: map = ReLU(sum_k g_k * A_k), element-wise."""

    def weighted_activations(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        return grads * acts


# ============================================================================ CAM (GAP + linear)


@register_method(
    "cam",
    family="cam",
    needs_gradients=False,
    needs_layer=True,
    summary="CAM: classifier weights of the target class over the last feature maps",
    paper="Zhou et al., CVPR 2016",
)
class CAM(CAMBase):
    """Original CAM: map = sum_k W[c, k] A_k, for models where the layer is followed by
    global average pooling and a linear classifier that produces the output.

    The linear layer is found, then verified numerically in the same forward pass
    (its input must equal the spatial mean of the layer, its output the model's).
    """

    uses_gradients = False

    def _explain(self, x: Tensor, target: Any, engine: Engine) -> Explanation:
        self._linears = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        if not self._linears:
            raise ModelError(
                "CAM needs a linear classifier after global average pooling; the model has no nn.Linear."
            )
        return super()._explain(x, target, engine)

    def channel_weights(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        fc = self._find_fc(acts, ctx)
        if ctx.target.indices is None:
            raise ModelError(
                "CAM explains a class of a linear classifier; callable targets are not supported."
            )
        return fc.weight.detach()[ctx.target.indices].to(acts.dtype)  # (N, K)

    def _find_fc(self, acts: Tensor, ctx: _Context) -> nn.Linear:
        k = acts.shape[1]
        pooled = acts.mean(dim=(2, 3))
        candidates = [m for m in self._linears if m.in_features == k]
        for fc in candidates:
            with torch.no_grad():
                logits = F.linear(pooled, fc.weight, fc.bias)
            if logits.shape == ctx.output.shape and torch.allclose(
                logits, ctx.output, rtol=1e-3, atol=1e-4 * (1 + ctx.output.abs().max().item())
            ):
                return fc
        why = (
            f"no nn.Linear takes {k} input features"
            if not candidates
            else "applying the linear layer to the spatial mean of the layer does not reproduce the model output"
        )
        raise ModelError(
            f"CAM needs layer {ctx.layer!r} to be followed by global average pooling and a linear classifier "
            f"producing the output; {why}. Use gradcam (equivalent up to a constant in that case) instead."
        )


# ============================================================================ gradient-free CAMs


@register_method(
    "eigencam",
    family="cam",
    needs_gradients=False,
    needs_layer=True,
    summary="Eigen-CAM: projection on the first principal component of the activations",
    paper="Muhammad & Yeasin, IJCNN 2020",
)
class EigenCAM(CAMBase):
    """Eigen-CAM: the first principal component of the activations, per image
    (:func:`principal_map` of ``A``). Class-agnostic; ``eigen_smooth`` changes nothing."""

    uses_gradients = False

    def combine(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        return principal_map(acts)


@register_method(
    "eigengradcam",
    family="cam",
    needs_gradients=True,
    needs_layer=True,
    summary="EigenGrad-CAM: first principal component of gradients times activations",
    paper="pytorch-grad-cam (Gildenblat et al., 2021), after Muhammad & Yeasin, IJCNN 2020",
)
class EigenGradCAM(CAMBase):
    """EigenGrad-CAM: the first principal component of the element-wise products ``g_k A_k``, per
    image (:func:`principal_map`) - Eigen-CAM made class-specific by the gradients, i.e. HiResCAM
    with ``eigen_smooth``; ``eigen_smooth`` changes nothing."""

    def combine(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        return principal_map(grads * acts)


def principal_map(weighted: Tensor) -> Tensor:
    """First principal component map (N, h, w) of ``weighted`` (N, K, h, w), per sample.

    The (h*w, K) matrix of each sample is centred over the h*w positions (each channel minus its
    spatial mean) and projected on its first right-singular vector (computed in float64). An SVD
    gives that vector only up to sign; the sign is chosen so the map correlates positively with
    the centred channel sum ``sum_k weighted_k`` (the un-smoothed map). When that correlation is
    zero to rounding (e.g. a constant channel sum), the map's entry of largest magnitude is made
    positive (the first in row-major order among entries within 1e-6 of the largest).
    """
    n, k, h, w = weighted.shape
    mat = weighted.permute(0, 2, 3, 1).reshape(n, h * w, k).double()
    mat = mat - mat.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(mat, full_matrices=False)
    proj = torch.einsum("npk,nk->np", mat, vh[:, 0, :])
    ref = weighted.sum(dim=1).reshape(n, h * w).double()
    ref = ref - ref.mean(dim=1, keepdim=True)
    corr = (proj * ref).sum(dim=1)
    tie = corr.abs() <= 1e-12 * proj.norm(dim=1) * ref.norm(dim=1)
    mag = proj.abs()
    first = (mag >= mag.amax(dim=1, keepdim=True) * (1 - 1e-6)).double().argmax(dim=1, keepdim=True)
    peak = proj.gather(1, first).squeeze(1)
    sign = torch.where(tie, torch.sign(peak), torch.sign(corr))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (proj * sign[:, None]).reshape(n, h, w).to(weighted.dtype)


def _target_groups(ctx: _Context, n: int) -> tuple[int, int, Tensor, Tensor]:
    """``(T, U, first, offsets)`` for output-only CAMs: the N rows are U inputs repeated T times
    (several class targets per input), ``first`` their first rows and ``offsets`` ``arange(T)``,
    so a pass over the U inputs can be scored for all T targets at once (T = 1 otherwise)."""
    per = (
        ctx.group if ctx.target.indices is not None and ctx.group > 1 and n % ctx.group == 0 else 1
    )
    device = ctx.x.device
    return (
        per,
        n // per,
        torch.arange(n // per, device=device) * per,
        torch.arange(per, device=device),
    )


@register_method(
    "scorecam",
    family="cam",
    needs_gradients=False,
    needs_layer=True,
    summary="Score-CAM: each channel weighted by the target score of the input masked by it",
    paper="Wang et al., CVPRW 2020",
)
class ScoreCAM(CAMBase):
    """Score-CAM: each channel, upsampled and min-max scaled to [0, 1], masks the input;
    w_k is the target's softmax probability on the masked input (``weights="probability"``,
    the paper's Algorithm 1). ``weights="channel_softmax"`` uses a softmax over
    channels of the target logits instead (pytorch-grad-cam's variant). Callable
    targets use their raw score. Constant channels share one forward pass of the
    all-zero input their (zero) masks produce."""

    uses_gradients = False
    shares_forward_across_targets = True

    def __init__(
        self, model: nn.Module, layer: Any = None, *, weights: str = "probability", **common: Any
    ) -> None:
        super().__init__(model, layer, **common)
        if weights not in ("probability", "channel_softmax"):
            raise OptionError(
                f"weights must be 'probability' or 'channel_softmax'; got {weights!r}."
            )
        self.weights = weights

    def channel_weights(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        n, k = acts.shape[:2]
        x = ctx.x
        size = tuple(x.shape[-2:])
        use_prob = self.weights == "probability" and ctx.target.indices is not None
        idx = ctx.target.indices
        # the masked inputs do not depend on the target: with several targets per input, each
        # masked copy runs once and is scored for all of them (rows u*T + t)
        per, u, first, offs = _target_groups(ctx, n)

        def score(out: Tensor, ui: Tensor) -> Tensor:
            """(b, T) scores of the outputs of masked copies of unique inputs ``ui``."""
            if idx is None:
                return ctx.target(out)[:, None]
            vals = out.softmax(dim=1) if use_prob else out
            return vals.gather(1, idx[first[ui][:, None] + offs])

        # A constant channel (after ReLU most are all zero) gives an all-zero mask, i.e. the
        # same all-zero input for every such channel and sample: one shared forward pass
        # instead of one per channel. Identical result, far fewer passes.
        acts_u = acts[first]
        flat = acts_u.flatten(2)
        const = (flat.amax(2) - flat.amin(2) == 0).flatten()  # (U*K,)
        todo = (~const).nonzero().squeeze(1)
        scores = torch.empty(u * k, per, dtype=x.dtype, device=x.device)
        if bool(const.any()):
            with torch.no_grad():
                zero_out = ctx.engine.evaluate(torch.zeros_like(x[:1]))
                zero_out = zero_out.expand(u, *zero_out.shape[1:])
                s0 = score(zero_out, torch.arange(u, device=x.device))
            scores[const] = s0[const.nonzero().squeeze(1) // k].to(x.dtype)

        def run(start: int, stop: int) -> Tensor:
            js = todo[start:stop]
            ui, ki = js // k, js % k
            # masks of this chunk only (all N*K masks at input size could take GBs)
            masks = F.interpolate(
                acts_u[ui, ki][:, None], size=size, mode="bilinear", align_corners=False
            )
            flat = masks.flatten(1)
            lo = flat.min(1).values.view(-1, 1, 1, 1)
            rng = flat.max(1).values.view(-1, 1, 1, 1) - lo
            masks = torch.where(
                rng > 0,
                (masks - lo) / torch.where(rng > 0, rng, torch.ones_like(rng)),
                torch.zeros_like(masks),
            )
            return score(ctx.engine.evaluate(x[first[ui]] * masks), ui)

        if len(todo):
            scores[todo] = ctx.engine.map(
                run, len(todo), sample=x[:1], description=f"Score-CAM {ctx.layer}"
            ).to(x.dtype)
        scores = scores.view(u, k, per).permute(0, 2, 1).reshape(n, k)
        if self.weights == "channel_softmax":
            scores = scores.softmax(dim=1)
        return scores


@register_method(
    "ablationcam",
    family="cam",
    needs_gradients=False,
    needs_layer=True,
    summary="Ablation-CAM: each channel weighted by the score drop when it is zeroed",
    paper="Desai & Ramaswamy, WACV 2020",
)
class AblationCAM(CAMBase):
    """Ablation-CAM: w_k = (y - y_k) / y, where y_k is the target score with channel k of
    the layer set to zero.

    Fast path: the network up to the layer runs once per chunk on the single input, and
    the layer's output is expanded there into the chunk's ablated copies, so only the
    part after the layer runs at the chunk's batch size. It is used after checking, with
    one forward pass, that the rest of the model treats the expanded batch row by row
    (same output for unablated copies); otherwise every copy runs the whole model.
    """

    uses_gradients = False
    shares_forward_across_targets = True

    def channel_weights(self, acts: Tensor, grads: Tensor | None, ctx: _Context) -> Tensor:
        n, k = acts.shape[:2]
        x = ctx.x
        module = dict(self.model.named_modules())[ctx.layer]
        base = ctx.target(ctx.output)  # (N,)
        idx = ctx.target.indices

        def ablate(t: Tensor, ki: Tensor | None, copies: int | None) -> Tensor:
            if copies is not None and t.shape[0] == 1:
                t = t.expand(copies, *t.shape[1:])
            t = t.clone()
            if ki is not None:
                rows = torch.arange(len(ki), device=t.device)
                if t.ndim == 3:  # (N, tokens, C): zero channel k on every token
                    t[rows, :, ki] = 0
                elif ctx.layout is not None and ctx.layout.kind == "nhwc":
                    t[rows, :, :, ki] = 0
                else:
                    t[rows, ki] = 0
            return t

        def expanded(i: int, ki: Tensor | None, copies: int) -> Tensor:
            """Sample i through the model, its layer output expanded into ``copies`` rows."""
            with Capture([module], transform=lambda _, t: ablate(t, ki, copies), store=False):
                return ctx.engine.forward(x[i : i + 1], count=copies)

        # the ablated copies do not depend on the target: with several targets per input each
        # copy runs once and is scored for all of them (rows u*T + t)
        per, u, first, offs = _target_groups(ctx, n)

        def score(out: Tensor, ui: Tensor) -> Tensor:
            """(b, T) scores of the ablated copies of unique inputs ``ui``."""
            if idx is not None:
                return out.gather(1, idx[first[ui][:, None] + offs])
            return ctx.target(out)[:, None]

        if self._expandable(expanded, ctx.output[:1]):
            parts = []
            for i in range(u):
                ui = torch.full((k,), i, dtype=torch.long, device=x.device)

                def run(start: int, stop: int, i: int = i, ui: Tensor = ui) -> Tensor:
                    ki = torch.arange(start, stop, device=x.device)
                    return score(expanded(int(first[i]), ki, stop - start), ui[start:stop])

                parts.append(
                    ctx.engine.map(run, k, sample=x[:1], description=f"Ablation-CAM {ctx.layer}")
                )
            ablated = torch.stack(parts)  # (U, K, T)
        else:

            def run(start: int, stop: int) -> Tensor:
                js = torch.arange(start, stop, device=x.device)
                ui, ki = js // k, js % k
                with Capture([module], transform=lambda _, t: ablate(t, ki, None), store=False):
                    out = ctx.engine.forward(x[first[ui]])
                return score(out, ui)

            ablated = ctx.engine.map(
                run, u * k, sample=x[:1], description=f"Ablation-CAM {ctx.layer}"
            ).view(u, k, per)
        ablated = ablated.permute(0, 2, 1).reshape(n, k)
        denom = torch.where(base.abs() > EPS, base, torch.full_like(base, EPS))
        return (base[:, None] - ablated) / denom[:, None]

    @staticmethod
    def _expandable(expanded: Any, reference: Tensor) -> bool:
        """Does the model give ``reference`` (sample 0's output) on each row when the
        layer's output is expanded into two unablated copies?"""
        try:
            with torch.no_grad():
                out = expanded(0, None, 2)
        except RuntimeError:
            return False
        if not isinstance(out, Tensor) or out.shape != (2, *reference.shape[1:]):
            return False
        scale = reference.abs().max().item() + 1e-12
        return bool(torch.allclose(out, reference.expand_as(out), rtol=1e-4, atol=1e-5 * scale))
