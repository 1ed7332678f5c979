"""The client API: typed `gr.api` endpoints, kept apart from the page's events.

Every endpoint is a thin edge over the Studio's public methods: validation is
all the Studio's; here `ValueError` and `JobFailed` become `gr.Error`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.data_classes import FileData

from masuka.core.runner import JobFailed
from masuka.net.transfers import DownloadError
from masuka.store.jobs import JobNotFound
from masuka.store.jobs import public_record
from masuka.studio import Caller, Studio

log = logging.getLogger(__name__)

# Adding a LoRA is a download plus a check on the CPU (the fit check reads a
# shape-only copy of the transformer); it never touches the pipeline, which loads
# LoRAs inside a job.  So it has its own small group: a long download never holds
# up generation, and a few run side by side.
LORA_ADD_GROUP = "lora-add"
LORA_ADD_LIMIT = 2


def caller_of(request: gr.Request | None) -> Caller:
    """Who is calling, from Gradio's request: the login, the client address, the session."""
    if request is None:
        return Caller()
    client = getattr(request, "client", None)
    return Caller(
        user=getattr(request, "username", None) or None,
        address=getattr(client, "host", None) if client is not None else None,
        session=getattr(request, "session_hash", None) or None,
    )


def register_api(studio: Studio) -> None:
    """Define the API endpoints inside the current `gr.Blocks` context."""

    def generate(
        prompt: str,
        lora: str = "",
        lora_scale: float = 1.0,
        seed: int = -1,
        steps: int | None = None,
        guidance: float | None = None,
        width: int | None = None,
        height: int | None = None,
        num_images: int = 1,
        speed: str = "exact",
        request: gr.Request = None,
    ) -> tuple[list[FileData], dict]:
        """Generate images. `lora` is a LoRA name or "name1:0.8,name2:0.5"; None means the model default.
        `speed` is "exact" (the full computation) or "fast" (step caching: quicker, slightly different)."""
        try:
            req = studio.validate(
                prompt=prompt,
                lora=lora,
                lora_scale=lora_scale,
                seed=seed,
                steps=steps,
                guidance=guidance,
                width=width,
                height=height,
                num_images=num_images,
                speed=speed,
            )
            ticket = studio.submit(req, caller_of(request))
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        try:
            result = studio.outcome(ticket)
        except JobFailed as exc:
            raise gr.Error(f"job {exc.job_id} failed: {exc.reason}") from None
        images = [FileData(path=str(p), orig_name=p.name, mime_type="image/png") for p in result.images]
        return images, public_record(result.record)

    def loras() -> list[dict]:
        """The LoRA library: name, size, sha256, source, format, trigger words, state."""
        return studio.loras()

    def history(limit: int = 50, status: str = "", search: str = "") -> list[dict]:
        """Newest jobs first: job_id, created_at, status, prompt, lora, seed, steps, duration_s, error."""
        try:
            limit = int(limit)
        except (TypeError, ValueError):
            raise gr.Error(f"limit must be a whole number from 1 to 1000, got {limit!r}") from None
        if not 1 <= limit <= 1000:
            raise gr.Error(f"limit must be from 1 to 1000, got {limit}")
        try:
            return studio.history(limit, status or None, search or None)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    def job(job_id: str) -> dict:
        """The full record of one job: parameters, seeds, outputs, error and traceback."""
        try:
            return studio.job(str(job_id))
        except JobNotFound:
            raise gr.Error(f"no job with id {job_id!r}") from None

    def cancel(job_id: str, request: gr.Request = None) -> dict:
        """Cancel a waiting or running job. Returns {"job_id", "cancelled": bool, "status"}."""
        try:
            return studio.cancel(str(job_id), caller_of(request))
        except JobNotFound:
            raise gr.Error(f"no job with id {job_id!r}") from None
        except ValueError as exc:
            raise gr.Error(str(exc)) from None

    def add_lora(source: str = "", name: str = "", file: FileData | None = None) -> dict:
        """Add a LoRA: `source` is an http(s) link to a .safetensors file, a Hub repo `owner/repo`
        (its single .safetensors) or `owner/repo/path/file.safetensors`; or upload `file`
        (gradio_client.handle_file). `name` is optional (letters, digits, '.', '_', '-').
        Returns the LoRA record: name, sha256, size_bytes, source, format, trigger_words, state."""
        return add_lora_to_library(studio, source, name, file).public()

    def delete_lora(name: str) -> dict:
        """Delete a LoRA from the library (refused while a waiting or running job uses it). Returns its record."""
        try:
            record = studio.delete_lora(str(name).strip())
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return {**record.public(), "deleted": True}

    # Generation waits in the runner's one queue (shared with the page and REST), not in
    # a Gradio concurrency group: every call is accepted or refused there.
    gr.api(generate, api_name="generate", concurrency_limit=None)
    gr.api(add_lora, api_name="add_lora", concurrency_id=LORA_ADD_GROUP, concurrency_limit=LORA_ADD_LIMIT)
    gr.api(delete_lora, api_name="delete_lora", concurrency_limit=None)
    # Reads and cancel are not queued: they answer at once, even while the queue is full.
    # (Only queued endpoints could skip the queue; api_open=False closes that for generation.)
    for fn in (loras, history, job, cancel):
        gr.api(fn, api_name=fn.__name__, queue=False)


def uploaded_file(file: Any) -> tuple[Path, str | None] | None:
    """(temp path, original name) of a file uploaded through Gradio, or None.

    gr.api hands the FileData over as a dict; only a file in Gradio's upload folder is
    accepted (a bare path string, or any other place on disk, is refused: a client must
    not make the server import its own files).
    """
    if file is None or file == "":
        return None
    if isinstance(file, FileData):
        raw_path, orig = file.path, file.orig_name
    elif isinstance(file, dict) and isinstance(file.get("path"), str):
        raw_path, orig = file["path"], file.get("orig_name")
    else:
        raise ValueError("file must be an upload (in Python: gradio_client.handle_file(path))")
    from gradio.utils import get_upload_folder

    path = Path(raw_path).resolve()
    if not path.is_relative_to(Path(get_upload_folder()).resolve()) or not path.is_file():
        raise ValueError("file must be an upload (in Python: gradio_client.handle_file(path))")
    return path, orig if isinstance(orig, str) and orig else None


def add_lora_to_library(studio: Studio, source: str, name: str, file: Any, progress=None):
    """The one edge for adding a LoRA (API and page): library errors become gr.Error."""
    source = (source or "").strip() if isinstance(source, str) else ""
    name = (name or "").strip() if isinstance(name, str) else ""
    try:
        upload = uploaded_file(file)
        if upload is not None and source:
            raise ValueError("give either a source or a file to upload, not both")
        if upload is not None:
            return studio.add_lora_file(upload[0], name, original_name=upload[1])
        if not source:
            raise ValueError(
                "nothing to add: give a source (an http(s) link, owner/repo or "
                "owner/repo/path/file.safetensors) or upload a .safetensors file"
            )
        return studio.add_lora_source(source, name, progress=progress)
    except (ValueError, DownloadError) as exc:
        raise gr.Error(str(exc)) from None
    except OSError as exc:
        raise gr.Error(f"could not write the LoRA into the library: {exc.strerror or exc}") from None
