"""A/B of two perspicio source trees on the calls the CAM, perturbation and metrics benchmarks time.

Each round starts one worker process per tree (order alternating between rounds); a worker imports
perspicio from its tree, loads the bundled EfficientNet-Lite0, runs every contender once untimed
(twin building, memory probes) and then ``--repeats`` timed times, and reports the median per
contender. The table gives, per contender, the median over rounds of each tree's medians and their
ratio B / A. One discarded worker per tree runs first: in a trial run the very first worker was
up to 2.5x slower than all later ones (cold file caches or load; not separated). The calls are those of ``bench_cam.py`` (Grad-CAM, Score-CAM at ``_act_head``, target
285), ``bench_perturbation.py`` (occlusion window 32 stride 16, KernelSHAP on 50 SLIC superpixels
with budget 300) and ``bench_metrics.py`` (deletion, 100 steps, two images, Grad-CAM maps), and of the gradient and propagation benchmarks
(saliency, Integrated Gradients with 32 steps, LRP's default composite; target 285).

Run (e.g. the session-start commit against HEAD)::

    git worktree add /tmp/start <commit>
    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_ab.py /tmp/start/src src --rounds 3 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, statistics, sys, time, warnings
import torch
warnings.filterwarnings("ignore")
import perspicio
from perspicio import metrics, zoo
from perspicio.core.maskers import image_feature_mask

names = sys.argv[1].split(",")
repeats = int(sys.argv[2])
threads = int(sys.argv[3])
if threads:
    torch.set_num_threads(threads)
zm = zoo.load("efficientnet_lite0")
x = zm.preprocess(zoo.sample("chelsea"))
x2 = torch.cat([x, zm.preprocess(zoo.sample("coffee"))])
with torch.no_grad():
    top = int(zm.model(x).argmax())
seg = image_feature_mask(x[0], "slic:50")
maps = perspicio.explain(zm, x2, "gradcam")
deletion = metrics.Deletion(steps=100)
calls = {
    "gradcam": lambda: perspicio.explain(zm, x, "gradcam", layer="_act_head", target=285),
    "scorecam": lambda: perspicio.explain(zm, x, "scorecam", layer="_act_head", target=285),
    "occlusion": lambda: perspicio.explain(zm, x, "occlusion", window=32, stride=16, target=top),
    "kernel_shap": lambda: perspicio.explain(zm, x, "kernel_shap", feature_mask=seg, budget=300, target=top),
    "deletion": lambda: deletion(zm, x2, maps),
    "saliency": lambda: perspicio.explain(zm, x, "saliency", target=285),
    "integrated_gradients": lambda: perspicio.explain(zm, x, "integrated_gradients", steps=32, target=285),
    "lrp": lambda: perspicio.explain(zm, x, "lrp", target=285),
}
out = {}
for name in names:
    calls[name]()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        calls[name]()
        times.append(time.perf_counter() - t0)
    out[name] = statistics.median(times)
print(json.dumps({"perspicio": perspicio.__file__, "medians": out}))
"""

CONTENDERS = ("gradcam", "scorecam", "occlusion", "kernel_shap", "deletion", "saliency", "integrated_gradients", "lrp")


def run_worker(src: str, names: list[str], repeats: int, threads: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(src).resolve())}
    proc = subprocess.run([sys.executable, "-c", WORKER, ",".join(names), str(repeats), str(threads)],
                          env=env, capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    if not report["perspicio"].startswith(str(Path(src).resolve())):
        raise RuntimeError(f"worker imported {report['perspicio']}, not the tree {src}")
    return report["medians"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="source directory of tree A (the one containing perspicio/)")
    ap.add_argument("b", help="source directory of tree B")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0: torch's default)")
    ap.add_argument("--only", default=",".join(CONTENDERS), help="comma-separated contenders")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    per: dict[str, dict[str, list[float]]] = {"A": {n: [] for n in names}, "B": {n: [] for n in names}}
    for src in (args.a, args.b):  # discarded warm-up workers (see the docstring)
        run_worker(src, ["gradcam"], 1, args.threads)
    for r in range(args.rounds):
        order = ("A", "B") if r % 2 == 0 else ("B", "A")
        for side in order:
            med = run_worker(args.a if side == "A" else args.b, names, args.repeats, args.threads)
            for n, v in med.items():
                per[side][n].append(v)
            print(f"round {r + 1} {side}: " + ", ".join(f"{n} {v:.3f}s" for n, v in med.items()), flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    print("| contender | A (s) | B (s) | B / A | A rounds | B rounds |")
    print("|---|---|---|---|---|---|")
    for n in names:
        a, b = statistics.median(per["A"][n]), statistics.median(per["B"][n])
        fmt = lambda vs: " ".join(f"{v:.3f}" for v in vs)  # noqa: E731
        print(f"| {n} | {a:.3f} | {b:.3f} | {b / a:.2f} | {fmt(per['A'][n])} | {fmt(per['B'][n])} |")


if __name__ == "__main__":
    main()
