"""The History tab: the job table, one job's detail, and reusing its settings in the Generate tab."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gradio as gr

from masuka.store.jobs import JOB_STATUSES, JobNotFound
from masuka.studio import Studio
from masuka.web.page.common import (
    FREE,
    NO_LATEX,
    UNQUEUED,
    gallery_items,
    history_table,
    job_images,
    job_markdown,
    md_code,
    settings_from_record,
)
from masuka.web.page.generate import GenerateTab

ALL_STATUSES = "all"
HISTORY_ROWS = 200


@dataclass
class HistoryTab:
    studio: Studio
    generate: GenerateTab
    zone: gr.Textbox  # the browser's time zone (set by the page's load script)
    tab: gr.Tab
    status_filter: gr.Dropdown
    search: gr.Textbox
    refresh: gr.Button
    table: gr.Dataframe
    detail_box: gr.Column
    summary: gr.Markdown
    images: gr.Gallery
    error_box: gr.Textbox
    traceback_box: gr.Textbox
    reuse: gr.Button
    selected_job: gr.State
    picked: gr.State  # path of the image picked in the job detail

    def rows(self, values: dict):
        status = values[self.status_filter]
        rows = self.studio.history(
            HISTORY_ROWS,
            None if status in (None, "", ALL_STATUSES) else status,
            (values[self.search] or "").strip() or None,
        )
        return history_table(rows, values[self.zone])

    def detail(self, job_id: str | None, zone: str | None) -> dict:
        hidden = gr.update(value="", visible=False)
        cleared = {self.images: [], self.error_box: hidden, self.traceback_box: hidden, self.picked: None}
        if not job_id:
            return cleared | {self.detail_box: gr.update(visible=False), self.summary: "", self.selected_job: None}
        try:
            record = self.studio.job(job_id)
        except JobNotFound:
            return cleared | {
                self.detail_box: gr.update(visible=True),
                self.summary: f"No job {md_code(job_id)} (deleted?)",
                self.selected_job: None,
            }
        error, trace = record.get("error") or "", record.get("traceback") or ""
        return {
            self.detail_box: gr.update(visible=True),
            self.summary: job_markdown(record, zone),
            self.images: gallery_items(job_images(record)),
            self.error_box: gr.update(value=error, visible=bool(error)),
            self.traceback_box: gr.update(value=trace, visible=bool(trace)),
            self.selected_job: job_id,
            self.picked: None,
        }

    def on_select_job(self, values: dict, evt: gr.SelectData) -> dict:
        row = evt.row_value or []
        return self.detail(str(row[0]) if row else None, values[self.zone])

    def on_pick(self, job_id: str | None, evt: gr.SelectData):
        try:
            pairs = job_images(self.studio.job(job_id)) if job_id else []
        except JobNotFound:
            return None
        return pairs[evt.index][0] if evt.index is not None and 0 <= evt.index < len(pairs) else None

    def on_reuse(self, values: dict) -> dict:
        job_id, picked = values[self.selected_job], values[self.picked]
        if picked:
            return self.generate.fill_from_image(picked, "the selected image")
        if not job_id:
            gr.Info("Click a job in the table first.")
            return {}
        try:
            record = self.studio.job(job_id)
        except JobNotFound:
            return {self.generate.status: f"No job {md_code(job_id)} (deleted?)"}
        fs = settings_from_record(record, self.studio.model_info().defaults)
        return self.generate.fill(fs, f"Settings loaded from job {md_code(job_id)}.")

    def wire(self) -> None:
        filters = {self.status_filter, self.search, self.zone}
        for trigger in (self.refresh.click, self.status_filter.change, self.tab.select):
            trigger(self.rows, filters, self.table, **UNQUEUED)
        self.search.change(self.rows, filters, self.table, trigger_mode="always_last", **UNQUEUED)
        detail_outputs = {
            self.detail_box, self.summary, self.images, self.error_box, self.traceback_box, self.selected_job,
            self.picked,
        }
        self.table.select(self.on_select_job, {self.zone}, detail_outputs, **UNQUEUED)
        self.images.select(self.on_pick, self.selected_job, self.picked, **FREE)
        self.reuse.click(self.on_reuse, {self.selected_job, self.picked}, self.generate.fill_outputs(), **FREE)

    def refresh_after(self, event: Any) -> None:
        """Refresh the table when an event (a job's end, a cancel) has changed the history."""
        event.then(self.rows, {self.status_filter, self.search, self.zone}, self.table, **FREE)


def build_history_tab(studio: Studio, generate: GenerateTab, zone: gr.Textbox, tab: gr.Tab) -> HistoryTab:
    with gr.Row():
        status_filter = gr.Dropdown(
            [ALL_STATUSES, *JOB_STATUSES], value=ALL_STATUSES, label="Status", elem_id="history-status", scale=1
        )
        search = gr.Textbox(label="Search prompts", placeholder="words in the prompt", elem_id="history-search", scale=3)
        with gr.Column(scale=1, min_width=120):
            refresh = gr.Button("↻ Refresh", size="md", elem_id="history-refresh")
    table = gr.Dataframe(
        history_table([], None),  # filled on load, in the viewer's time zone
        interactive=False,
        max_height=330,
        max_chars=70,
        elem_id="history-table",
        label="Jobs (newest first) — click a row for its detail",
    )
    with gr.Column(visible=False, elem_id="job-detail") as detail_box:
        with gr.Row():
            with gr.Column(scale=5):
                summary = gr.Markdown(elem_id="job-summary", **NO_LATEX)
                reuse = gr.Button("Reuse settings", variant="primary", elem_id="reuse-job")
            with gr.Column(scale=4):
                images = gr.Gallery(
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
            label="Traceback", lines=10, max_lines=30, interactive=False, visible=False, buttons=["copy"],
            elem_id="job-traceback",
        )
    history = HistoryTab(
        studio=studio,
        generate=generate,
        zone=zone,
        tab=tab,
        status_filter=status_filter,
        search=search,
        refresh=refresh,
        table=table,
        detail_box=detail_box,
        summary=summary,
        images=images,
        error_box=error_box,
        traceback_box=traceback_box,
        reuse=reuse,
        selected_job=gr.State(None),
        picked=gr.State(None),
    )
    history.wire()
    return history
