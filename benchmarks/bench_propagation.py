"""Benchmark: LRP and DeepLIFT on the bundled EfficientNet-Lite0 vs Zennit, Captum and a plain gradient.

The limit is one forward + one backward pass (a plain input gradient): LRP needs
exactly that many passes, DeepLIFT one more forward (the reference). Every
contender runs in this one process, interleaved, and the median of the repeats
is reported with its ratio to the gradient.

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
from perspicio.methods.propagation import LRP, DeepLift, find_batchnorm_pairs


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")

    zm = zoo.load("efficientnet_lite0")
    model = zm.model.eval()
    x = zm.preprocess(zoo.sample("chelsea")).repeat(args.batch, 1, 1, 1)
    with torch.no_grad():
        target = model(x).argmax(1)
    n = x.shape[0]

    def gradient() -> None:
        xi = x.clone().requires_grad_(True)
        out = model(xi)
        torch.autograd.grad(out[torch.arange(n), target].sum(), xi)

    def forward_only() -> None:
        with torch.no_grad():
            model(x)

    lrp_eps = LRP(model, rule="epsilon")
    lrp_epf = LRP(model, composite="epsilon_plus_flat")
    dl = DeepLift(model, baseline="zero")
    dl_rc = DeepLift(model, baseline="zero", rule="reveal_cancel")
    contenders: dict[str, Callable[[], object]] = {
        "forward only": forward_only,
        "gradient (limit: 1 fwd + 1 bwd)": gradient,
        "perspicio lrp epsilon": lambda: lrp_eps(x, target),
        "perspicio lrp epsilon_plus_flat": lambda: lrp_epf(x, target),
        "perspicio deeplift rescale": lambda: dl(x, target),
        "perspicio deeplift reveal_cancel": lambda: dl_rc(x, target),
    }

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
    limit = med["gradient (limit: 1 fwd + 1 bwd)"]
    print(f"EfficientNet-Lite0, batch {n} x 3 x 224 x 224, {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")
    print(f"{'contender':<36} {'median s':>10} {'x gradient':>11}")
    for k, v in med.items():
        print(f"{k:<36} {v:10.4f} {v / limit:11.2f}")


if __name__ == "__main__":
    main()
