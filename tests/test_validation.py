"""Every bound on a generation request, table-driven."""

from __future__ import annotations

import math

import pytest

from masuka.lora.types import validate_name
from masuka.model.defaults import DEV_DEFAULTS, SCHNELL_DEFAULTS, TINY_DEFAULTS
from masuka.core.requests import (
    MAX_SEED,
    PROMPT_MAX_CHARS,
    LoraChoice,
    parse_lora_spec,
    settings_from_metadata,
    validate_request,
)
from masuka.store.imagefiles import parse_metadata_json

OK = dict(prompt="a red fox in snow")


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"prompt": ""}, ["prompt"]),
        ({"prompt": "   "}, ["prompt"]),
        ({"prompt": None}, ["prompt"]),
        ({"prompt": 5}, ["prompt"]),
        ({"prompt": "x" * 1_000_000}, ["prompt is 1000000 characters; the limit is 4000"]),
        ({"prompt": "\U0001f98a" * 4001}, ["prompt is 4001 characters; the limit is 4000"]),
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
        ({"seed": 10**400}, ["seed", "finite", "401-digit number"]),  # was an OverflowError
        ({"seed": 10**5000}, ["seed", "finite", "5001-digit number"]),  # repr() of it raises
        ({"steps": [[[[1]]]]}, ["steps", "a list of 1 item"]),
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


def test_prompt_at_the_character_limit_is_accepted_and_no_tokenizer_sees_a_longer_one():
    seen: list[int] = []

    class Recording(_CountingTokenizer):
        def __call__(self, text, **kw):
            seen.append(len(text))
            return super().__call__(text, **kw)

    assert validate_request(prompt="a" * PROMPT_MAX_CHARS, t5_tokenizer=Recording()).prompt == "a" * PROMPT_MAX_CHARS
    with pytest.raises(ValueError, match="the limit is 4000"):
        validate_request(prompt="a" * (PROMPT_MAX_CHARS + 1), t5_tokenizer=Recording())
    assert seen == [PROMPT_MAX_CHARS]


# ---- settings dropped in from an image (PNG metadata), every hostile payload of the test
GOOD_META = {
    "prompt": "a fox", "seed": 42, "steps": 9, "guidance": 2.5, "width": 512, "height": 768,
    "loras": [{"name": "ink", "scale": 0.5}, {"name": "film-grain"}], "job_id": "j1", "model": "m",
}
GOOD_FIELDS = {
    "prompt": "a fox", "seed": 42, "steps": 9, "guidance": 2.5, "width": 512, "height": 768,
    "loras": [("ink", 0.5), ("film-grain", 1.0)], "num_images": 1, "speed": "exact",
}
DEFAULT_FIELDS = {"prompt": "", "seed": -1, "steps": 28, "guidance": 3.5, "width": 1024, "height": 1024,
                  "loras": [], "num_images": 1, "speed": "exact"}


def _deep(depth: int) -> list:
    value: list = []
    for _ in range(depth):
        value = [value]
    return value


