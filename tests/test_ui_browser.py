"""The studio page in a real browser (all three tabs): Playwright drives Debian's headless Chromium.

One app and one browser for the module; each test opens its own page (its own
Gradio session).  A job is held where a test needs it by a gate on the pipeline's
denoising step (the transformer call), so nothing here races the clock.
Screenshots of the Generate and History screens are written to
test-artifacts/screenshots/ (MASUKA_SCREENSHOTS_DIR=docs/screenshots refreshes the README's).
"""

from __future__ import annotations

import contextlib
import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")

ROOT = Path(__file__).resolve().parents[1]
# Runs write beside the repo's tracked files only when asked, so a test run leaves the checkout clean.
SHOTS = ROOT / os.environ.get("MASUKA_SCREENSHOTS_DIR", "test-artifacts/screenshots")
VIEWPORT = {"width": 1280, "height": 900}
JOB_TIMEOUT_MS = 60_000
# Markup that must stay text wherever the page shows it: a working password form, a link, a page-wide overlay.
HOSTILE = (
    '<form action="http://127.0.0.1:9/x"><input type="password" id="pw-evil"></form>'
    '<a id="evil-link" href="http://127.0.0.1:9">x</a><div id="evil-overlay" style="position:fixed;inset:0"></div>'
)
HOSTILE_IDS = ("#pw-evil", "#evil-link", "#evil-overlay", "#evil-b")


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    from conftest import launch_app, seed_home
    from masuka.settings import Settings

    home = seed_home(tmp_path_factory.mktemp("ui") / "home", tiny_model_dir)
    live = launch_app(Settings(home=home, allow_private_urls=True))  # LoRA links to a test server on 127.0.0.1
    yield live
    live.demo.close()
    live.studio.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        yield chromium
        chromium.close()


def open_page(browser, app, **context):
    """A new page in its own browser context (its own Gradio session)."""
    page = browser.new_context(viewport=VIEWPORT, **context).new_page()
    page.set_default_timeout(20_000)
    page.goto(app.url)
    page.wait_for_selector("#prompt textarea")
    return page


@pytest.fixture
def page(browser, app):
    page = open_page(browser, app)
    yield page
    page.context.close()


@contextlib.contextmanager
def patched(obj, name: str, replacement):
    """Replace one attribute of one object (the pipeline's boundary) for the block."""
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        delattr(obj, name)


class Gate:
    """Holds every denoising step until the test lets it through."""

    def __init__(self) -> None:
        self._permits = threading.Semaphore(0)

    def allow(self, steps: int = 1) -> None:
        self._permits.release(steps)

    def open(self) -> None:
        self._permits.release(100_000)

    def wait(self) -> None:
        assert self._permits.acquire(timeout=120), "a held job was never released"


@pytest.fixture
def gate(app):
    gate = Gate()
    transformer = app.studio.loaded.pipe.transformer
    original = transformer.forward

    def held(*args, **kwargs):
        gate.wait()
        return original(*args, **kwargs)

    with patched(transformer, "forward", held):
        yield gate
        gate.open()
        for job in app.studio.active_jobs():  # leave the runner idle for the next test
            app.studio.wait(job["job_id"], 60)


def close_toasts(page) -> None:
    """Close the toasts shown so far (they cover the header and the tabs until they time out)."""
    from playwright.sync_api import expect

    closers = page.locator(".toast-close")
    for i in reversed(range(closers.count())):
        closers.nth(i).click()
    expect(page.locator(".toast-body")).to_have_count(0)


def screenshot(page, name: str) -> None:
    """<SHOTS>/<name>.png, as a 256-colour PNG to keep the repository small."""
    close_toasts(page)
    SHOTS.mkdir(parents=True, exist_ok=True)
    target = SHOTS / f"{name}.png"
    page.screenshot(path=str(target))
    with Image.open(target) as shot:
        small = shot.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(target, optimize=True)


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def generate(page, prompt: str, **numbers) -> None:
    page.fill("#prompt textarea", prompt)
    for elem_id, value in numbers.items():
        set_number(page, elem_id.replace("_", "-"), value)
    page.click("#generate")


