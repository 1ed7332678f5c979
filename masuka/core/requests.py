"""Every bound on what a generation may ask for, checked in one place.

Each check raises `ValueError` whose message names the parameter, the value
and the allowed range; the UI and API edges turn that into `gr.Error`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from collections.abc import Mapping
from typing import Any

from masuka.core.speed import SPEEDS, check_speed
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
# Checked before tokenizing: a run of characters outside T5's vocabulary is one <unk>
# token, so the token limit alone let a 1 MB prompt through. T5 reads at most 512
# tokens; at up to ~8 characters a token (long common words) that is about 4000.
PROMPT_MAX_CHARS = 4000


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
    speed: str = "exact"  # "exact": the plain pipeline; "fast": step caching (masuka.core.speed)

    def params(self) -> dict[str, Any]:
        d = asdict(self)
        d["loras"] = [asdict(lc) for lc in self.loras]
        d["notes"] = list(self.notes)
        return d


def shown(value: Any) -> str:
    """A short, safe rendering of any value for a message (never raises, never huge).

    repr() of a 5000-digit int raises, of a 1 MB string is 1 MB, of a 100k-deep list
    raises RecursionError; none of those may reach a message.
    """
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 128:
            return f"a {int(value.bit_length() * math.log10(2)) + 1}-digit number"
        return str(value)
    if isinstance(value, str):
        return repr(value) if len(value) <= 40 else f"{value[:40]!r}... ({len(value)} characters)"
    if isinstance(value, (list, tuple)):
        return f"a list of {len(value)} item{'s' * (len(value) != 1)}"
    if isinstance(value, Mapping):
        return f"an object with {len(value)} key{'s' * (len(value) != 1)}"
    return f"a {type(value).__name__}"


def _number(name: str, value: Any) -> float:
    # bool is an int subclass; a checkbox value is never a number here.
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{name} must be a number, got {shown(value)}")
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be a number, got {shown(value)}") from None
    try:
        f = float(value)
    except OverflowError:  # an int too large for a float (10**400)
        raise ValueError(f"{name} must be a finite number, got {shown(value)}") from None
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {shown(value)}") from None
    if math.isnan(f) or math.isinf(f):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    return f


def check_int(name: str, value: Any, lo: int, hi: int) -> int:
    f = _number(name, value)
    if f != int(f):
        raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {shown(value)}")
    i = int(f)
    if not lo <= i <= hi:
        raise ValueError(f"{name} must be from {lo} to {hi}, got {shown(i)}")
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
        raise ValueError(f"{rule} (a whole number), got {shown(value)}")
    if not SIZE_MIN <= f <= SIZE_MAX or int(f) % SIZE_STEP:
        raise ValueError(f"{rule}, got {shown(int(f))}")
    return int(f)


def check_seed(value: Any) -> int:
    i = check_int("seed", value, -1, MAX_SEED)
    return i


def parse_lora_spec(lora: Any, default_scale: Any = 1.0) -> tuple[LoraChoice, ...]:
    """`""` -> no LoRA; `"name"`; `"name1:0.8,name2:0.5"` (a name without a scale takes default_scale)."""
    if lora is None:
        return ()
    if not isinstance(lora, str):
        raise ValueError(f"lora must be a string like 'name' or 'name1:0.8,name2:0.5', got {shown(lora)}")
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
            raise ValueError(f"LoRA {name!r} is listed twice in lora={shown(lora)}")
        choices.append(LoraChoice(name, scale))
    if len(choices) > MAX_LORAS:
        raise ValueError(f"at most {MAX_LORAS} LoRAs at once, got {len(choices)} in lora={shown(lora)}")
    return tuple(choices)


def check_prompt(prompt: Any) -> str:
    """A non-empty text of at most PROMPT_MAX_CHARS characters (checked before any tokenizer sees it)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt must be a non-empty text")
    if len(prompt) > PROMPT_MAX_CHARS:
        raise ValueError(f"prompt is {len(prompt)} characters; the limit is {PROMPT_MAX_CHARS}")
    return prompt


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
    speed: Any = "exact",
    defaults: ModelDefaults = DEV_DEFAULTS,
    t5_tokenizer=None,
    clip_tokenizer=None,
) -> GenerateRequest:
    check_prompt(prompt)
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
        speed=check_speed(speed),
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


# ---- settings dropped in from an image's metadata ----------------------------
_SIZE_RULE = f"a multiple of {SIZE_STEP} from {SIZE_MIN} to {SIZE_MAX}"
_LORA_NAME_RULE = "LoRA names use 1-100 letters, digits, '.', '_' or '-' (not starting with '.')"
_MAX_LORA_MESSAGES = 8  # a list of 30000 bad entries gives 8 lines and a count, not 30000 lines


