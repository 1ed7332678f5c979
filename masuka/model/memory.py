"""GPU memory profiles: where the pipeline's weights live while it runs.

Profiles (``--memory``):

* ``full``: every component on the GPU (on a CPU-only machine: everything on the CPU).
* ``offload``: model CPU offload; each component moves to the GPU while it runs.
* ``lowvram``: sequential CPU offload; weights stream to the GPU layer by layer (slow).
* ``quantized``: the transformer in NF4 (bitsandbytes) or a GGUF file, T5 in 8-bit
  (bitsandbytes) or offloaded; on the GPU when it fits, else with model CPU offload.
* ``auto``: picked by :func:`choose_profile` BEFORE any weight is read, from the detected
  GPU memory and system RAM and the size of the model as it will be loaded. It has to be
  decided first: quantizing or offloading on the fly reads the full bf16 weights (~33 GB
  for FLUX.1) through system RAM, which a Colab T4 (12.7 GB of RAM) does not have.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

GiB = 1024**3
GB = 10**9

# Beyond the weights: activations at 1024x1024, the VAE decode and the CUDA context.
GPU_HEADROOM = 4 * GiB
# With model offload only the largest component (the transformer) must fit at once.
OFFLOAD_HEADROOM = 3 * GiB
# RAM the OS, Python and the app need besides the weights that pass through it.
RAM_MARGIN = 2 * GiB

# FLUX.1 [dev]/[schnell] in bf16, from the checkpoints' parameter counts.
FLUX_TRANSFORMER_BYTES = 11_901_408_320 * 2  # 23.8 GB
FLUX_T5_BYTES = 4_762_310_656 * 2  # 9.5 GB (T5-XXL encoder)
FLUX_CLIP_BYTES = 123_060_480 * 2  # 0.25 GB
FLUX_VAE_BYTES = 83_819_683 * 2  # 0.17 GB
# Quantized sizes relative to bf16: NF4 transformer 6.7 GB (diffusers/FLUX.1-dev-bnb-4bit),
# T5 in LLM.int8 about one byte per parameter.
NF4_FRACTION = 6.7e9 / FLUX_TRANSFORMER_BYTES
INT8_FRACTION = 0.52

# Pre-quantized checkpoints that run where the bf16 weights cannot be read (Colab T4).
PREQUANTIZED_HINT = (
    "use a pre-quantized checkpoint: --model diffusers/FLUX.1-dev-bnb-4bit --memory quantized "
    "(NF4, needs bitsandbytes), or a GGUF transformer such as --model "
    "https://huggingface.co/city96/FLUX.1-dev-gguf/blob/main/flux1-dev-Q4_K_S.gguf --memory quantized "
    "(needs gguf; schnell: city96/FLUX.1-schnell-gguf). Install both with pip install -r requirements-gpu.txt"
)
CUDA_PROFILES = ("offload", "lowvram", "quantized")


@dataclass(frozen=True)
class MachineMemory:
    gpu_total: int  # bytes, 0 without CUDA
    ram_total: int  # bytes


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each part as it will be loaded (bf16 unless the checkpoint is pre-quantized)."""

    transformer: int
    text_encoder_2: int
    other: int  # CLIP text encoder + VAE
    prequantized: bool = False  # transformer stored quantized (NF4 repository or GGUF file)

    @property
    def total(self) -> int:
        return self.transformer + self.text_encoder_2 + self.other


FLUX_SIZES = ModelSizes(FLUX_TRANSFORMER_BYTES, FLUX_T5_BYTES, FLUX_CLIP_BYTES + FLUX_VAE_BYTES)


@dataclass(frozen=True)
class ProfileChoice:
    profile: str
    reason: str
    error: str | None = None  # set when nothing can work here: load_pipeline raises it


def gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def detect_memory(device: Any) -> MachineMemory:
    import psutil
    import torch

    gpu = 0
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(device).total_memory
    return MachineMemory(gpu_total=gpu, ram_total=psutil.virtual_memory().total)


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def gguf_available() -> bool:
    return importlib.util.find_spec("gguf") is not None


