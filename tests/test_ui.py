"""The page's helpers without a browser (tests/test_ui_browser.py drives the page itself)."""

from __future__ import annotations

import re
import string
import threading

import numpy as np
import pytest
from PIL import Image

from masuka.core.requests import (
    SIZE_MAX,
    SIZE_MIN,
    LoraChoice,
    aspect_size,
    check_size,
    parse_lora_spec,
    settings_from_metadata,
)
from masuka.model.defaults import DEV_DEFAULTS, TINY_DEFAULTS
from masuka.studio import Caller
from masuka.web.page.common import (
    FormSettings,
    aspect_of,
    aspect_presets,
    failure_line,
    history_table,
    info_markdown,
    job_markdown,
    local_time,
    lora_spec,
    md_code,
    md_text,
    memory_in_use,
    settings_from_record,
    toast_text,
)
from masuka.web.page.generate import jobs_to_follow, remembered

@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_dir):
    """One studio for the module (the history it gathers is not asserted on)."""
    from conftest import seed_home
    from masuka.settings import Settings
    from masuka.studio import build_studio

    st = build_studio(Settings(home=seed_home(tmp_path_factory.mktemp("ui") / "home", tiny_model_dir)))
    yield st
    st.close()


HOSTILE = '<form action="http://x/"><input type="password"></form> [link](http://x) `tick` *em* $$x$$ www.x.com'


def unescaped(markdown: str) -> str:
    """The ASCII punctuation left in Markdown once its backslash escapes are taken out."""
    return "".join(c for c in re.sub(r"\\.", "", markdown) if c in string.punctuation)


@pytest.mark.parametrize("defaults", [TINY_DEFAULTS, DEV_DEFAULTS])
def test_aspect_presets_are_valid_sizes_in_their_ratio(defaults):
    area = defaults.width * defaults.height
    for name, (w, h) in aspect_presets(defaults).items():
        assert check_size("width", w) == w and check_size("height", h) == h  # multiples of 16 in bounds
        rw, rh = map(int, name.split(":"))
        assert abs(w / h - rw / rh) / (rw / rh) < 0.08, name
        if SIZE_MIN < min(w, h):  # not pushed up by the lower bound: about the model's pixel count
            assert abs(w * h - area) / area < 0.08, name
    assert aspect_presets(defaults)["1:1"] == (defaults.width, defaults.height)
    assert aspect_of(defaults.width, defaults.height, aspect_presets(defaults)) == "1:1"
    assert aspect_of(defaults.width + 16, defaults.height, aspect_presets(defaults)) is None


def test_aspect_size_scales_the_whole_rectangle_at_the_bounds():
    assert aspect_size(16, 9, 256 * 256) == (448, 256)  # the short side held at the minimum
    w, h = aspect_size(21, 9, 2048 * 2048)
    assert w == SIZE_MAX and h % 16 == 0 and abs(w / h - 21 / 9) < 0.05
    with pytest.raises(ValueError, match="aspect ratio"):
        aspect_size(0, 1, 1024)


def test_lora_slots_make_the_spec_the_runner_reads():
    spec = lora_spec([("ink", 0.8), ("", 1.0), (None, None), ("film-grain", 1.0)])
    assert spec == "ink:0.8,film-grain:1"
    assert parse_lora_spec(spec) == (LoraChoice("ink", 0.8), LoraChoice("film-grain", 1.0))
    assert lora_spec([("", 1.0)] * 4) == ""


def test_settings_from_a_record_with_loras_and_missing_fields():
    record = {"prompt": "p", "seed": 7, "seeds": [], "loras": [{"name": "ink", "scale": 0.5}], "steps": None}
    form = settings_from_record(record, TINY_DEFAULTS)
    assert form.seed == 7 and form.steps == TINY_DEFAULTS.steps and form.loras == [("ink", 0.5)]


def test_reused_settings_reproduce_the_job_and_the_image(studio):
    """What "Reuse settings" (a job) and a dropped image put in the form make the same picture again."""
    from masuka.store.outputs import read_metadata

    defaults = studio.model_info().defaults
    request = studio.validate(prompt="a lighthouse at dusk", seed=-1, steps=2, height=320, num_images=2)
    first = studio.generate(request, Caller())

    form = settings_from_record(studio.job(first.job_id), defaults)
    assert (form.prompt, form.seed, form.steps, form.width, form.height, form.num_images) == (
        "a lighthouse at dusk", first.seeds[0], 2, 256, 320, 2,
    )  # the seed actually used, not the -1 asked for
    fields, notes = settings_from_metadata(read_metadata(first.images[1]), defaults)
    from_image = FormSettings(**fields)
    assert notes == [] and from_image.seed == first.seeds[1] and from_image.num_images == 1

    again = studio.generate(
        studio.validate(
            prompt=from_image.prompt, lora=lora_spec(from_image.loras), seed=from_image.seed, steps=from_image.steps,
            guidance=from_image.guidance, width=from_image.width, height=from_image.height,
            num_images=from_image.num_images,
        ),
        Caller(),
    )
    assert np.array_equal(np.asarray(Image.open(again.images[0])), np.asarray(Image.open(first.images[1])))