def latest_job(app, prompt: str) -> dict:
    rows = app.studio.history(1, None, prompt)
    assert rows, f"no job for prompt {prompt!r}"
    return app.studio.job(rows[0]["job_id"])


def open_history_row(page, job_id: str) -> None:
    """Show one job's detail: refresh the table, then click the row's job id."""
    from playwright.sync_api import expect

    close_toasts(page)
    page.get_by_role("tab", name="History").click()
    page.click("#history-refresh")
    cell = page.locator("#history-table [role=gridcell]", has_text=job_id).first
    expect(cell).to_be_visible()
    cell.click()
    expect(page.locator("#job-summary")).to_contain_text(job_id)


def assert_no_hostile_markup(page) -> None:
    for selector in HOSTILE_IDS:
        assert page.locator(selector).count() == 0, f"{selector} was rendered as markup"


def test_generate_with_a_lora_shows_images_with_seeds_and_the_job_in_history(page, app, tmp_path):
    from lora_factory import make_peft_lora
    from playwright.sync_api import expect

    from masuka.store.outputs import read_metadata

    expect(page.locator("#info")).to_contain_text("masuka/tiny-flux")
    expect(page.locator("#info")).to_contain_text("RAM")
    expect(page.locator("#demo-banner")).to_contain_text("Demo model")

    generate(page, "   ")  # refused before any job exists: toast and status line say why
    expect(page.locator("#status")).to_contain_text("Not started: prompt must be a non-empty text")
    expect(page.locator(".toast-body").filter(has_text="prompt must be")).to_be_visible()
    assert app.studio.history(1) == []

    make_peft_lora(app.studio.loaded.pipe.transformer, app.studio.lora_folder / "inkwash.safetensors")
    page.click("#refresh-loras")
    page.click("#lora-1 input")
    page.get_by_role("option", name="inkwash", exact=True).click()
    generate(page, "a red fox asleep in fresh snow", num_images=2)
    expect(page.locator("#status")).to_contain_text("✓ Job", timeout=JOB_TIMEOUT_MS)
    job = latest_job(app, "red fox asleep")
    assert job["status"] == "completed" and len(job["seeds"]) == 2
    assert job["loras"] == [{"name": "inkwash", "scale": 1.0}]
    status = page.inner_text("#status")
    assert job["job_id"] in status and str(job["seeds"][0]) in status and " s " in status
    images = page.locator("#gallery .grid-wrap img")
    expect(images).to_have_count(2)
    expect(page.locator("#gallery")).to_contain_text(f"seed {job['seeds'][1]}")
    screenshot(page, "generate")

    # What the gallery serves (and downloads) is the PNG on disk, settings included.
    body = page.request.get(images.first.get_attribute("src")).body()
    (tmp_path / "served.png").write_bytes(body)
    served = read_metadata(tmp_path / "served.png")
    assert served["prompt"] == "a red fox asleep in fresh snow" and served["seed"] == job["seeds"][0]

    images.nth(1).click()
    expect(page.locator("#picked-seed textarea")).to_have_value(str(job["seeds"][1]))
    page.click("#use-seed")
    expect(page.locator("#seed input")).to_have_value(str(job["seeds"][1]))
    page.click("#seed-random")
    expect(page.locator("#seed input")).to_have_value("-1")

    page.get_by_role("tab", name="History").click()
    expect(page.locator("#history-table")).to_contain_text(job["job_id"])
    page.fill("#history-search textarea", "no such prompt")
    page.press("#history-search textarea", "Enter")
    expect(page.locator("#history-table")).not_to_contain_text(job["job_id"])


