"""Output images: PNG files with the generation parameters in text chunks.

Files go to `<outputs>/<YYYY-MM-DD>/`, written to a temporary name, fsynced and
renamed, so a full or read-only disk never leaves a half-written image listed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from masuka import __version__
from masuka.store.imagefiles import (  # noqa: F401 - MAX_METADATA_* and check_image_file are re-exported
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    MAX_METADATA_BYTES,
    MAX_METADATA_DEPTH,
    PNG_SIGNATURE,
    check_image_file,
    not_readable,
    parse_metadata_json,
    read_png_text,
)

log = logging.getLogger(__name__)

META_KEY = "masuka"  # one JSON chunk with everything, read back by `read_metadata`
# Plain chunks too, so other tools (and people) can read the basics.
PLAIN_KEYS = ("prompt", "seed", "steps", "guidance", "width", "height", "model", "loras", "job_id")
# zlib's run-length strategy: after PNG's row filters it packs images about as small as
# the default (level 6) in far less time; lossless, and every reader decodes it the same.
# Whole save_image on a 2-core VM: tiny-model 256x256 image 20 -> 12 ms (same size),
# 1024x1024 photo 413 -> 116 ms (+3 % bytes).  See docs/benchmarks.md, "Edge overhead".
PNG_ZLIB_STRATEGY = zlib.Z_RLE


def image_metadata(params: dict[str, Any], *, seed: int, model: str, job_id: str) -> dict[str, Any]:
    loras = [{"name": lc["name"], "scale": lc["scale"]} for lc in params.get("loras", [])]
    return {
        "prompt": params["prompt"],
        "seed": seed,
        "steps": params["steps"],
        "guidance": params["guidance"],
        "width": params["width"],
        "height": params["height"],
        "model": model,
        "loras": loras,
        "lora": ",".join(f"{lc['name']}:{lc['scale']:g}" for lc in loras),
        "job_id": job_id,
        "masuka_version": __version__,
    }


def save_image(image: Image.Image, outputs_dir: Path, metadata: dict[str, Any], stem: str) -> Path:
    day = time.strftime("%Y-%m-%d")
    folder = outputs_dir / day
    folder.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text(META_KEY, json.dumps(metadata, sort_keys=True))
    for key in PLAIN_KEYS:
        if key in metadata:
            value = metadata[key]
            info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text("Software", f"MASUKA {__version__}")
    final = folder / f"{stem}.png"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{stem}.", suffix=".partial")
    try:
        with os.fdopen(fd, "wb") as fh:
            image.save(fh, format="PNG", pnginfo=info, compress_type=PNG_ZLIB_STRATEGY)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return final


def read_metadata(
    path: str | os.PathLike,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    max_bytes: int = MAX_IMAGE_BYTES,
) -> dict[str, Any]:
    """Parameters stored by `save_image`; ValueError when the image has none or breaks a limit.

    Never decodes pixels: the PNG's chunks are walked by hand (image data is seeked
    over), so a decompression bomb costs nothing. Refused, with the limit named:
    files over `max_bytes`, images over `max_pixels` pixels, a settings chunk over
    MAX_METADATA_BYTES (compressed ones are inflated only that far) or nesting deeper
    than MAX_METADATA_DEPTH. The values are returned as stored; check them with
    `masuka.core.requests.settings_from_metadata` before use.
    """
    what = "the MASUKA settings in this image"
    text = None
    if _is_png(path):
        text = read_png_text(path, META_KEY, max_pixels=max_pixels, max_bytes=max_bytes, what=what)
    else:
        check_image_file(path, max_pixels=max_pixels, max_bytes=max_bytes)  # a JPEG/WebP: no settings
    if text is None:
        raise ValueError("this image has no MASUKA settings in it (only PNG files saved by MASUKA carry them)")
    meta = parse_metadata_json(text, what=what)
    if not isinstance(meta, dict) or "prompt" not in meta:
        raise ValueError("the MASUKA settings in this image are incomplete")
    return meta


def _is_png(path: str | os.PathLike) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError as exc:
        raise not_readable(path, exc.strerror or str(exc)) from exc
