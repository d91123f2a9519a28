"""Benchmark: LRP and DeepLIFT on the bundled EfficientNet-Lite0 vs Zennit, Captum and a plain gradient.

The limit is one forward + one backward pass (a plain input gradient), timed
with the input both contiguous and channels-last; the faster of the two is the
limit (perspicio's engine feeds convolutional models channels-last). LRP needs
exactly those passes, DeepLIFT one more forward (the reference); DeepSHAP with B
background samples needs B DeepLIFT passes, so its ratio is to B x the limit. The last column
("x own") divides by the passes each contender's definition needs in that call: forward +
backward, plus the reference forward where it is recorded (DeepLIFT without its reference
cache, RevealCancel, Captum's DeepLift, which records it on every call).
Every contender runs in this one process, interleaved, and the median of the
repeats is reported with its ratio to the limit.

Run (on a shared VM use the malloc settings to avoid page-fault noise)::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_propagation.py --repeats 7 --batch 1
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from perspicio import zoo
from perspicio.methods.propagation import LRP, DeepLift, DeepShap, find_batchnorm_pairs

CLOCK = time.perf_counter


def timed(fn: Callable[[], object]) -> float:
    t0 = CLOCK()
    fn()
    return CLOCK() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--background", type=int, default=2, help="DeepSHAP background samples B")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: process CPU time (robust to other jobs on a loaded machine; use with --threads 1)")
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    zm = zoo.load("efficientnet_lite0")
    model = zm.model.eval()
    x = zm.preprocess(zoo.sample("chelsea")).repeat(args.batch, 1, 1, 1)
    with torch.no_grad():
        target = model(x).argmax(1)
    n = x.shape[0]

    def gradient(memory_format: torch.memory_format = torch.contiguous_format) -> None:
        xi = x.contiguous(memory_format=memory_format).clone(memory_format=memory_format).requires_grad_(True)
        out = model(xi)
        torch.autograd.grad(out[torch.arange(n), target].sum(), xi)

    def forward_only() -> None:
        with torch.no_grad():
            model(x)

    background = args.background
    dl = DeepLift(model, baseline="zero")
    dl_rc = DeepLift(model, baseline="zero", rule="reveal_cancel")
    dshap = DeepShap(model, background="uniform", samples=background)
    # the cached contenders reuse the reference pass of the baseline / background from their
    # previous call (a sweep over many images); the cold ones record it in every call
    dl_cold = DeepLift(model, baseline="zero", cache_reference=False)
    dshap_cold = DeepShap(model, background="uniform", samples=background, cache_reference=False)
    contenders: dict[str, Callable[[], object]] = {
        "forward only": forward_only,
        "gradient, contiguous": gradient,
        "gradient, channels-last": lambda: gradient(torch.channels_last),
    }
    for name in ("epsilon", "epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1"):
        lrp = LRP(model, rule="epsilon") if name == "epsilon" else LRP(model, composite=name)
        contenders[f"perspicio lrp {name}"] = lambda lrp=lrp: lrp(x, target)
    contenders["perspicio deeplift rescale"] = lambda: dl(x, target)
    contenders["perspicio deeplift rescale, no reference cache"] = lambda: dl_cold(x, target)
    contenders["perspicio deeplift reveal_cancel"] = lambda: dl_rc(x, target)
    contenders[f"perspicio deep_shap (B={background})"] = lambda: dshap(x, target)
    contenders[f"perspicio deep_shap (B={background}), no reference cache"] = lambda: dshap_cold(x, target)

    try:  # Zennit, with its BatchNorm merge on the same pairs
        from zennit.attribution import Gradient as ZGradient
        from zennit.canonizers import NamedMergeBatchNorm
        from zennit.composites import EpsilonPlusFlat

        pairs = [([a], b) for a, b in find_batchnorm_pairs(model, x[:1])]
        onehot = torch.zeros(n, 1000)
        onehot[torch.arange(n), target] = 1

        def zennit_epf() -> None:
            comp = EpsilonPlusFlat(canonizers=[NamedMergeBatchNorm(pairs)])
            with ZGradient(model=model, composite=comp) as attributor:
                out = model(x)
                attributor(x, onehot * out.detach())

        contenders["zennit epsilon_plus_flat"] = zennit_epf
    except ImportError:
        pass
    try:
        from captum.attr import DeepLift as CaptumDeepLift

        cdl = CaptumDeepLift(model)
        contenders["captum DeepLift"] = lambda: cdl.attribute(x.clone(), baselines=torch.zeros_like(x), target=target)
    except ImportError:
        pass

    for fn in contenders.values():  # warm-up (oneDNN kernels, caches, BatchNorm pair discovery)
        fn()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            times[name].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    limit = min(med["gradient, contiguous"], med["gradient, channels-last"])
    print(f"EfficientNet-Lite0, batch {n} x 3 x 224 x 224, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, median of {args.repeats}; limit = faster gradient = {limit:.4f} s")
    # the passes a contender's definition needs: one forward + one backward, plus the reference
    # forward for DeepLIFT-type methods that record it in this call (B times for DeepSHAP)
    forward = med["forward only"]
    print(f"{'contender':<40} {'median s':>10} {'x limit':>8} {'x own':>7}")
    for k, v in med.items():
        passes = background if k.startswith("perspicio deep_shap") else 1
        records = ("no reference cache" in k or "reveal_cancel" in k or k == "captum DeepLift")
        own = passes * (limit + (forward if records else 0.0))
        print(f"{k:<40} {v:10.4f} {v / (passes * limit):8.2f} {v / own:7.2f}")


if __name__ == "__main__":
    main()
