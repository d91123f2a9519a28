"""A/B benchmark: LRP and DeepLIFT of another perspicio tree (e.g. a session's start) against this one.

The other tree's package is copied to a temporary directory as ``perspicio_orig`` (the package
imports itself relatively, so both load side by side, each with its own caches) and every
contender of both runs interleaved in this one process, the order of A and B alternating per
repeat; medians, their ratio to the limit (the faster of one plain forward + backward pass,
contiguous or channels-last, as in ``bench_propagation.py``) and B/A are reported, with the
largest difference between the two trees' attributions (the behaviour must be the same).

Run (on a shared VM use the malloc settings to avoid page-fault noise)::

    git worktree add /tmp/wt-start a2aea39
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_propagation_ab.py --orig /tmp/wt-start/src --repeats 7
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import perspicio
from perspicio import zoo


def load_orig(src: Path) -> object:
    """The package under ``src/perspicio`` imported as ``perspicio_orig``."""
    tmp = Path(tempfile.mkdtemp(prefix="perspicio_orig_"))
    shutil.copytree(
        src / "perspicio", tmp / "perspicio_orig", ignore=shutil.ignore_patterns("__pycache__")
    )
    sys.path.insert(0, str(tmp))
    return importlib.import_module("perspicio_orig")


def contenders(pkg: object, model: torch.nn.Module, background: int) -> dict[str, Callable]:
    P = importlib.import_module(f"{pkg.__name__}.methods.propagation")
    out: dict[str, Callable] = {}
    for name in ("epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1"):
        out[f"lrp {name}"] = (
            P.LRP(model, rule="epsilon") if name == "epsilon" else P.LRP(model, composite=name)
        )
    out["deeplift rescale"] = P.DeepLift(model, baseline="zero")
    out["deeplift reveal_cancel"] = P.DeepLift(model, baseline="zero", rule="reveal_cancel")
    out[f"deep_shap (B={background})"] = P.DeepShap(model, background="uniform", samples=background)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orig", type=Path, required=True, help="the src/ directory of the other tree")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument(
        "--threads", type=int, default=0, help="torch threads (0: leave torch's default)"
    )
    ap.add_argument("--background", type=int, default=2, help="DeepSHAP background samples B")
    ap.add_argument("--skip", default="", help="comma-separated contenders to leave out (e.g. reveal_cancel)")
    args = ap.parse_args()
    skip = [s for s in args.skip.split(",") if s]
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    orig = load_orig(args.orig)

    zm = zoo.load("efficientnet_lite0")
    model = zm.model.eval()
    x = zm.preprocess(zoo.sample("chelsea"))
    with torch.no_grad():
        target = model(x).argmax(1)

    def gradient(fmt: torch.memory_format) -> None:
        xi = x.contiguous(memory_format=fmt).clone(memory_format=fmt).requires_grad_(True)
        torch.autograd.grad(model(xi)[0, target[0]], xi)

    a = {k: v for k, v in contenders(orig, model, args.background).items() if not any(s in k for s in skip)}
    b = {k: v for k, v in contenders(perspicio, model, args.background).items() if k in a}
    diff = {}
    for k in a:  # warm-up (oneDNN kernels, twins, caches) and the behaviour check
        ra, rb = a[k](x, target).attributions, b[k](x, target).attributions
        diff[k] = float((ra - rb).abs().max() / rb.abs().max().clamp_min(1e-30))
    limits = {"contiguous": [], "channels-last": []}
    times = {k: ([], []) for k in a}
    for r in range(args.repeats):
        for fmt, name in (
            (torch.contiguous_format, "contiguous"),
            (torch.channels_last, "channels-last"),
        ):
            t0 = time.perf_counter()
            gradient(fmt)
            limits[name].append(time.perf_counter() - t0)
        for k in a:
            order = ((0, a[k]), (1, b[k])) if r % 2 == 0 else ((1, b[k]), (0, a[k]))
            for i, fn in order:
                t0 = time.perf_counter()
                fn(x, target)
                times[k][i].append(time.perf_counter() - t0)
    limit = min(statistics.median(v) for v in limits.values())
    print(
        f"EfficientNet-Lite0, 1 x 3 x 224 x 224, {torch.get_num_threads()} threads, median of {args.repeats}, "
        f"A = {args.orig}, B = {Path(perspicio.__file__).parent.parent}; limit {limit * 1000:.1f} ms"
    )
    print(
        f"{'contender':<26} {'A ms':>8} {'B ms':>8} {'A x lim':>8} {'B x lim':>8} {'B / A':>6} {'max rel diff':>13}"
    )
    for k, (ta, tb) in times.items():
        ma, mb = statistics.median(ta), statistics.median(tb)
        per = args.background if k.startswith("deep_shap") else 1
        print(
            f"{k:<26} {ma * 1000:8.1f} {mb * 1000:8.1f} {ma / (per * limit):8.2f} {mb / (per * limit):8.2f} "
            f"{mb / ma:6.2f} {diff[k]:13.1e}"
        )


if __name__ == "__main__":
    main()
