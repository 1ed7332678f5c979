"""--fp8: refused at start where it cannot run, before any weight is read; sized by the plan; LoRAs via adapters.

The float8 quantization itself needs a GPU of compute capability 8.9+ and torchao; neither is here,
so only the refusals, the suggestion, the plan and the LoRA strategy are tested.
"""

from __future__ import annotations

import logging

import pytest
import torch

from masuka.model import loading, plan
from masuka.settings import Settings, parse_settings


class WeightsRead(Exception):
    pass


@pytest.fixture
def no_weights(monkeypatch):
    """Loading stops with WeightsRead where the first weight would be read."""

    def read(*_a, **_k):
        raise WeightsRead()

    monkeypatch.setattr(loading, "_read_pipeline", read)


def fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_a, **_k: capability)


def test_fp8_flag_and_variable_are_read():
    assert parse_settings(["--fp8"], {}).fp8 is True
    assert parse_settings([], {"MASUKA_FP8": "1"}).fp8 is True
    assert parse_settings([], {}).fp8 is False


def test_fp8_is_refused_on_the_cpu_before_any_weight_is_read(home, no_weights):
    with pytest.raises(ValueError, match=r"fp8 needs compute capability 8\.9\+ \(L4, H100\); this machine runs on "
                                         r"the CPU"):
        loading.load_pipeline(Settings(home=home, fp8=True))
    with pytest.raises(WeightsRead):  # without --fp8 the same start reaches the weights
        loading.load_pipeline(Settings(home=home))


def test_fp8_is_refused_on_a_t4_naming_its_capability(home, no_weights, monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    with pytest.raises(ValueError, match=r"fp8 needs compute capability 8\.9\+ \(L4, H100\); this GPU is 7\.5 \(T4\)"):
        loading.load_pipeline(Settings(home=home, fp8=True, device="cuda", memory="full"))
    fake_gpu(monkeypatch, (8, 0))
    with pytest.raises(ValueError, match=r"this GPU is 8\.0 \(A100\)"):
        loading.load_pipeline(Settings(home=home, fp8=True, device="cuda", memory="full"))


def test_fp8_on_an_l4_without_torchao_says_how_to_install_it(home, no_weights, monkeypatch):
    fake_gpu(monkeypatch, (8, 9))
    monkeypatch.setattr("masuka.model.fp8.torchao_available", lambda: False)
    with pytest.raises(ValueError, match=r"--fp8 needs torchao, which is not installed: pip install torchao"):
        loading.load_pipeline(Settings(home=home, fp8=True, device="cuda", memory="full"))


def test_fp8_and_the_quantized_profile_are_refused_together(home, no_weights, monkeypatch):
    fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr("masuka.model.fp8.torchao_available", lambda: True)
    with pytest.raises(ValueError, match="both quantize the transformer"):
        loading.load_pipeline(Settings(home=home, fp8=True, device="cuda", memory="quantized"))


def test_an_h100_or_l4_gets_fp8_suggested_but_never_turned_on(home, no_weights, monkeypatch, caplog):
    fake_gpu(monkeypatch, (9, 0))
    caplog.set_level(logging.INFO, logger="masuka.model.loading")
    with pytest.raises(WeightsRead):  # it went on loading, without fp8
        loading.load_pipeline(Settings(home=home, device="cuda", memory="full"))
    assert "this GPU (9.0 (H100)) runs float8: --fp8 would" in caplog.text
    assert "not turned on by itself" in caplog.text
    caplog.clear()
    fake_gpu(monkeypatch, (7, 5))
    with pytest.raises(WeightsRead):
        loading.load_pipeline(Settings(home=home, device="cuda", memory="full"))
    assert "--fp8" not in caplog.text


def test_the_memory_plan_sizes_an_fp8_transformer_at_one_byte_a_weight():
    model, l4 = plan.hub_model("black-forest-labs/FLUX.1-dev"), plan.gpu_spec("l4")
    dense = plan.build_plan(model, l4, profile="offload").rows[0]
    fp8 = plan.build_plan(model, l4, profile="offload", fp8=True)
    row = fp8.rows[0]
    assert row.part == "transformer" and row.storage.startswith("fp8 weight-only (torchao)")
    # Linear weights are nearly all of FLUX's 11.9 B transformer parameters: about half of bf16.
    assert 0.49 < row.weights / dense.weights < 0.52
    assert "torchao" in fp8.requires


def test_loras_go_through_adapters_under_fp8(manager):
    from lora_factory import make_peft_lora

    from masuka.core.lorastate import LoraState, Strategy
    from masuka.core.requests import LoraChoice

    make_peft_lora(manager.pipe.transformer, manager.loras.folder / "ink.safetensors", seed=1)
    manager.loras.scan()
    state = LoraState(manager.pipe, manager.loras, manager.lora_cache, manager.loaded.device, fp8=True)
    state.apply((LoraChoice("ink", 0.8),))
    try:
        assert state.strategy is Strategy.ADAPTERS
        assert "float8 (--fp8): fusing into them is not exact" in state.status()["fallback_reason"]
    finally:
        state.clear()
    # Without fp8 the same LoRA is fused.
    plain = LoraState(manager.pipe, manager.loras, manager.lora_cache, manager.loaded.device)
    plain.apply((LoraChoice("ink", 0.8),))
    try:
        assert plain.strategy is Strategy.FUSED
    finally:
        plain.clear()


def test_plan_with_fp8_on_an_l4_offers_no_second_quantization_and_says_what_it_needs(capsys):
    import app

    assert app.main(["--plan", "l4", "--fp8", "--model", "black-forest-labs/FLUX.1-dev"]) == 0
    out = capsys.readouterr().out
    assert "auto: offload -- offload (transformer fp8, T5 bf16)" in out
    assert "not possible here: --fp8 quantizes the transformer already" in out
    assert "needs torchao for --fp8 (pip install torchao)" in out
    assert "would be refused here" not in out
    assert app.main(["--plan", "t4", "--fp8", "--model", "black-forest-labs/FLUX.1-dev"]) == 0
    assert "--fp8 would be refused here: it needs a GPU of compute capability 8.9+" in capsys.readouterr().out
