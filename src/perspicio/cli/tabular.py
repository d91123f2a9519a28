"""`perspicio explain-tabular`: explain rows of a bundled tabular demo and write SHAP-style plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from .common import out_dir_option, parse_extra, parse_target, split_list


def register(group: click.Group) -> None:
    group.add_command(explain_tabular_cmd)


def _tabular_methods() -> list[str]:
    from ..core.registry import METHODS

    return [e.name for e in METHODS.entries() if e.model_agnostic and not e.needs_gradients and e.name != "rise"]


@click.command("explain-tabular")
@click.option("--data", "dataset", default="breast_cancer", show_default=True,
              help="Bundled data set: breast_cancer (classification) or diabetes (regression).")
@click.option("--model", "-m", "kind", default="mlp", show_default=True, help="mlp (torch) or gbm (scikit-learn).")
@click.option("--method", default="kernel_shap", show_default=True,
              help="A model-agnostic method: kernel_shap, shapley_sampling, shapley_exact, lime, feature_ablation, occlusion.")
@click.option("--rows", default="0,1,2,3,4", show_default=True, help="Test-set rows to explain (comma-separated, or a:b).")
@click.option("--target", "-t", default=None, help="Class index or name (default: the predicted class).")
@click.option("--budget", type=int, default=None, help="Model evaluations per row (method default if omitted).")
@click.option("--background-size", type=int, default=100, show_default=True, help="Training rows used as background.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--max-display", type=int, default=12, show_default=True, help="Features shown in the plots.")
@click.option("--option", "extra", multiple=True, help="Any other method option as key=value (repeatable).")
@click.option("--out", "-o", "out_dir", default="perspicio-out", show_default=True, type=click.Path(file_okay=False),
              callback=out_dir_option)
def explain_tabular_cmd(dataset: str, kind: str, method: str, rows: str, target: str | None, budget: int | None,
                        background_size: int, seed: int, max_display: int, extra: tuple[str, ...],
                        out_dir: str) -> None:
    """Explain test rows of a bundled tabular model (trained on first use and cached).

    Prints each row's prediction and strongest features and writes OUT/row<i>_waterfall.png,
    OUT/beeswarm.png, OUT/bar.png and OUT/summary.json.
    """
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import explain
    from ..core.registry import METHODS
    from ..errors import OptionError
    from ..viz import shap_plots
    from ..zoo.tabular import load_tabular

    allowed = _tabular_methods()  # imports the methods, so the registry is filled
    name = METHODS.get(method).name
    if name not in allowed:
        raise OptionError(f"--method {name} does not work on tabular black boxes; choose one of: {', '.join(allowed)}.")
    demo = load_tabular(dataset, kind, seed=seed)
    idx = _parse_rows(rows, len(demo.X_test))
    x = demo.X_test[idx]
    cls = METHODS.get(name).cls
    defaults: dict[str, Any] = {"seed": seed, "background": demo.background(background_size, seed=seed),
                                "feature_names": list(demo.feature_names)}
    if budget is not None:
        defaults["budget"] = budget
    opts = {k: v for k, v in defaults.items() if k in cls.option_names()}
    opts.update(parse_extra(extra))  # unknown keys fail with the method's list of options
    e = explain(demo, x, method=name, target=parse_target(target), **opts)
    values, names, _ = shap_plots.feature_table(e, demo.feature_names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_rows = []
    click.echo(f"{demo.name}: {name} on {len(idx)} test rows ({e.provenance.get('evaluations', '?')} evaluations, "
               f"{e.provenance.get('seconds', 0):.2f} s)")
    for k, r in enumerate(idx):
        v = values[k]
        top = np.argsort(-np.abs(v))[:3]
        label = e.target_names[k] if e.target_names else str(int(e.targets[k])) if e.targets is not None else ""
        base = float(e.base_value[k]) if e.base_value is not None else None
        click.echo(f"  row {r}: {label} score {float(e.scores[k]):.4g}"
                   + (f" (base {base:.4g})" if base is not None else "") + "  top: "
                   + ", ".join(f"{names[j]} {v[j]:+.3g}" for j in top))
        fig = shap_plots.waterfall(e, k, max_display=max_display, feature_names=names)
        fig.savefig(out / f"row{r}_waterfall.png", dpi=100)
        plt.close(fig)
        summary_rows.append({"row": r, "target": label, "prediction": float(e.scores[k]), "base_value": base,
                             "values": {n: float(val) for n, val in zip(names, v)}})
    for plot, fname in ((shap_plots.beeswarm, "beeswarm.png"), (shap_plots.bar, "bar.png")):
        fig = plot(e, max_display=max_display, feature_names=names)
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)
    (out / "summary.json").write_text(json.dumps(
        {"dataset": dataset, "model": kind, "method": name, "summary": e.summary(), "rows": summary_rows}, indent=2))
    click.echo(f"wrote {len(idx) + 3} files to {out}/")


def _parse_rows(rows: str, n: int) -> list[int]:
    from ..errors import OptionError

    out: list[int] = []
    for part in split_list(rows):
        try:
            if ":" in part:
                a, b = part.split(":", 1)
                out.extend(range(int(a or 0), int(b or n)))
            else:
                out.append(int(part))
        except ValueError:
            raise OptionError(f"--rows expects integers or ranges like 0,3,5:8; got {part!r}.") from None
    bad = [r for r in out if not 0 <= r < n]
    if bad or not out:
        raise OptionError(f"--rows must be test-set rows in 0..{n - 1}; got {rows!r}.")
    return out

