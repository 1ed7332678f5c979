"""Turning a model spec (built-in tiny, Hub id, local folder) into one loaded FluxPipeline."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .settings import TINY_MODEL, Settings, resolve_device_dtype
from .validation import DEV_DEFAULTS, SCHNELL_DEFAULTS, TINY_DEFAULTS, ModelDefaults

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    pipe: Any  # diffusers.FluxPipeline
    spec: str  # what the user asked for (--model)
    defaults: ModelDefaults
    device: Any  # torch.device the pipeline runs on
    dtype: Any  # torch.dtype
    is_demo: bool
    memory_profile: str = "full"
    memory_reason: str = ""
    load_seconds: float = 0.0

    @property
    def description(self) -> str:
        if self.is_demo:
            return "built-in demo model (random weights: images are noise-like patterns, not pictures)"
        return self.spec


def defaults_for(spec: str, transformer_config: Any) -> ModelDefaults:
    if spec == TINY_MODEL:
        return TINY_DEFAULTS
    # schnell is distilled without guidance embedding; dev has it.
    if not getattr(transformer_config, "guidance_embeds", True) or "schnell" in spec.lower():
        return SCHNELL_DEFAULTS
    return DEV_DEFAULTS


def resolve_model_path(spec: str, models_dir: Path) -> tuple[str, bool]:
    """(path or Hub id to pass to from_pretrained, is_demo)."""
    if spec == TINY_MODEL:
        from .tiny import ensure_tiny_model

        return str(ensure_tiny_model(models_dir)), True
    local = Path(spec).expanduser()
    if local.exists():
        if local.is_dir() and not (local / "model_index.json").is_file():
            raise ValueError(f"model folder {spec!r} has no model_index.json (not a diffusers pipeline folder)")
        return str(local.resolve()), False
    if spec.count("/") == 1 and not spec.startswith(("/", ".")):
        return spec, False
    raise ValueError(
        f"model {spec!r} is neither '{TINY_MODEL}', a Hub id like black-forest-labs/FLUX.1-schnell, "
        "nor an existing local folder"
    )


def load_pipeline(settings: Settings) -> LoadedModel:
    import torch
    from diffusers import FluxPipeline

    started = time.perf_counter()
    device, dtype = resolve_device_dtype(settings.device, settings.dtype)
    source, is_demo = resolve_model_path(settings.model, settings.paths.models)
    token = os.environ.get("HF_TOKEN") or None
    log.info("loading model %s (device %s, dtype %s)", settings.model, device, dtype)
    pipe = FluxPipeline.from_pretrained(source, dtype=dtype, token=token)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    from .memory import apply_memory_profile

    profile, reason = apply_memory_profile(pipe, settings.memory, device)
    loaded = LoadedModel(
        pipe=pipe,
        spec=settings.model,
        defaults=defaults_for(settings.model, pipe.transformer.config),
        device=device,
        dtype=dtype,
        is_demo=is_demo,
        memory_profile=profile,
        memory_reason=reason,
        load_seconds=time.perf_counter() - started,
    )
    log.info(
        "model ready in %.1f s: %s, memory profile %s (%s)",
        loaded.load_seconds,
        loaded.description,
        profile,
        reason,
    )
    return loaded


def model_summary(loaded: LoadedModel) -> dict[str, Any]:
    return {
        "model": loaded.spec,
        "demo": loaded.is_demo,
        "description": loaded.description,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).replace("torch.", ""),
        "memory_profile": loaded.memory_profile,
        "defaults": json.loads(json.dumps(loaded.defaults.__dict__)),
    }
