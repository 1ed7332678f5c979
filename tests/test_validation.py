"""Every bound on a generation request, table-driven."""

from __future__ import annotations

import math

import pytest

from masuka.lora.types import validate_name
from masuka.model.defaults import DEV_DEFAULTS, SCHNELL_DEFAULTS, TINY_DEFAULTS
from masuka.core.requests import (
    LoraChoice,
    parse_lora_spec,
    validate_request,
)

OK = dict(prompt="a red fox in snow")


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"prompt": ""}, ["prompt"]),
        ({"prompt": "   "}, ["prompt"]),
        ({"prompt": None}, ["prompt"]),
        ({"prompt": 5}, ["prompt"]),
        ({"width": 250}, ["width", "multiple of 16"]),
        ({"width": 240}, ["width", "256", "2048"]),
        ({"width": 2064}, ["width", "2048"]),
        ({"height": 1000}, ["height", "multiple of 16"]),
        ({"height": 512.5}, ["height", "whole number", "multiple of 16"]),
        ({"steps": 0}, ["steps", "1", "100"]),
        ({"steps": 101}, ["steps", "100"]),
        ({"steps": 2.5}, ["steps", "whole number"]),
        ({"steps": "many"}, ["steps", "number"]),
        ({"steps": True}, ["steps", "number"]),
        ({"guidance": -0.1}, ["guidance", "0", "30"]),
        ({"guidance": 30.5}, ["guidance", "30"]),
        ({"guidance": math.nan}, ["guidance", "finite"]),
        ({"guidance": math.inf}, ["guidance", "finite"]),
        ({"guidance": "nan"}, ["guidance", "finite"]),
        ({"num_images": 0}, ["num_images", "1", "8"]),
        ({"num_images": 9}, ["num_images", "8"]),
        ({"seed": -2}, ["seed"]),
        ({"seed": 2**53}, ["seed"]),
        ({"seed": "x"}, ["seed", "number"]),
        ({"lora_scale": 9, "lora": "a"}, ["lora_scale"]),
        ({"lora": "../../x"}, ["LoRA name", "../../x"]),
        ({"lora": "a/b"}, ["LoRA name"]),
        ({"lora": ".hidden"}, ["LoRA name"]),
        ({"lora": "a:1,a:2"}, ["twice"]),
        ({"lora": "a:big"}, ["scale of LoRA 'a'", "number"]),
        ({"lora": "a,b,c,d,e"}, ["at most 4"]),
        ({"lora": 5}, ["lora must be a string"]),
    ],
)
def test_invalid_parameters_name_the_parameter(overrides, words):
    with pytest.raises(ValueError) as info:
        validate_request(**(OK | overrides), defaults=DEV_DEFAULTS)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


@pytest.mark.parametrize(
    "defaults, expected",
    [
        (TINY_DEFAULTS, (256, 256, 4, 3.5)),
        (SCHNELL_DEFAULTS, (1024, 1024, 4, 0.0)),
        (DEV_DEFAULTS, (1024, 1024, 28, 3.5)),
    ],
)
def test_none_means_the_model_default(defaults, expected):
    req = validate_request(prompt="x", steps=None, guidance=None, width=None, height=None, defaults=defaults)
    assert (req.width, req.height, req.steps, req.guidance) == expected


def test_valid_edges_are_accepted():
    req = validate_request(
        prompt="x", width=2048, height=256, steps=100, guidance=30, num_images=8, seed=2**53 - 1,
        lora="style:0.5, detail", lora_scale=0.8, defaults=DEV_DEFAULTS,
    )
    assert req.loras == (LoraChoice("style", 0.5), LoraChoice("detail", 0.8))
    assert (req.width, req.height, req.steps, req.num_images) == (2048, 256, 100, 8)


@pytest.mark.parametrize("spec, expected", [("", ()), (None, ()), ("a", (LoraChoice("a", 1.0),)),
                                            ("a:0.25", (LoraChoice("a", 0.25),)),
                                            (" a-1.v2 : -1 , b_c ", (LoraChoice("a-1.v2", -1.0), LoraChoice("b_c", 1.0)))])
def test_lora_spec(spec, expected):
    assert parse_lora_spec(spec, 1.0) == expected


@pytest.mark.parametrize("name", ["ok", "My_Lora-v1.2", "a" * 100])
def test_good_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", ["", "..", "../x", "a b", "a:b", "a,b", ".x", "a" * 101, "ü", None])
def test_bad_names(name):
    with pytest.raises(ValueError):
        validate_name(name)


class _CountingTokenizer:
    """Stands in for a tokenizer: one token per word plus an end token."""

    def __call__(self, text, truncation=False, add_special_tokens=True):
        return {"input_ids": list(range(len(text.split()) + 1))}


def test_prompt_token_limits():
    t5 = _CountingTokenizer()
    long_prompt = " ".join(["word"] * 600)
    with pytest.raises(ValueError, match="512"):
        validate_request(prompt=long_prompt, defaults=DEV_DEFAULTS, t5_tokenizer=t5)
    req = validate_request(prompt=" ".join(["w"] * 100), defaults=DEV_DEFAULTS, t5_tokenizer=t5, clip_tokenizer=t5)
    assert any("CLIP" in note and "77" in note for note in req.notes)
