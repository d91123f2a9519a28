"""Grid pointing game on real photos: a localization benchmark that needs no annotation.

Four photos the bundled model classifies confidently are tiled into a 2 x 2 grid
(448 x 448, so each cell is a 224 x 224 photo as the model was trained on), in
every cell order (4! = 24 grids). For each cell's class, the explanation should
put its positive relevance in that cell: the score is the fraction of positive
attribution inside the cell (energy-based pointing game with the cell as the box;
chance is 0.25). The plain pointing-game hit (maximum inside the cell) is reported
too. Method calls go through the batching engine in chunks.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import Engine
from ..errors import InputError, OptionError
from .base import relevance_map
from .localization import cell_energy

#: photos tried, in order; the first four above the confidence threshold are used
CANDIDATES = ("chelsea", "coffee", "camera", "motorcycle_left", "rocket", "astronaut")
DEFAULT_THRESHOLD = 0.4


@dataclass
class PointingGameResult:
    """Per-method scores of the grid pointing game."""

    photos: list[dict[str, Any]]
    size: int
    grids: int
    scores: dict[str, Tensor] = field(default_factory=dict)  # method -> (grids, 4) energy share
    hits: dict[str, Tensor] = field(default_factory=dict)  # method -> (grids, 4) max-in-cell
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def records(self) -> list[dict[str, Any]]:
        """One row per method, best mean energy first."""
        rows = []
        for m, s in self.scores.items():
            row: dict[str, Any] = {"method": m, "energy": float(s.mean()), "hit": float(self.hits[m].mean())}
            for j, p in enumerate(self.photos):
                row[p["name"]] = float(s[:, j].mean())
            row["seconds"] = self.seconds.get(m, math.nan)
            rows.append(row)
        return sorted(rows, key=lambda r: -r["energy"])

    def table(self) -> str:
        names = [p["name"] for p in self.photos]
        head = ["method", "energy (mean)", "hit rate"] + names + ["seconds"]
        rows = [head]
        for r in self.records():
            rows.append([r["method"], f"{r['energy']:.3f}", f"{r['hit']:.3f}"] + [f"{r[n]:.3f}" for n in names]
                        + [f"{r['seconds']:.1f}"])
        for m, msg in self.errors.items():
            rows.append([m, "error: " + msg[:60]] + [""] * (len(head) - 2))
        widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "grid pointing game",
            "size": self.size,
            "grids": self.grids,
            "chance": 0.25,
            "photos": self.photos,
            "table": self.records(),
            "per_grid": {m: {"energy": s.tolist(), "hit": self.hits[m].tolist()} for m, s in self.scores.items()},
            "errors": self.errors,
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1))
        tmp.replace(path)
        return path


def qualifying_photos(zm: Any, threshold: float = DEFAULT_THRESHOLD, candidates: Sequence[str] = CANDIDATES,
                      limit: int | None = None) -> list[dict[str, Any]]:
    """Photos whose top-1 probability is at least ``threshold`` (distinct classes), with their
    class; stops after ``limit`` photos."""
    from ..zoo import sample

    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name in candidates:
        if limit is not None and len(out) >= limit:
            break
        x = zm.preprocess(sample(name))
        p = _eval_probs(zm.model, x)
        prob, cls = float(p.max()), int(p.argmax())
        if prob >= threshold and cls not in seen:
            seen.add(cls)
            out.append({"name": name, "class": cls, "label": str(zm.labels[cls]), "probability": round(prob, 4)})
    return out


def _eval_probs(model: Any, x: Tensor) -> Tensor:
    from ..core.guard import model_guard

    with model_guard(model), torch.no_grad():
        return model(x).softmax(1)[0]


def make_grids(cells: Tensor, size: int, max_grids: int | None = None) -> tuple[Tensor, Tensor]:
    """Tile 4 cell images (4, C, h, w) into (G, C, size, size) grids in every order.

    Returns the grids and ``perm`` (G, 4): ``perm[g, k]`` is the photo in cell k
    (k = 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right).
    """
    half = size // 2
    if cells.shape[-1] != half or cells.shape[-2] != half:
        cells = F.interpolate(cells, size=(half, half), mode="bilinear", align_corners=False, antialias=True)
    perms = torch.tensor(list(itertools.permutations(range(4))))
    if max_grids is not None:
        perms = perms[:max_grids]
    c = cells[perms]  # (G, 4, C, half, half)
    top = torch.cat([c[:, 0], c[:, 1]], dim=-1)
    bottom = torch.cat([c[:, 2], c[:, 3]], dim=-1)
    return torch.cat([top, bottom], dim=-2), perms


def cell_masks(size: int) -> Tensor:
    """(4, size, size) boolean masks of the four cells."""
    half = size // 2
    m = torch.zeros(4, size, size, dtype=torch.bool)
    m[0, :half, :half] = m[1, :half, half:] = m[2, half:, :half] = m[3, half:, half:] = True
    return m


def pointing_game_benchmark(
    model: Any = "efficientnet_lite0",
    methods: str | Sequence[str] | None = "family:cam",
    *,
    size: int = 448,
    threshold: float = DEFAULT_THRESHOLD,
    photos: Sequence[str] | None = None,
    max_grids: int | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
) -> PointingGameResult:
    """Run the grid pointing game for ``methods`` on the bundled model (or a ZooModel).

    ``photos`` overrides the automatic choice (4 names); ``max_grids`` keeps only the
    first orders (of 24) for a quick run.
    """
    import time

    from .. import zoo
    from ..core.registry import METHODS
    from ..methods.base import build
    from .evaluate import resolve_methods

    if isinstance(size, bool) or not isinstance(size, int) or size < 32 or size % 2:
        raise OptionError(f"size must be an even integer >= 32 (grid side in pixels); got {size!r}.")
    if max_grids is not None and (not isinstance(max_grids, int) or not 1 <= max_grids <= 24):
        raise OptionError(f"max_grids must be an integer in 1..24; got {max_grids!r}.")
    zm = zoo.load(model) if isinstance(model, str) else model
    names = resolve_methods(methods)
    if photos is not None:
        if len(photos) != 4:
            raise InputError(f"the grid needs exactly 4 photos; got {len(photos)}.")
        chosen = qualifying_photos(zm, 0.0, photos)
        if len(chosen) != 4:
            raise InputError("the 4 photos must be classified as 4 different classes.")
    else:
        chosen = qualifying_photos(zm, threshold, limit=4)
        if len(chosen) < 4:
            raise InputError(f"only {len(chosen)} bundled photos reach probability {threshold}; lower threshold.")
    cells = torch.cat([zm.preprocess(zoo.sample(p["name"])) for p in chosen])
    grids, perms = make_grids(cells, size, max_grids)
    g = grids.shape[0]
    masks = cell_masks(size)
    classes = torch.tensor([p["class"] for p in chosen])
    # explanation e = g * 4 + j: grid g, photo j; its cell is the position of photo j in grid g
    pos = perms.argsort(dim=1)  # (G, 4): cell of photo j
    result = PointingGameResult(photos=chosen, size=size, grids=g)
    device = next(zm.model.parameters()).device
    grids = grids.to(device)
    for name in names:
        cls = METHODS.get(name).cls
        opts = dict((method_options or {}).get(name, {}))
        if batch_size is not None and "batch_size" in cls.option_names():
            opts.setdefault("batch_size", batch_size)
        method = build(cls, zm, **opts)
        engine = Engine(zm.model, batch_size=batch_size, progress=progress)
        t0 = time.perf_counter()

        def run(start: int, stop: int, method: Any = method) -> Tensor:
            e = torch.arange(start, stop)
            exp = method(grids[e // 4], target=classes[e % 4].tolist())
            rel = relevance_map(exp.attributions, grids[e // 4])
            cm = masks[pos[e // 4, e % 4]].to(rel.device)
            energy = cell_energy(rel, cm)
            flat = rel.flatten(1)
            is_max = flat == flat.max(1, keepdim=True).values
            hit = (is_max & cm.flatten(1)).sum(1).double() / is_max.sum(1).double()
            return torch.stack([energy, hit], 1)

        try:
            out = engine.map(run, g * 4, sample=grids[:1], grad=True, description=f"pointing game: {name}")
        except Exception as exc:  # noqa: BLE001 - one method failing must not hide the others
            from ..errors import PerspicioError

            if not isinstance(exc, PerspicioError):
                raise
            result.errors[name] = str(exc)
            continue
        result.seconds[name] = round(time.perf_counter() - t0, 3)
        result.scores[name] = out[:, 0].view(g, 4).cpu()
        result.hits[name] = out[:, 1].view(g, 4).cpu()
    return result
