"""Benchmark: data-set runs (``perspicio.run``) against the single-call engine's best throughput.

For each case the same images are explained twice in this one process, round-robin:

* *single call*: the images preloaded as one tensor, ``perspicio.explain`` on batches of
  16, 32 and 64 - the best of these is the engine's best batch throughput;
* *run*: ``perspicio.run`` on the folder of PNG files (decoding, preprocessing, predictions, the
  method, and the store's Zarr/Parquet writes, which overlap the next chunk's compute) with the
  chunk size of the best batch, into a fresh store.

Cases: Grad-CAM on the bundled EfficientNet-Lite0 (224 x 224 crops of scikit-image photos) and
KernelSHAP on the digits CNN (8 x 8 digits), 1,000 images each by default; then the Ray engine
with 1 and 2 workers on the digits case (a local cluster started here), and its per-sample
overhead against the local engine.

Run::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_run.py --images 1000 --write
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_note, malloc_note, table, write_section  # noqa: E402

import perspicio  # noqa: E402
from perspicio.run import run  # noqa: E402


def photo_folder(root: Path, n: int, side: int = 224) -> list[Path]:
    """``n`` distinct PNG crops of scikit-image's bundled photos (deterministic)."""
    from PIL import Image
    from skimage import data

    photos = [
        data.chelsea(),
        data.astronaut(),
        data.coffee(),
        data.rocket(),
        data.immunohistochemistry(),
    ]
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        s = int(rng.integers(min(h, w) // 2, min(h, w)))
        y, x = int(rng.integers(0, h - s + 1)), int(rng.integers(0, w - s + 1))
        img = Image.fromarray(p[y : y + s, x : x + s]).resize((side, side))
        path = root / f"img{i:05d}.png"
        img.save(path)
        paths.append(path)
    return paths


def digit_folder(root: Path, n: int) -> list[Path]:
    from PIL import Image

    from perspicio.zoo.digits import digits_data

    x, y = digits_data("all", pixels=True)
    paths = []
    for i in range(n):
        d = root / str(int(y[i % len(y)]))
        d.mkdir(exist_ok=True)
        path = d / f"img{i:05d}.png"
        Image.fromarray((x[i % len(x), 0].numpy() * 255).round().astype(np.uint8)).save(path)
        paths.append(path)
    return paths


def single_call(model, x: torch.Tensor, method: str, batch: int, options: dict) -> float:
    t0 = time.perf_counter()
    for s in range(0, len(x), batch):
        perspicio.explain(model, x[s : s + batch], method=method, **options)
    return time.perf_counter() - t0


def one_run(model, folder: Path, method: str, chunk: int, options: dict, **kw) -> float:
    store = Path(tempfile.mkdtemp(prefix="bench-run-"))
    try:
        t0 = time.perf_counter()
        run(
            model,
            folder,
            methods=method,
            store=store / "s",
            chunk_size=chunk,
            method_options={method: options} if options else None,
            **kw,
        )
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(store, ignore_errors=True)


def files_loop(model, paths: list[Path], method: str, batch: int, options: dict) -> float:
    """The loop a user would write without ``run``: decode and preprocess a batch of files, explain
    it, keep the maps as numpy (no store) - sequentially."""
    t0 = time.perf_counter()
    for s in range(0, len(paths), batch):
        x = torch.cat([model.preprocess(str(p)) for p in paths[s : s + batch]])
        perspicio.explain(model, x, method=method, **options).attributions.numpy()
    return time.perf_counter() - t0


def case(
    name: str, model, folder: Path, paths: list[Path], method: str, options: dict, repeats: int
) -> list:
    x = torch.cat([model.preprocess(str(p)) for p in paths])
    n = len(paths)
    single = {b: [] for b in (16, 32, 64)}
    runs: list[float] = []
    loops: list[float] = []
    single_call(model, x[:64], method, 32, options)  # warm-up (first-call setup)
    for _ in range(repeats):
        for b in single:
            single[b].append(single_call(model, x, method, b, options))
    best_b = min(single, key=lambda b: statistics.median(single[b]))
    for _ in range(repeats):
        runs.append(one_run(model, folder, method, best_b, options))
        loops.append(files_loop(model, paths, method, best_b, options))
    t_single = statistics.median(single[best_b])
    t_run = statistics.median(runs)
    t_loop = statistics.median(loops)
    print(
        f"{name}: single {n / t_single:.1f}/s (batch {best_b}), files loop {n / t_loop:.1f}/s, "
        f"run {n / t_run:.1f}/s",
        file=sys.stderr,
    )
    return [
        name,
        n,
        best_b,
        f"{n / t_single:.1f}",
        f"{n / t_loop:.1f}",
        f"{n / t_run:.1f}",
        f"{t_single / t_run:.2f}x",
        f"{t_loop / t_run:.2f}x",
    ]


def local_cluster(workers: int) -> None:
    """Start a local Ray cluster of ``workers`` CPUs, quiet (no dashboard, no worker logs)."""
    import ray

    ray.init(
        num_cpus=workers, include_dashboard=False, log_to_driver=False, configure_logging=False
    )


def marginal(
    fn, folder_n: Path, folder_2n: Path, n: int, repeats: int
) -> tuple[float, float, float]:
    """Seconds for N and 2N images (medians) and the marginal images/s ``N / (t(2N) - t(N))``: start-up
    (actor creation, model transfer, imports) is paid by both runs and cancels in the difference."""
    t1, t2 = [], []
    for _ in range(repeats):
        t1.append(fn(folder_n))
        t2.append(fn(folder_2n))
    a, b = statistics.median(t1), statistics.median(t2)
    return a, b, n / max(b - a, 1e-9)


def ray_scaling(args) -> None:
    """Ray from 1 to 2 workers against the local engine, Grad-CAM on EfficientNet-Lite0 photos.

    Every contender runs with one torch thread per process (``torch.set_num_threads(1)`` in the
    driver; the Ray actors take the driver's count), so 1 worker uses one core and 2 workers two -
    the question is how close two workers come to twice one. The local engine is shown at 1 and
    at 2 threads. Each figure is the marginal throughput from runs on N and 2N images."""
    import ray

    from perspicio.zoo import load

    lite0 = load("efficientnet_lite0")
    n = args.images
    tmp = Path(tempfile.mkdtemp(prefix="bench-run-ray-"))
    rows = []
    try:
        for k in (n, 2 * n):
            (tmp / str(k)).mkdir()
            photo_folder(tmp / str(k), k)
        a, b = tmp / str(n), tmp / str(2 * n)
        chunk = 32
        for threads in (1, 2):
            torch.set_num_threads(threads)
            one_run(lite0, a, "gradcam", chunk, {})  # warm-up
            t1, t2, rate = marginal(
                lambda f: one_run(lite0, f, "gradcam", chunk, {}), a, b, n, args.repeats
            )
            rows.append(
                [f"local engine, {threads} thread(s)", f"{t1:.1f}", f"{t2:.1f}", f"{rate:.1f}", "-"]
            )
        local_1 = float(rows[0][3])
        torch.set_num_threads(1)
        for workers in (1, 2):
            local_cluster(workers)
            try:
                t1, t2, rate = marginal(
                    lambda f, w=workers: one_run(
                        lite0, f, "gradcam", chunk, {}, engine="ray", workers=w
                    ),
                    a,
                    b,
                    n,
                    args.repeats,
                )
            finally:
                ray.shutdown()
            rows.append(
                [
                    f"ray, {workers} worker(s), 1 thread each",
                    f"{t1:.1f}",
                    f"{t2:.1f}",
                    f"{rate:.1f}",
                    f"{(1 / rate - 1 / local_1) * 1e3:+.1f} ms",
                ]
            )
        body = table(
            [
                "engine",
                f"s for {n} images",
                f"s for {2 * n}",
                "marginal img/s",
                "per-sample overhead vs local, 1 thread",
            ],
            rows,
        )
        if len(rows) == 4:
            body += f"\n\nRay 2 workers / 1 worker (marginal): {float(rows[3][3]) / float(rows[2][3]):.2f}x"
        note = f"{machine_note()}; {malloc_note()}; medians of {args.repeats}; chunks of {chunk}"
        print(note)
        print(body)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--write", action="store_true")
    ap.add_argument(
        "--ray-scaling",
        action="store_true",
        help="only the Ray scaling table (marginal cost from N and 2N images, 1 thread per worker)",
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ray_scaling:
        ray_scaling(args)
        return
    from perspicio.zoo import load
    from perspicio.zoo.digits import load_digits_cnn

    tmp = Path(tempfile.mkdtemp(prefix="bench-run-data-"))
    try:
        lite0 = load("efficientnet_lite0")
        digits = load_digits_cnn()
        (tmp / "photos").mkdir()
        (tmp / "digits").mkdir()
        photos = photo_folder(tmp / "photos", args.images)
        digit_paths = digit_folder(tmp / "digits", args.images)
        rows = [
            case(
                "Grad-CAM, EfficientNet-Lite0 224 px",
                lite0,
                tmp / "photos",
                photos,
                "gradcam",
                {},
                args.repeats,
            ),
            case(
                "KernelSHAP (budget 128), digits CNN 8 px",
                digits,
                tmp / "digits",
                digit_paths,
                "kernel_shap",
                {"budget": 128},
                args.repeats,
            ),
        ]
        body = table(
            [
                "case",
                "images",
                "best batch",
                "single call, tensors (img/s)",
                "files loop (img/s)",
                "run (img/s)",
                "run / single call",
                "run / files loop",
            ],
            rows,
        )
        if not args.no_ray:
            import ray

            t_local = statistics.median(
                one_run(digits, tmp / "digits", "gradcam", 64, {}) for _ in range(args.repeats)
            )
            ray_rows = [["local engine", f"{args.images / t_local:.0f}", "-"]]
            for workers in (1, 2):
                local_cluster(workers)
                try:
                    one_run(
                        digits, tmp / "digits", "gradcam", 64, {}, engine="ray", workers=workers
                    )  # actors warm
                    t = statistics.median(
                        one_run(
                            digits, tmp / "digits", "gradcam", 64, {}, engine="ray", workers=workers
                        )
                        for _ in range(args.repeats)
                    )
                finally:
                    ray.shutdown()
                ray_rows.append(
                    [
                        f"ray, {workers} worker(s)",
                        f"{args.images / t:.0f}",
                        f"{(t - t_local) / args.images * 1e3:+.2f} ms",
                    ]
                )
            body += (
                "\n\nRay engine, Grad-CAM on the digits CNN (chunks of 64; each run starts its actors, which load "
                "the model once; the cluster is started once per worker count):\n\n"
                + table(["engine", "img/s", "overhead per sample vs local"], ray_rows)
            )
        note = f"{machine_note()}; {malloc_note()}; medians of {args.repeats}"
        print(body)
        if args.write:
            write_section("Data-set runs (issue 21)", f"{note}\n\n{body}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
