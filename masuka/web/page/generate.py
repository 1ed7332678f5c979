"""The Generate tab: the form, the gallery and the status line, and following a job to its end.

A job is followed by the runner's events (`Studio.wait_for_change`), never by a
poll of the page: the handler streams status lines (place in the queue, then the
steps) and, at the end, the images.  The same stream serves a page that is
reloaded while its job runs: on load the page finds its job again — the login's
jobs with --auth, else the job ids this browser keeps in its localStorage — and
follows it from there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

import gradio as gr

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
    GenerateRequest,
    settings_from_metadata,
)
from masuka.core.runner import JobFailed, Ticket
from masuka.store.jobs import JobNotFound
from masuka.store.outputs import read_metadata
from masuka.studio import Caller, Studio
from masuka.web.gradio_api import caller_of
from masuka.web.page.common import (
    ASPECTS,
    EXAMPLE_PROMPTS,
    FREE,
    NO_LATEX,
    NO_LORA,
    UNQUEUED,
    FormSettings,
    aspect_of,
    gallery_columns,
    gallery_items,
    job_images,
    lora_spec,
    md_code,
    md_text,
    progress_line,
    result_line,
    toast_text,
)

log = logging.getLogger(__name__)

CANCEL_WAIT_S = 30.0  # a step ends within this even on a slow GPU
PROGRESS_EVERY_S = 0.5  # the longest a waiting page goes without looking at its job
REMEMBERED_JOBS = 20  # job ids a browser keeps, newest last
JOB_ID_MAX_CHARS = 64
DROP_GROUP, DROP_LIMIT = "settings-image", 2  # reading dropped images: a few at once, never the GPU


def remembered(stored: Any, job_id: str | None = None) -> list[str]:
    """The job ids a browser keeps (they come from its localStorage: anything), plus a new one."""
    ids = [s for s in stored if isinstance(s, str) and 0 < len(s) <= JOB_ID_MAX_CHARS] if isinstance(stored, list) else []
    if job_id:
        ids = [s for s in ids if s != job_id] + [job_id]
    return ids[-REMEMBERED_JOBS:]


def jobs_to_follow(studio: Studio, caller: Caller, stored: Any) -> list[dict[str, Any]]:
    """The queued or running jobs a reloaded page shows again, oldest first: with a login,
    that login's; without one, those among the ids this browser remembers."""
    if caller.user:
        return studio.active_jobs(user=caller.user)
    return studio.active_jobs(job_ids=remembered(stored))


@dataclass
class Form:
    """The Generate form's components, read and filled by name."""

    prompt: gr.Textbox
    seed: gr.Number
    steps: gr.Slider
    guidance: gr.Slider
    width: gr.Slider
    height: gr.Slider
    num_images: gr.Slider
    aspect: gr.Radio
    speed: gr.Radio
    loras: list[tuple[gr.Dropdown, gr.Slider]] = field(default_factory=list)

    def inputs(self) -> set[gr.components.Component]:
        fields = {self.prompt, self.seed, self.steps, self.guidance, self.width, self.height, self.num_images,
                  self.speed}
        return fields | {c for pair in self.loras for c in pair}

    def targets(self) -> set[gr.components.Component]:
        return self.inputs() | {self.aspect}

    def request(self, studio: Studio, values: dict) -> GenerateRequest:
        """The form's values as a checked request (ValueError naming the bad one)."""
        seed = values[self.seed]
        return studio.validate(
            prompt=values[self.prompt],
            lora=lora_spec([(values[name], values[scale]) for name, scale in self.loras]),
            lora_scale=1.0,
            seed=-1 if seed is None else seed,
            steps=values[self.steps],
            guidance=values[self.guidance],
            width=values[self.width],
            height=values[self.height],
            num_images=values[self.num_images],
            speed=values[self.speed],
        )

    def fill(self, fs: FormSettings, choices: list[tuple[str, str]], presets: dict) -> dict:
        slots = fs.loras[:MAX_LORAS] + [(NO_LORA, 1.0)] * (MAX_LORAS - len(fs.loras))
        updates: dict[Any, Any] = {
            self.prompt: fs.prompt,
            self.seed: fs.seed,
            self.steps: fs.steps,
            self.guidance: fs.guidance,
            self.width: fs.width,
            self.height: fs.height,
            self.num_images: fs.num_images,
            self.aspect: aspect_of(fs.width, fs.height, presets),
            self.speed: fs.speed,
        }
        extra = [(n, n) for n, _ in slots if n and (n, n) not in choices]  # a reused LoRA that is gone: the job says so
        for (name_box, scale_box), (name, scale) in zip(self.loras, slots):
            updates[name_box] = gr.update(choices=choices + extra, value=name)
            updates[scale_box] = scale
        return updates


