"""Images read from outside (dropped, uploaded): checked from their headers before anything decodes them.

A 3 MB PNG can declare 13300x13300 pixels and take gigabytes once decoded, and a
PNG's text chunks may sit after the image data, where Pillow reaches them only by
decoding everything (`Image.text`).  So:

* :func:`check_image_file` reads only the header (PNG's IHDR, JPEG's frame header,
  WebP's first chunk; by hand, with no decoder involved) and refuses files over
  :data:`MAX_IMAGE_BYTES` or images over :data:`MAX_IMAGE_PIXELS`;
* :func:`read_png_text` walks a PNG's chunks itself (length, type, data, CRC),
  seeking over image data, and returns one text chunk (tEXt, zTXt or iTXt),
  decompressed with a bounded output;
* :func:`parse_metadata_json` parses that text with a size cap and a nesting cap
  (deep nesting is a ValueError, never a RecursionError).

Every refusal is a ValueError that says the limit.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

# 40 MP: nearly ten times the largest image MASUKA makes (2048x2048 = 4.2 MP), yet
# decoded as RGBA it is at most 160 MB, which a Colab runtime survives.
MAX_IMAGE_PIXELS = 40_000_000
# A 2048x2048 PNG of pure noise is about 13 MB; photos dropped in are far smaller.
MAX_IMAGE_BYTES = 64 * 2**20
# The settings chunk of a MASUKA PNG is a few KB (a prompt is at most PROMPT_MAX_CHARS).
MAX_METADATA_BYTES = 64 * 1024
# Settings nest two levels ({"loras": [{...}]}); 32 leaves room and stays far from recursion limits.
MAX_METADATA_DEPTH = 32
# A PNG of MAX_IMAGE_BYTES written in 8 KB IDAT chunks (libpng's default) has ~8200 chunks.
MAX_PNG_CHUNKS = 100_000
# Numbers longer than this are kept as their text (Python refuses to parse ints over 4300 digits).
MAX_NUMBER_DIGITS = 400

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FORMATS = ("PNG", "JPEG", "WEBP")
_TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
_MAX_KEYWORD = 79  # PNG spec: keywords are 1-79 bytes


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says: format ("PNG", "JPEG", "WEBP"), size in pixels and in bytes."""

    format: str
    width: int
    height: int
    size_bytes: int


def _label(path: str | os.PathLike) -> str:
    return repr(os.fspath(path))


def not_readable(path: str | os.PathLike, why: str) -> ValueError:
    """The refusal `read_metadata` has always given for a file that is not a usable image."""
    return ValueError(f"{_label(path)} is not an image MASUKA can read: {why}")


def _check_bytes(path: str | os.PathLike, size: int, max_bytes: int) -> None:
    if size > max_bytes:
        raise ValueError(
            f"image {Path(path).name!r} is {size:,} bytes; the limit is {max_bytes:,} bytes "
            f"({max_bytes / 2**20:g} MiB)"
        )


def _check_pixels(path: str | os.PathLike, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ValueError(
            f"image {Path(path).name!r} is {width}x{height} = {width * height:,} pixels; "
            f"the limit is {max_pixels:,} pixels"
        )


def _read_exact(fh: BinaryIO, n: int, path: str | os.PathLike) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise not_readable(path, "the PNG file is cut short")
    return data


def _png_ihdr(fh: BinaryIO, path: str | os.PathLike) -> tuple[int, int]:
    """Width and height from the IHDR chunk, which must come first; the file is positioned after it."""
    if fh.read(len(PNG_SIGNATURE)) != PNG_SIGNATURE:
        raise not_readable(path, "not a PNG file")
    length, ctype = struct.unpack(">I4s", _read_exact(fh, 8, path))
    if ctype != b"IHDR" or length != 13:
        raise not_readable(path, "the PNG file does not start with its IHDR header")
    data = _read_exact(fh, 13, path)
    (crc,) = struct.unpack(">I", _read_exact(fh, 4, path))
    if zlib.crc32(ctype + data) != crc:
        raise not_readable(path, "the PNG header are damaged (CRC mismatch)")
    width, height = struct.unpack(">II", data[:8])
    if width == 0 or height == 0 or width >= 2**31 or height >= 2**31:
        raise not_readable(path, f"the PNG header declares an impossible size {width}x{height}")
    return width, height


def _open_bounded(path: str | os.PathLike, max_bytes: int) -> tuple[BinaryIO, int]:
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the caller's with-block
    except OSError as exc:
        raise not_readable(path, exc.strerror or str(exc)) from exc
    try:
        size = os.fstat(fh.fileno()).st_size
        _check_bytes(path, size, max_bytes)
    except BaseException:
        fh.close()
        raise
    return fh, size


def _kib(n: int) -> str:
    return f"{n / 1024:g} KiB"


def _too_long(what: str, limit: int) -> ValueError:
    return ValueError(f"{what} are larger than the limit of {_kib(limit)}; refused")


def _bounded_inflate(data: bytes, limit: int, what: str) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)  # never more than limit + 1 bytes, whatever the ratio
    except zlib.error as exc:
        raise ValueError(f"{what} are damaged (bad compressed data: {exc})") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise _too_long(what, limit)
    return out


