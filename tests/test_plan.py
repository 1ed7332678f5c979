"""The memory plan's figures against what is known of FLUX.1, its storage forms and the GPUs, and `--plan`."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from masuka.model import plan
from masuka.model.plan import GB, GiB, GPUS, FLUX_DEV, FLUX_SCHNELL, build_plan, choose

ROOT = Path(__file__).resolve().parents[1]
DEV = plan.hub_model("black-forest-labs/FLUX.1-dev")
SCHNELL = plan.hub_model("black-forest-labs/FLUX.1-schnell")
GGUF_DEV_Q4 = plan.single_file_model("https://huggingface.co/city96/FLUX.1-dev-gguf/blob/main/flux1-dev-Q4_K_S.gguf", DEV)


def tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- weights --------------------------------------------------------------------------------

PARAMS = [
    (FLUX_DEV, "transformer", 11_901_408_320),
    (FLUX_DEV, "text_encoder_2", 4_762_310_656),  # T5-XXL encoder; embed_tokens is shared, counted once
    (FLUX_DEV, "text_encoder", 123_060_480),
    (FLUX_DEV, "vae", 83_819_683),
    (FLUX_SCHNELL, "text_encoder_2", 4_762_310_656),
]


@pytest.mark.parametrize("variant,part,expected", PARAMS, ids=[f"{v} {p}" for v, p, _ in PARAMS])
def test_parameter_counts(variant, part, expected):
    assert plan.param_count(variant, part) == expected


def test_schnell_is_dev_without_the_guidance_embedder():
    guidance = sum(t.numel for t in plan.flux_tensors(FLUX_DEV, "transformer") if ".guidance_embedder." in t.name)
    assert guidance > 0
    assert plan.param_count(FLUX_SCHNELL, "transformer") == plan.param_count(FLUX_DEV, "transformer") - guidance


def test_stored_tensor_lists_are_what_the_libraries_build_from_the_configs():
    """configs/flux1-tensors.json = a fresh meta-device build (tools/plan_data.py) with the installed libraries."""
    data = tool("plan_data")
    stored = json.loads(plan.TENSORS_FILE.read_text(encoding="utf-8"))["components"]
    for variant in (FLUX_DEV, FLUX_SCHNELL):
        for part in plan.PARTS:
            model = data.build_on_meta(part, data.read_config(variant, part))
            assert data.tensor_list(model) == stored[f"{variant}/{part}"]["tensors"], f"{variant}/{part}"


def test_configs_hold_the_published_structure():
    t = json.loads((plan.CONFIGS / FLUX_DEV / "transformer" / "config.json").read_text())
    assert (t["in_channels"], t["num_layers"], t["num_single_layers"], t["attention_head_dim"],
            t["num_attention_heads"], t["joint_attention_dim"], t["pooled_projection_dim"]) == (64, 19, 38, 128, 24, 4096, 768)
    assert t["guidance_embeds"] is True
    assert json.loads((plan.CONFIGS / FLUX_SCHNELL / "transformer" / "config.json").read_text())["guidance_embeds"] is False
    vae = json.loads((plan.CONFIGS / FLUX_DEV / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["block_out_channels"], vae["scaling_factor"], vae["shift_factor"]) == (
        16, [128, 256, 512, 512], 0.3611, 0.1159)
    for part in ("text_encoder", "text_encoder_2", "vae"):  # schnell ships the same encoders and VAE
        dev, schnell = (json.loads((plan.CONFIGS / v / part / "config.json").read_text()) for v in (FLUX_DEV, FLUX_SCHNELL))
        assert {k: v for k, v in dev.items() if k != "_name_or_path"} == \
            {k: v for k, v in schnell.items() if k != "_name_or_path"}


def mem_bytes(variant, part, storage, dtype):
    return plan.component_bytes(variant, part, storage, dtype)


WEIGHTS = [
    # (what, bytes the plan gives, the known figure in GB, tolerance)
    ("FLUX.1 transformer bf16", lambda: mem_bytes(FLUX_DEV, "transformer", "dense", "bf16"), 23.8, 0.01),
    ("T5-XXL bf16", lambda: mem_bytes(FLUX_DEV, "text_encoder_2", "dense", "bf16"), 9.5, 0.01),
    ("T5-XXL 8-bit under fp16 (wo in fp32)", lambda: mem_bytes(FLUX_DEV, "text_encoder_2", "int8", "fp16"), 7.9, 0.05),
    ("T5-XXL 8-bit under bf16", lambda: mem_bytes(FLUX_DEV, "text_encoder_2", "int8", "bf16"), 5.9, 0.05),
    ("GGUF Q4_K_S file (city96 flux1-dev)", lambda: plan.gguf_file_bytes(FLUX_DEV, "Q4_K_S"), 6.8, 0.10),
    ("GGUF Q4_K_S in memory", lambda: mem_bytes(FLUX_DEV, "transformer", "gguf:Q4_K_S", "fp16"), 6.8, 0.10),
    ("GGUF Q8_0 file", lambda: plan.gguf_file_bytes(FLUX_DEV, "Q8_0"), 12.7, 0.05),
    ("NF4 transformer (diffusers/FLUX.1-dev-bnb-4bit: 6.7 GB)", lambda: mem_bytes(FLUX_DEV, "transformer", "nf4", "bf16"),
     6.7, 0.05),
]


@pytest.mark.parametrize("what,compute,known_gb,tolerance", WEIGHTS, ids=[w[0] for w in WEIGHTS])
def test_weights_match_the_known_sizes(what, compute, known_gb, tolerance):
    assert compute() / GB == pytest.approx(known_gb, rel=tolerance)


def test_fp16_keeps_t5_wo_in_fp32_even_unquantized():
    wo = sum(t.numel for t in plan.flux_tensors(FLUX_DEV, "text_encoder_2") if t.name.endswith(".wo.weight"))
    assert wo == 24 * 10240 * 4096
    fp16 = mem_bytes(FLUX_DEV, "text_encoder_2", "dense", "fp16")
    assert fp16 - mem_bytes(FLUX_DEV, "text_encoder_2", "dense", "bf16") == 2 * wo
    assert mem_bytes(FLUX_DEV, "text_encoder_2", "int8", "fp16") - mem_bytes(FLUX_DEV, "text_encoder_2", "int8", "bf16") == 2 * wo


GGUF_TYPES = [
    ("x_embedder.weight", "F32"),  # img_in
    ("proj_out.weight", "F32"),  # final_layer.linear
    ("time_text_embed.timestep_embedder.linear_1.weight", "F32"),
    ("time_text_embed.timestep_embedder.linear_2.weight", "F16"),
    ("context_embedder.weight", "F16"),  # txt_in
    ("norm_out.linear.weight", "F16"),  # final_layer.adaLN_modulation
    ("transformer_blocks.0.attn.to_q.weight", "Q4_K"),
    ("transformer_blocks.0.attn.to_q.bias", "F32"),
    ("transformer_blocks.0.attn.norm_q.weight", "F32"),
    ("single_transformer_blocks.37.proj_out.weight", "Q4_K"),  # not the top-level proj_out
]


@pytest.mark.parametrize("name,expected", GGUF_TYPES, ids=[g[0] for g in GGUF_TYPES])
def test_gguf_q4_k_s_types_follow_city96s_rules(name, expected):
    tensor = next(t for t in plan.flux_tensors(FLUX_DEV, "transformer") if t.name == name)
    assert plan.gguf_tensor_type(tensor, "Q4_K_S") == expected


def test_gguf_type_comes_from_the_file_name():
    assert GGUF_DEV_Q4.transformer_storage == "gguf:Q4_K_S" and GGUF_DEV_Q4.variant == FLUX_DEV
    q8 = plan.single_file_model("flux1-schnell-Q8_0.gguf", DEV)
    assert q8.transformer_storage == "gguf:Q8_0" and q8.variant == FLUX_DEV  # the base decides the architecture
    odd = plan.single_file_model("my-flux.gguf", SCHNELL)
    assert odd.transformer_storage == "gguf:Q8_0" and "not in the file name" in odd.note
    assert plan.hub_model("diffusers/FLUX.1-dev-bnb-4bit").transformer_storage == "nf4"


def test_a_local_folder_with_flux_configs_is_planned_as_flux(tmp_path):
    config = json.loads((plan.CONFIGS / FLUX_SCHNELL / "transformer" / "config.json").read_text())
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    sizes = plan.ModelSizes(1, 1, 1)
    assert (plan.folder_model(tmp_path, sizes).variant, plan.folder_model(tmp_path, sizes).transformer_storage) == (
        FLUX_SCHNELL, "dense")
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    assert plan.folder_model(tmp_path, sizes).transformer_storage == "nf4"
    config["num_layers"] = 2  # another architecture: planned from its files
    (tmp_path / "transformer" / "config.json").write_text(json.dumps(config))
    assert plan.folder_model(tmp_path, sizes).variant is None


# ---- working memory -----------------------------------------------------------------------------


def test_working_memory_formulas_follow_the_traces():
    traces = plan.activations()
    factor = plan.workspace_factor()
    for dtype in ("bf16", "fp16"):
        for row in traces[dtype]["transformer"]:
            predicted = plan.transformer_working(row["width"], row["height"], row["text_tokens"], dtype)
            assert predicted / factor == pytest.approx(row["peak_bytes"], rel=0.01)
        for row in traces[dtype]["vae_decode"]:
            assert plan.vae_decode_working(row["width"], row["height"], dtype) / factor == pytest.approx(row["peak_bytes"])
    # The sequence at 1024x1024: 64x64 image tokens + 512 text tokens; hidden 3072.
    assert plan._sequence(1024, 1024, 512) == 4608


def test_stored_traces_match_a_fresh_trace():
    import torch

    data = tool("plan_data")
    stored = plan.activations()["bf16"]
    transformer = data.build_on_meta("transformer", data.read_config(FLUX_DEV, "transformer"), torch.bfloat16)
    peak = data.trace_transformer(transformer, 512, 512, 512, torch.bfloat16)
    assert peak == next(r["peak_bytes"] for r in stored["transformer"] if r["width"] == 512)
    vae = data.build_on_meta("vae", data.read_config(FLUX_DEV, "vae"), torch.bfloat16)
    assert data.trace_vae_decode(vae, 512, 512, torch.bfloat16) == next(
        r["peak_bytes"] for r in stored["vae_decode"] if r["width"] == 512)


def test_calibration_reproduces_the_h200_measurement():
    """The one GPU measurement: FLUX.1-schnell transformer + VAE (bf16) + stand-in encoders, 1024x1024, on an H200."""
    bench = json.loads((ROOT / "bench" / "results" / "h200-2026-11-27.json").read_text())
    cal = plan.activations()["calibration"]
    weights = 2 * (plan.param_count(FLUX_SCHNELL, "transformer") + plan.param_count(FLUX_SCHNELL, "vae")
                   + cal["stand_in_encoder_params"])
    working = max(plan.vae_decode_working(1024, 1024, "bf16"), plan.transformer_working(1024, 1024, 256, "bf16"))
    assert (weights + working) / GiB == pytest.approx(bench["peak_gib_schnell"], rel=0.005)
    assert 1.0 < plan.workspace_factor() < 2.0  # the trace sees most of it


# ---- plans and choices ------------------------------------------------------------------------


def test_old_t4_default_does_not_fit_a_t4():
    """Q4_K_S GGUF transformer + 8-bit T5 under fp16: 15.1 GB of weights."""
    t4 = GPUS["t4"]
    on_gpu = build_plan(GGUF_DEV_Q4, t4, profile="quantized", placement="gpu")
    assert on_gpu.dtype == "fp16"
    assert on_gpu.weights / GB == pytest.approx(15.1, abs=0.1)
    assert not on_gpu.fits and on_gpu.gpu_short > 0
    assert on_gpu.gpu_peak > t4.total_bytes
    offload = build_plan(GGUF_DEV_Q4, t4, profile="quantized", placement="model offload")
    assert offload.ram_peak > int(12.7 * GiB) and offload.ram_short > 0
    assert offload.gpu_short == 0  # the GPU would cope; the runtime's RAM would not
    chosen, why, _ = choose(GGUF_DEV_Q4, t4)
    assert chosen is None and "no memory profile is predicted to fit" in why


AUTO = [
    # (gpu, model, expected profile or None when nothing fits, placement)
    ("t4", DEV, None, None),
    ("t4", SCHNELL, None, None),
    ("l4", DEV, "quantized", "gpu"),
    ("l4", SCHNELL, "quantized", "gpu"),
    ("a100-40", DEV, "full", "gpu"),
    ("a100-40", SCHNELL, "full", "gpu"),
    ("a100-80", DEV, "full", "gpu"),
    ("a100-80", SCHNELL, "full", "gpu"),
    ("h100", DEV, "full", "gpu"),
    ("h100", SCHNELL, "full", "gpu"),
]


@pytest.mark.parametrize("gpu,model,profile,placement", AUTO, ids=[f"{a[0]} {a[1].variant}" for a in AUTO])
def test_auto_per_colab_gpu(gpu, model, profile, placement):
    chosen, why, options = choose(model, GPUS[gpu])
    if profile is None:
        assert chosen is None and all(not p.fits for p, _ in options)
    else:
        assert (chosen.profile, chosen.placement) == (profile, placement) and chosen.fits
        assert chosen.gpu_peak <= GPUS[gpu].total_bytes and chosen.ram_peak <= GPUS[gpu].ram_bytes
        # Everything auto would have preferred does not fit.
        for p, why_not in options[: options.index((chosen, ""))]:
            assert why_not or not p.fits


def test_auto_choices_hold_with_the_published_working_memory(monkeypatch):
    """The diffusers team's bf16 benchmark shows 4.7 GiB beyond the weights (36.2 - 31.4), twice ours: same choices."""
    expected = {(g, m.variant): choose(m, GPUS[g])[0] for g, m, _, _ in AUTO}
    monkeypatch.setattr(plan, "workspace_factor", lambda: 4.72 * GiB / (1.5 * GiB))
    for (gpu, variant), before in expected.items():
        after = choose(DEV if variant == FLUX_DEV else SCHNELL, GPUS[gpu])[0]
        assert (after and (after.profile, after.placement)) == (before and (before.profile, before.placement))


