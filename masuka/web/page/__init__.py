"""The studio page: one builder per tab, wired here.  Built from the Studio it is given,
using its public methods only.

Concurrency: generation waits in the runner's one FIFO queue (shared with the API
and REST), and the page shows the place in it that the runner reports.  Every
other event (history, job detail, info, form filling) runs with no limit, so the
page answers while a job runs; reading a dropped image has a small group of its
own.  Cancel is not queued at all (`queue=False`): it must work even when the
queue is full.

Text from users, files and errors is shown through `common.md_text` / `md_code`
(Markdown) and `common.toast_text` (toasts), never as markup.
"""

from __future__ import annotations

import gradio as gr

from masuka.studio import Studio
from masuka.web.gradio_api import register_api
from masuka.web.page.common import FREE, UNQUEUED, aspect_presets, info_markdown, md_text
from masuka.web.page.generate import build_generate_tab
from masuka.web.page.history import build_history_tab
from masuka.web.page.loras import build_lora_tab

__all__ = ["create_demo"]

INFO_EVERY_S = 5.0
# The browser's IANA time zone, so times are shown in the viewer's local time.
BROWSER_ZONE_JS = "() => Intl.DateTimeFormat().resolvedOptions().timeZone || ''"


def create_demo(studio: Studio) -> gr.Blocks:
    model = studio.model_info()
    presets = aspect_presets(model.defaults)
    with gr.Blocks(title="MASUKA") as demo:
        with gr.Row(equal_height=True, elem_id="header"):
            gr.Markdown("## MASUKA", elem_id="title")
            info = gr.Markdown(info_markdown(studio), elem_id="info")
        if model.is_demo:
            gr.Markdown(
                f"⚠ **Demo model** — {md_text(model.description)}. Start with "
                "`--model black-forest-labs/FLUX.1-schnell` for real pictures.",
                elem_id="demo-banner",
            )
        zone = gr.Textbox(visible=False, elem_id="browser-zone")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                generate = build_generate_tab(studio, presets, tabs)
            with gr.Tab("History", id="history", elem_id="tab-history") as history_tab:
                history = build_history_tab(studio, generate, zone, history_tab)
            with gr.Tab("LoRAs", id="loras", elem_id="tab-loras"):
                loras = build_lora_tab(studio)

        # Across tabs: a job's end or a cancel changes the history; the LoRA library feeds the form.
        for name in ("generated", "cancelled"):
            history.refresh_after(generate.events[name])
        generate.events["generated"].then(lambda: info_markdown(studio), None, info, **FREE)
        loras.refresh.click(generate.lora_choice_updates, None, generate.lora_boxes(), **FREE)

        timer = gr.Timer(INFO_EVERY_S)
        timer.tick(lambda: info_markdown(studio), None, info, show_progress="hidden", **UNQUEUED)
        demo.load(lambda: info_markdown(studio), None, info, **UNQUEUED)
        demo.load(None, None, zone, js=BROWSER_ZONE_JS).then(
            history.rows, {history.status_filter, history.search, zone}, history.table, **UNQUEUED
        )
        generate.wire_load(demo)
        register_api(studio)
    return demo
