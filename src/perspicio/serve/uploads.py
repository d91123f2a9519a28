"""Uploaded images, checked before anything decodes them.

The order matters: the byte count is checked while the body is read (the ASGI middleware in
``app.py`` stops a body past the limit), then the first bytes are sniffed (PNG or JPEG only -
the file name and the declared content type are ignored), then the width and height are read
from the PNG ``IHDR`` chunk or the JPEG start-of-frame marker and their product checked against
the pixel limit, and only then is the image decoded (by :func:`perspicio.zoo.load_image`, which
checks the pixel count again). A decompression bomb - a small file declaring a huge image - is
therefore refused without allocating its pixels.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"

#: JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic ...): they
#: carry the frame's height and width; 0xC4 (DHT), 0xC8 (JPG) and 0xCC (DAC) are not frames
SOF_MARKERS = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


class UploadError(InputError):
    """An upload that is refused; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ImageHeader:
    """What the header of an upload says, before decoding."""

    kind: str  # "png" or "jpeg"
    width: int
    height: int


def sniff(data: bytes) -> str:
    """``"png"`` or ``"jpeg"`` from the magic bytes; anything else is refused (415)."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    raise UploadError(
        "the upload is not a PNG or JPEG image (checked from its content, not its name).", 415
    )


def _png_size(data: bytes) -> tuple[int, int]:
    # signature (8) + chunk length (4) + b"IHDR" (4) + width (4) + height (4)
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise UploadError("the PNG file is truncated or has no IHDR header.")
    return struct.unpack(">II", data[16:24])


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    n = len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise UploadError("the JPEG file is corrupt (no marker where one was expected).")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if length < 2:
            raise UploadError("the JPEG file is corrupt (segment length < 2).")
        if marker in SOF_MARKERS:
            if i + 9 > n:
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            break
        i += 2 + length
    raise UploadError("the JPEG file has no frame header (image size unknown).")


def read_header(data: bytes) -> ImageHeader:
    """Kind, width and height of a PNG or JPEG upload, read without decoding it."""
    kind = sniff(data)
    width, height = _png_size(data) if kind == "png" else _jpeg_size(data)
    if width <= 0 or height <= 0:
        raise UploadError(f"the image declares an empty size ({width}x{height}).")
    return ImageHeader(kind, int(width), int(height))


def check_upload(data: bytes, *, max_bytes: int, max_pixels: int) -> ImageHeader:
    """Every check that runs before decoding: size in bytes, content type, pixel count."""
    if len(data) > max_bytes:
        raise UploadError(f"the upload has {len(data)} bytes; the limit is {max_bytes}.", 413)
    if not data:
        raise UploadError("the upload is empty.")
    header = read_header(data)
    pixels = header.width * header.height
    if pixels > max_pixels:
        raise UploadError(
            f"the image declares {header.width}x{header.height} = {pixels} pixels; the limit is {max_pixels} "
            "(refused before decoding).",
            413,
        )
    return header


def decode_upload(data: bytes, *, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Check ``data`` (:func:`check_upload`) and decode it to an (H, W, 3) uint8 RGB array."""
    from ..errors import PerspicioError
    from ..zoo import load_image

    header = check_upload(data, max_bytes=max_bytes, max_pixels=max_pixels)
    try:
        image = load_image(data, max_pixels=max_pixels)
    except PerspicioError as exc:
        raise UploadError(
            f"the {header.kind.upper()} file cannot be decoded: {str(exc).splitlines()[0]}"
        ) from None
    if image.size != (header.width, header.height) and image.size != (header.height, header.width):
        raise UploadError("the decoded image does not have the size its header declares.")
    return np.asarray(image, dtype=np.uint8).copy()
