"""Tests for masuka.lora.formats: header checks, pickle refusal, format detection, fitting."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lora_factory as factory  # noqa: E402

from masuka.lora.formats import (  # noqa: E402
    LoraInspection,
    LoraRefused,
    check_fits,
    detect_format,
    inspect_lora_file,
    load_lora_state_dict,
    normalize_lora_keys,
    read_safetensors_header,
    read_trigger_words,
)


@pytest.fixture(scope="module")
def transformer():
    return factory.make_tiny_transformer()


@pytest.fixture(scope="module")
def files(tmp_path_factory, transformer):
    """One of each kind of file, built once for the module."""
    d = tmp_path_factory.mktemp("loras")
    built = {
        "peft": factory.make_peft_lora(transformer, d / "peft.safetensors"),
        "peft_rank8": factory.make_peft_lora(transformer, d / "peft8.safetensors", rank=8, targets=("to_q",)),
        "peft_unprefixed": factory.make_peft_lora(transformer, d / "unprefixed.safetensors", prefix=""),
        "kohya": factory.make_kohya_lora(transformer, d / "kohya.safetensors"),
        "kohya_comfyui": factory.make_kohya_lora(transformer, d / "comfy.safetensors", comfyui=True),
        "kohya_bf16": factory.make_kohya_lora(transformer, d / "kohya_bf16.safetensors", rank=6, dtype=torch.bfloat16),
        "xlabs": factory.make_xlabs_lora(transformer, d / "xlabs.safetensors"),
        "big": factory.make_big_real_flux_lora(d / "big.safetensors"),
        "sdxl": factory.make_sdxl_lora(d / "sdxl.safetensors"),
        "sdxl_diffusers": factory.make_sdxl_lora(d / "sdxl_diffusers.safetensors", style="diffusers"),
        "sd15": factory.make_sd15_lora(d / "sd15.safetensors"),
        "full": factory.make_full_checkpoint(d / "full.safetensors"),
        "full_tiny": factory.make_full_checkpoint(d / "full_tiny.safetensors", transformer),
        "lokr": factory.make_lokr_lora(d / "lokr.safetensors"),
        "pickle_pt": factory.make_pickle(d / "lora.pt"),
        "pickle_named_safetensors": factory.make_pickle(d / "sneaky.safetensors"),
        "pickle_legacy_no_ext": factory.make_pickle(d / "civitai_download", legacy=True),
        "pickle_zip_no_ext": factory.make_pickle(d / "civitai_download_zip"),
    }
    built["truncated"] = factory.make_truncated(built["peft"], d / "truncated.safetensors", 100)
    built["truncated_header"] = factory.make_truncated(
        built["peft"], d / "truncated_header.safetensors", built["peft"].stat().st_size - 20
    )
    built["padded"] = factory.make_padded(built["peft"], d / "padded.safetensors", 16)
    built["tiny_file"] = d / "three_bytes.safetensors"
    built["tiny_file"].write_bytes(b"abc")
    built["empty_file"] = d / "empty.safetensors"
    built["empty_file"].write_bytes(b"")
    return built


def _f32(name: str, shape: list[int], begin: int) -> dict:
    n = 4
    for dim in shape:
        n *= dim
    return {"dtype": "F32", "shape": shape, "data_offsets": [begin, begin + n]}


# ----------------------------------------------------------------------------- header


HEADER_CASES = [
    # (id, header, data, kwargs for write_raw_safetensors, reason word)
    ("absurd_length", None, b"", {"raw_header": b"", "header_len": 2**63}, "not a safetensors"),
    ("length_beyond_file", None, b"", {"raw_header": b"{}", "header_len": 5000}, "incomplete"),
    ("invalid_json", None, b"", {"raw_header": b"{not json"}, "not a safetensors"),
    ("not_utf8", None, b"", {"raw_header": b"{\xff\xfe}"}, "not a safetensors"),
    ("json_list", [1, 2], b"", {}, "not a safetensors"),
    (
        "overlapping",
        {"a": _f32("a", [2], 0), "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}},
        b"\0" * 12,
        {},
        "offset",
    ),
    ("gap", {"a": _f32("a", [1], 0), "b": _f32("b", [1], 8)}, b"\0" * 12, {}, "offset"),
    (
        "offsets_reversed",
        {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}},
        b"\0" * 4,
        {},
        "data_offsets",
    ),
    ("beyond_data", {"a": _f32("a", [4], 0)}, b"\0" * 8, {}, "incomplete"),
    ("trailing_bytes", {"a": _f32("a", [1], 0)}, b"\0" * 8, {}, "corrupt"),
    ("size_mismatch", {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, {}, "shape"),
    ("unknown_dtype", {"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", {}, "dtype"),
    ("bad_shape", {"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, {}, "shape"),
    (
        "metadata_not_strings",
        {"__metadata__": {"x": 1}, "a": _f32("a", [1], 0)},
        b"\0" * 4,
        {},
        "__metadata__",
    ),
    ("duplicate_key", None, b"\0" * 4, {"raw_header": b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'}, "duplicate"),
]


@pytest.mark.parametrize("case_id,header,data,kwargs,word", HEADER_CASES, ids=[c[0] for c in HEADER_CASES])
def test_bad_headers_are_refused(tmp_path, case_id, header, data, kwargs, word):
    path = factory.write_raw_safetensors(tmp_path / f"{case_id}.safetensors", header, data, **kwargs)
    with pytest.raises(LoraRefused, match=word):
        read_safetensors_header(path)
    with pytest.raises(LoraRefused, match=word):
        inspect_lora_file(path)


def test_header_of_valid_file(files):
    header, data_start = read_safetensors_header(files["peft"])
    assert "__metadata__" in header
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert len(tensors) == 14
    size = files["peft"].stat().st_size
    assert data_start + max(v["data_offsets"][1] for v in tensors.values()) == size
    with files["peft"].open("rb") as handle:
        assert 8 + int.from_bytes(handle.read(8), "little") == data_start


def test_empty_safetensors_object_has_no_lora(tmp_path):
    path = factory.write_raw_safetensors(tmp_path / "empty_header.safetensors", {})
    header, data_start = read_safetensors_header(path)
    assert header == {} and data_start == 10
    with pytest.raises(LoraRefused, match="no LoRA"):
        inspect_lora_file(path)


def test_header_limit_is_configurable(files):
    with pytest.raises(LoraRefused, match="implausible"):
        read_safetensors_header(files["peft"], max_header_bytes=16)


def test_directory_is_refused(tmp_path):
    with pytest.raises(LoraRefused, match="regular file"):
        inspect_lora_file(tmp_path)


# ----------------------------------------------------------------------------- refusals


REFUSAL_CASES = [
    ("truncated", "incomplete"),
    ("truncated_header", "incomplete"),
    ("padded", "expected"),
    ("tiny_file", "incomplete"),
    ("empty_file", "incomplete"),
    ("pickle_pt", "pickle"),
    ("pickle_named_safetensors", "pickle"),
    ("pickle_legacy_no_ext", "pickle"),
    ("pickle_zip_no_ext", "pickle"),
    ("sdxl", "not a FLUX"),
    ("sdxl_diffusers", "not a FLUX"),
    ("sd15", "not a FLUX"),
    ("full", "no LoRA"),
    ("full_tiny", "no LoRA"),
    ("lokr", "LoKr"),
]


@pytest.mark.parametrize("name,word", REFUSAL_CASES, ids=[c[0] for c in REFUSAL_CASES])
def test_refused_files(files, name, word):
    with pytest.raises(LoraRefused, match=word) as info:
        inspect_lora_file(files[name])
    assert isinstance(info.value, ValueError)


def test_truncated_message_gives_sizes(files):
    expected = files["peft"].stat().st_size
    with pytest.raises(LoraRefused) as info:
        inspect_lora_file(files["truncated"])
    assert str(info.value) == f"file is incomplete: expected {expected} bytes, found {expected - 100}"


def test_sdxl_message_names_sdxl(files):
    with pytest.raises(LoraRefused, match="SDXL"):
        inspect_lora_file(files["sdxl"])


@pytest.mark.parametrize("ext", [".bin", ".ckpt", ".pt", ".pth", ".pkl", ".PT"])
def test_pickle_extensions_refused_even_with_safetensors_content(files, tmp_path, ext):
    path = tmp_path / f"renamed{ext}"
    shutil.copyfile(files["peft"], path)
    with pytest.raises(LoraRefused, match="pickle files are never loaded; convert to .safetensors"):
        inspect_lora_file(path)
    with pytest.raises(LoraRefused, match="pickle"):
        check_fits(path, factory.make_tiny_transformer())


def test_pickle_is_never_unpickled(files, transformer, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    for name in ("pickle_pt", "pickle_named_safetensors", "pickle_legacy_no_ext", "pickle_zip_no_ext"):
        with pytest.raises(LoraRefused, match="pickle"):
            inspect_lora_file(files[name])
        with pytest.raises(LoraRefused, match="pickle"):
            read_safetensors_header(files[name])
        with pytest.raises(LoraRefused, match="pickle"):
            check_fits(files[name], transformer)
        with pytest.raises(LoraRefused, match="pickle"):
            load_lora_state_dict(files[name])


def test_gguf_is_refused(tmp_path):
    path = tmp_path / "model"
    path.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(LoraRefused, match="GGUF"):
        inspect_lora_file(path)


# ----------------------------------------------------------------------------- accepted files


ACCEPT_CASES = [
    # (file, format, rank, num_tensors)
    ("peft", "diffusers", 4, 14),
    ("peft_rank8", "diffusers", 8, 4),
    ("peft_unprefixed", "diffusers", 4, 14),
    ("kohya", "kohya", 4, 36),
    ("kohya_comfyui", "kohya", 4, 36),
    ("kohya_bf16", "kohya", 6, 36),
    ("xlabs", "xlabs", 4, 8),
    ("big", "diffusers", 4, 8),
]


@pytest.mark.parametrize("name,fmt,rank,num_tensors", ACCEPT_CASES, ids=[c[0] for c in ACCEPT_CASES])
def test_accepted_files(files, name, fmt, rank, num_tensors):
    path = files[name]
    result = inspect_lora_file(path)
    assert isinstance(result, LoraInspection)
    assert result.format == fmt
    assert result.rank == rank
    assert result.num_tensors == num_tensors
    assert result.size_bytes == path.stat().st_size
    assert result.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert isinstance(result.metadata, dict)


def test_judged_by_content_without_extension(files, tmp_path):
    path = tmp_path / "download"
    shutil.copyfile(files["kohya"], path)
    result = inspect_lora_file(path)
    assert result.format == "kohya"
    assert result.rank == 4
    assert result.sha256 == inspect_lora_file(files["kohya"]).sha256


def test_kohya_metadata_is_returned(files):
    result = inspect_lora_file(files["kohya"])
    assert result.metadata["ss_network_dim"] == "4"
    assert result.metadata["format"] == "pt"


# ----------------------------------------------------------------------------- detect_format


DETECT_CASES = [
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "transformer.transformer_blocks.0.attn.to_q.lora_B.weight"], "diffusers"),
    (["transformer_blocks.0.attn.to_q.lora_A.weight", "transformer_blocks.0.attn.to_q.lora_B.weight"], "diffusers"),
    (["single_transformer_blocks.3.proj_out.lora_A.weight", "single_transformer_blocks.3.proj_out.lora_B.weight"], "diffusers"),
    (
        ["transformer.transformer_blocks.0.attn.to_q.lora_A.weight", "transformer.transformer_blocks.0.attn.to_q.alpha"],
        "diffusers",
    ),
    (["transformer.transformer_blocks.0.attn.to_k.lora_down.weight", "transformer.transformer_blocks.0.attn.to_k.lora_up.weight"], "diffusers"),
    (["transformer.transformer_blocks.0.attn.processor.to_q_lora.down.weight"], "diffusers"),
    (
        [
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight",
            "lora_unet_double_blocks_0_img_attn_qkv.alpha",
        ],
        "kohya",
    ),
    (["lora_unet_single_blocks_7_linear1.lora_down.weight", "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "kohya"),
    (["diffusion_model.double_blocks.0.img_attn.qkv.lora_down.weight"], "kohya"),
    (["lora_transformer_single_transformer_blocks_0_attn_to_q.lora_down.weight"], "kohya-diffusers"),
    (["double_blocks.0.processor.qkv_lora1.down.weight", "double_blocks.0.processor.qkv_lora1.up.weight"], "xlabs"),
    (["diffusion_model.double_blocks.0.processor.proj_lora1.down.weight"], "xlabs"),
    (["base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight"], "fal-kontext"),
    (["__metadata__", "transformer.proj_out.lora_A.weight", "transformer.proj_out.dora_scale"], "diffusers"),
]


@pytest.mark.parametrize("keys,fmt", DETECT_CASES, ids=[c[0][-1].split(".")[0][:40] + f"-{i}" for i, c in enumerate(DETECT_CASES)])
def test_detect_format(keys, fmt):
    assert detect_format(keys) == fmt
    assert detect_format(iter(keys)) == fmt


DETECT_REFUSALS = [
    (["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"], "not a FLUX"),
    (["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"], "not a FLUX"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "SDXL"),
    (["unet.down_blocks.0.attentions.0.proj_in.lora_A.weight"], "not a FLUX"),
    (["unet.up_blocks.0.attentions.0.processor.to_q_lora.down.weight"], "not a FLUX"),
    (["lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight"], "SD3"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lokr_w1", "lora_unet_double_blocks_0_img_attn_qkv.lokr_w2"], "LoKr"),
    (["lora_unet_double_blocks_0_img_attn_qkv.hada_w1_a"], "LoKr/LoHa"),
    (["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"], "not converted by diffusers"),
    (["double_blocks.0.img_attn.qkv.lora_B.weight"], "not converted by diffusers"),
    (["img_in.lora_A.weight", "query_norm.scale"], "Control"),
    (["lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"], "text encoder"),
    (["text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight"], "text encoder"),
    (["double_blocks.0.img_attn.qkv.weight", "img_in.weight"], "no LoRA"),
    (["model.diffusion_model.double_blocks.0.img_attn.qkv.weight"], "no LoRA"),
    ([], "no LoRA"),
    (["__metadata__"], "no LoRA"),
    (["some.other.lora_A.weight"], "unknown LoRA layout"),
]


@pytest.mark.parametrize("keys,word", DETECT_REFUSALS, ids=[f"refuse-{i}" for i in range(len(DETECT_REFUSALS))])
def test_detect_format_refusals(keys, word):
    with pytest.raises(LoraRefused, match=word):
        detect_format(keys)


# ----------------------------------------------------------------------------- trigger words


TRIGGER_CASES = [
    ({"modelspec.trigger_phrase": "ohwx person"}, ["ohwx person"]),
    ({"trigger_words": '["sks dog", "red collar"]'}, ["sks dog", "red collar"]),
    ({"trigger_words": "sks dog, red collar,  ,sks dog"}, ["sks dog", "red collar"]),
    ({"instance_prompt": "a photo of TOK"}, ["a photo of TOK"]),
    (
        {"ss_tag_frequency": json.dumps({"10_ohwx": {"ohwx": 30, "smile": 5, "outdoors": 12}, "5_reg": {"smile": 20}})},
        ["ohwx", "smile", "outdoors"],
    ),
    (
        {"trigger_word": "mystyle", "ss_tag_frequency": json.dumps({"d": {"mystyle": 3, "castle": 2}})},
        ["mystyle", "castle"],
    ),
    ({"ss_tag_frequency": "not json"}, []),
    ({"ss_tag_frequency": json.dumps({"d": {"a": "many"}})}, []),
    ({}, []),
    ({"trigger_words": ",".join(f"w{i}" for i in range(30))}, [f"w{i}" for i in range(10)]),
    ({"trigger_words": "x" * 500}, ["x" * 100]),
]


@pytest.mark.parametrize("metadata,expected", TRIGGER_CASES, ids=[f"trigger-{i}" for i in range(len(TRIGGER_CASES))])
def test_read_trigger_words(metadata, expected):
    assert read_trigger_words(metadata) == expected


def test_trigger_words_from_file(tmp_path, transformer):
    tags = {"20_ohwx woman": {"ohwx": 40, "woman": 40, "portrait": 7, "smiling": 3}}
    path = factory.make_kohya_lora(
        transformer,
        tmp_path / "character.safetensors",
        metadata={"ss_tag_frequency": json.dumps(tags), "modelspec.trigger_phrase": "ohwx woman"},
    )
    result = inspect_lora_file(path)
    assert result.trigger_words == ["ohwx woman", "ohwx", "woman", "portrait", "smiling"]
    assert result.metadata["modelspec.trigger_phrase"] == "ohwx woman"


# ----------------------------------------------------------------------------- check_fits


@pytest.mark.parametrize("name", ["peft", "peft_rank8", "peft_unprefixed", "kohya", "kohya_comfyui", "kohya_bf16", "xlabs"])
def test_fitting_loras(files, transformer, name):
    assert check_fits(files[name], transformer) is None
    assert check_fits(load_lora_state_dict(files[name]), transformer) is None


def test_real_size_lora_does_not_fit(files, transformer):
    reason = check_fits(files["big"], transformer)
    assert reason is not None
    assert reason.startswith("LoRA shapes do not fit this model:")
    assert "expects in_features 160, LoRA has 15360" in reason or "expects in_features 32, LoRA has 3072" in reason


def test_real_size_lora_reports_to_q(transformer):
    state_dict = {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4),
    }
    assert check_fits(state_dict, transformer) == (
        "LoRA shapes do not fit this model: transformer_blocks.0.attn.to_q expects in_features 32, "
        "LoRA has 3072 (and 1 more)"
    )


FIT_REASON_CASES = [
    (
        {
            "transformer.transformer_blocks.5.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.transformer_blocks.5.attn.to_q.lora_B.weight": torch.zeros(32, 4),
        },
        "which this model does not have",
    ),
    (
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4),
        },
        "expects out_features 32, LoRA has 64",
    ),
    (
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 8),
        },
        "rank",
    ),
    (
        {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32)},
        "only one of lora_A/lora_B",
    ),
    (
        {
            "transformer.transformer_blocks.0.attn.lora_A.weight": torch.zeros(4, 32),
            "transformer.transformer_blocks.0.attn.lora_B.weight": torch.zeros(32, 4),
        },
        "not a linear layer",
    ),
    (
        # kohya single-block linear1: diffusers hard-codes the real FLUX.1 split sizes.
        {
            "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.zeros(224, 4),
        },
        "diffusers cannot convert",
    ),
    (
        {
            "lora_unet_double_blocks_0_img_attn_norm.lora_down.weight": torch.zeros(4, 32),
            "lora_unet_double_blocks_0_img_attn_norm.lora_up.weight": torch.zeros(32, 4),
        },
        "Incompatible keys",
    ),
    (
        # diffusers refuses integer network alphas in diffusers-format files.
        {
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),
            "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4),
            "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(3),
        },
        "diffusers cannot convert",
    ),
    ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 32)}, "not a FLUX"),
    ({"text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.zeros(4, 32)}, "text encoder"),
]


@pytest.mark.parametrize("state_dict,word", FIT_REASON_CASES, ids=[f"nofit-{i}" for i in range(len(FIT_REASON_CASES))])
def test_check_fits_reasons(transformer, state_dict, word):
    before = dict(state_dict)
    reason = check_fits(state_dict, transformer)
    assert reason is not None and word in reason
    assert state_dict.keys() == before.keys()


def test_check_fits_with_loaded_adapter(files, transformer):
    from diffusers import FluxPipeline

    model = factory.make_tiny_transformer()
    pipe = FluxPipeline(None, None, None, None, None, None, model)
    pipe.load_lora_weights(load_lora_state_dict(files["peft"]), adapter_name="first")
    assert check_fits(files["kohya"], model) is None
    assert check_fits(files["big"], model) is not None


def test_check_fits_does_not_touch_the_model(files, transformer):
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    for name in ("peft", "kohya", "big"):
        check_fits(files[name], transformer)
    after = transformer.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not getattr(transformer, "peft_config", None)


# ----------------------------------------------------------------------------- loading


def _forward(model):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        return model(
            hidden_states=torch.randn(1, 16, 64, generator=gen),
            encoder_hidden_states=torch.randn(1, 8, 32, generator=gen),
            pooled_projections=torch.randn(1, 32, generator=gen),
            timestep=torch.tensor([0.5]),
            img_ids=torch.zeros(16, 3),
            txt_ids=torch.zeros(8, 3),
            guidance=torch.tensor([3.5]),
            return_dict=False,
        )[0]


@pytest.mark.parametrize("name", ["peft", "peft_unprefixed", "kohya", "kohya_comfyui", "xlabs"])
def test_factory_loras_load_in_diffusers_and_change_output(files, name):
    """The factory's files are real: diffusers loads them and the output changes."""
    from diffusers import FluxPipeline

    model = factory.make_tiny_transformer()
    base = _forward(model)
    pipe = FluxPipeline(None, None, None, None, None, None, model)
    pipe.load_lora_weights(load_lora_state_dict(files[name]), adapter_name="test")
    assert "test" in model.peft_config
    assert (_forward(model) - base).abs().max().item() > 1e-3


