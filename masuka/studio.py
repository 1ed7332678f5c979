"""The Studio: the one object every edge (page, Gradio API, REST) is given.

It is assembled in one place (`build_studio`), frozen once built, and its public
methods are all an edge may use: validation, the runner's one queue, the job
history, the LoRA library and what the loaded model is.  Each piece of state keeps
one owner: the runner (pipeline, active LoRAs, queue), the job store (history),
the LoRA library (its folder); the Studio only routes to them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from masuka.core.ratelimit import RateLimiter, limiter_for
from masuka.core.requests import GenerateRequest
from masuka.core.runner import GenerationResult, Runner, StepCallback, Ticket
from masuka.core.speed import StepCache
from masuka.lora.cache import LoraStateCache
from masuka.lora.library import LoraLibrary, LoraRecord, fit_checker
from masuka.model.defaults import ModelDefaults
from masuka.model.loading import LoadedModel, load_pipeline
from masuka.settings import Settings
from masuka.store.backup import DbBackup
from masuka.store.jobs import JobNotFound, JobStore, public_record, restore_backup
from masuka.store.outputs import remove_leftovers

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, "int | None"], None]


class NotYourJob(ValueError):
    """A caller acting on a job that another login started."""


@dataclass(frozen=True)
class Caller:
    """Who is asking, as the edge knows it: the login, the client address, the browser session."""

    user: str | None = None
    address: str | None = None
    session: str | None = None

    @property
    def key(self) -> str:
        """The rate-limit key: `user:<name>`, `ip:<address>`, `session:<hash>` or `local`.

        Through a Gradio share link every visitor comes from the tunnel's local
        address, so without a password they would share one budget; a share link
        always has a password here."""
        if self.user:
            return f"user:{self.user}"
        if self.address:
            return f"ip:{self.address}"
        return f"session:{self.session}" if self.session else "local"


@dataclass(frozen=True)
class ModelInfo:
    spec: str
    description: str
    device: str
    dtype: str
    is_demo: bool
    memory_profile: str
    defaults: ModelDefaults


@dataclass(frozen=True)
class Studio:
    settings: Settings
    jobs: JobStore
    library: LoraLibrary
    runner: Runner
    loaded: LoadedModel
    rate_limiter: RateLimiter | None = None
    backup: DbBackup | None = None

    # ---- generation ----------------------------------------------------------
    def validate(self, **raw: Any) -> GenerateRequest:
        """Every bound on a request, in one place (ValueError naming the parameter)."""
        return self.runner.validate(**raw)

    def submit(self, request: GenerateRequest, caller: Caller, on_step: StepCallback | None = None) -> Ticket:
        """Queue a job for any way in: the rate limit and the queue cap apply here (ValueError)."""
        if self.rate_limiter is not None:
            self.rate_limiter.check(caller.key)
        return self.runner.submit(request, user=caller.user, session=caller.session, on_step=on_step)

    def generate(
        self, request: GenerateRequest, caller: Caller, on_step: StepCallback | None = None
    ) -> GenerationResult:
        """Queue and wait: the result, or JobFailed."""
        return self.outcome(self.submit(request, caller, on_step))

    def outcome(self, ticket: Ticket) -> GenerationResult:
        """Wait for a submitted job's end: the result, or JobFailed."""
        ticket.done.wait()
        return self.runner.collect(ticket)

    def position(self, job_id: str) -> int | None:
        """0 while the job runs, n when it is n-th in line, None when it is not in the queue."""
        return self.runner.position(job_id)

    def queue_length(self) -> int:
        return self.runner.queue_length()

    def wait(self, job_id: str, timeout: float | None = None) -> bool:
        """Block until the job leaves the queue (True), or the timeout passes (False)."""
        return self.runner.wait(job_id, timeout)

    def wait_for_change(self, timeout: float) -> None:
        """Block until a step ends or a job starts or ends anywhere in the queue, or the timeout."""
        self.runner.changed(timeout)

    def progress(self, job_id: str) -> tuple[int, int] | None:
        """(steps done, steps in all) of a job still in the runner, else None."""
        ticket = self.runner.ticket(job_id)
        return None if ticket is None else (ticket.steps_done, ticket.steps_total)

    def cancel(self, job_id: str, caller: Caller) -> dict[str, Any]:
        """Cancel a waiting or running job (another login's job is refused with NotYourJob)."""
        record = self._record(job_id)
        if caller.user and record.get("user") and record["user"] != caller.user:
            raise NotYourJob(f"job {job_id} belongs to another user")
        cancelled = self.runner.cancel(str(job_id))
        return {"job_id": str(job_id), "cancelled": cancelled, "status": self.jobs.get(str(job_id))["status"]}

    def cancel_mine(self, caller: Caller) -> str | None:
        """Cancel the caller's own job: the one its browser session started and, when the app has
        a password, only if it is that login's job too.  Its id, or None."""
        return self.runner.cancel_session(caller.session or "", user=caller.user)

    def running_job_id(self) -> str | None:
        return self.runner.running_job_id()

    # ---- records -------------------------------------------------------------
    def job(self, job_id: str) -> dict[str, Any]:
        """One job's public record (JobNotFound for an unknown id)."""
        return public_record(self._record(job_id))

    def _record(self, job_id: Any) -> dict[str, Any]:
        try:
            return self.jobs.get(str(job_id))
        except ValueError:  # not a job id at all (empty, too long): unknown all the same
            raise JobNotFound(str(job_id)) from None

    def history(self, limit: int = 50, status: str | None = None, search: str | None = None) -> list[dict]:
        """Newest jobs first, as table rows."""
        return self.jobs.history(limit=limit, status=status or None, search=search or None)

    def active_jobs(self, *, user: str | None = None, job_ids: list[str] | None = None) -> list[dict[str, Any]]:
        """Queued or running jobs of one login, or among the given ids (a browser's own), oldest first."""
        records = [self.jobs.get(t.job_id) for t in self.runner.tickets()]
        if user is not None:
            records = [r for r in records if r.get("user") == user]
        if job_ids is not None:
            wanted = set(job_ids)
            records = [r for r in records if r["job_id"] in wanted]
        return [public_record(r) for r in records if r["status"] in ("queued", "running")]

    # ---- LoRAs ---------------------------------------------------------------
    def loras(self) -> list[dict[str, Any]]:
        """The library (rescanned): name, size, sha256, source, format, trigger words, state."""
        self.library.scan()
        return [r.public() for r in self.library.list()]

    def lora_names(self, *, usable_only: bool = True, rescan: bool = False) -> list[str]:
        if rescan:
            self.library.scan()
        if usable_only:
            return list(self.library.usable_names())
        return [r.name for r in self.library.list()]

    def lora_table(self, *, rescan: bool = False):
        if rescan:
            self.library.scan()
        return self.library.table()

    @property
    def lora_folder(self) -> Path:
        return self.library.folder

    def add_lora_file(self, file: Path, name: str = "", original_name: str | None = None) -> LoraRecord:
        return self.library.add_file(file, name, source="upload", original_name=original_name)

    def add_lora_source(self, source: str, name: str = "", progress: ProgressCallback | None = None) -> LoraRecord:
        return self.library.add_source(source, name, progress=progress)

    def delete_lora(self, name: str) -> LoraRecord:
        """Delete a LoRA unless a waiting or running job uses it (LoraInUse)."""
        return self.runner.delete_lora(name)

    # ---- the model -----------------------------------------------------------
    def model_info(self) -> ModelInfo:
        loaded = self.loaded
        return ModelInfo(
            spec=loaded.spec,
            description=loaded.description,
            device=str(loaded.device),
            dtype=str(loaded.dtype).replace("torch.", ""),
            is_demo=loaded.is_demo,
            memory_profile=loaded.memory_profile,
            defaults=loaded.defaults,
        )

    @property
    def device(self) -> Any:
        return self.loaded.device

    @property
    def outputs_dir(self) -> Path:
        return self.settings.paths.outputs

    def close(self) -> None:
        """Stop the queue (waiting jobs are cancelled), flush the backup, close the store."""
        self.runner.close()
        if self.backup is not None:
            self.backup.close()
        self.jobs.close()


