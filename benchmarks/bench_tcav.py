"""TCAV on the bundled EfficientNet-Lite0: perspicio.concepts.tcav beside Captum's TCAV on the same work.

Work: 12 target-class inputs (views of 'chelsea', target 'Egyptian cat'), 2 concepts (brick and
gravel crops, 12 images each), 10 random sets of 12 images drawn from a pool of 60 photo crops
(the bundled example sets), layer ``_blocks.10``; CAVs for concept vs each random set (20) and
random set i vs i+1 (10, the null of the t-test); TCAV scores of all 30.

Captum runs twice: with its default classifier (its torch SGD; the usual call) and with a
classifier that fits perspicio's CAV (the same vectors, so the scores must agree - checked).
Captum computes activations per concept object, so each random set's images go through the model
again; perspicio computes each pool image once. Medians of ``--repeats`` runs in one process,
alternating; wall and process CPU seconds (the machine is shared: wall time depends on the load,
CPU time less so).

    python benchmarks/bench_tcav.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    from captum.concept import TCAV, Concept

    from perspicio import zoo
    from perspicio.concepts import fit_cav, tcav
    from perspicio.concepts.tcav import draw_sets
    from perspicio.zoo.concept_sets import example_sets

    bundle = zoo.load("efficientnet_lite0")
    ex = example_sets(n_concept=12, n_random=60, n_inputs=12)
    pre = bundle.preprocess
    x = pre(ex["inputs"])
    concepts = {k: pre(ex["concepts"][k]) for k in ("brick", "gravel")}
    pool = pre(ex["random"])
    layer, n_sets, seed = "_blocks.10", 10, 0
    index_sets = draw_sets(len(pool), n_sets, 12, seed)
    random_sets = [pool[torch.from_numpy(ix)] for ix in index_sets]
    target = 285

    def ours() -> object:
        return tcav(
            bundle,
            x,
            layer=layer,
            concepts=concepts,
            target=target,
            random_sets=n_sets,
            random=pool,
            seed=seed,
        )

    class SameCAV:
        """Captum Classifier fitting perspicio's CAV (concept = first concept of the set)."""

        def train_and_eval(self, dataloader, **kw):
            xs, ys = zip(*dataloader)
            xa, ya = torch.cat(xs), torch.cat(ys)
            first = int(ya[0])
            self._classes = [first, int(ya[ya != first][0])]
            v = fit_cav(xa[ya == first], xa[ya != first]).vector
            self._w = torch.stack([v, -v]).float()
            return {}

        def weights(self):
            return self._w

        def classes(self):
            return self._classes

    def captum(classifier: object | None) -> dict:
        cc = [Concept(i, name, [t]) for i, (name, t) in enumerate(concepts.items())]
        rc = [Concept(10 + i, f"random{i}", [t]) for i, t in enumerate(random_sets)]
        sets = [[c, r] for c in cc for r in rc] + [
            [rc[i], rc[(i + 1) % n_sets]] for i in range(n_sets)
        ]
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kw = {} if classifier is None else {"classifier": classifier}
            t = TCAV(bundle.model, layers=[layer], save_path=tmp, **kw)
            return t.interpret(x, sets, target=target)

    runs: dict[str, list[float]] = {
        "perspicio": [],
        "captum (same CAVs)": [],
        "captum (default SGD)": [],
    }
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    result = ref = None
    for _ in range(args.repeats):
        for name, fn in (
            ("perspicio", ours),
            ("captum (same CAVs)", lambda: captum(SameCAV())),
            ("captum (default SGD)", lambda: captum(None)),
        ):
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            runs[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
            print(f"{name}: {runs[name][-1]:.1f} s wall, {cpu[name][-1]:.1f} s CPU", flush=True)
            if name == "perspicio":
                result = out
            elif name == "captum (same CAVs)":
                ref = out
    # the same scores (counts of inputs with a positive directional derivative)
    for i, c in enumerate(concepts):
        theirs = [float(ref[f"{i}-{10 + j}"][layer]["sign_count"][0]) for j in range(n_sets)]
        assert np.array_equal(
            np.round(np.array(theirs) * 12), np.round(result.concept_scores[c] * 12)
        ), c
    print(f"scores: {result.scores}, p-values: {result.p_values}")
    base, base_cpu = statistics.median(runs["perspicio"]), statistics.median(cpu["perspicio"])
    for name, ts in runs.items():
        med, med_cpu = statistics.median(ts), statistics.median(cpu[name])
        print(
            f"{name:24s} median wall {med:7.1f} s (x{med / base:.2f}), CPU {med_cpu:7.1f} s (x{med_cpu / base_cpu:.2f})"
        )


if __name__ == "__main__":
    main()
