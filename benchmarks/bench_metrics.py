"""Benchmark: deletion curve cost vs the model's own limit and vs Quantus (one process).

limit = forward passes needed (steps + 1 original) / best measured batch throughput of the model.
Quantus's equivalent is PixelFlipping (per-sample loop, one model call per step); 224*224 pixels
do not split into exactly 100 equal steps, so Quantus runs 98 steps of 512 pixels and its time is
scaled to 100 steps. Run with:

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 python benchmarks/bench_metrics.py
"""

from __future__ import annotations

import statistics
import time
import warnings

import torch

import perspicio
from perspicio import metrics, zoo

REPEATS = 3


def timed(fn, repeats: int = REPEATS) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    zm = zoo.load("efficientnet_lite0")
    model = zm.model.eval()
    x = torch.cat([zm.preprocess(zoo.sample(n)) for n in ("chelsea", "coffee")])
    n = x.shape[0]
    exp = perspicio.explain(zm, x, "gradcam")

    # the model's own limit: best samples/s over batch sizes
    best = 0.0
    for b in (1, 8, 16, 32, 64):
        xb = x[:1].expand(b, -1, -1, -1).contiguous()
        with torch.no_grad():
            model(xb)
            t = timed(lambda xb=xb: model(xb))
        print(f"forward batch {b:>3}: {b / t:7.1f} samples/s")
        best = max(best, b / t)
    steps = 100
    passes = n * (steps + 1)
    limit = passes / best

    deletion = metrics.Deletion(steps=steps)
    ours = timed(lambda: deletion(zm, x, exp))
    r = deletion(zm, x, exp)
    print(f"perspicio deletion ({steps} steps, {n} images): {ours:.2f} s; limit {limit:.2f} s "
          f"({passes} passes at {best:.1f}/s); ratio to limit {ours / limit:.2f}; AUC {r.value:.4f}")

    import quantus

    a = exp.attributions.numpy()
    y = exp.targets.numpy()
    pf = quantus.PixelFlipping(features_in_step=512, perturb_baseline="black", disable_warnings=True,
                               display_progressbar=False, abs=False, normalise=False)

    def run_quantus():
        return pf(model=model, x_batch=x.numpy(), y_batch=y, a_batch=a, device="cpu", softmax=True, channel_first=True)

    tq = timed(run_quantus, repeats=1) * 100 / 98
    print(f"quantus PixelFlipping (98 steps, scaled to 100): {tq:.2f} s; perspicio is {tq / ours:.1f}x faster")

    # other metrics on one image (informative timings)
    xs, es = x[:1], exp[0]
    for name, opts in (("insertion", {}), ("road", {}), ("infidelity", {}), ("faithfulness_correlation", {}),
                       ("average_drop", {}), ("max_sensitivity", {}), ("randomization", {}), ("sparseness", {})):
        m = metrics.get(name)(**opts)
        t0 = time.perf_counter()
        res = m(zm, xs, es)
        print(f"{name:<26} {time.perf_counter() - t0:7.2f} s  value {res.value:.4f}  passes {res.details['passes']}")


if __name__ == "__main__":
    main()