def test_missing_packages_rule_out_their_storage():
    chosen, _, options = choose(DEV, GPUS["l4"], bnb=False)
    assert (chosen.profile, chosen.placement) == ("lowvram", "sequential")
    assert any("bitsandbytes not installed" in why for _, why in options)
    _, _, options = choose(GGUF_DEV_Q4, GPUS["h100"], gguf=False)
    assert all("gguf not installed" in why for _, why in options)


def test_placements_put_weights_where_they_say():
    a100 = GPUS["a100-40"]
    full = build_plan(DEV, a100, profile="full")
    offload = build_plan(DEV, a100, profile="offload")
    lowvram = build_plan(DEV, a100, profile="lowvram")
    transformer, vae = full.rows[0], full.rows[3]
    assert full.gpu_generating == full.weights + vae.working + plan.CUDA_CONTEXT  # the VAE decode is the largest
    assert offload.gpu_generating == max(r.weights + r.working for r in offload.rows) + plan.CUDA_CONTEXT
    assert offload.gpu_generating < full.gpu_generating and lowvram.gpu_generating < offload.gpu_generating
    assert full.ram_peak < 4 * GiB  # straight to the GPU
    assert offload.ram_peak == lowvram.ram_peak >= plan.PROCESS_RAM + full.weights
    assert transformer.weights == plan.component_bytes(FLUX_DEV, "transformer", "dense", "bf16")


