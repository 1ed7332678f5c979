"""Judging LoRA files before they enter the library, without ever unpickling anything.

Everything here works from the safetensors header (parsed by hand, no torch) except
:func:`check_fits` and :func:`load_lora_state_dict`, which read tensors with
``safetensors`` (never ``torch.load``) and use diffusers' own FLUX.1 conversion.

Format detection mirrors ``FluxLoraLoaderMixin.lora_state_dict`` in diffusers 0.42.1
(``diffusers/loaders/lora_pipeline.py``) and ``_convert_kohya_flux_lora_to_diffusers``
(``diffusers/loaders/lora_conversion_utils.py``), in the same order:

1. ``dora_scale`` keys are dropped.
2. any key containing ``.lora_down.weight`` -> kohya conversion, which itself has three
   branches: keys starting with ``transformer.`` (rename lora_down/up -> lora_A/B),
   ``lora_transformer_*`` keys ("mixture"), and sd-scripts / ComfyUI keys
   (``lora_unet_double_blocks_*``, ``diffusion_model.double_blocks.*``, ``lora_te1_*``).
3. any key containing ``processor`` -> XLabs.
4. any key containing ``query_norm.scale`` -> BFL Control LoRA (Canny/Depth).
5. any key containing ``base_model`` -> fal Kontext LoRA.
6. otherwise the keys are taken as diffusers/PEFT keys (``alpha`` keys become network
   alphas); ``FluxPipeline.load_lora_weights`` only loads keys that start with
   ``transformer.`` into the transformer.

Never hand a path to diffusers without ``use_safetensors=True``: with the default
(``None``) diffusers falls back to ``torch.load`` when safetensors loading fails.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import struct
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

MAX_HEADER_BYTES = 100_000_000
"""Same bound as the safetensors library (``MAX_HEADER_SIZE``)."""

MAX_TRIGGER_WORDS = 10
MAX_TRIGGER_WORD_CHARS = 100
_HASH_CHUNK = 1 << 20

PICKLE_EXTENSIONS = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"})
PICKLE_MESSAGE = "pickle files are never loaded; convert to .safetensors"

# Bits per element of every dtype that safetensors' torch loader can turn into a tensor.
_DTYPE_BITS = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E4M3": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
    "C64": 64,
}

# Top-level module names of diffusers' FluxTransformer2DModel.
FLUX_TOP_LEVEL_MODULES = frozenset(
    {
        "transformer_blocks",
        "single_transformer_blocks",
        "x_embedder",
        "context_embedder",
        "time_text_embed",
        "norm_out",
        "proj_out",
    }
)

# Format names returned by detect_format (all of them are converted by diffusers 0.42.1).
FORMAT_DIFFUSERS = "diffusers"  # PEFT lora_A/lora_B (diffusers, ai-toolkit, SimpleTuner, ...)
FORMAT_KOHYA = "kohya"  # sd-scripts lora_unet_double_blocks_* (+ ComfyUI diffusion_model.*)
FORMAT_KOHYA_DIFFUSERS = "kohya-diffusers"  # lora_transformer_transformer_blocks_* ("mixture")
FORMAT_XLABS = "xlabs"  # double_blocks.N.processor.qkv_lora1.down.weight
FORMAT_FAL_KONTEXT = "fal-kontext"  # base_model.model.double_blocks.N.img_attn.qkv.lora_A.weight

# Keys that mark an adapter diffusers cannot load into FLUX.1 (LyCORIS LoKr/LoHa/...).
LYCORIS_MARKERS = (".lokr_", ".hada_", ".oft_", ".boft_", "lokr_w1", "hada_w1")

_SD_UNET_BLOCK = re.compile(
    r"(?:^|[._])(?:down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block)[._]"
)
_SD_UNET_PREFIXES = ("lora_unet_", "unet.", "model.diffusion_model.", "diffusion_model.", "lora_unet.")
_SDXL_TE2_PREFIXES = ("lora_te2_", "text_encoder_2.", "te2.", "conditioner.embedders.1")
_BFL_BLOCK = re.compile(r"(?:^|\.)(?:double_blocks|single_blocks)\.\d+\.")
_FLUX_KOHYA_UNET = re.compile(
    r"^lora_unet_(?:double_blocks_\d+_|single_blocks_\d+_|img_in|txt_in|time_in_|vector_in_|"
    r"guidance_in_|final_layer_)"
)
_LORA_WEIGHT_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.(?P<param>weight|bias)$")
_RANK_SUFFIXES = ("lora_A.weight", "lora_down.weight", ".down.weight")

_TRIGGER_METADATA_KEYS = (
    "modelspec.trigger_phrase",
    "trigger_phrase",
    "trigger_words",
    "trigger_word",
    "triggers",
    "ss_trigger_words",
    "activation_text",
    "instance_prompt",
)
_TAG_FREQUENCY_KEY = "ss_tag_frequency"
_MAX_FREQUENCY_TAGS = 5


class LoraRefused(ValueError):
    """A file that must not enter the LoRA library; the message says why, for the user."""


@dataclass(frozen=True)
class LoraInspection:
    format: str
    size_bytes: int
    sha256: str
    num_tensors: int
    rank: int | None
    trigger_words: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- header


def _sniff_refusal(head: bytes) -> str | None:
    """A refusal message when the first bytes identify a non-safetensors format."""
    if head.startswith(b"PK\x03\x04"):
        return f"{PICKLE_MESSAGE} (this is a zip/torch.save file)"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return f"{PICKLE_MESSAGE} (this is a pickle file)"
    if head.startswith(b"GGUF"):
        return "GGUF files are not supported; use a .safetensors LoRA"
    return None


def _refuse_pickle_name(path: Path) -> None:
    if path.suffix.lower() in PICKLE_EXTENSIONS:
        raise LoraRefused(f"{PICKLE_MESSAGE} (got {path.name!r})")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise LoraRefused(f"not a valid safetensors file: duplicate key {key!r} in header")
        result[key] = value
    return result


def _validate_entry(name: str, entry: Any) -> tuple[int, int]:
    """Checks one tensor's header entry; returns its (begin, end) data offsets."""
    if not isinstance(entry, dict):
        raise LoraRefused(f"not a valid safetensors file: entry for tensor {name!r} is not an object")
    dtype = entry.get("dtype")
    shape = entry.get("shape")
    offsets = entry.get("data_offsets")
    if dtype not in _DTYPE_BITS:
        raise LoraRefused(f"unsupported tensor dtype {dtype!r} for tensor {name!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise LoraRefused(f"not a valid safetensors file: bad shape {shape!r} for tensor {name!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise LoraRefused(f"not a valid safetensors file: bad data_offsets {offsets!r} for tensor {name!r}")
    numel = 1
    for dim in shape:
        numel *= dim
    nbits = numel * _DTYPE_BITS[dtype]
    begin, end = offsets
    if nbits % 8 or nbits // 8 != end - begin:
        raise LoraRefused(
            f"not a valid safetensors file: tensor {name!r} has shape {shape} and dtype {dtype} "
            f"({nbits // 8} bytes) but its data_offsets span {end - begin} bytes"
        )
    return begin, end


def _validate_metadata(value: Any) -> None:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise LoraRefused("not a valid safetensors file: __metadata__ must map strings to strings")


def _read_header_from_handle(
    handle: Any, size: int, name: str, max_header_bytes: int
) -> tuple[dict[str, Any], int]:
    head = handle.read(8)
    sniffed = _sniff_refusal(head)
    if sniffed:
        raise LoraRefused(sniffed)
    if size < 8:
        raise LoraRefused(
            f"file is incomplete: a safetensors file has at least 8 bytes, found {size} ({name})"
        )
    (header_len,) = struct.unpack("<Q", head)
    if header_len < 2 or header_len > max_header_bytes:
        raise LoraRefused(
            f"not a safetensors file: header length {header_len} is implausible "
            f"(limit {max_header_bytes} bytes) ({name})"
        )
    data_start = 8 + header_len
    if data_start > size:
        raise LoraRefused(f"file is incomplete: expected at least {data_start} bytes, found {size} ({name})")
    raw = handle.read(header_len)
    if len(raw) != header_len:
        raise LoraRefused(f"file is incomplete: expected at least {data_start} bytes, found {8 + len(raw)}")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicate_keys)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise LoraRefused(f"not a safetensors file: header is not valid JSON ({exc}) ({name})") from exc
    if not isinstance(header, dict):
        raise LoraRefused(f"not a safetensors file: header is not a JSON object ({name})")

    spans: list[tuple[int, int, str]] = []
    for key, entry in header.items():
        if key == "__metadata__":
            _validate_metadata(entry)
            continue
        begin, end = _validate_entry(key, entry)
        spans.append((begin, end, key))
    spans.sort()
    expected = 0
    for begin, end, key in spans:
        if begin != expected:
            raise LoraRefused(
                f"not a valid safetensors file: data_offsets of tensor {key!r} are out of order, "
                f"overlapping or leave a gap (starts at {begin}, expected {expected})"
            )
        expected = end
    total = data_start + expected
    if size < total:
        raise LoraRefused(f"file is incomplete: expected {total} bytes, found {size}")
    if size > total:
        raise LoraRefused(f"file is corrupt: expected {total} bytes, found {size} (extra data at the end)")
    return header, data_start


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[tuple[BinaryIO, int]]:
    """(handle, size) of a regular file that is not a pickle by name; LoraRefused otherwise."""
    _refuse_pickle_name(path)
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            if not _is_regular(info.st_mode):
                raise LoraRefused(f"not a regular file: {path.name!r}")
            yield handle, info.st_size
    except IsADirectoryError as exc:
        raise LoraRefused(f"not a regular file: {path.name!r}") from exc


def read_safetensors_header(
    path: str | os.PathLike[str], max_header_bytes: int = MAX_HEADER_BYTES
) -> tuple[dict[str, Any], int]:
    """Parses and validates a safetensors header by hand (no torch, no pickle).

    Returns ``(header, data_start)``: the JSON header (tensor name -> {dtype, shape,
    data_offsets}, plus ``__metadata__`` when present) and the byte offset where tensor
    data begins. Raises :class:`LoraRefused` for pickles (by extension or content),
    malformed headers, and files that are truncated or padded.
    """
    path = Path(path)
    with _open_regular(path) as (handle, size):
        return _read_header_from_handle(handle, size, path.name, max_header_bytes)


def _is_regular(mode: int) -> bool:
    return stat.S_ISREG(mode)


# --------------------------------------------------------------------------- format detection


def _refuse_non_flux(keys: list[str]) -> None:
    sd_like = [k for k in keys if k.startswith(_SD_UNET_PREFIXES) and _SD_UNET_BLOCK.search(k)]
    sdxl_te2 = any(k.startswith(_SDXL_TE2_PREFIXES) for k in keys)
    if sd_like or sdxl_te2:
        family = "SDXL" if sdxl_te2 else "SD1.5/SDXL"
        example = (sd_like or [k for k in keys if k.startswith(_SDXL_TE2_PREFIXES)])[0]
        raise LoraRefused(f"not a FLUX LoRA (looks like {family}: keys such as {example!r})")
    if any("joint_blocks" in k for k in keys):
        example = next(k for k in keys if "joint_blocks" in k)
        raise LoraRefused(f"not a FLUX LoRA (looks like SD3: keys such as {example!r})")


def _has_transformer_lora(keys: list[str]) -> bool:
    return any(k.startswith("transformer.") and "lora" in k for k in keys)


def _is_unprefixed_flux_peft(key: str) -> bool:
    return key.split(".", 1)[0] in FLUX_TOP_LEVEL_MODULES and ("lora" in key or key.endswith(".alpha"))


def detect_format(keys: Iterable[str]) -> str:
    """Names the FLUX.1 LoRA layout of ``keys``, as diffusers 0.42.1 would convert it.

    Returns one of ``"diffusers"`` (PEFT ``lora_A``/``lora_B`` keys, with or without the
    ``transformer.`` prefix; ai-toolkit and diffusers training scripts write these),
    ``"kohya"`` (sd-scripts ``lora_unet_double_blocks_*``/``lora_unet_single_blocks_*``
    and ComfyUI ``diffusion_model.double_blocks.*`` with ``lora_down``/``lora_up``),
    ``"kohya-diffusers"`` (``lora_transformer_transformer_blocks_*``), ``"xlabs"`` or
    ``"fal-kontext"``. Raises :class:`LoraRefused` for anything diffusers cannot turn into
    FLUX.1 transformer LoRA weights: other architectures, LyCORIS LoKr/LoHa, BFL Control
    LoRAs, text-encoder-only LoRAs and files with no LoRA weights at all.
    """
    all_keys = [k for k in keys if k != "__metadata__"]
    if not all_keys:
        raise LoraRefused("no LoRA weights found: the file holds no tensors")
    keys_list = [k for k in all_keys if "dora_scale" not in k]
    if not keys_list:
        raise LoraRefused("no LoRA weights found: the file only holds DoRA scales")

    _refuse_non_flux(keys_list)

    lycoris = [k for k in keys_list if any(m in k for m in LYCORIS_MARKERS)]
    if lycoris:
        raise LoraRefused(
            "LyCORIS LoKr/LoHa adapters are not supported for FLUX.1 by diffusers "
            f"(keys such as {lycoris[0]!r}); use a plain LoRA"
        )

    if any(".lora_down.weight" in k for k in keys_list):
        return _detect_kohya_variant(keys_list)

    if any("processor" in k for k in keys_list):
        if any(_BFL_BLOCK.search(k) for k in keys_list):
            return FORMAT_XLABS
        if _has_transformer_lora(keys_list):
            # Old diffusers attention-processor keys (...attn.processor.to_q_lora.down.weight):
            # diffusers' XLabs converter leaves them untouched and PEFT conversion maps them.
            return FORMAT_DIFFUSERS
        raise LoraRefused(
            f"not a FLUX LoRA or an unknown LoRA layout (keys such as {keys_list[0]!r})"
        )

    if any("query_norm.scale" in k for k in keys_list):
        raise LoraRefused(
            "FLUX Control LoRAs (Canny/Depth) need a control image and change the model's input "
            "layer; they are not supported for text-to-image"
        )

    if any("base_model" in k for k in keys_list):
        return FORMAT_FAL_KONTEXT

    lora_keys = [k for k in keys_list if "lora" in k]
    if _has_transformer_lora(keys_list):
        return FORMAT_DIFFUSERS
    if any(_is_unprefixed_flux_peft(k) and "lora" in k for k in keys_list):
        return FORMAT_DIFFUSERS
    bfl = [k for k in lora_keys if _BFL_BLOCK.search(k)]
    if bfl:
        raise LoraRefused(
            "BFL-style keys with lora_A/lora_B (such as "
            f"{bfl[0]!r}) are not converted by diffusers for FLUX.1; "
            "re-save the LoRA in kohya or diffusers format"
        )
    if lora_keys and all(k.startswith(("text_encoder.", "text_encoder_2.", "lora_te")) for k in lora_keys):
        raise LoraRefused("no LoRA weights for the FLUX transformer: this LoRA only changes a text encoder")
    if lora_keys:
        raise LoraRefused(
            f"not a FLUX LoRA or an unknown LoRA layout (keys such as {lora_keys[0]!r})"
        )
    raise LoraRefused(
        f"no LoRA weights found (is this a full model checkpoint? keys such as {keys_list[0]!r})"
    )


def _detect_kohya_variant(keys: list[str]) -> str:
    # Mirrors the branches of diffusers' _convert_kohya_flux_lora_to_diffusers.
    if any(k.startswith("transformer.") for k in keys):
        return FORMAT_DIFFUSERS
    if any(
        k.startswith("lora_transformer_") and ("lora_down" in k or "lora_up" in k or "alpha" in k) for k in keys
    ):
        return FORMAT_KOHYA_DIFFUSERS
    # ComfyUI: diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight
    renamed = [k.replace("diffusion_model.", "lora_unet_") for k in keys]
    renamed = [k.replace("text_encoders.clip_l.transformer.", "lora_te_") for k in renamed]
    unet = [_dots_to_underscores(k) for k in renamed if k.startswith("lora_unet")]
    if any(_FLUX_KOHYA_UNET.match(k) for k in unet):
        return FORMAT_KOHYA
    if unet:
        raise LoraRefused(f"not a FLUX LoRA (unknown kohya keys such as {unet[0]!r})")
    if any(k.startswith(("lora_te_", "lora_te1_", "lora_te")) for k in renamed):
        raise LoraRefused("no LoRA weights for the FLUX transformer: this LoRA only changes a text encoder")
    raise LoraRefused(f"not a FLUX LoRA (unknown kohya-style keys such as {keys[0]!r})")


def _dots_to_underscores(key: str) -> str:
    stem = key.split(".lora_", 1)[0].split(".alpha", 1)[0]
    return stem.replace(".", "_")


def _rank_from_header(header: Mapping[str, Any]) -> int | None:
    ranks = []
    for key, entry in header.items():
        if key == "__metadata__" or not isinstance(entry, dict):
            continue
        shape = entry.get("shape") or []
        if key.endswith(_RANK_SUFFIXES) and len(shape) >= 2:
            ranks.append(shape[0])
    return max(ranks) if ranks else None


# --------------------------------------------------------------------------- trigger words


def _split_words(value: str) -> list[str]:
    text = value.strip()
    if text.startswith("[") or text.startswith('"'):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, str):
            text = parsed
        elif isinstance(parsed, list):
            return [item.strip() for item in parsed if isinstance(item, str)]
    return [part.strip() for part in re.split(r"[,\n]", text)]


