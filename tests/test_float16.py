"""float16 never saves a black image as completed: the VAE decodes in float32, and NaN/Inf fail the job."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import pixels

from masuka.core.runner import JobFailed


@pytest.fixture(scope="module")
def fp16_studio(tmp_path_factory, tiny_model_dir):
    from conftest import seed_home

    from masuka.settings import Settings
    from masuka.studio import build_studio

    home = seed_home(tmp_path_factory.mktemp("fp16") / "home", tiny_model_dir)
    studio = build_studio(replace(Settings(home=home), dtype="float16"))
    yield studio
    studio.close()


def test_float16_makes_finite_images_with_the_vae_in_float32(fp16_studio):
    runner = fp16_studio.runner
    assert runner.pipe.transformer.dtype == torch.float16 and runner.pipe.vae.dtype == torch.float32
    result = runner.generate(runner.validate(prompt="a lighthouse", seed=3, steps=2))
    image = pixels(result.images[0])
    assert result.status == "completed" and image.std() > 1  # a picture, not a flat black square


def test_an_overflow_fails_the_job_naming_float16_and_keeps_no_image(fp16_studio, monkeypatch):
    runner = fp16_studio.runner
    transformer = runner.pipe.transformer
    real_forward = transformer.forward

    def overflowing(*args, **kwargs):
        out = real_forward(*args, **kwargs)
        out[0].fill_(float("nan"))
        return out

    monkeypatch.setattr(transformer, "forward", overflowing)
    with pytest.raises(JobFailed) as info:
        runner.generate(runner.validate(prompt="an overflow", seed=4, steps=2))
    assert "NaN" in info.value.reason and "float16" in info.value.reason and "--dtype bfloat16" in info.value.reason
    record = fp16_studio.job(info.value.job_id)
    assert record["status"] == "failed" and record["outputs"] == []
    assert not list(fp16_studio.outputs_dir.rglob(f"{info.value.job_id}*"))
    monkeypatch.undo()
    again = runner.generate(runner.validate(prompt="after", seed=4, steps=2))
    assert again.status == "completed" and np.isfinite(pixels(again.images[0])).all()
