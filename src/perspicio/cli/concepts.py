"""`perspicio concepts ...`: TCAV with significance tests and concept discovery (CRAFT).

``tcav`` reads a folder of target-class images, a folder with one sub-folder per concept and a
random folder (a flat pool, or one sub-folder per random set); ``discover`` reads images of the
class. Both write PNG figures and a JSON file into ``--out``. ``--example`` (tcav) and no images
(discover) use the bundled texture/photo sets (``perspicio.zoo.concept_sets``), offline;
``example-sets`` writes those sets as folders.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from ..errors import InputError, OptionError
from .common import load_model, out_dir_flag, parse_target


def register(group: click.Group) -> None:
    group.add_command(concepts)


@click.group("concepts")
def concepts() -> None:
    """Concept explanations: TCAV scores with significance tests, concept discovery (CRAFT)."""


def _common(f: Any) -> Any:
    f = out_dir_flag("perspicio-concepts", "Output directory.")(f)
    f = click.option(
        "--seed", type=int, default=0, show_default=True, help="Seed (sets, classifiers, crops)."
    )(f)
    f = click.option(
        "--layer",
        "-l",
        required=True,
        help="Layer holding the concepts (names: perspicio layers --model ...); tcav takes "
        "several, comma-separated, and writes one chart per layer.",
    )(f)
    f = click.option(
        "--random-init", is_flag=True, help="Random weights instead of pretrained ones."
    )(f)
    f = click.option("--device", default="cpu", show_default=True, help="torch device.")(f)
    f = click.option(
        "--model",
        "-m",
        "model_spec",
        default="efficientnet_lite0",
        show_default=True,
        help="Bundled name, torchvision:NAME, timm:NAME, a TorchScript file, or package.module:factory.",
    )(f)
    return f


def _subfolders(path: str, flag: str) -> list[Path]:
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"{flag} {path!r} is not a directory.")
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


@concepts.command("tcav")
@click.argument("inputs", required=False)
@_common
@click.option(
    "--concepts",
    "concepts_dir",
    default=None,
    help="Folder with one sub-folder of images per concept.",
)
@click.option(
    "--random",
    "random_dir",
    default=None,
    help="Folder of random images (a pool) or with one sub-folder per random set.",
)
@click.option(
    "--target",
    "-t",
    default=None,
    help="Class index or name the inputs belong to (default: predicted).",
)
@click.option("--random-sets", default=10, show_default=True, help="Random sets drawn from a pool.")
@click.option(
    "--set-size",
    type=int,
    default=None,
    help="Images per random set (default: smallest concept set).",
)
@click.option(
    "--classifier", type=click.Choice(["logistic", "sgd"]), default="logistic", show_default=True
)
@click.option(
    "--alpha",
    default=0.05,
    show_default=True,
    help="Significance level (Bonferroni over concepts).",
)
@click.option(
    "--example",
    is_flag=True,
    help="Use the bundled example sets (textures, photo crops, 'Egyptian cat').",
)
def tcav_cmd(
    inputs: str | None,
    model_spec: str,
    device: str,
    random_init: bool,
    layer: str,
    seed: int,
    out_dir: str,
    concepts_dir: str | None,
    random_dir: str | None,
    target: str | None,
    random_sets: int,
    set_size: int | None,
    classifier: str,
    alpha: float,
    example: bool,
) -> None:
    """TCAV scores of concepts for the target class, with the t-test against random CAVs."""
    from ..concepts import tcav

    zm = load_model(model_spec, device, random_init)
    tgt = parse_target(target)
    if example:
        if inputs or concepts_dir or random_dir:
            raise OptionError(
                "--example uses the bundled sets; do not also give INPUTS, --concepts or --random."
            )
        from ..zoo.concept_sets import example_sets

        ex = example_sets(seed=seed)
        inputs_spec, concept_map, random_spec = ex["inputs"], ex["concepts"], ex["random"]
        tgt = ex["target"] if tgt is None else tgt
    else:
        if not inputs or not concepts_dir or not random_dir:
            raise OptionError(
                "give INPUTS (images of the target class), --concepts DIR and --random DIR, or --example."
            )
        inputs_spec = inputs
        folders = _subfolders(concepts_dir, "--concepts")
        if not folders:
            raise InputError(
                f"--concepts {concepts_dir!r} has no sub-folders; put each concept's images in its own folder."
            )
        concept_map = {p.name: str(p) for p in folders}
        random_spec = random_dir
    random_folders = _subfolders(random_spec, "--random") if isinstance(random_spec, str) else []
    named = [part.strip() for part in layer.split(",") if part.strip()]
    if random_folders:
        random_options: dict[str, Any] = {"random_sets": [str(p) for p in random_folders]}
    else:
        random_options = {"random_sets": random_sets, "random": random_spec, "set_size": set_size}
    result = tcav(
        zm,
        inputs_spec,
        layer=named if len(named) > 1 else layer,
        concepts=concept_map,
        target=tgt,
        classifier=classifier,
        alpha=alpha,
        seed=seed,
        **random_options,
    )
    results = result if isinstance(result, dict) else {None: result}
    for name, res in results.items():
        stem = "tcav" if name is None else "tcav_" + re.sub(r"[^A-Za-z0-9_.-]", "_", name)
        paths = res.save(out_dir, stem)
        if name is not None:
            click.echo(f"layer {name}:")
        for c in res.concepts:
            mark = "significant" if res.significant[c] else "not significant"
            click.echo(f"{c}: TCAV {res.scores[c]:.3f} (p={res.p_values[c]:.3g}, {mark})")
        click.echo(
            f"random: {float(res.random_scores.mean()):.3f}; wrote {paths[0]} and {paths[1].name}"
        )


@concepts.command("discover")
@click.argument("images", nargs=-1)
@_common
@click.option(
    "--target",
    "-t",
    default=None,
    help="Class index or name (default: each image's predicted class).",
)
@click.option("--concepts", "n_concepts", default=8, show_default=True, help="Number of concepts.")
@click.option("--crops-per-image", default=16, show_default=True)
@click.option(
    "--crop-size",
    type=int,
    default=None,
    help="Crop side in model-input pixels (default: a quarter).",
)
@click.option(
    "--importance",
    type=click.Choice(["sobol", "gradient_input"]),
    default="sobol",
    show_default=True,
)
@click.option(
    "--designs", default=32, show_default=True, help="Sobol designs per image (a power of two)."
)
@click.option(
    "--top",
    default=8,
    show_default=True,
    type=click.IntRange(min=1),
    help="Crops shown per concept.",
)
def discover_cmd(
    images: tuple[str, ...],
    model_spec: str,
    device: str,
    random_init: bool,
    layer: str,
    seed: int,
    out_dir: str,
    target: str | None,
    n_concepts: int,
    crops_per_image: int,
    crop_size: int | None,
    importance: str,
    designs: int,
    top: int,
) -> None:
    """Discover the concepts a layer uses for a class (CRAFT): crop galleries, importance, maps.

    IMAGES: a folder or image files of the class (default: views of the bundled 'chelsea' photo).
    """
    from ..concepts import discover

    zm = load_model(model_spec, device, random_init)
    if not images:
        from ..zoo.concept_sets import target_examples

        spec: Any = target_examples(8, seed=seed)
    elif len(images) == 1 and Path(images[0]).is_dir():
        spec = images[0]
    else:
        spec = list(images)
    result = discover(
        zm,
        spec,
        layer=layer,
        target=parse_target(target),
        n_concepts=n_concepts,
        crops_per_image=crops_per_image,
        crop_size=crop_size,
        importance=importance,
        designs=designs,
        seed=seed,
    )
    paths = result.save(out_dir, "concepts", k=top)
    for i in range(result.n_concepts):
        click.echo(f"concept {i}: importance {float(result.importance[i]):.3g}")
    click.echo(f"wrote {paths[0]}, {paths[1].name} and {paths[2].name}")


@concepts.command("example-sets")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--seed", type=int, default=0, show_default=True)
def example_sets_cmd(out: str, seed: int) -> None:
    """Write the bundled example sets as folders: inputs/, concepts/<texture>/, random/."""
    from ..zoo.concept_sets import write_example_sets

    root = write_example_sets(out, seed=seed)
    click.echo(f"wrote {root}/inputs, {root}/concepts/*, {root}/random")
