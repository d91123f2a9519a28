"""Data sources of a run: what a sample is, how a chunk of samples is loaded, and a fingerprint
that changes when the data changes.

Every source is a sequence of samples addressed by position ``0..len-1``; a chunk is loaded by
:meth:`Source.load` into a batch plus per-sample metadata. A sample that cannot be read (a corrupt
file) does not stop the chunk: it comes back as ``None`` with its error, and the run records it as a
failed row.
"""

from __future__ import annotations

import hashlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..errors import InputError, OptionError, PerspicioError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TABLE_SUFFIXES = (".csv", ".parquet", ".pq")
#: column names read as the image path / the label in a table of images
PATH_COLUMNS = ("path", "image", "file", "filename")
LABEL_COLUMNS = ("label", "target", "class", "y")


@dataclass
class Chunk:
    """One loaded chunk: ``x`` holds the readable samples (in order), ``ok`` their positions in the
    chunk; ``errors`` maps a chunk position to the reason it could not be read."""

    indices: list[int]
    x: Tensor | None
    ok: list[int]
    ids: list[str]
    paths: list[str | None]
    hashes: list[str | None]
    labels: list[int | None]
    errors: dict[int, str] = field(default_factory=dict)


class Source(ABC):
    """Base class: ``len(source)`` samples, loaded chunk by chunk."""

    kind = "source"
    class_names: Sequence[str] | None = None

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def fingerprint(self) -> str:
        """Changes when the data changes (file listing with sizes and times, or content)."""

    @abstractmethod
    def load(self, indices: Sequence[int], preprocess: Callable[[Any], Tensor] | None) -> Chunk:
        """Read and preprocess the samples at ``indices`` (unreadable ones recorded in the chunk)."""

    def describe(self) -> str:
        return f"{self.kind} of {len(self)} samples"


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ----------------------------------------------------------------------------- image files


class ImageFiles(Source):
    """Image files with optional integer labels (from class sub-folders or a table's column)."""

    kind = "images"

    def __init__(self, paths: Sequence[Path], labels: Sequence[int | None], root: Path,
                 class_names: Sequence[str] | None = None) -> None:
        self.paths = [Path(p) for p in paths]
        self.labels = list(labels)
        self.root = root
        self.class_names = list(class_names) if class_names else None

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for p, y in zip(self.paths, self.labels):
            try:
                st = p.stat()
                h.update(f"{self._rel(p)}|{st.st_size}|{st.st_mtime_ns}|{y}\n".encode())
            except OSError:
                h.update(f"{self._rel(p)}|missing|{y}\n".encode())
        return h.hexdigest()

    def _rel(self, p: Path) -> str:
        try:
            return str(p.relative_to(self.root))
        except ValueError:
            return str(p)

    def load(self, indices: Sequence[int], preprocess: Callable[[Any], Tensor] | None) -> Chunk:
        if preprocess is None:
            raise OptionError("image files need the model's preprocessing: give a bundled model "
                              "(perspicio.zoo.load) or preprocess=callable(images) -> batch tensor.")
        from PIL import Image

        from ..zoo.images import load_image

        tensors: list[Tensor] = []
        ok: list[int] = []
        hashes: list[str | None] = []
        errors: dict[int, str] = {}
        # a bundled preprocessing splits into per-image resizing and one normalisation of the batch
        unit = getattr(preprocess, "to_unit_tensor", None)
        normalize = getattr(preprocess, "normalize", None)
        split = callable(unit) and callable(normalize)
        for k, i in enumerate(indices):
            p = self.paths[i]
            try:
                data = p.read_bytes()
                hashes.append(_sha(data))
                image = load_image(data)
                tensors.append(unit(image) if split else preprocess(image))
                ok.append(k)
            except (OSError, PerspicioError, Image.DecompressionBombError, ValueError) as exc:
                if len(hashes) == k:
                    hashes.append(None)
                errors[k] = f"cannot read {self._rel(p)}: {exc}"
        x = torch.cat(tensors) if tensors else None
        if x is not None and split:
            x = normalize(x)
        return Chunk(list(indices), x, ok, [self._rel(self.paths[i]) for i in indices],
                     [str(self.paths[i]) for i in indices], hashes, [self.labels[i] for i in indices], errors)

    def describe(self) -> str:
        n_cls = f", {len(self.class_names)} classes" if self.class_names else ""
        return f"{len(self)} images under {self.root}{n_cls}"