def quantized_sizes(sizes: ModelSizes, *, t5_8bit: bool) -> ModelSizes:
    """What the quantized profile puts on the GPU."""
    transformer = sizes.transformer if sizes.prequantized else int(sizes.transformer * NF4_FRACTION)
    t5 = int(sizes.text_encoder_2 * INT8_FRACTION) if t5_8bit else sizes.text_encoder_2
    return ModelSizes(transformer, t5, sizes.other, prequantized=True)


def choose_profile(sizes: ModelSizes, mem: MachineMemory, *, bnb: bool) -> ProfileChoice:
    """Pick a profile before loading; returns the profile and why (or an error saying what to do).

    ``bnb``: whether bitsandbytes is installed (NF4 / 8-bit need it).
    """
    if mem.gpu_total == 0:
        return ProfileChoice("full", "no CUDA GPU: everything runs on the CPU")
    gpu, ram = mem.gpu_total, mem.ram_total
    where = f"{gib(gpu)} of GPU memory and {gib(ram)} of RAM"
    if sizes.prequantized:
        q = quantized_sizes(sizes, t5_8bit=bnb)
        t5 = "T5 in 8-bit" if bnb else "T5 in bf16 (install bitsandbytes for 8-bit)"
        if q.total + GPU_HEADROOM <= gpu:
            return ProfileChoice("quantized", f"pre-quantized transformer ({gib(q.transformer)}) and {t5}: "
                                 f"{gib(q.total)} + ~4 GiB working memory fit in {where}")
        return ProfileChoice("quantized", f"pre-quantized transformer ({gib(q.transformer)}) and {t5}: "
                             f"{gib(q.total)} does not fit next to ~4 GiB working memory in {where}, "
                             "so with model CPU offload")
    if sizes.total + GPU_HEADROOM <= gpu:
        # Loaded straight onto the GPU (device_map), so RAM does not limit this one.
        return ProfileChoice("full", f"weights {gib(sizes.total)} + ~4 GiB working memory fit in {where}")
    if sizes.total + RAM_MARGIN > ram:
        msg = (
            f"this machine has {where}: the model's bf16 weights ({gib(sizes.total)}) fit neither on the GPU "
            f"nor through RAM, so they cannot be offloaded or quantized on the fly here; {PREQUANTIZED_HINT}"
        )
        return ProfileChoice("quantized", msg, error=msg)
    if sizes.transformer + OFFLOAD_HEADROOM <= gpu:
        return ProfileChoice("offload", f"weights {gib(sizes.total)} do not fit in {where}, but the largest "
                             f"part ({gib(sizes.transformer)}) does: model CPU offload")
    if bnb:
        q = quantized_sizes(sizes, t5_8bit=True)
        return ProfileChoice("quantized", f"even the transformer ({gib(sizes.transformer)}) does not fit in "
                             f"{where}: NF4 transformer + 8-bit T5 ({gib(q.total)}), quantized while loading")
    return ProfileChoice("lowvram", f"even the transformer ({gib(sizes.transformer)}) does not fit in {where} "
                         "and bitsandbytes is not installed: sequential offload (slow; pip install -r "
                         "requirements-gpu.txt and --memory quantized is much faster)")


# ---- sizes before loading ------------------------------------------------

def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0


def folder_sizes(folder: Path) -> ModelSizes:
    """Sizes of a local diffusers folder, read from its files (no weight is loaded)."""
    folder = Path(folder)
    prequantized = False
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text(encoding="utf-8"))
        prequantized = "quantization_config" in config
    except (OSError, ValueError):
        pass
    return ModelSizes(
        transformer=_folder_bytes(folder / "transformer"),
        text_encoder_2=_folder_bytes(folder / "text_encoder_2"),
        other=_folder_bytes(folder / "text_encoder") + _folder_bytes(folder / "vae"),
        prequantized=prequantized,
    )


