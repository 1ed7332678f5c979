"""The speed choice through every way in: the page's form, gradio_client and REST."""

from __future__ import annotations

import gradio as gr
import httpx
import pytest
from gradio_client.exceptions import AppError

from masuka.model.defaults import TINY_DEFAULTS
from masuka.store.outputs import read_metadata
from masuka.web.page.common import FormSettings, aspect_presets, settings_from_record
from masuka.web.page.generate import build_generate_tab


def test_the_form_sends_and_restores_the_speed(studio):
    presets = aspect_presets(studio.model_info().defaults)
    with gr.Blocks():
        with gr.Tabs() as tabs, gr.Tab("Generate"):
            tab = build_generate_tab(studio, presets, tabs)
    form = tab.form
    assert form.speed.value == "exact"
    assert [value for _label, value in form.speed.choices] == ["exact", "fast"]
    values = {c: c.value for c in form.inputs()} | {form.prompt: "a lighthouse", form.steps: 2, form.width: 256,
                                                     form.height: 256}
    assert form.request(studio, values).speed == "exact"
    request = form.request(studio, values | {form.speed: "fast"})
    assert request.speed == "fast"
    with pytest.raises(ValueError, match="speed must be one of exact, fast"):
        form.request(studio, values | {form.speed: "ludicrous"})
    # A fast job reused from the history, and from its image, brings Fast back into the form.
    from masuka.studio import Caller

    result = studio.generate(request, Caller())
    from_record = settings_from_record(studio.job(result.job_id), TINY_DEFAULTS)
    assert from_record.speed == "fast"
    assert form.fill(from_record, [], presets)[form.speed] == "fast"
    assert form.fill(FormSettings("p", 1, 2, 3.5, 256, 256), [], presets)[form.speed] == "exact"
    assert read_metadata(result.images[0])["speed"] == "fast"


def test_gradio_client_and_rest_take_speed(live_app):
    client = live_app.client()
    images, record = client.predict(prompt="a lighthouse", steps=2, width=256, height=256, seed=3,
                                    speed="fast", api_name="/generate")
    assert record["params"]["speed"] == "fast" and record["params"]["cache"] == "first-block"
    _images, record = client.predict(prompt="a lighthouse", steps=2, width=256, height=256, seed=3,
                                     api_name="/generate")
    assert record["params"]["speed"] == "exact" and "cache" not in record["params"]
    with pytest.raises(AppError, match="speed must be one of exact, fast"):
        client.predict(prompt="a lighthouse", steps=2, speed="warp", api_name="/generate")

    with httpx.Client(base_url=live_app.url.rstrip("/"), timeout=60) as api:
        body = {"prompt": "a lighthouse", "steps": 2, "width": 256, "height": 256, "speed": "fast"}
        r = api.post("/api/v1/generate", params={"wait": "true"}, json=body)
        assert r.status_code == 200, r.text
        assert r.json()["params"]["speed"] == "fast"
        bad = api.post("/api/v1/generate", json=body | {"speed": "warp"})
        assert bad.status_code == 422
        assert bad.json()["parameter"] == "speed" and "exact, fast" in bad.json()["detail"]
