"""Images from outside: settings read from PNG chunks without decoding, bombs refused by their headers."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image, PngImagePlugin

from masuka.store.imagefiles import (
    MAX_IMAGE_PIXELS,
    check_image_file,
    parse_metadata_json,
)
from masuka.store.outputs import read_metadata, save_image

SIGNATURE = b"\x89PNG\r\n\x1a\n"
META = {"prompt": "a fox", "seed": 5, "steps": 3, "guidance": 2.5, "width": 256, "height": 256,
        "loras": [{"name": "ink", "scale": 0.5}]}


# ---- PNGs built chunk by chunk (cheap: a "huge" image is a header and a small stream of zeros)
def chunk(ctype: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data))


def ihdr(width: int, height: int, color_type: int = 6) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0))


def zeros_idat(width: int, height: int, channels: int = 4) -> bytes:
    """A complete, valid zlib stream of every row (filter byte + zero pixels), made row by row."""
    packer = zlib.compressobj(9)
    row = bytes(1 + width * channels)
    body = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    return chunk(b"IDAT", body)


def text(keyword: str, value: str) -> bytes:
    return chunk(b"tEXt", keyword.encode() + b"\x00" + value.encode("latin-1"))


def ztext(keyword: str, value: bytes) -> bytes:
    return chunk(b"zTXt", keyword.encode() + b"\x00\x00" + zlib.compress(value, 9))


def png(*chunks: bytes) -> bytes:
    return SIGNATURE + b"".join(chunks) + chunk(b"IEND", b"")


def settings_after_idat(width: int, height: int, meta: dict = META) -> bytes:
    """A valid image whose MASUKA chunk comes after the pixels (where Pillow finds it only by decoding)."""
    return png(ihdr(width, height), zeros_idat(width, height), text("masuka", json.dumps(meta)))


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def peak_growth_mb(path: Path, call: str) -> tuple[float, str]:
    """Run `call` on `path` in a fresh interpreter; (peak RSS growth in MB, outcome)."""
    code = f"""