def image_folder(root: str | os.PathLike[str], class_names: Sequence[str] | None = None) -> ImageFiles:
    """All images under ``root`` (recursively, sorted). Files in class sub-folders get the label of
    their folder: the folder's index in ``class_names`` when given (model's label order), else
    folders named by integers are that integer, else sorted folder names are numbered 0, 1, ..."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"{str(root)!r} is not a directory of images.")
    paths = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise InputError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) under {str(root)!r}.")
    folders = sorted({p.relative_to(root).parts[0] for p in paths if len(p.relative_to(root).parts) > 1})
    names: list[str] | None = None
    if folders and all(len(p.relative_to(root).parts) > 1 for p in paths):
        if class_names is not None:
            index = {str(c): i for i, c in enumerate(class_names)}
            unknown = [f for f in folders if f not in index and not f.isdigit()]
            if unknown:
                raise InputError(f"class folder {unknown[0]!r} is not a class of the model "
                                 f"(name a folder by the class name or index).")
            mapping = {f: index[f] if f in index else int(f) for f in folders}
            names = list(class_names)
        elif all(f.isdigit() for f in folders):
            mapping = {f: int(f) for f in folders}
        else:
            mapping = {f: i for i, f in enumerate(folders)}
            names = folders
        labels: list[int | None] = [mapping[p.relative_to(root).parts[0]] for p in paths]
    else:
        labels = [None] * len(paths)
    return ImageFiles(paths, labels, root, names)


# ----------------------------------------------------------------------------- tables


def read_table(path: str | os.PathLike[str]) -> Any:
    """A CSV or Parquet file as a pandas DataFrame (clear errors for other files)."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such file: {str(p)!r}.")
    try:
        import pandas as pd
    except ImportError:
        raise OptionError("reading tables needs pandas: pip install 'perspicio[run]'.") from None
    try:
        if p.suffix.lower() == ".csv":
            return pd.read_csv(p)
        if p.suffix.lower() in (".parquet", ".pq"):
            return pd.read_parquet(p)
    except Exception as exc:  # pandas raises many types for a broken file
        raise InputError(f"cannot read {str(p)!r}: {exc}") from None
    raise InputError(f"{str(p)!r}: expected a .csv or .parquet file.")


def _column(df: Any, candidates: Sequence[str], given: str | None, what: str) -> str | None:
    if given is not None:
        if given not in df.columns:
            raise InputError(f"the table has no {what} column {given!r}; columns: {', '.join(map(str, df.columns))}.")
        return given
    lower = {str(c).lower(): c for c in df.columns}
    for c in candidates:
        if c in lower:
            return lower[c]
    return None


class Rows(Source):
    """Tabular rows (N, F) with optional labels; the fingerprint hashes the values."""

    kind = "rows"

    def __init__(self, values: np.ndarray, labels: Sequence[int | None], feature_names: Sequence[str],
                 origin: str = "array") -> None:
        if values.ndim != 2 or len(values) == 0:
            raise InputError(f"tabular data must be a non-empty 2-D table; got shape {values.shape}.")
        self.values = np.ascontiguousarray(values, dtype=np.float32)
        self.labels = list(labels)
        self.feature_names = list(feature_names)
        self.origin = origin

    def __len__(self) -> int:
        return len(self.values)

    def fingerprint(self) -> str:
        return _sha(self.values.tobytes() + repr((self.labels, self.feature_names)).encode())

    def load(self, indices: Sequence[int], preprocess: Callable[[Any], Tensor] | None) -> Chunk:
        rows = self.values[list(indices)]
        x = torch.from_numpy(rows.copy())
        # an image preprocessing (what the CLI attaches to every torchvision/timm/factory model) does
        # not apply to feature rows; a preprocessing given for rows does
        if preprocess is not None and not callable(getattr(preprocess, "to_unit_tensor", None)):
            x = preprocess(x)
        return Chunk(list(indices), x, list(range(len(indices))), [f"row {i}" for i in indices],
                     [None] * len(indices), [_sha(r.tobytes()) for r in rows], [self.labels[i] for i in indices])

    def describe(self) -> str:
        return f"{len(self)} rows x {self.values.shape[1]} features from {self.origin}"