def test_a_failed_job_shows_its_error_as_text_in_the_toast_status_and_history(page, app):
    from playwright.sync_api import expect

    pipe = app.studio.loaded.pipe

    def fail(*args, **kwargs):
        raise ValueError(f"LoRA module {HOSTILE} does not fit")

    with patched(pipe, "encode_prompt", fail):
        generate(page, "a crane, ink wash style")
        expect(page.locator("#status")).to_contain_text("✗ Job", timeout=JOB_TIMEOUT_MS)
    failed = latest_job(app, "a crane")
    assert failed["status"] == "failed" and HOSTILE in failed["error"]
    status = page.locator("#status")
    expect(status).to_contain_text(failed["job_id"])
    expect(status).to_contain_text('<input type="password" id="pw-evil">')  # as text
    toast = page.locator(".toast-body").filter(has_text=failed["job_id"])
    expect(toast).to_be_visible()
    expect(toast).to_contain_text('<a id="evil-link"')
    assert_no_hostile_markup(page)

    open_history_row(page, failed["job_id"])
    expect(page.locator("#history-table")).to_contain_text("<form action=")
    expect(page.locator("#job-summary")).to_contain_text("failed")
    expect(page.locator("#job-error textarea")).to_have_value(failed["error"])
    assert "Traceback (most recent call last)" in page.locator("#job-traceback textarea").input_value()
    assert_no_hostile_markup(page)


def test_cancel_stops_only_my_job_and_a_second_person_waits_in_the_queue(browser, app, gate):
    from playwright.sync_api import expect

    studio = app.studio
    me, other = open_page(browser, app), open_page(browser, app)
    try:
        generate(me, "a very long job", steps=50)
        expect(me.locator("#status")).to_contain_text("is starting", timeout=JOB_TIMEOUT_MS)
        mine = studio.running_job_id()
        assert mine and mine in me.inner_text("#status")
        gate.allow(1)
        expect(me.locator("#status")).to_contain_text("step 1 of 50")
        expect(me.locator("#gallery")).to_contain_text("1/50 steps")  # the progress bar over the gallery

        generate(other, "the second person's job")
        expect(other.locator("#status")).to_contain_text("waiting in the queue: 1 of 1")
        expect(other.locator("#gallery")).to_contain_text("waiting in the queue")

        open_history_row(me, mine)  # the page answers while the GPU is busy
        expect(me.locator("#job-summary")).to_contain_text("running")

        other.click("#cancel")  # ends the waiting job; mine runs on
        expect(other.locator("#status")).to_contain_text("cancelled")
        dropped = latest_job(app, "second person")
        assert dropped["status"] == "cancelled" and dropped["started_at"] is None
        assert studio.running_job_id() == mine

        me.reload()  # the reloaded page finds its running job again, and can still cancel it
        expect(me.locator("#status")).to_contain_text(f"Job {mine}: step 1 of 50")
        me.click("#cancel")
        while not studio.wait(mine, 0.2):  # each step now ends where the runner sees the cancel
            gate.allow(1)
        expect(me.locator("#status")).to_contain_text(f"Job {mine} cancelled", timeout=JOB_TIMEOUT_MS)
        assert studio.job(mine)["status"] == "cancelled"
        open_history_row(me, mine)
        expect(me.locator("#job-summary")).to_contain_text("cancelled")
        # A cancelled job never starts, even now that the GPU is free (status only moves forward).
        assert studio.job(dropped["job_id"])["started_at"] is None
    finally:
        me.context.close()
        other.context.close()


def test_a_reloaded_page_shows_its_job_progress_then_its_images(page, app, gate):
    from playwright.sync_api import expect

    generate(page, "a lighthouse seen again after a reload", steps=2)
    expect(page.locator("#status")).to_contain_text("is starting", timeout=JOB_TIMEOUT_MS)
    job_id = app.studio.running_job_id()

    page.reload()
    page.wait_for_selector("#prompt textarea")
    expect(page.locator("#status")).to_contain_text(f"Job {job_id} is starting")
    gate.allow(1)
    expect(page.locator("#status")).to_contain_text(f"Job {job_id}: step 1 of 2")
    gate.open()
    expect(page.locator("#status")).to_contain_text(f"✓ Job {job_id} done", timeout=JOB_TIMEOUT_MS)
    expect(page.locator("#gallery .grid-wrap img")).to_have_count(1)
    page.click("#seed-last")  # the reattached job is this page's last job
    expect(page.locator("#seed input")).to_have_value(str(app.studio.job(job_id)["seeds"][0]))


