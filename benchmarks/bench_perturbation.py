"""Benchmark: occlusion, RISE, KernelSHAP and LIME on the bundled EfficientNet-Lite0 vs Captum, shap and lime,
plus KernelSHAP's accuracy per budget against shap.KernelExplainer on a 16-feature tabular problem.

Speed: every contender spends the same number of model evaluations on the same image, in this one
process, interleaved; the median of ``--repeats`` runs is reported with two ratios: to perspicio
(peer / ours, > 1 means we are faster) and to the model's limit = evaluations / best measured
forward throughput (batch sizes 16, 32, 64).

Accuracy: on a gradient-boosting model of 16 features (Friedman #1 data), the max-abs and RMS error
of KernelSHAP against exact Shapley values (``shapley_exact``, the same background) at 256 and 1024
evaluations, averaged over rows and seeds, for perspicio and shap's KernelExplainer (default
``l1_reg`` and ``l1_reg=False``).

Run (on a shared VM use the malloc settings to avoid page-fault noise)::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_perturbation.py --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import perspicio
from perspicio import zoo
from perspicio.core.maskers import image_feature_mask

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import forward_throughput, machine_note, malloc_note, timed  # noqa: E402


def speed(args: argparse.Namespace) -> None:
    import captum.attr as ca
    import shap
    from lime import lime_image

    zm = zoo.load("efficientnet_lite0")
    model = zm.model.eval()
    x = zm.preprocess(zoo.sample("chelsea"))
    with torch.no_grad():
        target = int(model(x).argmax())
    tp = forward_throughput(model, x, batch_sizes=(1, 4, 8, 16, 32, 64), repeats=args.repeats)
    tput, (fmt, bs) = tp.best_forward, tp.best_forward_at
    print(f"{machine_note()}; {malloc_note()}")
    print("forward img/s: " + ", ".join(f"{f[:2]}{b}={v:.1f}" for (f, b), v in sorted(tp.forward.items())))
    print(f"limit throughput: {tput:.1f} img/s ({fmt}, batch {bs}); peers get batch {bs}, "
          "perspicio chooses its own chunks")
    seg = image_feature_mask(x[0], "slic:50")
    m = int(seg.max()) + 1

    def clf_np_hwc(imgs: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(imgs.transpose(0, 3, 1, 2))).float()
        with torch.no_grad():
            out = []
            for i in range(0, len(t), bs):
                out.append(model(t[i:i + bs]))
        return torch.cat(out).numpy()

    n_occ = (int(np.ceil((224 - 32) / 16)) + 1) ** 2
    patches = image_feature_mask(x[0], "patch:16")  # 196 square features of 16 x 16 pixels
    n_abl = int(patches.max()) + 2
    budget = args.budget
    rows: list[tuple[str, str, int, Callable[[], object]]] = [
        ("occlusion", "perspicio", n_occ, lambda: perspicio.explain(zm, x, method="occlusion", window=32, stride=16,
                                                                     target=target)),
        ("occlusion", "perspicio, dense batches (PERSPICIO_INCREMENTAL=0)", n_occ, _dense(lambda: perspicio.explain(
            zm, x, method="occlusion", window=32, stride=16, target=target))),
        ("occlusion", "captum", n_occ, lambda: ca.Occlusion(model).attribute(
            x, sliding_window_shapes=(3, 32, 32), strides=(3, 16, 16), target=target, perturbations_per_eval=bs)),
        ("occlusion", "captum (default perturbations_per_eval=1)", n_occ, lambda: ca.Occlusion(model).attribute(
            x, sliding_window_shapes=(3, 32, 32), strides=(3, 16, 16), target=target)),
        ("feature_ablation", "perspicio", n_abl, lambda: perspicio.explain(
            zm, x, method="feature_ablation", feature_mask=patches, target=target)),
        ("feature_ablation", "perspicio, dense batches (PERSPICIO_INCREMENTAL=0)", n_abl, _dense(
            lambda: perspicio.explain(zm, x, method="feature_ablation", feature_mask=patches, target=target))),
        ("feature_ablation", "captum", n_abl, lambda: ca.FeatureAblation(model).attribute(
            x, target=target, feature_mask=patches[None, None], perturbations_per_eval=bs)),
        ("rise", "perspicio", budget, lambda: perspicio.explain(zm, x, method="rise", budget=budget, target=target)),
        ("rise", "perspicio compile=True", budget, lambda: perspicio.explain(
            zm, x, method="rise", budget=budget, target=target, compile=True)),
        ("kernel_shap", "perspicio", budget, lambda: perspicio.explain(
            zm, x, method="kernel_shap", feature_mask=seg, budget=budget, target=target)),
        ("kernel_shap", "perspicio compile=True", budget, lambda: perspicio.explain(
            zm, x, method="kernel_shap", feature_mask=seg, budget=budget, target=target, compile=True)),
        ("kernel_shap", "captum", budget, lambda: ca.KernelShap(model).attribute(
            x, target=target, feature_mask=seg[None, None], n_samples=budget, perturbations_per_eval=bs)),
        ("kernel_shap", "shap Partition", budget, lambda: shap.PartitionExplainer(
            clf_np_hwc, shap.maskers.Image(0.0, (224, 224, 3)))(
            x.permute(0, 2, 3, 1).numpy(), max_evals=budget, batch_size=bs, outputs=[target], silent=True)),
        ("lime", "perspicio", budget, lambda: perspicio.explain(
            zm, x, method="lime", feature_mask=seg, budget=budget, sampling="bernoulli", target=target)),
        ("lime", "perspicio compile=True", budget, lambda: perspicio.explain(
            zm, x, method="lime", feature_mask=seg, budget=budget, sampling="bernoulli", target=target, compile=True)),
        ("lime", "lime", budget, lambda: lime_image.LimeImageExplainer(random_state=0).explain_instance(
            x[0].permute(1, 2, 0).numpy().astype(np.float64), clf_np_hwc, labels=(target,), top_labels=None,
            hide_color=0, num_samples=budget, segmentation_fn=lambda img: seg.numpy(), num_features=m,
            batch_size=bs)),
        ("lime", "captum", budget, lambda: ca.Lime(model).attribute(
            x, target=target, feature_mask=seg[None, None], n_samples=budget, perturbations_per_eval=bs)),
    ]
    if args.methods:
        rows = [r for r in rows if r[0] in args.methods.split(",")]
    # one-time per model and weights: the BatchNorm-folded inference twin (cached afterwards)
    from perspicio.core import fold

    fold._TWINS.pop(model, None)
    t_twin = timed(lambda: fold.inference_twin(model, x))
    print(f"inference twin built once in {t_twin:.2f} s ({fold.inference_twin(model, x)[1]} BatchNorms folded)")
    if any("compile" in who for _, who, _, _ in rows):  # once per model and input shape (and process)
        t_compile = timed(lambda: perspicio.explain(zm, x, method="rise", budget=budget, target=target, compile=True))
        print(f"compile=True: first call (torch.compile of the twin + one RISE run) {t_compile:.1f} s, "
              "excluded from the rows below")
    for _method, _who, _, fn in rows:  # warm-up: one untimed run of each contender
        if args.warmup:
            fn()
    times: dict[tuple[str, str], list[float]] = {(a, b): [] for a, b, _, _ in rows}
    for _ in range(args.repeats):
        for method, who, _, fn in rows:
            times[(method, who)].append(timed(fn))
    print("\n| method | contender | evaluations | median s | peer / perspicio | / limit |\n|---|---|---|---|---|---|")
    for method, who, evals, _ in rows:
        t = statistics.median(times[(method, who)])
        ours = statistics.median(times[(method, "perspicio")])
        limit = evals / tput
        print(f"| {method} | {who} | {evals} | {t:.2f} | {t / ours:.2f} | {t / limit:.2f} |")


def _dense(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with incremental inference switched off (every copy evaluated as a full batch)."""
    from perspicio.core import incremental

    def run() -> object:
        incremental.INCREMENTAL = False
        try:
            return fn()
        finally:
            incremental.INCREMENTAL = True
    return run


