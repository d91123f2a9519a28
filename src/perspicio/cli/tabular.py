"""`perspicio explain-tabular`: explain rows of a bundled tabular demo or of the user's own model
file and write the SHAP plots (summary, bar, dependence, waterfall, force, ...)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click

from .common import out_dir_flag, parse_extra, parse_target, split_list

#: methods that read the model's structure (chosen by default when the model is one they can read)
STRUCTURED = ("tree_shap", "linear_shap")
#: per-row plots are written for at most this many rows
ROW_PLOTS = 5


def register(group: click.Group) -> None:
    group.add_command(explain_tabular_cmd)


def _tabular_methods() -> list[str]:
    from ..core.registry import METHODS

    agnostic = [
        e.name
        for e in METHODS.entries()
        if e.model_agnostic and not e.needs_gradients and e.name != "rise"
    ]
    return [*STRUCTURED, *agnostic]


@click.command("explain-tabular")
@click.option(
    "--model",
    "-m",
    "model_spec",
    default="mlp",
    show_default=True,
    help="A bundled demo - mlp (torch), gbm (scikit-learn), xgb (XGBoost), or DATASET_KIND such as "
    "breast_cancer_xgb - or your model file: XGBoost .json/.ubj, LightGBM .txt, or a pickle "
    "(.pkl/.joblib, only with --trust-pickle).",
)
@click.option(
    "--data",
    "data_spec",
    default="breast_cancer",
    show_default=True,
    help="Bundled data set (breast_cancer, diabetes) for a demo; a .csv/.parquet file for a model file.",
)
@click.option(
    "--method",
    default=None,
    help="tree_shap (default for tree models), linear_shap (linear models), or a model-agnostic method: "
    "kernel_shap (default otherwise), shapley_sampling, shapley_exact, lime, feature_ablation, occlusion.",
)
@click.option(
    "--rows",
    default=None,
    help="Rows to explain (comma-separated, or a:b): test-set rows of a demo, data-file rows otherwise. "
    "Default: all rows for tree_shap/linear_shap, 0:5 for the sampling methods.",
)
@click.option(
    "--target",
    "-t",
    default=None,
    help="Output to explain: class index or name (default: the predicted class).",
)
@click.option(
    "--background",
    default=None,
    help="Background rows: a .csv/.parquet file or a number of rows drawn from the training/data rows. "
    "With tree_shap this selects the interventional game.",
)
@click.option("--background-size", type=int, default=None, help="Same as --background N.")
@click.option(
    "--drop",
    "drop",
    multiple=True,
    help="Columns of --data that are not features (e.g. the label).",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow a pickled model file (unpickling runs code in the file).",
)
@click.option(
    "--interactions/--no-interactions",
    default=None,
    help="tree_shap interaction values (interaction summary; exact dependence colouring). "
    "Default: on up to 64 features.",
)
@click.option(
    "--budget", type=int, default=None, help="Model evaluations per row (sampling methods)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--max-display",
    type=click.IntRange(min=1),
    default=12,
    show_default=True,
    help="Features shown in the plots.",
)
@click.option(
    "--option", "extra", multiple=True, help="Any other method option as key=value (repeatable)."
)
@out_dir_flag()
def explain_tabular_cmd(
    model_spec: str,
    data_spec: str,
    method: str | None,
    rows: str | None,
    target: str | None,
    background: str | None,
    background_size: int | None,
    drop: tuple[str, ...],
    trust_pickle: bool,
    interactions: bool | None,
    budget: int | None,
    seed: int,
    max_display: int,
    extra: tuple[str, ...],
    out_dir: str,
) -> None:
    """Explain rows of a tabular model and write SHAP plots.

    \b
    perspicio explain-tabular --model breast_cancer_xgb        # the XGBoost + TreeSHAP example
    perspicio explain-tabular --model model.json --data rows.csv --drop label
    perspicio explain-tabular --model mlp --method kernel_shap --rows 0:5

    Writes OUT/beeswarm.png (the summary plot), bar.png, dependence_<feature>.png (the 3 most
    important features), row<i>_waterfall.png and row<i>_force.png (first 5 rows), force.html
    (self-contained, all rows), heatmap.png, decision.png, interaction_summary.png (tree_shap with
    interactions) and summary.json.
    """
    import matplotlib

    matplotlib.use("Agg")

    from .. import explain
    from ..core.registry import METHODS
    from ..errors import OptionError

    data_given = (
        click.get_current_context().get_parameter_source("data_spec")
        is not click.core.ParameterSource.DEFAULT
    )
    job = _load(model_spec, data_spec, drop, trust_pickle, seed, data_given=data_given)
    structured = _structured_method(job["model"])
    name = METHODS.get(method).name if method else structured or "kernel_shap"
    allowed = _tabular_methods()
    if name not in allowed:
        raise OptionError(
            f"--method {name} does not work on tabular models; choose one of: {', '.join(allowed)}."
        )
    if name in STRUCTURED and name != structured:
        what = "a tree model" if name == "tree_shap" else "a linear model"
        raise OptionError(
            f"--method {name} needs {what}; {model_spec} is not one. "
            f"Use {structured or 'kernel_shap'} instead."
        )
    x_all = job["X"]
    idx = (
        _parse_rows(rows, len(x_all))
        if rows
        else list(range(len(x_all) if name in STRUCTURED else min(5, len(x_all))))
    )
    x = x_all[idx]
    bg = _background(background, background_size, job, seed)
    cls = METHODS.get(name).cls
    opts: dict[str, Any] = {"feature_names": list(job["feature_names"]), "seed": seed}
    if name == "tree_shap":
        if bg is None:
            from ..trees.onnx_reader import has_covers
            from ..trees.readers import read_model

            if not has_covers(read_model(job["model"])):  # ONNX trees: path-dependent undefined
                bg = _sample(job["background_pool"], 100, seed)
                click.echo(
                    f"note: {Path(model_spec).name} stores no node covers: interventional game with "
                    f"{len(bg)} background rows (--background to choose them).",
                    err=True,
                )
        if bg is not None:
            opts.update(feature_perturbation="interventional", background=bg)
        use_inter = interactions if interactions is not None else len(job["feature_names"]) <= 64
        opts["interactions"] = bool(use_inter)
    else:
        if interactions:
            raise OptionError("--interactions needs --method tree_shap.")
        opts["background"] = bg if bg is not None else _sample(job["background_pool"], 100, seed)
    if budget is not None:
        opts["budget"] = budget
    opts = {k: v for k, v in opts.items() if k in cls.option_names()}
    opts.update(parse_extra(extra))  # unknown keys fail with the method's list of options
    labels = job["labels"]
    if (
        labels is not None and name == "tree_shap"
    ):  # a binary margin has one output: the positive class
        from ..trees.readers import read_model

        n_out = read_model(job["model"]).n_outputs
        labels = (
            (labels[-1],)
            if n_out == 1 and len(labels) == 2
            else labels
            if len(labels) == n_out
            else None
        )
    if labels is not None:
        opts.setdefault("labels", labels)
    e = explain(job["model"], x, method=name, target=parse_target(target), **opts)
    e = _with_unit(e, job, name, x)
    _report(e, idx, job, name, model_spec, data_spec, Path(out_dir), max_display)


def _with_unit(e: Any, job: dict[str, Any], name: str, x: Any) -> Any:
    """The explanation with what its scores are: the margin (log-odds) of a tree or linear model
    (and the probability its logistic link gives), the logit or probability of a model's outputs
    (read from them), or the prediction of a regression model."""
    import numpy as np
    import torch

    from ..core.explanation import classify_output

    classification = job["labels"] is not None
    if name in STRUCTURED:
        if str(e.options.get("model_output", "raw")) == "probability":
            return e.with_score_unit("probability")
        if not classification:
            return e.with_score_unit("prediction" if _is_demo(job) else "margin")
        probs = None
        try:
            from ..trees.readers import read_model

            ens = read_model(job["model"])
            if ens.transform == "logistic" and ens.n_outputs == 1:
                probs = 1.0 / (1.0 + np.exp(-e.scores.double().numpy()))
            elif ens.transform == "softmax" and e.targets is not None:
                m = torch.as_tensor(ens.predict(np.asarray(x))).double().softmax(1)
                probs = m.gather(1, e.targets.view(-1, 1).long())[:, 0].numpy()
        except Exception:  # a linear model or an unread link: the margin alone
            probs = None
        return e.with_score_unit("margin (log-odds)", probs)
    if not classification:
        return e.with_score_unit("prediction") if _is_demo(job) else e
    try:
        from ..core.blackbox import unwrap_model

        module, _ = unwrap_model(job["model"])
        with torch.no_grad():
            out = module(torch.as_tensor(np.asarray(x, dtype=np.float32)))
        unit, probs = classify_output(out)
    except Exception:  # the outputs could not be read again: say nothing we do not know
        return e
    if unit == "output" or e.targets is None:
        return e.with_score_unit(unit)
    chosen = probs.gather(1, e.targets.view(-1, 1).long().to(probs.device))[:, 0]
    return e.with_score_unit(unit, chosen)


def _is_demo(job: dict[str, Any]) -> bool:
    return hasattr(job["model"], "X_train")


# ----------------------------------------------------------------------------- loading


def _load(
    model_spec: str,
    data_spec: str,
    drop: tuple[str, ...],
    trust_pickle: bool,
    seed: int,
    data_given: bool = False,
) -> dict[str, Any]:
    """The model, the rows to explain from, the background pool, feature names and labels."""
    from ..errors import InputError, OptionError
    from ..zoo.tabular import (
        DATASETS,
        MODEL_KINDS,
        load_model_file,
        load_tabular,
        read_table,
        require_tabular,
    )

    spec = model_spec.strip()
    path = Path(spec).expanduser()
    demo = _demo_spec(spec, data_spec, DATASETS, MODEL_KINDS)
    if demo is not None and not path.is_file():
        dataset, kind = demo
        given = data_spec.strip().lower().replace("-", "_")
        if data_given and given != dataset:
            raise OptionError(
                f"--model {spec} is the {dataset} demo and carries its own rows; --data "
                f"{data_spec!r} conflicts with it (a demo on another data set: --model {kind} "
                f"--data DATASET; your own rows need your own model file)."
            )
        if drop:
            raise OptionError("--drop applies to a --data file, not to the bundled data sets.")
        require_tabular(xgboost=kind == "xgb", what=f"the {dataset}_{kind} demo")
        d = load_tabular(dataset, kind, seed=seed)
        labels = d.labels if d.task == "classification" else None
        return {
            "model": d,
            "X": d.X_test,
            "background_pool": d.X_train,
            "feature_names": d.feature_names,
            "labels": labels,
            "source": d.name,
        }
    if not path.is_file():
        kinds = ", ".join(MODEL_KINDS)
        raise OptionError(
            f"--model {spec!r} is neither a bundled demo ({kinds}, or DATASET_KIND such as "
            f"breast_cancer_xgb) nor an existing model file."
        )
    model = load_model_file(path, trust_pickle=trust_pickle)
    if Path(data_spec).suffix.lower() not in (".csv", ".tsv", ".txt", ".parquet", ".pq"):
        raise OptionError(
            f"a model file needs --data FILE.csv or FILE.parquet with the rows to explain; got {data_spec!r}."
        )
    table, cols = read_table(data_spec)
    dropped = split_list(list(drop))
    unknown = [c for c in dropped if c not in cols]
    if unknown:
        raise OptionError(
            f"--drop: no column {', '.join(map(repr, unknown))} in {Path(data_spec).name} "
            f"(columns: {', '.join(cols)})."
        )
    keep = [i for i, c in enumerate(cols) if c not in dropped]
    n_features = _n_features(model)
    stored = _stored_names(model)
    if stored is not None and set(stored) <= {cols[i] for i in keep} and len(keep) != len(stored):
        keep = [cols.index(c) for c in stored]  # the model's own columns, by name
    if n_features is not None and len(keep) != n_features:
        raise InputError(
            f"{Path(data_spec).name} has {len(keep)} feature columns ({', '.join(cols[i] for i in keep)}) "
            f"but the model takes {n_features}; use --drop for non-feature columns (e.g. the label)."
        )
    x = table[:, keep]
    return {
        "model": model,
        "X": x,
        "background_pool": x,
        "feature_names": tuple(cols[i] for i in keep),
        "labels": getattr(model, "labels", None),  # an OnnxModel's ZipMap class labels
        "source": path.name,
    }


def _demo_spec(spec: str, data_spec: str, datasets: Any, kinds: Any) -> tuple[str, str] | None:
    key = spec.lower().replace("-", "_")
    if key in kinds:
        return data_spec.strip().lower().replace("-", "_"), key
    for ds in datasets:
        for kind in kinds:
            if key == f"{ds}_{kind}":
                return ds, kind
    return None


def _n_features(model: Any) -> int | None:
    n = getattr(model, "n_features", None)
    if isinstance(n, int):
        return n
    n = getattr(model, "n_features_in_", None)
    return int(n) if n is not None else None


def _stored_names(model: Any) -> tuple[str, ...] | None:
    names = getattr(model, "feature_names", None)
    if names is None:
        names = getattr(model, "feature_names_in_", None)
    if names is None or isinstance(names, str):
        return None
    names = tuple(str(n) for n in names)
    return None if all(re.fullmatch(r"(f|Column_)\d+", n) for n in names) else names


def _structured_method(model: Any) -> str | None:
    """tree_shap if the model is a tree model perspicio reads, linear_shap if linear, else None."""
    from ..errors import ModelError
    from ..trees.linear import read_linear
    from ..trees.readers import read_model

    for name, reader in (("tree_shap", read_model), ("linear_shap", read_linear)):
        try:
            reader(model)
            return name
        except ModelError:
            continue
    return None


def _sample(rows: Any, n: int, seed: int) -> Any:
    import numpy as np

    if n >= len(rows):
        return rows
    return rows[np.sort(np.random.default_rng(seed).choice(len(rows), size=n, replace=False))]


def _background(spec: str | None, size: int | None, job: dict[str, Any], seed: int) -> Any:
    from ..errors import OptionError
    from ..zoo.tabular import read_table

    if spec is not None and size is not None:
        raise OptionError("give --background or --background-size, not both.")
    if size is not None:
        spec = str(size)
    if spec is None:
        return None
    if spec.strip().isdigit():
        n = int(spec)
        if n < 1:
            raise OptionError("--background needs at least 1 row.")
        return _sample(job["background_pool"], n, seed)
    table, cols = read_table(spec)
    names = list(job["feature_names"])
    if all(c in cols for c in names):
        return table[:, [cols.index(c) for c in names]]
    if table.shape[1] != len(names):
        raise OptionError(
            f"--background {Path(spec).name} has {table.shape[1]} columns; the model takes {len(names)} "
            f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})."
        )
    return table


# ----------------------------------------------------------------------------- output


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "feature"


def _report(
    e: Any,
    idx: list[int],
    job: dict[str, Any],
    name: str,
    model_spec: str,
    data_spec: str,
    out: Path,
    max_display: int,
) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    from ..viz import shap_plots

    values, names, _ = shap_plots.feature_table(e, job["feature_names"])
    out.mkdir(parents=True, exist_ok=True)
    written: list[str] = []

    def save(fig: Any, fname: str) -> None:
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
        written.append(fname)

    ev = e.provenance.get("evaluations")
    click.echo(
        f"{job['source']}: {name} on {len(idx)} rows"
        + (f" ({ev} evaluations" if ev else " (")
        + f"{', ' if ev else ''}{e.provenance.get('seconds', 0):.2f} s)"
    )
    summary_rows = []
    for k, r in enumerate(idx):
        v = values[k]
        label = (
            e.target_names[k]
            if e.target_names
            else str(int(e.targets[k]))
            if e.targets is not None
            else ""
        )
        base = float(e.base_value[k]) if e.base_value is not None else None
        probs = e.probabilities
        prob = probs[k] if probs is not None and e.score_unit != "probability" else None
        if k < ROW_PLOTS:
            top = np.argsort(-np.abs(v))[:3]
            click.echo(
                f"  row {r}: {label} {e.score_unit} {float(e.scores[k]):.4g}"
                + (f", probability {prob:.3f}" if prob is not None else "")
                + (f" (base {base:.4g})" if base is not None else "")
                + "  top: "
                + ", ".join(f"{names[j]} {v[j]:+.3g}" for j in top)
            )
            save(
                shap_plots.waterfall(e, k, max_display=max_display, feature_names=names),
                f"row{r}_waterfall.png",
            )
            save(shap_plots.force(e, k, feature_names=names), f"row{r}_force.png")
        summary_rows.append(
            {
                "row": r,
                "target": label,
                "prediction": float(e.scores[k]),
                "prediction_unit": e.score_unit,
                "probability": prob,
                "base_value": base,
                "values": {n: float(val) for n, val in zip(names, v)},
            }
        )
    if len(idx) > ROW_PLOTS:
        click.echo(f"  ... {len(idx) - ROW_PLOTS} more rows (all in summary.json)")
    save(shap_plots.beeswarm(e, max_display=max_display, feature_names=names), "beeswarm.png")
    save(shap_plots.bar(e, max_display=max_display, feature_names=names), "bar.png")
    if len(idx) > 1:
        for j in np.argsort(-np.abs(values).mean(0), kind="stable")[:3]:
            save(
                shap_plots.scatter(e, int(j), feature_names=names),
                f"dependence_{_safe(names[j])}.png",
            )
        save(shap_plots.heatmap(e, max_display=max_display, feature_names=names), "heatmap.png")
        save(
            shap_plots.decision(
                e, list(range(min(len(idx), 200))), max_display=max_display + 8, feature_names=names
            ),
            "decision.png",
        )
    if "interactions" in e.extras:
        save(shap_plots.interaction_summary(e, feature_names=names), "interaction_summary.png")
    (out / "force.html").write_text(
        shap_plots.force_html(e, 0 if len(idx) == 1 else None, feature_names=names)
    )
    written.append("force.html")
    (out / "summary.json").write_text(
        json.dumps(
            {
                "model": model_spec,
                "data": data_spec,
                "method": name,
                "summary": e.summary(),
                "rows": summary_rows,
            },
            indent=2,
        )
    )
    written.append("summary.json")
    click.echo(f"wrote {len(written)} files to {out}/")


def _parse_rows(rows: str, n: int) -> list[int]:
    from ..errors import OptionError

    out: list[int] = []
    for part in split_list(rows):
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                out.extend(range(int(a or 0), min(int(b or n), n) if b else n))
            else:
                out.append(int(part))
        except ValueError:
            raise OptionError(
                f"--rows expects integers or ranges like 0,3,5:8; got {part!r}."
            ) from None
    bad = [r for r in out if not 0 <= r < n]
    if bad or not out:
        raise OptionError(f"--rows must be rows in 0..{n - 1}; got {rows!r}.")
    return out
