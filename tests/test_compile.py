"""--compile: the transformer's blocks are compiled at start with a warm-up, stay compiled across
every LoRA switch (fused in place: same tensors), give the eager images, and a LoRA only peft
adapters could apply is refused with its reason instead of recompiling.

The production functions run with a cheap backend here (aot_eager: dynamo + AOTAutograd, no
code generation), wrapped to count every graph compiled."""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import pixels
from masuka.core.runner import JobFailed
from masuka.model import compiled

log = logging.getLogger(__name__)

SWITCHES = ("a", "b", "a:0.5", "", "a,b", "b:0.3", "", "a:2", "b", "a:0.5,b:0.5", "")


class CountingBackend:
    """A torch.compile backend that counts the graphs it compiles, then hands them to ``name``."""

    def __init__(self, name: str = "aot_eager"):
        from torch._dynamo import lookup_backend

        self._inner = lookup_backend(name)
        self.__name__ = f"counting-{name}"
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return self._inner(gm, example_inputs)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def add_peft(manager, name: str, seed: int, **kw) -> None:
    from lora_factory import make_peft_lora

    make_peft_lora(manager.pipe.transformer, manager.loras.folder / f"{name}.safetensors", seed=seed, **kw)
    manager.loras.scan()


def image(manager, lora: str = "", **kw) -> np.ndarray:
    kw = {"prompt": "a lighthouse at dusk", "seed": 7, "steps": 2} | kw
    request = manager.validate(lora=lora, **kw)
    return pixels(manager.generate(request).images[0])


def transformer_tensors(pipe) -> dict[str, tuple[int, int]]:
    return {name: (id(p), p.data_ptr()) for name, p in pipe.transformer.named_parameters()}


def test_compiled_model_never_recompiles_across_lora_switches_and_matches_eager(manager):
    add_peft(manager, "a", seed=1)
    add_peft(manager, "b", seed=2, rank=8, targets=("to_q", "proj_mlp", "proj_out", "ff.net.2"))
    eager = {spec: image(manager, spec) for spec in dict.fromkeys(SWITCHES)}
    assert len({arr.tobytes() for arr in eager.values()}) == len(eager)  # every set changes the image
    tensors = transformer_tensors(manager.pipe)
    backend = CountingBackend()

    report = compiled.compile_and_warm_up(manager.pipe, manager.loaded.defaults, manager.loaded.device, backend)
    log.info("compile + warm-up on the tiny CPU model (aot_eager): %.2f s, %d graphs", report.seconds, backend.graphs)
    assert compiled.is_compiled(manager.pipe.transformer)
    assert backend.graphs == report.graphs == 2  # one per block class, reused by every block
    graphs = compiled.compiled_graphs()

    for spec in SWITCHES:
        got = image(manager, spec)
        assert np.array_equal(got, eager[spec]), f"compiled image with {spec!r} differs from eager"
        assert manager.lora_strategy == ("fused" if spec else "none")
    assert backend.graphs == 2, f"{backend.graphs - 2} recompiles over {len(SWITCHES)} LoRA switches"
    assert compiled.compiled_graphs() == graphs
    assert transformer_tensors(manager.pipe) == tensors  # fused in place: the graph's own tensors
    image(manager, "b", steps=3, guidance=5.0)  # other steps and guidance: tensors' values, same graphs
    assert backend.graphs == 2

    # What the docs say about sizes: a second size compiles once (the size becomes dynamic), a third never.
    image(manager, width=512, height=256)
    after_second = backend.graphs
    image(manager, "a", width=256, height=512)
    assert after_second > 2 and backend.graphs == after_second


def test_a_lora_only_adapters_could_apply_is_refused_under_compile_with_its_reason(manager):
    from lora_factory import write_safetensors
    from safetensors.torch import load_file

    add_peft(manager, "a", seed=1)
    state = load_file(str(manager.loras.folder / "a.safetensors"))
    bias = {k.replace("lora_B.weight", "lora_B.bias"): torch.randn(v.shape[0]) for k, v in state.items() if "lora_B" in k}
    write_safetensors(manager.loras.folder / "biased.safetensors", state | bias)
    manager.loras.scan()
    backend = CountingBackend("eager")
    compiled.compile_and_warm_up(manager.pipe, manager.loaded.defaults, manager.loaded.device, backend)
    with_a = image(manager, "a")
    graphs = backend.graphs

    with pytest.raises(JobFailed) as failed:
        image(manager, "a,biased")
    reason = failed.value.reason
    assert "'biased'" in reason and "'a'" not in reason  # names the LoRA at fault
    assert "lora_B.bias" in reason and "--compile" in reason and "without --compile" in reason
    # Nothing changed: no adapter, the fused LoRA still held, no graph compiled.
    assert manager.pipe.get_list_adapters() in ({}, {"transformer": []})
    assert manager.lora_status()["loras"] == [{"name": "a", "scale": 1.0}]
    assert np.array_equal(image(manager, "a"), with_a)
    assert backend.graphs == graphs


def test_compile_flag_compiles_at_start_with_a_logged_warm_up(settings, monkeypatch, caplog):
    from masuka.studio import build_studio

    backend = CountingBackend()
    monkeypatch.setattr(compiled, "BACKEND", backend)  # the one boundary: which compiler
    st = build_studio(replace(settings, compile=True))
    try:
        loaded = st.loaded
        assert compiled.is_compiled(loaded.pipe.transformer)
        assert loaded.compile_report is not None and loaded.compile_report.graphs == backend.graphs == 2
        assert (loaded.compile_report.width, loaded.compile_report.height) == (256, 256)
        assert any("warm-up done in" in r.getMessage() for r in caplog.records)
        graphs = backend.graphs
        st.runner.generate(st.validate(prompt="the first user", seed=3))  # default size and steps
        assert backend.graphs == graphs  # the first user does not pay the compile
    finally:
        st.close()


def test_without_the_flag_nothing_is_compiled(studio):
    assert not compiled.is_compiled(studio.loaded.pipe.transformer)
    assert studio.loaded.compile_report is None


@pytest.mark.parametrize("profile", ["lowvram", "quantized"])
def test_compile_with_a_profile_that_keeps_loras_as_adapters_is_refused_before_loading(settings, monkeypatch, profile):
    from masuka.model import loading

    def never(*args, **kwargs):
        raise AssertionError("weights were read before the refusal")

    monkeypatch.setattr(loading, "_read_pipeline", never)
    with pytest.raises(ValueError) as refused:
        loading.load_pipeline(replace(settings, compile=True, memory=profile))
    message = str(refused.value)
    assert "--compile" in message and repr(profile) in message and "without --compile" in message