def table_source(path: str | os.PathLike[str], *, path_column: str | None = None,
                 label_column: str | None = None, class_names: Sequence[str] | None = None) -> Source:
    """A CSV/Parquet table: of image paths (a path column; relative paths from the table's folder)
    and labels, or of tabular features (every numeric column but the label)."""
    df = read_table(path)
    if len(df) == 0:
        raise InputError(f"{str(path)!r} has no rows.")
    pcol = _column(df, PATH_COLUMNS, path_column, "path")
    lcol = _column(df, LABEL_COLUMNS, label_column, "label")
    labels: list[int | None] = [None] * len(df)
    if lcol is not None:
        labels = [_label(v, class_names, i) for i, v in enumerate(df[lcol].tolist())]
    if pcol is not None:
        base = Path(path).resolve().parent
        paths = [Path(str(v)) if Path(str(v)).is_absolute() else base / str(v) for v in df[pcol].tolist()]
        return ImageFiles(paths, labels, base, class_names)
    features = df.drop(columns=[lcol]) if lcol is not None else df
    non_numeric = [str(c) for c in features.columns if not np.issubdtype(features[c].dtype, np.number)]
    if non_numeric:
        raise InputError(f"tabular column {non_numeric[0]!r} is not numeric (name an image column "
                         f"{'/'.join(PATH_COLUMNS)} or encode categories first).")
    return Rows(features.to_numpy(dtype=np.float32), labels, [str(c) for c in features.columns], str(path))


def _label(v: Any, class_names: Sequence[str] | None, row: int) -> int | None:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    s = str(v)
    if s.lstrip("-").isdigit():
        return int(s)
    if class_names is not None and s in class_names:
        return list(class_names).index(s)
    raise InputError(f"row {row}: label {v!r} is neither a class index nor a class name of the model.")


# ----------------------------------------------------------------------------- tensors and datasets


class Tensors(Source):
    """An in-memory batch (N, ...) with optional labels."""

    kind = "tensor"

    def __init__(self, x: Tensor, labels: Sequence[int | None] | None = None) -> None:
        if not isinstance(x, Tensor) or x.ndim < 2 or len(x) == 0:
            raise InputError("a tensor data set must have shape (N, ...) with N >= 1.")
        self.x = x.detach()
        self.labels = list(labels) if labels is not None else [None] * len(x)
        if len(self.labels) != len(x):
            raise InputError(f"{len(self.labels)} labels for {len(x)} samples.")

    def __len__(self) -> int:
        return len(self.x)

    def fingerprint(self) -> str:
        return _sha(self.x.cpu().contiguous().numpy().tobytes() + repr(self.labels).encode())

    def load(self, indices: Sequence[int], preprocess: Callable[[Any], Tensor] | None) -> Chunk:
        x = self.x[list(indices)]
        hashes = [_sha(r.cpu().contiguous().numpy().tobytes()) for r in x]
        return Chunk(list(indices), x.clone(), list(range(len(indices))), [f"sample {i}" for i in indices],
                     [None] * len(indices), hashes, [self.labels[i] for i in indices])


