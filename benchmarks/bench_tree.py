"""Benchmark: exact TreeSHAP (``tree_shap``) against shap's TreeExplainer and XGBoost's own
``pred_contribs`` / ``pred_interactions``.

Models (trained here, deterministically): XGBoost binary classifier with 500 trees of depth 6 and a
scikit-learn RandomForestRegressor with 200 trees of depth 8, on 10,000 rows x 30 features.
Every contender explains the same rows in this one process, 2 threads where the contender has a
thread setting (numba, XGBoost; shap's C++ TreeExplainer is single-threaded and has none). Times
are medians of ``--repeats`` warm runs; numba's compile time is the cold first call minus a warm
call, measured once per process. Peak memory is the peak RSS growth over the call (sampled every
2 ms) - it covers C++ allocations, which tracemalloc cannot see.

Run::

    MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296 \\
        python benchmarks/bench_tree.py --repeats 3 --write

``--memory`` measures peak memory instead, one task at a time on the same models: the tracemalloc
peak of perspicio's call (every array it allocates is a numpy array, which tracemalloc sees) and,
for every contender, the peak RSS growth over the call with glibc told to return freed blocks
(``MALLOC_MMAP_THRESHOLD_=65536``, set by re-executing the script), so the growth is what the call
itself holds at its peak, C++ allocations included::

    python benchmarks/bench_tree.py --memory [--others] [--label before|after]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_note, malloc_note, table, write_section  # noqa: E402

THREADS = 2


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measured(fn: Callable[[], object]) -> tuple[float, int, object]:
    """(seconds, peak RSS growth in bytes, result) of one call."""
    base = rss()
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    done.set()
    th.join()
    peak[0] = max(peak[0], rss())
    return dt, peak[0] - base, out


def run(name: str, fn: Callable[[], object], repeats: int) -> dict[str, object]:
    times, mems = [], []
    out = None
    for _ in range(repeats):
        dt, mem, out = measured(fn)
        times.append(dt)
        mems.append(mem)
        del out
    dt, mem, out = measured(fn)
    times.append(dt)
    mems.append(mem)
    print(
        f"  {name}: {statistics.median(times):.3f} s, peak +{max(mems) / 2**20:.0f} MiB", flush=True
    )
    return {"name": name, "seconds": statistics.median(times), "mib": max(mems) / 2**20, "out": out}


def memory(args: argparse.Namespace) -> None:
    """Peak memory of each task, one call each (see the module documentation)."""
    import tracemalloc

    import numba
    import shap
    import xgboost as xgb
    from sklearn.ensemble import RandomForestRegressor

    from perspicio.trees import read_model, tree_shap

    numba.set_num_threads(THREADS)
    x, y, yr = _data(args.rows)
    xgbm = xgb.XGBClassifier(
        n_estimators=500, max_depth=6, learning_rate=0.05, n_jobs=THREADS, random_state=0
    )
    xgbm.fit(x, y)
    n_rf = 1 if args.xgboost_only else 200
    rf = RandomForestRegressor(n_estimators=n_rf, max_depth=8, n_jobs=THREADS, random_state=0).fit(
        x, yr
    )
    booster = xgbm.get_booster()
    booster.set_param({"nthread": THREADS})
    ens_x, ens_r = read_model(xgbm), read_model(rf)
    xs_i, bg = x[: args.interaction_rows], x[-args.background :]
    xs_v = x[: args.interventional_rows]
    for ens in (ens_x, ens_r):  # compile, and build the cached path arrays, before measuring
        tree_shap(ens, x[:8], interactions=True)
        tree_shap(ens, x[:8])
        tree_shap(ens, x[:8], feature_perturbation="interventional", background=bg[:4])
    tasks = [
        (
            "XGBoost 500x6",
            f"values, {len(x)} rows",
            lambda: tree_shap(ens_x, x),
            [
                (
                    "xgboost pred_contribs",
                    lambda: booster.predict(xgb.DMatrix(x, nthread=THREADS), pred_contribs=True),
                )
            ],
        ),
        (
            "XGBoost 500x6",
            f"interactions, {len(xs_i)} rows",
            lambda: tree_shap(ens_x, xs_i, interactions=True),
            [
                (
                    "xgboost pred_interactions",
                    lambda: booster.predict(
                        xgb.DMatrix(xs_i, nthread=THREADS), pred_interactions=True
                    ),
                )
            ],
        ),
        (
            "XGBoost 500x6",
            f"interventional ({len(bg)} bg), {len(xs_v)} rows",
            lambda: tree_shap(ens_x, xs_v, feature_perturbation="interventional", background=bg),
            [
                (
                    "shap TreeExplainer",
                    lambda: shap.TreeExplainer(
                        xgbm, bg, feature_perturbation="interventional"
                    ).shap_values(xs_v),
                )
            ],
        ),
        (
            "RandomForest 200x8",
            f"values, {len(x)} rows",
            lambda: tree_shap(ens_r, x),
            [("shap TreeExplainer", lambda: shap.TreeExplainer(rf).shap_values(x))],
        ),
        (
            "RandomForest 200x8",
            f"interactions, {len(xs_i)} rows",
            lambda: tree_shap(ens_r, xs_i, interactions=True),
            [("shap TreeExplainer", lambda: shap.TreeExplainer(rf).shap_interaction_values(xs_i))],
        ),
        (
            "RandomForest 200x8",
            f"interventional ({len(bg)} bg), {len(xs_v)} rows",
            lambda: tree_shap(ens_r, xs_v, feature_perturbation="interventional", background=bg),
            [
                (
                    "shap TreeExplainer",
                    lambda: shap.TreeExplainer(
                        rf, bg, feature_perturbation="interventional"
                    ).shap_values(xs_v),
                )
            ],
        ),
    ]
    rows = []
    for model, task, ours, others in tasks:
        if args.xgboost_only and not model.startswith("XGBoost"):
            continue
        tracemalloc.start()
        res = ours()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out_mib = (
            res.values.nbytes + (res.interactions.nbytes if res.interactions is not None else 0)
        ) / 2**20
        del res
        dt, grow, res = measured(ours)
        del res
        theirs = []
        for name, fn in others if args.others else []:
            _, g, r = measured(fn)
            del r
            theirs.append(f"{name} {g / 2**20:.1f}")
        rows.append([model, task, peak / 2**20, grow / 2**20, out_mib, dt, "; ".join(theirs)])
        print(rows[-1], flush=True)
    out = table(
        [
            "model",
            "task",
            "tracemalloc peak MiB",
            "RSS growth MiB",
            "result MiB",
            "seconds",
            "others' RSS growth MiB",
        ],
        rows,
    )
    print(out)
    if args.write:
        label = args.label or "memory"
        body = "\n".join(
            [f"### {label}", "", f"Machine: {machine_note()}; {malloc_note()}.", "", out]
        )
        path = ROOT_DOC
        text = path.read_text()
        path.write_text(text.rstrip() + "\n\n" + body + "\n")
        print(f"appended to {path}")


ROOT_DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _data(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 30))
    logit = x[:, 0] * x[:, 1] + np.sin(2 * x[:, 2]) + x[:, 3] ** 2 - 1 + 0.5 * x[:, 4:10].sum(1)
    y = (logit + rng.logistic(size=n) > 0).astype(int)
    yr = logit + 0.1 * rng.normal(size=n)
    return x, y, yr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--interaction-rows", type=int, default=1_000)
    ap.add_argument("--interventional-rows", type=int, default=1_000)
    ap.add_argument("--background", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true", help="write the section of docs/benchmarks.md")
    ap.add_argument(
        "--memory", action="store_true", help="measure peak memory per task instead of time"
    )
    ap.add_argument(
        "--label", default=None, help="heading of the --memory table (with --write: appended)"
    )
    ap.add_argument(
        "--others", action="store_true", help="with --memory: also XGBoost's and shap's RSS growth"
    )
    ap.add_argument(
        "--xgboost-only", action="store_true", help="with --memory: the XGBoost tasks only"
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.memory:
        if (
            os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536"
        ):  # freed blocks go back to the OS at once
            env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
            os.execve(sys.executable, [sys.executable, *sys.argv], env)
        memory(args)
        return
    import numba
    import shap
    import xgboost as xgb
    from sklearn.ensemble import RandomForestRegressor

    from perspicio.trees import read_model, tree_shap

    numba.set_num_threads(THREADS)
    n = args.rows
    x, y, yr = _data(n)
    note = f"{machine_note()}; {malloc_note()}; numba threads {THREADS}, xgboost nthread {THREADS}"
    print(note)
    t0 = time.perf_counter()
    xgbm = xgb.XGBClassifier(
        n_estimators=500, max_depth=6, learning_rate=0.05, n_jobs=THREADS, random_state=0
    )
    xgbm.fit(x, y)
    rf = RandomForestRegressor(n_estimators=200, max_depth=8, n_jobs=THREADS, random_state=0).fit(
        x, yr
    )
    print(f"trained in {time.perf_counter() - t0:.1f} s")
    booster = xgbm.get_booster()
    booster.set_param({"nthread": THREADS})
    dm = xgb.DMatrix(x, nthread=THREADS)
    ens_x = read_model(xgbm)
    ens_r = read_model(rf)
    t0 = time.perf_counter()
    tree_shap(ens_x, x[:8])
    cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    tree_shap(ens_x, x[:8])
    warm8 = time.perf_counter() - t0
    compile_values = cold - warm8
    t0 = time.perf_counter()
    tree_shap(ens_x, x[:8], interactions=True)
    tree_shap(ens_x, x[:8], feature_perturbation="interventional", background=x[:4])
    compile_rest = time.perf_counter() - t0
    print(
        f"numba compile: {compile_values:.1f} s (values), {compile_rest:.1f} s more (interactions, interventional)"
    )
    rows: list[list[object]] = []
    checks: list[str] = []

    def section(
        title: str,
        contenders: list[tuple[str, Callable[[], object]]],
        ref: str,
        cmp: Callable[[object, object], float] | None = None,
    ) -> None:
        print(title)
        res = [run(name, fn, args.repeats) for name, fn in contenders]
        ours = res[0]
        for r in res:
            rows.append(
                [
                    title,
                    r["name"],
                    r["seconds"],
                    r["mib"],
                    None if r is ours else r["seconds"] / ours["seconds"],
                ]
            )
        if cmp is not None:
            for r in res[1:]:
                checks.append(
                    f"{title}: max relative difference to {r['name']} {cmp(ours['out'], r['out']):.1e}"
                )

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / np.abs(b).max())

    xs_i = x[: args.interaction_rows]
    dm_i = xgb.DMatrix(xs_i, nthread=THREADS)
    xs_v = x[: args.interventional_rows]
    bg = x[-args.background :]
    ex_x = shap.TreeExplainer(xgbm)
    ex_r = shap.TreeExplainer(rf)
    ex_xi = shap.TreeExplainer(xgbm, bg, feature_perturbation="interventional")
    ex_ri = shap.TreeExplainer(rf, bg, feature_perturbation="interventional")

    section(
        f"XGBoost 500x depth 6, SHAP values, {n} rows",
        [
            ("perspicio tree_shap", lambda: tree_shap(ens_x, x).values[:, :, 0]),
            ("xgboost pred_contribs", lambda: booster.predict(dm, pred_contribs=True)[:, :-1]),
            ("shap TreeExplainer (calls pred_contribs)", lambda: ex_x.shap_values(x)),
        ],
        "",
        rel,
    )
    section(
        f"XGBoost 500x depth 6, interaction values, {len(xs_i)} rows",
        [
            (
                "perspicio tree_shap",
                lambda: tree_shap(ens_x, xs_i, interactions=True).interactions[..., 0],
            ),
            (
                "xgboost pred_interactions (what shap's TreeExplainer calls)",
                lambda: booster.predict(dm_i, pred_interactions=True)[:, :-1, :-1],
            ),
        ],
        "",
        rel,
    )
    section(
        f"XGBoost 500x depth 6, interventional ({args.background} background rows), {len(xs_v)} rows",
        [
            (
                "perspicio tree_shap",
                lambda: tree_shap(
                    ens_x, xs_v, feature_perturbation="interventional", background=bg
                ).values[:, :, 0],
            ),
            ("shap TreeExplainer", lambda: ex_xi.shap_values(xs_v)),
        ],
        "",
        rel,
    )
    section(
        f"RandomForest 200x depth 8, SHAP values, {n} rows",
        [
            ("perspicio tree_shap", lambda: tree_shap(ens_r, x).values[:, :, 0]),
            ("shap TreeExplainer", lambda: ex_r.shap_values(x)),
        ],
        "",
        rel,
    )
    section(
        f"RandomForest 200x depth 8, interaction values, {len(xs_i)} rows",
        [
            (
                "perspicio tree_shap",
                lambda: tree_shap(ens_r, xs_i, interactions=True).interactions[..., 0],
            ),
            ("shap TreeExplainer", lambda: ex_r.shap_interaction_values(xs_i)),
        ],
        "",
        rel,
    )
    section(
        f"RandomForest 200x depth 8, interventional ({args.background} background rows), {len(xs_v)} rows",
        [
            (
                "perspicio tree_shap",
                lambda: tree_shap(
                    ens_r, xs_v, feature_perturbation="interventional", background=bg
                ).values[:, :, 0],
            ),
            ("shap TreeExplainer", lambda: ex_ri.shap_values(xs_v)),
        ],
        "",
        rel,
    )

    out = table(["task", "contender", "median s", "peak RSS growth MiB", "their time / ours"], rows)
    print(out)
    print("\n".join(checks))
    if args.write:
        body = "\n".join(
            [
                "`benchmarks/bench_tree.py` (one process, same rows for every contender; times are medians of "
                f"{args.repeats + 1} warm runs).",
                "",
                f"Machine: {note}.",
                "",
                f"numba compile time (cold first call, not in the table): {compile_values:.1f} s for the SHAP-value "
                f"kernels, {compile_rest:.1f} s more for the interaction and interventional kernels; once per process.",
                "",
                out,
                "",
                "Agreement of the results (same rows):",
                "",
                *[f"- {c}" for c in checks],
            ]
        )
        write_section("Tree models (issue 17)", body)
        print("wrote docs/benchmarks.md")


if __name__ == "__main__":
    main()
