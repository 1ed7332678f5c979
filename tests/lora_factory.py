"""Builders of LoRA files (and broken files) for tests.

Every builder writes one file and returns its ``Path``. Builders that take a
``transformer`` derive every shape from its ``nn.Linear`` modules, so the file fits that
model; ``make_big_real_flux_lora`` uses real FLUX.1 shapes (hidden size 3072) and fits no
tiny model. Nothing here is used by the application.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TINY_FLUX_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 1,
    "num_single_layers": 1,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "pooled_projection_dim": 32,
    "axes_dims_rope": [4, 6, 6],
    "guidance_embeds": True,
}

DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")

# Real FLUX.1 [dev]/[schnell] sizes.
FLUX_HIDDEN = 3072
FLUX_MLP_HIDDEN = 12288


def make_tiny_transformer(seed: int = 0) -> Any:
    """A tiny random ``FluxTransformer2DModel`` in eval mode (same config as masuka.model.tiny)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TINY_FLUX_CONFIG).eval()


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _pair(gen: torch.Generator, in_features: int, out_features: int, rank: int, scale: float, dtype: torch.dtype):
    """(down/A, up/B) with a non-zero B, so the LoRA visibly changes outputs."""
    down = torch.randn(rank, in_features, generator=gen) / math.sqrt(in_features)
    up = torch.randn(out_features, rank, generator=gen) * (scale / math.sqrt(rank))
    return down.to(dtype).contiguous(), up.to(dtype).contiguous()


def _metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    result = {"format": "pt"}
    if metadata:
        result.update({str(k): str(v) for k, v in metadata.items()})
    return result


