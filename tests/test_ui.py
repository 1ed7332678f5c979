"""The page's wiring and helpers, without a browser (tests/test_ui_browser.py drives the page)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from masuka.web.page import (
    aspect_of,
    aspect_presets,
    info_markdown,
    lora_spec,
    memory_in_use,
    settings_from_image,
    settings_from_record,
)
from masuka.model.defaults import DEV_DEFAULTS, TINY_DEFAULTS
from masuka.core.requests import (
    SIZE_MAX,
    SIZE_MIN,
    LoraChoice,
    aspect_size,
    check_size,
    parse_lora_spec,
)


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


def test_lora_slots_make_the_spec_the_manager_reads():
    spec = lora_spec([("ink", 0.8), ("", 1.0), (None, None), ("film-grain", 1.0)])
    assert spec == "ink:0.8,film-grain:1"
    assert parse_lora_spec(spec) == (LoraChoice("ink", 0.8), LoraChoice("film-grain", 1.0))
    assert lora_spec([("", 1.0)] * 4) == ""


def test_reused_settings_reproduce_the_job_and_the_image(manager):
    """What "Reuse settings" puts in the form makes the same picture again."""
    from masuka.store.outputs import read_metadata

    defaults = manager.loaded.defaults
    first = manager.generate(manager.validate(prompt="a lighthouse at dusk", seed=-1, steps=2, height=320, num_images=2))
    record = manager.jobs.get(first.job_id)

    form = settings_from_record(record, defaults)
    assert (form.prompt, form.seed, form.steps, form.width, form.height, form.num_images) == (
        "a lighthouse at dusk", first.seeds[0], 2, 256, 320, 2,
    )  # the seed actually used, not the -1 asked for
    from_image = settings_from_image(read_metadata(first.images[1]), defaults)
    assert from_image.seed == first.seeds[1] and from_image.num_images == 1 and from_image.height == 320

    again = manager.generate(
        manager.validate(
            prompt=from_image.prompt, lora=lora_spec(from_image.loras), seed=from_image.seed, steps=from_image.steps,
            guidance=from_image.guidance, width=from_image.width, height=from_image.height,
            num_images=from_image.num_images,
        )
    )
    assert np.array_equal(np.asarray(Image.open(again.images[0])), np.asarray(Image.open(first.images[1])))


def test_settings_from_a_record_with_loras_and_missing_fields():
    record = {"prompt": "p", "seed": 7, "seeds": [], "loras": [{"name": "ink", "scale": 0.5}], "steps": None}
    form = settings_from_record(record, TINY_DEFAULTS)
    assert form.seed == 7 and form.steps == TINY_DEFAULTS.steps and form.loras == [("ink", 0.5)]


def test_info_line_names_model_device_and_memory(studio):
    line = info_markdown(studio)
    assert "masuka/tiny-flux" in line and "cpu" in line and "float32" in line and "RAM" in line and "idle" in line
    mem = memory_in_use(studio.device)
    assert mem.kind == "RAM" and 0 < mem.used < mem.total
