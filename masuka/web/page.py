"""The studio page: wiring only.  Built from the Studio it is given, using its public methods.

Concurrency: generation waits in the runner's one FIFO queue (shared with the API
and REST), and the page shows the place in it that the runner reports.  Every
other event (validation, history, job detail, info, form filling) runs with no
limit, so the page answers while a job runs.  Cancel is not queued at all
(`queue=False`): it must work even when the queue is full.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import gradio as gr

from masuka.core.runner import GenerationResult, JobFailed
from masuka.store.jobs import JOB_STATUSES, JobNotFound
from masuka.studio import Studio
from masuka.web.gradio_api import caller_of, register_api
from masuka.store.outputs import read_metadata
from masuka.core.requests import (
    GUIDANCE_MAX,
    GUIDANCE_MIN,
    IMAGES_MAX,
    IMAGES_MIN,
    LORA_SCALE_MAX,
    LORA_SCALE_MIN,
    MAX_LORAS,
    MAX_SEED,
    SIZE_MAX,
    SIZE_MIN,
    SIZE_STEP,
    STEPS_MAX,
    STEPS_MIN,
    ModelDefaults,
    aspect_size,
)

log = logging.getLogger(__name__)

EXAMPLE_PROMPTS = (
    "a red fox sleeping in fresh snow, morning light, 85mm photo",
    "a lighthouse on a cliff at dusk, dramatic clouds, oil painting",
    "isometric cozy coffee shop interior, soft pastel colors, 3d render",
    "portrait of an old fisherman, weathered face, black and white film photo",
    "a bowl of ramen on a wooden table, steam rising, top-down food photography",
    "neon-lit rainy street in Tokyo at night, reflections, cinematic",
)
ASPECTS = ("1:1", "4:3", "3:4", "3:2", "2:3", "16:9", "9:16")
NO_LORA = ""
ALL_STATUSES = "all"
HISTORY_ROWS = 200
CANCEL_WAIT_S = 30.0  # a step ends within this even on a slow GPU
INFO_EVERY_S = 5.0
PROGRESS_EVERY_S = 0.5  # the longest a waiting page goes without a progress update
HISTORY_HEADERS = {
    "job_id": "Job",
    "created_at": "Created",
    "status": "Status",
    "prompt": "Prompt",
    "lora": "LoRAs",
    "seed": "Seed",
    "requested_seed": "Asked seed",
    "steps": "Steps",
    "duration_s": "Time (s)",
    "error": "Error",
}  # the first column must stay the job id: selecting a row reads it

# Events that never wait for the GPU and never make anyone wait.
FREE: dict[str, Any] = {"concurrency_limit": None, "api_visibility": "private"}
UNQUEUED: dict[str, Any] = {"queue": False, "api_visibility": "private"}


# ---- pure helpers (tested without a browser) -------------------------------
@dataclass
class FormSettings:
    """What the Generate form holds; built from a job record or an image's metadata."""

    prompt: str
    seed: int
    steps: int
    guidance: float
    width: int
    height: int
    num_images: int = 1
    loras: list[tuple[str, float]] = field(default_factory=list)


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def settings_from_record(record: dict[str, Any], defaults: ModelDefaults) -> FormSettings:
    """A job's settings; the seed is the one actually used, so the job is reproduced."""
    seeds = record.get("seeds") or []
    seed = seeds[0] if seeds else _pick(record.get("seed"), -1)
    return FormSettings(
        prompt=record.get("prompt") or "",
        seed=int(seed),
        steps=int(_pick(record.get("steps"), defaults.steps)),
        guidance=float(_pick(record.get("guidance"), defaults.guidance)),
        width=int(_pick(record.get("width"), defaults.width)),
        height=int(_pick(record.get("height"), defaults.height)),
        num_images=int(_pick(record.get("num_images"), 1)),
        loras=[(lc["name"], float(lc.get("scale", 1.0))) for lc in record.get("loras") or []],
    )


