"""The runner: owns the ONE pipeline, the active LoRA set and the one FIFO queue of jobs.

Every way in (the page, gradio_client, REST, later workers) calls `submit`, which
records the job as queued and puts it at the back of the queue; one worker thread
takes jobs from the front, one at a time.  Waiting positions, cancel of a waiting or
running job, and the queue cap are all answered here, so every way in sees the same
queue.  Every job is recorded in the job store from the moment it is accepted until
it ends, whatever happens.
"""

from __future__ import annotations

import collections
import gc
import logging
import random
import threading
import time
import traceback as tb
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from masuka.core.lorastate import LoraState
from masuka.core.speed import StepCache, step_cache
from masuka.core.requests import MAX_SEED, GenerateRequest, LoraChoice, parse_lora_spec, validate_request
from masuka.lora.cache import LoraStateCache
from masuka.lora.types import LoraInUse, LoraResolver
from masuka.model import plan
from masuka.model.compiled import is_compiled
from masuka.model.loading import LoadedModel
from masuka.store.jobs import JobStore
from masuka.store.outputs import image_metadata, save_image

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int], None]  # (steps done, steps total) over the whole job
IMAGES_HEADROOM = 8  # a random seed leaves room for seed + i of every image
DEFAULT_QUEUE_SIZE = 20


class JobCancelled(Exception):
    """Raised inside the denoising loop to stop a job at the next step."""


class JobFailed(RuntimeError):
    """A job that was accepted and then failed; the store holds its traceback."""

    def __init__(self, job_id: str, reason: str):
        super().__init__(f"job {job_id} failed: {reason}")
        self.job_id = job_id
        self.reason = reason


class QueueFull(ValueError):
    """The queue holds as many waiting jobs as it may; the message says how many."""


@dataclass
class GenerationResult:
    job_id: str
    status: str  # completed or cancelled
    images: list[Path]
    seeds: list[int]
    record: dict[str, Any]


@dataclass
class Ticket:
    """A job in the runner: its place in the queue, its progress and, at the end, its outcome."""

    job_id: str
    request: GenerateRequest
    params: dict[str, Any]
    seeds: list[int]
    user: str | None
    session: str | None
    on_step: StepCallback | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    steps_done: int = 0
    steps_total: int = 0
    result: GenerationResult | None = None
    failure: JobFailed | None = None

    @property
    def loras(self) -> frozenset[str]:
        return frozenset(lc.name for lc in self.request.loras)

    def outcome(self) -> GenerationResult:
        """The result once done; raises JobFailed for a failed job."""
        if self.failure is not None:
            raise self.failure
        assert self.result is not None, "outcome() before the job ended"
        return self.result


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


class NonFiniteImage(ValueError):
    """The model's output held NaN or Inf (float16 overflow): no image is kept."""


def _check_finite(tensor: Any, what: str, dtype: Any) -> None:
    import torch

    if not bool(torch.isfinite(tensor).all()):
        hint = (
            "float16 overflowed: start with --dtype bfloat16 on a GPU that has it (compute capability 8.0+), "
            "or --dtype float32"
            if dtype == torch.float16
            else f"the model computes in {str(dtype).replace('torch.', '')}"
        )
        raise NonFiniteImage(f"the {what} came out as NaN/Inf, so no image was saved; {hint}")


def decode_latents(pipe: Any, latents: Any, height: int, width: int, dtype: Any) -> Any:
    """Packed FLUX latents -> one PIL image, like FluxPipeline's own decode, but in the VAE's dtype.

    FluxPipeline hands the latents to the VAE in their own dtype; under float16 the FLUX VAE
    overflows into NaN/black images (the loader keeps the VAE in float32 there).  Both the
    latents and the pixels are checked, so a broken image is never saved as completed.
    """
    import torch

    _check_finite(latents, "denoised latent", dtype)
    vae = pipe.vae
    with torch.inference_mode():
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        pixels = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
    pipe.maybe_free_model_hooks()  # under model offload, the VAE goes back to the CPU as the pipeline's would
    _check_finite(pixels, "decoded image", dtype)
    return pipe.image_processor.postprocess(pixels, output_type="pil")[0]


