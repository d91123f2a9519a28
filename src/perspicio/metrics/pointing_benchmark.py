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
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..core.batching import DEFAULT_MEMORY_BUDGET, Engine
from ..core.jsonable import write_json
from ..core.options import check_int
from ..errors import InputError, OptionError
from .base import relevance_map
from .localization import cell_energy

#: photos tried, in order; the first four above the confidence threshold are used
CANDIDATES = ("chelsea", "coffee", "camera", "motorcycle_left", "rocket", "astronaut")
DEFAULT_THRESHOLD = 0.4
#: the 24 cell orders, lexicographic: ORDERS[g][k] is the photo in cell k of grid g
ORDERS = tuple(itertools.permutations(range(4)))
#: a Latin square of orders (every photo once in every cell) for runs on a subset: 0123, 1230, 2301, 3012
LATIN_ORDERS = (0, 9, 16, 18)


@dataclass
class PointingGameResult:
    """Per-method scores of the grid pointing game."""

    photos: list[dict[str, Any]]
    size: int
    grids: int
    orders: list[int] = field(default_factory=list)  # indices into ORDERS of the grids used
    candidates: list[dict[str, Any]] = field(default_factory=list)  # every photo tried, with its confidence
    threshold: float = DEFAULT_THRESHOLD
    scores: dict[str, Tensor] = field(default_factory=dict)  # method -> (grids, 4) energy share
    hits: dict[str, Tensor] = field(default_factory=dict)  # method -> (grids, 4) max-in-cell
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def records(self) -> list[dict[str, Any]]:
        """One row per method, best mean energy first: the mean over all explanations, the
        worst grid (``energy_min``: lowest mean over a grid's four cells), the hit rate, and
        per photo (its class explained in every grid) the mean and the minimum over grids."""
        rows = []
        for m, s in self.scores.items():
            row: dict[str, Any] = {"method": m, "energy": float(s.mean()), "energy_min": float(s.mean(1).min()),
                                   "hit": float(self.hits[m].mean())}
            for j, p in enumerate(self.photos):
                row[p["name"]] = float(s[:, j].mean())
                row[p["name"] + "_min"] = float(s[:, j].min())
            row["seconds"] = self.seconds.get(m, math.nan)
            rows.append(row)
        return sorted(rows, key=lambda r: -r["energy"])

    def describe_photos(self) -> str:
        """Which bundled photos qualify (top-1 probability vs the threshold) and which are used."""
        used = {p["name"] for p in self.photos}
        lines = [f"photos (top-1 probability >= {self.threshold:g} and a class not already taken qualify):"]
        for c in self.candidates or self.photos:
            mark = "used" if c["name"] in used else ("qualifies" if c.get("qualifies") else "does not qualify")
            lines.append(f"  {c['name']:<16} class {c['class']:>4} {c['label']!r:<24} p={c['probability']:.3f}  {mark}")
        return "\n".join(lines)

    def table(self) -> str:
        names = [p["name"] for p in self.photos]
        head = ["method", "energy (mean)", "worst grid", "hit rate"] + [f"{n} (mean/min)" for n in names] + ["seconds"]
        rows = [head]
        for r in self.records():
            rows.append([r["method"], f"{r['energy']:.3f}", f"{r['energy_min']:.3f}", f"{r['hit']:.3f}"]
                        + [f"{r[n]:.3f}/{r[n + '_min']:.3f}" for n in names] + [f"{r['seconds']:.1f}"])
        for m, msg in self.errors.items():
            rows.append([m, "error: " + msg[:60]] + [""] * (len(head) - 2))
        widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(len(head))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "benchmark": "grid pointing game",
            "size": self.size,
            "grids": self.grids,
            "orders": [list(ORDERS[i]) for i in self.orders],
            "chance": 0.25,
            "threshold": self.threshold,
            "candidates": self.candidates,
            "photos": self.photos,
            "table": self.records(),
            "per_grid": {m: {"energy": s.tolist(), "hit": self.hits[m].tolist()} for m, s in self.scores.items()},
            "errors": self.errors,
        }

    def save_json(self, path: str | Path) -> Path:
        return write_json(path, self.to_dict())


def photo_confidences(zm: Any, threshold: float = DEFAULT_THRESHOLD,
                      candidates: Sequence[str] = CANDIDATES) -> list[dict[str, Any]]:
    """Every candidate photo with the model's top-1 class and probability, and whether it
    qualifies (probability >= ``threshold`` and a class no earlier photo has)."""
    from ..zoo import sample

    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    for name in candidates:
        p = _eval_probs(zm.model, zm.preprocess(sample(name)))
        prob, cls = float(p.max()), int(p.argmax())
        ok = prob >= threshold and cls not in seen
        if ok:
            seen.add(cls)
        out.append({"name": name, "class": cls, "label": str(zm.labels[cls]), "probability": round(prob, 4),
                    "qualifies": ok})
    return out



def _eval_probs(model: Any, x: Tensor) -> Tensor:
    from ..core.guard import model_guard

    with model_guard(model), torch.no_grad():
        return model(x).softmax(1)[0]


