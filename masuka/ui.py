"""The page: wiring only.  Built from the generator manager it is given."""

from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from .api import GPU_GROUP, register_api, user_of
from .generator import GeneratorManager, JobFailed
from .validation import GUIDANCE_MAX, IMAGES_MAX, SIZE_MAX, SIZE_MIN, SIZE_STEP, STEPS_MAX

log = logging.getLogger(__name__)


def create_demo(manager: GeneratorManager) -> gr.Blocks:
    defaults = manager.loaded.defaults
    with gr.Blocks(title="MASUKA") as demo:
        gr.Markdown("# MASUKA")
        if manager.loaded.is_demo:
            gr.Markdown(f"**Demo model:** {manager.loaded.description}")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", lines=3)
                lora = gr.Dropdown(label="LoRA", choices=[""] + manager.loras.usable_names(), value="")
                lora_scale = gr.Number(label="LoRA scale", value=1.0)
                seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0)
                steps = gr.Number(label=f"Steps (1-{STEPS_MAX})", value=defaults.steps, precision=0)
                guidance = gr.Number(label=f"Guidance (0-{GUIDANCE_MAX:g})", value=defaults.guidance)
                width = gr.Number(label=f"Width ({SIZE_MIN}-{SIZE_MAX}, step {SIZE_STEP})", value=defaults.width, precision=0)
                height = gr.Number(label=f"Height ({SIZE_MIN}-{SIZE_MAX}, step {SIZE_STEP})", value=defaults.height, precision=0)
                num_images = gr.Number(label=f"Images (1-{IMAGES_MAX})", value=1, precision=0)
                with gr.Row():
                    run = gr.Button("Generate", variant="primary")
                    stop = gr.Button("Cancel")
            with gr.Column():
                gallery = gr.Gallery(label="Images", format="png")
                status = gr.Markdown()
        history = gr.Dataframe(label="History", interactive=False)

        def on_generate(p, lo, ls, s, st, g, w, h, n, request: gr.Request, progress=gr.Progress()):
            try:
                req = manager.validate(
                    prompt=p, lora=lo or "", lora_scale=ls, seed=s, steps=st, guidance=g,
                    width=w, height=h, num_images=n,
                )
            except ValueError as exc:
                raise gr.Error(str(exc)) from None
            try:
                result = manager.generate(
                    req,
                    user=user_of(request),
                    session=request.session_hash,
                    on_step=lambda done, total: progress((done, total), unit="steps"),
                )
            except JobFailed as exc:
                raise gr.Error(f"job {exc.job_id} failed: {exc.reason}") from None
            line = f"job `{result.job_id}` {result.status}; seeds {result.seeds}"
            return [str(x) for x in result.images], line, manager.jobs.dataframe(limit=50)

        def on_cancel(request: gr.Request) -> str:
            job_id = manager.cancel_session(request.session_hash)
            return f"cancelling job `{job_id}`" if job_id else "nothing of yours is running"

        run.click(
            on_generate,
            [prompt, lora, lora_scale, seed, steps, guidance, width, height, num_images],
            [gallery, status, history],
            concurrency_id=GPU_GROUP,
            concurrency_limit=1,
            api_visibility="private",
        )
        stop.click(on_cancel, None, status, queue=False, api_visibility="private")
        demo.load(lambda: manager.jobs.dataframe(limit=50), None, history, api_visibility="private")
        register_api(manager)
    return demo
