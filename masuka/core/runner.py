"""The generator manager: owns the ONE pipeline and the active LoRA set.

One generation at a time (a lock, on top of Gradio's concurrency group, so a
script calling the manager directly is safe too).  Every job is recorded in the
job store from the moment it is accepted until it ends, whatever happens.
"""

from __future__ import annotations

import gc
import logging
import random
import re
import threading
import time
import traceback as tb
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from masuka.store.jobs import JobStore
from masuka.model.loading import LoadedModel
from masuka.store.outputs import image_metadata, save_image
from masuka.lora.types import LoraInUse, LoraResolver, ResolvedLora
from masuka.core.requests import GenerateRequest, LoraChoice, MAX_SEED, validate_request

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (steps done, steps total) over the whole job


class JobCancelled(Exception):
    """Raised inside the denoising loop to stop a job at the next step."""


class JobFailed(RuntimeError):
    """A job that was accepted and then failed; the store holds its traceback."""

    def __init__(self, job_id: str, reason: str):
        super().__init__(f"job {job_id} failed: {reason}")
        self.job_id = job_id
        self.reason = reason


@dataclass
class GenerationResult:
    job_id: str
    status: str  # completed or cancelled
    images: list[Path]
    seeds: list[int]
    record: dict[str, Any]


@dataclass
class _ActiveJob:
    job_id: str
    session: str | None
    cancel: threading.Event = field(default_factory=threading.Event)
    loras: frozenset[str] = frozenset()  # names the job asked for (deleting them is refused)


def adapter_name(lora: ResolvedLora) -> str:
    # peft keeps adapters in ModuleDicts, whose keys may not contain '.'.
    return "m_" + re.sub(r"[^A-Za-z0-9_]", "_", lora.name) + "_" + lora.sha256[:8]


def friendly_error(exc: BaseException) -> str:
    import torch

    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return (
            "the GPU ran out of memory: try a smaller width/height, fewer images, or a lower memory "
            "profile (--memory offload, lowvram or quantized)"
        )
    if isinstance(exc, OSError) and exc.errno in (28, 30):  # ENOSPC, EROFS
        return f"could not save the image: {exc.strerror} ({exc.filename or 'outputs folder'})"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, ValueError) else f"{type(exc).__name__}: {text}"


