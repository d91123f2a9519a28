"""Benchmark: top-activating scan throughput vs the model's own limit.

The limit is the best throughput (images/s over several batch sizes) of EfficientNet-Lite0
run *only up to the layer* by hand-written code (stem + the first blocks, no hooks). The
scan (``perspicio.featurevis.top_activating``) must stay within 1.2x of that time: it adds
hooks, the early stop, the per-image reduction and the running top-k merge.
Also reported: the scan of a folder of PNG files (decoding + preprocessing included).

Run (one process; ratios are what count on a shared machine):
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \
        python benchmarks/bench_featurevis.py [--n 64] [--reps 3]
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from perspicio import zoo
from perspicio.featurevis import top_activating
from perspicio.featurevis._data import photo_crops

RF = importlib.import_module("perspicio.featurevis.receptive_field")


def truncated(model: torch.nn.Module, block: int):
    """The network up to ``_blocks.<block>``, written out (the model's own limit)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        x = model._act_stem(model._bn0(model._conv_stem(x)))
        for b in model._blocks[: block + 1]:
            x = b(x)
        return x

    return run


def timed(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=64, help="images in the data set")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--blocks", default="3,8", help="comma-separated block indices to scan")
    args = ap.parse_args()
    zm = zoo.load("efficientnet_lite0")
    model = zm.model
    crops, _ = photo_crops(zm.preprocess)
    reps_needed = (args.n + len(crops) - 1) // len(crops)
    x = torch.cat([crops] * reps_needed)[: args.n].contiguous()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, data {tuple(x.shape)}")
    rows = []
    for block in [int(b) for b in args.blocks.split(",")]:
        layer = f"_blocks.{block}"
        run = truncated(model, block)
        best_bs, best_t = None, float("inf")
        with torch.no_grad():
            run(x[:2])  # warm-up
            for bs in (8, 16, 32, 64):
                t = timed(lambda bs=bs, run=run: [run(x[i:i + bs]) for i in range(0, len(x), bs)], args.reps)
                if t < best_t:
                    best_bs, best_t = bs, t
        # interleave the three measurements so load drift on a shared machine hits all alike
        lim, scan, auto = [], [], []
        for _ in range(args.reps):
            with torch.no_grad():
                lim.append(timed(lambda bs=best_bs, run=run: [run(x[i:i + bs]) for i in range(0, len(x), bs)], 1))
            RF._CACHE.clear()  # pay the receptive-field trace in every run
            scan.append(timed(lambda lay=layer, bs=best_bs: top_activating(zm, x, lay, 0, k=9, batch_size=bs), 1))
            RF._CACHE.clear()
            auto.append(timed(lambda lay=layer: top_activating(zm, x, lay, 0, k=9), 1))
        best_t, t_scan, t_auto = statistics.median(lim), statistics.median(scan), statistics.median(auto)
        rows.append((layer, best_bs, args.n / best_t, args.n / t_scan, t_scan / best_t, args.n / t_auto, t_auto / best_t))
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        for i in range(args.n):
            arr = (zm.preprocess.denormalize(x[i]).permute(1, 2, 0).numpy() * 255).round().astype("uint8")
            Image.fromarray(arr).save(Path(tmp) / f"{i:04d}.png")
        layer = f"_blocks.{args.blocks.split(',')[-1]}"
        t_folder = timed(lambda: top_activating(zm, tmp, layer, 0, k=9), args.reps)
    print()
    print("| layer | limit batch | limit (img/s) | scan, same batch (img/s) | time ratio | scan, auto batch (img/s) | time ratio |")
    print("|---|---|---|---|---|---|---|")
    for layer, bs, lim, scan, ratio, auto, ratio_auto in rows:
        print(f"| `{layer}` | {bs} | {lim:.1f} | {scan:.1f} | {ratio:.2f}x | {auto:.1f} | {ratio_auto:.2f}x |")
    print(f"\nfolder of {args.n} PNG files at {layer} (decode + preprocess + scan): {args.n / t_folder:.1f} img/s")


if __name__ == "__main__":
    main()