def build_studio(settings: Settings, *, loaded: LoadedModel | None = None) -> Studio:
    """Create the home folder, stores and the runner, and load the model (slow)."""
    paths = settings.paths
    paths.create()
    if paths.db_backup is not None:
        restore_backup(paths.db, paths.db_backup)
    jobs = JobStore(paths.db)
    interrupted = jobs.recover_interrupted()
    if interrupted:
        log.warning("marked %d job(s) interrupted (their process ended): %s", len(interrupted), interrupted)
    remove_leftovers(paths.outputs, jobs)  # images and temp files of jobs that ended without them
    if loaded is None:
        loaded = load_pipeline(settings)
    library = LoraLibrary(
        paths.loras,
        max_bytes=settings.lora_max_bytes,
        fits=fit_checker(loaded.pipe.transformer),
        allow_private=settings.allow_private_urls,
        lock_dir=paths.lora_locks,
        download_timeout_s=settings.download_timeout_s,
        download_min_rate_kib=settings.download_min_rate_kib,
    )
    library.scan()
    backup = DbBackup(jobs, paths.db_backup) if paths.db_backup is not None else None
    runner = Runner(
        loaded,
        jobs,
        library,
        paths.outputs,
        lora_cache=LoraStateCache(max_bytes=settings.lora_cache_mb * 2**20),
        queue_size=settings.queue_size,
        job_listeners=[backup.request] if backup is not None else [],
        step_cache=StepCache.from_settings(settings.cache, settings.cache_threshold),
    )
    if backup is not None:
        backup.request()  # the interrupted marks above belong in the backup too
    return Studio(
        settings=settings,
        jobs=jobs,
        library=library,
        runner=runner,
        loaded=loaded,
        rate_limiter=limiter_for(settings.rate_limit_per_minute),
        backup=backup,
    )
