"""The store of a run: a directory any later call can resume, read and report on.

Layout::

    DIR/perspicio-run.json          manifest: format, fingerprints, configuration, shapes
    DIR/attributions/<method>       Zarr array (N, *shape) float32, NaN where a sample failed
    DIR/rows/chunk-000042.parquet   one row per (sample, method) of chunk 42

Commit protocol, per chunk: (1) the chunk's slices of every attribution array are written (each
run chunk is exactly one Zarr chunk along the sample axis, so a rewrite replaces it whole);
(2) its rows are written to a temporary file, flushed to disk and renamed to
``chunk-NNNNNN.parquet``. The rename is the commit: a chunk is complete if and only if its
Parquet file exists. A process killed at any point leaves either a committed chunk or one that
a re-run recomputes from scratch, so a resumed store equals an uninterrupted one, without
duplicate rows.

A URL with a scheme other than ``file://`` (``s3://bucket/run``, ``gs://...``, ``memory://...``)
is a store on a file system that fsspec understands (object storage: no rename). There the
commit is the chunk's Parquet file written as one object (``pipe_file``: a single PUT, which
object stores make visible whole or not at all), after the chunk's arrays; the manifest is one
object too. The protocol's guarantee is the same. ``file://`` URLs are local paths.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..errors import OptionError, PerspicioError

#: the store format this version writes; a store with a higher number is refused
FORMAT = 1
MANIFEST = "perspicio-run.json"
_CHUNK_RE = re.compile(r"^chunk-(\d{6,})\.parquet$")
#: columns whose values legitimately differ between two runs of the same work
VOLATILE_COLUMNS = ("seconds", "provenance")


class StoreError(PerspicioError):
    """The store cannot be used as asked (fingerprint mismatch, newer format, disk full)."""


def _needs(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise OptionError(f"data-set runs need {module.split('.')[0]}: pip install 'perspicio[run]'.") from None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_error(exc: OSError, path: Path) -> StoreError:
    if exc.errno == errno.ENOSPC:
        return StoreError(f"no space left on the device while writing the store {str(path)!r}; the store stays "
                          "resumable: free some space and run the same command again.")
    return StoreError(f"cannot write the store {str(path)!r}: {exc.strerror or exc}.")


def _remote(location: str | os.PathLike[str]) -> tuple[Any, str]:
    """``(fsspec file system, path in it)`` for a URL with a scheme other than ``file``; else
    ``(None, local path)``."""
    text = os.fspath(location)
    if not isinstance(text, str) or "://" not in text:
        return None, str(text)
    scheme, rest = text.split("://", 1)
    if scheme == "file":
        return None, rest
    core = _needs("fsspec.core")
    try:
        fs, root = core.url_to_fs(text)
    except (ImportError, ValueError) as exc:
        raise OptionError(f"cannot open the store {text!r}: {exc}") from None
    return fs, root.rstrip("/")


class Store:
    """A run's directory: manifest, attribution arrays and committed row chunks.

    ``location`` is a local directory or a URL fsspec understands (module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.fs, root = _remote(path)
        #: the location as given (a URL for remote stores; what workers reopen)
        self.url = os.fspath(path) if self.fs is not None else str(Path(root))
        self.path = Path(root) if self.fs is None else PurePosixPath(root)
        self._arrays: dict[str, Any] = {}

    @property
    def remote(self) -> bool:
        """Whether the store lives on an fsspec file system (object storage) rather than a local path."""
        return self.fs is not None

    def _write_bytes(self, path: Any, data: bytes) -> None:
        """Write one file atomically: fsync + rename locally, one object (a single PUT) remotely."""
        if self.fs is None:
            _atomic_write(path, data)
        else:
            self.fs.pipe_file(str(path), data)

    def _read_bytes(self, path: Any) -> bytes:
        return path.read_bytes() if self.fs is None else self.fs.cat_file(str(path))

    def _zarr_store(self, read_only: bool) -> Any:
        if self.fs is None:
            return str(self.path / "attributions")
        storage = _needs("zarr.storage")
        return storage.FsspecStore.from_url(f"{self.url.rstrip('/')}/attributions", read_only=read_only)

    # ------------------------------------------------------------------ manifest

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        if self.fs is not None:
            return bool(self.fs.isfile(str(self.manifest_path)))
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        """The manifest; refuses stores of a newer format and directories that are not stores."""
        try:
            data = json.loads(self._read_bytes(self.manifest_path).decode("utf-8"))
        except FileNotFoundError:
            raise StoreError(f"{self.url!r} is not a perspicio run store (no {MANIFEST}).") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"the store manifest {str(self.manifest_path)!r} is unreadable: {exc}.") from None
        fmt = data.get("format")
        if not isinstance(fmt, int):
            raise StoreError(f"{str(self.manifest_path)!r} is not a perspicio run manifest.")
        if fmt > FORMAT:
            raise StoreError(f"the store {self.url!r} was written by a newer perspicio (store format {fmt}, "
                             f"this version reads up to {FORMAT}); upgrade perspicio to read or resume it.")
        return data

    def open(self, manifest: Mapping[str, Any], *, overwrite: bool = False) -> dict[str, Any]:
        """Create the store, or check that an existing one holds the same work.

        The work is the same when every fingerprint (model, data, configuration) matches; a
        different one is refused unless ``overwrite`` (which empties the store first)."""
        manifest = dict(manifest, format=FORMAT)
        if self._is_file(self.path):
            raise StoreError(f"the store path {self.url!r} is a file, not a directory.")
        if self.exists() or self._children():
            if not self.exists():
                if not overwrite:
                    raise StoreError(f"{self.url!r} is a non-empty directory that is not a run store; "
                                     "choose another --store or pass --overwrite to empty it.")
            else:
                old = self.manifest()
                changed = [k for k, v in manifest["fingerprints"].items() if old.get("fingerprints", {}).get(k) != v]
                if not changed:
                    return old
                if not overwrite:
                    raise StoreError(
                        f"the store {self.url!r} holds a different run: the {', '.join(changed)} changed "
                        f"since it was written. Pass --overwrite (overwrite=True) to replace it, or use another store.")
            self._clear()
        try:
            if self.fs is None:
                (self.path / "rows").mkdir(parents=True, exist_ok=True)
            else:
                self.fs.makedirs(str(self.path / "rows"), exist_ok=True)
            self._write_bytes(self.manifest_path, json.dumps(manifest, indent=1, sort_keys=True).encode())
        except OSError as exc:
            raise _disk_error(exc, self.path) from None
        return manifest

    def _is_file(self, path: Any) -> bool:
        if self.fs is None:
            return path.exists() and not path.is_dir()
        return bool(self.fs.isfile(str(path)))

    def _children(self, path: Any = None) -> list[str]:
        """Full paths of the entries of ``path`` (default: the store's root); [] if it does not exist."""
        path = self.path if path is None else path
        if self.fs is None:
            return [str(p) for p in path.iterdir()] if path.is_dir() else []
        try:
            return [str(p).rstrip("/") for p in self.fs.ls(str(path), detail=False)]
        except FileNotFoundError:
            return []

    def _clear(self) -> None:
        if self.fs is not None:
            for child in self._children():
                self.fs.rm(child, recursive=True)
            return
        for child in self.path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        data = self.manifest()
        data.update(fields)
        try:
            self._write_bytes(self.manifest_path, json.dumps(data, indent=1, sort_keys=True).encode())
        except OSError as exc:
            raise _disk_error(exc, self.path) from None
        return data

    # ------------------------------------------------------------------ chunks

    def done_chunks(self) -> set[int]:
        """Indices of the committed chunks."""
        names = (PurePosixPath(p).name for p in self._children(self.path / "rows"))
        return {int(m.group(1)) for name in names if (m := _CHUNK_RE.match(name))}

    def chunk_path(self, chunk: int) -> Path:
        return self.path / "rows" / f"chunk-{chunk:06d}.parquet"

    def _array(self, method: str, n: int, shape: Sequence[int], chunk_size: int) -> Any:
        arr = self._arrays.get(method)
        if arr is not None:
            return arr
        zarr = _needs("zarr")
        group = zarr.open_group(store=self._zarr_store(read_only=False), mode="a")
        if method in group.array_keys():
            arr = group[method]
            if tuple(arr.shape) != (n, *shape):
                raise StoreError(f"the store's {method!r} array has shape {tuple(arr.shape)}, "
                                 f"this run makes {(n, *shape)}; use --overwrite.")
        else:
            arr = group.create_array(method, shape=(n, *shape), chunks=(chunk_size, *shape),
                                     dtype="float32", fill_value=np.nan, overwrite=False)
        self._arrays[method] = arr
        return arr

    def write_chunk(self, chunk: int, start: int, n: int, chunk_size: int,
                    attributions: Mapping[str, np.ndarray], rows: Sequence[Mapping[str, Any]],
                    schema: Any) -> None:
        """Write one chunk's arrays, then commit its rows (see the module docstring)."""
        pa = _needs("pyarrow")
        pq = _needs("pyarrow.parquet")
        try:
            for method, values in attributions.items():
                arr = self._array(method, n, values.shape[1:], chunk_size)
                arr[start:start + len(values)] = values
            _pause_for_tests(chunk)
            table = pa.Table.from_pylist(list(rows), schema=schema)
            final = self.chunk_path(chunk)
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            # the commit: an fsync'd rename on disk, one whole object (a single PUT) on an object store
            self._write_bytes(final, sink.getvalue().to_pybytes())
        except OSError as exc:
            raise _disk_error(exc, self.path) from None

    # ------------------------------------------------------------------ reading

    def rows(self, *, volatile: bool = True) -> Any:
        """Every committed row as a pandas DataFrame, ordered by sample index then method
        (``volatile=False`` drops the columns that differ between identical runs: timings, provenance)."""
        pd = _needs("pandas")
        pq = _needs("pyarrow.parquet")
        files = sorted(self.chunk_path(c) for c in self.done_chunks())
        if not files:
            return pd.DataFrame()
        if self.fs is None:
            tables = [pq.read_table(f) for f in files]
        else:
            tables = [pq.read_table(self.fs.open(str(f), "rb")) for f in files]
        df = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
        df = df.sort_values(["index", "method"], kind="stable").reset_index(drop=True)
        if not volatile:
            df = df.drop(columns=[c for c in VOLATILE_COLUMNS if c in df.columns])
        return df

    def attributions(self, method: str) -> Any:
        """The (N, *shape) Zarr array of ``method`` (NaN for failed or not yet computed samples)."""
        zarr = _needs("zarr")
        group = zarr.open_group(store=self._zarr_store(read_only=True), mode="r")
        if method not in group.array_keys():
            raise StoreError(f"the store has no attributions for {method!r}; it has: {', '.join(sorted(group.array_keys()))}.")
        return group[method]

    def status(self) -> dict[str, int]:
        m = self.manifest()
        done = self.done_chunks()
        return {"samples": m["n_samples"], "chunks": m["n_chunks"], "done_chunks": len(done)}

    def __repr__(self) -> str:
        return f"Store({self.url!r})"


def _pause_for_tests(chunk: int) -> None:
    """Fault injection for the crash tests: with ``PERSPICIO_RUN_PAUSE_CHUNK=k`` and
    ``PERSPICIO_RUN_PAUSE_FLAG=FILE``, the first process to reach chunk k writes its pid to FILE and
    stops between writing the chunk's arrays and committing its rows, so a test can SIGKILL it
    exactly in the middle of a write (a process that finds FILE already there goes on)."""
    value = os.environ.get("PERSPICIO_RUN_PAUSE_CHUNK")
    flag = os.environ.get("PERSPICIO_RUN_PAUSE_FLAG")
    if value is None or not flag or not value.isdigit() or int(value) != chunk:
        return
    try:
        fd = os.open(flag, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    time.sleep(3600)
