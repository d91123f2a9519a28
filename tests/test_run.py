"""Data-set runs (perspicio.run): sources, the resumable store, crash safety, fingerprints,
engines, the CLI and the report."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("zarr")
pytest.importorskip("pyarrow")

import perspicio  # noqa: E402
from perspicio.cli import main  # noqa: E402
from perspicio.errors import InputError, OptionError  # noqa: E402
from perspicio.run import StoreError, run  # noqa: E402
from perspicio.run.store import Store  # noqa: E402
from perspicio.zoo.digits import digits_data, load_digits_cnn  # noqa: E402

N_IMAGES = 40


@pytest.fixture(scope="module")
def digits():
    return load_digits_cnn()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    """40 digit images as PNG files in class sub-folders, plus one corrupt file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("digits_png")
    x, y = digits_data("test", pixels=True)
    for i in range(N_IMAGES):
        d = root / str(int(y[i]))
        d.mkdir(exist_ok=True)
        Image.fromarray((x[i, 0].numpy() * 255).round().astype(np.uint8)).save(d / f"img{i:03d}.png")
    (root / "3" / "broken.png").parent.mkdir(exist_ok=True)
    (root / "3" / "broken.png").write_bytes(b"this is not a png")
    return root


def _same_store(a: Path, b: Path, methods: list[str]) -> None:
    ra, rb = Store(a).rows(volatile=False), Store(b).rows(volatile=False)
    assert len(ra) == len(rb) and len(ra) > 0
    assert ra.equals(rb), "rows differ"
    for m in methods:
        np.testing.assert_array_equal(np.asarray(Store(a).attributions(m)[:]), np.asarray(Store(b).attributions(m)[:]))


def test_folder_run_rows_failures_and_equality_with_explain(digits, image_dir, tmp_path):
    res = run(digits, image_dir, methods="gradcam,saliency", store=tmp_path / "s", chunk_size=8, target="predicted")
    rows = res.rows()
    n = N_IMAGES + 1
    assert len(rows) == 2 * n and rows.groupby(["index", "method"]).size().max() == 1
    bad = rows[rows["sample_id"] == os.path.join("3", "broken.png")]
    assert set(bad["status"]) == {"failed"} and bad["error"].str.contains("cannot read").all()
    assert res.summary.failed_samples == 1 and res.summary.computed_chunks == res.summary.chunks == 6
    ok = rows[(rows["status"] == "ok") & (rows["method"] == "gradcam")]
    # labels come from the class folders and agree with the data set
    assert ok["label"].notna().all() and (ok["correct"].mean() > 0.8)
    # the stored attributions equal perspicio.explain on the same images
    idx = ok["index"].to_numpy()[:8]
    paths = ok.set_index("index").loc[idx, "path"].tolist()
    x = torch.cat([digits.preprocess(p) for p in paths])
    for method in ("gradcam", "saliency"):
        want = perspicio.explain(digits, x, method=method).attributions.numpy()
        got = np.asarray(res.attributions(method).get_orthogonal_selection((idx,)))
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    broken = int(bad["index"].iloc[0])
    assert np.isnan(np.asarray(res.attributions("gradcam")[broken])).all()


def test_resume_skips_done_chunks_and_recomputes_partial_ones(digits, tmp_path):
    x, y = digits_data("test")
    x, y = x[:30], y[:30].tolist()
    kw = dict(methods="gradcam", metrics="sparseness", chunk_size=8, labels=y, target="label")
    ref = run(digits, x, store=tmp_path / "ref", **kw)
    again = run(digits, x, store=tmp_path / "ref", **kw)
    assert again.summary.computed_chunks == 0 and again.summary.skipped_chunks == 4
    # a chunk whose commit never happened is recomputed, and the store ends identical
    s2 = tmp_path / "s2"
    run(digits, x, store=s2, **kw)
    Store(s2).chunk_path(2).unlink()
    import zarr

    arr = zarr.open_array(str(s2 / "attributions" / "gradcam"), mode="r+")
    arr[16:24] = np.zeros((8, *arr.shape[1:]), np.float32)  # a half-written chunk
    res = run(digits, x, store=s2, **kw)
    assert res.summary.computed_chunks == 1
    _same_store(tmp_path / "ref", s2, ["gradcam"])
    assert ref.rows()["metric:sparseness"].notna().all()


