"""The studio page in a real browser: Playwright drives Debian's headless Chromium.

One app and one browser for the module; each test opens its own page (its own
Gradio session).  Screenshots of the Generate and History screens are written
to test-artifacts/screenshots/ (MASUKA_SCREENSHOTS_DIR=docs/screenshots refreshes the README's).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from PIL import Image

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")

import os

ROOT = Path(__file__).resolve().parents[1]
# Runs write beside the repo's tracked files only when asked, so a test run leaves the checkout clean.
SHOTS = ROOT / os.environ.get("MASUKA_SCREENSHOTS_DIR", "test-artifacts/screenshots")
VIEWPORT = {"width": 1280, "height": 900}
JOB_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    from conftest import launch_app, seed_home
    from masuka.settings import Settings

    home = seed_home(tmp_path_factory.mktemp("ui") / "home", tiny_model_dir)
    live = launch_app(Settings(home=home))
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


def open_page(browser, app):
    page = browser.new_context(viewport=VIEWPORT).new_page()
    page.set_default_timeout(20_000)
    page.goto(app.url)
    page.wait_for_selector("#prompt textarea")
    return page


@pytest.fixture
def page(browser, app):
    page = open_page(browser, app)
    yield page
    page.context.close()


def screenshot(page, name: str) -> None:
    """<SHOTS>/<name>.png, as a 256-colour PNG to keep the repository small."""
    closers = page.locator(".toast-close")
    for i in reversed(range(closers.count())):  # earlier toasts would cover the header
        closers.nth(i).click()
    page.wait_for_timeout(400)
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
    rows = app.manager.jobs.list(limit=1, search=prompt)
    assert rows, f"no job for prompt {prompt!r}"
    return rows[0]


def open_history_row(page, job_id: str) -> None:
    """Show one job's detail: refresh the table, then click the row's job id."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name="History").click()
    page.click("#history-refresh")
    cell = page.locator("#history-table [role=gridcell]", has_text=job_id).first
    expect(cell).to_be_visible()
    page.wait_for_timeout(300)  # let the refreshed rows settle before clicking one
    cell.click()
    expect(page.locator("#job-summary")).to_contain_text(job_id)


def test_generate_shows_images_with_seeds_and_the_job_in_history(page, app, tmp_path):
    from playwright.sync_api import expect

    from masuka.store.outputs import read_metadata

    expect(page.locator("#info")).to_contain_text("masuka/tiny-flux")
    expect(page.locator("#info")).to_contain_text("RAM")
    expect(page.locator("#demo-banner")).to_contain_text("Demo model")

    generate(page, "   ")  # refused before any job exists: toast and status line say why
    expect(page.locator("#status")).to_contain_text("Not started: prompt must be a non-empty text")
    expect(page.locator(".toast-body").filter(has_text="prompt must be")).to_be_visible()
    assert app.manager.jobs.list(limit=1) == []

    generate(page, "a red fox asleep in fresh snow", num_images=2)
    expect(page.locator("#status")).to_contain_text("✓ Job", timeout=JOB_TIMEOUT_MS)
    job = latest_job(app, "red fox asleep")
    assert job["status"] == "completed" and len(job["seeds"]) == 2
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


def test_lora_slot_then_a_failed_job_shows_its_error_and_traceback(page, app):
    from lora_factory import make_peft_lora
    from playwright.sync_api import expect

    lora_file = make_peft_lora(app.manager.loaded.pipe.transformer, app.manager.loras.folder / "inkwash.safetensors")
    page.click("#refresh-loras")
    page.click("#lora-1 input")
    page.get_by_role("option", name="inkwash").click()
    generate(page, "a heron, ink wash style")
    expect(page.locator("#status")).to_contain_text("✓ Job", timeout=JOB_TIMEOUT_MS)
    assert latest_job(app, "heron")["loras"] == [{"name": "inkwash", "scale": 1.0}]

    lora_file.unlink()  # the slot still names it: the next job fails
    generate(page, "a crane, ink wash style")
    expect(page.locator("#status")).to_contain_text("✗ Job", timeout=JOB_TIMEOUT_MS)
    failed = latest_job(app, "crane")
    assert failed["status"] == "failed"
    expect(page.locator("#status")).to_contain_text(failed["job_id"])
    expect(page.locator("#status")).to_contain_text("inkwash")
    expect(page.locator(".toast-body").filter(has_text=failed["job_id"])).to_be_visible()

    open_history_row(page, failed["job_id"])
    expect(page.locator("#job-summary")).to_contain_text("failed")
    expect(page.locator("#job-error textarea")).to_have_value(failed["error"])
    assert "Traceback (most recent call last)" in page.locator("#job-traceback textarea").input_value()