def hub_sizes(repo_id: str) -> ModelSizes:
    """FLUX.1 sizes; repositories named as quantized hold a pre-quantized transformer."""
    name = repo_id.lower()
    if any(tag in name for tag in ("bnb-4bit", "nf4", "4bit")):
        # T5 as bf16: the quantized profile puts it in 8-bit (or offloads it) in any case.
        return ModelSizes(int(6.7 * GB), FLUX_T5_BYTES, FLUX_SIZES.other, prequantized=True)
    return FLUX_SIZES


def single_file_sizes(transformer_bytes: int, gguf: bool, base: ModelSizes = FLUX_SIZES) -> ModelSizes:
    return ModelSizes(transformer_bytes, base.text_encoder_2, base.other, prequantized=gguf)


# ---- loading-time quantization -------------------------------------------

def require_bitsandbytes(what: str) -> None:
    if not bitsandbytes_available():
        raise ValueError(
            f"{what} needs bitsandbytes, which is not installed: pip install -r requirements-gpu.txt "
            "(or choose --memory offload / lowvram)"
        )


def transformer_nf4_config(dtype: Any):
    from diffusers import BitsAndBytesConfig

    require_bitsandbytes("--memory quantized (NF4 transformer)")
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)


def pipeline_quantization(dtype: Any, *, transformer: bool, t5: bool):
    """A PipelineQuantizationConfig: NF4 transformer and/or 8-bit T5 (None when neither)."""
    if not transformer and not t5:
        return None
    from diffusers import PipelineQuantizationConfig

    mapping: dict[str, Any] = {}
    if transformer:
        mapping["transformer"] = transformer_nf4_config(dtype)
    if t5:
        from transformers import BitsAndBytesConfig as TransformersBnb

        require_bitsandbytes("--memory quantized (8-bit T5)")
        mapping["text_encoder_2"] = TransformersBnb(load_in_8bit=True)
    return PipelineQuantizationConfig(quant_mapping=mapping)


# ---- after loading ---------------------------------------------------------

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2")


def module_bytes(module: Any) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def pipeline_bytes(pipe: Any) -> int:
    import torch

    total = 0
    for name in COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            total += module_bytes(module)
    return total


def apply_memory_profile(pipe: Any, profile: str, device: Any, reason: str = "asked for") -> tuple[str, str]:
    """Place the loaded pipeline's weights as ``profile`` says; returns (profile, why)."""
    import torch

    on_cuda = getattr(device, "type", str(device)) == "cuda"
    if profile == "auto":
        # Normally decided before loading (models.load_pipeline); this handles a pipeline built elsewhere.
        transformer = module_bytes(pipe.transformer)
        t5 = module_bytes(pipe.text_encoder_2) if isinstance(getattr(pipe, "text_encoder_2", None), torch.nn.Module) else 0
        sizes = ModelSizes(transformer, t5, pipeline_bytes(pipe) - transformer - t5)
        choice = choose_profile(sizes, detect_memory(device), bnb=bitsandbytes_available())
        if choice.error:
            raise ValueError(choice.error)
        profile, reason = choice.profile, choice.reason
    if profile in CUDA_PROFILES and not on_cuda:
        raise ValueError(
            f"memory profile {profile!r} needs a CUDA GPU; this machine runs on {device}. "
            "Use --memory full (or auto) on the CPU"
        )
    if profile == "full":
        pipe.to(device)
    elif profile == "offload":
        pipe.enable_model_cpu_offload(device=device)
    elif profile == "lowvram":
        pipe.enable_sequential_cpu_offload(device=device)
    elif profile == "quantized":
        need = pipeline_bytes(pipe)
        total = torch.cuda.get_device_properties(device).total_memory
        if need + GPU_HEADROOM <= total:
            pipe.to(device)
            reason += f"; all {gib(need)} on the GPU"
        else:
            pipe.enable_model_cpu_offload(device=device)
            reason += f"; {gib(need)} + working memory exceed {gib(total)}: model CPU offload"
    else:
        raise ValueError(f"unknown memory profile {profile!r}")
    if on_cuda:
        torch.cuda.empty_cache()
    return profile, reason
