"""Streaming a data set through the model in batches: a folder of images, a tensor, or an
iterable/DataLoader. Used by the top-activating scan and the embedding projection.

Folders are listed once (sorted, recursive); non-image files and unreadable images are
skipped and reported, never fatal (an empty folder, or one where nothing is readable,
is an :class:`~perspicio.errors.InputError`). Tensors are chunked by the one
:class:`~perspicio.core.batching.Engine`; iterables keep their own batches.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..core.batching import Engine, progress_bar
from ..core.inputs import as_batch
from ..errors import InputError, OptionError, PerspicioError
from ._common import ModelBundle

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")

#: fn(inputs, labels or None, offset of the batch in the data set)
BatchFn = Callable[[Tensor, "Tensor | None", int], None]


@dataclass
class ScanReport:
    """What a scan saw: item names (files or indices), skipped (name, reason), count, shape."""

    sources: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    scanned: int = 0
    shape: tuple[int, ...] | None = None


def list_folder(folder: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files of ``folder`` (sorted, recursive) and the skipped non-image files."""
    if not folder.is_dir():
        raise InputError(f"data folder '{folder}' does not exist or is not a directory.")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise InputError(f"data folder '{folder}' is empty; expected image files ({', '.join(IMAGE_SUFFIXES)}).")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    skipped = [(str(p), "not an image file (by extension)") for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    if not images:
        raise InputError(f"data folder '{folder}' holds no image files ({len(files)} other file(s), e.g. '{files[0].name}').")
    return images, skipped


def _load_one(path: Path, preprocess: Callable[[Any], Tensor]) -> Tensor:
    from ..zoo.images import load_image

    t = preprocess(load_image(path))
    if not isinstance(t, Tensor):
        raise InputError(f"preprocess must return a tensor; got {type(t).__name__}.")
    return t if t.ndim == 4 else t[None]


def _split(item: Any) -> tuple[Tensor, Tensor | None]:
    if isinstance(item, Tensor):
        return item, None
    if isinstance(item, (list, tuple)) and item and isinstance(item[0], Tensor):
        y = item[1] if len(item) > 1 and isinstance(item[1], Tensor) else None
        return item[0], y
    if isinstance(item, dict):
        for key in ("image", "images", "pixel_values", "input", "x"):
            if isinstance(item.get(key), Tensor):
                y = next((item[k] for k in ("label", "labels", "y", "target") if isinstance(item.get(k), Tensor)), None)
                return item[key], y
    raise InputError(f"each batch must be a tensor, an (inputs, labels, ...) tuple or a dict with 'image'; got {type(item).__name__}.")


def _length(data: Any) -> int | None:
    ds = getattr(data, "dataset", None)
    try:
        return len(ds) if ds is not None else len(data) if hasattr(data, "__len__") else None
    except TypeError:
        return None


def scan(
    bundle: ModelBundle,
    data: Any,
    engine: Engine,
    fn: BatchFn,
    *,
    preprocess: Callable[[Any], Tensor] | None = None,
    labels: Any = None,
    description: str = "scanning",
) -> ScanReport:
    """Call ``fn(x, y, offset)`` on consecutive batches of ``data`` (see the module docstring).

    ``labels`` (a sequence/tensor of N labels) is sliced alongside a tensor data set.
    """
    net = bundle.model
    report = ScanReport()

    def call(x: Tensor, y: Tensor | None) -> None:
        if report.shape is None:
            report.shape = tuple(x.shape[1:])
        elif tuple(x.shape[1:]) != report.shape:
            raise InputError(f"all inputs must have one shape; got {tuple(x.shape[1:])} after {report.shape}.")
        fn(x, y, report.scanned)
        report.scanned += x.shape[0]

    if isinstance(data, (str, os.PathLike)):
        pre = preprocess or bundle.preprocess
        if pre is None:
            raise OptionError("scanning a folder needs preprocess=... (or a zoo model, which brings its own).")
        files, report.skipped = list_folder(Path(data))
        report.sources = []
        first: Tensor | None = None
        start_at = 0
        while first is None and start_at < len(files):  # the first readable image sizes the chunks
            try:
                first = as_batch(_load_one(files[start_at], pre), net)
            except PerspicioError as exc:
                report.skipped.append((str(files[start_at]), str(exc)))
                start_at += 1
        if first is None:
            raise InputError(f"none of the {len(files)} image file(s) in '{data}' could be read; last error: {report.skipped[-1][1]}")
        files = files[start_at:]

        def run_files(start: int, stop: int) -> Tensor:
            batch, names = [], []
            for path in files[start:stop]:
                try:
                    batch.append(as_batch(_load_one(path, pre), net))
                    names.append(str(path))
                except PerspicioError as exc:
                    report.skipped.append((str(path), str(exc)))
            if batch:
                shapes = {tuple(b.shape[1:]) for b in batch}
                if len(shapes) > 1:
                    raise InputError(f"preprocess produced different input shapes {sorted(shapes)}; it must resize to one size.")
                report.sources.extend(names)
                call(torch.cat(batch), None)
            return torch.zeros(stop - start)

        engine.map(run_files, len(files), sample=first, description=description)
    elif isinstance(data, Tensor) or (type(data).__module__ == "numpy" and hasattr(data, "shape")):
        x_all = as_batch(data, net)
        y_all = None
        if labels is not None:
            y_all = torch.as_tensor(labels)
            if len(y_all) != len(x_all):
                raise InputError(f"got {len(y_all)} labels for {len(x_all)} inputs.")

        def run_slice(start: int, stop: int) -> Tensor:
            call(x_all[start:stop], y_all[start:stop] if y_all is not None else None)
            return torch.zeros(stop - start)

        engine.map(run_slice, len(x_all), sample=x_all[:1], description=description)
    elif isinstance(data, Iterable) and not isinstance(data, (str, bytes)):
        total = _length(data)
        with progress_bar(engine.progress, total or 0, description) as advance:
            for item in data:
                xb, yb = _split(item)
                x = as_batch(xb, net)
                call(x, yb)
                advance(len(x))
        if report.scanned == 0:
            raise InputError("the data iterable/DataLoader yielded no batches.")
    else:
        raise InputError(f"data must be a folder path, a tensor (N, C, H, W) or an iterable of batches; got {type(data).__name__}.")
    return report


def photo_crops(preprocess: Callable[[Any], Tensor], *, grid: int = 3, fraction: float = 0.5) -> tuple[Tensor, list[str]]:
    """A small demo data set from scikit-image's bundled photos: each whole photo plus a
    ``grid`` x ``grid`` set of square crops (side ``fraction`` of the shorter side), passed
    through ``preprocess``. Returns the batch and a name per item ("chelsea@r,c")."""
    from ..zoo.images import SAMPLES, sample

    items, names = [], []
    for name in SAMPLES:
        img = sample(name)
        w, h = img.size
        items.append(preprocess(img))
        names.append(name)
        side = int(min(w, h) * fraction)
        for r in range(grid):
            for c in range(grid):
                top = round(r * (h - side) / max(grid - 1, 1))
                left = round(c * (w - side) / max(grid - 1, 1))
                items.append(preprocess(img.crop((left, top, left + side, top + side))))
                names.append(f"{name}@{r},{c}")
    return torch.cat(items), names
