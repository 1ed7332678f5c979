"""Turning a model spec into one loaded FluxPipeline.

A spec is one of:

* ``masuka/tiny-flux``: the built-in demo model (random weights, built locally);
* a local diffusers folder (with ``model_index.json``);
* a Hub id such as ``black-forest-labs/FLUX.1-schnell`` (FLUX.1-dev is gated: it needs HF_TOKEN);
* a single-file transformer, ``.safetensors`` or ``.gguf`` (a local file or a
  ``https://huggingface.co/...`` link), for pre-quantized community checkpoints: the other
  components (text encoders, VAE, scheduler) come from ``--base-model``.

The memory profile is decided before any weight is read (see memory.py), because it
decides how the weights are read.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from masuka.settings import TINY_MODEL_ID, Settings, resolve_device_dtype
from masuka.model.defaults import DEV_DEFAULTS, SCHNELL_DEFAULTS, TINY_DEFAULTS, ModelDefaults
from masuka.model import compiled, fp8, memory, plan
from masuka.model.tiny import ensure_tiny_model

log = logging.getLogger(__name__)

FLUX_DEV = "black-forest-labs/FLUX.1-dev"
FLUX_SCHNELL = "black-forest-labs/FLUX.1-schnell"
SINGLE_FILE_SUFFIXES = (".safetensors", ".gguf")
# Black Forest Labs' [dev] family is gated: accept the licence on the Hub, then use a token.
GATED_PREFIXES = ("black-forest-labs/flux.1-dev", "black-forest-labs/flux.1-krea-dev",
                  "black-forest-labs/flux.1-kontext-dev", "black-forest-labs/flux.1-fill-dev",
                  "black-forest-labs/flux.1-canny-dev", "black-forest-labs/flux.1-depth-dev")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
TOKEN_HELP = (
    "accept the licence at https://huggingface.co/{repo} with your Hugging Face account, then give "
    "the app a read token: export HF_TOKEN=hf_... (on Colab: a secret named HF_TOKEN) or run "
    "`hf auth login`"
)

KIND_TINY, KIND_FOLDER, KIND_HUB, KIND_FILE = "tiny", "folder", "hub", "single_file"


@dataclass(frozen=True)
class ModelSource:
    kind: str  # tiny | folder | hub | single_file
    location: str  # folder path, Hub id, or the single file's path / URL
    base: "ModelSource | None" = None  # single_file: where the other components come from
    is_demo: bool = False

    @property
    def file_format(self) -> str | None:
        if self.kind != KIND_FILE:
            return None
        return "gguf" if self.location.lower().endswith(".gguf") else "safetensors"

    @property
    def hub_ids(self) -> list[str]:
        ids = [self.location] if self.kind == KIND_HUB else []
        return ids + (self.base.hub_ids if self.base else [])

    def describe(self) -> str:
        if self.kind == KIND_FILE:
            return f"transformer {self.location} ({self.file_format}) + other components from {self.base.location}"
        return self.location


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
    source: str = ""  # what was loaded, in words
    compile_report: compiled.CompileReport | None = None  # --compile: what the warm-up compiled
    fp8: bool = False  # --fp8: the transformer's linear weights are float8 (LoRAs go through adapters)

    @property
    def description(self) -> str:
        if self.is_demo:
            return "built-in demo model (random weights: images are noise-like patterns, not pictures)"
        return self.spec


def defaults_for(spec: str, transformer_config: Any) -> ModelDefaults:
    if spec == TINY_MODEL_ID:
        return TINY_DEFAULTS
    # schnell is distilled without guidance embedding; dev has it.
    if not getattr(transformer_config, "guidance_embeds", True) or "schnell" in spec.lower():
        return SCHNELL_DEFAULTS
    return DEV_DEFAULTS


def guess_base_model(file_spec: str) -> str:
    """The repo whose text encoders / VAE / config go with a single-file transformer."""
    return FLUX_SCHNELL if "schnell" in Path(file_spec).name.lower() else FLUX_DEV


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~", "\\")) or spec.count("/") > 1 or (os.sep != "/" and os.sep in spec)


def resolve_model_spec(spec: str, models_dir: Path, base_model: str = "") -> ModelSource:
    """What ``--model`` names; raises ValueError saying what is wrong and what would work."""
    spec = (spec or "").strip()
    if spec == TINY_MODEL_ID:
        return ModelSource(KIND_TINY, str(ensure_tiny_model(models_dir)), is_demo=True)
    if spec.lower().endswith(SINGLE_FILE_SUFFIXES):
        return _single_file_source(spec, models_dir, base_model)
    local = Path(spec).expanduser()
    if spec and local.exists():
        if not local.is_dir():
            raise ValueError(
                f"model {spec!r} is a file but not a single-file transformer (.safetensors or .gguf); "
                "give a diffusers folder with model_index.json, a Hub id, or such a file"
            )
        if not (local / "model_index.json").is_file():
            raise ValueError(
                f"model folder {spec!r} has no model_index.json, so it is not a diffusers pipeline folder; "
                "save one with pipe.save_pretrained(folder), or download a whole Hub repository into it"
            )
        return ModelSource(KIND_FOLDER, str(local.resolve()))
    if _looks_like_path(spec):
        raise ValueError(
            f"model folder {spec!r} does not exist; give an existing diffusers folder (with "
            "model_index.json), a Hub id like black-forest-labs/FLUX.1-schnell, or a .safetensors/.gguf file"
        )
    if _HUB_ID.match(spec):
        return ModelSource(KIND_HUB, spec)
    raise ValueError(
        f"model {spec!r} is neither '{TINY_MODEL_ID}', a Hub id like black-forest-labs/FLUX.1-schnell, "
        "an existing local diffusers folder, nor a .safetensors/.gguf transformer file"
    )


def _single_file_source(spec: str, models_dir: Path, base_model: str) -> ModelSource:
    if spec.startswith(("http://", "https://")):
        if not spec.startswith("https://huggingface.co/"):
            raise ValueError(
                f"single-file model {spec!r}: only https://huggingface.co/... links are read directly; "
                "download other files first and give the local path"
            )
        location = spec
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"single-file model {spec!r} does not exist (or is not a file)")
        location = str(path.resolve())
    base_spec = base_model.strip() or guess_base_model(spec)
    if base_spec.lower().endswith(SINGLE_FILE_SUFFIXES):
        raise ValueError(f"base model {base_spec!r} must be a diffusers folder or Hub id, not a single file")
    base = resolve_model_spec(base_spec, models_dir)
    return ModelSource(KIND_FILE, location, base=base, is_demo=base.is_demo)


def hub_token() -> str | None:
    """HF_TOKEN, or the token saved by `hf auth login`."""
    import huggingface_hub

    return os.environ.get("HF_TOKEN") or huggingface_hub.get_token() or None


def is_gated(repo_id: str) -> bool:
    return repo_id.lower().startswith(GATED_PREFIXES)


def check_access(source: ModelSource, token: str | None) -> None:
    """Refuse, before any download, a gated model without a token."""
    if token:
        return
    for repo in source.hub_ids:
        if is_gated(repo):
            hint = ""
            if source.kind == KIND_FILE:
                hint = (" (it gives the text encoders and VAE for the single-file transformer; "
                        "--base-model can name another copy)")
            raise ValueError(
                f"{repo} is a gated model and no Hugging Face token was found{hint}: "
                + TOKEN_HELP.format(repo=repo)
                + f"; or use the open {FLUX_SCHNELL}"
            )


def describe_model(source: ModelSource):
    """What the memory plan knows of the model before any weight is read (masuka.model.plan.ModelInfo)."""
    if source.kind in (KIND_TINY, KIND_FOLDER):
        return memory.folder_model(Path(source.location))
    if source.kind == KIND_HUB:
        return plan.hub_model(source.location)
    local = Path(source.location)
    file_bytes = local.stat().st_size if not source.location.startswith("https://") and local.is_file() else None
    return plan.single_file_model(source.location, describe_model(source.base), file_bytes)


def plan_profile(requested: str, source: ModelSource, device: Any, dtype: Any = None, fp8: bool = False):
    """The memory profile to load with (auto decided here, from the memory plan, before loading), with why."""
    if requested != "auto":
        return memory.ProfileChoice(requested, "asked for")
    mem = memory.detect_memory(device)
    choice = memory.choose_profile(describe_model(source), mem, dtype=dtype, bnb=memory.bitsandbytes_available(),
                                   fp8=fp8)
    if choice.error:
        raise ValueError(f"--memory auto: {choice.error}")
    return choice


def _hub_error(exc: Exception, source: ModelSource) -> ValueError | None:
    """A clear message for the Hub errors a user can fix; None for anything else."""
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    repos = ", ".join(source.hub_ids) or source.location
    if isinstance(exc, GatedRepoError):
        repo = source.hub_ids[0] if source.hub_ids else repos
        return ValueError(f"{repo} is gated and the token was refused: " + TOKEN_HELP.format(repo=repo))
    if isinstance(exc, RepositoryNotFoundError):
        return ValueError(f"Hub repository {repos} was not found (check the spelling; private repos need HF_TOKEN)")
    return None


def _read_pipeline(source: ModelSource, dtype: Any, token: str | None, profile: str, device: Any):
    from diffusers import FluxPipeline

    on_cuda = getattr(device, "type", str(device)) == "cuda"
    kwargs: dict[str, Any] = {"dtype": dtype, "token": token}
    if profile == "full" and on_cuda and str(device) == "cuda":
        # Straight onto the GPU, so the bf16 weights never have to fit in system RAM.
        kwargs["device_map"] = "cuda"
    quantize_t5 = profile == "quantized" and memory.bitsandbytes_available()
    if profile == "quantized" and not on_cuda:
        raise ValueError(f"memory profile 'quantized' needs a CUDA GPU; this machine runs on {device}")
    if source.kind != KIND_FILE:
        if profile == "quantized":
            prequantized = describe_model(source).prequantized
            quant = memory.pipeline_quantization(dtype, transformer=not prequantized, t5=quantize_t5)
            if quant is not None:
                kwargs["quantization_config"] = quant
        log.info("loading %s (weights: progress bars below)", source.describe())
        return FluxPipeline.from_pretrained(source.location, **kwargs)
    transformer = _read_single_file(source, dtype, token, profile)
    if quantize_t5:
        kwargs["quantization_config"] = memory.pipeline_quantization(dtype, transformer=False, t5=True)
    log.info("loading text encoders, VAE and scheduler from %s", source.base.location)
    return FluxPipeline.from_pretrained(source.base.location, transformer=transformer, **kwargs)


def _read_single_file(source: ModelSource, dtype: Any, token: str | None, profile: str):
    from diffusers import FluxTransformer2DModel

    kwargs: dict[str, Any] = {
        "config": source.base.location,
        "subfolder": "transformer",
        "dtype": dtype,
        "token": token,
    }
    if source.file_format == "gguf":
        if not memory.gguf_available():
            raise ValueError(f"{source.location} is a GGUF file, which needs the gguf package: "
                             "pip install -r requirements-gpu.txt")
        from diffusers import GGUFQuantizationConfig

        kwargs["quantization_config"] = GGUFQuantizationConfig(compute_dtype=dtype)
    elif profile == "quantized":
        kwargs["quantization_config"] = memory.transformer_nf4_config(dtype)
    started = time.perf_counter()
    log.info("loading transformer from single file %s (config from %s)", source.location, source.base.location)
    transformer = FluxTransformer2DModel.from_single_file(source.location, **kwargs)
    log.info("transformer read in %.1f s", time.perf_counter() - started)
    return transformer


def load_pipeline(settings: Settings) -> LoadedModel:
    import torch

    started = time.perf_counter()
    device, dtype = resolve_device_dtype(settings.device, settings.dtype)
    if settings.fp8:
        fp8.check_fp8(device)  # before any weight is read
    else:
        hint = fp8.suggestion(device)
        if hint:
            log.info("%s", hint)
    source = resolve_model_spec(settings.model, settings.paths.models, settings.base_model)
    token = hub_token()
    check_access(source, token)
    choice = plan_profile(settings.memory, source, device, dtype, fp8=settings.fp8)
    if settings.compile:
        compiled.check_profile(choice.profile, choice.reason)  # before any weight is read
    if settings.fp8 and choice.profile == "quantized":
        raise ValueError(f"--fp8 and memory profile quantized ({choice.reason}) both quantize the transformer; "
                         "use --fp8 with --memory full or offload")
    log.info("loading model %s (device %s, dtype %s, memory profile %s: %s)",
             source.describe(), device, dtype, choice.profile, choice.reason)
    try:
        pipe = _read_pipeline(source, dtype, token, choice.profile, device)
    except OSError as exc:  # huggingface_hub errors are OSErrors
        clear = _hub_error(exc, source)
        if clear is None:
            raise
        raise clear from exc
    log.info("weights read in %.1f s; placing them (%s)", time.perf_counter() - started, choice.profile)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            module.eval()
    pipe.set_progress_bar_config(disable=True)
    if settings.fp8:  # checked above: a GPU of capability 8.9+ with torchao (not run in CI: no GPU)
        fp8.quantize_transformer(pipe.transformer)
        log.info("transformer linear weights quantized to float8 (torchao, weight-only)")
    if dtype == torch.float16 and isinstance(getattr(pipe, "vae", None), torch.nn.Module):
        # The FLUX VAE overflows in float16 (NaN or black images); it is small, so it runs in float32.
        pipe.vae.to(torch.float32)
    profile, reason = memory.apply_memory_profile(pipe, choice.profile, device, reason=choice.reason,
                                                  placement=choice.plan.placement if choice.plan else None)
    defaults = defaults_for(TINY_MODEL_ID if source.is_demo else settings.model, pipe.transformer.config)
    report = None
    if settings.compile:  # profile checked above, before reading: full or offload
        report = compiled.compile_and_warm_up(pipe, defaults, device, backend=compiled.BACKEND)
    loaded = LoadedModel(
        pipe=pipe,
        spec=settings.model,
        defaults=defaults,
        device=device,
        dtype=dtype,
        is_demo=source.is_demo,
        memory_profile=profile,
        memory_reason=reason,
        load_seconds=time.perf_counter() - started,
        source=source.describe(),
        compile_report=report,
        fp8=settings.fp8,
    )
    log.info("model ready in %.1f s: %s, memory profile %s (%s)",
             loaded.load_seconds, loaded.description, profile, reason)
    return loaded