def lora_choices(studio: Studio, *, rescan: bool = False) -> list[tuple[str, str]]:
    return [("None", NO_LORA)] + [(n, n) for n in studio.lora_names(rescan=rescan)]


@dataclass
class GenerateTab:
    studio: Studio
    presets: dict[str, tuple[int, int]]
    tabs: gr.Tabs
    form: Form
    gallery: gr.Gallery
    status: gr.Markdown
    picked_seed: gr.Textbox
    shown_images: gr.State  # [(path, seed)] of the job shown in the gallery
    last_seeds: gr.State
    picked: gr.State  # path of the image picked in the gallery
    job: gr.State  # the job this page follows (its own, or found again after a reload)
    my_jobs: gr.BrowserState  # the job ids this browser started, kept across reloads
    buttons: dict[str, Any]
    events: dict[str, Any] = field(default_factory=dict)

    # ---- filling the form (also from the History tab) ---------------------------
    def fill_outputs(self) -> set:
        return self.form.targets() | {self.tabs, self.status}

    def fill(self, fs: FormSettings, line: str) -> dict:
        updates = self.form.fill(fs, lora_choices(self.studio), self.presets)
        return updates | {self.tabs: gr.Tabs(selected="generate"), self.status: line}

    def fill_from_image(self, path: str | None, where: str) -> dict:
        """The form from a PNG's stored settings; what could not be used is said, not hidden."""
        if not path:
            gr.Info("Click an image first.")
            return {}
        try:
            meta = read_metadata(path)
        except ValueError as exc:
            gr.Warning(toast_text(exc), title="No MASUKA settings")
            return {self.status: f"⚠ {md_text(exc)}"}
        fields, notes = settings_from_metadata(meta, self.studio.model_info().defaults)
        fs = FormSettings(**fields)
        known = set(self.studio.lora_names())
        notes += [
            f"LoRA {name!r} is not in this library: add it in the LoRAs tab (or pick another) before generating"
            for name, _ in fs.loras
            if name not in known
        ]
        job = meta.get("job_id") if isinstance(meta.get("job_id"), (str, int)) else "?"
        seed = "random" if fs.seed < 0 else str(fs.seed)
        line = f"Settings loaded from {where} (job {md_code(job)}, seed {seed})."
        if notes:
            gr.Warning("<br>".join(toast_text(n) for n in notes), title="Some settings were not loaded")
            line += "".join(f"  \n⚠ {md_text(n)}" for n in notes)
        return self.fill(fs, line)

    # ---- following a job ---------------------------------------------------------
    def follow(self, job_id: str, progress: gr.Progress) -> Iterator[dict]:
        """Status lines while the job is in the runner, woken by its events."""
        studio, last = self.studio, None
        while not studio.wait(job_id, 0):
            place, waiting, steps = studio.position(job_id), studio.queue_length(), studio.progress(job_id)
            line = progress_line(job_id, place, waiting, steps)
            if place:
                progress(0, desc=f"waiting in the queue: {place} of {waiting}")
            elif steps is not None and steps[0] > 0:
                progress(steps, unit="steps", desc="denoising")
            if line != last:
                yield {self.status: line}
                last = line
            studio.wait_for_change(PROGRESS_EVERY_S)

    def finish(self, job_id: str) -> Iterator[dict]:
        """The gallery and status line of an ended job; a failed one also raises its toast."""
        record = self._record(job_id)
        if record is None:
            yield {self.status: f"Job {md_code(job_id)} is gone from the history."}
            return
        if record["status"] == "failed":
            yield {self.status: result_line(record)}
            reason = record.get("error") or "unknown error"
            raise gr.Error(toast_text(f"Job {job_id} failed: {reason}"), title="Job failed")
        pairs = job_images(record)
        yield {
            self.gallery: gr.Gallery(gallery_items(pairs), columns=gallery_columns(len(pairs))),
            self.status: result_line(record),
            self.shown_images: pairs,
            self.last_seeds: [seed for _, seed in pairs] or list(record.get("seeds") or []),
            self.picked: None,
            self.picked_seed: "",
        }

    def _record(self, job_id: str) -> dict | None:
        try:
            return self.studio.job(job_id)
        except JobNotFound:
            return None

    def _collect(self, ticket: Ticket) -> None:
        """Hand an ended job's outcome back to the runner (its record says the rest)."""
        if self.studio.wait(ticket.job_id, 0):
            try:
                self.studio.outcome(ticket)
            except JobFailed:
                pass

    # ---- handlers ----------------------------------------------------------------
    def on_generate(self, values: dict, request: gr.Request, progress=gr.Progress()):
        try:
            ticket = self.studio.submit(self.form.request(self.studio, values), caller_of(request))
        except ValueError as exc:  # a bad value, the rate limit or a full queue
            yield {self.status: f"⚠ Not started: {md_text(exc)}"}
            raise gr.Error(toast_text(exc), title="Check the settings") from None
        job_id = ticket.job_id
        yield {self.job: job_id, self.my_jobs: remembered(values[self.my_jobs], job_id)}
        try:
            yield from self.follow(job_id, progress)
        finally:  # also when the page went away (the generator is closed): the job runs on
            self._collect(ticket)
        yield from self.finish(job_id)

    def on_load(self, values: dict, request: gr.Request, progress=gr.Progress()):
        """A (re)loaded page shows its queued or running job again, then its images."""
        stored = values[self.my_jobs]
        active = jobs_to_follow(self.studio, caller_of(request), stored)
        still_running = {job["job_id"] for job in active}
        yield {self.my_jobs: [j for j in remembered(stored) if j in still_running]}  # ended ones are forgotten
        if not active:
            return
        job_id = active[-1]["job_id"]  # the newest: what the page showed last
        yield {self.job: job_id}
        yield from self.follow(job_id, progress)
        yield from self.finish(job_id)

    def on_cancel(self, values: dict, request: gr.Request) -> str:
        caller, job_id = caller_of(request), values[self.job]
        if job_id and self.studio.position(job_id) is not None:
            try:
                self.studio.cancel(job_id, caller)
            except (ValueError, JobNotFound) as exc:  # another login's job (NotYourJob), or gone
                return f"⚠ {md_text(exc)}"
        else:
            job_id = self.studio.cancel_mine(caller)  # its session and, with a password, its login
        if job_id is None:
            return "Nothing of yours is running or waiting."
        self.studio.wait(job_id, CANCEL_WAIT_S)  # the runner's event: the job has left the queue
        record = self._record(job_id) or {"status": "gone"}
        if record["status"] == "cancelled":
            return f"■ Job {md_code(job_id)} cancelled — no images kept."
        return f"Job {md_code(job_id)} is stopping (status: {md_text(record['status'])})."

    def on_pick(self, pairs, evt: gr.SelectData) -> dict:
        if not pairs or evt.index is None or not 0 <= evt.index < len(pairs):
            return {}
        path, image_seed = pairs[evt.index]
        return {self.picked_seed: str(image_seed), self.picked: path}

    def wire(self) -> None:
        form, b = self.form, self.buttons
        gen = b["run"].click(
            self.on_generate,
            form.inputs() | {self.my_jobs},
            {self.gallery, self.status, self.shown_images, self.last_seeds, self.picked, self.picked_seed,
             self.job, self.my_jobs},
            concurrency_limit=None,  # the runner's queue orders jobs, for every way in
            show_progress_on=[self.gallery],
            api_visibility="private",
        )
        self.events["generated"] = gen
        # queue=False: works even with a full queue.  The job's own stream then shows its end.
        self.events["cancelled"] = b["cancel"].click(
            self.on_cancel, {self.job}, self.status, **UNQUEUED
        )

        b["dice"].click(None, None, form.seed, js="() => -1")

        def on_last_seed(seeds: list[int]):
            if not seeds:
                gr.Info("No job of yours has run yet in this page.")
                return gr.update()
            return seeds[0]

        def on_use_seed(seed_text: str):
            if not seed_text:
                gr.Info("Click an image in the gallery first.")
                return gr.update()
            return int(seed_text)

        def on_aspect(name: str | None) -> dict:
            if name not in self.presets:
                return {}
            width, height = self.presets[name]
            return {form.width: width, form.height: height}

        b["last_seed"].click(on_last_seed, self.last_seeds, form.seed, **FREE)
        form.aspect.input(on_aspect, form.aspect, {form.width, form.height}, **UNQUEUED)
        # A size typed by hand is no longer a preset.
        form.width.input(None, None, form.aspect, js="() => null")
        form.height.input(None, None, form.aspect, js="() => null")
        b["refresh_loras"].click(self.lora_choice_updates, None, self.lora_boxes(), **FREE)

        self.gallery.select(self.on_pick, self.shown_images, {self.picked_seed, self.picked}, **FREE)
        b["use_seed"].click(on_use_seed, self.picked_seed, form.seed, **FREE)
        b["reuse_image"].click(
            lambda path: self.fill_from_image(path, "the selected image"), self.picked, self.fill_outputs(), **FREE
        )
        b["drop"].upload(
            lambda path: self.fill_from_image(path, "the dropped image"),
            b["drop"],
            self.fill_outputs(),
            concurrency_id=DROP_GROUP,
            concurrency_limit=DROP_LIMIT,
            api_visibility="private",
        )

    def wire_load(self, demo: gr.Blocks) -> None:
        demo.load(
            self.on_load,
            {self.my_jobs},
            {self.gallery, self.status, self.shown_images, self.last_seeds, self.picked, self.picked_seed,
             self.job, self.my_jobs},
            concurrency_limit=None,
            show_progress_on=[self.gallery],
            api_visibility="private",
        )

    def lora_boxes(self) -> list[gr.Dropdown]:
        return [name for name, _ in self.form.loras]

    def lora_choice_updates(self) -> dict:
        choices = lora_choices(self.studio, rescan=True)
        return {box: gr.update(choices=choices) for box in self.lora_boxes()}


