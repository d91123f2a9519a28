"""Loading images as RGB ``PIL.Image`` objects, and the bundled sample photos.

:func:`load_image` is the single entry point used by the zoo and the CLI. It
accepts a file path, a sample name, raw bytes or a binary file object, a PIL image
or a numpy array, and always returns a fresh RGB image (8 bits per channel):

* grayscale (``1``, ``L``) is replicated to three channels;
* transparency (``LA``, ``RGBA``, ``PA``, ``P`` with a transparent colour) is
  composited on a white background;
* palette images are expanded;
* 16-bit and 32-bit images (``I;16*``, ``I``, ``F``) are scaled to 8 bits: 16-bit
  modes divide by 257; for ``I`` and ``F`` data already within 0..255 (or 0..1 for
  ``F``) is kept as is, data within 0..65535 is treated as 16-bit, anything else is
  stretched from its minimum to its maximum;
* CMYK and YCbCr go through Pillow's conversion;
* files are turned upright according to their EXIF orientation tag.

Images larger than ``max_pixels`` (default: the module attribute :data:`MAX_PIXELS`,
read at call time, so it can be changed globally; ``None`` there disables the check)
are refused before they are decoded, as are files Pillow itself flags as
decompression bombs.
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError, PerspicioError, UnknownNameError, suggest

__all__ = [
    "MAX_PIXELS",
    "SAMPLES",
    "SAMPLE_DESCRIPTIONS",
    "load_image",
    "sample",
    "sample_names",
    "to_rgb",
]

#: Default limit on width x height accepted by :func:`load_image` (64 megapixels).
#: Change it here (``perspicio.zoo.images.MAX_PIXELS``); ``None`` disables it.
MAX_PIXELS: int | None = 64_000_000

#: Names of the sample photos bundled with scikit-image.
SAMPLES = ("chelsea", "coffee", "camera", "rocket", "motorcycle_left", "astronaut")

#: One line per sample, for listings.
SAMPLE_DESCRIPTIONS = {
    "chelsea": "a tabby cat (ImageNet 'Egyptian cat', 'tabby')",
    "coffee": "a cup of coffee on a saucer (ImageNet 'espresso')",
    "camera": "a photographer with a camera on a tripod (grayscale)",
    "rocket": "a rocket on its launch pad",
    "motorcycle_left": "a motorcycle in a garage (left view of a stereo pair)",
    "astronaut": "portrait of astronaut Eileen Collins",
}

_HIGH_DEPTH_16 = ("I;16", "I;16L", "I;16B", "I;16N")
_TRANSPARENT = ("LA", "La", "PA", "RGBA", "RGBa")


# --------------------------------------------------------------------------- samples


def sample_names() -> tuple[str, ...]:
    """Names accepted by :func:`sample` (and by :func:`load_image` as a string)."""
    return SAMPLES


@functools.lru_cache(maxsize=len(SAMPLES))
def _sample_array(name: str) -> np.ndarray:
    try:
        from skimage import data
    except ImportError as exc:
        raise InputError(
            f"sample image {name!r} comes from scikit-image, which is not installed; "
            "install it with: pip install scikit-image (or pip install 'perspicio[models]')"
        ) from exc
    if name == "motorcycle_left":
        array = data.stereo_motorcycle()[0]
    else:
        array = getattr(data, name)()
    array = np.asarray(array)
    array.setflags(write=False)
    return array


def sample(name: str) -> Image.Image:
    """A sample photo from scikit-image's bundled data, as a new RGB image.

    ``name`` is one of :data:`SAMPLES`. The data ships inside scikit-image; nothing
    is downloaded.
    """
    if not isinstance(name, str) or name not in SAMPLES:
        raise UnknownNameError(
            f"unknown sample image {name!r}; expected one of: {', '.join(SAMPLES)}."
            + suggest(str(name), SAMPLES)
        )
    return _array_to_image(_sample_array(name), f"sample {name!r}", None)


# --------------------------------------------------------------------------- loading


def load_image(source: Any, *, max_pixels: int | None = None) -> Image.Image:
    """Load ``source`` as a new RGB ``PIL.Image.Image``.

    ``source`` may be a path (``str`` or ``os.PathLike``), a sample name from
    :data:`SAMPLES` (a string that is not an existing file), ``bytes`` or a binary
    file object holding an encoded image, a ``PIL.Image.Image``, or a numpy array of
    shape (H, W), (H, W, C) or (C, H, W) with C in {1, 3, 4}: ``uint8``, ``uint16``,
    ``bool``, integers within 0..255, or floats within [0, 1].

    Raises :class:`InputError` for missing/unreadable/corrupt files, unsupported
    arrays and images with more than ``max_pixels`` pixels. ``max_pixels=None``
    uses the module-level :data:`MAX_PIXELS` (itself ``None`` for no limit of our
    own; Pillow's decompression-bomb limit still applies to files).
    """
    if max_pixels is None:
        max_pixels = MAX_PIXELS
    if max_pixels is not None and (
        isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1
    ):
        raise InputError(f"max_pixels must be a positive int or None, got {max_pixels!r}")

    if isinstance(source, Image.Image):
        _check_pixels(source.size, max_pixels, "the given PIL image")
        try:
            return to_rgb(source)
        except PerspicioError:
            raise
        except Exception as exc:  # a lazily opened image whose data is broken
            raise InputError(f"could not read the given PIL image: {exc}") from exc
    if isinstance(source, np.ndarray):
        return _array_to_image(source, "array", max_pixels)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _decode(io.BytesIO(bytes(source)), "the given bytes", max_pixels)
    if hasattr(source, "read") and not isinstance(source, (str, os.PathLike)):
        return _decode(source, "the given file object", max_pixels)
    if isinstance(source, (str, os.PathLike)):
        return _load_path(source, max_pixels)
    raise InputError(
        "expected an image path, a sample name, bytes, a PIL image or a numpy array, "
        f"got {type(source).__name__}"
    )


def _load_path(source: str | os.PathLike, max_pixels: int | None) -> Image.Image:
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():  # Path("") is the current directory
        raise InputError("the image path is empty; expected an image file or a sample name")
    if isinstance(source, str) and text in SAMPLES and not os.path.exists(text):
        image = sample(text)
        _check_pixels(image.size, max_pixels, f"sample {text!r}")
        return image
    path = Path(text).expanduser()
    if not path.exists():
        msg = f"image file not found: '{path}'"
        if isinstance(source, str) and not path.suffix and os.sep not in text:
            msg += f"; it is not a sample name either (samples: {', '.join(SAMPLES)})."
            msg += suggest(text, SAMPLES)
        raise InputError(msg)
    if path.is_dir():
        raise InputError(f"'{path}' is a directory; expected an image file")
    return _decode(path, f"'{path}'", max_pixels, path=path)


def _decode(
    fp: Any, label: str, max_pixels: int | None, *, path: Path | None = None
) -> Image.Image:
    """Open, size-check, fully decode and convert an encoded image."""
    pil_limit = Image.MAX_IMAGE_PIXELS
    strict = max_pixels is not None and (pil_limit is None or max_pixels <= pil_limit)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error" if strict else "ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as image:
                _check_pixels(image.size, max_pixels, label)
                image.load()
                return to_rgb(_upright(image))
    except PerspicioError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InputError(
            f"image {label} is too large to decode safely ({exc}); downscale it or raise the limit"
        ) from exc
    except FileNotFoundError as exc:
        raise InputError(f"image file not found: {label}") from exc
    except PermissionError as exc:
        raise InputError(f"cannot read image {label}: permission denied") from exc
    except IsADirectoryError as exc:
        raise InputError(f"{label} is a directory; expected an image file") from exc
    except UnidentifiedImageError as exc:
        what = "file" if path is not None else "data"
        raise InputError(
            f"{label} is not an image {what} Pillow can read (unknown or unsupported format)"
        ) from exc
    except Exception as exc:  # truncated/corrupt data: OSError, SyntaxError, ValueError, ...
        raise InputError(f"image {label} is corrupt or truncated: {exc}") from exc


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation tag; a broken EXIF block is ignored, not fatal."""
    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:
        return image
    return image if upright is None else upright


def _check_pixels(size: tuple[int, int], max_pixels: int | None, label: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"image {label} is empty ({width}x{height} pixels)")
    if max_pixels is not None and width * height > max_pixels:
        raise InputError(
            f"image {label} has {width}x{height} = {width * height:,} pixels, above the "
            f"limit of {max_pixels:,}; downscale it first or pass a larger max_pixels"
        )


# --------------------------------------------------------------------------- conversion


def to_rgb(image: Image.Image) -> Image.Image:
    """A new 8-bit RGB copy of ``image``, whatever its mode (see the module docs)."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in ("1", "L"):
        return image.convert("RGB")
    if mode == "P":
        if "transparency" in image.info:
            return _on_white(image.convert("RGBA"))
        return image.convert("RGB")
    if mode in _TRANSPARENT:
        return _on_white(image.convert("RGBA"))
    if mode in _HIGH_DEPTH_16 or mode in ("I", "F"):
        gray = _to_uint8(np.asarray(image), mode, "image")
        return Image.fromarray(gray).convert("RGB")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as exc:
        raise InputError(
            f"cannot convert an image of mode {mode!r} to RGB: {exc}; "
            "expected an RGB, grayscale, palette, RGBA, CMYK or 16-bit image"
        ) from exc


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _to_uint8(array: np.ndarray, mode: str, label: str) -> np.ndarray:
    """Scale single-channel high-depth data to uint8 (rules in the module docs)."""
    if mode in _HIGH_DEPTH_16 or array.dtype == np.uint16:
        return np.round(array.astype(np.float64) / 257.0).astype(np.uint8)
    values = array.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise InputError(f"{label} contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if mode == "F" and low >= 0.0 and high <= 1.0:
        values = values * 255.0
    elif low >= 0.0 and high <= 255.0:
        pass
    elif low >= 0.0 and high <= 65535.0:
        values = values / 257.0
    else:
        values = (values - low) * (255.0 / (high - low))
    return np.clip(np.round(values), 0, 255).astype(np.uint8)


def _array_to_image(array: np.ndarray, label: str, max_pixels: int | None) -> Image.Image:
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise InputError(
            f"{label} must have shape (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4; "
            f"got shape {tuple(array.shape)}"
        )
    height, width = array.shape[:2]
    _check_pixels((width, height), max_pixels, label)
    array = _array_to_uint8(array, label)
    if array.ndim == 2:
        return Image.fromarray(array, "L").convert("RGB")
    if array.shape[-1] == 4:
        return _on_white(Image.fromarray(np.ascontiguousarray(array), "RGBA"))
    return Image.fromarray(np.ascontiguousarray(array), "RGB")


def _array_to_uint8(array: np.ndarray, label: str) -> np.ndarray:
    kind = array.dtype.kind
    if array.dtype == np.uint8:
        return array
    if kind == "b":
        return array.astype(np.uint8) * 255
    if array.dtype == np.uint16:
        return _to_uint8(array, "I;16", label)
    if kind in "iu":
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise InputError(
                f"integer {label} values must lie within 0..255 (or use uint16 for 16-bit "
                f"data); got dtype {array.dtype} with values in [{low}, {high}]"
            )
        return array.astype(np.uint8)
    if kind == "f":
        values = array.astype(np.float64)
        if not np.all(np.isfinite(values)):
            raise InputError(f"float {label} contains NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        tolerance = 1e-3
        if low < -tolerance or high > 1.0 + tolerance:
            raise InputError(
                f"float {label} values must lie within [0, 1]; got values in "
                f"[{low:.4g}, {high:.4g}] (pass uint8 for 0..255 data)"
            )
        return np.clip(np.round(values * 255.0), 0, 255).astype(np.uint8)
    raise InputError(
        f"{label} must be uint8, uint16, bool, integer or float; got dtype {array.dtype}"
    )
