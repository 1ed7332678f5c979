"""The built-in tiny FLUX pipeline: random weights, built locally, no download.

``ensure_tiny_model(models_dir)`` writes a complete diffusers folder (the same
layout as ``black-forest-labs/FLUX.1-dev``) that ``FluxPipeline.from_pretrained``
loads like any real model. It is the default model of the app and the model all
tests run on, so it is tiny (about 0.3 M parameters in all), fast on CPU and
bit-for-bit reproducible: every build gives the same weights and tokenizers.

What is real about it: the component classes, the latent layout (16 latent
channels, VAE scale factor 8, 2x2 packing, so 64 transformer input channels),
guidance embedding like FLUX.1-dev, the tokenizers' special tokens and lengths
(CLIP 77, T5 512) and the scheduler config. What is not: the weights (random)
and the vocabularies (small, built from a short built-in English text).

Importing this module is cheap: torch, diffusers and transformers are only
imported when a build actually happens.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from filelock import FileLock

from masuka.settings import TINY_MODEL_ID

logger = logging.getLogger(__name__)

TINY_MODEL_VERSION = "1"

MARKER_FILE = "masuka_tiny.json"
LOCK_NAME = "tiny-flux.lock"
BUILD_SEED = 20240801

COMPONENTS = (
    "transformer",
    "vae",
    "text_encoder",
    "text_encoder_2",
    "tokenizer",
    "tokenizer_2",
    "scheduler",
)

# Values of the real FLUX.1 checkpoints that the tiny model copies.
VAE_SCALING_FACTOR = 0.3611
VAE_SHIFT_FACTOR = 0.0609
SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512

# Small channel/width numbers: the whole model is about 0.3 M parameters.
_HIDDEN = 32  # CLIP hidden size == T5 d_model == joint/pooled projection dims

# Built-in English text the tokenizer vocabularies are made from. Words in it
# become single tokens; anything else falls back to characters (CLIP: bytes),
# so every prompt still tokenizes, and different prompts give different ids.
_CORPUS = """
a photo of a cat sitting on a wooden table next to a window with soft morning light
a portrait of a woman with long red hair wearing a blue dress in a garden full of flowers
an old man with a white beard reading a book by the fireplace in a cozy room
a dog running on the beach at sunset with waves and golden sky
a futuristic city at night with neon lights, flying cars and tall glass buildings
a mountain landscape with a lake, pine trees, snow and clouds, highly detailed
a close up of a red rose with water drops, macro photography, shallow depth of field
an astronaut riding a horse on the moon, digital art, cinematic lighting
a bowl of fresh fruit: apples, oranges, bananas and grapes on a kitchen counter
a small house in the forest covered in snow, warm light in the windows, winter
a castle on a hill under a starry sky, fantasy painting, dramatic colors
a young boy and a girl playing in the park with a ball, summer day, happy
a black and white street photograph of people walking in the rain with umbrellas
an oil painting of a ship in a storm at sea, big waves, dark clouds
a cute robot holding a flower, 3d render, studio lighting, pastel colors
a bird flying over a green field, blue sky, wide angle, high resolution
a cup of coffee and a croissant on a marble table in a cafe in paris
a dragon breathing fire over a medieval village, epic, concept art
a watercolor illustration of a fox in the autumn woods with orange leaves
a sports car driving fast on a desert road, motion blur, dust, 8k
a bright yellow sunflower field under a clear sky in the south of france
portrait photo, studio, 85mm lens, sharp focus, natural skin, smiling face
the quick brown fox jumps over the lazy dog and the cat is asleep
one two three four five six seven eight nine ten big small tall short
red orange yellow green blue purple pink brown black white gray silver gold
anime style character with big eyes, manga, vibrant, detailed background
logo design, minimal, flat, vector, simple shapes, clean lines, icon
his her their our my your this that these those is are was were be being
in on at by for from to into over under between behind above below near
very beautiful masterpiece best quality ultra realistic photorealistic
""".strip()


# --------------------------------------------------------------------------
# Paths and the on-disk build
# --------------------------------------------------------------------------


def tiny_model_dir(models_dir: Path) -> Path:
    """The folder the tiny model of the current recipe version lives in."""
    return Path(models_dir) / f"tiny-flux-v{TINY_MODEL_VERSION}"


def _temp_prefix() -> str:
    return f".tiny-flux-v{TINY_MODEL_VERSION}-build-"


def _is_complete(folder: Path) -> bool:
    """True when ``folder`` holds a finished build of this recipe version."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or marker.get("version") != TINY_MODEL_VERSION:
        return False
    if not (folder / "model_index.json").is_file():
        return False
    return all((folder / name).is_dir() and any((folder / name).iterdir()) for name in COMPONENTS)