def test_history_in_local_time_and_reuse_from_a_row_and_from_dropped_images(browser, app, tmp_path):
    from playwright.sync_api import expect

    from masuka.store.outputs import save_image
    from masuka.studio import Caller

    studio = app.studio
    request = studio.validate(prompt="a lighthouse at dusk", seed=1234, steps=3, guidance=2.5, width=256, height=320)
    result = studio.generate(request, Caller())
    page = open_page(browser, app, timezone_id="Asia/Tokyo")
    try:
        open_history_row(page, result.job_id)
        created = studio.job(result.job_id)["created_at"]
        moment = (
            datetime.fromtimestamp(created, timezone.utc) if isinstance(created, (int, float))
            else datetime.fromisoformat(created)
        )
        tokyo = moment.astimezone(ZoneInfo("Asia/Tokyo")).strftime("%Y-%m-%d %H:%M:%S")
        assert tokyo != moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        expect(page.locator("#job-summary")).to_contain_text(f"{tokyo} JST")
        expect(page.locator("#history-table")).to_contain_text(tokyo)
        expect(page.locator("#job-images .grid-wrap img")).to_have_count(1)
        screenshot(page, "history")

        page.click("#reuse-job")
        expect(page.locator("#prompt textarea")).to_have_value("a lighthouse at dusk")
        expect(page.locator("#seed input")).to_have_value("1234")
        expect(page.locator("#steps input[type=number]")).to_have_value("3")
        expect(page.locator("#height input[type=number]")).to_have_value("320")
        expect(page.locator("#status")).to_contain_text(result.job_id)

        def drop(path: Path) -> None:
            remove = page.locator("#settings-image button[aria-label='Remove Image']")
            if remove.count():
                remove.click()
            page.set_input_files("#settings-image input[type=file]", str(path))

        page.fill("#prompt textarea", "something else")
        page.click("#settings-from-image-box button")  # open the accordion
        drop(result.images[0])
        expect(page.locator("#prompt textarea")).to_have_value("a lighthouse at dusk")

        plain = tmp_path / "plain.png"
        Image.new("RGB", (32, 32), "white").save(plain)
        drop(plain)
        expect(page.locator("#status")).to_contain_text("no MASUKA settings")
        expect(page.locator("#prompt textarea")).to_have_value("a lighthouse at dusk")

        # An image whose settings carry markup, a job id with a backtick, unknown and invalid values.
        hostile_id = 'x` <b id="evil-b">bold</b> ' + HOSTILE
        meta = {
            "prompt": f"a harbour {HOSTILE}",
            "seed": 77,
            "steps": 3,
            "guidance": 2.0,
            "width": 999,
            "height": 256,
            "job_id": hostile_id,
            "loras": [{"name": HOSTILE, "scale": 1.0}, {"name": "not-here", "scale": 0.5}],
        }
        hostile = save_image(Image.new("RGB", (32, 32), "black"), tmp_path, meta, stem="hostile")
        drop(hostile)
        expect(page.locator("#prompt textarea")).to_have_value(f"a harbour {HOSTILE}")
        expect(page.locator("#seed input")).to_have_value("77")
        status = page.locator("#status")
        expect(status).to_contain_text("Settings loaded from the dropped image (job x` <b id=")
        expect(status).to_contain_text("width 999 dropped")
        expect(status).to_contain_text("'not-here' is not in this library")
        warning = page.locator(".toast-body").filter(has_text="not in this library")
        expect(warning).to_be_visible()
        expect(warning).to_contain_text("<form action=")
        expect(page.locator("#lora-1 input")).to_have_value("not-here")
        assert_no_hostile_markup(page)
    finally:
        page.context.close()