def test_cpu_plan_is_full_in_float32():
    chosen, why, _ = choose(SCHNELL, None, 128 * GiB)
    assert (chosen.profile, chosen.dtype, chosen.gpu_peak) == ("full", "fp32", 0)
    assert chosen.ram_peak > 2 * plan.component_bytes(FLUX_SCHNELL, "transformer", "dense", "bf16")
    assert "no CUDA GPU" in why


def test_render_is_a_table_labelled_predicted():
    text = build_plan(GGUF_DEV_Q4, GPUS["t4"], profile="quantized", placement="model offload").render()
    assert "| transformer | GGUF Q4_K_S |" in text
    assert "| T5-XXL (text_encoder_2) | int8 (bitsandbytes), wo in fp32 |" in text
    assert "| while loading |" in text and "| while generating |" in text
    assert "predicted: nothing was measured on this GPU" in text
    assert "| fits | yes | no (" in text  # fits the GPU, not the RAM
    assert "measured on this GPU" in build_plan(DEV, GPUS["h200"]).render()


def test_unknown_gpu_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match="'v100'.*t4, l4, a100-40, a100-80, h100"):
        plan.gpu_spec("v100")


# ---- --plan ------------------------------------------------------------------------------------


@pytest.fixture
def nothing_loads(monkeypatch):
    from masuka.model import loading
    from masuka.web import server

    def explode(*args, **kwargs):
        raise AssertionError("--plan must not load a model or launch the app")

    monkeypatch.setattr(loading, "load_pipeline", explode)
    monkeypatch.setattr(server, "launch", explode)


