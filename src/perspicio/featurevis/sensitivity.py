"""Transform sensitivity: the target score as a function of an occluder's position, and of
the input's scale, translation and rotation.

All variants of the one input go through the batching :class:`~perspicio.core.batching.Engine`.
Geometric transforms are affine resamplings about the image centre (bilinear); pixels
that come from outside the image are filled with zeros in the model's input space, i.e.
the data-set mean colour for normalised inputs. The occluder is a square patch of the
same fill value (or any number given as ``fill``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import Engine
from ..core.guard import model_guard
from ..core.inputs import as_batch
from ..core.options import check_float, check_int
from ..core.targets import ResolvedTarget, resolve_target, row_scores
from ..errors import OptionError
from ._common import unwrap

DEFAULT_SCALES = (0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.5, 1.75, 2.0)
DEFAULT_SHIFTS = (-0.5, -0.375, -0.25, -0.125, 0.0, 0.125, 0.25, 0.375, 0.5)
DEFAULT_ANGLES = tuple(range(-180, 181, 30))


@dataclass(frozen=True)
class Curve:
    """Scores of the target along one transform: ``values`` of the parameter, ``scores``
    (target score), ``probabilities`` (softmax of the target class, class targets only)
    and ``predictions`` (arg-max class)."""

    name: str
    values: Tensor
    scores: Tensor
    probabilities: Tensor | None
    predictions: Tensor | None


@dataclass(frozen=True)
class OcclusionMap:
    """Target score with the occluder's top-left corner at ``(row * stride, col * stride)``:
    ``scores`` (rows, cols); ``placed`` (H, W) the score at each pixel averaged over the
    windows covering it; ``base`` the unoccluded score."""

    scores: Tensor
    probabilities: Tensor | None
    placed: Tensor
    base: float
    window: int
    stride: int


@dataclass(frozen=True)
class Sensitivity:
    """All sensitivity analyses of one input for one target."""

    target: str
    target_index: int | None
    base_score: float
    occlusion: OcclusionMap | None
    curves: dict[str, Curve]
    pixels: Tensor


def affine(x: Tensor, *, scale: float = 1.0, angle: float = 0.0, shift: tuple[float, float] = (0.0, 0.0)) -> Tensor:
    """Zoom by ``scale`` (>1 enlarges), rotate by ``angle`` degrees (counter-clockwise) and
    translate by ``shift`` = (dx, dy) in fractions of the width/height; zero fill."""
    n = x.shape[0]
    a = math.radians(angle)
    cos, sin = math.cos(a) / scale, math.sin(a) / scale
    # output point q samples the input at A (q - t), A = R^T / scale, t = 2 * shift (normalised units)
    a_mat = torch.tensor([[cos, sin], [-sin, cos]], dtype=x.dtype, device=x.device)
    t = torch.tensor([2 * shift[0], 2 * shift[1]], dtype=x.dtype, device=x.device)
    theta = torch.cat([a_mat, -(a_mat @ t)[:, None]], dim=1)
    grid = F.affine_grid(theta[None].expand(n, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class _Scorer:
    def __init__(self, net: torch.nn.Module, engine: Engine, tgt: ResolvedTarget) -> None:
        self.net, self.engine, self.tgt = net, engine, tgt

    def __call__(self, make: Any, n: int, sample: Tensor, description: str) -> tuple[Tensor, Tensor | None, Tensor | None]:
        parts: dict[str, list[Tensor]] = {"s": [], "p": [], "c": []}
        idx = self.tgt.indices

        def run(start: int, stop: int) -> Tensor:
            out = self.engine.forward(make(start, stop))
            s = row_scores(self.tgt, out, torch.zeros(out.shape[0], dtype=torch.long))  # copies of sample 0
            parts["s"].append(s)
            if out.ndim == 2:
                parts["c"].append(out.argmax(dim=1))
                if idx is not None:
                    parts["p"].append(out.softmax(dim=1)[:, int(idx[0])])
            return s

        self.engine.map(run, n, sample=sample, description=description)
        scores = torch.cat(parts["s"]).cpu()
        probs = torch.cat(parts["p"]).cpu() if parts["p"] else None
        preds = torch.cat(parts["c"]).cpu() if parts["c"] else None
        return scores, probs, preds


def sensitivity(
    model: Any,
    inputs: Tensor,
    target: Any = None,
    *,
    occlusion: bool = True,
    window: int | None = None,
    stride: int | None = None,
    fill: float = 0.0,
    scales: Sequence[float] = DEFAULT_SCALES,
    shifts: Sequence[float] = DEFAULT_SHIFTS,
    angles: Sequence[float] = DEFAULT_ANGLES,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> Sensitivity:
    """Target score of the first image of ``inputs`` under occlusion, scale, shift and rotation.

    ``window`` / ``stride`` of the occluder default to 1/7 and 1/14 of the image side;
    ``shifts`` are horizontal translations in fractions of the width. Pass an empty
    sequence to skip a curve, ``occlusion=False`` to skip the map.
    """
    bundle = unwrap(model)
    net = bundle.model
    x = as_batch(inputs, net)[:1]
    H, W = x.shape[-2:]
    side = min(H, W)
    window = check_int("window", window if window is not None else max(1, side // 7), minimum=1)
    stride = check_int("stride", stride if stride is not None else max(1, side // 14), minimum=1)
    if window > side:
        raise OptionError(f"window ({window}) must not exceed the image side ({side}).")
    fill = float(fill)
    scales = [check_float("scales", s, minimum=0, strict=True) for s in scales]
    shifts = [float(s) for s in shifts]
    angles = [float(a) for a in angles]
    engine = Engine(net, batch_size=batch_size, memory_budget=memory_budget, progress=progress)
    curves: dict[str, Curve] = {}
    occ = None
    with model_guard(net), torch.no_grad():
        out = engine.forward(x)
        tgt = resolve_target(target, out, bundle.labels)
        base = float(tgt(out)[0])
        score = _Scorer(net, engine, tgt)
        if occlusion:
            rows = (H - window) // stride + 1
            cols = (W - window) // stride + 1

            def occluded(start: int, stop: int) -> Tensor:
                k = torch.arange(start, stop)
                batch = x.expand(stop - start, -1, -1, -1).clone()
                for b, (r, c) in enumerate(zip((k // cols).tolist(), (k % cols).tolist())):
                    batch[b, :, r * stride:r * stride + window, c * stride:c * stride + window] = fill
                return batch

            s, p, _ = score(occluded, rows * cols, x, "occlusion")
            grid = s.view(rows, cols)
            acc = torch.zeros(H, W)
            cnt = torch.zeros(H, W)
            for r in range(rows):
                for c in range(cols):
                    acc[r * stride:r * stride + window, c * stride:c * stride + window] += grid[r, c]
                    cnt[r * stride:r * stride + window, c * stride:c * stride + window] += 1
            placed = torch.where(cnt > 0, acc / cnt.clamp_min(1), torch.full_like(acc, base))
            occ = OcclusionMap(grid, p.view(rows, cols) if p is not None else None, placed, base, window, stride)
        for name, values, make in (
            ("scale", scales, lambda v: affine(x, scale=v)),
            ("translation", shifts, lambda v: affine(x, shift=(v, 0.0))),
            ("rotation", angles, lambda v: affine(x, angle=v)),
        ):
            if not values:
                continue

            def batch(start: int, stop: int, values: list[float] = values, make: Any = make) -> Tensor:
                return torch.cat([make(v) for v in values[start:stop]])

            s, p, c = score(batch, len(values), x, name)
            curves[name] = Curve(name, torch.tensor(values), s, p, c)
    pixels = bundle.space.to_pixels(x[0]).clamp(0, 1) if bundle.preprocess is not None else x[0]
    idx = int(tgt.indices[0]) if tgt.indices is not None else None
    return Sensitivity(target=tgt.description, target_index=idx, base_score=base, occlusion=occ, curves=curves, pixels=pixels)


__all__ = ["Curve", "OcclusionMap", "Sensitivity", "affine", "sensitivity"]
