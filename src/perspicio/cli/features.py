"""`perspicio features ...`: feature visualisation and representation analysis.

Each subcommand writes its figure(s) and a JSON file of its numbers into ``--out``.
``--model digits`` selects the bundled 8 x 8 digits CNN (trained and cached on first use);
images for it may be given as ``digit:N`` (test-set item N).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ..core.jsonable import to_jsonable
from .common import load_model, out_dir_option, parse_target, split_list, target_flag

DIGITS = ("digits", "digits_cnn")


def register(group: click.Group) -> None:
    group.add_command(features)


@click.group("features")
def features() -> None:
    """Feature visualisation: kernels, maps, top patches, maximisation, inversion, projections,
    transform sensitivity and adversarial examples."""


# ----------------------------------------------------------------------------- helpers


def _common(f: Any) -> Any:
    f = click.option("--out", "-o", "out_dir", default="perspicio-features", show_default=True,
                     type=click.Path(file_okay=False), callback=out_dir_option, help="Output directory.")(f)
    f = click.option("--seed", type=int, default=0, show_default=True, help="Seed of the local random generator.")(f)
    f = click.option("--random-init", is_flag=True, help="Random weights instead of pretrained ones.")(f)
    f = click.option("--device", default="cpu", show_default=True, help="torch device.")(f)
    f = click.option("--model", "-m", "model_spec", default="efficientnet_lite0", show_default=True,
                     help="Bundled name ('efficientnet_lite0', 'digits'), torchvision:NAME, timm:NAME, file, module:factory.")(f)
    return f


def _model(spec: str, device: str, random_init: bool) -> Any:
    if spec.strip().lower() in DIGITS:
        from ..zoo.digits import load_digits_cnn

        return load_digits_cnn(device=device)
    return load_model(spec, device, random_init)


def _is_digits(zm: Any) -> bool:
    return getattr(zm, "name", "") == "digits_cnn"


def _image(zm: Any, source: str | None) -> tuple[Any, str]:
    from ..errors import InputError

    if _is_digits(zm):
        source = source or "digit:0"
        if not source.startswith("digit:"):
            return zm.preprocess(source), Path(source).stem
        from ..zoo.digits import digits_data

        x, _ = digits_data("test")
        try:
            i = int(source.split(":", 1)[1])
            return x[i:i + 1], f"digit{i}"
        except (ValueError, IndexError):
            raise InputError(f"digit:N needs 0 <= N < {len(x)}; got {source!r}.") from None
    from ..zoo import load_image

    source = source or "chelsea"
    return zm.preprocess(load_image(source)), Path(source).stem if Path(source).suffix else source


def _dataset(zm: Any, data: str | None) -> tuple[Any, Any, str]:
    """(data, labels or item names, description): a folder, the digits test set (with labels),
    or crops of the sample photos (with names)."""
    if data:
        return data, None, data
    if _is_digits(zm):
        from ..zoo.digits import digits_data

        x, y = digits_data("test")
        return x, y, "digits test set"
    from ..featurevis._data import photo_crops

    x, names = photo_crops(zm.preprocess)
    return x, names, f"{len(names)} crops of the sample photos"


def free_stem(out: Path, stem: str) -> str:
    """``stem``, or ``stem-2``, ``stem-3``, ... : the first whose .png and .json are not in ``out``."""
    k, name = 1, stem
    while (out / f"{name}.png").exists() or (out / f"{name}.json").exists():
        k += 1
        name = f"{stem}-{k}"
    return name


def _write(out: Path, name: str, fig: Any, numbers: dict[str, Any]) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{name}.png"
    fig.savefig(png, dpi=110)
    js = out / f"{name}.json"
    js.write_text(json.dumps(to_jsonable(numbers), indent=2, allow_nan=False))
    click.echo(f"wrote {png} and {js.name}")
    return [png, js]


def _unit(target: str | None) -> Any:
    from ..errors import OptionError

    if target is None:
        return 0
    parts = [p.strip() for p in target.replace(":", ",").split(",") if p.strip()]
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise OptionError(f"--target for a unit is a channel 'C' or a neuron 'C,ROW,COL'; got {target!r}.") from None
    if len(vals) not in (1, 3):
        raise OptionError(f"--target for a unit is a channel 'C' or a neuron 'C,ROW,COL'; got {target!r}.")
    return vals[0] if len(vals) == 1 else tuple(vals)


def _default_layer(zm: Any, x: Any, kind: str = "mid") -> str:
    """A sensible layer: digits 'act2'; otherwise the CAM layer ('last') or a middle block ('mid')."""
    if _is_digits(zm):
        return "act2"
    from ..core.capture import auto_layer, trace_layers

    if kind == "last":
        return auto_layer(zm.model, x)
    infos = [i for i in trace_layers(zm.model, x[:1]) if i.shape is not None and len(i.shape) == 4 and i.name.count(".") == 1]
    return infos[len(infos) // 2].name if infos else auto_layer(zm.model, x)


# ----------------------------------------------------------------------------- commands


@features.command("kernels")
@_common
@click.option("--layer", "-l", default=None, help="Conv layer (default: the first Conv2d).")
@click.option("--per-filter", is_flag=True, help="Scale each filter on its own (default: one scale per layer).")
def kernels_cmd(model_spec: str, device: str, random_init: bool, seed: int, out_dir: str, layer: str | None, per_filter: bool) -> None:
    """Show a convolution layer's filters (RGB tiles for the first layer)."""
    from ..featurevis import kernels
    from ..viz.featurevis_plots import kernels_figure

    zm = _model(model_spec, device, random_init)
    k = kernels(zm, layer, per_filter=per_filter)
    _write(Path(out_dir), "kernels", kernels_figure(k),
           {"layer": k.layer, "shape": list(k.weights.shape), "rgb": k.rgb, "filter_norms": k.norms})