def _lora_from_metadata(entry: Any, index: int) -> tuple[LoraChoice | None, str]:
    """One `{"name": ..., "scale": ...}` entry of an image's `loras`, or (None, why it was dropped)."""
    if not isinstance(entry, Mapping):
        return None, f"LoRA entry {index} ({shown(entry)}) dropped: it must be {{\"name\": ..., \"scale\": ...}}"
    name, scale = entry.get("name"), entry.get("scale", 1.0)
    try:
        validate_name(name if isinstance(name, str) else None)
    except ValueError:
        return None, f"LoRA {shown(name)} dropped: {_LORA_NAME_RULE}"
    try:
        value = check_float("scale", 1.0 if scale is None else scale, LORA_SCALE_MIN, LORA_SCALE_MAX)
    except ValueError:
        return None, (
            f"LoRA {name!r} at scale {shown(scale)} dropped: a LoRA scale must be a number "
            f"from {LORA_SCALE_MIN:g} to {LORA_SCALE_MAX:g}"
        )
    return LoraChoice(name, value), ""


def settings_from_metadata(meta: Any, defaults: ModelDefaults) -> tuple[dict[str, Any], list[str]]:
    """The Generate form's values from an image's stored settings (`read_metadata`), checked like a request.

    Returns `(fields, messages)`. `fields` always holds every key — prompt, seed,
    steps, guidance, width, height, loras (a list of (name, scale)), speed ("exact"
    when the image predates it) and num_images (always 1) — each either the image's value, valid by the same rules as a
    request (the seed: a whole number from 0 to MAX_SEED), or, when the image's
    value is missing or invalid, the model default (seed -1 = random, prompt "").
    `messages` says in words what was dropped and why. Never raises, whatever the
    JSON held (any type, NaN, huge numbers, nested lists). Whether each LoRA is in
    this library is not checked here.
    """
    messages: list[str] = []
    if not isinstance(meta, Mapping):
        meta = {}
        messages.append("the settings in this image are not a JSON object; nothing was loaded")

    def pick(key: str, default: Any, check: Any, rule: str, instead: str) -> Any:
        value = meta.get(key)
        if value is None:
            return default
        try:
            return check(value)
        except ValueError:
            messages.append(f"{key} {shown(value)} dropped: {rule}; {instead}")
            return default

    prompt = pick("prompt", "", check_prompt, f"a prompt must be a non-empty text of at most {PROMPT_MAX_CHARS} "
                  "characters", "the prompt box is left empty")
    seed = pick("seed", -1, lambda v: check_int("seed", v, 0, MAX_SEED),
                f"seed must be a whole number from 0 to {MAX_SEED}", "a random seed is used")
    steps = pick("steps", defaults.steps, lambda v: check_int("steps", v, STEPS_MIN, STEPS_MAX),
                 f"steps must be a whole number from {STEPS_MIN} to {STEPS_MAX}",
                 f"the model default {defaults.steps} is used")
    guidance = pick("guidance", defaults.guidance, lambda v: check_float("guidance", v, GUIDANCE_MIN, GUIDANCE_MAX),
                    f"guidance must be a number from {GUIDANCE_MIN:g} to {GUIDANCE_MAX:g}",
                    f"the model default {defaults.guidance:g} is used")
    width = pick("width", defaults.width, lambda v: check_size("width", v), f"width must be {_SIZE_RULE}",
                 f"the model default {defaults.width} is used")
    height = pick("height", defaults.height, lambda v: check_size("height", v), f"height must be {_SIZE_RULE}",
                  f"the model default {defaults.height} is used")

    speed = pick("speed", "exact", check_speed, f"speed must be one of {', '.join(SPEEDS)}", "exact is used")

    loras: list[tuple[str, float]] = []
    entries = meta.get("loras")
    if entries is not None and not isinstance(entries, (list, tuple)):
        messages.append(f"loras {shown(entries)} dropped: it must be a list of {{\"name\": ..., \"scale\": ...}}")
        entries = None
    dropped: list[str] = []
    for index, entry in enumerate(entries or [], start=1):
        choice, why = _lora_from_metadata(entry, index)
        if choice is None:
            dropped.append(why)
        elif any(name == choice.name for name, _ in loras):
            dropped.append(f"LoRA {choice.name!r} dropped: it is listed twice")
        elif len(loras) >= MAX_LORAS:
            dropped.append(f"LoRA {choice.name!r} dropped: at most {MAX_LORAS} LoRAs at once")
        else:
            loras.append((choice.name, choice.scale))
    messages.extend(dropped[:_MAX_LORA_MESSAGES])
    if len(dropped) > _MAX_LORA_MESSAGES:
        messages.append(f"... and {len(dropped) - _MAX_LORA_MESSAGES} more LoRA entries dropped")
    fields = {
        "prompt": prompt, "seed": seed, "steps": steps, "guidance": guidance,
        "width": width, "height": height, "loras": loras, "num_images": 1, "speed": speed,
    }
    return fields, messages
