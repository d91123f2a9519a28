"""Benchmark: deletion curve cost vs the model's own limit and vs Quantus (one process).

limit = forward passes needed (2 images x (100 steps + 1 original)) at the best measured batch
throughput of the user's model *as given* (no BatchNorm folding), best over batch sizes and over
contiguous / channels-last memory formats. The limit is also timed directly (those passes run at
the best batch size and format), interleaved round-robin with perspicio and Quantus so load changes
on the shared machine hit all three alike; medians over ``--repeats``.

Quantus's equivalent is PixelFlipping (one model call per step on the batch); 224*224 pixels do
not split into exactly 100 equal steps, so Quantus runs 98 steps of 512 pixels and its time is
scaled to 100 steps. Run with:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python benchmarks/bench_metrics.py
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import forward_throughput, machine_note, malloc_note  # noqa: E402

import perspicio  # noqa: E402
from perspicio import metrics, zoo  # noqa: E402
from perspicio.core import fold  # noqa: E402


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--no-quantus", action="store_true")
    ap.add_argument("--others", action="store_true", help="also time the other metrics on one image")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    print(machine_note(), "|", malloc_note())
    torch.manual_seed(0)
    zm = zoo.load("efficientnet_lite0")
    model = zm.model.eval()
    x = torch.cat([zm.preprocess(zoo.sample(n)) for n in ("chelsea", "coffee")])
    n = x.shape[0]
    exp = perspicio.explain(zm, x, "gradcam")
    steps = args.steps
    passes = n * (steps + 1)

    # the model's own limit: best samples/s over batch sizes and memory formats (model as given)
    tp = forward_throughput(model, x[:1], batch_sizes=(1, 8, 16, 32, 64), repeats=args.repeats)
    for (fmt, b), v in sorted(tp.forward.items()):
        print(f"forward {fmt:<13} batch {b:>3}: {v:7.1f} samples/s")
    fmt, best_b = tp.best_forward_at
    print(f"best: {tp.best_forward:.1f} samples/s ({fmt}, batch {best_b}); limit from it: "
          f"{passes / tp.best_forward:.2f} s for {passes} passes")
    lim_model = copy.deepcopy(model).to(memory_format=torch.channels_last) if fmt == "channels_last" else model
    mf = torch.channels_last if fmt == "channels_last" else torch.contiguous_format
    lim_inputs = x.repeat_interleave(steps + 1, 0).contiguous(memory_format=mf)

    def limit_run() -> None:  # the passes themselves at the best batch size and format
        with torch.no_grad():
            for s in range(0, passes, best_b):
                lim_model(lim_inputs[s:s + best_b])

    deletion = metrics.Deletion(steps=steps)

    def ours() -> None:
        deletion(zm, x, exp)

    def ours_unfolded() -> None:
        old = fold.FOLD_BATCHNORM
        fold.FOLD_BATCHNORM = False
        try:
            deletion(zm, x, exp)
        finally:
            fold.FOLD_BATCHNORM = old

    contenders = {"limit (timed)": limit_run, "perspicio deletion": ours,
                  "perspicio deletion, BatchNorm not folded": ours_unfolded}
    if not args.no_quantus:
        import quantus

        a = exp.attributions.numpy()
        y = exp.targets.numpy()
        pf = quantus.PixelFlipping(features_in_step=512, perturb_baseline="black", disable_warnings=True,
                                   display_progressbar=False, abs=False, normalise=False)

        def run_quantus() -> None:
            pf(model=model, x_batch=x.numpy(), y_batch=y, a_batch=a, device="cpu", softmax=True,
               channel_first=True)

        contenders["quantus PixelFlipping (x 100/98)"] = run_quantus

    ours(), ours_unfolded()  # warm-up: builds and verifies the inference twin once
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.repeats):
        for k, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    if "quantus PixelFlipping (x 100/98)" in med:
        med["quantus PixelFlipping (x 100/98)"] *= 100 / 98
    limit = passes / tp.best_forward
    r = deletion(zm, x, exp)
    print(f"\n{n} images, {steps} steps ({passes} passes); engine chunks {r.details['passes']['chunk_sizes']}, "
          f"BatchNorm folded: {r.details['passes'].get('batchnorm_folded', 0)}; AUC {r.value:.4f}; "
          f"load now {__import__('os').getloadavg()[0]:.1f}")
    print(f"{'contender':<42} {'median s':>9} {'x limit':>8} {'x timed limit':>14} {'quantus / this':>15}")
    tq = med.get("quantus PixelFlipping (x 100/98)")
    for k, v in med.items():
        q = f"{tq / v:15.2f}" if tq else f"{'-':>15}"
        print(f"{k:<42} {v:9.3f} {v / limit:8.2f} {v / med['limit (timed)']:14.2f} {q}")
    print("runs:", {k: [round(t, 3) for t in v] for k, v in times.items()})

    if args.others:  # other metrics on one image (informative timings)
        xs, es = x[:1], exp[0]
        for name in ("insertion", "road", "infidelity", "faithfulness_correlation", "average_drop",
                     "max_sensitivity", "randomization", "sparseness"):
            m = metrics.get(name)()
            t0 = time.perf_counter()
            res = m(zm, xs, es)
            print(f"{name:<26} {time.perf_counter() - t0:7.2f} s  value {res.value:.4f}  passes {res.details['passes']}")


if __name__ == "__main__":
    main()