def test_a_reloaded_page_follows_its_login_s_jobs_or_its_browser_s(studio):
    """Which queued or running job a reloaded page shows: never another person's."""
    started, release = threading.Event(), threading.Event()

    def hold(done: int, total: int) -> None:
        started.set()
        assert release.wait(60)

    request = studio.validate(prompt="a held job", steps=2)
    ann = studio.submit(request, Caller(user="ann", session="s1"), on_step=hold)
    anonymous = studio.submit(request, Caller(session="s2"))
    try:
        assert started.wait(60)
        assert [j["job_id"] for j in jobs_to_follow(studio, Caller(user="ann"), [])] == [ann.job_id]
        assert jobs_to_follow(studio, Caller(user="bob"), [ann.job_id, anonymous.job_id]) == []
        mine = jobs_to_follow(studio, Caller(session="new"), ["zzz", anonymous.job_id, 7])
        assert [j["job_id"] for j in mine] == [anonymous.job_id]
        assert jobs_to_follow(studio, Caller(session="new"), None) == []  # nothing kept: nothing followed
        assert jobs_to_follow(studio, Caller(session="new"), "not a list") == []
    finally:
        release.set()
        studio.outcome(ann)
        studio.outcome(anonymous)
    assert jobs_to_follow(studio, Caller(user="ann"), []) == []  # ended jobs are not followed


def test_a_browser_remembers_its_newest_job_ids_only():
    assert remembered(["a", "b"], "a") == ["b", "a"]
    assert remembered([1, None, "x" * 65, "ok"]) == ["ok"]  # localStorage can hold anything
    assert remembered([str(i) for i in range(50)], "new")[-2:] == ["49", "new"]
    assert len(remembered([str(i) for i in range(50)])) == 20


def test_text_is_shown_as_text_in_markdown_and_toasts():
    shown = md_text(HOSTILE)
    assert unescaped(shown) == "" and shown.replace("\\", "") == HOSTILE  # every mark escaped, nothing lost
    assert md_text("line one\nline two") == "line one  \nline two"
    code = md_code("x` <b>bold</b>")
    assert code.startswith("<code>") and code.endswith("</code>") and unescaped(code[6:-7]) == ""
    assert md_code("a" * 100).endswith("…</code>")
    assert toast_text(HOSTILE).startswith("&lt;form action=&quot;http://x/&quot;&gt;")
    assert md_text(HOSTILE) in failure_line("abc", HOSTILE)


def test_times_are_shown_in_the_viewer_s_zone():
    iso = "2026-11-30T06:10:03.123456+00:00"
    assert local_time(iso, "Asia/Tokyo") == "2026-11-30 15:10:03"
    assert local_time(1796019003.0, "Asia/Tokyo") == local_time("2026-11-30T06:10:03+00:00", "Asia/Tokyo")
    assert local_time(iso, "Europe/Paris", with_zone=True) == "2026-11-30 07:10:03 CET"
    assert local_time(iso, "no/such-zone") == "2026-11-30 06:10:03"  # an unknown zone: UTC
    assert local_time(None, "Asia/Tokyo") == ""
    record = {"job_id": "abc", "status": "completed", "created_at": iso, "prompt": HOSTILE, "notes": [HOSTILE]}
    summary = job_markdown(record, "Asia/Tokyo")
    assert md_text("2026-11-30 15:10:03 JST") in summary and summary.count(md_text(HOSTILE)) == 2
    row = {"job_id": "abc", "created_at": iso, "status": "completed", "prompt": "p", "seed": 5, "steps": 2}
    table = history_table([row], "America/New_York")
    assert table.iloc[0]["Created"] == "2026-11-30 01:10:03" and table.iloc[0]["Seed"] == 5
    assert list(history_table([], None).columns)[0] == "Job"  # selecting a row reads the first column


def test_info_line_names_model_device_and_memory(studio):
    line = info_markdown(studio)
    assert "tiny" in line and "cpu" in line and "float32" in line and "RAM" in line and "idle" in line
    mem = memory_in_use(studio.device)
    assert mem.kind == "RAM" and 0 < mem.used < mem.total