def _top_frequency_tags(raw: str) -> list[str]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return []
    if not isinstance(data, dict):
        return []
    totals: dict[str, int] = {}
    for tags in data.values():
        if not isinstance(tags, dict):
            continue
        for tag, count in tags.items():
            if isinstance(tag, str) and isinstance(count, (int, float)) and not isinstance(count, bool):
                tag = tag.strip()
                if tag:
                    totals[tag] = totals.get(tag, 0) + int(count)
    ranked = sorted(totals.items(), key=lambda item: (-item[1], item[0]))
    return [tag for tag, _ in ranked[:_MAX_FREQUENCY_TAGS]]


def read_trigger_words(metadata: Mapping[str, str]) -> list[str]:
    """Trigger words from safetensors ``__metadata__``; explicit fields first, then the
    most frequent kohya training tags. At most :data:`MAX_TRIGGER_WORDS`, deduplicated."""
    candidates: list[str] = []
    for key in _TRIGGER_METADATA_KEYS:
        value = metadata.get(key)
        if isinstance(value, str) and value.strip():
            candidates.extend(_split_words(value))
    raw_tags = metadata.get(_TAG_FREQUENCY_KEY)
    if isinstance(raw_tags, str):
        candidates.extend(_top_frequency_tags(raw_tags))
    words: list[str] = []
    seen: set[str] = set()
    for word in candidates:
        word = " ".join(word.split())[:MAX_TRIGGER_WORD_CHARS]
        if word and word.lower() not in seen:
            seen.add(word.lower())
            words.append(word)
        if len(words) >= MAX_TRIGGER_WORDS:
            break
    return words


