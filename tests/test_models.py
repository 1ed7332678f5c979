"""Model specs: tiny, local folder, Hub id, single-file transformer, nonsense; gated models; loading."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from masuka.model import loading as models
from masuka.model.loading import (
    FLUX_DEV,
    FLUX_SCHNELL,
    KIND_FILE,
    KIND_FOLDER,
    KIND_HUB,
    KIND_TINY,
    check_access,
    load_pipeline,
    resolve_model_spec,
)
from masuka.settings import TINY_MODEL_ID, parse_settings
from masuka.model.defaults import SCHNELL_DEFAULTS, TINY_DEFAULTS


@pytest.fixture
def no_token(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)


@pytest.fixture
def fake_hub(monkeypatch, tiny_model_dir):
    """FluxPipeline.from_pretrained answering every Hub id with the tiny model (no network)."""
    from diffusers import FluxPipeline

    real = FluxPipeline.from_pretrained
    calls: list[tuple[str, dict]] = []

    def fake(source, **kwargs):
        calls.append((source, dict(kwargs)))
        kwargs.pop("token", None)
        return real(str(tiny_model_dir), **kwargs)

    monkeypatch.setattr(FluxPipeline, "from_pretrained", fake)
    return calls


def test_tiny_and_local_folder(home, tiny_model_dir):
    tiny = resolve_model_spec(TINY_MODEL_ID, home / "models")
    assert (tiny.kind, tiny.is_demo) == (KIND_TINY, True)
    assert (Path(tiny.location) / "model_index.json").is_file()
    folder = resolve_model_spec(str(tiny_model_dir), home / "models")
    assert (folder.kind, folder.location, folder.is_demo) == (KIND_FOLDER, str(tiny_model_dir.resolve()), False)


def test_folder_without_model_index_and_missing_folder_say_what_to_do(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(ValueError, match="no model_index.json"):
        resolve_model_spec(str(tmp_path / "weights"), tmp_path)
    for missing in (str(tmp_path / "nope"), "./no/such/model", "~/no-such-flux-folder"):
        with pytest.raises(ValueError, match="does not exist"):
            resolve_model_spec(missing, tmp_path)


def test_hub_ids(tmp_path):
    for repo in (FLUX_SCHNELL, FLUX_DEV, "diffusers/FLUX.1-dev-bnb-4bit"):
        source = resolve_model_spec(repo, tmp_path)
        assert (source.kind, source.location, source.hub_ids) == (KIND_HUB, repo, [repo])


@pytest.mark.parametrize("spec", ["", "flux", "not a model!!", "a/b c", "http://example.com/model", "C:weird"])
def test_nonsense_is_refused_naming_the_spec(tmp_path, spec):
    with pytest.raises(ValueError) as err:
        resolve_model_spec(spec, tmp_path)
    assert repr(spec.strip()) in str(err.value)


def test_single_file_guesses_base_from_name_and_base_model_wins(tmp_path):
    dev = tmp_path / "flux1-dev-Q4_K_S.gguf"
    schnell = tmp_path / "flux1-schnell-fp8.safetensors"
    dev.write_bytes(b"x")
    schnell.write_bytes(b"x")
    a = resolve_model_spec(str(dev), tmp_path)
    assert (a.kind, a.file_format, a.base.location) == (KIND_FILE, "gguf", FLUX_DEV)
    b = resolve_model_spec(str(schnell), tmp_path)
    assert (b.file_format, b.base.location) == ("safetensors", FLUX_SCHNELL)
    c = resolve_model_spec(str(dev), tmp_path, base_model="someone/flux-dev-copy")
    assert c.base.location == "someone/flux-dev-copy"
    url = "https://huggingface.co/city96/FLUX.1-dev-gguf/blob/main/flux1-dev-Q4_K_S.gguf"
    assert resolve_model_spec(url, tmp_path).location == url


def test_single_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model_spec(str(tmp_path / "missing.gguf"), tmp_path)
    with pytest.raises(ValueError, match="huggingface.co"):
        resolve_model_spec("https://example.com/flux.safetensors", tmp_path)
    (tmp_path / "t.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match="base model"):
        resolve_model_spec(str(tmp_path / "t.gguf"), tmp_path, base_model=str(tmp_path / "t.gguf"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"\.safetensors or \.gguf"):
        resolve_model_spec(str(tmp_path / "weights.bin"), tmp_path)


def test_gated_model_without_token_is_refused_with_instructions(tmp_path, no_token):
    with pytest.raises(ValueError, match="HF_TOKEN") as err:
        check_access(resolve_model_spec(FLUX_DEV, tmp_path), None)
    assert "huggingface.co/black-forest-labs/FLUX.1-dev" in str(err.value) and FLUX_SCHNELL in str(err.value)
    check_access(resolve_model_spec(FLUX_DEV, tmp_path), "hf_token")  # with a token: fine
    check_access(resolve_model_spec(FLUX_SCHNELL, tmp_path), None)  # open model: fine
    (tmp_path / "flux1-dev.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match="--base-model"):
        check_access(resolve_model_spec(str(tmp_path / "flux1-dev.gguf"), tmp_path), None)


def test_load_gated_without_token_fails_before_any_download(settings, no_token, fake_hub):
    with pytest.raises(ValueError, match="gated"):
        load_pipeline(replace(settings, model=FLUX_DEV))
    assert fake_hub == []


def test_load_hub_id_passes_id_dtype_and_token(settings, monkeypatch, fake_hub):
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    loaded = load_pipeline(replace(settings, model=FLUX_SCHNELL, device="cpu"))
    (source, kwargs), = fake_hub
    assert source == FLUX_SCHNELL and kwargs["token"] == "hf_test"
    assert "device_map" not in kwargs and "quantization_config" not in kwargs
    assert loaded.defaults == SCHNELL_DEFAULTS and not loaded.is_demo
    assert loaded.memory_profile == "full" and "CPU" in loaded.memory_reason


def test_refused_token_becomes_a_clear_error(settings, monkeypatch, no_token):
    from diffusers import FluxPipeline
    from huggingface_hub.errors import GatedRepoError

    import huggingface_hub.errors as hub_errors

    # The HTTP client's classes, whichever one this huggingface_hub uses.
    client = __import__(hub_errors.Response.__module__.split(".")[0])
    response = client.Response(401, request=client.Request("GET", "https://huggingface.co/someone/private-flux"))

    def gated(source, **kwargs):
        raise GatedRepoError("401 Client Error: access to model is restricted", response=response)

    monkeypatch.setattr(FluxPipeline, "from_pretrained", gated)
    monkeypatch.setattr(models, "GATED_PREFIXES", ())  # an unknown gated repo: found only at download
    with pytest.raises(ValueError, match="accept the licence"):
        load_pipeline(replace(settings, model="someone/private-flux"))


def test_single_file_transformer_loads_with_base_components(settings, tiny_model_dir):
    """The tiny transformer's own safetensors file, read through from_single_file."""
    import torch

    file = tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors"
    loaded = load_pipeline(replace(settings, model=str(file), base_model=TINY_MODEL_ID))
    assert loaded.defaults == TINY_DEFAULTS and loaded.is_demo
    assert str(file) in loaded.source
    from diffusers import FluxTransformer2DModel

    reference = FluxTransformer2DModel.from_pretrained(str(tiny_model_dir), subfolder="transformer")
    for (name, a), (_, b) in zip(loaded.pipe.transformer.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


def test_gguf_without_gguf_package_says_how_to_install(settings, tmp_path, monkeypatch):
    from masuka.model import memory

    monkeypatch.setattr(memory, "gguf_available", lambda: False)
    (tmp_path / "flux1-dev-Q4_K_S.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="requirements-gpu.txt"):
        load_pipeline(replace(settings, model=str(tmp_path / "flux1-dev-Q4_K_S.gguf"), base_model=TINY_MODEL_ID))


def test_base_model_setting(tmp_path):
    assert parse_settings(["--base-model", FLUX_SCHNELL], env={}).base_model == FLUX_SCHNELL
    assert parse_settings([], env={"MASUKA_BASE_MODEL": "x/y"}).base_model == "x/y"
    assert parse_settings(["--base-model", "a/b"], env={"MASUKA_BASE_MODEL": "x/y"}).base_model == "a/b"
    assert parse_settings([], env={}).base_model == ""