def ensure_tiny_model(models_dir: Path) -> Path:
    """Return the folder of the built-in tiny model, building it once if needed.

    Safe with several processes starting at once on a fresh home: the build
    runs under a file lock into a temporary folder that is renamed into place
    only when complete, so nobody ever sees a half-built model.
    """
    models_dir = Path(models_dir)
    target = tiny_model_dir(models_dir)
    if _is_complete(target):
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(models_dir / LOCK_NAME)):
        if _is_complete(target):
            return target
        _remove_stale(models_dir, target)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=models_dir))
        try:
            _save_tiny_model(tmp)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("Built-in tiny model ready at %s", target)
    return target


def _remove_stale(models_dir: Path, target: Path) -> None:
    """Remove leftovers of crashed builds; only called while holding the lock."""
    for leftover in models_dir.glob(_temp_prefix() + "*"):
        logger.warning("Removing leftover of an interrupted tiny model build: %s", leftover)
        shutil.rmtree(leftover, ignore_errors=True)
    if target.exists():
        # Incomplete or from a tampered folder: move aside atomically, then delete.
        trash = Path(tempfile.mkdtemp(prefix=_temp_prefix(), dir=models_dir))
        logger.warning("Rebuilding incomplete tiny model folder %s", target)
        os.replace(target, trash / "old")
        shutil.rmtree(trash, ignore_errors=True)


def _save_tiny_model(folder: Path) -> None:
    """Build the components and write a complete diffusers layout into ``folder``."""
    from diffusers import FluxPipeline

    logger.info("Building the built-in tiny FLUX model (random weights) in %s", folder)
    components = build_tiny_components()
    pipe = FluxPipeline(**components)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    marker = {
        "demo": True,
        "description": "MASUKA built-in demo model: random weights",
        "model_id": TINY_MODEL_ID,
        "version": TINY_MODEL_VERSION,
    }
    # Written last: its presence (with the right version) means "complete".
    (folder / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------


def build_tiny_components() -> dict:
    """Build all pipeline components in memory, deterministically, in eval mode."""
    import torch

    tokenizer = _build_clip_tokenizer()
    tokenizer_2 = _build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(BUILD_SEED)
        text_encoder = _build_clip_text_model(tokenizer)
        text_encoder_2 = _build_t5_encoder(tokenizer_2)
        transformer = _build_transformer()
        vae = _build_vae()
    scheduler = _build_scheduler()
    return {
        "transformer": transformer,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


_TRANSFORMER_WEIGHT_SCALES = {
    "time_text_embed.text_embedder.": 4.0,
    "time_text_embed.guidance_embedder.": 4.0,
    "proj_out.": 2.0,
}


def _build_transformer():
    import torch
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,  # 16 latent channels packed 2x2
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_HIDDEN,
        pooled_projection_dim=_HIDDEN,
        guidance_embeds=True,
        axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
    )
    # With default init the pooled-text and guidance embeddings barely move the
    # output; scale them up so prompt and guidance visibly change the image.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not name.endswith("weight"):
                continue
            for prefix, factor in _TRANSFORMER_WEIGHT_SCALES.items():
                if name.startswith(prefix):
                    param.mul_(factor)
    return model.eval()


def _build_vae():
    from diffusers import AutoencoderKL

    model = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),  # 4 entries: scale factor 2**3 == 8
        layers_per_block=1,
        act_fn="silu",
        latent_channels=16,
        norm_num_groups=4,
        sample_size=256,
        scaling_factor=VAE_SCALING_FACTOR,
        shift_factor=VAE_SHIFT_FACTOR,
        force_upcast=True,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )
    return model.eval()