def test_diffusers_loads_prefixed_file_path_safely(files):
    from diffusers import FluxPipeline

    model = factory.make_tiny_transformer()
    base = _forward(model)
    pipe = FluxPipeline(None, None, None, None, None, None, model)
    pipe.load_lora_weights(str(files["kohya"]), use_safetensors=True, adapter_name="k")
    assert (_forward(model) - base).abs().max().item() > 1e-3


def test_normalize_adds_prefix_only_to_unprefixed_peft(files):
    raw = {"transformer_blocks.0.attn.to_q.lora_A.weight": 1, "transformer_blocks.0.attn.to_q.lora_B.weight": 2}
    assert set(normalize_lora_keys(raw)) == {"transformer." + k for k in raw}
    kohya = {"lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": 1}
    assert normalize_lora_keys(kohya) == kohya
    prefixed = {"transformer.proj_out.lora_A.weight": 1}
    assert normalize_lora_keys(prefixed) == prefixed
    assert set(load_lora_state_dict(files["peft_unprefixed"])) == set(load_lora_state_dict(files["peft"]))


def test_load_lora_state_dict_refuses(files):
    with pytest.raises(LoraRefused, match="not a FLUX"):
        load_lora_state_dict(files["sdxl"])
    with pytest.raises(LoraRefused, match="incomplete"):
        load_lora_state_dict(files["truncated"])


def test_import_is_light():
    import subprocess

    code = (
        "import sys; import masuka.lora.formats; "
        "heavy = [m for m in ('torch', 'diffusers', 'safetensors') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(Path(__file__).resolve().parent.parent))
    assert out.stdout.strip() == ""