import json, resource, sys
from masuka.store.outputs import read_metadata
from masuka.store.imagefiles import check_image_file
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    outcome = "ok: " + json.dumps({call}(sys.argv[1]), default=str)
except Exception as exc:
    outcome = f"{{type(exc).__name__}}: {{exc}}"
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
sys.stdout.write(json.dumps([(after - before) / 1024, outcome]))
"""
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    growth, outcome = json.loads(done.stdout)
    return growth, outcome


# ---- the hostile test's bomb and its neighbours
def test_bomb_with_settings_after_the_pixels_is_refused_by_its_header_without_memory(tmp_path):
    # 13300x13300 RGBA declared; 707 MB once decoded. The stream is cut short: it need not be valid.
    bomb = png(ihdr(13300, 13300), chunk(b"IDAT", zlib.compress(bytes(2**20))), text("masuka", json.dumps(META)))
    path = write(tmp_path, "bomb.png", bomb)
    growth, outcome = peak_growth_mb(path, "read_metadata")
    assert outcome.startswith("ValueError") and "13300x13300" in outcome and f"{MAX_IMAGE_PIXELS:,}" in outcome
    assert growth < 50, f"reading the header took {growth:.0f} MB"


def test_settings_after_a_large_image_are_read_without_decoding_it(tmp_path):
    # 6000x6000 RGBA (under the pixel limit): 144 MB if decoded; the settings are after IDAT.
    path = write(tmp_path, "big.png", settings_after_idat(6000, 6000))
    growth, outcome = peak_growth_mb(path, "read_metadata")
    assert outcome.startswith("ok") and json.loads(outcome[4:]) == META
    assert growth < 50, f"reading the settings took {growth:.0f} MB"


def test_a_small_real_image_with_settings_after_idat_is_read(tmp_path):
    path = write(tmp_path, "small.png", settings_after_idat(32, 16))
    assert Image.open(path).size == (32, 16)  # a valid image, not only a header
    assert read_metadata(path) == META


HOSTILE = [
    ("not a PNG", b"GIF89a" + bytes(64), ["is not an image MASUKA can read"]),
    ("text", b"hello, not an image", ["is not an image MASUKA can read"]),
    ("empty", b"", ["is not an image MASUKA can read"]),
    ("no settings", png(ihdr(8, 8), zeros_idat(8, 8), text("Software", "x")), ["no MASUKA settings"]),
    ("cut short", png(ihdr(8, 8), zeros_idat(8, 8))[:-20], ["cut short"]),
    ("chunk claims 2 GB", SIGNATURE + ihdr(8, 8) + struct.pack(">I4s", 2**31 - 1, b"IDAT") + bytes(16),
     ["cut short"]),
    ("IHDR not first", SIGNATURE + text("masuka", "{}") + ihdr(8, 8), ["IHDR"]),
    ("damaged IHDR", SIGNATURE + ihdr(8, 8)[:-1] + bytes([ihdr(8, 8)[-1] ^ 1]) + chunk(b"IEND", b""), ["CRC"]),
    ("zero size", png(ihdr(0, 8)), ["impossible size"]),
    ("width over the PNG maximum", png(ihdr(2**31, 1)), ["impossible size"]),
    ("settings over 64 KiB", png(ihdr(8, 8), text("masuka", json.dumps({"prompt": "x" * 70000}))), ["64 KiB"]),
    ("zTXt bomb", png(ihdr(8, 8), ztext("masuka", b"[" * 5 * 2**20)), ["64 KiB"]),
    ("deep nesting", png(ihdr(8, 8), text("masuka", "[" * 30000 + "]" * 30000)), ["nest", "32"]),
    ("deeper nesting", png(ihdr(8, 8), text("masuka", "[" * 100000 + "]" * 100000)), ["64 KiB"]),
    ("damaged JSON", png(ihdr(8, 8), text("masuka", '{"prompt": ')), ["damaged"]),
    ("not an object", png(ihdr(8, 8), text("masuka", "[1, 2]")), ["incomplete"]),
    ("no prompt", png(ihdr(8, 8), text("masuka", '{"seed": 1}')), ["incomplete"]),
    ("pixels over the limit", png(ihdr(8000, 5001)), ["8000x5001", "40,000,000"]),
    ("largest PNG width", png(ihdr(2**31 - 1, 1)), ["2147483647x1", "40,000,000"]),
]


@pytest.mark.parametrize("name, data, words", HOSTILE, ids=[row[0] for row in HOSTILE])
def test_hostile_or_broken_files_are_refused_with_a_message(tmp_path, name, data, words):
    with pytest.raises(ValueError) as info:
        read_metadata(write(tmp_path, "x.png", data))
    for word in words:
        assert word in str(info.value), (name, str(info.value))


@pytest.mark.parametrize(
    "meta_text, field, expected",
    [
        ('{"prompt": "p", "seed": 1e400}', "seed", "1e400"),  # kept as written, for the message
        ('{"prompt": "p", "guidance": NaN}', "guidance", "NaN"),
        ('{"prompt": "p", "seed": -Infinity}', "seed", "-Infinity"),
        ('{"prompt": "p", "seed": ' + "9" * 5000 + "}", "seed", "9" * 5000),  # Python refuses >4300 digits
        ('{"prompt": "p", "seed": 1000000000000000000000000000000}', "seed", 10**30),
    ],
)
def test_odd_numbers_are_read_not_raised(tmp_path, meta_text, field, expected):
    path = write(tmp_path, "odd.png", png(ihdr(8, 8), text("masuka", meta_text)))
    assert read_metadata(path)[field] == expected


def test_parse_metadata_json_refuses_100k_deep_nesting_with_a_value_error():
    with pytest.raises(ValueError, match="nest more than 32"):
        parse_metadata_json("[" * 100_000 + "]" * 100_000, max_chars=10**6)
    assert parse_metadata_json('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}') == {"a": "[" * 36}  # in a string


# ---- legitimate MASUKA images still round-trip
@pytest.mark.parametrize("zip_text, itxt", [(False, False), (True, False), (False, True), (True, True)])
def test_masuka_pngs_round_trip(tmp_path, zip_text, itxt):
    image = Image.new("RGB", (64, 48), (200, 30, 10))
    meta = {**META, "prompt": "a fox in snow, café ☃"}
    saved = save_image(image, tmp_path, meta, "job-1")
    assert read_metadata(saved) == meta
    info = PngImagePlugin.PngInfo()  # other writers: compressed text, international text
    payload = json.dumps(meta, ensure_ascii=not itxt)
    (info.add_itxt if itxt else info.add_text)("masuka", payload, zip=zip_text)
    image.save(tmp_path / "other.png", pnginfo=info)
    assert read_metadata(tmp_path / "other.png") == meta


def test_jpeg_and_webp_have_no_settings(tmp_path):
    image = Image.new("RGB", (16, 16))
    for name in ("a.jpg", "a.webp"):
        image.save(tmp_path / name)
        with pytest.raises(ValueError, match="no MASUKA settings"):
            read_metadata(tmp_path / name)


# ---- check_image_file: every format, refused by header
def jpeg_declaring(tmp_path: Path, width: int, height: int) -> Path:
    """A real JPEG whose SOF header is patched to declare width x height."""
    path = tmp_path / "x.jpg"
    Image.new("RGB", (16, 16)).save(path, quality=50)
    data = bytearray(path.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def webp_declaring(tmp_path: Path, width: int, height: int) -> Path:
    """A real lossless WebP whose VP8L header is patched to declare width x height (at most 16384)."""
    path = tmp_path / "x.webp"
    Image.new("RGB", (16, 16)).save(path, lossless=True)
    data = bytearray(path.read_bytes())
    at = data.index(b"VP8L") + 8 + 1  # chunk header, then the 0x2f signature byte
    bits = int.from_bytes(data[at : at + 4], "little")
    bits = (bits & ~((1 << 28) - 1)) | (width - 1) | ((height - 1) << 14)
    data[at : at + 4] = bits.to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    "make, size, fmt",
    [
        (lambda tmp: write(tmp, "x.png", png(ihdr(20000, 20000), zeros_idat(1, 1))), (20000, 20000), "PNG"),
        (lambda tmp: jpeg_declaring(tmp, 60000, 60000), (60000, 60000), "JPEG"),
        (lambda tmp: webp_declaring(tmp, 16384, 16384), (16384, 16384), "WEBP"),
    ],
)
def test_check_image_file_refuses_huge_images_by_header(tmp_path, make, size, fmt):
    path = make(tmp_path)
    with pytest.raises(ValueError) as info:
        check_image_file(path)
    assert f"{size[0]}x{size[1]}" in str(info.value) and f"{MAX_IMAGE_PIXELS:,}" in str(info.value)
    ok = check_image_file(path, max_pixels=size[0] * size[1])
    assert (ok.format, ok.width, ok.height) == (fmt, *size)


def test_check_image_file_refuses_huge_jpeg_in_little_memory(tmp_path):
    growth, outcome = peak_growth_mb(jpeg_declaring(tmp_path, 60000, 60000), "check_image_file")
    assert outcome.startswith("ValueError") and "60000x60000" in outcome and growth < 50


@pytest.mark.parametrize(
    "data, kwargs, words",
    [
        (png(ihdr(8, 8)), {"max_bytes": 20}, ["bytes", "the limit is 20 bytes"]),
        (png(ihdr(100, 100)), {"max_pixels": 9999}, ["100x100", "9,999"]),
        (b"GIF89a" + bytes(64), {}, ["not an image MASUKA can read", "PNG, JPEG or WebP"]),
        (b"BM" + bytes(64), {}, ["not an image MASUKA can read"]),
    ],
)
def test_check_image_file_limits_and_formats(tmp_path, data, kwargs, words):
    with pytest.raises(ValueError) as info:
        check_image_file(write(tmp_path, "x.img", data), **kwargs)
    for word in words:
        assert word in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "name, options, fmt",
    [
        ("a.png", {}, "PNG"),
        ("a.jpg", {}, "JPEG"),
        ("p.jpg", {"progressive": True, "exif": Image.Exif()}, "JPEG"),
        ("a.webp", {}, "WEBP"),
        ("l.webp", {"lossless": True}, "WEBP"),
        ("x.webp", {"exif": b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x00\x00"}, "WEBP"),  # VP8X container
    ],
)
def test_check_image_file_accepts_ordinary_images(tmp_path, name, options, fmt):
    image = Image.new("RGB", (40, 30))
    image.save(tmp_path / name, **options)
    info = check_image_file(tmp_path / name)
    assert (info.format, info.width, info.height) == (fmt, 40, 30)
    assert info.size_bytes == (tmp_path / name).stat().st_size