class GeneratorManager:
    def __init__(
        self,
        loaded: LoadedModel,
        jobs: JobStore,
        loras: LoraResolver,
        outputs_dir: Path,
        *,
        lora_cache=None,
    ):
        self.loaded = loaded
        self.jobs = jobs
        self.loras = loras
        self.outputs_dir = outputs_dir
        self._gpu = threading.Lock()  # one generation (or LoRA load) on the pipeline at a time
        self._state = threading.Lock()  # guards _active
        self._active: _ActiveJob | None = None
        self._adapters: dict[str, tuple[ResolvedLora, float]] = {}  # adapter name -> (lora, scale)
        self._lora_strategy = "none"  # how _adapters is applied: "fused", "adapters" or "none"
        self._fused = None  # fastlora.FusedState while the strategy is "fused"
        self._fallback_reason: str | None = None  # why the last LoRA set could not be fused
        self.inexact_restores = 0  # fused restores whose checksum failed (must stay 0)
        from masuka.lora.cache import LoraStateCache

        self.lora_cache = lora_cache if lora_cache is not None else LoraStateCache()
        # Called with the job id once a job's end is recorded (e.g. the history backup).
        self.job_listeners: list[Callable[[str], None]] = []

    # ---- read-only views -------------------------------------------------
    @property
    def pipe(self):
        return self.loaded.pipe

    def active_loras(self) -> list[dict[str, Any]]:
        return [{"name": lora.name, "scale": scale} for lora, scale in self._adapters.values()]

    def loras_in_use(self) -> set[str]:
        """LoRA names the running job asked for (deleting them is refused).

        A LoRA merely still held by the pipeline from an earlier job does not count:
        the next job's swap drops whatever it does not ask for.
        """
        with self._state:
            return set(self._active.loras) if self._active is not None else set()

    def delete_lora(self, name: str):
        """Delete a LoRA from the library unless the running job uses it; returns its record."""
        self.loras.get(name)  # scan first if need be, outside the state lock
        with self._state:  # no job can start using it between the check and the delete
            if self._active is not None and name in self._active.loras:
                raise LoraInUse(
                    f"LoRA {name!r} is used by the running job {self._active.job_id}; "
                    "delete it when that job has ended (or cancel it)"
                )
            record = self.loras.delete(name)
        self.lora_cache.forget(record.sha256)
        return record

    def running_job_id(self) -> str | None:
        with self._state:
            return self._active.job_id if self._active else None

    # ---- validation ------------------------------------------------------
    def validate(self, **raw: Any) -> GenerateRequest:
        pipe = self.loaded.pipe
        return validate_request(
            **raw,
            defaults=self.loaded.defaults,
            t5_tokenizer=getattr(pipe, "tokenizer_2", None),
            clip_tokenizer=getattr(pipe, "tokenizer", None),
        )

    # ---- cancel ----------------------------------------------------------
    def cancel(self, job_id: str) -> bool:
        """Cancel a running job; False when it is not running here."""
        with self._state:
            if self._active is not None and self._active.job_id == job_id:
                self._active.cancel.set()
                log.info("cancel requested for job %s", job_id)
                return True
        return False

    def cancel_session(self, session: str) -> str | None:
        """Cancel the running job of one browser session (never anyone else's)."""
        with self._state:
            if self._active is not None and session and self._active.session == session:
                self._active.cancel.set()
                return self._active.job_id
        return None

    # ---- generation ------------------------------------------------------
    def generate(
        self,
        request: GenerateRequest,
        *,
        user: str | None = None,
        session: str | None = None,
        on_step: StepCallback | None = None,
        on_job: Callable[[str], None] | None = None,
    ) -> GenerationResult:
        seed = request.seed if request.seed >= 0 else random.randint(0, MAX_SEED - IMAGES_HEADROOM)
        seed = min(seed, MAX_SEED - (request.num_images - 1))
        seeds = [seed + i for i in range(request.num_images)]
        params = request.params() | {"model": self.loaded.spec, "requested_seed": request.seed}
        job_id = self.jobs.create(
            params=params,
            loras=[{"name": lc.name, "scale": lc.scale} for lc in request.loras],
            user=user,
            session=session,
            status="queued",
        )
        self.jobs.set_seeds(job_id, seeds)
        if on_job is not None:
            on_job(job_id)
        with self._gpu:
            active = _ActiveJob(job_id, session, loras=frozenset(lc.name for lc in request.loras))
            with self._state:
                self._active = active
            try:
                return self._run(job_id, request, params, seeds, active, on_step)
            finally:
                with self._state:
                    self._active = None
                self._release_memory()
                self._job_ended(job_id)

    def _run(
        self,
        job_id: str,
        request: GenerateRequest,
        params: dict[str, Any],
        seeds: list[int],
        active: _ActiveJob,
        on_step: StepCallback | None,
    ) -> GenerationResult:
        import torch

        started = time.perf_counter()
        saved: list[Path] = []
        try:
            if active.cancel.is_set():
                raise JobCancelled()
            self.jobs.mark_running(job_id)
            self._apply_loras(request.loras)
            pipe = self.loaded.pipe
            total = request.steps * request.num_images
            done = 0

            def step_end(_pipe, step: int, _t, kwargs):
                nonlocal done
                done += 1
                if on_step is not None:
                    on_step(done, total)
                if active.cancel.is_set():
                    raise JobCancelled()
                return kwargs

            exec_device = getattr(pipe, "_execution_device", self.loaded.device)
            with torch.inference_mode():
                prompt_embeds, pooled, _ids = pipe.encode_prompt(
                    prompt=request.prompt,
                    prompt_2=None,
                    device=exec_device,
                    max_sequence_length=self.loaded.defaults.max_sequence_length,
                )
            images = []
            for index, image_seed in enumerate(seeds):
                if active.cancel.is_set():
                    raise JobCancelled()
                # One generator per image, so image i of a job is reproduced by seed + i alone.
                generator = torch.Generator(device="cpu").manual_seed(image_seed)
                with torch.inference_mode():
                    out = pipe(
                        prompt_embeds=prompt_embeds,
                        pooled_prompt_embeds=pooled,
                        width=request.width,
                        height=request.height,
                        num_inference_steps=request.steps,
                        guidance_scale=request.guidance,
                        generator=generator,
                        max_sequence_length=self.loaded.defaults.max_sequence_length,
                        callback_on_step_end=step_end,
                    )
                images.append(out.images[0])
            for index, (image, image_seed) in enumerate(zip(images, seeds)):
                meta = image_metadata(params, seed=image_seed, model=self.loaded.spec, job_id=job_id)
                saved.append(save_image(image, self.outputs_dir, meta, stem=f"{job_id}-{index}-{image_seed}"))
            outputs = [str(p) for p in saved]
            self.jobs.mark_completed(job_id, seeds=seeds, outputs=outputs, notes=list(request.notes))
            log.info("job %s completed in %.2f s", job_id, time.perf_counter() - started)
            return GenerationResult(job_id, "completed", saved, seeds, self.jobs.get(job_id))
        except JobCancelled:
            self._discard(saved)
            self.jobs.mark_cancelled(job_id, reason="cancelled by the user")
            log.info("job %s cancelled", job_id)
            return GenerationResult(job_id, "cancelled", [], seeds, self.jobs.get(job_id))
        except Exception as exc:  # any failure is recorded, then reported
            self._discard(saved)
            reason = friendly_error(exc)
            self.jobs.mark_failed(job_id, error=reason, traceback=tb.format_exc())
            log.warning("job %s failed: %s", job_id, reason)
            # The traceback's frames hold tensors; drop them before memory is released.
            del exc
            gc.collect()
            raise JobFailed(job_id, reason) from None

    def _job_ended(self, job_id: str) -> None:
        for listener in self.job_listeners:
            try:
                listener(job_id)
            except Exception:  # a listener must never turn a finished job into an error
                log.exception("job listener %r failed for job %s", listener, job_id)

    @staticmethod
    def _discard(paths: list[Path]) -> None:
        for p in paths:
            try:
                p.unlink()
            except FileNotFoundError:
                pass

    def _release_memory(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        torch.cuda.empty_cache()  # ~5 ms on an H200; gc.collect (~0.3 s here) only after failures
        log.info(
            "CUDA memory: allocated %.1f -> %.1f MiB, reserved %.1f -> %.1f MiB",
            allocated / 2**20,
            torch.cuda.memory_allocated() / 2**20,
            reserved / 2**20,
            torch.cuda.memory_reserved() / 2**20,
        )

    # ---- LoRAs -----------------------------------------------------------
    @property
    def lora_strategy(self) -> str:
        """How the active LoRAs are applied: "fused" (fast path), "adapters" (diffusers/peft) or "none"."""
        return self._lora_strategy if self._adapters else "none"

    def lora_status(self) -> dict[str, Any]:
        """What the pipeline holds now (for the UI, benchmarks and tests)."""
        fused = self._fused
        return {
            "strategy": self.lora_strategy,
            "loras": self.active_loras(),
            "fused_modules": len(fused.modules) if fused else 0,
            "restore_entries": fused.fix_entries if fused else 0,
            "restore_bytes": fused.nbytes() if fused else 0,
            "fallback_reason": self._fallback_reason,
            "inexact_restores": self.inexact_restores,
            "cache_bytes": self.lora_cache.used_bytes,
        }

    def set_loras(self, loras: str | tuple[LoraChoice, ...]) -> dict[str, Any]:
        """Make the pipeline hold exactly these LoRAs now, outside a job (warm-up, benchmarks);
        the same path a job takes.  ``loras`` is a spec like "a:0.8,b" or LoraChoice tuple."""
        from masuka.core.requests import parse_lora_spec

        choices = parse_lora_spec(loras) if isinstance(loras, str) else tuple(loras)
        with self._gpu:
            self._apply_loras(choices)
        return self.lora_status()

    def _apply_loras(self, choices: tuple[LoraChoice, ...]) -> None:
        """Make the pipeline hold exactly the requested LoRAs at the requested scales.

        Fast path: fuse into the weights (exact restore, see masuka.core.fastlora).  LoRAs it
        cannot express go through diffusers' adapters instead (all of the set, then).
        A LoRA that does not fit is refused before any weight changes; any failure after
        that leaves the pipeline with no LoRA at all, never half of a set.
        """
        from masuka.core import fastlora

        wanted: dict[str, tuple[ResolvedLora, float]] = {}
        for choice in choices:
            lora = self.loras.resolve(choice.name)
            wanted[adapter_name(lora)] = (lora, choice.scale)
        # A fixed order: the same set at the same scales always fuses to the same bits.
        wanted = dict(sorted(wanted.items()))
        if wanted == self._adapters:
            return
        if not wanted:
            self._clear_loras()
            return
        resolution = self._fast_resolution(wanted)  # may refuse; nothing is touched yet
        self._fallback_reason = resolution.fallback_reason
        if resolution.fallback_reason is not None:
            log.info("LoRA fast path not used (%s): diffusers adapters", resolution.fallback_reason)
            self._apply_adapters(wanted)
            return
        self._clear_loras()
        try:
            # fuse() restores what it fused so far before an exception leaves it.
            self._fused = fastlora.fuse(
                resolution.targets, compute_device=self._fuse_device(), fix_gpu_bytes=self._fix_gpu_budget()
            )
        except Exception:
            log.warning("LoRA fuse failed; the pipeline holds no LoRA")
            raise
        self._adapters, self._lora_strategy = dict(wanted), "fused"

    def _fast_resolution(self, wanted: dict[str, tuple[ResolvedLora, float]]):
        from masuka.core import fastlora

        pin = self._fuse_device() is not None

        def build(state: dict[str, Any]) -> fastlora.FusePlan:
            try:
                return fastlora.build_plan(state, pin=pin)
            except Exception as exc:  # diffusers' adapter path gives the real error, if any
                log.warning("LoRA fast-path conversion failed (%s: %s)", type(exc).__name__, exc)
                return fastlora.FusePlan((), f"conversion failed: {type(exc).__name__}")

        plans = [(self.lora_cache.get_plan(lora, build), scale) for lora, scale in wanted.values()]
        return fastlora.resolve_targets(fastlora.pipeline_components(self.loaded.pipe), plans)

    def _fix_gpu_budget(self) -> int | None:
        """GPU bytes the exact-restore fixes may hold (the rest waits in CPU RAM)."""
        import torch

        device = self._fuse_device()
        if device is None:
            return None
        return int(FIX_GPU_FRACTION * torch.cuda.get_device_properties(device).total_memory)

    def _fuse_device(self):
        """The GPU when there is one (weights offloaded to the CPU are fused there too)."""
        device = self.loaded.device
        return device if getattr(device, "type", str(device)) == "cuda" else None

    def _apply_adapters(self, wanted: dict[str, tuple[ResolvedLora, float]]) -> None:
        pipe = self.loaded.pipe
        if self._lora_strategy != "adapters":
            self._clear_loras()
        stale = [name for name in self._adapters if name not in wanted]
        try:
            if stale:
                if len(stale) == len(self._adapters):
                    # Nothing we keep: unload restores the original modules exactly.
                    pipe.unload_lora_weights()
                else:
                    pipe.delete_adapters(stale)
                for name in stale:
                    del self._adapters[name]
            self._lora_strategy = "adapters"
            for name, (lora, scale) in wanted.items():
                if name not in self._adapters:
                    state = self.lora_cache.get(lora)
                    pipe.load_lora_weights(state, adapter_name=name)
                    self._adapters[name] = (lora, scale)
            pipe.set_adapters(list(wanted), [scale for _, scale in wanted.values()])
            self._adapters = dict(wanted)
        except Exception:
            # A half-loaded adapter must never linger: back to no LoRA at all.
            log.warning("LoRA load failed; unloading every adapter")
            self._unload_all()
            raise
        active = set(pipe.get_active_adapters()) if hasattr(pipe, "get_active_adapters") else set(wanted)
        if active != set(wanted):
            self._unload_all()
            raise RuntimeError(f"adapters {sorted(active)} are active, expected {sorted(wanted)}")

    def _clear_loras(self) -> None:
        """Back to the original weights: restore what is fused, unload adapters."""
        from masuka.core import fastlora

        fused, self._fused = self._fused, None
        try:
            if fused is not None:
                try:
                    fastlora.restore(fused)
                except fastlora.RestoreNotExact as exc:
                    # Cannot happen unless the weights were changed behind our back; the
                    # images stay correct to rounding, so say it loudly and keep serving.
                    self.inexact_restores += 1
                    log.error("LoRA restore was not bit-exact: %s", exc)
            if self._lora_strategy == "adapters" and self._adapters:
                self.loaded.pipe.unload_lora_weights()
        finally:
            self._adapters, self._lora_strategy = {}, "none"

    def _unload_all(self) -> None:
        try:
            self.loaded.pipe.unload_lora_weights()
        finally:
            self._adapters, self._lora_strategy = {}, "none"


IMAGES_HEADROOM = 8  # a random seed leaves room for seed + i of every image
# Share of the GPU's memory the restore fixes of a fused LoRA may take (about 8 GB on an
# 80 GB card); a stronger LoRA keeps the rest of its fixes in CPU RAM.
FIX_GPU_FRACTION = 0.10
