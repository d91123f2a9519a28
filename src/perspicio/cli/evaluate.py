"""`perspicio compare` (score methods, HTML + JSON report), `perspicio metrics`, `perspicio benchmark pointing-game`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from .common import (
    load_model,
    model_options,
    out_dir_flag,
    out_file_option,
    output_flag,
    parse_output,
    parse_target,
    split_list,
    target_flag,
)

DEFAULT_IMAGES = ("chelsea",)


def register(group: click.Group) -> None:
    group.add_command(compare_cmd)
    group.add_command(metrics_cmd)
    group.add_command(benchmark_group)


def _probability_below_one(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if not 0.0 <= value < 1.0:  # also refuses nan
        raise click.BadParameter(f"must be a probability in [0, 1); got {value}.")
    return value


def _check_method_options(options: dict[str, dict[str, Any]]) -> None:
    """Every --method-option names a method and one of its options (the error the method's
    constructor would raise, but before any work)."""
    from ..core.registry import METHODS
    from ..methods.base import check_option_names

    for name, opts in options.items():
        check_option_names(METHODS.get(name).cls, opts)  # UnknownNameError for an unknown method


def _scoped_options(pairs: tuple[str, ...], flag: str) -> dict[str, dict[str, Any]]:
    """'name.key=value' pairs -> {name: {key: value}} (values parsed as Python literals where possible)."""
    import ast

    from ..errors import OptionError

    out: dict[str, dict[str, Any]] = {}
    for p in pairs:
        if "=" not in p or "." not in p.split("=", 1)[0]:
            raise OptionError(f"{flag} expects name.key=value (e.g. deletion.steps=50); got {p!r}.")
        lhs, v = p.split("=", 1)
        name, key = lhs.split(".", 1)
        try:
            value = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            value = v
        out.setdefault(name.strip().lower().replace("-", "_"), {})[key.strip()] = value
    return out


@click.command("compare")
@click.argument("images", nargs=-1)
@model_options
@click.option(
    "--methods",
    "--method",
    "methods",
    multiple=True,
    help="Methods: names (repeat or comma-separate), a family as family:NAME, or 'all'. Default: the CAM family.",
)
@click.option(
    "--metrics",
    "--metric",
    "metrics",
    multiple=True,
    help="Metrics: names, a family, 'default' or 'all'. Default: default.",
)
@target_flag
@click.option(
    "--out",
    "-o",
    "out",
    default="perspicio-compare.html",
    show_default=True,
    type=click.Path(dir_okay=False),
    callback=out_file_option,
    help="HTML report; the JSON goes next to it (its directory is checked before any work).",
)
@output_flag
@click.option(
    "--metric-option",
    "metric_opts",
    multiple=True,
    help="Metric option as metric.key=value, e.g. deletion.steps=50 (repeatable).",
)
@click.option(
    "--method-option",
    "method_opts",
    multiple=True,
    help="Method option as method.key=value, e.g. gradcam.relu=False (repeatable).",
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Chunk size for methods and metrics (default: from the memory budget).",
)
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed of the randomized metrics."
)
@click.option("--progress/--no-progress", default=True, help="Progress bar.")
def compare_cmd(
    images: tuple[str, ...],
    model_spec: str,
    device: str,
    random_init: bool,
    methods: tuple[str, ...],
    metrics: tuple[str, ...],
    target: str | None,
    out: str,
    metric_opts: tuple[str, ...],
    method_opts: tuple[str, ...],
    batch_size: int | None,
    seed: int,
    progress: bool,
    output: str | None,
) -> None:
    """Explain IMAGES with several methods, score every explanation, rank the methods and
    write one self-contained HTML report (plus a JSON file with every number)."""
    import torch

    from ..metrics.evaluate import compare, format_table, resolve_methods, resolve_metrics
    from ..viz.report import write_report
    from ..zoo import load_image

    method_names = resolve_methods(split_list(methods))
    metric_names = resolve_metrics(split_list(metrics) or ["default"])
    method_options = _scoped_options(method_opts, "--method-option")
    _check_method_options(method_options)  # before the plan is printed and any work starts
    sources = list(images) or list(DEFAULT_IMAGES)
    pil_images = [load_image(s) for s in sources]  # validate files before any work
    zm = load_model(model_spec, device, random_init)
    x = torch.cat([zm.preprocess(p) for p in pil_images]).to(device)
    comp = compare(
        zm,
        x,
        methods=method_names,
        metrics=metric_names,
        target=parse_target(target),
        method_options=method_options,
        metric_options=_scoped_options(metric_opts, "--metric-option"),
        seed=seed,
        batch_size=batch_size,
        progress=progress,
        output=parse_output(output),
    )
    from .explain import model_display

    display = [
        model_display(zm, x[i : i + 1], p) for i, p in enumerate(pil_images)
    ]  # the model's view, not squashed
    html_path, json_path = write_report(
        comp,
        Path(out),
        display,
        sources=sources,
        title=f"perspicio compare: {getattr(zm, 'name', model_spec)}",
    )
    click.echo(format_table(comp))
    for m, msg in comp.errors.items():
        click.echo(f"  {m}: skipped ({msg})")
    click.echo(f"wrote {html_path} and {json_path}")


@click.command("metrics")
@click.option("--family", default=None, help="Only this family (faithfulness, robustness, ...).")
@click.option("--markdown", is_flag=True, help="Print a Markdown table.")
def metrics_cmd(family: str | None, markdown: bool) -> None:
    """List the registered evaluation metrics."""
    from ..core.registry import METRICS
    from ..metrics import metrics_table
    from .common import check_family

    family = check_family(family, {e.family for e in METRICS.entries()}, "metric")
    click.echo(metrics_table(family=family, markdown=markdown))


@click.group("benchmark")
def benchmark_group() -> None:
    """Bundled benchmarks of explanation methods."""


@benchmark_group.command("pointing-game")
@click.option(
    "--methods",
    "--method",
    "methods",
    multiple=True,
    help="Methods (names, a family or 'all'). Default: the CAM family.",
)
@click.option(
    "--model",
    "-m",
    "model_spec",
    default="efficientnet_lite0",
    show_default=True,
    help="Bundled model.",
)
@out_dir_flag(None, "Directory for pointing_game.json.")
@click.option(
    "--size", default=448, show_default=True, help="Grid side in pixels (each cell is half of it)."
)
@click.option(
    "--orders",
    default="all",
    show_default=True,
    help="Cell orders to use: 'all' 24, 'latin' (4 orders, every photo once in every cell) or "
    "comma-separated indices 0..23 of the lexicographic permutations.",
)
@click.option(
    "--max-grids",
    type=int,
    default=None,
    help="Use only the first N of the chosen cell orders (quick run).",
)
@click.option(
    "--threshold",
    default=0.4,
    show_default=True,
    type=float,
    callback=_probability_below_one,
    help="Minimum top-1 probability for a photo to be used.",
)
@click.option("--batch-size", type=int, default=None, help="Explanations per chunk.")
@click.option("--progress/--no-progress", default=True)
def pointing_game_cmd(
    methods: tuple[str, ...],
    model_spec: str,
    out_dir: str | None,
    size: int,
    orders: str,
    max_grids: int | None,
    threshold: float,
    batch_size: int | None,
    progress: bool,
) -> None:
    """2x2 grids of bundled photos the model classifies confidently, in all 24 cell orders:
    the share of positive attribution inside the cell of each explained class (chance 0.25)."""
    from ..errors import OptionError
    from ..metrics.pointing_benchmark import PointingGameResult, pointing_game_benchmark

    order_spec: str | list[int] = orders.strip().lower()
    if order_spec not in ("all", "latin"):
        try:
            order_spec = [int(v) for v in split_list(orders)]
        except ValueError:
            raise OptionError(
                f"--orders must be 'all', 'latin' or comma-separated integers 0..23; got {orders!r}."
            ) from None
    path = Path(out_dir) / "pointing_game.json" if out_dir is not None else None

    def save(
        res: PointingGameResult,
    ) -> None:  # after every method, so a long run keeps what it measured
        if path is not None:
            res.save_json(path)

    zm = load_model(model_spec, "cpu", False)
    res = pointing_game_benchmark(
        zm,
        split_list(methods) or None,
        size=size,
        threshold=threshold,
        orders=order_spec,
        max_grids=max_grids,
        batch_size=batch_size,
        progress=progress,
        on_method=save,
    )
    click.echo(
        f"grid pointing game: {res.grids} grids of {res.size}x{res.size} (orders {res.orders})"
    )
    click.echo(res.describe_photos())
    click.echo(res.table())
    if path is not None:
        res.save_json(path)
        click.echo(f"wrote {path}")
