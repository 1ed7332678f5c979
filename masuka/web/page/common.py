"""Pure helpers of the page: escaping, times, form settings and the lines it shows.

Nothing here touches Gradio's event machinery; tests/test_ui.py checks these without a browser.
"""

from __future__ import annotations

import html
import string
from dataclasses import dataclass, field
from datetime import datetime, timezone, tzinfo
from pathlib import Path
from typing import Any, Sequence
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from masuka.core.requests import ModelDefaults, aspect_size
from masuka.studio import Studio

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
SHOWN_ID_CHARS = 40  # a job id read from a dropped image can be anything: show at most this much

# Events that never wait for the GPU and never make anyone wait.
FREE: dict[str, Any] = {"concurrency_limit": None, "api_visibility": "private"}
UNQUEUED: dict[str, Any] = {"queue": False, "api_visibility": "private"}
# Markdown that shows text from users, files or errors: "$$" in a prompt is not a formula.
NO_LATEX: dict[str, Any] = {"latex_delimiters": []}


# ---- escaping: one helper per place text is shown ----------------------------
def md_text(text: Any) -> str:
    """Any text shown as itself inside Markdown (which Gradio also reads as HTML).

    Every ASCII punctuation mark is backslash-escaped (CommonMark allows that for all
    of them), so no tag, link, autolink, emphasis or entity survives; a line break
    stays a line break."""
    escaped = "".join("\\" + c if c in string.punctuation else c for c in str(text))
    return "  \n".join(line.strip() for line in escaped.splitlines() if line.strip())


def md_code(text: Any, limit: int = SHOWN_ID_CHARS) -> str:
    """An identifier (job id, LoRA name, trigger word) in code style, as text.

    Not Markdown backticks: a backtick in the text would end the code span, and
    inside one no escape works; an inline <code> element with escaped text has neither problem."""
    text = str(text)
    if len(text) > limit:
        text = text[:limit] + "…"
    return f"<code>{md_text(text)}</code>"


def toast_text(text: Any) -> str:
    """Text for a toast (gr.Error / gr.Warning / gr.Info), which Gradio shows as HTML."""
    return html.escape(str(text), quote=True)


# ---- times -------------------------------------------------------------------
def parse_time(value: Any) -> datetime | None:
    """A record's time: an ISO 8601 string (UTC), or a legacy Unix time; None when absent.

    An ISO string without an offset is read as the server's local time (what the
    older history table held)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return datetime.fromtimestamp(float(value), timezone.utc)
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.astimezone()


def viewer_zone(name: str | None) -> tzinfo:
    """The browser's time zone (an IANA name its JavaScript reported); UTC if unknown."""
    if name:
        try:
            return ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            pass
    return timezone.utc


def local_time(value: Any, zone: str | None, *, with_zone: bool = False) -> str:
    """A record's time in the viewer's zone, "YYYY-MM-DD HH:MM:SS" ("" when absent)."""
    moment = parse_time(value)
    if moment is None:
        return "" if value in (None, "") else str(value)
    shown = moment.astimezone(viewer_zone(zone))
    return shown.strftime("%Y-%m-%d %H:%M:%S" + (" %Z" if with_zone else ""))


# ---- the Generate form's settings --------------------------------------------
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
    speed: str = "exact"


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
        # Jobs from before the speed choice were exact.
        speed="fast" if (record.get("params") or {}).get("speed") == "fast" else "exact",
    )


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


# ---- lines the page shows ----------------------------------------------------
def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def job_images(record: dict[str, Any]) -> list[tuple[str, int]]:
    """(path, seed) of a job's images still on disk."""
    pairs = zip(record.get("outputs") or [], record.get("seeds") or [])
    return [(str(p), int(s)) for p, s in pairs if Path(p).is_file()]


def gallery_items(pairs: Sequence[tuple[str, int]]) -> list[tuple[str, str]]:
    return [(path, f"seed {seed}") for path, seed in pairs]


def gallery_columns(n: int) -> int:
    """One image fills the gallery; more share it."""
    return 1 if n <= 1 else 2 if n <= 4 else 3


