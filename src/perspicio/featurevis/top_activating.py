"""Top-activating examples and patches of a unit, over a data set streamed in batches.

The scan keeps only the running top-k (values, data-set indices, positions and the k
input images): memory does not grow with the data set. The network runs only up to
the layer (the forward pass is stopped by the capture hook right after it). Each
winner's patch is the receptive field of its best position, computed from the layers
(:mod:`.receptive_field`).

Ranking: by value, descending; ties go to the earlier item in the data set, so the
result equals a full in-memory stable sort for any batch size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..core.batching import Engine
from ..core.guard import model_guard
from ..core.options import check_choice, check_int
from ..errors import InputError, LayerError
from ._common import LayerGrab, Unit, check_unit, parse_unit, resolve, unwrap
from ._data import scan
from .receptive_field import ReceptiveField, receptive_field

REDUCTIONS = ("max", "mean")


@dataclass(frozen=True)
class TopActivating:
    """The top-k items of a scan for one unit.

    ``values`` (k,) activations (largest first); ``indices`` (k,) positions in the data
    set; ``positions`` (k, 2) grid cell of the best activation (None for non-spatial
    layers); ``inputs`` (k, C, H, W) the model inputs; ``pixels`` the same in [0, 1] for
    display; ``patches`` the receptive-field crops of ``pixels``; ``boxes`` their
    (top, left, bottom, right); ``sources`` file names (folders) or indices;
    ``skipped`` (source, reason) of files that could not be read; ``scanned`` the number
    of items scanned.
    """

    layer: str
    unit: Unit
    values: Tensor
    indices: Tensor
    positions: Tensor | None
    inputs: Tensor
    pixels: Tensor
    patches: list[Tensor]
    boxes: list[tuple[int, int, int, int]]
    sources: list[str]
    skipped: list[tuple[str, str]]
    scanned: int
    field: ReceptiveField | None
    stats: dict[str, Any] = field(default_factory=dict)


class _Running:
    """Running top-k with stable tie-breaking by data-set order."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.values: Tensor | None = None
        self.indices: Tensor | None = None
        self.positions: Tensor | None = None
        self.inputs: Tensor | None = None

    def update(self, values: Tensor, indices: Tensor, positions: Tensor, inputs: Tensor) -> None:
        values = values.detach().float().cpu()
        keep = ~torch.isnan(values)
        if not bool(keep.all()):
            values, indices, positions, inputs = values[keep], indices[keep], positions[keep], inputs[keep]
        if len(values) > self.k:  # preselect inside the batch (stable), then merge
            order = torch.sort(values, descending=True, stable=True).indices[: self.k]
            order = torch.sort(order).values  # keep data-set order for the stable merge
            values, indices, positions, inputs = values[order], indices[order], positions[order], inputs[order.to(inputs.device)]
        if self.values is None:
            cat_v, cat_i, cat_p, cat_x = values, indices, positions, inputs.detach().clone()
        else:
            cat_v = torch.cat([self.values, values])
            cat_i = torch.cat([self.indices, indices])
            cat_p = torch.cat([self.positions, positions])
            cat_x = torch.cat([self.inputs, inputs.detach()])
        order = torch.sort(cat_v, descending=True, stable=True).indices[: self.k]
        self.values, self.indices, self.positions = cat_v[order], cat_i[order], cat_p[order]
        self.inputs = cat_x[order.to(cat_x.device)]


def top_activating(
    model: Any,
    data: Any,
    layer: Any,
    unit: int | Sequence[int] | Unit,
    *,
    k: int = 9,
    reduce: str = "max",
    preprocess: Callable[[Any], Tensor] | None = None,
    batch_size: int | None = None,
    memory_budget: int | None = None,
    progress: bool = False,
) -> TopActivating:
    """Scan ``data`` for the ``k`` items that activate ``unit`` of ``layer`` most.

    Args:
        model: ``nn.Module`` or zoo model (its ``preprocess`` is used for folders).
        data: a folder of images (str/Path; unreadable and non-image files are skipped and
            reported), a tensor (N, C, H, W), or an iterable/DataLoader of batches.
        unit: a channel index, or (channel, row, col) for one neuron.
        reduce: for a channel of a spatial layer, rank images by the "max" (default) or
            "mean" of the channel; the patch is taken at the argmax either way.
        batch_size / memory_budget / progress: as for every method (one :class:`Engine`).
    """
    bundle = unwrap(model)
    net = bundle.model
    name, module = resolve(net, layer)
    u = parse_unit(unit)
    k = check_int("k", k, minimum=1)
    check_choice("reduce", reduce, REDUCTIONS)
    engine = Engine(net, batch_size=batch_size, memory_budget=memory_budget, progress=progress)
    running = _Running(k)
    checked = [False]

    grab = LayerGrab([module], stop_after=module)
    with model_guard(net), torch.no_grad():

        def score(x: Tensor, y: Tensor | None, offset: int) -> None:
            with grab:  # hooks only around our forward (the engine's memory probe runs unhooked)
                grab.run(engine.forward, x)
            act = grab.get(0, [name])
            if not checked[0]:
                check_unit(u, act, name)
                checked[0] = True
            n = x.shape[0]
            idx = torch.arange(offset, offset + n)
            if u.position is not None:
                i, j = u.position
                vals = act[:, u.channel, i, j]
                pos = torch.tensor([[i, j]] * n, dtype=torch.long)
            elif act.ndim == 4:
                flat = act[:, u.channel].flatten(1)
                best = flat.argmax(dim=1)
                vals = flat.gather(1, best[:, None])[:, 0] if reduce == "max" else flat.mean(dim=1)
                w = act.shape[3]
                pos = torch.stack([best // w, best % w], dim=1).cpu()
            else:
                vals = act[:, u.channel].reshape(n, -1).amax(dim=1) if act.ndim > 2 else act[:, u.channel]
                pos = torch.full((n, 2), -1, dtype=torch.long)
            running.update(vals, idx, pos, x)

        report = scan(bundle, data, engine, score, preprocess=preprocess, description=f"scanning {name}")

    if running.values is None or len(running.values) == 0:
        raise InputError("no activations were collected (every item was skipped or non-finite).")
    spatial = bool((running.positions >= 0).all())
    field_: ReceptiveField | None = None
    if spatial:
        try:
            field_ = receptive_field(net, name, report.shape)
        except LayerError:
            field_ = None
    inputs = running.inputs
    pixels = bundle.space.to_pixels(inputs).clamp(0, 1) if bundle.preprocess is not None else inputs
    patches, boxes = [], []
    H, W = inputs.shape[-2:]
    for n, pos in enumerate(running.positions.tolist()):
        box = field_.box(pos[0], pos[1]) if field_ is not None else (0, 0, H, W)
        boxes.append(tuple(int(b) for b in box))
        patches.append(pixels[n, :, box[0]:box[2], box[1]:box[3]].clone())
    ids = running.indices.tolist()
    src = [report.sources[i] for i in ids] if report.sources is not None else [str(i) for i in ids]
    return TopActivating(
        layer=name, unit=u, values=running.values, indices=running.indices,
        positions=running.positions if spatial else None, inputs=inputs, pixels=pixels, patches=patches,
        boxes=boxes, sources=src, skipped=report.skipped, scanned=report.scanned, field=field_, stats=engine.stats(),
    )


__all__ = ["TopActivating", "top_activating"]
