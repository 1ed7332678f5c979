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
# A trigger word is the file's own text: it must show as text, not as a form.
HOSTILE_TRIGGER = '<form action="http://127.0.0.1:9/x"><input type="password" id="pw-evil"></form>'


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    from conftest import launch_app, seed_home
    from masuka.settings import Settings

    home = seed_home(tmp_path_factory.mktemp("lora-ui") / "home", tiny_model_dir)
    live = launch_app(Settings(home=home, allow_private_urls=True))
    yield live
    live.demo.close()
    live.studio.close()


@pytest.fixture
def page(app):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
        page.set_default_timeout(20_000)
        page.goto(app.url)
        page.wait_for_selector("#prompt textarea")
        yield page
        browser.close()


def test_add_by_link_and_upload_then_delete(app, page, tmp_path):
    from playwright.sync_api import expect

    studio = app.studio
    server = LoraServer()
    try:
        t = studio.loaded.pipe.transformer
        kohya = make_kohya_lora(
            t, tmp_path / "k.safetensors", seed=3, metadata={"trigger_phrase": f"inkwash\n{HOSTILE_TRIGGER}"}
        )
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
        expect(result).to_contain_text("inkwash")
        expect(result).to_contain_text('<input type="password"')  # the trigger word, as text
        assert page.locator("#pw-evil").count() == 0
        expect(page.locator("#lora-table")).to_contain_text("Ink_Wash")

        upload = make_peft_lora(t, tmp_path / "Paper Cut.safetensors", seed=4)
        page.set_input_files("#lora-upload input[type=file]", str(upload))
        expect(page.locator("#lora-upload")).to_contain_text("Paper Cut.safetensors")  # uploaded before Add
        page.fill("#lora-name textarea, #lora-name input", "paper")
        page.click("#lora-add")
        expect(result).to_contain_text("Added paper")
        expect(page.locator("#lora-table")).to_contain_text("paper")
        assert set(studio.lora_names(usable_only=False)) == {"Ink_Wash", "paper"}

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
        page.get_by_role("tab", name="Generate").click()  # the form's LoRA choices follow the library
        page.click("#lora-1 input")
        choices = page.locator("ul[role=listbox]")
        expect(choices).to_contain_text("Ink_Wash")
        expect(choices).not_to_contain_text("paper")
    finally:
        server.close()