def result_line(record: dict[str, Any]) -> str:
    """The status line of an ended job, from its record."""
    job = md_code(record["job_id"])
    status = record.get("status")
    if status == "cancelled":
        return f"■ Job {job} cancelled — no images kept."
    if status == "failed":
        return failure_line(record["job_id"], record.get("error") or "unknown error")
    seeds = [int(s) for s in record.get("seeds") or []]
    n = len(record.get("outputs") or [])
    duration = record.get("duration_s")
    took = "" if duration is None else f" in {float(duration):.1f} s"
    line = f"✓ Job {job} done{took} · {_plural(n, 'image')} · seed{'s' if n != 1 else ''} "
    line += ", ".join(str(s) for s in seeds[:n] or seeds)
    for note in record.get("notes") or []:
        line += f"  \nNote: {md_text(note)}"
    return line


def failure_line(job_id: str, reason: str) -> str:
    return f"✗ Job {md_code(job_id)} failed: {md_text(reason)}  \nThe full traceback is in History."


def progress_line(job_id: str, place: int | None, waiting: int, steps: tuple[int, int] | None) -> str:
    """Where a job stands: its place in the queue, then its steps."""
    job = md_code(job_id)
    if place:
        return f"… Job {job} is waiting in the queue: {place} of {waiting}."
    if steps is not None and steps[0] > 0:
        return f"… Job {job}: step {steps[0]} of {steps[1]}."
    return f"… Job {job} is starting."


def job_markdown(record: dict[str, Any], zone: str | None) -> str:
    """The History tab's summary of one job; times in the viewer's zone."""
    icon = {"completed": "✓", "failed": "✗", "cancelled": "■", "running": "…", "queued": "…"}.get(record["status"], "⚠")
    loras = ", ".join(f"{lc['name']} × {float(lc['scale']):g}" for lc in record.get("loras") or []) or "none"
    seeds = ", ".join(str(s) for s in record.get("seeds") or []) or "—"
    duration = "" if record.get("duration_s") is None else f" · took {float(record['duration_s']):.2f} s"
    who = f" · by {md_text(record['user'])}" if record.get("user") else ""
    created = local_time(record.get("created_at"), zone, with_zone=True)
    lines = [
        f"### {icon} Job {md_code(record['job_id'])} — {md_text(record['status'])}",
        f"**Prompt** {md_text(record.get('prompt') or '')}",
        f"**Size** {md_text(record.get('width'))} × {md_text(record.get('height'))} · "
        f"**Steps** {md_text(record.get('steps'))} · **Guidance** {md_text(record.get('guidance'))} · "
        f"**Images** {md_text(record.get('num_images'))}",
        f"**Seeds** {seeds}",
        f"**LoRAs** {md_text(loras)}",
        f"**Model** {md_text(record.get('model') or '')}",
        f"**Created** {md_text(created)}{duration}{who}",
    ]
    lines += [f"Note: {md_text(n)}" for n in record.get("notes") or []]
    return lines[0] + "\n\n" + "  \n".join(lines[1:])


HISTORY_COLUMNS = {
    "job_id": "Job",
    "created_at": "Created",
    "status": "Status",
    "prompt": "Prompt",
    "lora": "LoRAs",
    "seed": "Seed",
    "steps": "Steps",
    "duration_s": "Time (s)",
    "error": "Error",
}  # the first column must stay the job id: selecting a row reads it


def history_table(rows: Sequence[dict[str, Any]], zone: str | None):
    """History rows (`Studio.history`) as the page's table, times in the viewer's zone."""
    import pandas as pd

    table = [
        {
            **{key: row.get(key) for key in HISTORY_COLUMNS},
            "created_at": local_time(row.get("created_at"), zone),
            "prompt": row.get("prompt") or "",
            "lora": row.get("lora") or "",
            "error": row.get("error") or "",
        }
        for row in rows
    ]
    frame = pd.DataFrame(table, columns=list(HISTORY_COLUMNS))
    for column in ("seed", "steps"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce").astype("Int64")
    frame["duration_s"] = pd.to_numeric(frame["duration_s"], errors="coerce").astype("float64")
    return frame.rename(columns=HISTORY_COLUMNS)


# ---- the info line -----------------------------------------------------------
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
    model = studio.model_info()
    mem = memory_in_use(studio.device)
    what = "GPU memory" if mem.kind == "GPU" else "RAM (this process)"
    parts = [
        f"**{md_text(model.spec)}**",
        md_text(model.device),
        md_text(model.dtype),
        f"{what} {mem.used / 2**30:.2f} / {mem.total / 2**30:.1f} GiB",
    ]
    if model.memory_profile != "full":
        parts.append(f"memory profile {md_text(model.memory_profile)}")
    parts.append("generating" if studio.running_job_id() else "idle")  # not the job id: that is the owner's
    return " · ".join(parts)