def test_cancel_stops_only_my_job_and_a_second_person_waits_in_the_queue(browser, app):
    from playwright.sync_api import expect

    me, other = open_page(browser, app), open_page(browser, app)
    try:
        generate(me, "a very long job", steps=100, width=1024, height=1024)
        deadline = time.monotonic() + 30
        while app.manager.running_job_id() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        mine = app.manager.running_job_id()
        assert mine, "the long job never started"
        expect(me.locator("#gallery")).to_contain_text("steps")  # the per-step progress bar

        generate(other, "the second person's job")
        expect(other.locator("#gallery")).to_contain_text("queue")  # waits, position shown

        # The page answers while the GPU is busy: history and detail.
        started = time.monotonic()
        open_history_row(me, mine)
        expect(me.locator("#job-summary")).to_contain_text("running")
        assert time.monotonic() - started < 10

        other.click("#cancel")  # ends the waiting job; mine runs on
        expect(other.locator("#status")).to_contain_text("cancelled")
        assert app.manager.running_job_id() == mine
        [dropped] = app.manager.jobs.list(limit=5, search="second person")
        assert dropped["status"] == "cancelled" and dropped["started_at"] is None

        me.get_by_role("tab", name="Generate").click()
        me.click("#cancel")
        expect(me.locator("#status")).to_contain_text(f"Job {mine} cancelled", timeout=JOB_TIMEOUT_MS)
        assert app.manager.jobs.get(mine)["status"] == "cancelled"
        open_history_row(me, mine)
        expect(me.locator("#job-summary")).to_contain_text("cancelled")
        # A cancelled job never starts, even now that the GPU is free (status only moves forward).
        assert app.manager.jobs.get(dropped["job_id"])["started_at"] is None
    except BaseException:
        for j in app.manager.jobs.list(limit=10):
            print("JOB", j["job_id"], j["status"], j["prompt"], j["steps"], j["width"], j["created_at"], j["started_at"], j["finished_at"], j["error"])
        raise
    finally:
        me.context.close()
        other.context.close()


def test_reuse_settings_from_a_history_row_and_from_a_dropped_image(page, app, tmp_path):
    from playwright.sync_api import expect

    manager = app.manager
    request = manager.validate(prompt="a lighthouse at dusk", seed=1234, steps=3, guidance=2.5, width=256, height=320)
    result = manager.generate(request)

    open_history_row(page, result.job_id)
    expect(page.locator("#job-images .grid-wrap img")).to_have_count(1)
    screenshot(page, "history")
    page.click("#reuse-job")
    expect(page.locator("#prompt textarea")).to_have_value("a lighthouse at dusk")
    expect(page.locator("#seed input")).to_have_value("1234")
    expect(page.locator("#steps input[type=number]")).to_have_value("3")
    expect(page.locator("#height input[type=number]")).to_have_value("320")
    expect(page.locator("#status")).to_contain_text(result.job_id)

    page.fill("#prompt textarea", "something else")
    page.click("#settings-from-image-box button")  # open the accordion
    page.set_input_files("#settings-image input[type=file]", str(result.images[0]))
    expect(page.locator("#prompt textarea")).to_have_value("a lighthouse at dusk")

    plain = tmp_path / "plain.png"
    Image.new("RGB", (32, 32), "white").save(plain)
    page.locator("#settings-image button[aria-label='Remove Image']").click()
    page.set_input_files("#settings-image input[type=file]", str(plain))
    expect(page.locator("#status")).to_contain_text("no MASUKA settings")
    expect(page.locator("#prompt textarea")).to_have_value("a lighthouse at dusk")
