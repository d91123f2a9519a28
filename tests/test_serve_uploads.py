"""perspicio serve: upload checks before decoding (no server, no worker)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from perspicio.serve import uploads
from perspicio.serve.uploads import UploadError, check_upload, decode_upload, read_header


def png_bytes(w: int, h: int, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128 if mode == "L" else (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(w: int, h: int, progressive: bool = False) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (200, 10, 30)).save(buf, format="JPEG", progressive=progressive)
    return buf.getvalue()


def png_bomb(side: int) -> bytes:
    """A real decompression bomb: a valid 1-bit PNG of side x side zeros (a few hundred kB on disk)."""
    raw_row = b"\x00" + b"\x00" * ((side + 7) // 8)
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(raw_row) for _ in range(side)) + comp.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return uploads.PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_header_sizes_of_png_and_jpeg_without_decoding() -> None:
    assert read_header(png_bytes(37, 21)) == uploads.ImageHeader("png", 37, 21)
    assert read_header(jpeg_bytes(50, 13)) == uploads.ImageHeader("jpeg", 50, 13)
    assert read_header(jpeg_bytes(64, 40, progressive=True)) == uploads.ImageHeader("jpeg", 64, 40)


def test_content_is_sniffed_not_named() -> None:
    with pytest.raises(UploadError) as info:
        check_upload(b"just some text, named cat.png", max_bytes=1000, max_pixels=1000)
    assert info.value.status == 415
    gif = io.BytesIO()
    Image.new("RGB", (4, 4)).save(gif, format="GIF")
    with pytest.raises(UploadError, match="not a PNG or JPEG"):
        check_upload(gif.getvalue(), max_bytes=10**6, max_pixels=10**6)


def test_byte_limit_and_empty_upload() -> None:
    data = png_bytes(8, 8)
    with pytest.raises(UploadError) as info:
        check_upload(data, max_bytes=len(data) - 1, max_pixels=10**6)
    assert info.value.status == 413
    with pytest.raises(UploadError, match="empty"):
        check_upload(b"", max_bytes=10, max_pixels=10)


def test_decompression_bomb_refused_before_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = png_bomb(20_000)  # 400 megapixels, ~50 kB
    assert len(bomb) < 200_000

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the bomb reached the decoder")

    monkeypatch.setattr("perspicio.zoo.load_image", no_decoding)
    with pytest.raises(UploadError) as info:
        decode_upload(bomb, max_bytes=10**6, max_pixels=25_000_000)
    assert info.value.status == 413 and "400000000 pixels" in str(info.value)


def test_jpeg_declaring_a_huge_frame_is_refused() -> None:
    data = bytearray(jpeg_bytes(16, 16))
    i = data.index(b"\xff\xc0")
    data[i + 5 : i + 9] = struct.pack(">HH", 60_000, 60_000)
    with pytest.raises(UploadError) as info:
        check_upload(bytes(data), max_bytes=10**6, max_pixels=25_000_000)
    assert info.value.status == 413


def test_truncated_and_corrupt_headers() -> None:
    with pytest.raises(UploadError, match="truncated"):
        read_header(uploads.PNG_MAGIC + b"\x00\x00")
    with pytest.raises(UploadError, match="corrupt|frame"):
        read_header(b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 6 + b"garbage")
    body = png_bytes(10, 10)
    with pytest.raises(UploadError, match="cannot be decoded"):
        decode_upload(body[:40], max_bytes=10**6, max_pixels=10**6)


def test_decode_gives_rgb_pixels() -> None:
    px = decode_upload(png_bytes(12, 7, "L"), max_bytes=10**6, max_pixels=10**6)
    assert px.shape == (7, 12, 3) and px.dtype == np.uint8 and (px == 128).all()