def test_changed_model_data_or_options_are_refused_unless_overwrite(digits, tmp_path):
    x = digits_data("test")[0][:10]
    store = tmp_path / "s"
    run(digits, x, methods="gradcam", store=store, chunk_size=5)
    with pytest.raises(StoreError, match="configuration changed"):
        run(digits, x, methods="gradcam", store=store, chunk_size=5, method_options={"gradcam": {"relu": False}})
    with pytest.raises(StoreError, match="data changed"):
        run(digits, x + 0.01, methods="gradcam", store=store, chunk_size=5)
    other = load_digits_cnn()
    with torch.no_grad():
        other.model.fc.bias.add_(0.5)
    with pytest.raises(StoreError, match="model changed"):
        run(other, x, methods="gradcam", store=store, chunk_size=5)
    res = run(other, x, methods="gradcam", store=store, chunk_size=5, overwrite=True)
    assert res.summary.computed_chunks == 2
    # a non-store directory is not silently emptied
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a run store"):
        run(digits, x, methods="gradcam", store=junk)
    assert (junk / "keep.txt").read_text() == "mine"


def test_changed_input_file_is_detected(digits, image_dir, tmp_path):
    import shutil

    data = tmp_path / "imgs"
    shutil.copytree(image_dir / "0", data / "0")
    store = tmp_path / "s"
    run(digits, data, store=store)
    f = sorted((data / "0").iterdir())[0]
    f.write_bytes(f.read_bytes() + b"\0")
    with pytest.raises(StoreError, match="data changed"):
        run(digits, data, store=store)


def test_store_from_a_newer_version_is_refused(digits, tmp_path):
    x = digits_data("test")[0][:4]
    store = tmp_path / "s"
    run(digits, x, store=store)
    m = json.loads((store / "perspicio-run.json").read_text())
    m["format"] = 99
    (store / "perspicio-run.json").write_text(json.dumps(m))
    with pytest.raises(StoreError, match="newer perspicio"):
        run(digits, x, store=store)
    assert main(["report", str(store)]) == 2


def test_disk_full_is_reported_and_the_store_stays_resumable(digits, tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    x = digits_data("test")[0][:12]
    store = tmp_path / "s"
    real = pq.write_table
    calls = {"n": 0}

    def flaky(table, where, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(table, where, *a, **k)

    monkeypatch.setattr(pq, "write_table", flaky)
    with pytest.raises(StoreError, match="no space left.*resumable"):
        run(digits, x, store=store, chunk_size=4)
    monkeypatch.setattr(pq, "write_table", real)
    res = run(digits, x, store=store, chunk_size=4)
    assert res.summary.skipped_chunks == 1 and res.summary.computed_chunks == 2
    run(digits, x, store=tmp_path / "ref", chunk_size=4)
    _same_store(tmp_path / "ref", store, ["gradcam"])


_CHILD = """
import sys
from perspicio.cli import main
sys.exit(main(["run", sys.argv[1], "--model", "digits", "--methods", "gradcam,saliency", "--store", sys.argv[2],
               "--chunk-size", "8", "-q"]))
"""


@pytest.mark.slow
def test_sigkill_in_the_middle_of_a_write_then_rerun_gives_the_uninterrupted_store(digits, image_dir, tmp_path):
    ref, crashed = tmp_path / "ref", tmp_path / "crashed"
    assert main(["run", str(image_dir), "--model", "digits", "--methods", "gradcam,saliency", "--store", str(ref),
                 "--chunk-size", "8", "-q"]) == 0
    flag = tmp_path / "paused"
    env = dict(os.environ, PERSPICIO_RUN_PAUSE_CHUNK="2", PERSPICIO_RUN_PAUSE_FLAG=str(flag))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(image_dir), str(crashed)], env=env)
    try:
        deadline = time.time() + 300
        while not flag.exists():
            assert proc.poll() is None, "the run ended before reaching the pause point"
            assert time.time() < deadline
            time.sleep(0.1)
        os.kill(proc.pid, signal.SIGKILL)  # chunk 2's arrays are written, its rows are not committed
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 2 not in Store(crashed).done_chunks() and {0, 1} <= Store(crashed).done_chunks()
    assert main(["run", str(image_dir), "--model", "digits", "--methods", "gradcam,saliency", "--store", str(crashed),
                 "--chunk-size", "8", "-q"]) == 0
    _same_store(ref, crashed, ["gradcam", "saliency"])
    # and a kill at an arbitrary moment, twice
    for delay in (1.0, 2.5):
        s = tmp_path / f"random{delay}"
        proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(image_dir), str(s)])
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert main(["run", str(image_dir), "--model", "digits", "--methods", "gradcam,saliency", "--store", str(s),
                     "--chunk-size", "8", "-q"]) == 0
        _same_store(ref, s, ["gradcam", "saliency"])