def _decode_text_chunk(ctype: bytes, body: bytes, limit: int, what: str) -> str:
    """The text of a tEXt/zTXt/iTXt chunk whose keyword (and its NUL) was already removed from `body`."""
    if ctype == b"tEXt":
        return body.decode("latin-1")
    if ctype == b"zTXt":
        if body[:1] != b"\x00":
            raise ValueError(f"{what} are damaged (unknown compression method)")
        return _bounded_inflate(body[1:], limit, what).decode("latin-1")
    # iTXt: compression flag, method, language tag NUL, translated keyword NUL, UTF-8 text
    if len(body) < 2:
        raise ValueError(f"{what} are damaged (short iTXt chunk)")
    flag, method = body[0], body[1]
    parts = body[2:].split(b"\x00", 2)
    if len(parts) != 3:
        raise ValueError(f"{what} are damaged (malformed iTXt chunk)")
    text = parts[2]
    if flag:
        if method != 0:
            raise ValueError(f"{what} are damaged (unknown compression method)")
        text = _bounded_inflate(text, limit, what)
    try:
        return text.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{what} are damaged (not UTF-8 text)") from exc


def read_png_text(
    path: str | os.PathLike,
    keyword: str,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
    max_text_bytes: int = MAX_METADATA_BYTES,
    what: str = "the settings in this image",
) -> str | None:
    """The first tEXt/zTXt/iTXt chunk named `keyword` of a PNG, or None; no pixel is ever decoded.

    Refuses (ValueError, naming the limit) files over `max_bytes`, images whose IHDR
    declares more than `max_pixels`, and a chunk whose text is over `max_text_bytes`
    (compressed text is inflated only up to that size). Non-PNG files and broken PNG
    structure give "... is not an image MASUKA can read: ...".
    """
    wanted = keyword.encode("latin-1")
    fh, size = _open_bounded(path, max_bytes)
    with fh:
        width, height = _png_ihdr(fh, path)
        _check_pixels(path, width, height, max_pixels)
        pos = fh.tell()
        for _ in range(MAX_PNG_CHUNKS):
            header = fh.read(8)
            if len(header) < 8:
                raise not_readable(path, "the PNG file is cut short (no IEND chunk)")
            length, ctype = struct.unpack(">I4s", header)
            end = pos + 8 + length + 4  # data and CRC
            if length >= 2**31 or end > size:
                raise not_readable(path, f"the PNG file is cut short (a {ctype!r} chunk runs past its end)")
            if ctype == b"IEND":
                return None
            if ctype in _TEXT_CHUNKS:
                head = fh.read(min(length, _MAX_KEYWORD + 1))
                name, nul, _rest = head.partition(b"\x00")
                if nul and name == wanted:
                    if length - len(name) - 1 > max_text_bytes + 1024:  # room for iTXt's tags
                        raise _too_long(what, max_text_bytes)
                    data = head + _read_exact(fh, length - len(head), path)
                    (crc,) = struct.unpack(">I", _read_exact(fh, 4, path))
                    if zlib.crc32(ctype + data) != crc:
                        raise ValueError(f"{what} are damaged (CRC mismatch)")
                    text = _decode_text_chunk(ctype, data[len(name) + 1 :], max_text_bytes, what)
                    if len(text.encode("utf-8")) > max_text_bytes:
                        raise _too_long(what, max_text_bytes)
                    return text
            fh.seek(end)  # image data (and every other chunk) is skipped, never read
            pos = end
        raise not_readable(path, f"the PNG file has more than {MAX_PNG_CHUNKS:,} chunks")
    return None  # unreachable; keeps type checkers content


# JPEG start-of-frame markers (baseline, progressive, lossless, arithmetic): they carry the size.
_JPEG_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_MAX_JPEG_SEGMENTS = 10_000