def test_loras_tab_adds_by_link_and_upload_then_deletes(page, app, tmp_path):
    from lora_factory import make_kohya_lora, make_peft_lora
    from lora_server import LoraServer
    from playwright.sync_api import expect

    studio = app.studio
    server = LoraServer()
    try:
        t = studio.loaded.pipe.transformer
        # A trigger word is the file's own text: it must show as text, not as a form.
        kohya = make_kohya_lora(t, tmp_path / "k.safetensors", seed=3, metadata={"trigger_phrase": f"inkwash\n{HOSTILE}"})
        url = server.add(
            "/api/download/models/5",
            kohya.read_bytes(),
            headers={"Content-Disposition": 'attachment; filename="Ink Wash.safetensors"'},
        )
        page.get_by_role("tab", name="LoRAs").click()
        page.fill("#lora-source textarea, #lora-source input", url)
        page.click("#lora-add")
        result = page.locator("#lora-add-result")
        expect(result).to_contain_text("Added Ink_Wash")
        expect(result).to_contain_text('<input type="password"')  # the trigger word, as text
        assert_no_hostile_markup(page)
        expect(page.locator("#lora-table")).to_contain_text("Ink_Wash")

        upload = make_peft_lora(t, tmp_path / "Paper Cut.safetensors", seed=4)
        page.set_input_files("#lora-upload input[type=file]", str(upload))
        expect(page.locator("#lora-upload")).to_contain_text("Paper Cut.safetensors")  # uploaded before Add
        page.fill("#lora-name textarea, #lora-name input", "paper")
        page.click("#lora-add")
        expect(result).to_contain_text("Added paper")
        expect(page.locator("#lora-table")).to_contain_text("paper")
        assert {"Ink_Wash", "paper"} <= set(studio.lora_names(usable_only=False))

        page.fill("#lora-name textarea, #lora-name input", "../../x")
        page.fill("#lora-source textarea, #lora-source input", url)
        page.click("#lora-add")
        expect(page.locator(".toast-body").filter(has_text="is not allowed")).to_be_visible()

        page.click("#lora-delete-name input")
        page.locator("ul[role=listbox]").get_by_text("paper").click()
        page.click("#lora-delete")
        expect(result).to_contain_text("Deleted paper")
        expect(page.locator("#lora-table")).not_to_contain_text("paper")
        assert not (studio.lora_folder / "paper.safetensors").exists()
        close_toasts(page)
        page.get_by_role("tab", name="Generate").click()  # the form's LoRA choices follow the library
        page.click("#lora-1 input")
        choices = page.locator("ul[role=listbox]")
        expect(choices).to_contain_text("Ink_Wash")
        expect(choices).not_to_contain_text("paper")
    finally:
        server.close()


def test_fast_from_the_page_is_recorded_and_reused_as_fast(page, app):
    from playwright.sync_api import expect

    speed = page.locator("#speed")
    expect(speed).to_contain_text("Fast skips transformer steps")
    expect(speed.get_by_label("Exact")).to_be_checked()  # the default
    speed.get_by_label("Fast").check()
    generate(page, "a heron in a hurry", steps=6)
    expect(page.locator("#status")).to_contain_text("✓ Job", timeout=JOB_TIMEOUT_MS)
    job = latest_job(app, "heron in a hurry")
    assert job["params"]["speed"] == "fast" and job["params"]["cache"] == "first-block"

    speed.get_by_label("Exact").check()
    open_history_row(page, job["job_id"])
    page.click("#reuse-job")
    expect(page.locator("#prompt textarea")).to_have_value("a heron in a hurry")
    expect(speed.get_by_label("Fast")).to_be_checked()
