"""Output images: PNG files with the generation parameters in text chunks.

Files go to `<outputs>/<YYYY-MM-DD>/<job_id>-<index>-<seed>.png`, written to a
temporary name (`.<name>.<random>.partial`), fsynced and renamed, so a full or
read-only disk never leaves a half-written image listed.  A process killed while
saving can still leave a temp file or an image its job never recorded:
`remove_leftovers` clears those at start.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import zlib
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from masuka import __version__
from masuka.store.atomic import atomic_file
from masuka.store.jobs import FINAL_STATUSES, JobNotFound, JobStore
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
TEMP_SUFFIX = ".partial"
STALE_SECONDS = 3600  # a temp file of a job this history does not know is dead after this long

_DAY_FOLDER = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# `<job_id>-<index>-<seed>.png` and its temp files `.<job_id>-<index>-<seed>.<anything>.partial`.
_IMAGE = re.compile(r"^(?P<job>[0-9a-f]{12})-\d+-\d+\.png$")
_TEMP = re.compile(r"^\.(?P<job>[0-9a-f]{12})-\d+-\d+\..+\.partial$")

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
        # Older records have no speed: they were exact.
        "speed": params.get("speed", "exact"),
    } | {key: params[key] for key in ("cache", "cache_threshold") if key in params}


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
    with atomic_file(final, suffix=TEMP_SUFFIX) as fh:
        image.save(fh, format="PNG", pnginfo=info, compress_type=PNG_ZLIB_STRATEGY)
    return final


def remove_leftovers(outputs_dir: Path, jobs: JobStore) -> list[Path]:
    """Remove what killed processes left in `<outputs>/<date>/`; returns the removed files.

    A file named like ours (an image or its `.partial` temp file) goes when its job
    has ended (completed, failed, cancelled, interrupted) and does not list it.  Files
    of queued or running jobs stay (another live process may be saving them), and so
    do images of jobs this history does not know: the folder may be shared (a Drive
    folder used with another database, or a history that was lost), and those images
    are someone's work.  Only their temp files go, once an hour old.
    """
    outputs_dir = Path(outputs_dir)
    if not outputs_dir.is_dir():
        return []
    listed: dict[str, set[str] | None] = {}  # job id -> names of its outputs; None: leave its files alone
    removed: list[Path] = []
    now = time.time()
    for folder in sorted(p for p in outputs_dir.iterdir() if p.is_dir() and _DAY_FOLDER.match(p.name)):
        for file in sorted(folder.iterdir()):
            match = _IMAGE.match(file.name) or _TEMP.match(file.name)
            if match is None or file.is_symlink() or not file.is_file():
                continue
            job_id = match["job"]
            if job_id not in listed:
                listed[job_id] = _ended_job_outputs(jobs, job_id)
            names = listed[job_id]
            if names is None:
                if not (file.name.endswith(TEMP_SUFFIX) and _older_than(file, now, STALE_SECONDS)):
                    continue
            elif file.name in names:
                continue
            try:
                file.unlink()
            except FileNotFoundError:
                continue
            log.warning("removed leftover %s (job %s does not list it)", file, job_id)
            removed.append(file)
    return removed


def _ended_job_outputs(jobs: JobStore, job_id: str) -> set[str] | None:
    """File names of an ended job's images; None for a job still running or unknown here."""
    try:
        record = jobs.get(job_id)
    except JobNotFound:
        return None
    if record["status"] not in FINAL_STATUSES:
        return None
    return {Path(output).name for output in record["outputs"]}


def _older_than(file: Path, now: float, seconds: float) -> bool:
    try:
        return now - file.stat().st_mtime > seconds
    except FileNotFoundError:
        return False


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