def _jpeg_size(fh: BinaryIO, path: str | os.PathLike, size: int) -> tuple[int, int]:
    """Width and height from the first start-of-frame segment, walking the segments before it."""
    fh.seek(2)  # after SOI
    for _ in range(_MAX_JPEG_SEGMENTS):
        byte = fh.read(1)
        while byte == b"\xff":  # fill bytes before a marker
            byte = fh.read(1)
            if byte != b"\xff":
                break
        else:
            raise not_readable(path, "the JPEG file is damaged (no frame header)")
        marker = byte[0] if byte else 0xD9
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue  # markers without a length
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            raise not_readable(path, "the JPEG file is damaged (no frame header)")
        head = fh.read(2)
        if len(head) < 2 or int.from_bytes(head, "big") < 2:
            raise not_readable(path, "the JPEG file is cut short")
        length = int.from_bytes(head, "big")
        if marker in _JPEG_SOF:
            frame = fh.read(5)
            if len(frame) < 5:
                raise not_readable(path, "the JPEG file is cut short")
            height, width = struct.unpack(">HH", frame[1:5])
            if width == 0 or height == 0:
                raise not_readable(path, f"the JPEG header declares an impossible size {width}x{height}")
            return width, height
        end = fh.tell() + length - 2
        if end > size:
            raise not_readable(path, "the JPEG file is cut short")
        fh.seek(end)
    raise not_readable(path, f"the JPEG file has more than {_MAX_JPEG_SEGMENTS:,} segments before its frame header")


def _webp_size(fh: BinaryIO, path: str | os.PathLike) -> tuple[int, int]:
    """Width and height from the first chunk of a WebP (VP8X canvas, VP8L or VP8 frame header)."""
    fh.seek(12)
    fourcc = fh.read(8)[:4]
    if fourcc == b"VP8X":
        data = fh.read(10)
        if len(data) == 10:
            return 1 + int.from_bytes(data[4:7], "little"), 1 + int.from_bytes(data[7:10], "little")
    elif fourcc == b"VP8L":
        data = fh.read(5)
        if len(data) == 5 and data[0] == 0x2F:
            bits = int.from_bytes(data[1:5], "little")
            return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    elif fourcc == b"VP8 ":
        data = fh.read(10)
        if len(data) == 10 and data[3:6] == b"\x9d\x01\x2a":
            width = int.from_bytes(data[6:8], "little") & 0x3FFF
            height = int.from_bytes(data[8:10], "little") & 0x3FFF
            if width and height:
                return width, height
    raise not_readable(path, "the WebP file is damaged (no readable frame header)")


def check_image_file(
    path: str | os.PathLike,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> ImageInfo:
    """Check an image from outside before anything decodes it: PNG, JPEG or WebP, within the limits.

    Reads the header only (by hand: Pillow's own bomb check and libwebp's decoder set
    up canvas-sized buffers before a caller could refuse). Raises ValueError naming
    the limit for a file over `max_bytes` or an image over `max_pixels` pixels, and
    "... is not an image MASUKA can read: ..." for anything that is not a PNG, JPEG
    or WebP image.
    """
    fh, size = _open_bounded(path, max_bytes)
    with fh:
        magic = fh.read(16)
        fh.seek(0)
        if magic.startswith(PNG_SIGNATURE):
            fmt, (width, height) = "PNG", _png_ihdr(fh, path)
        elif magic.startswith(b"\xff\xd8\xff"):
            fmt, (width, height) = "JPEG", _jpeg_size(fh, path, size)
        elif magic[:4] == b"RIFF" and magic[8:12] == b"WEBP":
            fmt, (width, height) = "WEBP", _webp_size(fh, path)
        else:
            raise not_readable(path, "not a PNG, JPEG or WebP image")
    _check_pixels(path, width, height, max_pixels)
    return ImageInfo(fmt, width, height, size)


def json_depth(text: str, limit: int) -> int:
    """How deeply `text`'s arrays/objects nest, counted without parsing; stops counting past `limit`."""
    depth = peak = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > peak:
                peak = depth
                if peak > limit:
                    break
        elif ch in "]}":
            depth -= 1
    return peak


def _json_float(text: str) -> float | str:
    value = float(text)
    return value if math.isfinite(value) else text  # 1e400 -> "1e400", kept so a message can quote it


def _json_int(text: str) -> int | str:
    return int(text) if len(text.lstrip("-")) <= MAX_NUMBER_DIGITS else text


def parse_metadata_json(
    text: str,
    *,
    max_chars: int = MAX_METADATA_BYTES,
    max_depth: int = MAX_METADATA_DEPTH,
    what: str = "the settings",
) -> Any:
    """`json.loads` with a size cap and a nesting cap; every failure is a ValueError.

    Numbers JSON can write but Python would not hold as they were written (1e400,
    NaN, Infinity, integers of more than MAX_NUMBER_DIGITS digits) are kept as their
    text, so a validator can refuse them by what the file said.
    """
    if len(text) > max_chars:
        raise ValueError(f"{what} are {len(text):,} characters; the limit is {max_chars:,}")
    depth = json_depth(text, max_depth)
    if depth > max_depth:
        raise ValueError(f"{what} nest more than {max_depth} levels deep; refused")
    try:
        return json.loads(text, parse_float=_json_float, parse_int=_json_int, parse_constant=str)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{what} are damaged: {exc}") from exc
