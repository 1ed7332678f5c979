"""Memory profiles: what `auto` picks from the memory plan, CPU refusals, and (on CUDA) LoRA placement.

The plan's figures themselves are checked in tests/test_plan.py.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from masuka.model import memory, plan
from masuka.model.memory import GiB, MachineMemory, ModelSizes, apply_memory_profile, choose_profile

T4, L4, A100_40, H100 = (plan.GPUS[n] for n in ("t4", "l4", "a100-40", "h100"))
COLAB_RAM = int(12.7 * GiB)
DEV = plan.hub_model("black-forest-labs/FLUX.1-dev")
SCHNELL = plan.hub_model("black-forest-labs/FLUX.1-schnell")
GGUF_Q4 = plan.single_file_model("https://huggingface.co/city96/FLUX.1-schnell-gguf/blob/main/flux1-schnell-Q4_K_S.gguf",
                                 SCHNELL)
TINY = plan.ModelInfo("tiny", None, sizes=ModelSizes(200_000, 100_000, 300_000), hidden=64, vae_channels=32)


def machine(gpu: plan.GpuSpec, ram: int | None = None) -> MachineMemory:
    return MachineMemory(gpu.total_bytes, gpu.ram_bytes if ram is None else ram, gpu.capability, gpu.label)


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
    # (what, model, machine, bitsandbytes installed, expected profile, words the reason must hold)
    ("cpu only", DEV, MachineMemory(0, 128 * GiB), False, "full", "no CUDA GPU: everything runs on the CPU (fp32)"),
    ("tiny model on a T4", TINY, machine(T4), False, "full", "every weight on the GPU"),
    ("L4 bf16 with bitsandbytes", DEV, machine(L4), True, "quantized", "transformer NF4, T5 int8"),
    ("L4 bf16 without bitsandbytes", DEV, machine(L4), False, "lowvram", "sequential CPU offload"),
    ("A100 40", DEV, machine(A100_40), False, "full", "of 39.40 GiB"),
    ("A100 40 on little RAM: the weights go straight to the GPU", DEV, machine(A100_40, COLAB_RAM), False, "full",
     "RAM 2.75 GiB of 12.70 GiB"),
    ("H100", SCHNELL, machine(H100), False, "full", "of 79.60 GiB"),
]


@pytest.mark.parametrize("what,model,mem,bnb,expected,words", CASES, ids=[c[0] for c in CASES])
def test_auto_picks_from_the_plan(what, model, mem, bnb, expected, words):
    choice = choose_profile(model, mem, bnb=bnb, gguf=True)
    assert choice.error is None
    assert choice.profile == expected
    assert words in choice.reason
    assert choice.plan is not None and choice.plan.fits


@pytest.mark.parametrize("model", [DEV, SCHNELL, GGUF_Q4], ids=["dev", "schnell", "gguf Q4_K_S"])
def test_nothing_fits_a_t4_so_auto_says_so_instead_of_loading(model):
    choice = choose_profile(model, machine(T4), bnb=True, gguf=True)
    assert choice.error
    assert "no memory profile is predicted to fit" in choice.error
    assert "12.70 GiB of RAM" in choice.error and "RAM 4." in choice.error  # offload: every weight in RAM
    assert "python app.py --plan" in choice.error


def test_auto_load_on_a_t4_refuses_before_reading_weights(settings, monkeypatch):
    from diffusers import FluxPipeline

    from masuka.model.loading import load_pipeline

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(memory, "detect_memory", lambda device: machine(T4))
    monkeypatch.setattr(FluxPipeline, "from_pretrained", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(ValueError, match="--memory auto: no memory profile is predicted to fit"):
        load_pipeline(replace(settings, model="black-forest-labs/FLUX.1-dev", memory="auto"))


def test_sizes_of_a_local_folder_come_from_its_files(tiny_model_dir):
    sizes = memory.folder_sizes(tiny_model_dir)
    assert sizes.transformer == (tiny_model_dir / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_size
    assert sizes.text_encoder_2 > 0 and sizes.other > 0 and not sizes.prequantized
    info = memory.folder_model(tiny_model_dir)
    assert info.variant is None and info.sizes == sizes  # not FLUX.1's architecture: planned from its files
    assert info.hidden < 3072


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