@features.command("maps")
@click.argument("image", required=False)
@_common
@click.option("--layer", "-l", default=None, help="Layer (default: a middle block).")
@click.option("--channels", multiple=True, help="Channels to show (repeat or comma-separate); default: top-k by mean.")
@click.option("--top-k", default=16, show_default=True, help="Number of channels when --channels is not given.")
def maps_cmd(image: str | None, model_spec: str, device: str, random_init: bool, seed: int, out_dir: str,
             layer: str | None, channels: tuple[str, ...], top_k: int) -> None:
    """Feature maps of IMAGE (default: chelsea) at a layer, overlaid on the input."""
    from ..featurevis import feature_maps
    from ..viz.featurevis_plots import feature_maps_figure

    zm = _model(model_spec, device, random_init)
    x, stem = _image(zm, image)
    layer = layer or _default_layer(zm, x)
    try:
        chosen = [int(c) for c in split_list(channels)] or None
    except ValueError:
        from ..errors import OptionError

        raise OptionError(
            f"--channels expects channel indices (e.g. 0,5,7); got {', '.join(channels)!r}."
        ) from None
    fm = feature_maps(zm, x, layer, channels=chosen, top_k=top_k)
    _write(Path(out_dir), f"{stem}_maps", feature_maps_figure(fm),
           {"layer": fm.layer, "channels": fm.channels, "means": fm.means, "grid": list(fm.maps.shape[1:])})


@features.command("top")
@click.argument("data", required=False)
@_common
@click.option("--layer", "-l", default=None, help="Layer (default: a middle block).")
@click.option("--target", "-t", default=None, help="Unit: channel 'C' or neuron 'C,ROW,COL' (default 0).")
@click.option("--k", "k", default=8, show_default=True, help="Number of top items.")
@click.option("--reduce", type=click.Choice(["max", "mean"]), default="max", show_default=True)
@click.option("--batch-size", type=int, default=None, help="Chunk size (default: from the memory budget).")
@click.option("--progress/--no-progress", default=True)
def top_cmd(data: str | None, model_spec: str, device: str, random_init: bool, seed: int, out_dir: str,
            layer: str | None, target: str | None, k: int, reduce: str, batch_size: int | None, progress: bool) -> None:
    """Top-activating images and receptive-field patches of a unit over DATA (a folder;
    default: crops of the sample photos, or the digits test set)."""
    from ..featurevis import top_activating
    from ..viz.featurevis_plots import top_activating_figure

    zm = _model(model_spec, device, random_init)
    dataset, extra, desc = _dataset(zm, data)
    probe, _ = _image(zm, None)
    layer = layer or _default_layer(zm, probe)
    r = top_activating(zm, dataset, layer, _unit(target), k=k, reduce=reduce, batch_size=batch_size, progress=progress)
    if isinstance(extra, list):  # photo crops: show their names instead of indices
        import dataclasses

        r = dataclasses.replace(r, sources=[extra[int(i)] for i in r.indices])
    for path, why in r.skipped:
        click.echo(f"skipped {path}: {why}", err=True)
    _write(Path(out_dir), "top", top_activating_figure(r), {
        "layer": r.layer, "unit": r.unit.describe(), "data": desc, "scanned": r.scanned, "values": r.values,
        "sources": r.sources, "boxes": r.boxes, "positions": r.positions,
        "receptive_field": None if r.field is None else {"start": r.field.start, "jump": r.field.jump, "size": r.field.size},
        "skipped": r.skipped,
    })