SEED_RULE = f"seed must be a whole number from 0 to {MAX_SEED}"
HOSTILE_SETTINGS = [
    ("seed 1e400 as read", {"seed": "1e400"}, {"seed": -1}, ["seed '1e400' dropped", SEED_RULE, "random seed"]),
    ("seed inf", {"seed": math.inf}, {"seed": -1}, ["seed inf dropped", SEED_RULE]),
    ("seed NaN as read", {"seed": "NaN"}, {"seed": -1}, ["seed 'NaN' dropped", SEED_RULE]),
    ("seed nan", {"seed": math.nan}, {"seed": -1}, ["seed nan dropped"]),
    ("seed abc", {"seed": "abc"}, {"seed": -1}, ["seed 'abc' dropped", SEED_RULE]),
    ("seed 10**30", {"seed": 10**30}, {"seed": -1}, ["seed 1000000000000000000000000000000 dropped"]),
    ("seed 10**5000", {"seed": 10**5000}, {"seed": -1}, ["seed a 5001-digit number dropped"]),
    ("seed 2**53", {"seed": 2**53}, {"seed": -1}, [SEED_RULE]),
    ("seed -1", {"seed": -1}, {"seed": -1}, [SEED_RULE]),
    ("seed 2.5", {"seed": 2.5}, {"seed": -1}, [SEED_RULE]),
    ("seed true", {"seed": True}, {"seed": -1}, ["seed True dropped"]),
    ("seed nested", {"seed": _deep(100_000)}, {"seed": -1}, ["seed a list of 1 item dropped"]),
    ("seed object", {"seed": {"a": 1}}, {"seed": -1}, ["seed an object with 1 key dropped"]),
    ("loras [1, 2]", {"loras": [1, 2]}, {"loras": []}, ["LoRA entry 1 (1) dropped", "LoRA entry 2 (2) dropped"]),
    ("loras a string", {"loras": "ink:0.5"}, {"loras": []}, ["loras 'ink:0.5' dropped", "must be a list"]),
    ("LoRA path", {"loras": [{"name": "../../etc/passwd", "scale": 99}]}, {"loras": []},
     ["LoRA '../../etc/passwd' dropped", "letters, digits"]),
    ("LoRA scale 99", {"loras": [{"name": "ink", "scale": 99}, {"name": "ok", "scale": -4}]},
     {"loras": [("ok", -4.0)]}, ["LoRA 'ink' at scale 99 dropped", "from -4 to 4"]),
    ("LoRA scale NaN", {"loras": [{"name": "ink", "scale": "NaN"}]}, {"loras": []}, ["scale 'NaN' dropped"]),
    ("LoRA name nested", {"loras": [{"name": _deep(100_000), "scale": 1}]}, {"loras": []}, ["a list of 1 item"]),
    ("LoRA twice", {"loras": [{"name": "a"}, {"name": "a", "scale": 2}]}, {"loras": [("a", 1.0)]}, ["twice"]),
    ("five LoRAs", {"loras": [{"name": n} for n in "abcde"]}, {"loras": [(n, 1.0) for n in "abcd"]},
     ["LoRA 'e' dropped: at most 4"]),
    ("30000 bad LoRAs", {"loras": [1] * 30000}, {"loras": []}, ["and 29992 more LoRA entries dropped"]),
    ("steps 0", {"steps": 0}, {"steps": 28}, ["steps 0 dropped", "from 1 to 100", "default 28"]),
    ("steps 101", {"steps": 101}, {"steps": 28}, ["steps 101 dropped"]),
    ("steps list", {"steps": [1, 2]}, {"steps": 28}, ["steps a list of 2 items dropped"]),
    ("width 257", {"width": 257}, {"width": 1024}, ["width 257 dropped", "multiple of 16", "default 1024"]),
    ("height 10**30", {"height": 10**30}, {"height": 1024}, ["height 1000000000000000000000000000000 dropped"]),
    ("guidance 1e400", {"guidance": "1e400"}, {"guidance": 3.5}, ["guidance '1e400' dropped", "0 to 30"]),
    ("guidance -1", {"guidance": -1}, {"guidance": 3.5}, ["guidance -1 dropped"]),
    ("prompt 1 MB", {"prompt": "x" * 1_000_000}, {"prompt": ""},
     ["prompt 'xxxx", "(1000000 characters) dropped", "at most 4000 characters"]),
    ("prompt a number", {"prompt": 5}, {"prompt": ""}, ["prompt 5 dropped"]),
    ("prompt blank", {"prompt": "   "}, {"prompt": ""}, ["prompt '   ' dropped"]),
]


@pytest.mark.parametrize("name, overrides, changed, words", HOSTILE_SETTINGS, ids=[r[0] for r in HOSTILE_SETTINGS])
def test_hostile_image_settings_are_dropped_with_a_reason(name, overrides, changed, words):
    fields, messages = settings_from_metadata(GOOD_META | overrides, DEV_DEFAULTS)
    assert fields == GOOD_FIELDS | changed
    text = "\n".join(messages)
    for word in words:
        assert word in text, (word, text)
    assert len(messages) <= 9


@pytest.mark.parametrize("meta", [None, [1, 2], "x", 5, math.nan, _deep(100_000)])
def test_settings_that_are_not_an_object_give_the_defaults(meta):
    fields, messages = settings_from_metadata(meta, DEV_DEFAULTS)
    assert fields == DEFAULT_FIELDS
    assert messages == ["the settings in this image are not a JSON object; nothing was loaded"]


def test_good_settings_pass_unchanged_and_every_valid_field_is_a_valid_request():
    fields, messages = settings_from_metadata(GOOD_META, DEV_DEFAULTS)
    assert (fields, messages) == (GOOD_FIELDS, [])
    spec = ",".join(f"{name}:{scale:g}" for name, scale in fields["loras"])
    req = validate_request(**{k: v for k, v in fields.items() if k != "loras"}, lora=spec)
    assert req.seed == 42 and req.loras == (LoraChoice("ink", 0.5), LoraChoice("film-grain", 1.0))
    missing, notes = settings_from_metadata({"prompt": "p"}, TINY_DEFAULTS)
    assert missing == {**DEFAULT_FIELDS, "prompt": "p", "steps": 4, "width": 256, "height": 256} and notes == []


def test_chunk_text_of_the_hostile_test_loads_as_far_as_it_is_valid():
    raw = (
        '{"prompt": "p", "seed": 1e400, "steps": 0, "guidance": NaN, "width": 257, "height": 512,'
        ' "loras": [1, {"name": "../../etc/passwd", "scale": 99}, {"name": "ink", "scale": 0.75}]}'
    )
    fields, messages = settings_from_metadata(parse_metadata_json(raw), SCHNELL_DEFAULTS)
    assert fields == {"prompt": "p", "seed": -1, "steps": 4, "guidance": 0.0, "width": 1024, "height": 512,
                      "loras": [("ink", 0.75)], "num_images": 1, "speed": "exact"}
    assert [m.split(" dropped")[0] for m in messages] == [
        "seed '1e400'", "steps 0", "guidance 'NaN'", "width 257", "LoRA entry 1 (1)", "LoRA '../../etc/passwd'",
    ]