def settings_from_image(meta: dict[str, Any], defaults: ModelDefaults) -> FormSettings:
    """One image's settings (from `read_metadata`): its own seed, one image."""
    return settings_from_record({**meta, "seeds": [], "num_images": 1}, defaults)


def lora_spec(slots: Sequence[tuple[str | None, float | None]]) -> str:
    """LoRA slots -> the "name:scale,..." spec `Studio.validate` reads; empty slots are skipped."""
    parts = []
    for name, scale in slots:
        if name:
            parts.append(f"{name}:{1.0 if scale is None else float(scale):g}")
    return ",".join(parts)


def aspect_presets(defaults: ModelDefaults) -> dict[str, tuple[int, int]]:
    """Each preset's size at the model's default pixel count."""
    area = defaults.width * defaults.height
    return {name: aspect_size(*map(int, name.split(":")), area) for name in ASPECTS}


def aspect_of(width: int, height: int, presets: dict[str, tuple[int, int]]) -> str | None:
    for name, size in presets.items():
        if size == (width, height):
            return name
    return None


def _seconds(value: Any) -> str:
    return "" if value is None else f" in {float(value):.1f} s"


def result_line(result: GenerationResult) -> str:
    record = result.record
    if result.status == "cancelled":
        return f"■ Job `{result.job_id}` cancelled — no images kept."
    seeds = ", ".join(str(s) for s in result.seeds)
    n = len(result.images)
    line = (
        f"✓ Job `{result.job_id}` done{_seconds(record.get('duration_s'))} · "
        f"{n} image{'s' if n != 1 else ''} · seed{'s' if n != 1 else ''} {seeds}"
    )
    for note in record.get("notes") or []:
        line += f"  \nNote: {note}"
    return line


def failure_line(job_id: str, reason: str) -> str:
    return f"✗ Job `{job_id}` failed: {reason}  \nThe full traceback is in History."


@dataclass(frozen=True)
class MemoryInUse:
    kind: str  # "GPU": what torch holds on the device; "RAM": this process's resident set
    used: int  # bytes
    total: int  # bytes of the GPU, or of the machine's RAM


def memory_in_use(device: Any) -> MemoryInUse:
    """The info line's memory figure (two counter reads: cheap enough for a timer)."""
    import psutil
    import torch

    if getattr(device, "type", str(device)) == "cuda" and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(device).total_memory
        return MemoryInUse("GPU", int(torch.cuda.memory_allocated(device)), int(total))
    return MemoryInUse("RAM", int(psutil.Process().memory_info().rss), int(psutil.virtual_memory().total))


def info_markdown(studio: Studio) -> str:
    loaded = studio.model_info()
    mem = memory_in_use(studio.device)
    what = "GPU memory" if mem.kind == "GPU" else "RAM (this process)"
    parts = [
        f"**{loaded.spec}**",
        f"{loaded.device}",
        loaded.dtype,
        f"{what} {mem.used / 2**30:.2f} / {mem.total / 2**30:.1f} GiB",
    ]
    if loaded.memory_profile != "full":
        parts.append(f"memory profile {loaded.memory_profile}")
    parts.append("generating" if studio.running_job_id() else "idle")  # not the job id: that is the owner's
    return " · ".join(parts)


