"""Data-set runs into a store on an fsspec file system (object storage: no rename): the same
rows and arrays as a local store, the same resume and refusal rules, a crash between a chunk's
arrays and its commit recomputed, and the report written next to the store."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import torch

pytest.importorskip("zarr")
pytest.importorskip("pyarrow")
fsspec = pytest.importorskip("fsspec")

import perspicio.run.store as store_module  # noqa: E402
from perspicio.run import StoreError, run  # noqa: E402
from perspicio.run.report import write_report  # noqa: E402
from perspicio.run.store import Store  # noqa: E402
from perspicio.zoo.digits import digits_data, load_digits_cnn  # noqa: E402

N = 24


@pytest.fixture(scope="module")
def digits():
    return load_digits_cnn()


@pytest.fixture(scope="module")
def images():
    x, y = digits_data("test", pixels=True)
    return x[:N].clone(), [int(v) for v in y[:N]]


@pytest.fixture
def url():
    """A fresh store location on fsspec's in-memory file system (removed afterwards)."""
    root = f"memory://perspicio-test-{uuid.uuid4().hex}"
    yield f"{root}/store"
    fs = fsspec.filesystem("memory")
    if fs.exists(root.removeprefix("memory://")):
        fs.rm(root.removeprefix("memory://"), recursive=True)


def _same(a: Store, b: Store, methods: list[str]) -> None:
    ra, rb = a.rows(volatile=False), b.rows(volatile=False)
    assert len(ra) == len(rb) > 0
    assert ra.equals(rb)
    for m in methods:
        np.testing.assert_array_equal(np.asarray(a.attributions(m)[:]), np.asarray(b.attributions(m)[:]))


def test_a_remote_store_holds_the_same_run_as_a_local_one(digits, images, url, tmp_path):
    x, y = images
    local = run(digits, x, labels=y, methods="gradcam,saliency", store=tmp_path / "s", chunk_size=8)
    remote = run(digits, x, labels=y, methods="gradcam,saliency", store=url, chunk_size=8)
    assert remote.store.remote and not local.store.remote
    assert remote.summary.store == url and remote.summary.computed_chunks == 3
    _same(local.store, remote.store, ["gradcam", "saliency"])
    fs = fsspec.filesystem("memory")
    root = url.removeprefix("memory://")
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/rows", detail=False))
    assert names == ["chunk-000000.parquet", "chunk-000001.parquet", "chunk-000002.parquet"]
    assert not any(".tmp" in p for p in fs.find(root))  # no temporary objects: one PUT per commit
    again = run(digits, x, labels=y, methods="gradcam,saliency", store=url, chunk_size=8)
    assert again.summary.skipped_chunks == 3 and again.summary.computed_chunks == 0


def test_a_crash_between_arrays_and_commit_is_recomputed_on_resume(digits, images, url, tmp_path, monkeypatch):
    x, y = images
    reference = run(digits, x, labels=y, methods="gradcam", store=tmp_path / "ref", chunk_size=8)

    class Crash(RuntimeError):
        pass

    def crash_at_chunk_1(chunk: int) -> None:
        if chunk == 1:
            raise Crash("killed between the arrays and the commit")

    monkeypatch.setattr(store_module, "_pause_for_tests", crash_at_chunk_1)
    with pytest.raises(Crash):
        run(digits, x, labels=y, methods="gradcam", store=url, chunk_size=8)
    st = Store(url)
    assert st.done_chunks() == {0}  # chunk 1's arrays were written, its rows never committed
    assert np.isfinite(np.asarray(st.attributions("gradcam")[8:16])).all()
    monkeypatch.undo()
    resumed = run(digits, x, labels=y, methods="gradcam", store=url, chunk_size=8)
    assert resumed.summary.skipped_chunks == 1 and resumed.summary.computed_chunks == 2
    _same(reference.store, resumed.store, ["gradcam"])


def test_a_remote_store_refuses_a_different_run_and_never_empties_foreign_data(digits, images, url):
    x, y = images
    run(digits, x, labels=y, methods="gradcam", store=url, chunk_size=8)
    with pytest.raises(StoreError, match="holds a different run"):
        run(digits, x, labels=y, methods="saliency", store=url, chunk_size=8)
    replaced = run(digits, x, labels=y, methods="saliency", store=url, chunk_size=8, overwrite=True)
    assert set(replaced.rows()["method"]) == {"saliency"}

    fs = fsspec.filesystem("memory")
    foreign = url.removeprefix("memory://") + "-foreign"
    fs.pipe_file(f"{foreign}/keep.txt", b"not a store")
    with pytest.raises(StoreError, match="not a run store"):
        run(digits, x, labels=y, methods="gradcam", store=f"memory://{foreign}", chunk_size=8)
    assert fs.cat_file(f"{foreign}/keep.txt") == b"not a store"
    fs.rm(foreign, recursive=True)


def test_the_report_of_a_remote_store_is_written_next_to_it(digits, images, url, tmp_path):
    x, y = images
    run(digits, x, labels=y, methods="gradcam", store=url, chunk_size=8)
    where = write_report(url, spray=False)
    assert where == f"{url}/report.html"
    html = fsspec.filesystem("memory").cat_file(url.removeprefix("memory://") + "/report.html").decode()
    assert "<html" in html and "gradcam" in html
    local = write_report(url, tmp_path / "r.html", spray=False)
    assert local.read_text(encoding="utf-8") == html


def test_file_urls_are_local_paths(digits, images, tmp_path):
    x, y = images
    res = run(digits, x[:8], labels=y[:8], methods="gradcam", store=f"file://{tmp_path / 's'}", chunk_size=8)
    assert not res.store.remote and (tmp_path / "s" / "perspicio-run.json").is_file()
    assert torch.isfinite(torch.as_tensor(np.asarray(Store(tmp_path / "s").attributions("gradcam")[:]))).all()


def test_an_unknown_protocol_is_a_clear_error(digits, images):
    x, y = images
    with pytest.raises(Exception) as info:
        run(digits, x[:8], labels=y[:8], methods="gradcam", store="nosuchproto://bucket/run", chunk_size=8)
    assert "nosuchproto" in str(info.value) and "Traceback" not in str(info.value)
