"""`perspicio explain`, `methods`, `models`, `layers`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import click

from .common import (
    load_model,
    model_options,
    out_dir_flag,
    output_flag,
    output_names,
    parse_extra,
    parse_output,
    parse_target,
    split_list,
    target_flag,
)

DEFAULT_IMAGES = ("chelsea",)
#: methods of ``perspicio explain`` without --method: one of each family that differ (a CAM,
#: the gradient-free Score-CAM, a path integral, a propagation rule, perturbation, Shapley)
DEMO_METHODS = ("gradcam", "scorecam", "integrated_gradients", "lrp", "occlusion", "kernel_shap")
#: cosine similarity above which two maps of one input are reported as the same map
SAME_MAP_COSINE = 0.9999

#: CLI options forwarded to methods that accept them (same names as the Python keywords)


def register(group: click.Group) -> None:
    group.add_command(explain_cmd)
    group.add_command(methods_cmd)
    group.add_command(models_cmd)
    group.add_command(layers_cmd)


@click.command("explain")
@click.argument("images", nargs=-1)
@model_options
@click.option(
    "--method",
    "--methods",
    "methods",
    multiple=True,
    help="Method name(s); repeat or comma-separate; 'all', or a family as family:NAME (e.g. family:cam). Default: one method of each of six families (gradcam, scorecam, integrated_gradients, lrp, occlusion, kernel_shap).",
)
@target_flag
@click.option(
    "--layer",
    "-l",
    default=None,
    help="Layer for layer methods: a dotted name or the Python form (layer4[-1]); CAMs fuse several given as a,b (default: auto).",
)
@out_dir_flag()
@output_flag
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Chunk size for many-pass methods (default: from the memory budget).",
)
@click.option("--relu/--no-relu", default=None, help="Clip negative CAM values (default: on).")
@click.option("--steps", type=int, default=None, help="Path methods: number of steps.")
@click.option(
    "--baseline",
    default=None,
    help="Baseline (zero, black, mean, blur[:SIGMA], uniform, a number).",
)
@click.option("--samples", type=int, default=None, help="Sampling methods: number of samples.")
@click.option(
    "--noise",
    type=float,
    default=None,
    help="Noise methods: noise level relative to the input range.",
)
@click.option("--seed", type=int, default=None, help="Seed for randomised methods.")
@click.option(
    "--compile",
    "compile_",
    is_flag=True,
    default=False,
    help="Run output-only passes (perturbations, Shapley, LIME, Score-CAM masks) through torch.compile: ~1.15x faster on the bundled model, 10-60 s compile per model and shape; for many images.",
)
@click.option(
    "--option", "extra", multiple=True, help="Any other method option as key=value (repeatable)."
)
@click.option(
    "--format", "fmt", type=click.Choice(["npy", "safetensors"]), default="npy", show_default=True
)
@click.option("--progress/--no-progress", default=True, help="Progress bar for slow methods.")
@click.option(
    "--bare",
    is_flag=True,
    default=False,
    help="Write each method's PNG as the bare overlay (no title, no colorbar).",
)
def explain_cmd(
    images: tuple[str, ...],
    model_spec: str,
    device: str,
    random_init: bool,
    methods: tuple[str, ...],
    target: str | None,
    layer: str | None,
    out_dir: str,
    batch_size: int | None,
    relu: bool | None,
    steps: int | None,
    baseline: str | None,
    samples: int | None,
    noise: float | None,
    seed: int | None,
    extra: tuple[str, ...],
    fmt: str,
    progress: bool,
    compile_: bool,
    output: str | None,
    bare: bool = False,
) -> None:
    """Explain the model's prediction on IMAGES (files or sample names; default: chelsea).

    Prints the top-5 classes and writes, per image and method, OUT/<image>_<method>.png
    (overlay with title and colorbar; --bare: the overlay alone), .npy (raw attributions) and
    .json, plus OUT/<image>_comparison.png. Figures show the model's input at the photo's aspect
    ratio. <image> is the file's stem; inputs sharing a stem (a/x.png b/x.png, x.png x.jpg) get
    x, x-2, x-3, ...
    """
    import torch

    from .. import explain as run_explain
    from ..core.explanation import classify_output
    from ..core.outputs import OutputSelector
    from ..core.registry import METHODS
    from ..errors import OptionError
    from ..viz import comparison_figure
    from ..zoo import load_image
    from .text import TEXT_DEFAULT_METHODS, is_text_model
    from .text import run as run_text

    if is_text_model(model_spec):  # IMAGES are sentences for a text model
        opts = {"steps": steps, "batch_size": batch_size, "seed": seed, **parse_extra(extra)}
        run_text(
            list(images),
            model_spec,
            device,
            random_init,
            METHODS.select(split_list(methods), default=list(TEXT_DEFAULT_METHODS)),
            target,
            out_dir,
            {k: v for k, v in opts.items() if v is not None},
        )
        return
    chosen = METHODS.select(split_list(methods), default=list(DEMO_METHODS))
    sources = list(images) or list(DEFAULT_IMAGES)
    pil_images = [load_image(s) for s in sources]  # validate every file before any work
    zm = load_model(model_spec, device, random_init)
    given = {
        "layer": layer,
        "relu": relu,
        "batch_size": batch_size,
        "steps": steps,
        "baseline": baseline,
        "samples": samples,
        "noise": noise,
        "seed": seed,
        "compile": compile_ or None,
        "output": parse_output(output),
    }
    given = {k: v for k, v in given.items() if v is not None}
    given.update(parse_extra(extra))
    for key in given:
        if not any(key in METHODS.get(m).cls.option_names() for m in chosen):
            raise OptionError(
                f"none of the chosen methods ({', '.join(chosen)}) takes --{key.replace('_', '-')}."
            )
    tgt = parse_target(target)
    select = OutputSelector(given.get("output"))
    results: list[tuple[str, Any, list[Any], Any]] = []
    for source, pil in zip(sources, pil_images):
        x = zm.preprocess(pil).to(device)
        with torch.no_grad():
            logits = select(zm.model(x), len(x))
        unit, prob_rows = classify_output(logits)
        probs = prob_rows[0] if prob_rows is not None else None
        if probs is not None:  # a classifier: its top-5
            top = probs.topk(min(5, logits.shape[1]))
            if unit == "probability":
                click.echo(f"{source}: top-{len(top.indices)} of {zm.name} (probability)")
            else:
                click.echo(f"{source}: top-{len(top.indices)} of {zm.name} (probability, logit)")
            for p, i in zip(top.values.tolist(), top.indices.tolist()):
                click.echo(
                    f"  {i:>5}  {zm.labels[i]:<32} {p:.4f}"
                    + ("" if unit == "probability" else f"  {float(logits[0, i]):8.3f}")
                )
        else:
            click.echo(f"{source}: {zm.name} output {tuple(logits.shape)}")
        exps = []
        for m in chosen:
            cls = METHODS.get(m).cls
            opts = {k: v for k, v in given.items() if k in cls.option_names()}
            if "progress" in cls.option_names():
                opts["progress"] = progress
            t0 = time.perf_counter()
            e = run_explain(zm, x, method=m, target=tgt, **opts)
            if (
                unit != "output"
                and getattr(cls, "targets_are_classes", True)
                and e.targets is not None
                and len(e) == 1
            ):
                e = e.with_score_unit(
                    unit, [float(probs[int(e.targets[0])])] if probs is not None else None
                )
            click.echo(
                f"  {m:<22} {describe_target(e, probs)}  "
                f"{time.perf_counter() - t0:6.2f} s"
                + (
                    f"  layer {e.layer if isinstance(e.layer, str) else ','.join(e.layer)}"
                    if e.layer
                    else ""
                )
            )
            exps.append(e)
        for a, b in coinciding(exps):
            click.echo(
                f"  note: {a} and {b} give the same map on this model (cosine > {SAME_MAP_COSINE}); "
                "e.g. Grad-CAM = CAM x 1/HW when global average pooling feeds a linear head."
            )
        results.append((source, pil, exps, x))
    # write everything only after every explanation succeeded
    out = Path(out_dir)
    names = output_names([source for source, _, _, _ in results])
    written: list[Path] = []
    comparisons: list[Path] = []
    for name, (source, pil, exps, x) in zip(names, results):
        display = model_display(zm, x, pil)
        for e in exps:
            written += e.save(out / f"{name}_{e.method}", image=display, format=fmt, bare=bare)
        fig = comparison_figure(exps, image=display, title=source)
        path = out / f"{name}_comparison.png"
        fig.savefig(path, dpi=100)
        comparisons.append(path)
    summary = out / "summary.json"
    summary.write_text(
        json.dumps(
            {name: [e.summary() for e in exps] for name, (_, _, exps, _) in zip(names, results)},
            indent=2,
        )
    )
    files = {p.resolve() for p in [*written, *comparisons, summary] if p.is_file()}
    renamed = [
        f"{src} -> {name}_*"
        for name, (src, _, _, _) in zip(names, results)
        if Path(src).stem != name and Path(src).suffix
    ]
    click.echo(
        f"wrote {len(files)} files to {out}/ (comparison: {comparisons[-1].name})"
        + (f"; inputs sharing a name: {', '.join(renamed)}" if renamed else "")
    )


def model_display(zm: Any, x: Any, pil: Any) -> Any:
    """What the model saw, for the figures: the preprocessed input ``x`` de-normalised with the
    model's preprocessing and stretched back to the photo's aspect ratio (the bundled
    preprocessing resizes the whole photo to the model's square, no crop): an (h, w, 3) float array."""
    from ..viz.plots import model_view

    pre = getattr(zm, "preprocess", None)
    return model_view(
        x[0],
        (pil.height, pil.width),
        mean=getattr(pre, "mean", None),
        std=getattr(pre, "std", None),
    )


def describe_target(e: Any, probs: Any) -> str:
    """'target tabby cat (logit 11.2, probability 0.80)', or the channel a neuron method explained."""
    from ..core.registry import METHODS

    targets = e.targets.tolist() if e.targets is not None else None
    if not getattr(METHODS.get(e.method).cls, "targets_are_classes", True):
        neuron = dict(e.provenance.get("neuron") or {}).get("neuron")
        channel = neuron if neuron is not None else (targets[0] if targets else "?")
        return f"channel {channel} of layer {e.layer}"
    name = e.target_names[0] if e.target_names else (targets[0] if targets else "callable")
    parts = [f"{e.score_unit} {float(e.scores[0]):.4g}"] if e.scores is not None else []
    if probs is not None and targets and e.score_unit != "probability":
        parts.append(f"probability {float(probs[targets[0]]):.3f}")
    return f"target {name}" + (f" ({', '.join(parts)})" if parts else "")


def coinciding(exps: list[Any]) -> list[tuple[str, str]]:
    """Pairs of methods whose first maps are equal up to a positive factor (same shape)."""
    maps = [(e.method, e.attributions[0].detach().double().flatten()) for e in exps]
    out = []
    for i, (a, u) in enumerate(maps):
        for b, v in maps[i + 1 :]:
            if u.shape == v.shape and float(u.norm()) > 0 and float(v.norm()) > 0:
                if float(u @ v / (u.norm() * v.norm())) > SAME_MAP_COSINE:
                    out.append((a, b))
    return out


@click.command("methods")
@click.option("--family", default=None, help="Only this family (e.g. cam).")
@click.option("--markdown", is_flag=True, help="Print a Markdown table (as in the README).")
def methods_cmd(family: str | None, markdown: bool) -> None:
    """List the registered explanation methods."""
    from ..core.registry import METHODS
    from ..methods import methods_table
    from .common import check_family

    family = check_family(family, {e.family for e in METHODS.entries()}, "method")
    click.echo(methods_table(family=family, markdown=markdown))


@click.command("models")
def models_cmd() -> None:
    """List bundled models and the other model sources."""
    from ..zoo import models

    for name, desc in models().items():
        click.echo(f"{name:<22} {desc}")
    click.echo(
        "\nAlso: torchvision:NAME, timm:NAME (cached weights, or --random-init), "
        "a TorchScript file, package.module:factory."
    )


@click.command("layers")
@click.argument("model_spec", default="efficientnet_lite0")
@click.option(
    "--size",
    default=224,
    show_default=True,
    type=click.IntRange(1, 4096),
    help="Input side used to trace shapes.",
)
@click.option("--all", "show_all", is_flag=True, help="Also list layers without a spatial output.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--random-init", is_flag=True)
def layers_cmd(model_spec: str, size: int, show_all: bool, device: str, random_init: bool) -> None:
    """List MODEL's layers with output shapes; '*' marks CAM candidates (spatial outputs)."""
    import torch

    from ..core.capture import auto_layer, is_spatial, trace_layers

    zm = load_model(model_spec, device, random_init)
    x = torch.zeros(1, 3, size, size, device=device)
    try:
        infos = trace_layers(zm.model, x)
    except RuntimeError as exc:  # e.g. a kernel larger than the input: torch's message, one line
        from ..errors import InputError

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(
            f"the model cannot run on a {size}x{size} input (--size): {first}"
        ) from exc
    default = auto_layer(zm.model, x)
    for info in infos:
        spatial = is_spatial(info.shape)
        if not (spatial or show_all):
            continue
        mark = ">" if info.name == default else ("*" if spatial else " ")
        calls = f"  (called {info.calls}x)" if info.calls > 1 else ""
        click.echo(f"{mark} {info.name:<40} {info.kind:<20} {str(info.shape):<22}{calls}")
    click.echo(f"\n'>' marks the default CAM layer: {default}")