def test_plan_t4_prints_the_table_and_loads_nothing(nothing_loads, capsys, tmp_path):
    import app

    assert app.main(["--plan", "t4", "--home", str(tmp_path / "home")]) == 0
    out = capsys.readouterr().out
    assert "NVIDIA T4 (Colab)" in out and "compute capability 7.5 (fp16)" in out
    assert "## black-forest-labs/FLUX.1-dev" in out and "## black-forest-labs/FLUX.1-schnell" in out
    assert "auto: nothing fits" in out and "| transformer | NF4 (bitsandbytes) |" in out
    assert "| candidate (auto tries them in this order) |" in out
    assert not (tmp_path / "home").exists()  # not even the home folder


def test_plan_with_model_and_memory(nothing_loads, capsys):
    import app

    gguf = "https://huggingface.co/city96/FLUX.1-schnell-gguf/blob/main/flux1-schnell-Q4_K_S.gguf"
    assert app.main(["--plan", "l4", "--model", gguf, "--memory", "offload"]) == 0
    out = capsys.readouterr().out
    assert "--memory offload (asked for): offload (transformer GGUF Q4_K_S" in out
    assert "auto: full" in out and "256 text tokens" in out


def test_plan_for_this_machine_and_a_bad_gpu(nothing_loads, capsys):
    import app

    assert app.main(["--plan"]) == 0
    out = capsys.readouterr().out
    assert "this machine" in out
    assert app.main(["--plan", "v100"]) == 2


def test_docs_tables_are_what_the_plan_predicts():
    docs = tool("plan_docs")
    text = docs.DOC.read_text(encoding="utf-8")
    assert docs.with_generated(text) == text, "docs/memory-profiles.md is stale: run python tools/plan_docs.py"
    for gpu in ("t4", "l4", "a100-40", "a100-80", "h100"):
        assert plan.render_choice(DEV, GPUS[gpu]) in text