# --------------------------------------------------------------------------- inspection


def inspect_lora_file(path: str | os.PathLike[str], max_header_bytes: int = MAX_HEADER_BYTES) -> LoraInspection:
    """Verifies a LoRA file (header, completeness, pickle refusal, FLUX format) and
    describes it. Reads the file once for the header and once, streamed, for SHA-256;
    nothing is unpickled and no tensor is materialised. Raises :class:`LoraRefused`."""
    path = Path(path)
    with _open_regular(path) as (handle, size):
        header, _ = _read_header_from_handle(handle, size, path.name, max_header_bytes)
        tensor_keys = [k for k in header if k != "__metadata__"]
        fmt = detect_format(tensor_keys)
        handle.seek(0)
        digest = hashlib.sha256()
        hashed = 0
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
            hashed += len(chunk)
    if hashed != size:
        raise LoraRefused(f"file changed while it was read: expected {size} bytes, read {hashed}")

    metadata = dict(header.get("__metadata__") or {})
    inspection = LoraInspection(
        format=fmt,
        size_bytes=size,
        sha256=digest.hexdigest(),
        num_tensors=len(tensor_keys),
        rank=_rank_from_header(header),
        trigger_words=read_trigger_words(metadata),
        metadata=metadata,
    )
    logger.info(
        "inspected LoRA %s: format=%s rank=%s tensors=%d", path.name, fmt, inspection.rank, inspection.num_tensors
    )
    return inspection


