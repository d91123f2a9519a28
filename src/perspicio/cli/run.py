"""`perspicio run` (explain and score a whole data set into a resumable store) and
`perspicio report` (an HTML report of a store, with SpRAy clusters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .common import (
    load_model,
    model_options,
    out_file_option,
    output_flag,
    parse_output,
    split_list,
)


def register(group: click.Group) -> None:
    group.add_command(run_cmd)
    group.add_command(report_cmd)


def _load(model_spec: str, device: str, random_init: bool) -> Any:
    if model_spec in ("digits", "digits_cnn"):
        from ..zoo.digits import load_digits_cnn

        return load_digits_cnn(device=device)
    return load_model(model_spec, device, random_init)


def _target(value: str) -> str | int:
    v = value.strip().lower()
    if v in ("predicted", "label"):
        return v
    if v.isdigit():
        return int(v)
    from ..errors import OptionError

    raise OptionError(f"--target must be 'predicted', 'label' or a class index; got {value!r}.")


@click.command("run")
@click.argument("data")
@model_options
@click.option("--methods", "--method", "methods", multiple=True, help="Methods (repeat or comma-separate). Default: gradcam.")
@click.option("--metrics", "--metric", "metrics", multiple=True, help="Metrics per sample (optional; names, a family or 'default').")
@click.option("--store", "store", required=True, type=click.Path(file_okay=False), help="Store directory or fsspec URL, e.g. s3://bucket/run (created; resumed when it holds the same run).")
@click.option("--target", "-t", default="predicted", show_default=True, help="predicted, label, or a class index.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="local: this process; ray: Ray actors.")
@click.option("--address", default=None, help="Ray cluster address ('auto' joins a running cluster; default: start a local one).")
@click.option("--workers", type=int, default=None, help="Ray workers (default: the cluster's CPUs).")
@click.option("--chunk-size", type=int, default=64, show_default=True, help="Samples per chunk: the unit of commit, resume and retry.")
@click.option("--batch-size", type=int, default=None, help="Batch size inside methods and metrics (default: from the memory budget).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the randomized methods and metrics.")
@output_flag
@click.option("--method-option", "method_opts", multiple=True, help="method.key=value (repeatable).")
@click.option("--metric-option", "metric_opts", multiple=True, help="metric.key=value (repeatable).")
@click.option("--maps", type=click.Choice(["input", "layer"]), default="input", show_default=True, help="Store maps at the input's resolution, or a layer method's map at its layer's (much smaller).")
@click.option("--overwrite", is_flag=True, help="Replace a store that holds a different run (model, data or options changed).")
@click.option("--quiet", "-q", is_flag=True, help="No progress output.")
def run_cmd(data: str, model_spec: str, device: str, random_init: bool, methods: tuple[str, ...],
            metrics: tuple[str, ...], store: str, target: str, engine: str, address: str | None,
            workers: int | None, chunk_size: int, batch_size: int | None, seed: int, output: str | None,
            method_opts: tuple[str, ...], metric_opts: tuple[str, ...], maps: str, overwrite: bool, quiet: bool) -> None:
    """Explain (and score) every sample of DATA into --store; re-running resumes.

    DATA: a folder of images (class sub-folders give the labels), or a CSV/Parquet table of image
    paths and labels (columns path, label) or of tabular features.
    """
    from ..errors import OptionError
    from ..run import run
    from .evaluate import _scoped_options

    if engine != "ray" and (address is not None or workers is not None):
        raise OptionError("--address and --workers apply to --engine ray only.")
    goal = _target(target)
    model = _load(model_spec, device, random_init)
    fresh = "://" not in store and not Path(store).exists()
    try:
        result = run(
            model, data, methods=split_list(methods) or ["gradcam"], metrics=split_list(metrics) or None,
            store=store, target=goal, engine=engine, address=address, workers=workers,
            chunk_size=chunk_size, seed=seed, batch_size=batch_size, output=parse_output(output),
            method_options=_scoped_options(method_opts, "--method-option"),
            metric_options=_scoped_options(metric_opts, "--metric-option"),
            maps=maps, overwrite=overwrite, progress=not quiet,
        )
    except BaseException:
        if fresh:
            _remove_unused_store(Path(store))
        raise
    click.echo(str(result.summary))


def _remove_unused_store(path: Path) -> None:
    """A store this command created that holds no committed chunk (the run failed before its first
    one, e.g. on a bad option) is removed, so a failed command leaves nothing behind; a store with
    committed chunks is kept, since re-running resumes it."""
    import shutil

    if path.is_dir() and not any(p.is_file() for p in (path / "rows").rglob("*")):
        shutil.rmtree(path, ignore_errors=True)


@click.command("report")
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--out", "-o", default=None, type=click.Path(dir_okay=False), callback=out_file_option,
              help="HTML file (default: STORE/report.html; checked before any work).")
@click.option("--clusters/--no-clusters", default=True, show_default=True, help="SpRAy clusters per class.")
@click.option("--max-classes", type=int, default=10, show_default=True, help="Classes shown (most frequent first).")
def report_cmd(store: str, out: str | None, clusters: bool, max_classes: int) -> None:
    """Write an HTML report of a run store: maps per class, metric distributions, disagreements,
    mistakes, border reliance and SpRAy clusters."""
    from ..run.report import write_report

    path = write_report(store, out, spray=clusters, max_classes=max_classes)
    click.echo(f"wrote {path}")
