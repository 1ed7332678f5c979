"""GPU memory profiles: where the pipeline's weights live while it runs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

GiB = 1024**3


@dataclass(frozen=True)
class MachineMemory:
    gpu_total: int  # bytes, 0 without CUDA
    ram_total: int  # bytes


def detect_memory(device: Any) -> MachineMemory:
    import psutil
    import torch

    gpu = 0
    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(device).total_memory
    return MachineMemory(gpu_total=gpu, ram_total=psutil.virtual_memory().total)


def pipeline_bytes(pipe: Any) -> int:
    import torch

    total = 0
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            total += sum(p.numel() * p.element_size() for p in module.parameters())
    return total


def choose_profile(model_bytes: int, transformer_bytes: int, mem: MachineMemory) -> tuple[str, str]:
    """Pick a profile from measured sizes; returns (profile, why)."""
    if mem.gpu_total == 0:
        return "full", "no CUDA GPU: everything runs on the CPU"
    gpu_gb, need_gb = mem.gpu_total / GiB, model_bytes / GiB
    # Activations at 1024x1024 plus the CUDA context need a few GB beyond the weights.
    if model_bytes + 4 * GiB <= mem.gpu_total:
        return "full", f"weights {need_gb:.1f} GB + ~4 GB working memory fit in {gpu_gb:.1f} GB of GPU memory"
    if transformer_bytes + 3 * GiB <= mem.gpu_total:
        return "offload", (
            f"weights {need_gb:.1f} GB do not fit in {gpu_gb:.1f} GB, but the largest part "
            f"({transformer_bytes / GiB:.1f} GB) does: model CPU offload"
        )
    return "lowvram", (
        f"the transformer alone ({transformer_bytes / GiB:.1f} GB) does not fit in {gpu_gb:.1f} GB: "
        "sequential offload (slow); a pre-quantized checkpoint is faster"
    )


def apply_memory_profile(pipe: Any, profile: str, device: Any) -> tuple[str, str]:
    import torch

    on_cuda = getattr(device, "type", str(device)) == "cuda"
    reason = "asked for"
    if profile == "auto":
        transformer = sum(p.numel() * p.element_size() for p in pipe.transformer.parameters())
        profile, reason = choose_profile(pipeline_bytes(pipe), transformer, detect_memory(device))
    if profile == "quantized":
        # Quantization happens while loading (see models.load_pipeline); here it runs like full.
        profile = "full"
    if profile in ("offload", "lowvram") and not on_cuda:
        raise ValueError(f"memory profile {profile!r} needs a CUDA GPU; this machine runs on {device}")
    if profile == "full":
        pipe.to(device)
    elif profile == "offload":
        pipe.enable_model_cpu_offload(device=device)
    elif profile == "lowvram":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"unknown memory profile {profile!r}")
    if on_cuda:
        torch.cuda.empty_cache()
    return profile, reason