# --------------------------------------------------------------------------- loading and fitting


def normalize_lora_keys(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``state_dict`` that ``FluxPipeline.load_lora_weights`` will actually load.

    Unprefixed PEFT keys (``transformer_blocks.0.attn.to_q.lora_A.weight``, as written by
    ``get_peft_model_state_dict``) are silently ignored by diffusers, which only loads
    ``transformer.``-prefixed keys into the transformer; they get the prefix here.
    Every other layout is returned unchanged (diffusers converts it itself).
    """
    result = dict(state_dict)
    keys = list(result)
    if any(".lora_down.weight" in k for k in keys) or any("processor" in k for k in keys):
        return result
    if any("base_model" in k or "query_norm.scale" in k for k in keys) or _has_transformer_lora(keys):
        return result
    if not any(_is_unprefixed_flux_peft(k) and "lora" in k for k in keys):
        return result
    return {
        (f"transformer.{k}" if k.split(".", 1)[0] in FLUX_TOP_LEVEL_MODULES else k): v for k, v in result.items()
    }


def load_lora_state_dict(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Validates ``path`` (:func:`read_safetensors_header` + :func:`detect_format`) and
    reads its tensors with safetensors (never pickle). Keys are normalised with
    :func:`normalize_lora_keys`, so the dict can go to ``pipe.load_lora_weights``."""
    from safetensors.torch import load_file

    header, _ = read_safetensors_header(path)
    detect_format(k for k in header if k != "__metadata__")
    return normalize_lora_keys(load_file(os.fspath(path), device="cpu"))


# Exceptions diffusers' converters raise on state dicts they cannot handle.
_MAX_DETAIL_CHARS = 300
_CONVERSION_ERRORS = (
    ValueError,
    KeyError,
    AssertionError,
    IndexError,
    RuntimeError,
    TypeError,
    NotImplementedError,
    AttributeError,
    ZeroDivisionError,
)


def _linear_features(module: Any) -> tuple[int, int] | None:
    # Unwrap PEFT LoRA layers when adapters are already loaded.
    seen = 0
    while hasattr(module, "base_layer") and seen < 8:
        module = module.base_layer
        seen += 1
    in_features = getattr(module, "in_features", None)
    out_features = getattr(module, "out_features", None)
    if isinstance(in_features, int) and isinstance(out_features, int):
        return in_features, out_features
    return None


def _shape_problems(transformer_sd: Mapping[str, Any], transformer: Any) -> list[str]:
    import torch

    modules = dict(transformer.named_modules())
    params: dict[str, Any] | None = None
    problems: list[str] = []
    ranks: dict[str, dict[str, int]] = {}
    for key in sorted(transformer_sd):
        value = transformer_sd[key]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        match = _LORA_WEIGHT_KEY.match(key)
        if match is None:
            if key.endswith(".lora_magnitude_vector") or ".lora_magnitude_vector." in key:
                module_name = key.split(".lora_magnitude_vector", 1)[0]
                features = _linear_features(modules[module_name]) if module_name in modules else None
                if features is None:
                    problems.append(f"it targets {module_name}, which this model does not have")
                elif shape is None or shape[-1] != features[1]:
                    problems.append(f"{module_name} expects out_features {features[1]}, LoRA has {shape}")
                continue
            if "lora" in key:
                problems.append(f"unexpected LoRA key {key}")
                continue
            # Non-LoRA weights (Control LoRA norms) replace model parameters directly.
            if params is None:
                params = {name: p.shape for name, p in transformer.named_parameters()}
            if key not in params:
                problems.append(f"it sets {key}, which this model does not have")
            elif shape != tuple(params[key]):
                problems.append(f"{key} expects shape {tuple(params[key])}, LoRA has {shape}")
            continue
        module_name, kind, param = match.group("module"), match.group("kind"), match.group("param")
        module = modules.get(module_name)
        if module is None:
            problems.append(f"it targets {module_name}, which this model does not have")
            continue
        features = _linear_features(module)
        if features is None:
            problems.append(f"it targets {module_name}, which is not a linear layer")
            continue
        in_features, out_features = features
        if shape is None:
            problems.append(f"{key} is not a tensor")
            continue
        if param == "bias":
            if kind == "lora_B" and shape != (out_features,):
                problems.append(f"{module_name} expects out_features {out_features}, LoRA bias has {shape}")
            continue
        if len(shape) != 2:
            problems.append(f"{key} has shape {shape}; a linear LoRA weight has 2 dimensions")
            continue
        if kind == "lora_A":
            ranks.setdefault(module_name, {})["A"] = shape[0]
            if shape[1] != in_features:
                problems.append(f"{module_name} expects in_features {in_features}, LoRA has {shape[1]}")
        else:
            ranks.setdefault(module_name, {})["B"] = shape[1]
            if shape[0] != out_features:
                problems.append(f"{module_name} expects out_features {out_features}, LoRA has {shape[0]}")
    for module_name, pair in sorted(ranks.items()):
        if "A" not in pair or "B" not in pair:
            problems.append(f"{module_name} has only one of lora_A/lora_B")
        elif pair["A"] != pair["B"]:
            problems.append(f"{module_name} has lora_A rank {pair['A']} but lora_B rank {pair['B']}")
    return problems


def check_fits(path_or_state_dict: str | os.PathLike[str] | Mapping[str, Any], transformer: Any) -> str | None:
    """``None`` when the LoRA's transformer weights fit ``transformer``, else a reason.

    The LoRA is converted with diffusers' own ``FluxPipeline.lora_state_dict`` (exactly
    what ``load_lora_weights`` does first) and every ``lora_A``/``lora_B`` is compared with
    the ``nn.Linear`` it targets: a missing module or different in/out features means it
    does not fit. Nothing is loaded into the model and the caller's dict is not modified.
    Layouts :func:`detect_format` refuses come back as reasons too; a path whose file is
    not a valid safetensors file (pickle, truncated, ...) raises :class:`LoraRefused`.
    Text-encoder weights in the LoRA are not checked.
    """
    from diffusers import FluxPipeline
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    if isinstance(path_or_state_dict, Mapping):
        raw_keys = list(path_or_state_dict)
    else:
        from safetensors.torch import load_file

        header, _ = read_safetensors_header(path_or_state_dict)
        raw_keys = [k for k in header if k != "__metadata__"]
    try:
        detect_format(raw_keys)
    except LoraRefused as exc:
        return str(exc)
    if isinstance(path_or_state_dict, Mapping):
        state_dict = normalize_lora_keys(path_or_state_dict)
    else:
        state_dict = normalize_lora_keys(load_file(os.fspath(path_or_state_dict), device="cpu"))

    try:
        converted, _alphas = FluxPipeline.lora_state_dict(state_dict, return_alphas=True)
    except _CONVERSION_ERRORS as exc:
        detail = " ".join(str(exc).split()) or "a shape assumption of its converter failed"
        if len(detail) > _MAX_DETAIL_CHARS:
            detail = detail[:_MAX_DETAIL_CHARS] + "..."
        logger.info("diffusers could not convert LoRA: %s: %s", type(exc).__name__, detail)
        return f"diffusers cannot convert this LoRA for this model ({type(exc).__name__}: {detail})"

    norm_keys = FluxPipeline._control_lora_supported_norm_keys
    if not any("lora" in k for k in converted) and not any(n in k for k in converted for n in norm_keys):
        return "diffusers cannot load this LoRA: no LoRA weights after conversion"
    transformer_sd = {
        k.removeprefix("transformer."): v for k, v in converted.items() if k.startswith("transformer.")
    }
    if not transformer_sd:
        return "LoRA does not fit this model: it has no weights for the transformer"
    if any(".lokr_" in k for k in transformer_sd):
        return "LoRA does not fit this model: LoKr adapters are not supported for FLUX.1"
    first_key = next(iter(transformer_sd))
    if "lora_A" not in first_key:
        transformer_sd = convert_unet_state_dict_to_peft(transformer_sd)

    problems = _shape_problems(transformer_sd, transformer)
    if not problems:
        return None
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    first = problems[0]
    if "expects" in first:
        return f"LoRA shapes do not fit this model: {first}{more}"
    return f"LoRA does not fit this model: {first}{more}"
