"""The LoRAs tab in a real browser (Playwright + Debian's headless Chromium):
add by link and by upload, see it in the library and in the Generate form, delete it."""

from __future__ import annotations

from pathlib import Path

import pytest

from lora_factory import make_kohya_lora, make_peft_lora
from lora_server import LoraServer

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = [
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
    pytest.mark.timeout(180),
]


@pytest.fixture
def app(tmp_path, tiny_model_dir):
    from conftest import launch_app, seed_home
    from masuka.settings import Settings

    live = launch_app(Settings(home=seed_home(tmp_path / "home", tiny_model_dir), allow_private_urls=True))
    yield live
    live.demo.close()
    live.studio.close()


@pytest.fixture
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
        page.set_default_timeout(20_000)
        page.goto(app.url)
        page.wait_for_selector("#prompt textarea")
        yield page
        browser.close()


def lora_choices(page) -> str:
    page.click("#tab-generate-button") if page.query_selector("#tab-generate-button") else page.get_by_role(
        "tab", name="Generate"
    ).click()
    page.click("#lora-1 input")
    text = page.locator("ul[role=listbox]").inner_text()
    page.keyboard.press("Escape")
    return text


def wait_for_table(page, text: str, *, present: bool) -> None:
    page.wait_for_function(
        "([t, present]) => document.querySelector('#lora-table').innerText.includes(t) === present", arg=[text, present]
    )


def test_add_by_link_and_upload_then_delete(app, page, tmp_path):
    server = LoraServer()
    try:
        t = app.manager.pipe.transformer
        url = server.add(
            "/api/download/models/5",
            make_kohya_lora(t, tmp_path / "k.safetensors", seed=3, metadata={"trigger_phrase": "inkwash"}).read_bytes(),
            headers={"Content-Disposition": 'attachment; filename="Ink Wash.safetensors"'},
        )
        page.get_by_role("tab", name="LoRAs").click()
        page.fill("#lora-source textarea, #lora-source input", url)
        page.click("#lora-add")
        result = page.locator("#lora-add-result")
        result.get_by_text("Added").wait_for()
        assert "Ink_Wash" in result.inner_text() and "inkwash" in result.inner_text()
        wait_for_table(page, "Ink_Wash", present=True)

        upload = make_peft_lora(t, tmp_path / "Paper Cut.safetensors", seed=4)
        page.set_input_files("#lora-upload input[type=file]", str(upload))
        page.fill("#lora-name textarea, #lora-name input", "paper")
        page.wait_for_timeout(500)  # the upload finishes before Add is pressed
        page.click("#lora-add")
        page.wait_for_function("() => document.querySelector('#lora-add-result').innerText.includes('paper')")
        wait_for_table(page, "paper", present=True)
        assert {r.name for r in app.manager.loras.list()} == {"Ink_Wash", "paper"}

        page.fill("#lora-name textarea, #lora-name input", "../../x")
        page.fill("#lora-source textarea, #lora-source input", url)
        page.click("#lora-add")
        page.get_by_text("is not allowed").first.wait_for()

        page.click("#lora-delete-name input")
        page.locator("ul[role=listbox]").get_by_text("paper").click()
        page.click("#lora-delete")
        page.wait_for_function("() => document.querySelector('#lora-add-result').innerText.includes('Deleted')")
        page.screenshot(path=str(tmp_path / "loras.png"), full_page=True)
        wait_for_table(page, "paper", present=False)
        assert not (app.manager.loras.folder / "paper.safetensors").exists()
        choices = lora_choices(page)
        assert "Ink_Wash" in choices and "paper" not in choices
    finally:
        server.close()
