"""Memory profiles: what `auto` picks on each Colab GPU, CPU refusals, and (on CUDA) LoRA placement."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from masuka.model import memory
from masuka.model.memory import (
    FLUX_SIZES,
    GB,
    GiB,
    MachineMemory,
    ModelSizes,
    apply_memory_profile,
    choose_profile,
    hub_sizes,
    single_file_sizes,
)

# total_memory as torch reports it, and the system RAM Colab gives each runtime.
T4 = 15 * GiB
L4 = int(22.5 * GiB)
A100_40 = int(39.4 * GiB)
A100_80 = int(79.2 * GiB)
H100 = int(79.6 * GiB)
V100_32 = int(31.7 * GiB)
COLAB_RAM = int(12.7 * GiB)
HIGH_RAM = int(51 * GiB)

NF4_REPO = hub_sizes("diffusers/FLUX.1-dev-bnb-4bit")
GGUF_Q4 = single_file_sizes(int(6.8 * GB), gguf=True)
TINY = ModelSizes(200_000, 100_000, 300_000)

def placement(pipe) -> dict[str, str]:
    """Where each component's weights are and whether offload hooks drive it."""
    out: dict[str, str] = {}
    for name in memory.COMPONENTS:
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        devices = sorted({p.device.type for p in module.parameters()})
        hooked = hasattr(module, "_hf_hook") or any(hasattr(m, "_hf_hook") for m in module.modules())
        out[name] = ",".join(devices) + (" +hooks" if hooked else "")
    return out


CASES = [
    # (what, sizes, gpu, ram, bitsandbytes installed, expected profile, words the reason must hold)
    ("cpu only", FLUX_SIZES, 0, HIGH_RAM, False, "full", "no CUDA GPU"),
    ("tiny model on a T4", TINY, T4, COLAB_RAM, False, "full", "fit in 15.0 GiB"),
    ("T4 + NF4 repo", NF4_REPO, T4, COLAB_RAM, True, "quantized", "model CPU offload"),
    ("T4 + GGUF, no bitsandbytes", GGUF_Q4, T4, COLAB_RAM, False, "quantized", "T5 in bf16"),
    ("L4 bf16 with bitsandbytes", FLUX_SIZES, L4, HIGH_RAM, True, "quantized", "NF4 transformer"),
    ("L4 bf16 without bitsandbytes", FLUX_SIZES, L4, HIGH_RAM, False, "lowvram", "requirements-gpu.txt"),
    ("L4 + NF4 repo", NF4_REPO, L4, HIGH_RAM, True, "quantized", "fit in 22.5 GiB"),
    ("32 GB card", FLUX_SIZES, V100_32, HIGH_RAM, True, "offload", "model CPU offload"),
    ("A100 40", FLUX_SIZES, A100_40, 83 * GiB, False, "full", "fit in 39.4 GiB"),
    ("A100 40 on little RAM", FLUX_SIZES, A100_40, COLAB_RAM, False, "full", "fit"),
    ("A100 80", FLUX_SIZES, A100_80, 167 * GiB, False, "full", "fit"),
    ("H100", FLUX_SIZES, H100, 220 * GiB, False, "full", "fit in 79.6 GiB"),
]


@pytest.mark.parametrize("what,sizes,gpu,ram,bnb,expected,words", CASES, ids=[c[0] for c in CASES])
def test_auto_picks_by_gpu_memory_and_ram(what, sizes, gpu, ram, bnb, expected, words):
    choice = choose_profile(sizes, MachineMemory(gpu_total=gpu, ram_total=ram), bnb=bnb)
    assert choice.error is None
    assert choice.profile == expected
    assert words in choice.reason


@pytest.mark.parametrize("gpu", [T4, L4, V100_32], ids=["T4", "L4", "32 GB"])
def test_low_ram_with_bf16_weights_asks_for_a_prequantized_checkpoint(gpu):
    choice = choose_profile(FLUX_SIZES, MachineMemory(gpu_total=gpu, ram_total=COLAB_RAM), bnb=True)
    assert choice.error
    assert "12.7 GiB of RAM" in choice.error
    assert "--model diffusers/FLUX.1-dev-bnb-4bit --memory quantized" in choice.error
    assert "flux1-dev-Q4_K_S.gguf --memory quantized" in choice.error