def accuracy(args: argparse.Namespace) -> None:
    import shap
    from sklearn.datasets import make_friedman1
    from sklearn.ensemble import GradientBoostingRegressor

    x, y = make_friedman1(n_samples=600, n_features=16, noise=0.5, random_state=0)
    # add pairwise products so the model has interactions beyond Friedman's own
    y = y + 2 * x[:, 5] * x[:, 6] - 3 * x[:, 7] * x[:, 8] * x[:, 9]
    gbm = GradientBoostingRegressor(n_estimators=150, max_depth=4, random_state=0).fit(x, y)
    bg = x[:20]
    rows = x[500:500 + args.rows]
    exact = perspicio.explain(gbm.predict, rows, method="shapley_exact", background=bg).attributions.numpy()
    print(f"\nKernelSHAP accuracy on 16 features ({args.rows} rows, {args.seeds} seeds; mean over them):")
    print("| budget | estimator | max-abs error | RMS error |\n|---|---|---|---|")
    for budget in (256, 1024):
        res: dict[str, list[tuple[float, float]]] = {}
        for seed in range(args.seeds):
            ours = perspicio.explain(gbm.predict, rows, method="kernel_shap", background=bg, budget=budget,
                                     seed=seed).attributions.numpy()
            res.setdefault("perspicio kernel_shap", []).append(_err(ours, exact))
            for l1 in ("num_features(10)", False):
                np.random.seed(seed)  # shap's KernelExplainer samples from numpy's global RNG
                ke = shap.KernelExplainer(gbm.predict, bg)
                ref = np.asarray(ke.shap_values(rows, nsamples=budget, l1_reg=l1, silent=True))
                res.setdefault(f"shap KernelExplainer l1_reg={l1}", []).append(_err(ref, exact))
        for name, errs in res.items():
            print(f"| {budget} | {name} | {np.mean([e[0] for e in errs]):.4f} | {np.mean([e[1] for e in errs]):.4f} |")


def _err(est: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    d = est - exact
    return float(np.abs(d).max(axis=1).mean()), float(np.sqrt((d**2).mean()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0, help="1: one untimed run of every contender first")
    ap.add_argument("--budget", type=int, default=300, help="evaluations for RISE, KernelSHAP and LIME")
    ap.add_argument("--rows", type=int, default=5, help="tabular rows for the accuracy part")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--only", choices=("speed", "accuracy"), default=None)
    ap.add_argument("--methods", default="", help="comma-separated subset of the speed rows' methods")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    if args.only != "accuracy":
        speed(args)
    if args.only != "speed":
        accuracy(args)


if __name__ == "__main__":
    main()
