"""Every bound on what a generation may ask for, checked in one place.

Each check raises `ValueError` whose message names the parameter, the value
and the allowed range; the UI and API edges turn that into `gr.Error`.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from masuka.lora.types import validate_name
from masuka.model.defaults import DEV_DEFAULTS, ModelDefaults

MAX_SEED = 2**53 - 1  # largest integer a JavaScript number (the page) holds exactly
SIZE_MIN, SIZE_MAX, SIZE_STEP = 256, 2048, 16
STEPS_MIN, STEPS_MAX = 1, 100
GUIDANCE_MIN, GUIDANCE_MAX = 0.0, 30.0
IMAGES_MIN, IMAGES_MAX = 1, 8
LORA_SCALE_MIN, LORA_SCALE_MAX = -4.0, 4.0
MAX_LORAS = 4
CLIP_TOKEN_LIMIT = 77


@dataclass(frozen=True)
class LoraChoice:
    name: str
    scale: float


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    loras: tuple[LoraChoice, ...]
    seed: int  # -1 = pick a random seed
    steps: int
    guidance: float
    width: int
    height: int
    num_images: int
    notes: tuple[str, ...] = field(default_factory=tuple)

    def params(self) -> dict[str, Any]:
        d = asdict(self)
        d["loras"] = [asdict(lc) for lc in self.loras]
        d["notes"] = list(self.notes)
        return d


def _number(name: str, value: Any) -> float:
    # bool is an int subclass; a checkbox value is never a number here.
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a number, got {value!r}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {value!r}") from None
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if math.isnan(f) or math.isinf(f):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return f


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    f = _number(name, value)
    if f != int(f):
        raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
    i = int(f)
    if not lo <= i <= hi:
        raise ValueError(f"{name} must be from {lo} to {hi}, got {i}")
    return i


def check_float(name: str, value: Any, lo: float, hi: float) -> float:
    f = _number(name, value)
    if not lo <= f <= hi:
        raise ValueError(f"{name} must be from {lo:g} to {hi:g}, got {f:g}")
    return f


def check_size(name: str, value: Any) -> int:
    rule = f"{name} must be a multiple of {SIZE_STEP} from {SIZE_MIN} to {SIZE_MAX}"
    f = _number(name, value)
    if f != int(f):
        raise ValueError(f"{rule} (a whole number), got {value!r}")
    if not SIZE_MIN <= f <= SIZE_MAX or int(f) % SIZE_STEP:
        raise ValueError(f"{rule}, got {int(f)}")
    return int(f)


def check_seed(value: Any) -> int:
    i = check_int("seed", value, -1, MAX_SEED)
    return i


def parse_lora_spec(lora: Any, default_scale: Any = 1.0) -> tuple[LoraChoice, ...]:
    """`""` -> no LoRA; `"name"`; `"name1:0.8,name2:0.5"` (a name without a scale takes default_scale)."""
    if lora is None:
        return ()
    if not isinstance(lora, str):
        raise ValueError(f"lora must be a string like 'name' or 'name1:0.8,name2:0.5', got {lora!r}")
    default = check_float("lora_scale", default_scale, LORA_SCALE_MIN, LORA_SCALE_MAX)
    choices: list[LoraChoice] = []
    for part in (p.strip() for p in lora.split(",")):
        if not part:
            continue
        name, sep, scale_txt = part.partition(":")
        name = validate_name(name.strip())
        scale = default
        if sep:
            scale = check_float(f"scale of LoRA {name!r}", scale_txt.strip(), LORA_SCALE_MIN, LORA_SCALE_MAX)
        if any(c.name == name for c in choices):
            raise ValueError(f"LoRA {name!r} is listed twice in lora={lora!r}")
        choices.append(LoraChoice(name, scale))
    if len(choices) > MAX_LORAS:
        raise ValueError(f"at most {MAX_LORAS} LoRAs at once, got {len(choices)} in lora={lora!r}")
    return tuple(choices)


def count_tokens(tokenizer, prompt: str) -> int:
    """Tokens the encoder would see, special tokens included, without truncation."""
    return len(tokenizer(prompt, truncation=False, add_special_tokens=True)["input_ids"])


def validate_request(
    *,
    prompt: Any,
    lora: Any = "",
    lora_scale: Any = 1.0,
    seed: Any = -1,
    steps: Any = None,
    guidance: Any = None,
    width: Any = None,
    height: Any = None,
    num_images: Any = 1,
    defaults: ModelDefaults = DEV_DEFAULTS,
    t5_tokenizer=None,
    clip_tokenizer=None,
) -> GenerateRequest:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty text")
    notes: list[str] = []
    if t5_tokenizer is not None:
        n = count_tokens(t5_tokenizer, prompt)
        if n > defaults.max_sequence_length:
            raise ValueError(
                f"prompt is {n} T5 tokens long; this model reads at most {defaults.max_sequence_length} tokens"
            )
    if clip_tokenizer is not None:
        n = count_tokens(clip_tokenizer, prompt)
        if n > CLIP_TOKEN_LIMIT:
            notes.append(
                f"prompt is {n} CLIP tokens; CLIP reads the first {CLIP_TOKEN_LIMIT} (T5 reads all of it)"
            )
    loras = parse_lora_spec(lora, lora_scale)
    return GenerateRequest(
        prompt=prompt,
        loras=loras,
        seed=check_seed(seed),
        steps=check_int("steps", defaults.steps if steps is None else steps, STEPS_MIN, STEPS_MAX),
        guidance=check_float(
            "guidance", defaults.guidance if guidance is None else guidance, GUIDANCE_MIN, GUIDANCE_MAX
        ),
        width=check_size("width", defaults.width if width is None else width),
        height=check_size("height", defaults.height if height is None else height),
        num_images=check_int("num_images", 1 if num_images is None else num_images, IMAGES_MIN, IMAGES_MAX),
        notes=tuple(notes),
    )


def aspect_size(ratio_w: int, ratio_h: int, area: int) -> tuple[int, int]:
    """(width, height) of about `area` pixels in the ratio ratio_w:ratio_h, each a valid size.

    Sides are multiples of SIZE_STEP within SIZE_MIN..SIZE_MAX; when the area would push a
    side out of bounds the whole rectangle is scaled, so the ratio holds as well as it can.
    """
    if ratio_w <= 0 or ratio_h <= 0 or area <= 0:
        raise ValueError(f"aspect ratio {ratio_w}:{ratio_h} and area {area} must be positive")
    width = math.sqrt(area * ratio_w / ratio_h)
    height = width * ratio_h / ratio_w
    grow = SIZE_MIN / min(width, height)
    if grow > 1:
        width, height = width * grow, height * grow
    shrink = SIZE_MAX / max(width, height)
    if shrink < 1:
        width, height = width * shrink, height * shrink

    def snap(side: float) -> int:
        return min(SIZE_MAX, max(SIZE_MIN, int(round(side / SIZE_STEP)) * SIZE_STEP))

    return snap(width), snap(height)