def test_auto_load_on_a_t4_refuses_before_reading_weights(settings, monkeypatch):
    from diffusers import FluxPipeline

    from masuka.model.loading import load_pipeline

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(memory, "detect_memory", lambda device: MachineMemory(T4, COLAB_RAM))
    monkeypatch.setattr(FluxPipeline, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match="pre-quantized checkpoint"):
        load_pipeline(replace(settings, model="black-forest-labs/FLUX.1-dev", memory="auto"))


def test_sizes_of_a_local_folder_come_from_its_files(tiny_model_dir):
    sizes = memory.folder_sizes(tiny_model_dir)
    assert sizes.transformer == (tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert sizes.text_encoder_2 > 0 and sizes.other > 0 and not sizes.prequantized
    assert hub_sizes("black-forest-labs/FLUX.1-dev") == FLUX_SIZES
    assert 33 * GB < FLUX_SIZES.total < 34 * GB
    assert NF4_REPO.prequantized and GGUF_Q4.prequantized


@pytest.fixture(scope="module")
def tiny_pipe(tiny_model_dir):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize("profile", ["offload", "lowvram", "quantized"])
def test_cuda_profiles_are_refused_on_cpu_with_what_to_use(tiny_pipe, profile):
    with pytest.raises(ValueError, match=rf"'{profile}' needs a CUDA GPU.*--memory full"):
        apply_memory_profile(tiny_pipe, profile, torch.device("cpu"))


def test_auto_and_full_on_cpu(tiny_pipe):
    assert apply_memory_profile(tiny_pipe, "auto", torch.device("cpu"))[0] == "full"
    assert apply_memory_profile(tiny_pipe, "full", torch.device("cpu")) == ("full", "asked for")
    assert placement(tiny_pipe) == {n: "cpu" for n in memory.COMPONENTS}
    with pytest.raises(ValueError, match="unknown memory profile 'turbo'"):
        apply_memory_profile(tiny_pipe, "turbo", torch.device("cpu"))


def test_quantized_load_on_cpu_is_refused(settings):
    from masuka.model.loading import load_pipeline

    with pytest.raises(ValueError, match="'quantized' needs a CUDA GPU"):
        load_pipeline(replace(settings, memory="quantized", device="cpu"))


# ---- CUDA only -------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="memory profiles other than full need a CUDA GPU")


def _studio_with_lora(settings, profile):
    from masuka.studio import build_studio
    from lora_factory import make_peft_lora

    studio = build_studio(replace(settings, memory=profile, device="cuda"))
    manager = studio.runner
    make_peft_lora(manager.pipe.transformer, manager.loras.folder / "style.safetensors", seed=1)
    manager.loras.scan()
    return manager


@cuda
@pytest.mark.parametrize("profile", ["full", "offload", "lowvram"])
def test_lora_leaves_the_pipeline_where_its_profile_put_it(settings, profile):
    """diffusers issue 10914: with offload, load_lora_weights once moved the pipeline to the CPU."""
    manager = _studio_with_lora(settings, profile)
    try:
        before = placement(manager.pipe)
        plain = manager.generate(manager.validate(prompt="a red boat", seed=3))
        styled = manager.generate(manager.validate(prompt="a red boat", seed=3, lora="style"))
        assert placement(manager.pipe) == before
        back = manager.generate(manager.validate(prompt="a red boat", seed=3))
        assert placement(manager.pipe) == before
        assert plain.status == styled.status == back.status == "completed"
        if profile == "full":
            assert all(v == "cuda" for v in before.values())
        else:
            assert any("hooks" in v for v in before.values())
    finally:
        manager.jobs.close()


@cuda
@pytest.mark.skipif(not memory.bitsandbytes_available(), reason="--memory quantized needs bitsandbytes")
def test_quantized_profile_runs_a_lora(settings):
    manager = _studio_with_lora(settings, "quantized")
    try:
        before = placement(manager.pipe)
        job = manager.generate(manager.validate(prompt="a red boat", seed=3, lora="style"))
        assert job.status == "completed" and placement(manager.pipe) == before
    finally:
        manager.jobs.close()
