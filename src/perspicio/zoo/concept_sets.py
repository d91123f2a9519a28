"""Small concept and random image sets built offline from scikit-image's bundled data.

For the TCAV demo on the bundled EfficientNet-Lite0: three texture concepts (random crops of
``skimage.data.brick``, ``grass`` and ``gravel``), a pool of random images (random crops of the
other bundled photos), and examples of the target class (views of ``chelsea``, an
'Egyptian cat'). Every crop position and size comes from a local generator seeded by ``seed``;
nothing is downloaded. :func:`write_example_sets` writes them as folders of PNG files in the
layout ``perspicio concepts tcav`` reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import InputError, UnknownNameError, suggest

#: texture concepts: scikit-image data functions (512 x 512 grayscale)
TEXTURES = ("brick", "grass", "gravel")

#: photos the random pool is cropped from (not the target's photo)
RANDOM_PHOTOS = (
    "coffee",
    "astronaut",
    "rocket",
    "motorcycle_left",
    "camera",
    "coins",
    "moon",
    "hubble_deep_field",
    "immunohistochemistry",
    "page",
)

#: the target class of the example and the photo its inputs are views of
EXAMPLE_TARGET = "Egyptian cat"
EXAMPLE_PHOTO = "chelsea"


def _data(name: str) -> np.ndarray:
    try:
        from skimage import data
    except ImportError as exc:
        raise InputError(
            "the example concept sets come from scikit-image, which is not installed; "
            "install it with: pip install 'perspicio[models]'"
        ) from exc
    array = data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(data, name)()
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return np.ascontiguousarray(array[..., :3]).astype(np.uint8)


def _crops(
    array: np.ndarray, n: int, low: float, high: float, rng: np.random.Generator, flip: bool = False
) -> list[Image.Image]:
    """``n`` random square crops with sides in [low, high] x the smaller image side."""
    h, w = array.shape[:2]
    out = []
    for _ in range(n):
        side = int(rng.integers(int(low * min(h, w)), int(high * min(h, w)) + 1))
        top = int(rng.integers(0, h - side + 1))
        left = int(rng.integers(0, w - side + 1))
        crop = array[top : top + side, left : left + side]
        if flip and rng.random() < 0.5:
            crop = crop[:, ::-1]
        out.append(Image.fromarray(np.ascontiguousarray(crop)))
    return out


def texture_set(name: str, n: int = 12, *, seed: int = 0) -> list[Image.Image]:
    """``n`` random crops (a quarter to a half of the side) of a scikit-image texture."""
    if name not in TEXTURES:
        raise UnknownNameError(
            f"unknown texture {name!r}; expected one of: {', '.join(TEXTURES)}."
            + suggest(str(name), TEXTURES)
        )
    rng = np.random.default_rng([seed, TEXTURES.index(name)])
    return _crops(_data(name), n, 0.25, 0.5, rng)


def random_pool(n: int = 60, *, seed: int = 0) -> list[Image.Image]:
    """``n`` random crops (30-90% of the side) of the bundled photos other than the target's."""
    rng = np.random.default_rng([seed, 1000])
    arrays = [_data(p) for p in RANDOM_PHOTOS]
    which = rng.integers(0, len(arrays), size=n)
    return [_crops(arrays[int(i)], 1, 0.3, 0.9, rng)[0] for i in which]


def target_examples(n: int = 12, *, seed: int = 0) -> list[Image.Image]:
    """``n`` views of the target photo: random crops of 70-100% of its side, half of them mirrored."""
    rng = np.random.default_rng([seed, 2000])
    return _crops(_data(EXAMPLE_PHOTO), n, 0.7, 1.0, rng, flip=True)


def example_sets(
    *, n_concept: int = 12, n_random: int = 60, n_inputs: int = 12, seed: int = 0
) -> dict[str, Any]:
    """The TCAV example: ``{"inputs", "target", "concepts": {name: images}, "random": images}``."""
    return {
        "inputs": target_examples(n_inputs, seed=seed),
        "target": EXAMPLE_TARGET,
        "concepts": {t: texture_set(t, n_concept, seed=seed) for t in TEXTURES},
        "random": random_pool(n_random, seed=seed),
    }


def write_example_sets(directory: str | Path, **kw: Any) -> Path:
    """Write the example as ``inputs/``, ``concepts/<texture>/`` and ``random/`` PNG folders."""
    root = Path(directory)
    sets = example_sets(**kw)
    groups = {"inputs": sets["inputs"], "random": sets["random"]}
    groups.update({f"concepts/{k}": v for k, v in sets["concepts"].items()})
    for folder, images in groups.items():
        d = root / folder
        d.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(d / f"{i:03d}.png")
    return root