def write_safetensors(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> Path:
    """Saves ``tensors`` with safetensors (plus ``metadata`` in ``__metadata__``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=_metadata(metadata))
    return path


def write_raw_safetensors(
    path: str | Path, header: Any, data: bytes = b"", *, header_len: int | None = None, raw_header: bytes | None = None
) -> Path:
    """Writes a hand-made (possibly invalid) safetensors file: 8-byte length, header, data."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = raw_header if raw_header is not None else json.dumps(header).encode("utf-8")
    length = len(body) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", length) + body + data)
    return path


def _linear_modules(transformer: Any) -> dict[str, torch.nn.Linear]:
    return {name: m for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}


def _matches(name: str, targets: Iterable[str]) -> bool:
    # PEFT's rule for a list of target modules: exact name or a ".target" suffix.
    return any(name == t or name.endswith("." + t) for t in targets)


def make_peft_lora(
    transformer: Any,
    path: str | Path,
    *,
    rank: int = 4,
    seed: int = 0,
    targets: Iterable[str] = DEFAULT_TARGETS,
    scale_init: float = 1.0,
    prefix: str = "transformer.",
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """A diffusers-format FLUX LoRA (``transformer.<module>.lora_A/lora_B.weight``) for every
    ``nn.Linear`` of ``transformer`` matched by ``targets``, with a non-zero ``lora_B``.
    ``prefix=""`` writes the raw PEFT layout (``get_peft_model_state_dict`` keys)."""
    targets = tuple(targets)
    gen = _generator(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, module in sorted(_linear_modules(transformer).items()):
        if not _matches(name, targets):
            continue
        down, up = _pair(gen, module.in_features, module.out_features, rank, scale_init, dtype)
        tensors[f"{prefix}{name}.lora_A.weight"] = down
        tensors[f"{prefix}{name}.lora_B.weight"] = up
    if not tensors:
        raise ValueError(f"no linear module of the transformer matches targets {targets!r}")
    return write_safetensors(path, tensors, metadata)


def _kohya_layers(transformer: Any) -> list[tuple[str, int, int]]:
    """(kohya name, in_features, out_features) for a FLUX transformer, in BFL naming."""
    modules = _linear_modules(transformer)
    layers: list[tuple[str, int, int]] = []

    def add(kohya: str, *diffusers_names: str) -> None:
        found = [modules[n] for n in diffusers_names]
        in_features = found[0].in_features
        out_features = sum(m.out_features for m in found)
        layers.append((kohya, in_features, out_features))

    for i in range(len(transformer.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        k = f"lora_unet_double_blocks_{i}"
        add(f"{k}_img_attn_qkv", f"{b}.attn.to_q", f"{b}.attn.to_k", f"{b}.attn.to_v")
        add(f"{k}_img_attn_proj", f"{b}.attn.to_out.0")
        add(f"{k}_img_mlp_0", f"{b}.ff.net.0.proj")
        add(f"{k}_img_mlp_2", f"{b}.ff.net.2")
        add(f"{k}_img_mod_lin", f"{b}.norm1.linear")
        add(f"{k}_txt_attn_qkv", f"{b}.attn.add_q_proj", f"{b}.attn.add_k_proj", f"{b}.attn.add_v_proj")
        add(f"{k}_txt_attn_proj", f"{b}.attn.to_add_out")
        add(f"{k}_txt_mlp_0", f"{b}.ff_context.net.0.proj")
        add(f"{k}_txt_mlp_2", f"{b}.ff_context.net.2")
        add(f"{k}_txt_mod_lin", f"{b}.norm1_context.linear")
    for i in range(len(transformer.single_transformer_blocks)):
        b = f"single_transformer_blocks.{i}"
        k = f"lora_unet_single_blocks_{i}"
        # linear1 (fused q/k/v/mlp) is left out on purpose: diffusers' kohya converter
        # hard-codes dims [3072, 3072, 3072, 12288] for it, so it only fits real FLUX.1.
        add(f"{k}_linear2", f"{b}.proj_out")
        add(f"{k}_modulation_lin", f"{b}.norm.linear")
    return layers


def make_kohya_lora(
    transformer: Any,
    path: str | Path,
    rank: int = 4,
    seed: int = 0,
    *,
    alpha: float | None = None,
    scale_init: float = 1.0,
    comfyui: bool = False,
    dtype: torch.dtype = torch.float32,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """A kohya/sd-scripts FLUX LoRA (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``,
    ``.lora_up.weight``, ``.alpha``) whose shapes fit ``transformer``; diffusers converts
    and loads it. ``comfyui=True`` writes ComfyUI keys (``diffusion_model.double_blocks.0.
    img_attn.qkv.lora_down.weight``) instead. ``alpha`` defaults to ``rank / 2``."""
    gen = _generator(seed)
    alpha_value = float(rank) / 2 if alpha is None else float(alpha)
    tensors: dict[str, torch.Tensor] = {}
    for name, in_features, out_features in _kohya_layers(transformer):
        down, up = _pair(gen, in_features, out_features, rank, scale_init, dtype)
        if comfyui:
            name = _comfyui_name(name)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(alpha_value, dtype=dtype)
    meta = {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank), "ss_network_alpha": str(alpha_value)}
    meta.update(metadata or {})
    return write_safetensors(path, tensors, meta)


def _comfyui_name(kohya_name: str) -> str:
    # lora_unet_double_blocks_0_img_attn_qkv -> diffusion_model.double_blocks.0.img_attn.qkv
    match = re.fullmatch(r"lora_unet_(double_blocks|single_blocks)_(\d+)_(.+)", kohya_name)
    if match is None:
        raise ValueError(f"cannot write {kohya_name!r} in ComfyUI naming")
    kind, index, tail = match.groups()
    for old, new in (("_attn_", "_attn."), ("_mlp_", "_mlp."), ("_mod_lin", "_mod.lin"), ("modulation_lin", "modulation.lin")):
        tail = tail.replace(old, new)
    return f"diffusion_model.{kind}.{index}.{tail}"


def make_xlabs_lora(
    transformer: Any, path: str | Path, rank: int = 4, seed: int = 0, *, scale_init: float = 1.0
) -> Path:
    """An XLabs-style FLUX LoRA (``double_blocks.0.processor.qkv_lora1.down.weight`` ...)."""
    gen = _generator(seed)
    modules = _linear_modules(transformer)
    tensors: dict[str, torch.Tensor] = {}
    for i in range(len(transformer.transformer_blocks)):
        b = f"transformer_blocks.{i}"
        dim = modules[f"{b}.attn.to_q"].in_features
        for name, out_features in (
            ("qkv_lora1", 3 * modules[f"{b}.attn.to_q"].out_features),
            ("proj_lora1", modules[f"{b}.attn.to_out.0"].out_features),
            ("qkv_lora2", 3 * modules[f"{b}.attn.add_q_proj"].out_features),
            ("proj_lora2", modules[f"{b}.attn.to_add_out"].out_features),
        ):
            down, up = _pair(gen, dim, out_features, rank, scale_init, torch.float32)
            tensors[f"double_blocks.{i}.processor.{name}.down.weight"] = down
            tensors[f"double_blocks.{i}.processor.{name}.up.weight"] = up
    return write_safetensors(path, tensors)


def make_big_real_flux_lora(path: str | Path, rank: int = 4, seed: int = 0) -> Path:
    """A diffusers-format LoRA with REAL FLUX.1 shapes (hidden size 3072) for a few layers
    of block 0 only, so it is small on disk; it does not fit a tiny transformer."""
    gen = _generator(seed)
    tensors: dict[str, torch.Tensor] = {}
    layers = [
        ("transformer.transformer_blocks.0.attn.to_q", FLUX_HIDDEN, FLUX_HIDDEN),
        ("transformer.transformer_blocks.0.attn.to_k", FLUX_HIDDEN, FLUX_HIDDEN),
        ("transformer.transformer_blocks.0.attn.to_v", FLUX_HIDDEN, FLUX_HIDDEN),
        ("transformer.single_transformer_blocks.0.proj_out", FLUX_HIDDEN + FLUX_MLP_HIDDEN, FLUX_HIDDEN),
    ]
    for name, in_features, out_features in layers:
        down, up = _pair(gen, in_features, out_features, rank, 1.0, torch.float16)
        tensors[f"{name}.lora_A.weight"] = down
        tensors[f"{name}.lora_B.weight"] = up
    return write_safetensors(path, tensors)


def make_sdxl_lora(path: str | Path, rank: int = 4, seed: int = 0, *, style: str = "kohya") -> Path:
    """An SDXL LoRA: ``style="kohya"`` (``lora_unet_down_blocks_...``, ``lora_te1_``/``lora_te2_``)
    or ``style="diffusers"`` (``unet.down_blocks...lora_A.weight``)."""
    gen = _generator(seed)
    tensors: dict[str, torch.Tensor] = {}
    if style == "kohya":
        for name, dim in (
            ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 640),
            ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", 1280),
            ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 768),
            ("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280),
        ):
            down, up = _pair(gen, dim, dim, rank, 1.0, torch.float16)
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    elif style == "diffusers":
        for name, dim in (
            ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640),
            ("unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", 1280),
        ):
            down, up = _pair(gen, dim, dim, rank, 1.0, torch.float16)
            tensors[f"{name}.lora_A.weight"] = down
            tensors[f"{name}.lora_B.weight"] = up
    else:
        raise ValueError(f"unknown SDXL LoRA style {style!r}")
    return write_safetensors(path, tensors, {"ss_base_model_version": "sdxl_base_v1-0"})


def make_sd15_lora(path: str | Path, rank: int = 4, seed: int = 0) -> Path:
    """A kohya SD1.5 LoRA (``lora_unet_down_blocks_...`` and ``lora_te_text_model_...``)."""
    gen = _generator(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, dim in (
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 320),
        ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 768),
    ):
        down, up = _pair(gen, dim, dim, rank, 1.0, torch.float16)
        tensors[f"{name}.lora_down.weight"] = down
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = torch.tensor(float(rank), dtype=torch.float16)
    return write_safetensors(path, tensors)


def make_full_checkpoint(path: str | Path, transformer: Any | None = None) -> Path:
    """A safetensors file with model weights and no LoRA keys (a "full checkpoint")."""
    if transformer is not None:
        tensors = {k: v.detach().clone() for k, v in transformer.state_dict().items()}
    else:
        gen = _generator(0)
        tensors = {
            "double_blocks.0.img_attn.qkv.weight": torch.randn(96, 32, generator=gen),
            "double_blocks.0.img_attn.qkv.bias": torch.randn(96, generator=gen),
            "img_in.weight": torch.randn(32, 64, generator=gen),
        }
    return write_safetensors(path, tensors)


def make_lokr_lora(path: str | Path) -> Path:
    """A LyCORIS LoKr FLUX file (``lora_unet_double_blocks_0_img_attn_qkv.lokr_w1``)."""
    gen = _generator(0)
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    tensors = {
        f"{name}.lokr_w1": torch.randn(4, 4, generator=gen),
        f"{name}.lokr_w2": torch.randn(24, 8, generator=gen),
        f"{name}.alpha": torch.tensor(1.0),
    }
    return write_safetensors(path, tensors)


def make_truncated(path_in: str | Path, path_out: str | Path, cut_bytes: int) -> Path:
    """A copy of ``path_in`` without its last ``cut_bytes`` bytes (an interrupted download)."""
    data = Path(path_in).read_bytes()
    if not 0 < cut_bytes <= len(data):
        raise ValueError(f"cut_bytes must be in 1..{len(data)}, got {cut_bytes}")
    path_out = Path(path_out)
    path_out.parent.mkdir(parents=True, exist_ok=True)
    path_out.write_bytes(data[: len(data) - cut_bytes])
    return path_out


def make_padded(path_in: str | Path, path_out: str | Path, extra_bytes: int) -> Path:
    """A copy of ``path_in`` with ``extra_bytes`` zero bytes appended."""
    path_out = Path(path_out)
    path_out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(path_in, path_out)
    with path_out.open("ab") as handle:
        handle.write(b"\0" * extra_bytes)
    return path_out


def make_pickle(path: str | Path, *, legacy: bool = False) -> Path:
    """A ``torch.save`` pickle of a kohya-like dict. ``legacy=True`` writes the old
    non-zip format (starts with pickle protocol bytes); the default is the zip format.
    Tests write it; the code under test must never load it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.zeros(4, 32),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.zeros(96, 4),
    }
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return path