@features.command("maximize")
@_common
@click.option("--target", "-t", default=None, help="Class index or name to maximise (default 285, or one image per digit).")
@click.option("--layer", "-l", default=None, help="Maximise a channel of this layer instead of a class.")
@click.option("--channel", type=int, default=None, help="Channel of --layer.")
@click.option("--steps", default=256, show_default=True)
@click.option("--size", default=None, type=click.IntRange(8, 2048), help="Image side (default: the model's input size).")
@click.option("--param", type=click.Choice(["fourier", "pixel"]), default="fourier", show_default=True)
@click.option("--lr", default=0.05, show_default=True)
@click.option("--tv", default=0.0, show_default=True, help="Total-variation weight.")
@click.option("--l2", default=0.0, show_default=True, help="L2 weight.")
@click.option("--jitter", default=None, type=int, help="Jitter in pixels (default: size/28).")
@click.option("--objective", type=click.Choice(["logit", "logprob"]), default=None,
              help="Class objective: the logit, or the log-probability (raises the class against the others). "
                   "Default: logit; logprob for the digits model.")
@click.option("--progress/--no-progress", default=True)
def maximize_cmd(model_spec: str, device: str, random_init: bool, seed: int, out_dir: str, target: str | None,
                 layer: str | None, channel: int | None, steps: int, size: int | None, param: str, lr: float,
                 tv: float, l2: float, jitter: int | None, objective: str | None, progress: bool) -> None:
    """Synthesise an input maximising a class (or --layer/--channel); writes the image and its probability."""
    from ..errors import OptionError
    from ..featurevis import Channel, ClassLogit, ClassLogProb, maximize
    from ..featurevis._common import unwrap
    from ..viz.featurevis_plots import maximize_figure

    zm = _model(model_spec, device, random_init)
    bundle = unwrap(zm)
    digits = _is_digits(zm)
    side = size or (bundle.space.size[0] if bundle.space.size else 224)
    shape = (1 if digits else 3, side, side)
    batch = 1
    if layer is not None:
        if channel is None:
            raise OptionError("--layer needs --channel (the channel to maximise).")
        goal: Any = Channel(layer, channel)
    else:
        if channel is not None:
            raise OptionError("--channel needs --layer.")
        t = parse_target(target)
        if t is None:
            t = list(range(10)) if digits else 285
        if isinstance(t, str):
            from ..core.targets import name_to_index

            t = name_to_index(t, bundle.labels)
        batch = len(t) if isinstance(t, list) else 1
        kind = objective or ("logprob" if digits else "logit")
        goal = ClassLogProb(t) if kind == "logprob" else ClassLogit(t)
    jit = jitter if jitter is not None else (1 if digits else max(1, side // 28))
    res = maximize(zm, goal, shape=shape, batch=batch, param=param if not digits or param != "fourier" else "pixel",
                   steps=steps, lr=lr, tv=tv, l2=l2, jitter=jit, seed=seed, progress=progress,
                   scales=() if digits else (0.9, 0.95, 1.0, 1.05, 1.1), angles=() if digits else (-10, -5, 0, 5, 10))
    numbers: dict[str, Any] = {"objective": res.description, "final_objective": res.objective, "options": res.options,
                               "history": res.history}
    if res.probabilities is not None and layer is None:
        cls = goal.cls if isinstance(goal.cls, list) else [goal.cls]
        cls = cls * len(res.pixels) if len(cls) == 1 else cls
        numbers["target"] = cls
        numbers["target_probability"] = [float(res.probabilities[i, c]) for i, c in enumerate(cls)]
        numbers["predicted"] = res.probabilities.argmax(1)
        click.echo("target probability: " + ", ".join(f"{p:.4f}" for p in numbers["target_probability"]))
    out = Path(out_dir)
    name = free_stem(out, "maximize")  # a second run writes maximize-2.*, not over the first
    _write(out, name, maximize_figure(res, bundle.labels), numbers)
    from PIL import Image

    for i, px in enumerate(res.pixels):
        arr = (px.permute(1, 2, 0).clamp(0, 1).cpu().numpy() * 255).round().astype("uint8")
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(out / f"{name}_{i}.png")


@features.command("invert")
@click.argument("image", required=False)
@_common
@click.option("--layer", "-l", default=None, help="Layer whose activations are matched (default: a middle block).")
@click.option("--steps", default=200, show_default=True)
@click.option("--lr", default=0.1, show_default=True)
@click.option("--tv", default=0.005, show_default=True, help="Total-variation weight.")
@click.option("--progress/--no-progress", default=True)
def invert_cmd(image: str | None, model_spec: str, device: str, random_init: bool, seed: int, out_dir: str,
               layer: str | None, steps: int, lr: float, tv: float, progress: bool) -> None:
    """Reconstruct IMAGE from a layer's activations under a total-variation prior."""
    from ..featurevis import invert
    from ..viz.featurevis_plots import inversion_figure

    zm = _model(model_spec, device, random_init)
    x, stem = _image(zm, image)
    layer = layer or _default_layer(zm, x)
    res = invert(zm, x, layer, steps=steps, lr=lr, tv=tv, seed=seed, progress=progress)
    click.echo(f"cosine similarity of the activations: {float(res.cosine[0]):.4f}")
    _write(Path(out_dir), f"{stem}_invert", inversion_figure(res), {
        "layer": res.layer, "cosine": res.cosine, "relative_error": res.relative_error, "options": res.options,
        "history": res.history})


@features.command("project")
@click.argument("data", required=False)
@_common
@click.option("--layer", "-l", default=None, help="Layer (default: the last spatial layer).")
@click.option("--method", type=click.Choice(["pca", "tsne", "umap"]), default="pca", show_default=True)
@click.option("--color-by", type=click.Choice(["label", "prediction"]), default="label", show_default=True)
@click.option("--thumbnails/--no-thumbnails", default=True)
@click.option("--batch-size", type=int, default=None)
@click.option("--progress/--no-progress", default=True)
def project_cmd(data: str | None, model_spec: str, device: str, random_init: bool, seed: int, out_dir: str,
                layer: str | None, method: str, color_by: str, thumbnails: bool, batch_size: int | None, progress: bool) -> None:
    """Project a layer's features over DATA (folder; default: digits test set or photo crops) to 2-D."""
    from ..featurevis import project
    from ..viz.featurevis_plots import projection_figure

    zm = _model(model_spec, device, random_init)
    dataset, labels, desc = _dataset(zm, data)
    labels = labels if not isinstance(labels, list) else None
    probe, _ = _image(zm, None)
    layer = layer or ("act3" if _is_digits(zm) else _default_layer(zm, probe, "last"))
    p = project(zm, dataset, layer, method=method, labels=labels, thumbnails=16 if _is_digits(zm) else 32 if thumbnails else 0,
                seed=seed, batch_size=batch_size, progress=progress)
    _write(Path(out_dir), f"projection_{method}",
           projection_figure(p, color_by=color_by, thumbnails=thumbnails, labels=getattr(zm, "labels", None)),
           {"layer": p.layer, "method": p.method, "data": desc, "coords": p.coords, "labels": p.labels,
            "predictions": p.predictions, "explained_variance": p.explained_variance, "sources": p.sources})


@features.command("sensitivity")
@click.argument("image", required=False)
@_common
@target_flag
@click.option("--window", type=int, default=None, help="Occluder side in pixels (default: 1/7 of the image).")
@click.option("--stride", type=int, default=None, help="Occluder stride (default: 1/14 of the image).")
@click.option("--batch-size", type=int, default=None)
@click.option("--progress/--no-progress", default=True)
def sensitivity_cmd(image: str | None, model_spec: str, device: str, random_init: bool, seed: int, out_dir: str,
                    target: str | None, window: int | None, stride: int | None, batch_size: int | None, progress: bool) -> None:
    """Target score of IMAGE vs occluder position, scale, translation and rotation."""
    from ..featurevis import sensitivity
    from ..viz.featurevis_plots import sensitivity_figure

    zm = _model(model_spec, device, random_init)
    x, stem = _image(zm, image)
    s = sensitivity(zm, x, parse_target(target), window=window, stride=stride, batch_size=batch_size, progress=progress)
    curves = {k: {"values": c.values, "scores": c.scores, "probabilities": c.probabilities, "predictions": c.predictions}
              for k, c in s.curves.items()}
    _write(Path(out_dir), f"{stem}_sensitivity", sensitivity_figure(s), {
        "target": s.target, "base_score": s.base_score, "curves": curves,
        "occlusion": None if s.occlusion is None else {"scores": s.occlusion.scores, "window": s.occlusion.window,
                                                       "stride": s.occlusion.stride}})


def _epsilon(value: str) -> float:
    from ..errors import OptionError

    v = value.strip()
    try:
        if "/" in v:
            a, b = v.split("/", 1)
            return float(a) / float(b)
        return float(v)
    except (ValueError, ZeroDivisionError):
        raise OptionError(f"--epsilon must be a number or a fraction like 2/255; got {value!r}.") from None


@features.command("attack")
@click.argument("image", required=False)
@_common
@click.option("--method", type=click.Choice(["pgd", "fgsm"]), default="pgd", show_default=True)
@click.option("--norm", type=click.Choice(["linf", "l2"]), default="linf", show_default=True)
@click.option("--epsilon", default="2/255", show_default=True, help="Radius in pixel units (number or fraction).")
@click.option("--steps", default=10, show_default=True, help="PGD steps.")
@click.option("--target", "-t", default=None, help="Class to move away from (default: predicted) or towards (--targeted).")
@click.option("--targeted", is_flag=True, help="Push towards --target instead of away from it.")
@click.option("--explain-with", default="gradcam", show_default=True, help="Method whose explanation change is shown ('none' to skip).")
def attack_cmd(image: str | None, model_spec: str, device: str, random_init: bool, seed: int, out_dir: str,
               method: str, norm: str, epsilon: str, steps: int, target: str | None, targeted: bool, explain_with: str) -> None:
    """Adversarial example of IMAGE (FGSM/PGD) and how another method's explanation changes."""
    from ..featurevis import attack, explanation_change
    from ..viz.featurevis_plots import adversarial_figure

    zm = _model(model_spec, device, random_init)
    x, stem = _image(zm, image)
    res = attack(zm, x, method=method, norm=norm, epsilon=_epsilon(epsilon), steps=steps,
                 target=parse_target(target), targeted=targeted, seed=seed)
    labels = getattr(zm, "labels", None)
    change = None if explain_with.lower() == "none" else explanation_change(zm, res, explain_with)
    b, a = int(res.before[0]), int(res.after[0])
    click.echo(f"before: {b} ({labels[b] if labels else b}) p={float(res.before_prob[0]):.4f}; "
               f"after: {a} ({labels[a] if labels else a}) p={float(res.after_prob[0]):.4f}; "
               f"Linf {float(res.linf[0]):.6f} L2 {float(res.l2[0]):.4f}; success {bool(res.success[0])}")
    numbers: dict[str, Any] = {
        "options": res.options, "before": b, "before_name": labels[b] if labels else None,
        "before_probability": float(res.before_prob[0]), "after": a, "after_name": labels[a] if labels else None,
        "after_probability": float(res.after_prob[0]), "label": int(res.label[0]),
        "label_probability_before": float(res.label_prob_before[0]), "label_probability_after": float(res.label_prob_after[0]),
        "linf": float(res.linf[0]), "l2": float(res.l2[0]), "success": bool(res.success[0]),
    }
    if change is not None:
        numbers["explanation"] = {"method": change.method, "correlation_same_class": change.correlation_same,
                                  "correlation_new_class": change.correlation_new}
    _write(Path(out_dir), f"{stem}_attack", adversarial_figure(res, change, labels), numbers)
