"""speed="exact" is bit-for-bit the pixels of before; speed="fast" caches steps for its job only."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
from PIL import Image

from conftest import run
from masuka.core.requests import settings_from_metadata, validate_request
from masuka.model.defaults import DEV_DEFAULTS
from masuka.store.outputs import read_metadata

# sha256 of the RGB pixel bytes, computed with the code before speed settings existed
# (commit 185291d, tiny model, CPU, float32).
REFERENCE = (
    (dict(prompt="a lighthouse at dusk", seed=7, width=256, height=256, steps=4),
     "25098471073a97b7037d934cf72f1f4981d21e2bee10e03ed307078e9104ced0"),
    (dict(prompt="a red fox in snow", seed=123, width=256, height=320, steps=6),
     "440da83e7dbad6dc792c79d3ea27fbd0d0c75f040dc712da087f22b1f4e6f1b1"),
)


def digest(path) -> str:
    return hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest()


def test_exact_jobs_match_the_stored_reference_pixels(manager):
    for request, expected in REFERENCE:
        result = run(manager, **request)
        assert digest(result.images[0]) == expected, request
        # The default is exact, and saying so changes nothing.
        result = run(manager, speed="exact", **request)
        assert digest(result.images[0]) == expected, request


def test_a_fast_job_between_exact_jobs_changes_no_exact_pixel(manager):
    request, expected = REFERENCE[0]
    first = run(manager, **request)
    fast = run(manager, speed="fast", **{**request, "steps": 12})
    after = run(manager, **request)
    assert digest(first.images[0]) == digest(after.images[0]) == expected
    assert not manager.pipe.transformer.is_cache_enabled  # off again, no reload
    assert fast.record["params"]["speed"] == "fast"


def test_fast_skips_steps_and_says_so_in_the_record_and_the_image(manager):
    request = dict(prompt="a lighthouse at dusk", seed=7, width=256, height=256, steps=28)
    exact = run(manager, **request)
    fast = run(manager, speed="fast", **request)
    # The tiny model's first-block residual settles fast: at 0.08 about half the steps are skipped.
    assert digest(fast.images[0]) != digest(exact.images[0])
    params = fast.record["params"]
    assert (params["speed"], params["cache"], params["cache_threshold"]) == ("fast", "first-block", 0.08)
    meta = read_metadata(fast.images[0])
    assert (meta["speed"], meta["cache"], meta["cache_threshold"]) == ("fast", "first-block", 0.08)
    exact_meta = read_metadata(exact.images[0])
    assert exact_meta["speed"] == "exact" and "cache" not in exact_meta
    assert exact.record["params"]["speed"] == "exact" and "cache" not in exact.record["params"]
    # Reuse restores the choice.
    fields, messages = settings_from_metadata(meta, DEV_DEFAULTS)
    assert fields["speed"] == "fast" and not messages
    fields, _ = settings_from_metadata(exact_meta, DEV_DEFAULTS)
    assert fields["speed"] == "exact"


def test_a_failing_fast_job_leaves_the_cache_off(manager, monkeypatch):
    from masuka.core.runner import JobFailed

    def broken(*_a, **_k):
        raise RuntimeError("decoder broke")

    monkeypatch.setattr("masuka.core.runner.decode_latents", broken)
    with pytest.raises(JobFailed):
        run(manager, speed="fast", width=256, height=256, steps=2)
    assert not manager.pipe.transformer.is_cache_enabled


@pytest.mark.parametrize("bad", ["turbo", "", 1, True, ["fast"]])
def test_speed_is_exact_or_fast(bad):
    with pytest.raises(ValueError, match=r"speed must be one of exact, fast"):
        validate_request(prompt="x", speed=bad)
    assert validate_request(prompt="x", speed="Fast").speed == "fast"
    assert validate_request(prompt="x").speed == "exact"


def test_an_unknown_speed_in_an_image_falls_back_to_exact():
    fields, messages = settings_from_metadata({"prompt": "x", "speed": "warp"}, DEV_DEFAULTS)
    assert fields["speed"] == "exact"
    assert messages == ["speed 'warp' dropped: speed must be one of exact, fast; exact is used"]


def test_fast_is_refused_under_compile_and_exact_still_runs(manager):
    from test_compile import CountingBackend

    from masuka.model import compiled

    exact = run(manager, steps=2)
    compiled.compile_and_warm_up(manager.pipe, manager.loaded.defaults, manager.loaded.device, CountingBackend())
    with pytest.raises(ValueError, match=r"speed 'fast' is not available while the model is compiled \(--compile\)"):
        manager.validate(prompt="x", steps=2, speed="fast")
    assert np.array_equal(np.asarray(Image.open(run(manager, steps=2).images[0])),
                          np.asarray(Image.open(exact.images[0])))