def build_generate_tab(studio: Studio, presets: dict[str, tuple[int, int]], tabs: gr.Tabs) -> GenerateTab:
    """The Generate tab's components and its own events."""
    defaults = studio.model_info().defaults
    buttons: dict[str, Any] = {}
    with gr.Row():
        with gr.Column(scale=5, min_width=360):
            prompt = gr.Textbox(
                label="Prompt", lines=3, max_lines=8, placeholder="Describe the image…", elem_id="prompt", autofocus=True
            )
            with gr.Row(equal_height=True):
                buttons["run"] = gr.Button("Generate", variant="primary", elem_id="generate", scale=3)
                buttons["cancel"] = gr.Button("Cancel", variant="stop", elem_id="cancel", scale=1)
            with gr.Accordion("Example prompts", open=False, elem_id="examples"):
                gr.Examples(
                    [[p] for p in EXAMPLE_PROMPTS], inputs=[prompt], label=None, examples_per_page=len(EXAMPLE_PROMPTS)
                )
            with gr.Group():
                aspect = gr.Radio(
                    list(ASPECTS),
                    value=aspect_of(defaults.width, defaults.height, presets),
                    label="Aspect ratio",
                    elem_id="aspect",
                )
                with gr.Row():
                    width = gr.Slider(
                        SIZE_MIN, SIZE_MAX, value=defaults.width, step=SIZE_STEP, label="Width", elem_id="width"
                    )
                    height = gr.Slider(
                        SIZE_MIN, SIZE_MAX, value=defaults.height, step=SIZE_STEP, label="Height", elem_id="height"
                    )
                with gr.Row():
                    steps = gr.Slider(STEPS_MIN, STEPS_MAX, value=defaults.steps, step=1, label="Steps", elem_id="steps")
                    guidance = gr.Slider(
                        GUIDANCE_MIN, GUIDANCE_MAX, value=defaults.guidance, step=0.1, label="Guidance",
                        elem_id="guidance",
                    )
                num_images = gr.Slider(IMAGES_MIN, IMAGES_MAX, value=1, step=1, label="Images", elem_id="num-images")
                speed = gr.Radio(
                    [("Exact", "exact"), ("Fast", "fast")], value="exact", label="Speed", elem_id="speed",
                    info="Fast skips transformer steps whose change is small: quicker, slightly different images. "
                    "Exact is the full computation.",
                )
            with gr.Row(equal_height=True):
                seed = gr.Number(
                    value=-1, label="Seed (-1 = random)", precision=0, minimum=-1, maximum=MAX_SEED, elem_id="seed",
                    scale=4,
                )
                with gr.Column(scale=1, min_width=110):
                    buttons["dice"] = gr.Button("⚄ Random", size="sm", elem_id="seed-random")
                    buttons["last_seed"] = gr.Button("↺ Last seed", size="sm", elem_id="seed-last")
            choices = lora_choices(studio)
            loras: list[tuple[gr.Dropdown, gr.Slider]] = []

            def slot(i: int) -> None:
                with gr.Row(equal_height=True):
                    name = gr.Dropdown(
                        choices, value=NO_LORA, label=f"LoRA {i}", allow_custom_value=True, elem_id=f"lora-{i}",
                        scale=3,
                    )
                    scale = gr.Slider(
                        LORA_SCALE_MIN, LORA_SCALE_MAX, value=1.0, step=0.05, label="Scale",
                        elem_id=f"lora-{i}-scale", scale=2,
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
            status = gr.Markdown("Ready.", elem_id="status", **NO_LATEX)
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
                    buttons["use_seed"] = gr.Button("Use this seed", size="sm", elem_id="use-seed")
                    buttons["reuse_image"] = gr.Button("Reuse its settings", size="sm", elem_id="reuse-image")
    tab = GenerateTab(
        studio=studio,
        presets=presets,
        tabs=tabs,
        form=Form(prompt, seed, steps, guidance, width, height, num_images, aspect, speed, loras),
        gallery=gallery,
        status=status,
        picked_seed=picked_seed,
        shown_images=gr.State([]),
        last_seeds=gr.State([]),
        picked=gr.State(None),
        job=gr.State(None),
        my_jobs=gr.BrowserState([], storage_key="masuka-my-jobs"),
        buttons=buttons,
    )
    tab.wire()
    return tab