def job_markdown(record: dict[str, Any]) -> str:
    icon = {"completed": "✓", "failed": "✗", "cancelled": "■", "running": "…", "queued": "…"}.get(record["status"], "⚠")
    loras = ", ".join(f"{lc['name']} × {lc['scale']:g}" for lc in record.get("loras") or []) or "none"
    seeds = ", ".join(str(s) for s in record.get("seeds") or []) or "—"
    created = datetime.fromisoformat(record["created_at"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    duration = "" if record.get("duration_s") is None else f" · took {record['duration_s']:.2f} s"
    who = f" · by {record['user']}" if record.get("user") else ""
    lines = [
        f"### {icon} Job `{record['job_id']}` — {record['status']}",
        f"**Prompt** {_plain(record.get('prompt') or '')}",
        f"**Size** {record.get('width')} × {record.get('height')} · **Steps** {record.get('steps')} · "
        f"**Guidance** {record.get('guidance')} · **Images** {record.get('num_images')}",
        f"**Seeds** {seeds}",
        f"**LoRAs** {_plain(loras)}",
        f"**Model** {_plain(record.get('model') or '')}",
        f"**Created** {created}{duration}{who}",
    ]
    lines += [f"Note: {_plain(n)}" for n in record.get("notes") or []]
    return lines[0] + "\n\n" + "  \n".join(lines[1:])


def _plain(text: str) -> str:
    """User text shown as text, not as Markdown."""
    return "".join("\\" + c if c in "\\`*_{}[]()#+-.!|<>~" else c for c in str(text)).replace("\n", " ")


def _columns(n: int) -> int:
    """One image fills the gallery; more share it."""
    return 1 if n <= 1 else 2 if n <= 4 else 3


def _gallery_items(paths: Sequence[str | Path], seeds: Sequence[int]) -> list[tuple[str, str]]:
    return [(str(p), f"seed {s}") for p, s in zip(paths, seeds)]


def job_images(record: dict[str, Any]) -> list[tuple[str, int]]:
    """(path, seed) of a job's images still on disk."""
    pairs = zip(record.get("outputs") or [], record.get("seeds") or [])
    return [(str(p), int(s)) for p, s in pairs if Path(p).is_file()]


# ---- the page ----------------------------------------------------------------
@dataclass
class Form:
    """The Generate form's components, in the order the handlers take them."""

    prompt: gr.Textbox
    seed: gr.Number
    steps: gr.Slider
    guidance: gr.Slider
    width: gr.Slider
    height: gr.Slider
    num_images: gr.Slider
    aspect: gr.Radio
    loras: list[tuple[gr.Dropdown, gr.Slider]]

    def inputs(self) -> list[gr.components.Component]:
        fields = [self.prompt, self.seed, self.steps, self.guidance, self.width, self.height, self.num_images]
        return fields + [c for pair in self.loras for c in pair]

    def fill_targets(self) -> list[gr.components.Component]:
        return self.inputs() + [self.aspect]


def _lora_choices(studio: Studio, extra: Sequence[str] = (), *, rescan: bool = False) -> list[tuple[str, str]]:
    names = studio.lora_names(rescan=rescan)
    names += [n for n in extra if n and n not in names]  # a reused LoRA that is gone: the job says so
    return [("None", NO_LORA)] + [(n, n) for n in names]


def _fill(studio: Studio, form_settings: FormSettings, presets: dict[str, tuple[int, int]]) -> list[Any]:
    fs = form_settings
    slots = fs.loras[:MAX_LORAS] + [(NO_LORA, 1.0)] * (MAX_LORAS - len(fs.loras))
    choices = _lora_choices(studio, [n for n, _ in slots])
    values: list[Any] = [fs.prompt, fs.seed, fs.steps, fs.guidance, fs.width, fs.height, fs.num_images]
    for name, scale in slots:
        values += [gr.update(choices=choices, value=name), scale]
    return values + [aspect_of(fs.width, fs.height, presets)]


def _build_form(studio: Studio, presets: dict[str, tuple[int, int]]) -> tuple[Form, dict[str, Any]]:
    defaults = studio.model_info().defaults
    buttons: dict[str, Any] = {}
    prompt = gr.Textbox(
        label="Prompt",
        lines=3,
        max_lines=8,
        placeholder="Describe the image…",
        elem_id="prompt",
        autofocus=True,
    )
    with gr.Row(equal_height=True):
        buttons["run"] = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
        buttons["cancel"] = gr.Button("Cancel", variant="stop", elem_id="cancel", scale=1)
    with gr.Accordion("Example prompts", open=False, elem_id="examples"):
        gr.Examples([[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label=None, examples_per_page=len(EXAMPLE_PROMPTS))
    with gr.Group():
        aspect = gr.Radio(
            list(ASPECTS), value=aspect_of(defaults.width, defaults.height, presets), label="Aspect ratio",
            elem_id="aspect",
        )
        with gr.Row():
            width = gr.Slider(SIZE_MIN, SIZE_MAX, value=defaults.width, step=SIZE_STEP, label="Width", elem_id="width")
            height = gr.Slider(
                SIZE_MIN, SIZE_MAX, value=defaults.height, step=SIZE_STEP, label="Height", elem_id="height"
            )
        with gr.Row():
            steps = gr.Slider(STEPS_MIN, STEPS_MAX, value=defaults.steps, step=1, label="Steps", elem_id="steps")
            guidance = gr.Slider(
                GUIDANCE_MIN, GUIDANCE_MAX, value=defaults.guidance, step=0.1, label="Guidance", elem_id="guidance"
            )
        num_images = gr.Slider(IMAGES_MIN, IMAGES_MAX, value=1, step=1, label="Images", elem_id="num-images")
    with gr.Row(equal_height=True):
        seed = gr.Number(
            value=-1, label="Seed (-1 = random)", precision=0, minimum=-1, maximum=MAX_SEED, elem_id="seed", scale=4
        )
        with gr.Column(scale=1, min_width=110):
            buttons["dice"] = gr.Button("⚄ Random", size="sm", elem_id="seed-random")
            buttons["last_seed"] = gr.Button("↺ Last seed", size="sm", elem_id="seed-last")
    choices = _lora_choices(studio)
    loras: list[tuple[gr.Dropdown, gr.Slider]] = []

    def slot(i: int) -> None:
        with gr.Row(equal_height=True):
            name = gr.Dropdown(
                choices, value=NO_LORA, label=f"LoRA {i}", allow_custom_value=True, elem_id=f"lora-{i}", scale=3
            )
            scale = gr.Slider(
                LORA_SCALE_MIN, LORA_SCALE_MAX, value=1.0, step=0.05, label="Scale", elem_id=f"lora-{i}-scale", scale=2
            )
        loras.append((name, scale))

    with gr.Group():
        slot(1)
        with gr.Accordion(f"More LoRAs (up to {MAX_LORAS})", open=False, elem_id="more-loras"):
            for i in range(2, MAX_LORAS + 1):
                slot(i)
    buttons["refresh_loras"] = gr.Button("↻ Refresh LoRA list", size="sm", elem_id="refresh-loras")
    with gr.Accordion("Load settings from a MASUKA image", open=False, elem_id="settings-from-image-box"):
        buttons["drop"] = gr.Image(
            type="filepath",
            image_mode=None,  # keep the uploaded file as is: its PNG text chunks hold the settings
            sources=["upload", "clipboard"],
            label="Drop a PNG made by MASUKA",
            height=160,
            elem_id="settings-image",
        )
    form = Form(prompt, seed, steps, guidance, width, height, num_images, aspect, loras)
    return form, buttons


def _lora_tab(studio: Studio) -> gr.Button:
    """The LoRA library; returns its refresh button (create_demo also refreshes the LoRA choices on it)."""
    from gradio.data_classes import FileData

    from masuka.web.gradio_api import LORA_ADD_GROUP, LORA_ADD_LIMIT, add_lora_to_library

    gr.Markdown(
        f"LoRA files (`.safetensors`) in `{studio.lora_folder}` are checked before they are listed as usable. "
        "Copied a file in by hand? Press Refresh."
    )
    with gr.Accordion("Add a LoRA", open=True, elem_id="lora-add-panel"):
        gr.Markdown(
            "A link to a `.safetensors` file (Civitai's download links work too), a Hugging Face repo "
            "`owner/repo` (its one `.safetensors` file) or `owner/repo/path/file.safetensors` — or upload a file. "
            "It is downloaded once and checked before it enters the library."
        )
        with gr.Row():
            source = gr.Textbox(
                label="Link or Hugging Face repo",
                placeholder="https://civitai.com/api/download/models/12345   or   owner/repo",
                scale=3,
                elem_id="lora-source",
            )
            name = gr.Textbox(
                label="Name (optional)", placeholder="letters, digits, . _ -", scale=1, elem_id="lora-name"
            )
        upload = gr.File(
            label="…or upload a .safetensors file",
            file_types=[".safetensors"],
            type="filepath",
            height=120,
            elem_id="lora-upload",
        )
        add = gr.Button("Add LoRA", variant="primary", elem_id="lora-add")
        added = gr.Markdown(elem_id="lora-add-result")
    table = gr.Dataframe(
        studio.lora_table(), interactive=False, elem_id="lora-table", label="Library", max_height=420, wrap=True
    )
    with gr.Row():
        refresh = gr.Button("↻ Refresh", size="sm", elem_id="lora-table-refresh")
        to_delete = gr.Dropdown(
            label="LoRA to delete", choices=studio.lora_names(usable_only=False), value=None,
            scale=2, elem_id="lora-delete-name",
        )
        delete = gr.Button("Delete", variant="stop", size="sm", elem_id="lora-delete")

    def on_add(src: str, nm: str, up: str | None, progress=gr.Progress()):
        def report(done: int, total: int | None) -> None:
            if total:
                progress(done / total, desc=f"downloading {done / 2**20:.1f} of {total / 2**20:.1f} MiB")
            else:
                progress((done // 2**20, None), unit="MiB", desc="downloading")

        file = FileData(path=up, orig_name=Path(up).name) if up else None
        rec = add_lora_to_library(studio, src, nm, file, progress=report)
        line = f"Added **{rec.name}** ({rec.format}, {rec.size_bytes / 2**20:.2f} MiB, sha256 `{rec.sha256[:12]}`)."
        if rec.trigger_words:
            line += " Trigger words: " + ", ".join(f"`{w}`" for w in rec.trigger_words) + "."
        if rec.state != "usable":
            line += f"\n\nKept, but **{rec.state}**: {rec.reason}"
        return line

    def on_delete(nm: str | None) -> str:
        if not nm:
            raise gr.Error("Pick the LoRA to delete first.")
        try:
            rec = studio.delete_lora(nm)
        except ValueError as exc:
            raise gr.Error(str(exc)) from None
        return f"Deleted **{rec.name}**."

    def on_refresh():
        table = studio.lora_table(rescan=True)
        return table, gr.update(choices=studio.lora_names(usable_only=False), value=None)

    # The refresh button also updates the Generate form's LoRA choices (wired in create_demo).
    click_refresh = "() => document.querySelector('#lora-table-refresh').click()"
    # Only the result line is an output: on a refusal the inputs stay as typed, to fix and retry.
    add.click(
        on_add, [source, name, upload], added,
        concurrency_id=LORA_ADD_GROUP, concurrency_limit=LORA_ADD_LIMIT, api_visibility="private",
    ).success(lambda: ("", "", None), None, [source, name, upload], **FREE).success(
        None, None, None, js=click_refresh
    )
    delete.click(on_delete, to_delete, added, **FREE).success(None, None, None, js=click_refresh)
    refresh.click(on_refresh, None, [table, to_delete], **FREE)
    return refresh


def create_demo(studio: Studio) -> gr.Blocks:
    model = studio.model_info()
    defaults = model.defaults
    presets = aspect_presets(defaults)
    errors: dict[str, str] = {}  # session -> status line of its last failed click (read by .failure)
    errors_lock = threading.Lock()

    def fail(request: gr.Request | None, line: str, toast: str, title: str = "Error") -> gr.Error:
        with errors_lock:
            errors[getattr(request, "session_hash", "") or ""] = line
        return gr.Error(toast, title=title)

    def show_failure(request: gr.Request):
        with errors_lock:
            line = errors.pop(request.session_hash or "", None)
        return gr.update() if line is None else line

    def history_frame(status_value: str | None, text: str | None):
        frame = studio.history_frame(
            limit=HISTORY_ROWS,
            status=None if status_value in (None, "", ALL_STATUSES) else status_value,
            search=(text or "").strip() or None,
        )
        return frame.rename(columns=HISTORY_HEADERS)

    with gr.Blocks(title="MASUKA") as demo:
        with gr.Row(equal_height=True, elem_id="header"):
            gr.Markdown("## MASUKA", elem_id="title")
            info = gr.Markdown(info_markdown(studio), elem_id="info")
        if model.is_demo:
            gr.Markdown(
                f"⚠ **Demo model** — {model.description}. Start with "
                "`--model black-forest-labs/FLUX.1-schnell` for real pictures.",
                elem_id="demo-banner",
            )
        shown_images = gr.State([])  # [(path, seed)] of the job shown in the gallery
        last_seeds = gr.State([])
        picked = gr.State(None)  # path of the image picked in the gallery
        picked_history = gr.State(None)  # path of the image picked in the job detail
        selected_job = gr.State(None)

        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                with gr.Row():
                    with gr.Column(scale=5, min_width=360):
                        form, b = _build_form(studio, presets)
                    with gr.Column(scale=7, min_width=360):
                        gallery = gr.Gallery(
                            label="Images",
                            columns=2,
                            height=560,
                            object_fit="contain",
                            format="png",
                            buttons=["download", "fullscreen"],
                            interactive=False,
                            elem_id="gallery",
                        )
                        status = gr.Markdown("Ready.", elem_id="status")
                        with gr.Row():
                            picked_seed = gr.Textbox(
                                label="Seed of the selected image",
                                placeholder="click an image",
                                interactive=False,
                                buttons=["copy"],
                                elem_id="picked-seed",
                                scale=2,
                            )
                            with gr.Column(scale=1, min_width=160):
                                use_seed = gr.Button("Use this seed", size="sm", elem_id="use-seed")
                                reuse_image = gr.Button("Reuse its settings", size="sm", elem_id="reuse-image")

            with gr.Tab("History", id="history", elem_id="tab-history") as history_tab:
                with gr.Row():
                    status_filter = gr.Dropdown(
                        [ALL_STATUSES, *JOB_STATUSES], value=ALL_STATUSES, label="Status", elem_id="history-status",
                        scale=1,
                    )
                    search = gr.Textbox(
                        label="Search prompts", placeholder="words in the prompt", elem_id="history-search", scale=3
                    )
                    with gr.Column(scale=1, min_width=120):
                        refresh = gr.Button("↻ Refresh", size="md", elem_id="history-refresh")
                table = gr.Dataframe(
                    history_frame(ALL_STATUSES, ""),
                    interactive=False,
                    max_height=330,
                    max_chars=70,
                    elem_id="history-table",
                    label="Jobs (newest first) — click a row for its detail",
                )
                with gr.Column(visible=False, elem_id="job-detail") as detail_box:
                    with gr.Row():
                        with gr.Column(scale=5):
                            detail_md = gr.Markdown(elem_id="job-summary")
                            reuse_job = gr.Button("Reuse settings", variant="primary", elem_id="reuse-job")
                        with gr.Column(scale=4):
                            detail_gallery = gr.Gallery(
                                label="Images",
                                columns=2,
                                height=320,
                                object_fit="contain",
                                buttons=["download", "fullscreen"],
                                interactive=False,
                                elem_id="job-images",
                            )
                    error_box = gr.Textbox(label="Error", interactive=False, visible=False, elem_id="job-error")
                    traceback_box = gr.Textbox(
                        label="Traceback",
                        lines=10,
                        max_lines=30,
                        interactive=False,
                        visible=False,
                        buttons=["copy"],
                        elem_id="job-traceback",
                    )

            with gr.Tab("LoRAs", id="loras", elem_id="tab-loras"):
                lora_refresh = _lora_tab(studio)

        timer = gr.Timer(INFO_EVERY_S)

        # ---- handlers ------------------------------------------------------
        def validate(prompt, seed, steps, guidance, width, height, num_images, *slots):
            pairs = list(zip(slots[0::2], slots[1::2]))
            return studio.validate(
                prompt=prompt,
                lora=lora_spec(pairs),
                lora_scale=1.0,
                seed=-1 if seed is None else seed,
                steps=steps,
                guidance=guidance,
                width=width,
                height=height,
                num_images=num_images,
            )

        # gr.Request/gr.Progress are injected only into positional parameters, hence first.
        def on_check(request: gr.Request, *values):
            try:
                validate(*values)
            except ValueError as exc:
                raise fail(request, f"⚠ Not started: {exc}", str(exc), "Check the settings") from None

        def on_generate(request: gr.Request, progress=gr.Progress(), *values):
            try:
                ticket = studio.submit(validate(*values), caller_of(request))
            except ValueError as exc:  # a bad value, the rate limit or a full queue
                raise fail(request, f"⚠ Not started: {exc}", str(exc), "Check the settings") from None
            # Progress comes from the runner: the place in its one queue, then the steps.
            while not studio.wait(ticket.job_id, 0):
                place = studio.position(ticket.job_id)
                steps = studio.progress(ticket.job_id)
                if place:
                    progress(0, desc=f"waiting in the queue: {place} of {studio.queue_length()}")
                elif steps is not None and steps[0] > 0:
                    progress(steps, unit="steps", desc="denoising")
                else:
                    progress(0, desc="starting")
                studio.wait_for_change(PROGRESS_EVERY_S)
            try:
                result = studio.outcome(ticket)
            except JobFailed as exc:
                raise fail(
                    request, failure_line(exc.job_id, exc.reason), f"Job {exc.job_id} failed: {exc.reason}", "Job failed"
                ) from None
            pairs = list(zip([str(p) for p in result.images], result.seeds))
            shown = gr.Gallery(_gallery_items(result.images, result.seeds), columns=_columns(len(pairs)))
            return shown, result_line(result), pairs, result.seeds, None, ""

        def on_cancel(request: gr.Request) -> str:
            job_id = studio.cancel_session(request.session_hash)
            if job_id is None:
                return "Nothing of yours is running or waiting."
            studio.wait(job_id, CANCEL_WAIT_S)  # the runner's event: the job has left the queue
            record = studio.job(job_id)
            if record["status"] == "cancelled":
                return f"■ Job `{job_id}` cancelled — no images kept."
            return f"Job `{job_id}` is stopping (status: {record['status']})."

        def on_pick(pairs, evt: gr.SelectData):
            if not pairs or evt.index is None or not 0 <= evt.index < len(pairs):
                return gr.update(), None
            path, image_seed = pairs[evt.index]
            return str(image_seed), path

        def on_use_seed(seed_text: str):
            if not seed_text:
                gr.Info("Click an image in the gallery first.")
                return gr.update()
            return int(seed_text)

        def on_last_seed(seeds: list[int]):
            if not seeds:
                gr.Info("No job of yours has run yet in this page.")
                return gr.update()
            return seeds[0]

        def fill_from_image(path: str | None, where: str) -> list[Any]:
            if not path:
                gr.Info("Click an image first.")
                return [gr.update()] * (len(form.fill_targets()) + 2)
            try:
                meta = read_metadata(path)
            except ValueError as exc:
                gr.Warning(str(exc), title="No MASUKA settings")
                return [gr.update()] * len(form.fill_targets()) + [gr.update(), f"⚠ {exc}"]
            values = _fill(studio, settings_from_image(meta, defaults), presets)
            job = meta.get("job_id", "?")
            line = f"Settings loaded from {where} (job `{job}`, seed {meta.get('seed')})."
            return values + [gr.Tabs(selected="generate"), line]

        def on_reuse_image(path):
            return fill_from_image(path, "the selected image")

        def on_drop(path):
            return fill_from_image(path, "the dropped image")

        def on_select_job(evt: gr.SelectData):
            row = evt.row_value or []
            return show_job(str(row[0]) if row else None)

        def show_job(job_id: str | None):
            hidden = gr.update(visible=False)
            if not job_id:
                return gr.update(visible=False), "", [], hidden, hidden, None, None
            try:
                record = studio.job(job_id)
            except JobNotFound:
                return gr.update(visible=True), f"No job `{job_id}` (deleted?)", [], hidden, hidden, None, None
            pairs = job_images(record)
            images = _gallery_items([p for p, _ in pairs], [s for _, s in pairs])
            error = record.get("error") or ""
            trace = record.get("traceback") or ""
            return (
                gr.update(visible=True),
                job_markdown(record),
                images,
                gr.update(value=error, visible=bool(error)),
                gr.update(value=trace, visible=bool(trace)),
                job_id,
                None,
            )

        def on_pick_history(job_id, evt: gr.SelectData):
            if not job_id:
                return None
            pairs = job_images(studio.job(job_id))
            return pairs[evt.index][0] if evt.index is not None and 0 <= evt.index < len(pairs) else None

        def on_reuse_job(job_id, picked_path):
            if picked_path:
                return fill_from_image(picked_path, "the selected image")
            if not job_id:
                gr.Info("Click a job in the table first.")
                return [gr.update()] * (len(form.fill_targets()) + 2)
            record = studio.job(job_id)
            values = _fill(studio, settings_from_record(record, defaults), presets)
            return values + [gr.Tabs(selected="generate"), f"Settings loaded from job `{job_id}`."]

        def on_aspect(name: str | None):
            if name not in presets:
                return gr.update(), gr.update()
            return presets[name]

        def lora_choice_updates() -> list[Any]:
            choices = _lora_choices(studio, rescan=True)
            return [gr.update(choices=choices) for _ in form.loras]

        # ---- wiring --------------------------------------------------------
        inputs = form.inputs()
        check = b["run"].click(on_check, inputs, None, **FREE)
        gen = check.success(
            on_generate,
            inputs,
            [gallery, status, shown_images, last_seeds, picked, picked_seed],
            concurrency_limit=None,  # the runner's queue orders jobs, for every way in
            show_progress_on=[gallery],
            api_visibility="private",
        )
        check.failure(show_failure, None, status, **FREE)
        gen.failure(show_failure, None, status, **FREE)
        gen.then(history_frame, [status_filter, search], table, **FREE).then(
            lambda: info_markdown(studio), None, info, **FREE
        )
        # queue=False: works even with a full queue; cancels= drops this session's job still waiting.
        b["cancel"].click(on_cancel, None, status, cancels=[gen], **UNQUEUED).then(
            history_frame, [status_filter, search], table, **FREE
        )

        b["dice"].click(None, None, form.seed, js="() => -1")
        b["last_seed"].click(on_last_seed, last_seeds, form.seed, **FREE)
        form.aspect.input(on_aspect, form.aspect, [form.width, form.height], **UNQUEUED)
        # A size typed by hand is no longer a preset.
        form.width.input(None, None, form.aspect, js="() => null")
        form.height.input(None, None, form.aspect, js="() => null")
        b["refresh_loras"].click(lora_choice_updates, None, [d for d, _ in form.loras], **FREE)
        lora_refresh.click(lora_choice_updates, None, [d for d, _ in form.loras], **FREE)

        fill_outputs = form.fill_targets() + [tabs, status]
        gallery.select(on_pick, shown_images, [picked_seed, picked], **FREE)
        use_seed.click(on_use_seed, picked_seed, form.seed, **FREE)
        reuse_image.click(on_reuse_image, picked, fill_outputs, **FREE)
        b["drop"].upload(on_drop, b["drop"], fill_outputs, **FREE)

        for trigger in (refresh.click, status_filter.change, history_tab.select):
            trigger(history_frame, [status_filter, search], table, **UNQUEUED)
        search.change(history_frame, [status_filter, search], table, trigger_mode="always_last", **UNQUEUED)
        detail_outputs = [detail_box, detail_md, detail_gallery, error_box, traceback_box, selected_job, picked_history]
        table.select(on_select_job, None, detail_outputs, **UNQUEUED)
        detail_gallery.select(on_pick_history, selected_job, picked_history, **FREE)
        reuse_job.click(on_reuse_job, [selected_job, picked_history], fill_outputs, **FREE)

        timer.tick(lambda: info_markdown(studio), None, info, show_progress="hidden", **UNQUEUED)
        demo.load(lambda: info_markdown(studio), None, info, **UNQUEUED)
        register_api(studio)
    return demo
