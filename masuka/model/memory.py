"""GPU memory profiles: where the pipeline's weights live while it runs.

Profiles (``--memory``):

* ``full``: every component on the GPU (on a CPU-only machine: everything on the CPU).
* ``offload``: model CPU offload; each component moves to the GPU while it runs.
* ``lowvram``: sequential CPU offload; weights stream to the GPU layer by layer (slow).
* ``quantized``: the transformer in NF4 (bitsandbytes) or a GGUF file, T5 in 8-bit
  (bitsandbytes) or kept as it is; on the GPU when it fits, else with model CPU offload.
* ``auto``: picked by :func:`choose_profile` BEFORE any weight is read, from the memory plan
  (:mod:`masuka.model.plan`): what each profile would put on the GPU and in RAM, while loading
  and while generating, against the detected GPU memory and system RAM. It has to be decided
  first because the profile decides how the weights are read: offloading parks every weight in
  RAM, which a Colab T4 runtime (12.7 GB) does not have for FLUX.1. When no profile is predicted
  to fit, auto stops and says why, instead of starting something that the GPU or the runtime's
  memory limit would kill.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masuka.model import plan
from masuka.model.plan import GB, GiB, ModelInfo, ModelSizes, gib

log = logging.getLogger(__name__)

__all__ = ["GB", "GiB", "ModelInfo", "ModelSizes", "gib"]

CUDA_PROFILES = ("offload", "lowvram", "quantized")
NOTHING_FITS_HINT = (
    "python app.py --plan shows every option with its figures (docs/memory-profiles.md); "
    "--memory offload or --memory quantized loads anyway, at the risk the prediction names"
)


@dataclass(frozen=True)
class MachineMemory:
    gpu_total: int  # bytes, 0 without CUDA
    ram_total: int  # bytes
    capability: tuple[int, int] = (0, 0)  # CUDA compute capability
    gpu_name: str = ""

    def gpu_spec(self) -> plan.GpuSpec | None:
        if not self.gpu_total:
            return None
        return plan.GpuSpec("this", self.gpu_name or "this GPU", self.gpu_total, self.capability, self.ram_total,
                            "detected")


@dataclass(frozen=True)
class ProfileChoice:
    profile: str
    reason: str
    error: str | None = None  # set when nothing is predicted to work here: load_pipeline raises it
    plan: plan.Plan | None = None  # the plan behind auto's choice


def detect_memory(device: Any) -> MachineMemory:
    import psutil
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        return MachineMemory(props.total_memory, psutil.virtual_memory().total, (props.major, props.minor), props.name)
    return MachineMemory(gpu_total=0, ram_total=psutil.virtual_memory().total)


def bitsandbytes_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def gguf_available() -> bool:
    return importlib.util.find_spec("gguf") is not None


def choose_profile(model: ModelInfo, mem: MachineMemory, *, dtype: Any = None, bnb: bool,
                   gguf: bool | None = None, fp8: bool = False) -> ProfileChoice:
    """auto: the first profile the memory plan predicts to fit, with why (or an error saying what does not).

    ``dtype``: the compute dtype (default: what --dtype auto picks on that GPU); ``bnb`` / ``gguf``:
    whether bitsandbytes / gguf are installed (NF4 and 8-bit / GGUF files need them).
    """
    gguf = gguf_available() if gguf is None else gguf
    chosen, why, options = plan.choose(model, mem.gpu_spec(), mem.ram_total, dtype=dtype, bnb=bnb, gguf=gguf,
                                       fp8=fp8)
    if chosen is not None:
        return ProfileChoice(chosen.profile, why, plan=chosen)
    tried = "; ".join(f"{p.describe()}: {why_not or p.verdict()}" for p, why_not in options)
    msg = f"{why}. Tried: {tried}. {NOTHING_FITS_HINT}"
    return ProfileChoice("quantized", msg, error=msg)


# ---- sizes before loading ------------------------------------------------

def folder_model(folder: Path) -> ModelInfo:
    """A local diffusers folder as the plan sees it (configs and file sizes; no weight is read)."""
    return plan.folder_model(Path(folder), folder_sizes(folder))


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


def pipeline_model(pipe: Any) -> ModelInfo:
    """What the plan needs to know of a pipeline built elsewhere: its parts' bytes and widths."""
    import torch

    transformer = module_bytes(pipe.transformer)
    t5 = module_bytes(pipe.text_encoder_2) if isinstance(getattr(pipe, "text_encoder_2", None), torch.nn.Module) else 0
    sizes = ModelSizes(transformer, t5, pipeline_bytes(pipe) - transformer - t5)
    config = getattr(pipe.transformer, "config", None)
    hidden = int(getattr(config, "num_attention_heads", 24) * getattr(config, "attention_head_dim", 128))
    channels = list(getattr(getattr(getattr(pipe, "vae", None), "config", None), "block_out_channels", [128, 256]))
    return ModelInfo("the loaded pipeline", None, "dense", sizes=sizes, hidden=hidden,
                     vae_channels=int(channels[1] if len(channels) > 1 else channels[0]))


def _pipeline_dtype(pipe: Any) -> str:
    try:
        return plan.dtype_name(pipe.transformer.dtype)
    except (AttributeError, ValueError):
        return "bf16"


def apply_memory_profile(pipe: Any, profile: str, device: Any, reason: str = "asked for",
                         placement: str | None = None) -> tuple[str, str]:
    """Place the loaded pipeline's weights as ``profile`` says; returns (profile, why).

    ``placement``: for ``quantized``, where auto's plan put the weights (``gpu`` / ``model offload``);
    without it the loaded bytes and the plan's working memory decide.
    """
    import torch

    on_cuda = getattr(device, "type", str(device)) == "cuda"
    if profile == "auto":
        # Normally decided before loading (loading.load_pipeline); this handles a pipeline built elsewhere.
        choice = choose_profile(pipeline_model(pipe), detect_memory(device), dtype=_pipeline_dtype(pipe),
                                bnb=bitsandbytes_available())
        if choice.error:
            raise ValueError(choice.error)
        profile, reason = choice.profile, choice.reason
        placement = choice.plan.placement if choice.plan else None
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
        weights = pipeline_bytes(pipe)
        need = weights + plan.working_bytes(pipeline_model(pipe), _pipeline_dtype(pipe)) + plan.CUDA_CONTEXT
        total = torch.cuda.get_device_properties(device).total_memory
        if placement == "gpu" or (placement is None and need <= total):
            pipe.to(device)
            reason += f"; all {gib(weights)} of weights on the GPU"
        else:
            pipe.enable_model_cpu_offload(device=device)
            reason += f"; {gib(weights)} of weights + working memory exceed {gib(total)}: model CPU offload"
    else:
        raise ValueError(f"unknown memory profile {profile!r}")
    if on_cuda:
        torch.cuda.empty_cache()
    return profile, reason
