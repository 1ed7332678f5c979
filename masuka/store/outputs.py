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
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from masuka import __version__

log = logging.getLogger(__name__)

META_KEY = "masuka"  # one JSON chunk with everything, read back by `read_metadata`
# Plain chunks too, so other tools (and people) can read the basics.
PLAIN_KEYS = ("prompt", "seed", "steps", "guidance", "width", "height", "model", "loras", "job_id")


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
            image.save(fh, format="PNG", pnginfo=info)
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


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Parameters stored by `save_image`; ValueError when the image has none."""
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"{os.fspath(path)!r} is not an image MASUKA can read: {exc}") from exc
    raw = text.get(META_KEY)
    if raw is None:
        raise ValueError("this image has no MASUKA settings in it (only PNG files saved by MASUKA carry them)")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the MASUKA settings in this image are damaged: {exc}") from exc
    if not isinstance(meta, dict) or "prompt" not in meta:
        raise ValueError("the MASUKA settings in this image are incomplete")
    return meta
