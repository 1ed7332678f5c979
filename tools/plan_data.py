"""Regenerate the data the memory plan (masuka/model/plan.py) reads.  Offline; no weight is read.

Where the data comes from
-------------------------

* ``masuka/model/configs/FLUX.1-{dev,schnell}/{transformer,text_encoder,text_encoder_2,vae}/config.json``
  are copies of the ``config.json`` files black-forest-labs publishes in those subfolders of the
  Hub repositories FLUX.1-dev and FLUX.1-schnell, written down from knowledge of those files
  because this project never reaches the Hub: the commit and date they match are unknown. The
  structural keys (layer counts, widths, vocabularies) are what the plan uses; bookkeeping keys
  (``_name_or_path``, ``_diffusers_version``, ``transformers_version``) may differ from the
  published files. See masuka/model/configs/README.md.

* ``flux1-tensors.json`` (written here): every parameter of each component, as diffusers /
  transformers build it from those configs on the meta device (no memory, no weights): name,
  shape and the class of the module that owns it (the storage rules quantize ``Linear`` weights
  only). Tied parameters (T5's ``encoder.embed_tokens`` = ``shared``) are listed once, as
  ``named_parameters()`` gives them after ``tie_weights()``.

* ``flux1-activations.json`` (written here): the working memory of each component while it runs,
  traced on the meta device: the real diffusers/transformers forward code runs on shape-only
  tensors, and a dispatch mode adds up the bytes of every tensor alive at once (weights and inputs
  excluded). Attention through ``scaled_dot_product_attention`` is counted as the flash /
  memory-efficient kernels run it on CUDA (output only, no score matrix). What the trace cannot
  see (cuDNN/cuBLAS workspaces, allocator rounding) is covered by one factor, calibrated
  against the only GPU measurement we have: the H200 run in bench/results/h200-2026-11-27.json
  (``peak_gib_schnell``: FLUX.1-schnell transformer and VAE in bf16, small stand-in text
  encoders, 1024x1024, ``torch.cuda.max_memory_allocated``).

Run ``python tools/plan_data.py`` to rewrite both files, ``--check`` to compare them with what
the installed diffusers/transformers build now (exit 1 on a difference). It takes about a
minute on two CPU cores (most of it importing and building the tiny tokenizers).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import weakref
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "masuka" / "model" / "configs"
TENSORS_FILE = CONFIGS / "flux1-tensors.json"
ACTIVATIONS_FILE = CONFIGS / "flux1-activations.json"
BENCH_RESULT = ROOT / "bench" / "results" / "h200-2026-11-27.json"

VARIANTS = ("FLUX.1-dev", "FLUX.1-schnell")
COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")
# Sizes traced: the plan scales between them (the traces are linear in tokens / pixels).
TRANSFORMER_CASES = ((512, 512, 512), (1024, 1024, 256), (1024, 1024, 512), (1536, 1536, 512))
VAE_SIZES = (512, 1024)
T5_TOKENS = (256, 512)

log = logging.getLogger("plan_data")


def read_config(variant: str, component: str) -> dict:
    return json.loads((CONFIGS / variant / component / "config.json").read_text(encoding="utf-8"))


def build_on_meta(component: str, config: dict, dtype: Any = None):
    """The component as the libraries build it from its config, on the meta device."""
    import torch
    from accelerate import init_empty_weights

    with init_empty_weights():
        if component == "transformer":
            from diffusers import FluxTransformer2DModel

            model = FluxTransformer2DModel.from_config(config)
        elif component == "vae":
            from diffusers import AutoencoderKL

            model = AutoencoderKL.from_config(config)
        elif component == "text_encoder":
            from transformers import CLIPTextConfig, CLIPTextModel

            model = CLIPTextModel(CLIPTextConfig(**config))
        elif component == "text_encoder_2":
            from transformers import T5Config, T5EncoderModel

            model = T5EncoderModel(T5Config(**config))
        else:
            raise ValueError(f"unknown component {component!r}")
    if component == "text_encoder_2":
        model.tie_weights()  # as from_pretrained does: encoder.embed_tokens is shared (outside init_empty_weights)
    if dtype is not None:
        model = model.to(dtype)
        if component == "text_encoder_2" and dtype == torch.float16:
            # transformers keeps T5's `wo` in float32 under float16 (_keep_in_fp32_modules = ["wo"]).
            for name, module in model.named_modules():
                if name.endswith(".wo"):
                    module.to(torch.float32)
    return model.eval()


def tensor_list(model) -> list[list]:
    owners = {}
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            owners[f"{module_name}.{param_name}" if module_name else param_name] = type(module).__name__
    return [[name, list(p.shape), owners[name]] for name, p in model.named_parameters()]


def tensors_data() -> dict:
    import diffusers
    import transformers

    out: dict[str, Any] = {
        "about": "Parameters of FLUX.1's components as built on the meta device from the configs beside this "
        "file: [name, shape, owning module class]. Written by tools/plan_data.py; do not edit by hand.",
        "built_with": {"diffusers": diffusers.__version__, "transformers": transformers.__version__},
        "components": {},
    }
    for variant in VARIANTS:
        for component in COMPONENTS:
            config = read_config(variant, component)
            model = build_on_meta(component, config)
            tensors = tensor_list(model)
            out["components"][f"{variant}/{component}"] = {
                "class": type(model).__name__,
                "params": sum(_numel(shape) for _, shape, _ in tensors),
                "tensors": tensors,
            }
    return out


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# ---- activation trace ------------------------------------------------------------


def _live_bytes_mode():
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveBytes(TorchDispatchMode):
        """Adds up the bytes of every tensor storage an op creates until the last tensor on it dies."""

        def __init__(self, ignore: set[int]):
            super().__init__()
            self.ignore = ignore  # storages of weights and inputs
            self.storages: dict[int, list[int]] = {}  # storage key -> [tensors alive, bytes]
            self.tracked: set[int] = set()
            self.live = 0
            self.peak = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if not isinstance(t, torch.Tensor) or id(t) in self.tracked:
                    continue
                key = t.untyped_storage()._cdata
                if key in self.ignore:
                    continue
                entry = self.storages.get(key)
                if entry is None:
                    entry = self.storages[key] = [0, t.untyped_storage().nbytes()]
                    self.live += entry[1]
                    self.peak = max(self.peak, self.live)
                entry[0] += 1
                self.tracked.add(id(t))
                weakref.finalize(t, self._release, id(t), key)
            return out

        def _release(self, tensor_id: int, key: int) -> None:
            self.tracked.discard(tensor_id)
            entry = self.storages[key]
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self.storages[key]

    return LiveBytes


def _flash_like_sdpa(*args, **kwargs):
    """Stand-in for scaled_dot_product_attention: what the flash / memory-efficient kernels allocate (the output)."""
    query = kwargs.get("query", args[0] if args else None)
    value = kwargs.get("value", args[2] if len(args) > 2 else None)
    return query.new_empty(query.shape[:-1] + (value.shape[-1],))


def trace_peak(model, inputs: list, call: Callable[[], Any]) -> int:
    """Peak bytes of activations alive at once while ``call`` runs ``model`` on meta tensors."""
    import torch

    ignore = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers(), *inputs]}
    real_sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = _flash_like_sdpa
    try:
        with torch.no_grad(), _live_bytes_mode()(ignore) as mode:
            result = call()
            del result
    finally:
        torch.nn.functional.scaled_dot_product_attention = real_sdpa
    return mode.peak


def trace_transformer(model, width: int, height: int, text_tokens: int, dtype) -> int:
    import torch

    n = (width // 16) * (height // 16)
    kw = {
        "hidden_states": torch.empty(1, n, model.config.in_channels, device="meta", dtype=dtype),
        "encoder_hidden_states": torch.empty(1, text_tokens, model.config.joint_attention_dim, device="meta", dtype=dtype),
        "pooled_projections": torch.empty(1, model.config.pooled_projection_dim, device="meta", dtype=dtype),
        "timestep": torch.empty(1, device="meta", dtype=dtype),
        "img_ids": torch.empty(n, 3, device="meta", dtype=dtype),
        "txt_ids": torch.empty(text_tokens, 3, device="meta", dtype=dtype),
    }
    if model.config.guidance_embeds:
        kw["guidance"] = torch.empty(1, device="meta", dtype=dtype)
    return trace_peak(model, list(kw.values()), lambda: model(**kw, return_dict=False))


def trace_vae_decode(model, width: int, height: int, dtype) -> int:
    import torch

    z = torch.empty(1, model.config.latent_channels, height // 8, width // 8, device="meta", dtype=dtype)
    return trace_peak(model, [z], lambda: model.decode(z, return_dict=False))


def trace_text_encoder(model, tokens: int) -> int:
    import torch

    ids = torch.zeros(1, tokens, dtype=torch.long, device="meta")
    return trace_peak(model, [ids], lambda: model(input_ids=ids, output_hidden_states=False))


def activations_data(tensors: dict) -> dict:
    import diffusers
    import torch
    import transformers

    out: dict[str, Any] = {
        "about": "Working memory (bytes of activations alive at once) of each FLUX.1 component while it runs, traced "
        "on the meta device with the installed diffusers/transformers forward code; scaled_dot_product_attention "
        "counted as flash/memory-efficient attention (no score matrix). Batch 1. Written by tools/plan_data.py.",
        "built_with": {"diffusers": diffusers.__version__, "transformers": transformers.__version__,
                       "torch": torch.__version__},
    }
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        rows: dict[str, list] = {"transformer": [], "vae_decode": [], "text_encoder_2": [], "text_encoder": []}
        transformer = build_on_meta("transformer", read_config("FLUX.1-dev", "transformer"), dtype)
        for width, height, text_tokens in TRANSFORMER_CASES:
            peak = trace_transformer(transformer, width, height, text_tokens, dtype)
            rows["transformer"].append({"width": width, "height": height, "text_tokens": text_tokens, "peak_bytes": peak})
        vae = build_on_meta("vae", read_config("FLUX.1-dev", "vae"), dtype)
        for size in VAE_SIZES:
            rows["vae_decode"].append({"width": size, "height": size, "peak_bytes": trace_vae_decode(vae, size, size, dtype)})
        t5 = build_on_meta("text_encoder_2", read_config("FLUX.1-dev", "text_encoder_2"), dtype)
        for tokens in T5_TOKENS:
            rows["text_encoder_2"].append({"tokens": tokens, "peak_bytes": trace_text_encoder(t5, tokens)})
        clip = build_on_meta("text_encoder", read_config("FLUX.1-dev", "text_encoder"), dtype)
        rows["text_encoder"].append({"tokens": 77, "peak_bytes": trace_text_encoder(clip, 77)})
        out[dtype_name] = rows
        log.info("traced %s", dtype_name)
    out["calibration"] = calibration(tensors, out["bf16"])
    return out


def stand_in_encoder_params() -> int:
    """Parameters of the small random text encoders bench/bench.py builds (with the tiny model's tokenizers)."""
    sys.path.insert(0, str(ROOT))
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel
    from accelerate import init_empty_weights

    from masuka.model.tiny import build_tiny_components

    tiny = build_tiny_components()
    with init_empty_weights():
        t5 = T5EncoderModel(T5Config(vocab_size=len(tiny["tokenizer_2"]), d_model=4096, d_kv=64, d_ff=1024, num_layers=1,
                                     num_heads=4, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
                                     is_encoder_decoder=False, use_cache=False))
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(tiny["tokenizer"]), hidden_size=768, intermediate_size=1024,
                                            projection_dim=768, num_hidden_layers=1, num_attention_heads=4,
                                            max_position_embeddings=77, hidden_act="quick_gelu"))
    t5.tie_weights()
    return sum(p.numel() for p in t5.parameters()) + sum(p.numel() for p in clip.parameters())


