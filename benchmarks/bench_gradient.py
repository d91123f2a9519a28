"""Benchmark: gradient and path attributions on the bundled EfficientNet-Lite0 vs Captum and the limit.

The limit of a method is the passes it needs times the best measured throughput:
``backward_samples / best(fwd+bwd samples/s) + extra_forward_samples / best(forward samples/s)``,
where the best throughputs are measured here over batch sizes 1..64. Every contender
runs in this one process, interleaved, and the median of the repeats is reported
with its ratios to the limit and to Captum (with Captum's internal batch size set
to the best measured one).

The memory check runs IG with 512 steps in a child process and compares its peak
RSS with one fwd+bwd chunk of the same size (``--memory``).

Run (on a shared VM use the malloc settings to avoid page-fault noise)::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_gradient.py --repeats 5 --memory
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable

import torch

from perspicio import explain, zoo


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(model: torch.nn.Module, x: torch.Tensor, sizes: list[int], repeats: int) -> tuple[dict, dict]:
    """Median samples/s of fwd+bwd (w.r.t. the input) and of forward-only, per batch size."""
    fb, fo = {}, {}
    for bs in sizes:
        xb = x.repeat(bs, 1, 1, 1)

        def grad(xb: torch.Tensor = xb) -> None:
            xi = xb.clone().requires_grad_(True)
            torch.autograd.grad(model(xi)[:, 285].sum(), xi)

        def fwd(xb: torch.Tensor = xb) -> None:
            with torch.no_grad():
                model(xb)

        grad()
        fb[bs] = bs / statistics.median(timed(grad) for _ in range(repeats))
        fo[bs] = bs / statistics.median(timed(fwd) for _ in range(repeats))
    return fb, fo


def memory_child(mode: str, chunk: int, size: int) -> None:
    import resource

    zm = zoo.load("efficientnet_lite0")
    x = zm.preprocess(zoo.sample("chelsea"))
    if size != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "chunk":
        xi = x.repeat(chunk, 1, 1, 1).requires_grad_(True)
        torch.autograd.grad(zm.model(xi)[:, 285].sum(), xi)
    else:
        explain(zm, x, method="integrated_gradients", steps=512, target=285, batch_size=chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "base_mb": base / 1024, "peak_mb": peak / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="1,4,8,13,17,26,32,51")
    ap.add_argument("--memory", action="store_true", help="also run the IG-512 memory check (child processes)")
    ap.add_argument("--memory-size", type=int, default=224, help="input side for the memory check")
    ap.add_argument("--memory-child", nargs=3, metavar=("MODE", "CHUNK", "SIZE"), help=argparse.SUPPRESS)
    ap.add_argument("--only", default="", help="comma-separated subset of contenders")
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]), int(args.memory_child[2]))
        return
    warnings.filterwarnings("ignore")
    from captum.attr import (
        Deconvolution,
        GradientShap,
        GuidedBackprop,
        GuidedGradCam,
        InputXGradient,
        IntegratedGradients,
        NoiseTunnel,
        Saliency,
    )

    from perspicio.core.capture import auto_layer

    zm = zoo.load("efficientnet_lite0")
    model = zm.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    x = zm.preprocess(zoo.sample("chelsea"))
    t = 285
    sizes = [int(s) for s in args.sizes.split(",")]
    fb, fo = throughput(model, x, sizes, args.repeats)
    best_fb_bs = max(fb, key=fb.get)
    best_fb, best_fo = fb[best_fb_bs], max(fo.values())
    print("fwd+bwd samples/s by batch:", {k: round(v, 2) for k, v in fb.items()})
    print("forward samples/s by batch:", {k: round(v, 2) for k, v in fo.items()})
    print(f"best fwd+bwd batch: {best_fb_bs} ({best_fb:.2f}/s); best forward {best_fo:.2f}/s")

    layer = auto_layer(model, x)
    bg = torch.randn((8, *x.shape[1:]), generator=torch.Generator().manual_seed(0))

    def lim(bwd: int, fwd_only: int) -> float:
        return bwd / best_fb + fwd_only / best_fo

    def lim_shared(points: int, targets: int, fwd_only: int) -> float:
        """One fwd+bwd per point plus (targets - 1) extra backward passes (a backward costs fwd+bwd - fwd)."""
        return points / best_fb + points * (targets - 1) * (1 / best_fb - 1 / best_fo) + fwd_only / best_fo

    multi = [285, 281, 282, 287, 1]

    def req(xx: torch.Tensor) -> torch.Tensor:
        return xx.clone().requires_grad_(True)

    bs = best_fb_bs
    # name: (ours, captum or None, limit seconds)
    rows: dict[str, tuple[Callable, Callable | None, float]] = {
        "saliency": (lambda: explain(zm, x, method="saliency", target=t),
                     lambda: Saliency(model).attribute(req(x), target=t), lim(1, 0)),
        "input_x_gradient": (lambda: explain(zm, x, method="input_x_gradient", target=t),
                             lambda: InputXGradient(model).attribute(req(x), target=t), lim(1, 0)),
        "guided_backprop": (lambda: explain(zm, x, method="guided_backprop", target=t),
                            lambda: GuidedBackprop(model).attribute(req(x), target=t), lim(1, 0)),
        "deconvnet": (lambda: explain(zm, x, method="deconvnet", target=t),
                      lambda: Deconvolution(model).attribute(req(x), target=t), lim(1, 0)),
        "guided_gradcam": (lambda: explain(zm, x, method="guided_gradcam", target=t, upsample="nearest"),
                           lambda: GuidedGradCam(model, dict(model.named_modules())[layer]).attribute(req(x), target=t),
                           lim(2, 0)),
        "integrated_gradients 50": (
            lambda: explain(zm, x, method="integrated_gradients", target=t, steps=50),
            lambda: IntegratedGradients(model).attribute(x, target=t, n_steps=50, internal_batch_size=bs),
            lim(50, 2)),
        "integrated_gradients 50 adaptive": (
            lambda: explain(zm, x, method="integrated_gradients", target=t, steps=50, quadrature="adaptive"),
            None, lim(50, 2)),
        "integrated_gradients 50 batch=best": (
            lambda: explain(zm, x, method="integrated_gradients", target=t, steps=50, batch_size=bs),
            None, lim(50, 2)),
        "smoothgrad 25": (
            lambda: explain(zm, x, method="smoothgrad", target=t, samples=25, noise=0.15),
            lambda: NoiseTunnel(Saliency(model)).attribute(req(x), nt_type="smoothgrad", nt_samples=25,
                                                           nt_samples_batch_size=bs, stdevs=0.15 * float(x.max() - x.min()),
                                                           target=t, abs=False),
            lim(25, 1)),
        "smoothgrad 25 batch=best": (
            lambda: explain(zm, x, method="smoothgrad", target=t, samples=25, noise=0.15, base_options={"batch_size": bs}),
            None, lim(25, 1)),
        # several targets for one input: one forward per path point and 5 backward passes (shared),
        # against the input repeated 5 times (what every method did before: 5x the forwards)
        "integrated_gradients 50 x5 targets": (
            lambda: explain(zm, x, method="integrated_gradients", target=[multi], steps=50),
            lambda: IntegratedGradients(model).attribute(x.repeat(len(multi), 1, 1, 1), target=multi, n_steps=50,
                                                         internal_batch_size=bs),
            lim_shared(50, len(multi), 2)),
        "integrated_gradients 50 x5 repeated": (
            lambda: explain(zm, x.repeat(len(multi), 1, 1, 1), method="integrated_gradients", target=multi, steps=50),
            None, lim(50 * len(multi), 2 * len(multi))),
        "gradient_shap 25": (
            lambda: explain(zm, x, method="gradient_shap", target=t, samples=25, baseline=bg, noise=0.0),
            lambda: GradientShap(model).attribute(x, bg, n_samples=25, stdevs=0.0, target=t),
            lim(25, 1 + len(bg))),
    }
    if args.only:
        keep = set(args.only.split(","))
        rows = {k: v for k, v in rows.items() if k in keep}
    times: dict[str, list[float]] = {k: [] for k in rows}
    ctimes: dict[str, list[float]] = {k: [] for k in rows}
    for ours, _theirs, _limit in rows.values():  # warm-up (also the engine's memory probe)
        ours()
    for _ in range(args.repeats):
        for name, (ours, theirs, _) in rows.items():
            times[name].append(timed(ours))
            if theirs is not None:
                ctimes[name].append(timed(theirs))
    print(f"\n{'method':<36}{'ours s':>9}{'captum s':>10}{'limit s':>9}{'ours/limit':>12}{'ours/captum':>13}")
    for name, (_, _theirs, limit) in rows.items():
        o = statistics.median(times[name])
        c = statistics.median(ctimes[name]) if ctimes[name] else float("nan")
        print(f"{name:<36}{o:9.3f}{c:10.3f}{limit:9.3f}{o / limit:12.3f}{o / c:13.3f}")

    if args.memory:
        from perspicio.core.batching import Engine

        xs = torch.nn.functional.interpolate(x, size=(args.memory_size,) * 2, mode="bilinear", antialias=True)
        chunk = Engine(model).chunk_size(xs, grad=True)
        env = dict(os.environ)
        res = {}
        for mode in ("chunk", "ig512"):
            out = subprocess.run([sys.executable, __file__, "--memory-child", mode, str(chunk), str(args.memory_size)],
                                 capture_output=True,
                                 text=True, env=env, check=True)
            res[mode] = json.loads(out.stdout.strip().splitlines()[-1])
        grow = {k: v["peak_mb"] - v["base_mb"] for k, v in res.items()}
        print(f"\nmemory ({args.memory_size}px, chunk {chunk} from the default budget): one fwd+bwd chunk +{grow['chunk']:.0f} MB; "
              f"IG 512 steps +{grow['ig512']:.0f} MB (ratio {grow['ig512'] / grow['chunk']:.2f})")


if __name__ == "__main__":
    main()