class Dataset(Source):
    """A torch ``Dataset`` (or a ``DataLoader``'s dataset) or a Hugging Face ``datasets`` table:
    items are ``(x, label)`` pairs, bare tensors, or dicts with an image/pixel key and a label key.
    The fingerprint covers the length, the type and the first and last items' content (hashing
    every item would read the whole data set before starting)."""

    kind = "dataset"

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset
        try:
            self.n = len(dataset)
        except TypeError:
            raise InputError("the data set must have a length (a map-style Dataset).") from None
        if self.n == 0:
            raise InputError("the data set is empty.")
        features = getattr(dataset, "features", None)
        names = getattr(getattr(features, "get", lambda k: None)("label"), "names", None) if features else None
        self.class_names = list(names) if names else getattr(dataset, "classes", None)

    def __len__(self) -> int:
        return self.n

    def _item(self, i: int) -> tuple[Any, int | None]:
        item = self.dataset[i]
        if isinstance(item, dict):
            xkey = next((k for k in ("pixel_values", "image", "img", "x", "input") if k in item), None)
            if xkey is None:
                raise InputError(f"data set item {i} has keys {sorted(item)}; expected an 'image' or 'pixel_values' key.")
            ykey = next((k for k in LABEL_COLUMNS + ("labels",) if k in item), None)
            return item[xkey], (int(item[ykey]) if ykey is not None and item[ykey] is not None else None)
        if isinstance(item, (tuple, list)) and len(item) >= 2:
            y = item[1]
            return item[0], (int(y) if y is not None and np.ndim(y) == 0 else None)
        return item, None

    def fingerprint(self) -> str:
        h = hashlib.sha256(f"{type(self.dataset).__qualname__}|{self.n}".encode())
        for i in sorted({0, self.n - 1}):
            x, y = self._item(i)
            h.update(_content(x) + repr(y).encode())
        return h.hexdigest()

    def load(self, indices: Sequence[int], preprocess: Callable[[Any], Tensor] | None) -> Chunk:
        tensors: list[Tensor] = []
        ok: list[int] = []
        labels: list[int | None] = []
        hashes: list[str | None] = []
        errors: dict[int, str] = {}
        for k, i in enumerate(indices):
            try:
                x, y = self._item(i)
                hashes.append(_sha(_content(x)))
                labels.append(y)
                if isinstance(x, Tensor) and x.is_floating_point():  # a ready model input
                    t = x.detach()[None].float()
                else:
                    if preprocess is None:
                        raise OptionError("data set items are images: give a bundled model or preprocess=.")
                    t = preprocess(x)
                tensors.append(t)
                ok.append(k)
            except OptionError:
                raise
            except Exception as exc:  # a user data set may raise anything for a broken item
                while len(hashes) <= k:
                    hashes.append(None)
                while len(labels) <= k:
                    labels.append(None)
                errors[k] = f"cannot read item {i}: {type(exc).__name__}: {exc}"
        x = torch.cat(tensors) if tensors else None
        return Chunk(list(indices), x, ok, [f"item {i}" for i in indices], [None] * len(indices), hashes, labels, errors)


def _content(x: Any) -> bytes:
    if isinstance(x, Tensor):
        return x.detach().cpu().contiguous().numpy().tobytes()
    if isinstance(x, np.ndarray):
        return np.ascontiguousarray(x).tobytes()
    tobytes = getattr(x, "tobytes", None)
    if callable(tobytes):
        return tobytes()
    return repr(x).encode()


# ----------------------------------------------------------------------------- dispatch


def as_source(data: Any, *, class_names: Sequence[str] | None = None, labels: Sequence[int] | None = None) -> Source:
    """Any supported data -> a :class:`Source`: a folder of images, a CSV/Parquet file (image paths
    or tabular rows), a tensor (with ``labels``), a numpy array of rows, a torch Dataset/DataLoader,
    or a Hugging Face ``datasets`` object."""
    if isinstance(data, Source):
        return data
    if isinstance(data, (str, os.PathLike)):
        p = Path(data)
        if p.is_dir():
            return image_folder(p, class_names)
        if p.suffix.lower() in TABLE_SUFFIXES:
            return table_source(p, class_names=class_names)
        if p.exists():
            raise InputError(f"{str(p)!r}: expected a folder of images or a .csv/.parquet table.")
        raise InputError(f"no such file or folder: {str(p)!r}.")
    if isinstance(data, Tensor):
        return Tensors(data, labels)
    if isinstance(data, np.ndarray):
        if data.ndim == 2:
            return Rows(data, list(labels) if labels is not None else [None] * len(data),
                        [f"x{i}" for i in range(data.shape[1])])
        return Tensors(torch.from_numpy(np.ascontiguousarray(data)), labels)
    if type(data).__name__ == "DataFrame":
        return Rows(data.to_numpy(dtype=np.float32), list(labels) if labels is not None else [None] * len(data),
                    [str(c) for c in data.columns], "DataFrame")
    loader_ds = getattr(data, "dataset", None)
    if loader_ds is not None and hasattr(data, "batch_size"):
        return Dataset(loader_ds)
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return Dataset(data)
    raise InputError(f"unsupported data of type {type(data).__name__}: give a folder of images, a .csv/.parquet "
                     "file, a tensor, a numpy array, a torch Dataset/DataLoader or a Hugging Face dataset.")