def make_grids(cells: Tensor, size: int, max_grids: int | None = None,
               orders: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Tile 4 cell images (4, C, h, w) into (G, C, size, size) grids in every order
    (or the ``orders``, indices into :data:`ORDERS`; or the first ``max_grids``).

    Returns the grids and ``perm`` (G, 4): ``perm[g, k]`` is the photo in cell k
    (k = 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right).
    """
    half = size // 2
    if cells.shape[-1] != half or cells.shape[-2] != half:
        cells = F.interpolate(cells, size=(half, half), mode="bilinear", align_corners=False, antialias=True)
    perms = torch.tensor(ORDERS)
    if orders is not None:
        perms = perms[torch.as_tensor(list(orders), dtype=torch.long)]
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
    orders: Sequence[int] | str | None = None,
    method_options: dict[str, dict[str, Any]] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    on_method: Callable[[PointingGameResult], None] | None = None,
) -> PointingGameResult:
    """Run the grid pointing game for ``methods`` on the bundled model (or a ZooModel).

    By default every one of the 24 cell orders is a grid. ``orders`` picks some of them
    (indices into :data:`ORDERS`, or ``"latin"`` for :data:`LATIN_ORDERS`, four orders that
    put every photo once in every cell); ``max_grids`` keeps only the first ones, for a
    quick run. Every grid is explained from scratch (nothing is cached across grids).
    ``photos`` overrides the automatic choice (4 names). ``on_method(result)`` is called
    after each method (e.g. to save partial results of a long run).
    """
    import time

    from .. import zoo
    from ..core.registry import METHODS
    from ..methods.base import build
    from .evaluate import resolve_methods

    if isinstance(size, bool) or not isinstance(size, int) or size < 32 or size % 2:
        raise OptionError(f"size must be an even integer >= 32 (grid side in pixels); got {size!r}.")
    check_int("max_grids", max_grids, minimum=1, maximum=24, allow_none=True)
    if isinstance(orders, str):
        if orders not in ("all", "latin"):
            raise OptionError(f"orders must be 'all', 'latin' or indices in 0..23; got {orders!r}.")
        orders = None if orders == "all" else list(LATIN_ORDERS)
    if orders is not None:
        orders = list(orders)
        if not orders or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < 24 for i in orders) \
                or len(set(orders)) != len(orders):
            raise OptionError(f"orders must be distinct indices in 0..23 (of the 24 cell orders); got {orders!r}.")
    zm = zoo.load(model) if isinstance(model, str) else model
    names = resolve_methods(methods)
    if photos is not None:
        if len(photos) != 4:
            raise InputError(f"the grid needs exactly 4 photos; got {len(photos)}.")
        candidates = photo_confidences(zm, 0.0, photos)
        chosen = [{k: v for k, v in c.items() if k != "qualifies"} for c in candidates if c["qualifies"]]
        if len(chosen) != 4:
            raise InputError("the 4 photos must be classified as 4 different classes.")
    else:
        candidates = photo_confidences(zm, threshold)
        chosen = [{k: v for k, v in c.items() if k != "qualifies"} for c in candidates if c["qualifies"]][:4]
        if len(chosen) < 4:
            raise InputError(f"only {len(chosen)} bundled photos reach probability {threshold}; lower threshold.")
    cells = torch.cat([zm.preprocess(zoo.sample(p["name"])) for p in chosen])
    grids, perms = make_grids(cells, size, max_grids, orders)
    g = grids.shape[0]
    used = (orders if orders is not None else list(range(24)))[:g]
    masks = cell_masks(size)
    classes = torch.tensor([p["class"] for p in chosen])
    # explanation e = g * 4 + j: grid g, photo j; its cell is the position of photo j in grid g
    pos = perms.argsort(dim=1)  # (G, 4): cell of photo j
    result = PointingGameResult(photos=chosen, size=size, grids=g, orders=used, candidates=candidates,
                                threshold=threshold if photos is None else 0.0)
    device = next(zm.model.parameters()).device
    grids = grids.to(device)
    for name in names:
        cls = METHODS.get(name).cls
        opts = dict((method_options or {}).get(name, {}))
        if batch_size is not None and "batch_size" in cls.option_names():
            opts.setdefault("batch_size", batch_size)
        method = build(cls, zm, **opts)
        # chunks of grids; each grid is four explanations (one per class), hence a quarter
        engine = Engine(zm.model, batch_size=None if batch_size is None else max(1, batch_size // 4),
                        memory_budget=DEFAULT_MEMORY_BUDGET // 4, progress=progress)
        t0 = time.perf_counter()

        def run(start: int, stop: int, method: Any = method) -> Tensor:
            # grids start..stop, each explained for its four classes in one call (several targets
            # per input: methods that can share passes across targets do); rows are grid-major
            e = torch.arange(start * 4, stop * 4)
            exp = method(grids[start:stop], target=[classes.tolist()] * (stop - start))
            rel = relevance_map(exp.attributions, grids[e // 4])
            cm = masks[pos[e // 4, e % 4]].to(rel.device)
            energy = cell_energy(rel, cm)
            flat = rel.flatten(1)
            is_max = flat == flat.max(1, keepdim=True).values
            hit = (is_max & cm.flatten(1)).sum(1).double() / is_max.sum(1).double()
            return torch.stack([energy, hit], 1)

        try:
            out = engine.map(run, g, sample=grids[:1], grad=True, description=f"pointing game: {name}")
        except Exception as exc:  # noqa: BLE001 - one method failing must not hide the others
            from ..errors import PerspicioError

            if not isinstance(exc, PerspicioError):
                raise
            result.errors[name] = str(exc)
            continue
        result.seconds[name] = round(time.perf_counter() - t0, 3)
        result.scores[name] = out[:, 0].view(g, 4).cpu()
        result.hits[name] = out[:, 1].view(g, 4).cpu()
        if on_method is not None:
            on_method(result)
    return result
