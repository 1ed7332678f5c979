"""`--fp8`: the transformer's linear weights stored in float8 (torchao, weight-only).

float8 matmuls need compute capability 8.9+ (Ada: L4; Hopper: H100). Everything here is
checked at start, before any weight is read. The quantization itself runs only on such a
GPU with torchao installed; it has not been run in this project's CI (no GPU there).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

log = logging.getLogger(__name__)

MIN_CAPABILITY = (8, 9)
# What people run this on, for the messages (compute capability -> a GPU of it).
KNOWN_GPUS = {(7, 5): "T4", (8, 0): "A100", (8, 6): "A10/RTX 30xx", (8, 9): "L4", (9, 0): "H100"}


def _capability(device: Any) -> tuple[int, int] | None:
    """The CUDA compute capability of `device`, or None off CUDA."""
    import torch

    if getattr(device, "type", str(device)) != "cuda" or not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return int(major), int(minor)


def _named(capability: tuple[int, int]) -> str:
    name = KNOWN_GPUS.get(capability)
    return f"{capability[0]}.{capability[1]}" + (f" ({name})" if name else "")


def torchao_available() -> bool:
    return importlib.util.find_spec("torchao") is not None


def check_fp8(device: Any) -> None:
    """ValueError unless fp8 can run here: a CUDA GPU of capability 8.9+ and torchao installed."""
    capability = _capability(device)
    need = f"fp8 needs compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}+ (L4, H100)"
    if capability is None:
        raise ValueError(f"--fp8: {need}; this machine runs on the CPU. Start without --fp8")
    if capability < MIN_CAPABILITY:
        raise ValueError(f"--fp8: {need}; this GPU is {_named(capability)}. Start without --fp8")
    if not torchao_available():
        raise ValueError("--fp8 needs torchao, which is not installed: pip install torchao")


def suggestion(device: Any) -> str | None:
    """A log line for `auto` on a GPU where --fp8 would work (never turned on by itself)."""
    capability = _capability(device)
    if capability is None or capability < MIN_CAPABILITY:
        return None
    return (f"this GPU ({_named(capability)}) runs float8: --fp8 would store the transformer's linear weights in "
            "1 byte each (about half of bf16), at a small quality cost; not turned on by itself")


def quantize_transformer(transformer: Any) -> None:
    """float8 weight-only quantization of every linear layer, in place (torchao). Not run here: no GPU."""
    from torchao.quantization import float8_weight_only, quantize_

    quantize_(transformer, float8_weight_only())
