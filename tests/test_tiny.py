"""Tests for the built-in tiny FLUX model (masuka/model/tiny.py). CPU only, fast.

Heavy imports (torch, diffusers, transformers) happen inside the tests, so the
spawned worker processes of the concurrency test import this module cheaply.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from masuka.model import tiny

logger = logging.getLogger(__name__)

PROMPTS = [
    "a photo of a cat sitting on a wooden table",
    "a photo of a dog sitting on a wooden table",
    "A Futuristic City at night, neon lights, 8k!",
    "résumé of a zebra-xylophone 🐱 (weird words)",
    "portrait",
]


@pytest.fixture(scope="module")
def built_dir(tmp_path_factory) -> Path:
    models_dir = tmp_path_factory.mktemp("models")
    return tiny.ensure_tiny_model(models_dir)


@pytest.fixture(scope="module")
def pipe(built_dir):
    from diffusers import FluxPipeline

    pipeline = FluxPipeline.from_pretrained(str(built_dir))  # like any real model
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _generate(pipe, prompt: str, seed: int, **kwargs):
    import numpy as np
    import torch

    params = {"height": 256, "width": 256, "num_inference_steps": 4, "guidance_scale": 3.5}
    params.update(kwargs)
    result = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **params)
    image = result.images[0]
    return image, np.asarray(image)


def test_model_dir_name(tmp_path):
    assert tiny.TINY_MODEL_ID == "masuka/tiny-flux"
    assert tiny.tiny_model_dir(tmp_path) == tmp_path / f"tiny-flux-v{tiny.TINY_MODEL_VERSION}"


def test_import_is_light():
    code = "import sys, masuka.model.tiny; assert 'torch' not in sys.modules and 'diffusers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})


def test_layout_and_marker(built_dir):
    assert built_dir == tiny.tiny_model_dir(built_dir.parent)
    index = json.loads((built_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    for name in tiny.COMPONENTS:
        assert (built_dir / name).is_dir(), name
        assert index[name][1], name
    assert (built_dir / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (built_dir / "vae" / "diffusion_pytorch_model.safetensors").is_file()
    assert (built_dir / "text_encoder" / "model.safetensors").is_file()
    assert (built_dir / "text_encoder_2" / "model.safetensors").is_file()
    marker = json.loads((built_dir / tiny.MARKER_FILE).read_text())
    assert marker["demo"] is True
    assert marker["description"] == "MASUKA built-in demo model: random weights"
    assert marker["version"] == tiny.TINY_MODEL_VERSION
    assert (built_dir.parent / "tiny-flux.lock").exists()
    assert not list(built_dir.parent.glob(".tiny-flux-*"))


def test_ensure_is_idempotent(built_dir, monkeypatch):
    def no_build(folder):
        raise AssertionError("must not rebuild a complete model")

    monkeypatch.setattr(tiny, "_save_tiny_model", no_build)
    assert tiny.ensure_tiny_model(built_dir.parent) == built_dir


def test_pipeline_config(pipe):
    assert type(pipe).__name__ == "FluxPipeline"
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.in_channels == 64
    assert pipe.transformer.config.guidance_embeds is True
    assert pipe.vae.config.latent_channels == 16
    assert pipe.vae.config.scaling_factor == pytest.approx(0.3611)
    assert pipe.vae.config.shift_factor == pytest.approx(0.0609)
    sched = pipe.scheduler.config
    assert sched.shift == 3.0 and sched.use_dynamic_shifting is True
    assert (sched.base_shift, sched.max_shift) == (0.5, 1.15)
    assert (sched.base_image_seq_len, sched.max_image_seq_len) == (256, 4096)
    assert pipe.tokenizer.model_max_length == 77
    assert pipe.tokenizer_2.model_max_length == 512
    assert pipe.tokenizer_2.pad_token is not None and pipe.tokenizer_2.eos_token is not None
    for model in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        assert not model.training


def test_generation_deterministic_and_sensitive(pipe):
    import numpy as np

    image, a = _generate(pipe, PROMPTS[0], seed=1)
    assert image.size == (256, 256)
    assert a.shape == (256, 256, 3)
    assert a.std() > 5, "image should not be flat"
    _, again = _generate(pipe, PROMPTS[0], seed=1)
    assert np.array_equal(a, again), "same seed must give identical pixels"
    _, other_seed = _generate(pipe, PROMPTS[0], seed=2)
    assert not np.array_equal(a, other_seed)
    _, other_prompt = _generate(pipe, PROMPTS[1], seed=1)
    assert not np.array_equal(a, other_prompt)
    assert np.abs(a.astype(float) - other_prompt.astype(float)).mean() > 2, "prompt should visibly matter"
    _, other_guidance = _generate(pipe, PROMPTS[0], seed=1, guidance_scale=7.0)
    assert not np.array_equal(a, other_guidance), "guidance should matter (guidance_embeds=True)"


def test_non_square_and_short_sequence(pipe):
    image, _ = _generate(pipe, PROMPTS[2], seed=0, height=128, width=192, num_inference_steps=2, max_sequence_length=64)
    assert image.size == (192, 128)


def test_tokenizer_round_trip(pipe, built_dir, tmp_path):
    from transformers import CLIPTokenizer, T5Tokenizer

    fresh = tiny.build_tiny_components()
    resaved = tmp_path / "resaved"
    pipe.tokenizer.save_pretrained(resaved / "tokenizer")
    pipe.tokenizer_2.save_pretrained(resaved / "tokenizer_2")
    reloaded = [
        CLIPTokenizer.from_pretrained(built_dir / "tokenizer"),
        T5Tokenizer.from_pretrained(built_dir / "tokenizer_2"),
        CLIPTokenizer.from_pretrained(resaved / "tokenizer"),
        T5Tokenizer.from_pretrained(resaved / "tokenizer_2"),
    ]
    pairs = [
        (fresh["tokenizer"], pipe.tokenizer),
        (fresh["tokenizer_2"], pipe.tokenizer_2),
        (fresh["tokenizer"], reloaded[0]),
        (fresh["tokenizer_2"], reloaded[1]),
        (fresh["tokenizer"], reloaded[2]),
        (fresh["tokenizer_2"], reloaded[3]),
    ]
    for prompt in PROMPTS:
        for memory, loaded in pairs:
            length = loaded.model_max_length
            expected = memory(prompt, padding="max_length", max_length=length, truncation=True).input_ids
            got = loaded(prompt, padding="max_length", max_length=length, truncation=True).input_ids
            assert got == expected, (prompt, type(loaded).__name__)
            assert memory(prompt).input_ids == loaded(prompt).input_ids

    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        ids = [tuple(tok(p).input_ids) for p in PROMPTS]
        assert len(set(ids)) == len(PROMPTS), type(tok).__name__
        assert all(len(i) >= 2 for i in ids)
        assert tok(PROMPTS[0]).input_ids[-1] == tok.eos_token_id
        assert max(max(i) for i in ids) < len(tok)

    clip = pipe.tokenizer
    assert clip(PROMPTS[0]).input_ids[0] == clip.bos_token_id
    # Common words are single tokens, like a real vocabulary.
    assert len(clip("a photo of a cat").input_ids) == 7
    assert len(pipe.tokenizer_2("a photo of a cat").input_ids) == 6
    assert pipe.text_encoder.config.vocab_size == len(clip)
    assert pipe.text_encoder_2.config.vocab_size == len(pipe.tokenizer_2)


def test_build_is_deterministic(built_dir):
    import torch
    from safetensors.torch import load_file

    fresh = tiny.build_tiny_components()
    files = {
        "transformer": "diffusion_pytorch_model.safetensors",
        "vae": "diffusion_pytorch_model.safetensors",
        "text_encoder": "model.safetensors",
        "text_encoder_2": "model.safetensors",
    }
    for name, filename in files.items():
        saved = load_file(built_dir / name / filename)
        memory = fresh[name].state_dict()
        assert set(saved) <= set(memory), name
        for key, tensor in saved.items():
            assert torch.equal(tensor, memory[key]), (name, key)


def test_incomplete_folder_and_leftovers_are_replaced(tmp_path):
    target = tiny.tiny_model_dir(tmp_path)
    (target / "vae").mkdir(parents=True)
    (target / "vae" / "junk.bin").write_bytes(b"half-built")
    leftover = tmp_path / (tiny._temp_prefix() + "crashed")
    leftover.mkdir()
    path = tiny.ensure_tiny_model(tmp_path)
    assert path == target
    assert tiny._is_complete(target)
    assert not (target / "vae" / "junk.bin").exists()
    assert not list(tmp_path.glob(".tiny-flux-*"))


def test_failed_build_leaves_nothing(tmp_path, monkeypatch):
    def broken(folder):
        (folder / "partial.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    monkeypatch.setattr(tiny, "_save_tiny_model", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        tiny.ensure_tiny_model(tmp_path)
    assert not tiny.tiny_model_dir(tmp_path).exists()
    assert not list(tmp_path.glob(".tiny-flux-*"))


def _concurrent_worker(models_dir: str, builds_log: str, barrier, results) -> None:
    """Runs in a spawned process: count builds, start together, report the path."""
    from masuka.model import tiny as tiny_module

    original = tiny_module._save_tiny_model

    def counting_save(folder):
        with open(builds_log, "a", encoding="utf-8") as handle:
            handle.write(f"{os.getpid()}\n")
        original(folder)

    tiny_module._save_tiny_model = counting_save
    barrier.wait(timeout=120)
    try:
        results.put(("ok", str(tiny_module.ensure_tiny_model(Path(models_dir)))))
    except Exception as exc:  # reported to the parent test, which fails on it
        results.put(("error", repr(exc)))


def test_concurrent_processes_build_once(tmp_path, built_dir):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    models_dir = tmp_path / "fresh-home" / "models"  # does not exist yet
    builds_log = tmp_path / "builds.log"
    barrier = ctx.Barrier(3)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_concurrent_worker, args=(str(models_dir), str(builds_log), barrier, results))
        for _ in range(3)
    ]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    logger.info("concurrent outcomes: %s", outcomes)
    assert all(status == "ok" for status, _ in outcomes), outcomes
    expected = str(tiny.tiny_model_dir(models_dir))
    assert {path for _, path in outcomes} == {expected}
    assert len(builds_log.read_text().split()) == 1, "exactly one process must build"
    assert tiny._is_complete(Path(expected))
    assert not list(models_dir.glob(".tiny-flux-*"))
    # A build in another process gives byte-identical files.
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
        for file in sorted((built_dir / name).iterdir()):
            assert (Path(expected) / name / file.name).read_bytes() == file.read_bytes(), (name, file.name)