def calibration(tensors: dict, bf16: dict) -> dict:
    """The one factor for what the trace cannot see, from the H200 measurement (schnell, bf16, 1024x1024)."""
    measured = json.loads(BENCH_RESULT.read_text(encoding="utf-8"))["peak_gib_schnell"] * 2**30
    comps = tensors["components"]
    stand_ins = stand_in_encoder_params()
    weights = 2 * (comps["FLUX.1-schnell/transformer"]["params"] + comps["FLUX.1-schnell/vae"]["params"] + stand_ins)
    transformer = next(r["peak_bytes"] for r in bf16["transformer"] if r["width"] == 1024 and r["text_tokens"] == 256)
    vae = next(r["peak_bytes"] for r in bf16["vae_decode"] if r["width"] == 1024)
    traced = max(transformer, vae)
    return {
        "source": "bench/results/h200-2026-11-27.json peak_gib_schnell (torch.cuda.max_memory_allocated, NVIDIA H200, "
        "torch 2.11.0+cu130, diffusers 0.42.1): FLUX.1-schnell transformer + FLUX VAE in bf16 with small stand-in "
        "text encoders, 1024x1024, 4 steps, max_sequence_length 256",
        "measured_peak_bytes": int(measured),
        "weights_bytes": weights,
        "stand_in_encoder_params": stand_ins,
        "traced_working_bytes": traced,
        "factor": (measured - weights) / traced,
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the stored files instead of writing them")
    args = parser.parse_args(argv)
    tensors = tensors_data()
    activations = activations_data(tensors)
    if args.check:
        stale = [path.name for path, data in ((TENSORS_FILE, tensors), (ACTIVATIONS_FILE, activations))
                 if _strip(json.loads(path.read_text(encoding="utf-8"))) != _strip(data)]
        for name in stale:
            log.error("%s differs from what the installed libraries build: run python tools/plan_data.py", name)
        return 1 if stale else 0
    TENSORS_FILE.write_text(json.dumps(tensors, separators=(",", ":")) + "\n", encoding="utf-8")
    ACTIVATIONS_FILE.write_text(json.dumps(activations, indent=1) + "\n", encoding="utf-8")
    log.info("wrote %s and %s", TENSORS_FILE.relative_to(ROOT), ACTIVATIONS_FILE.relative_to(ROOT))
    return 0


def _strip(data: dict) -> dict:
    """Library versions aside: the same numbers from another release are not a difference."""
    return {k: v for k, v in data.items() if k != "built_with"}


if __name__ == "__main__":
    sys.exit(main())
