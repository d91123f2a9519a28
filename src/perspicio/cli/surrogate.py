"""`perspicio surrogate tree|linear`: distil a model into a decision tree or a sparse linear model."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .common import out_dir_flag, parse_target


def register(group: click.Group) -> None:
    group.add_command(surrogate_group)


@click.group("surrogate")
def surrogate_group() -> None:
    """Distil a model into an interpretable surrogate and measure its fidelity on held-out rows."""


def _check_holdout(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """--holdout is a fraction strictly between 0 and 1 (checked even when it is not used)."""
    if not (0.0 < value < 1.0):  # also refuses nan
        raise click.BadParameter(f"must be a fraction strictly between 0 and 1; got {value}.")
    return value


def _common(f: Callable) -> Callable:
    options = [
        click.option(
            "--model",
            "-m",
            "model_spec",
            default="breast_cancer/mlp",
            show_default=True,
            help="A bundled tabular model DATASET/KIND (breast_cancer or diabetes; mlp or gbm), which "
            "carries its data, or any model spec of `perspicio explain` (then --data is required).",
        ),
        click.option(
            "--data",
            "data_path",
            default=None,
            type=click.Path(dir_okay=False),
            help="Rows to distil on: a .csv (header row optional) or .npy file of shape (rows, features).",
        ),
        click.option(
            "--test-data",
            "test_path",
            default=None,
            type=click.Path(dir_okay=False),
            help="Held-out rows (same format); default: --holdout of --data's rows.",
        ),
        click.option(
            "--label-column",
            default=None,
            help="A .csv column holding the true labels (dropped from the features).",
        ),
        click.option(
            "--target",
            "-t",
            default=None,
            help="Regress this output's score (index or class name) instead of imitating the class.",
        ),
        click.option(
            "--holdout",
            type=float,
            callback=_check_holdout,
            default=0.25,
            show_default=True,
            help="Fraction of --data held out for the fidelity (ignored with --test-data).",
        ),
        click.option(
            "--neighbours",
            type=int,
            default=0,
            show_default=True,
            help="Generated Gaussian neighbours per training row (labelled by the model, fit only).",
        ),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option(
            "--device",
            default="cpu",
            show_default=True,
            help="torch device of a non-bundled model.",
        ),
        out_dir_flag(),
    ]
    for opt in reversed(options):
        f = opt(f)
    return f


@surrogate_group.command("tree")
@_common
@click.option(
    "--max-depth", type=int, default=4, show_default=True, help="Depth of the tree (>= 1)."
)
@click.option(
    "--depths",
    default="1-8",
    show_default=True,
    help="Depths of the depth/fidelity curve, e.g. 1-8 or 2,4,6 ('none' to skip).",
)
def tree_cmd(max_depth: int, depths: str, **kw: Any) -> None:
    """Distil the model into a decision tree.

    Writes OUT/tree.png, OUT/rules.txt (one rule per leaf with its held-out coverage and
    fidelity), OUT/fidelity_curve.png and OUT/tree.json.
    """
    from ..surrogates import distill_tree
    from ..surrogates._design import check_depth

    check_depth(max_depth)  # before the model is loaded
    depth_list = _parse_depths(depths)
    model, args, out = _setup(kw)
    s = distill_tree(model, max_depth=max_depth, **args)
    plt = _pyplot()
    fig = s.figure()
    fig.savefig(out / "tree.png", dpi=100)
    plt.close(fig)
    (out / "rules.txt").write_text(s.rules_text() + "\n")
    data = s.to_dict()
    files = ["tree.png", "rules.txt"]
    if depth_list:
        curve = s.curve(depth_list)
        fig = curve.figure()
        fig.savefig(out / "fidelity_curve.png", dpi=100)
        plt.close(fig)
        data["curve"] = curve.to_dict()
        files.append("fidelity_curve.png")
        click.echo(str(curve))
    from ..surrogates.tree import dump_json

    dump_json(data, out / "tree.json")
    files.append("tree.json")
    click.echo(str(s))
    for rule in s.rules()[:5]:
        click.echo(f"  {rule}")
    click.echo(f"wrote {', '.join(files)} to {out}/")


@surrogate_group.command("linear")
@_common
@click.option(
    "--l1",
    type=float,
    default=0.01,
    show_default=True,
    help="L1 penalty strength on standardised features (mean loss + l1 * |w|_1).",
)
@click.option(
    "--max-features",
    type=int,
    default=None,
    help="Instead of --l1: the weakest penalty whose model uses at most this many features.",
)
def linear_cmd(l1: float, max_features: int | None, **kw: Any) -> None:
    """Distil the model into a sparse linear (logistic or Lasso) model.

    Writes OUT/linear.png (the non-zero coefficients) and OUT/linear.json.
    """
    from ..surrogates import distill_linear

    ctx = click.get_current_context()
    if max_features is not None and (
        ctx.get_parameter_source("l1") is not click.core.ParameterSource.DEFAULT
    ):
        from ..errors import OptionError

        raise OptionError(
            "give --l1 or --max-features, not both (--max-features chooses the penalty)."
        )
    model, args, out = _setup(kw)
    s = distill_linear(model, l1=l1, max_features=max_features, **args)
    plt = _pyplot()
    fig = s.figure()
    fig.savefig(out / "linear.png", dpi=100)
    plt.close(fig)
    s.to_json(out / "linear.json")
    click.echo(str(s))
    click.echo(f"wrote linear.png, linear.json to {out}/")


# ----------------------------------------------------------------------------- helpers


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _setup(kw: dict[str, Any]) -> tuple[Any, dict[str, Any], Path]:
    """The model, the keyword arguments of distill_*, and the output directory."""
    from ..errors import OptionError
    from ..zoo.tabular import DATASETS, MODEL_KINDS

    name, sep, kind = kw["model_spec"].strip().lower().replace("-", "_").partition("/")
    if sep and name in DATASETS and kind not in MODEL_KINDS:
        from ..errors import UnknownNameError, suggest

        raise UnknownNameError(
            f"unknown model kind {kind!r} in --model {kw['model_spec']!r}; the bundled kinds are "
            f"{', '.join(MODEL_KINDS)}." + suggest(kind, list(MODEL_KINDS))
        )
    if kw["data_path"] is None and not _is_bundled(kw["model_spec"]):
        raise OptionError(
            f"--data is required for {kw['model_spec']!r} (only bundled tabular models carry data)."
        )
    model, bundled = _load(kw["model_spec"], kw["device"], kw["seed"])
    args: dict[str, Any] = {
        "target": parse_target(kw["target"]),
        "holdout": kw["holdout"],
        "neighbours": kw["neighbours"],
        "seed": kw["seed"],
    }
    if kw["data_path"] is None:
        if kw["test_path"] is not None or kw["label_column"] is not None:
            raise OptionError("--test-data and --label-column need --data.")
    else:
        x, names, y = _read_table(kw["data_path"], kw["label_column"])
        args.update(data=x, labels=y)
        if names is not None:
            args["feature_names"] = names
        elif bundled:
            args["feature_names"] = list(model.feature_names)
        if kw["test_path"] is not None:
            xt, _, yt = _read_table(kw["test_path"], kw["label_column"])
            args.update(test_data=xt, test_labels=yt)
    out = Path(kw["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    return model, args, out


def _is_bundled(spec: str) -> bool:
    from ..zoo.tabular import DATASETS, MODEL_KINDS

    name, _, kind = spec.strip().lower().replace("-", "_").partition("/")
    return name in DATASETS and (not kind or kind in MODEL_KINDS)


def _load(spec: str, device: str, seed: int) -> tuple[Any, bool]:
    from ..zoo.tabular import load_tabular

    if _is_bundled(spec):
        name, _, kind = spec.strip().lower().replace("-", "_").partition("/")
        return load_tabular(name, kind or "mlp", seed=seed), True
    from .common import load_model

    return load_model(spec, device, False), False


def _read_table(path: str, label_column: str | None) -> tuple[Any, list[str] | None, Any]:
    """(rows, column names or None, labels or None) from a .csv or .npy file."""
    import numpy as np

    from ..errors import InputError, OptionError

    p = Path(path)
    if not p.is_file():
        raise InputError(f"no such data file: {path}.")
    if p.suffix.lower() == ".npy":
        if label_column is not None:
            raise OptionError("--label-column needs a .csv file with a header row.")
        try:
            return np.load(p, allow_pickle=False), None, None
        except ValueError as exc:
            raise InputError(f"{path} is not a numeric .npy array ({exc}).") from None
    if p.suffix.lower() != ".csv":
        raise InputError(f"--data must be a .csv or .npy file; got {p.name}.")
    from ..zoo.tabular import csv_rows

    rows = [r for r in csv_rows(p) if r]
    if not rows:
        raise InputError(f"{path} is empty.")
    header = None
    try:
        [float(v) for v in rows[0]]
    except ValueError:
        header, rows = [h.strip() for h in rows[0]], rows[1:]
    labels = None
    if label_column is not None:
        if header is None or label_column not in header:
            raise OptionError(
                f"--label-column {label_column!r} is not a column of {p.name}"
                + (f" ({', '.join(header)})." if header else " (it has no header row).")
            )
        j = header.index(label_column)
        labels = np.array([r[j].strip() for r in rows])
        try:
            labels = labels.astype(np.float64)
        except ValueError:
            pass
        rows = [r[:j] + r[j + 1 :] for r in rows]
        header = header[:j] + header[j + 1 :]
    if not rows:
        raise InputError(f"{path} has a header row but no data rows.")
    widths = {len(r) for r in rows}
    if len(widths) > 1:
        raise InputError(f"{path}: rows have different numbers of columns ({sorted(widths)}).")
    try:
        x = np.array(
            [[float(v) if v.strip() else np.nan for v in r] for r in rows], dtype=np.float64
        )
    except ValueError as exc:
        raise InputError(f"{path}: every feature column must be numeric ({exc}).") from None
    return x, header, labels


def _parse_depths(text: str) -> list[int]:
    from ..errors import OptionError

    t = text.strip().lower()
    if t in ("", "none", "0"):
        return []
    out: list[int] = []
    try:
        for part in t.split(","):
            if "-" in part:
                a, b = part.split("-", 1)
                out.extend(range(int(a), int(b) + 1))
            else:
                out.append(int(part))
    except ValueError:
        raise OptionError(f"--depths expects depths like 1-8 or 2,4,6; got {text!r}.") from None
    if any(d < 1 for d in out) or not out:
        raise OptionError(f"--depths must be depths >= 1; got {text!r}.")
    return out