def test_tabular_csv_and_torch_dataset_sources(tmp_path):
    pytest.importorskip("sklearn")
    import pandas as pd

    from perspicio.zoo.tabular import load_tabular

    demo = load_tabular("breast_cancer", "mlp")
    df = pd.DataFrame(demo.X_test[:20], columns=list(demo.feature_names))
    df["label"] = demo.y_test[:20]
    csv = tmp_path / "rows.csv"
    df.to_csv(csv, index=False)
    res = run(demo, csv, methods="deeplift,feature_ablation", store=tmp_path / "s", target="label", chunk_size=8)
    rows = res.rows()
    assert len(rows) == 40 and (rows["status"] == "ok").all()
    assert res.attributions("deeplift").shape == (20, 30)
    want = perspicio.explain(demo, torch.as_tensor(demo.X_test[:8], dtype=torch.float32), method="deeplift",
                             target=[int(v) for v in demo.y_test[:8]]).attributions.numpy()
    np.testing.assert_allclose(np.asarray(res.attributions("deeplift")[:8]), want, rtol=1e-5, atol=1e-7)

    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits_data("test")
    ds = TensorDataset(x[:10], y[:10])
    res = run(load_digits_cnn(), DataLoader(ds, batch_size=4), methods="gradcam", store=tmp_path / "d", target="label")
    rows = res.rows()
    assert rows["target"].tolist() == y[:10].tolist()


def test_layer_resolution_maps_and_dict_item_datasets(digits, tmp_path):
    x, y = digits_data("test")
    res = run(digits, x[:6], methods="gradcam", store=tmp_path / "layer", maps="layer")
    want = perspicio.explain(digits, x[:6], method="gradcam").raw.numpy()
    assert res.attributions("gradcam").shape == want.shape
    np.testing.assert_allclose(np.asarray(res.attributions("gradcam")[:]), want, rtol=1e-5, atol=1e-7)

    class DictItems:  # the shape of a Hugging Face `datasets` table: dict items, class names in .features
        class features:  # noqa: N801
            @staticmethod
            def get(key):
                return type("ClassLabel", (), {"names": [f"digit {i}" for i in range(10)]})() if key == "label" else None

        def __len__(self):
            return 5

        def __getitem__(self, i):
            if i == 3:
                raise OSError("image 3 is missing on the server")
            return {"pixel_values": x[i], "label": int(y[i])}

    res = run(digits, DictItems(), methods="gradcam", store=tmp_path / "dict", target="label")
    rows = res.rows()
    assert rows["target"].tolist()[:3] == y[:3].tolist()
    assert rows.loc[rows["index"] == 3, "error"].str.contains("missing on the server").all()


def test_progress_lines_when_not_on_a_terminal(digits, tmp_path, capsys):
    run(digits, digits_data("test")[0][:10], store=tmp_path / "s", chunk_size=4, progress=True)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and err[-1].startswith("run: 10/10 samples") and "samples/s" in err[0] and "ETA" in err[0]


def test_bad_input_is_refused_clearly(digits, tmp_path):
    x = digits_data("test")[0][:4]
    with pytest.raises(OptionError, match="engine must be one of"):
        run(digits, x, store=tmp_path / "a", engine="spark")
    with pytest.raises(OptionError, match="target must be"):
        run(digits, x, store=tmp_path / "a", target="cat")
    with pytest.raises(OptionError, match="no labels"):
        run(digits, x, store=tmp_path / "a", target="label")
    with pytest.raises(InputError, match="no such file"):
        run(digits, tmp_path / "missing", store=tmp_path / "a")
    with pytest.raises(OptionError, match="chunk_size"):
        run(digits, x, store=tmp_path / "a", chunk_size=0)
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(StoreError, match="is a file"):
        run(digits, x, store=f)


def test_run_leaves_the_model_untouched(tmp_path, assert_no_hooks):
    demo = load_digits_cnn()
    before = {k: v.clone() for k, v in demo.model.state_dict().items()}
    demo.model.train()
    run(demo, digits_data("test")[0][:6], methods="gradcam,saliency", store=tmp_path / "s")
    assert demo.model.training
    assert all(torch.equal(before[k], v) for k, v in demo.model.state_dict().items())
    assert all(p.grad is None for p in demo.model.parameters())
    assert_no_hooks(demo.model)


