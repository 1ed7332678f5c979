"""The LoRAs tab: add by link or upload, the library table, delete."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gradio as gr
from gradio.data_classes import FileData

from masuka.lora.library import LoraRecord
from masuka.studio import Studio
from masuka.web.gradio_api import LORA_ADD_GROUP, LORA_ADD_LIMIT, add_lora_to_library
from masuka.web.page.common import FREE, NO_LATEX, md_code, md_text, toast_text


def added_line(rec: LoraRecord) -> str:
    """What the page says about a LoRA just added (its name, format and trigger words come from the file)."""
    line = (
        f"Added **{md_text(rec.name)}** ({md_text(rec.format)}, {rec.size_bytes / 2**20:.2f} MiB, "
        f"sha256 {md_code(rec.sha256[:12])})."
    )
    if rec.trigger_words:
        line += " Trigger words: " + ", ".join(md_code(w, limit=100) for w in rec.trigger_words) + "."
    if rec.state != "usable":
        line += f"\n\nKept, but **{md_text(rec.state)}**: {md_text(rec.reason)}"
    return line


@dataclass
class LoraTab:
    studio: Studio
    source: gr.Textbox
    name: gr.Textbox
    upload: gr.File
    add: gr.Button
    added: gr.Markdown
    table: gr.Dataframe
    refresh: gr.Button  # create_demo also refreshes the Generate form's LoRA choices on it
    to_delete: gr.Dropdown
    delete: gr.Button

    def on_add(self, values: dict, progress=gr.Progress()) -> str:
        def report(done: int, total: int | None) -> None:
            if total:
                progress(done / total, desc=f"downloading {done / 2**20:.1f} of {total / 2**20:.1f} MiB")
            else:
                progress((done // 2**20, None), unit="MiB", desc="downloading")

        up = values[self.upload]
        file = FileData(path=up, orig_name=Path(up).name) if up else None
        try:
            rec = add_lora_to_library(self.studio, values[self.source], values[self.name], file, progress=report)
        except gr.Error as exc:  # its text names the link or file given: shown as text
            raise gr.Error(toast_text(exc.message), title="LoRA not added") from None
        return added_line(rec)

    def on_delete(self, name: str | None) -> str:
        if not name:
            raise gr.Error("Pick the LoRA to delete first.")
        try:
            rec = self.studio.delete_lora(name)
        except ValueError as exc:
            raise gr.Error(toast_text(exc), title="LoRA not deleted") from None
        return f"Deleted **{md_text(rec.name)}**."

    def on_refresh(self) -> dict:
        return {
            self.table: self.studio.lora_table(rescan=True),
            self.to_delete: gr.update(choices=self.studio.lora_names(usable_only=False), value=None),
        }

    def wire(self) -> None:
        click_refresh = "() => document.querySelector('#lora-table-refresh').click()"
        # Only the result line is an output: on a refusal the inputs stay as typed, to fix and retry.
        self.add.click(
            self.on_add, {self.source, self.name, self.upload}, self.added,
            concurrency_id=LORA_ADD_GROUP, concurrency_limit=LORA_ADD_LIMIT, api_visibility="private",
        ).success(lambda: {self.source: "", self.name: "", self.upload: None}, None,
                  {self.source, self.name, self.upload}, **FREE).success(None, None, None, js=click_refresh)
        self.delete.click(self.on_delete, self.to_delete, self.added, **FREE).success(
            None, None, None, js=click_refresh
        )
        self.refresh.click(self.on_refresh, None, {self.table, self.to_delete}, **FREE)


def build_lora_tab(studio: Studio) -> LoraTab:
    gr.Markdown(
        f"LoRA files (`.safetensors`) in {md_code(studio.lora_folder, limit=500)} are checked before they are "
        "listed as usable. Copied a file in by hand? Press Refresh."
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
            name = gr.Textbox(label="Name (optional)", placeholder="letters, digits, . _ -", scale=1, elem_id="lora-name")
        upload = gr.File(
            label="…or upload a .safetensors file",
            file_types=[".safetensors"],
            type="filepath",
            height=120,
            elem_id="lora-upload",
        )
        add = gr.Button("Add LoRA", variant="primary", elem_id="lora-add")
        added = gr.Markdown(elem_id="lora-add-result", **NO_LATEX)
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
    tab = LoraTab(studio, source, name, upload, add, added, table, refresh, to_delete, delete)
    tab.wire()
    return tab
