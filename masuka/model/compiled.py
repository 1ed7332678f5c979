"""``--compile``: the transformer's repeated blocks compiled once at start and kept compiled.

diffusers' regional compilation (``ModelMixin.compile_repeated_blocks``) compiles one graph
per block class (FLUX: ``FluxTransformerBlock`` and ``FluxSingleTransformerBlock``) and
reuses it for every block of that class, so compiling is much shorter than for the whole
transformer (29 s on an H200 for FLUX.1-dev, docs/benchmarks.md).  ``fullgraph=True``: a graph break is an error at start,
not a silent slowdown.  A warm-up generation at the model's default size pays the
compile before the first user does.

What keeps it compiled:

* LoRAs: the fast path (``masuka.core.fastlora``) writes LoRAs into the weights with
  ``weight.data.copy_``, so the compiled graph sees the same tensors with new values:
  switching LoRAs, scales, several at once or none never recompiles.  A LoRA the fast path
  cannot fuse would need peft adapters, which change the compiled blocks; under compile it
  is refused with its reason instead (``masuka.core.lorastate``).
* Memory profiles: only ``full`` and ``offload`` keep plain weights the fast path can write
  in place; ``lowvram`` (weights on the meta device between layers) and ``quantized``
  (NF4/GGUF weights) would need adapters for every LoRA, so ``--compile`` with them is
  refused at start.
* Image sizes: the first image at another size than the warm-up's compiles once more
  (torch then makes the size dynamic); after that every size reuses the graphs.

torch is imported lazily (nothing heavy at import time).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from masuka.model.defaults import ModelDefaults

log = logging.getLogger(__name__)

BACKEND = "inductor"  # torch.compile's default; tests pass a cheap backend to the same functions
COMPILE_PROFILES = ("full", "offload")
WARM_UP_PROMPT = "warm-up"
WARM_UP_STEPS = 1  # the blocks see the same shapes at every step: one step compiles them all

Backend = str | Callable[..., Any]


@dataclass(frozen=True)
class CompileReport:
    backend: str
    width: int
    height: int
    graphs: int  # graphs compiled by the warm-up
    seconds: float  # compile + warm-up generation


def check_profile(profile: str, reason: str = "") -> None:
    """Refuse ``--compile`` with a memory profile whose weights the LoRA fast path cannot write."""
    if profile in COMPILE_PROFILES:
        return
    why = f" ({reason})" if reason else ""
    raise ValueError(
        f"--compile needs memory profile full or offload, not {profile!r}{why}: with {profile!r} every LoRA "
        "would be loaded as a peft adapter, which recompiles the model; start without --compile, or pick "
        "--memory full or offload if they fit"
    )


def backend_name(backend: Backend) -> str:
    return backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)


def compile_transformer(transformer: Any, backend: Backend = BACKEND) -> None:
    """Compile the transformer's repeated blocks in place (lazily: the first call compiles)."""
    transformer.compile_repeated_blocks(fullgraph=True, backend=backend)


def is_compiled(module: Any) -> bool:
    """Whether any part of ``module`` was compiled in place (``nn.Module.compile``)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def compiled_graphs() -> int:
    """Graphs dynamo has compiled in this process so far (a recompile adds one)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warm_up(pipe: Any, defaults: ModelDefaults, device: Any) -> None:
    """One generation at the default size, called as the runner calls the pipeline (prompt
    embeddings, latent output, inference mode), so its graphs are the ones jobs use."""
    import torch

    exec_device = getattr(pipe, "_execution_device", device)
    with torch.inference_mode():
        prompt_embeds, pooled, _ids = pipe.encode_prompt(
            prompt=WARM_UP_PROMPT,
            prompt_2=None,
            device=exec_device,
            max_sequence_length=defaults.max_sequence_length,
        )
        pipe(
            prompt_embeds=prompt_embeds,
            pooled_prompt_embeds=pooled,
            width=defaults.width,
            height=defaults.height,
            num_inference_steps=WARM_UP_STEPS,
            guidance_scale=defaults.guidance,
            generator=torch.Generator(device="cpu").manual_seed(0),
            max_sequence_length=defaults.max_sequence_length,
            output_type="latent",
        )


def compile_and_warm_up(pipe: Any, defaults: ModelDefaults, device: Any, backend: Backend = BACKEND) -> CompileReport:
    """Compile the transformer's repeated blocks and pay the compile now, with a log line."""
    started = time.perf_counter()
    before = compiled_graphs()
    log.info("--compile: compiling the transformer's repeated blocks (backend %s) with a warm-up image "
             "at %dx%d", backend_name(backend), defaults.width, defaults.height)
    compile_transformer(pipe.transformer, backend)
    try:
        warm_up(pipe, defaults, device)
    except Exception as exc:  # a compiler error is not the user's; say how to start anyway
        raise RuntimeError(
            f"--compile failed while compiling the transformer ({type(exc).__name__}: {exc}); "
            "start without --compile"
        ) from exc
    report = CompileReport(
        backend=backend_name(backend),
        width=defaults.width,
        height=defaults.height,
        graphs=compiled_graphs() - before,
        seconds=time.perf_counter() - started,
    )
    log.info("--compile: warm-up done in %.1f s (%d graphs compiled); images at %dx%d start without "
             "compiling, another size compiles once more", report.seconds, report.graphs, report.width,
             report.height)
    return report