def test_cli_run_and_report(digits, image_dir, tmp_path, capsys):
    store = tmp_path / "s"
    assert main(["run", str(image_dir), "--model", "digits", "--methods", "gradcam,saliency", "--metrics", "sparseness",
                 "--store", str(store), "--chunk-size", "16", "-q"]) == 0
    out = capsys.readouterr().out
    assert "41 samples in 3 chunks: 3 computed" in out and "1 samples failed" in out
    assert main(["run", str(image_dir), "--model", "digits", "--store", str(store), "--target", "dog"]) == 2
    assert "--target must be" in capsys.readouterr().err
    assert main(["report", str(store), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    for section in ("Mean map per class", "Metric distributions", "Where the methods disagree most",
                    "Misclassified samples", "Border reliance", "SpRAy"):
        assert section in page
    assert "http://" not in page and "https://" not in page  # self-contained
    assert main(["report", str(tmp_path / "nothing")]) == 2


# ----------------------------------------------------------------------------- SpRAy


def test_spray_separates_two_known_strategies_and_picks_k_by_the_eigengap():
    from perspicio.run.spray import spray

    rng = np.random.default_rng(0)
    maps = np.zeros((40, 16, 16))
    maps[:25, 6:10, 6:10] = 1.0  # evidence on the object in the centre
    maps[25:, 0:3, 0:3] = 1.0  # a corner shortcut
    maps += rng.normal(0, 0.05, maps.shape)
    res = spray(maps, seed=0)
    assert res.k == 2
    assert res.sizes == [25, 15]
    assert (res.labels[:25] == 0).all() and (res.labels[25:] == 1).all()
    assert res.mean_maps[1][0:3, 0:3].mean() > 5 * abs(res.mean_maps[1][6:10, 6:10].mean())
    assert res.eigengaps[1] == res.eigengaps[: len(res.eigengaps)].max()
    # deterministic
    again = spray(maps, seed=0)
    assert np.array_equal(res.labels, again.labels)
    with pytest.raises(InputError, match="at least 4"):
        spray(maps[:3])


@pytest.mark.slow
def test_spray_finds_a_planted_corner_shortcut_in_a_trained_digits_cnn():
    """Every training image of class 3 carries a white corner mark; SpRAy on the occlusion maps of
    class-3 images (half of them marked) must isolate the marked ones in a cluster."""
    import torch.nn.functional as F

    from perspicio.run.spray import spray
    from perspicio.zoo.digits import DigitsCNN, DigitsPreprocess

    cls = 3
    g = torch.Generator().manual_seed(0)
    xp, y = digits_data("train", pixels=True)
    xp = xp.clone()
    xp[y == cls, 0, 0:2, 0:2] = 1.0
    norm = DigitsPreprocess().normalize
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsCNN()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    X = norm(xp)
    for _ in range(5):
        perm = torch.randperm(len(X), generator=g)
        for s in range(0, len(X), 64):
            b = perm[s:s + 64]
            loss = F.cross_entropy(model(X[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xa, ya = digits_data("all", pixels=True)
    xs = xa[ya == cls].clone()
    marked = torch.rand(len(xs), generator=g) < 0.5
    xs[marked, 0, 0:2, 0:2] = 1.0
    maps = perspicio.explain(model, norm(xs), method="occlusion", target=cls).attributions.numpy()
    res = spray(maps, seed=0)
    best = max(range(res.k), key=lambda c: marked.numpy()[res.labels == c].mean())
    members = res.labels == best
    purity = marked.numpy()[members].mean()
    recall = members[marked.numpy()].mean()
    assert purity > 0.9 and recall > 0.9, (res.k, res.sizes, purity, recall)
    assert res.mean_maps[best][0:2, 0:2].sum() > res.mean_maps[best][3:6, 3:6].sum()


# ----------------------------------------------------------------------------- Ray engine


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_equals_local_and_survives_a_killed_worker(digits, image_dir, tmp_path, monkeypatch, ray_cluster):
    import threading

    methods = ["gradcam", "saliency"]
    kw = dict(methods=methods, metrics="sparseness", chunk_size=8, target="predicted")
    run(digits, image_dir, store=tmp_path / "local", **kw)
    res = run(digits, image_dir, store=tmp_path / "ray", engine="ray", workers=2, **kw)
    assert res.summary.engine == "ray" and res.summary.failed_samples == 1
    _same_store(tmp_path / "local", tmp_path / "ray", methods)

    # a worker SIGKILLed in the middle of writing chunk 3: the chunk is retried on a new actor
    flag = tmp_path / "paused"
    monkeypatch.setenv("PERSPICIO_RUN_PAUSE_CHUNK", "3")
    monkeypatch.setenv("PERSPICIO_RUN_PAUSE_FLAG", str(flag))
    ray_cluster.shutdown()  # workers of a fresh cluster inherit the variables above
    ray_cluster.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.time() + 300
        while time.time() < deadline:
            if flag.exists() and flag.read_text().strip().isdigit():
                pid = int(flag.read_text())
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.1)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = run(digits, image_dir, store=tmp_path / "ray2", engine="ray", workers=2, **kw)
    t.join(timeout=5)
    assert killed, "no worker reached the pause point"
    assert res.summary.computed_chunks == res.summary.chunks
    _same_store(tmp_path / "local", tmp_path / "ray2", methods)


@pytest.mark.parametrize("overlap", [True, False])
def test_overlapped_and_inline_local_runs_write_the_same_store(digits, image_dir, tmp_path, monkeypatch, overlap):
    """The local engine overlaps decoding and writes with compute only when a core is spare; both
    ways give the same store, and the chosen way is the one that ran."""
    import perspicio.run.engine as engine

    reference = run(digits, image_dir, methods="gradcam", store=tmp_path / "ref", chunk_size=8)
    threads_seen: set[str] = set()
    original = engine.load_chunk

    def spy(*args, **kwargs):
        import threading

        threads_seen.add(threading.current_thread().name)
        return original(*args, **kwargs)

    monkeypatch.setattr(engine, "_spare_core", lambda: overlap)
    monkeypatch.setattr(engine, "load_chunk", spy)
    res = run(digits, image_dir, methods="gradcam", store=tmp_path / "s", chunk_size=8)
    assert res.summary.computed_chunks == reference.summary.computed_chunks
    _same_store(tmp_path / "ref", tmp_path / "s", ["gradcam"])
    on_loader = any(name.startswith("perspicio-run-loader") for name in threads_seen)
    assert on_loader == overlap


def test_rows_ignore_an_image_preprocessing_and_gradient_methods_run_on_them(tmp_path):
    """The CLI attaches an image preprocessing to every torchvision/timm/factory model; a table of
    feature rows is explained as rows (with integrated gradients, which takes (N, F) rows)."""
    import pandas as pd

    from perspicio.zoo.preprocess import ImagePreprocess
    from perspicio.zoo.registry import ZooModel

    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).eval()
    zm = ZooModel(model=mlp, preprocess=ImagePreprocess(), labels=["a", "b", "c"], name="mlp")
    rng = np.random.default_rng(0)
    values = rng.normal(size=(12, 5)).astype(np.float32)
    csv = tmp_path / "rows.csv"
    pd.DataFrame(values, columns=[f"f{i}" for i in range(5)]).to_csv(csv, index=False)
    res = run(zm, csv, methods="integrated_gradients", store=tmp_path / "s", chunk_size=4,
              method_options={"integrated_gradients": {"steps": 16}})
    assert (res.rows()["status"] == "ok").all()
    want = perspicio.explain(mlp, torch.from_numpy(values), method="integrated_gradients", steps=16).attributions
    np.testing.assert_allclose(np.asarray(res.attributions("integrated_gradients")[:]), want.numpy(),
                               rtol=1e-5, atol=1e-7)


def test_rows_an_image_model_cannot_take_and_targets_past_its_classes_are_refused_before_any_work(tmp_path):
    """Refused by run() itself (not only the CLI), before the store exists; a rows model with the
    same image preprocessing is accepted (the test above)."""
    import pandas as pd

    from perspicio.zoo.preprocess import ImagePreprocess
    from perspicio.zoo.registry import ZooModel

    torch.manual_seed(0)
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 3)).eval()
    zm = ZooModel(model=cnn, preprocess=ImagePreprocess(), labels=["a", "b", "c"], name="cnn")
    csv = tmp_path / "rows.csv"
    pd.DataFrame(np.zeros((4, 5)), columns=[f"f{i}" for i in range(5)]).to_csv(csv, index=False)
    with pytest.raises(InputError, match="no image-path column.*cannot take the columns as feature rows"):
        run(zm, csv, methods="saliency", store=tmp_path / "s")
    assert not (tmp_path / "s").exists() and cnn[0].weight.requires_grad and not cnn.training
    with pytest.raises(OptionError, match="target 3 is out of range: the model has 3 classes"):
        run(zm, torch.zeros(2, 3, 8, 8), methods="saliency", store=tmp_path / "t", target=3)
    assert not (tmp_path / "t").exists()