def _build_clip_text_model(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_HIDDEN,
        intermediate_size=2 * _HIDDEN,
        projection_dim=_HIDDEN,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config).eval()


def _build_t5_encoder(tokenizer_2):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer_2),
        d_model=_HIDDEN,
        d_kv=16,
        d_ff=2 * _HIDDEN,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",  # T5 v1.1 like the real FLUX text encoder
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=tokenizer_2.pad_token_id,
        eos_token_id=tokenizer_2.eos_token_id,
        decoder_start_token_id=tokenizer_2.pad_token_id,
    )
    return T5EncoderModel(config).eval()


def _build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)


# --------------------------------------------------------------------------
# Tokenizers (built from _CORPUS, deterministic, no files needed)
# --------------------------------------------------------------------------

_CLIP_BOS = "<|startoftext|>"
_CLIP_EOS = "<|endoftext|>"
_CLIP_MAX_MERGES = 4000


def _byte_alphabet() -> list[str]:
    """The 256 byte-level characters, in GPT-2/CLIP byte order."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _learn_bpe(words: Counter) -> list[tuple[str, str]]:
    """Plain BPE on ``words`` (byte-level strings); ties broken by the pair itself."""
    seqs: dict[tuple[str, ...], int] = {}
    for word, count in words.items():
        symbols = list(word)
        symbols[-1] += "</w>"
        key = tuple(symbols)
        seqs[key] = seqs.get(key, 0) + count
    merges: list[tuple[str, str]] = []
    active = {k: v for k, v in seqs.items() if len(k) > 1}
    while active and len(merges) < _CLIP_MAX_MERGES:
        pairs: Counter = Counter()
        for symbols, count in active.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merges.append(best)
        merged = best[0] + best[1]
        new_active: dict[tuple[str, ...], int] = {}
        for symbols, count in active.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and symbols[i] == best[0] and symbols[i + 1] == best[1]:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            if len(out) > 1:
                key = tuple(out)
                new_active[key] = new_active.get(key, 0) + count
        active = new_active
    return merges


def _build_clip_tokenizer():
    """A byte-level BPE CLIP tokenizer: corpus words are single tokens, any text works."""
    from transformers import CLIPTokenizer

    # Let CLIP's own normalizer and pre-tokenizer cut the corpus into words.
    splitter = CLIPTokenizer(vocab={_CLIP_BOS: 0, _CLIP_EOS: 1}, merges=[], model_max_length=CLIP_MAX_LENGTH)
    backend = splitter.backend_tokenizer
    words: Counter = Counter()
    for line in _CORPUS.splitlines():
        normalized = backend.normalizer.normalize_str(line)
        for word, _span in backend.pre_tokenizer.pre_tokenize_str(normalized):
            words[word] += 1
    merges = _learn_bpe(words)

    alphabet = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet] + [a + b for a, b in merges]:
        if token not in vocab:
            vocab[token] = len(vocab)
    # Like the real CLIP vocabulary: the special tokens come last.
    vocab[_CLIP_BOS] = len(vocab)
    vocab[_CLIP_EOS] = len(vocab)
    return CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        model_max_length=CLIP_MAX_LENGTH,
    )


def _build_t5_tokenizer():
    """A SentencePiece-Unigram T5 tokenizer: corpus words whole, else characters."""
    from transformers import T5Tokenizer

    words: Counter = Counter(re.findall(r"[A-Za-z]+|[0-9]|[^\sA-Za-z0-9]", _CORPUS))
    total = sum(words.values())
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for word, count in sorted(words.items(), key=lambda item: (-item[1], item[0])):
        score = math.log(count / total)
        add("\u2581" + word, score)
        if word.isalpha():
            add("\u2581" + word.capitalize(), score - 1.0)
            add(word, score - 1.0)
    # Character fallback: printable ASCII and Latin-1, each on its own.
    for code in list(range(0x21, 0x7F)) + list(range(0xA1, 0x100)):
        add(chr(code), -20.0)
    return T5Tokenizer(
        vocab=pieces,
        extra_ids=0,
        model_max_length=T5_MAX_LENGTH,
    )