class Runner:
    def __init__(
        self,
        loaded: LoadedModel,
        jobs: JobStore,
        loras: LoraResolver,
        outputs_dir: Path,
        *,
        lora_cache: LoraStateCache | None = None,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        job_listeners: list[Callable[[str], None]] | None = None,
        step_cache: StepCache | None = None,
    ):
        self.loaded = loaded
        self.step_cache = step_cache if step_cache is not None else StepCache()  # what a fast job uses
        self.jobs = jobs
        self.loras = loras
        self.outputs_dir = outputs_dir
        self.queue_size = queue_size
        self.lora_cache = lora_cache if lora_cache is not None else LoraStateCache()
        self._lora_state = LoraState(loaded.pipe, loras, self.lora_cache, loaded.device, fp8=loaded.fp8)
        self._pipe_lock = threading.Lock()  # the worker's job, or set_loras from outside a job
        self._state = threading.Condition()  # guards _waiting, _running, _tickets, _closed
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._running: Ticket | None = None
        self._tickets: dict[str, Ticket] = {}  # the jobs waiting or running, by id
        self._worker: threading.Thread | None = None
        self._closed = False
        # Called with the job id once a job's end is recorded (e.g. the history backup).
        self._job_listeners = tuple(job_listeners or ())
        self._exec_device: Any = None  # see _execution_device

    # ---- read-only views -------------------------------------------------
    @property
    def pipe(self):
        return self.loaded.pipe

    @property
    def inexact_restores(self) -> int:
        return self._lora_state.inexact_restores

    @property
    def lora_strategy(self) -> str:
        """How the active LoRAs are applied: "fused" (fast path), "adapters" (diffusers/peft) or "none"."""
        return self._lora_state.strategy.value

    def active_loras(self) -> list[dict[str, Any]]:
        return self._lora_state.held()

    def lora_status(self) -> dict[str, Any]:
        """What the pipeline holds now (for the UI, benchmarks and tests)."""
        return self._lora_state.status()

    def loras_in_use(self) -> set[str]:
        """LoRA names the running job asked for (deleting them is refused).

        A LoRA merely still held by the pipeline from an earlier job does not count:
        the next job's swap drops whatever it does not ask for.
        """
        with self._state:
            return set(self._running.loras) if self._running is not None else set()

    def running_job_id(self) -> str | None:
        with self._state:
            return self._running.job_id if self._running else None

    def position(self, job_id: str) -> int | None:
        """0 while the job runs, n when n-1 jobs wait before it, None when it is not here."""
        with self._state:
            if self._running is not None and self._running.job_id == job_id:
                return 0
            for i, ticket in enumerate(self._waiting, start=1):
                if ticket.job_id == job_id:
                    return i
        return None

    def queue_length(self) -> int:
        with self._state:
            return len(self._waiting)

    def tickets(self) -> list[Ticket]:
        """The running job, then the waiting ones in order."""
        with self._state:
            return ([self._running] if self._running is not None else []) + list(self._waiting)

    def ticket(self, job_id: str) -> Ticket | None:
        with self._state:
            return self._tickets.get(job_id)

    # ---- validation ------------------------------------------------------
    def validate(self, **raw: Any) -> GenerateRequest:
        pipe = self.loaded.pipe
        request = validate_request(
            **raw,
            defaults=self.loaded.defaults,
            t5_tokenizer=getattr(pipe, "tokenizer_2", None),
            clip_tokenizer=getattr(pipe, "tokenizer", None),
        )
        transformer = getattr(pipe, "transformer", None)
        if request.speed == "fast" and transformer is not None and is_compiled(transformer):
            # The cache's hooks call torch.compiler.disable()d code inside the fullgraph-compiled blocks:
            # such a job fails in the pipeline (seen on the tiny model), so it is refused before it queues.
            raise ValueError("speed 'fast' is not available while the model is compiled (--compile): use speed "
                             "'exact', or start without --compile to use fast")
        return request

    # ---- the queue -------------------------------------------------------
    def submit(
        self,
        request: GenerateRequest,
        *,
        user: str | None = None,
        session: str | None = None,
        on_step: StepCallback | None = None,
    ) -> Ticket:
        """Record the job as queued and put it at the back of the queue (raises QueueFull)."""
        with self._state:
            if self._closed:
                raise RuntimeError("the runner is closed")
            if len(self._waiting) >= self.queue_size:
                raise QueueFull(
                    f"the queue is full ({len(self._waiting)} jobs waiting, the limit is {self.queue_size}); "
                    "try again in a minute"
                )
            seed = request.seed if request.seed >= 0 else random.randint(0, MAX_SEED - IMAGES_HEADROOM)
            seed = min(seed, MAX_SEED - (request.num_images - 1))
            seeds = [seed + i for i in range(request.num_images)]
            params = request.params() | {"model": self.loaded.spec, "requested_seed": request.seed}
            if request.speed == "fast":
                params |= self.step_cache.params()
            job_id = self.jobs.create(
                params=params,
                loras=[{"name": lc.name, "scale": lc.scale} for lc in request.loras],
                user=user,
                session=session,
                status="queued",
                seeds=seeds,  # one write: no set_seeds round trip after
            )
            ticket = Ticket(job_id, request, params, seeds, user, session, on_step)
            ticket.steps_total = request.steps * request.num_images
            self._waiting.append(ticket)
            self._tickets[job_id] = ticket
            self._ensure_worker()
            self._state.notify_all()
        return ticket

    def wait(self, job_id: str, timeout: float | None = None) -> bool:
        """Block until the job ends (True) or the timeout passes (False)."""
        ticket = self.ticket(job_id)
        return True if ticket is None else ticket.done.wait(timeout)

    def changed(self, timeout: float) -> None:
        """Block until something in the queue changes (progress, a start, an end) or the timeout."""
        with self._state:
            self._state.wait(timeout)

    def generate(
        self,
        request: GenerateRequest,
        *,
        user: str | None = None,
        session: str | None = None,
        on_step: StepCallback | None = None,
    ) -> GenerationResult:
        """Submit and wait for the end: the result, or JobFailed."""
        ticket = self.submit(request, user=user, session=session, on_step=on_step)
        ticket.done.wait()
        return self.collect(ticket)

    def collect(self, ticket: Ticket) -> GenerationResult:
        """The outcome of an ended job: its result, or JobFailed."""
        return ticket.outcome()

    def cancel(self, job_id: str) -> bool:
        """Cancel a waiting or running job; False when it is neither here."""
        with self._state:
            if self._running is not None and self._running.job_id == job_id:
                self._running.cancel.set()
                log.info("cancel requested for running job %s", job_id)
                return True
            for ticket in self._waiting:
                if ticket.job_id == job_id:
                    self._waiting.remove(ticket)
                    break
            else:
                return False
        self._end_waiting(ticket)
        return True

    def cancel_session(self, session: str, user: str | None = None) -> str | None:
        """Cancel the newest job of one browser session (never anyone else's): the running one
        first, else its last waiting one.  With `user`, the job must be that login's too, so a
        session id alone (which a stranger might learn) cancels nothing of another login.
        Returns the job id, or None."""
        if not session:
            return None

        def mine(ticket: Ticket | None) -> bool:
            return ticket is not None and ticket.session == session and (user is None or ticket.user == user)

        with self._state:
            running = self._running
            if mine(running):
                running.cancel.set()
                return running.job_id
            waiting = [t for t in self._waiting if mine(t)]
        if waiting and self.cancel(waiting[-1].job_id):
            return waiting[-1].job_id
        return None

    def close(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, cancel the waiting ones, let the running one end."""
        with self._state:
            self._closed = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            if self._running is not None:
                self._running.cancel.set()
            self._state.notify_all()
        for ticket in waiting:
            self._end_waiting(ticket)
        if self._worker is not None:
            self._worker.join(timeout)

    def _end_waiting(self, ticket: Ticket) -> None:
        self.jobs.mark_cancelled(ticket.job_id, reason="cancelled by the user before it started")
        log.info("job %s cancelled while waiting", ticket.job_id)
        ticket.result = GenerationResult(ticket.job_id, "cancelled", [], ticket.seeds, self.jobs.get(ticket.job_id))
        self._finish(ticket)

    def _finish(self, ticket: Ticket) -> None:
        with self._state:
            # The caller holds its ticket; the runner forgets ended jobs (the store has them).
            self._tickets.pop(ticket.job_id, None)
            ticket.done.set()
            self._state.notify_all()
        self._job_ended(ticket.job_id)

    def _ensure_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = threading.Thread(target=self._work, name="masuka-runner", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        while True:
            with self._state:
                while not self._waiting and not self._closed:
                    self._state.wait()
                if not self._waiting:
                    return
                ticket = self._waiting.popleft()
                self._running = ticket
                self._state.notify_all()
            try:
                with self._pipe_lock:
                    self._run(ticket)
            except Exception as exc:  # the store failed while recording; the worker must live on
                log.exception("job %s could not be recorded", ticket.job_id)
                if ticket.result is None and ticket.failure is None:
                    ticket.failure = JobFailed(ticket.job_id, friendly_error(exc))
            finally:
                with self._state:
                    self._running = None
                self._release_memory()
                self._finish(ticket)

    def activation_reserve(self, request: GenerateRequest) -> int:
        """GPU bytes this job needs beside the weights (the memory plan's working memory for its
        size): LoRA restore fixes never take them.  0 off CUDA, where no fix budget applies."""
        if getattr(self.loaded.device, "type", str(self.loaded.device)) != "cuda":
            return 0
        vae = getattr(self.loaded.pipe, "vae", None)
        return max(
            plan.transformer_working(
                request.width, request.height, self.loaded.defaults.max_sequence_length, plan.dtype_name(self.loaded.dtype)
            ),
            plan.vae_decode_working(request.width, request.height, plan.dtype_name(getattr(vae, "dtype", self.loaded.dtype))),
        )

    # ---- one job -----------------------------------------------------------
    def _run(self, ticket: Ticket) -> None:
        import torch

        job_id, request = ticket.job_id, ticket.request
        started = time.perf_counter()
        saved: list[Path] = []
        try:
            if ticket.cancel.is_set():
                raise JobCancelled()
            self.jobs.mark_running(job_id)
            self._lora_state.apply(request.loras, reserve_bytes=self.activation_reserve(request))
            pipe = self.loaded.pipe

            def step_end(_pipe, step: int, _t, kwargs):
                ticket.steps_done += 1
                if ticket.on_step is not None:
                    ticket.on_step(ticket.steps_done, ticket.steps_total)
                with self._state:
                    self._state.notify_all()
                if ticket.cancel.is_set():
                    raise JobCancelled()
                return kwargs

            exec_device = self._execution_device()
            with torch.inference_mode():
                prompt_embeds, pooled, _ids = pipe.encode_prompt(
                    prompt=request.prompt,
                    prompt_2=None,
                    device=exec_device,
                    max_sequence_length=self.loaded.defaults.max_sequence_length,
                )
            images = []
            for image_seed in ticket.seeds:
                if ticket.cancel.is_set():
                    raise JobCancelled()
                # One generator per image, so image i of a job is reproduced by seed + i alone.
                generator = torch.Generator(device="cpu").manual_seed(image_seed)
                # The cache goes on for this image only and off again in a finally (fresh state per
                # image; the next exact job, or a failure here, leaves the transformer as loaded).
                cache = self.step_cache if request.speed == "fast" else None
                with torch.inference_mode(), step_cache(pipe.transformer, cache, request.steps):
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
                        output_type="latent",  # decoded below, in the VAE's own dtype, and checked
                    )
                    images.append(decode_latents(pipe, out.images, request.height, request.width, self.loaded.dtype))
            for index, (image, image_seed) in enumerate(zip(images, ticket.seeds)):
                meta = image_metadata(ticket.params, seed=image_seed, model=self.loaded.spec, job_id=job_id)
                saved.append(save_image(image, self.outputs_dir, meta, stem=f"{job_id}-{index}-{image_seed}"))
            outputs = [str(p) for p in saved]
            self.jobs.mark_completed(job_id, seeds=ticket.seeds, outputs=outputs, notes=list(request.notes))
            log.info("job %s completed in %.2f s", job_id, time.perf_counter() - started)
            ticket.result = GenerationResult(job_id, "completed", saved, ticket.seeds, self.jobs.get(job_id))
        except JobCancelled:
            self._discard(saved)
            self.jobs.mark_cancelled(job_id, reason="cancelled by the user")
            log.info("job %s cancelled", job_id)
            ticket.result = GenerationResult(job_id, "cancelled", [], ticket.seeds, self.jobs.get(job_id))
        except Exception as exc:  # any failure is recorded, then reported
            self._discard(saved)
            reason = friendly_error(exc)
            try:
                self.jobs.mark_failed(job_id, error=reason, traceback=tb.format_exc())
            finally:
                log.warning("job %s failed: %s", job_id, reason)
                ticket.failure = JobFailed(job_id, reason)
                # The traceback's frames hold tensors; drop them before memory is released.
                del exc
                gc.collect()

    def _execution_device(self) -> Any:
        """Where the prompt embeddings go.  Fixed once the memory profile has placed the weights
        (at load; nothing moves them later), while diffusers' property walks every module for
        offload hooks on each read (1.2 ms on the tiny model, more on FLUX): so read once."""
        if self._exec_device is None:
            self._exec_device = getattr(self.loaded.pipe, "_execution_device", self.loaded.device)
        return self._exec_device

    def _job_ended(self, job_id: str) -> None:
        for listener in self._job_listeners:
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

    # ---- LoRAs outside a job -------------------------------------------------
    def set_loras(self, loras: str | tuple[LoraChoice, ...]) -> dict[str, Any]:
        """Make the pipeline hold exactly these LoRAs now, outside a job (warm-up, benchmarks);
        the same path a job takes.  ``loras`` is a spec like "a:0.8,b" or LoraChoice tuple."""
        choices = parse_lora_spec(loras) if isinstance(loras, str) else tuple(loras)
        with self._pipe_lock:
            self._lora_state.apply(choices)
        return self.lora_status()

    def delete_lora(self, name: str):
        """Delete a LoRA from the library unless a waiting or running job uses it; returns its record."""
        self.loras.get(name)  # scan first if need be, outside the state lock
        with self._state:  # no job can start using it between the check and the delete
            users = ([self._running] if self._running is not None else []) + list(self._waiting)
            for ticket in users:
                if name in ticket.loras:
                    state = "running" if ticket is self._running else "waiting"
                    raise LoraInUse(
                        f"LoRA {name!r} is used by the {state} job {ticket.job_id}; "
                        "delete it when that job has ended (or cancel it)"
                    )
            record = self.loras.delete(name)
        self.lora_cache.forget(record.sha256)
        return record
