"""The memory plan: what a FLUX.1 pipeline puts on the GPU and in RAM, before any weight is read.

Every figure is derived, none is typed in:

* **Weights** come from the parameters of each component as diffusers / transformers build it
  from FLUX.1's published configs (``configs/``, copied there; ``configs/flux1-tensors.json`` lists
  every tensor, built on the meta device by ``tools/plan_data.py``), and from the storage rules of
  each form the app loads:

  - dense ``bf16`` / ``fp16`` / ``fp32``: 2 / 2 / 4 bytes a parameter, except T5's ``wo`` layers,
    which transformers keeps in float32 under float16 (``T5PreTrainedModel._keep_in_fp32_modules``);
  - ``nf4`` (bitsandbytes 4-bit, as diffusers quantizes FLUX's transformer): every ``nn.Linear``
    weight in 4 bits plus one float32 absmax per 64 weights (no double quantization: the app's
    ``BitsAndBytesConfig`` leaves it off); diffusers skips no Linear of FLUX
    (``llm_int8_skip_modules`` is empty and FluxTransformer2DModel has no ``_keep_in_fp32_modules``);
    biases and norms stay in the compute dtype;
  - ``int8`` (bitsandbytes LLM.int8, T5): int8 ``nn.Linear`` weights plus one float32 scale per
    output row, except ``wo``, which transformers never converts (its ``_keep_in_fp32_modules`` go
    into ``modules_to_not_convert``): float32 under float16, bf16 under bf16;
  - ``gguf:<type>`` (a city96 GGUF transformer): each tensor in the type city96's tools give it
    (ComfyUI-GGUF ``tools/convert.py`` and ``tools/lcpp.patch``): 1-D tensors (biases, norm
    scales) F32; ``img_in``, ``time_in/vector_in/guidance_in.in_layer`` and ``final_layer.linear``
    F32; ``txt_in``, the other ``*_in`` layers and ``final_layer.adaLN_modulation`` F16; every other
    weight the file's type (Q4_K_S -> Q4_K, 144 bytes per 256 weights; Q8_0: 34 per 32; ...), F16
    where a row does not split into whole blocks. In memory diffusers keeps the quantized tensors
    as they are and casts the F32/F16 ones to the compute dtype.

* **Working memory** (activations) was traced on the meta device running the libraries' own
  forward code (``configs/flux1-activations.json``), with attention counted as the flash /
  memory-efficient SDPA kernels run it (no score matrix). It is linear in the tokens
  (transformer: sequence (h/16)(w/16) + text tokens, hidden 3072) and in the pixels (VAE
  decode: three 256-channel full-size tensors at once). One factor (~1.6) covers what a trace
  cannot see (cuDNN/cuBLAS workspaces, allocator rounding); it is calibrated on the one GPU
  measurement we have (H200, bench/results/h200-2026-11-27.json).

* **Fixed costs**: the CUDA context (~0.5 GiB on the GPU, outside torch's allocator) and the
  process (Python, torch with CUDA, diffusers, transformers, gradio; the Colab runtime's own
  processes) in RAM (~2.5 GiB). Both are estimates, stated as such.

Placements: ``gpu`` (every weight on the GPU), ``model offload`` (diffusers' model CPU offload:
all weights in RAM, each component on the GPU while it runs), ``sequential`` (sequential CPU
offload: all weights in RAM, one layer at a time on the GPU). Loading: with ``--memory full`` the
weights go straight to the GPU (``device_map``); bitsandbytes quantizes straight onto the GPU;
everything else, and every GGUF file (diffusers copies the whole file into RAM), is read into
RAM first. Reading a safetensors file also fills the page cache, which the kernel drops under
pressure: not counted.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from masuka.model.defaults import DEV_DEFAULTS, SCHNELL_DEFAULTS

GiB = 1024**3
GB = 10**9

CONFIGS = Path(__file__).resolve().parent / "configs"
TENSORS_FILE = CONFIGS / "flux1-tensors.json"
ACTIVATIONS_FILE = CONFIGS / "flux1-activations.json"

FLUX_DEV, FLUX_SCHNELL = "FLUX.1-dev", "FLUX.1-schnell"
PARTS = ("transformer", "text_encoder_2", "text_encoder", "vae")
PART_LABELS = {"transformer": "transformer", "text_encoder_2": "T5-XXL (text_encoder_2)",
               "text_encoder": "CLIP-L (text_encoder)", "vae": "VAE"}

# Outside torch's allocator: CUDA context, cuBLAS/cuDNN handles and their kernels (CUDA 12 with
# lazy module loading: ~0.3-0.5 GiB on T4/A100-class cards, by common report; not measured here).
CUDA_CONTEXT = GiB // 2
# Resident set of the process before any weight: 0.53 GiB measured here for python + torch (CPU
# build) + diffusers + transformers + gradio + masuka, ~1 GiB more for torch's CUDA runtime in host
# memory, ~1 GiB for the Colab runtime's own processes. An estimate.
PROCESS_RAM = int(2.5 * GiB)

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
DTYPE_NAMES = {"torch.float32": "fp32", "torch.bfloat16": "bf16", "torch.float16": "fp16",
               "float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}

# GGML storage: (weights per block, bytes per block) -- ggml's block_q* structs.
GGML_TYPES = {
    "F32": (1, 4), "F16": (1, 2), "BF16": (1, 2),
    "Q8_0": (32, 34), "Q5_1": (32, 24), "Q5_0": (32, 22), "Q4_1": (32, 20), "Q4_0": (32, 18),
    "Q6_K": (256, 210), "Q5_K": (256, 176), "Q4_K": (256, 144), "Q3_K": (256, 110),
}
# A file's type -> the type llama-quantize gives the weights no rule names (for FLUX's tensor
# names none of llama.cpp's per-layer rules apply, so the K_S files are uniform).
GGUF_FILE_TYPES = {
    "F16": "F16", "BF16": "BF16", "Q8_0": "Q8_0", "Q6_K": "Q6_K", "Q5_K_S": "Q5_K", "Q5_1": "Q5_1",
    "Q5_0": "Q5_0", "Q4_K_S": "Q4_K", "Q4_1": "Q4_1", "Q4_0": "Q4_0", "Q3_K_S": "Q3_K",
}
# city96's lcpp.patch, FLUX names as diffusers spells them.
GGUF_KEEP_F32 = ("x_embedder.", "time_text_embed.timestep_embedder.linear_1.",
                 "time_text_embed.text_embedder.linear_1.", "time_text_embed.guidance_embedder.linear_1.", "proj_out.")
GGUF_KEEP_F16 = ("context_embedder.", "time_text_embed.timestep_embedder.linear_2.",
                 "time_text_embed.text_embedder.linear_2.", "time_text_embed.guidance_embedder.linear_2.",
                 "norm_out.linear.")
NF4_BLOCK = 64  # bitsandbytes' default 4-bit blocksize

PLACEMENTS = ("gpu", "model offload", "sequential")
PLACEMENT_WORDS = {"gpu": "every weight on the GPU", "model offload": "model CPU offload",
                   "sequential": "sequential CPU offload"}


# ---- machines ----------------------------------------------------------------------


@dataclass(frozen=True)
class GpuSpec:
    name: str  # what --plan takes
    label: str
    total_bytes: int  # GPU memory as torch reports it (total_memory)
    capability: tuple[int, int]
    ram_bytes: int  # the runtime's system RAM
    ram_source: str = ""
    measured: str = ""  # what was measured on this GPU, if anything

    @property
    def dtype(self) -> str:
        """What --dtype auto runs: bf16 from compute capability 8.0, else fp16 (settings.resolve_device_dtype)."""
        return "bf16" if self.capability >= (8, 0) else "fp16"


# Colab's runtime RAM as the Colab resource panel shows it ("System RAM 12.7 GB", which psutil
# reads as 12.7 GiB). GPU memory as torch.cuda.get_device_properties().total_memory reports it.
GPUS: dict[str, GpuSpec] = {g.name: g for g in (
    GpuSpec("t4", "NVIDIA T4 (Colab)", 15_828_320_256, (7, 5), int(12.7 * GiB),
            "Colab standard runtime, 12.7 GB"),
    GpuSpec("l4", "NVIDIA L4 (Colab)", int(22.5 * GiB), (8, 9), int(53 * GiB), "Colab L4 runtime, 53 GB"),
    GpuSpec("a100-40", "NVIDIA A100 40GB (Colab)", int(39.4 * GiB), (8, 0), int(83.5 * GiB),
            "Colab A100 runtime, 83.5 GB"),
    GpuSpec("a100-80", "NVIDIA A100 80GB", int(79.2 * GiB), (8, 0), int(167 * GiB),
            "assumed 167 GB: no published Colab figure could be checked offline"),
    GpuSpec("h100", "NVIDIA H100 80GB (Colab)", int(79.6 * GiB), (9, 0), int(220 * GiB),
            "assumed 220 GB: no published Colab figure could be checked offline"),
    GpuSpec("h200", "NVIDIA H200 (bench machine)", int(139.7 * GiB), (9, 0), 128 * GiB,
            "the bench machine, 128 GiB",
            measured="peak 24.8 GiB allocated for FLUX.1-schnell transformer + VAE in bf16 at 1024x1024 "
            "(bench/results/h200-2026-11-27.json), which calibrates the working-memory factor"),
)}


def gpu_spec(name: str) -> GpuSpec:
    key = name.strip().lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r} for --plan: one of {', '.join(GPUS)} (or no value: this machine)")
    return GPUS[key]


def dtype_name(dtype: object) -> str:
    """'bf16' / 'fp16' / 'fp32' for a torch dtype or its name."""
    key = str(dtype)
    if key in DTYPE_BYTES:
        return key
    if key not in DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not one of float32, bfloat16, float16")
    return DTYPE_NAMES[key]


# ---- the data tools/plan_data.py wrote --------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    module: str  # class of the module that owns it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def linear_weight(self) -> bool:
        return self.module == "Linear" and self.name.endswith(".weight")


@lru_cache(maxsize=None)
def _tensor_file() -> dict:
    return json.loads(TENSORS_FILE.read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def activations() -> dict:
    return json.loads(ACTIVATIONS_FILE.read_text(encoding="utf-8"))


@lru_cache(maxsize=None)
def flux_tensors(variant: str, part: str) -> tuple[TensorInfo, ...]:
    entry = _tensor_file()["components"][f"{variant}/{part}"]
    return tuple(TensorInfo(name, tuple(shape), module) for name, shape, module in entry["tensors"])


def param_count(variant: str, part: str) -> int:
    return sum(t.numel for t in flux_tensors(variant, part))


def workspace_factor() -> float:
    """Measured peak / traced peak on the H200 (see tools/plan_data.py calibration)."""
    return float(activations()["calibration"]["factor"])


# ---- storage rules ----------------------------------------------------------------------


def _is_t5_wo(t: TensorInfo) -> bool:
    return t.name.endswith(".wo.weight")


def dense_bytes(t: TensorInfo, part: str, dtype: str) -> int:
    if part == "text_encoder_2" and dtype == "fp16" and _is_t5_wo(t):
        return t.numel * 4  # transformers keeps T5's wo in float32 under float16
    return t.numel * DTYPE_BYTES[dtype]


def gguf_tensor_type(t: TensorInfo, file_type: str) -> str:
    """The GGML type city96's tools store this transformer tensor in."""
    if file_type not in GGUF_FILE_TYPES:
        raise ValueError(f"GGUF type {file_type!r} is not one of {', '.join(GGUF_FILE_TYPES)}")
    if len(t.shape) == 1 or t.name.startswith(GGUF_KEEP_F32):
        return "F32"
    if t.name.startswith(GGUF_KEEP_F16):
        return "F16"
    qtype = GGUF_FILE_TYPES[file_type]
    block = GGML_TYPES[qtype][0]
    return qtype if t.shape[-1] % block == 0 else "F16"  # lcpp.patch: F16 where rows do not fill blocks


def ggml_bytes(numel: int, qtype: str) -> int:
    block, size = GGML_TYPES[qtype]
    return -(-numel // block) * size


def nf4_bytes(numel: int, double_quant: bool = False) -> int:
    blocks = -(-numel // NF4_BLOCK)
    code = 16 * 4  # the 16-value NF4 code table kept in each weight's quant state
    if not double_quant:
        return -(-numel // 2) + blocks * 4 + code
    return -(-numel // 2) + blocks + -(-blocks // 256) * 4 + 256 * 4 + code + 4


def tensor_bytes(t: TensorInfo, part: str, storage: str, dtype: str) -> int:
    """Bytes this tensor takes in memory once loaded in ``storage`` with compute dtype ``dtype``."""
    dense = dense_bytes(t, part, dtype)
    if storage == "dense":
        return dense
    if storage == "nf4":
        return nf4_bytes(t.numel) if t.linear_weight else dense
    if storage == "fp8":  # --fp8 (torchao float8 weight-only): 1 byte a weight + a float32 scale per row
        return t.numel + 4 * t.shape[0] if t.linear_weight else dense
    if storage == "int8":
        if not t.linear_weight or (part == "text_encoder_2" and _is_t5_wo(t)):
            return dense
        return t.numel + 4 * t.shape[0]  # int8 weight + float32 scale per output row (SCB)
    if storage.startswith("gguf:"):
        qtype = gguf_tensor_type(t, storage[5:])
        return dense if qtype in ("F32", "F16", "BF16") else ggml_bytes(t.numel, qtype)
    raise ValueError(f"unknown storage {storage!r}")


def component_bytes(variant: str, part: str, storage: str, dtype: str) -> int:
    return sum(tensor_bytes(t, part, storage, dtype) for t in flux_tensors(variant, part))


def gguf_file_bytes(variant: str, file_type: str) -> int:
    """Tensor data in a city96 GGUF file of FLUX's transformer (the header adds a few MB)."""
    total = 0
    for t in flux_tensors(variant, "transformer"):
        qtype = gguf_tensor_type(t, file_type)
        total += ggml_bytes(t.numel, qtype)
    return total


def storage_short(part: str, storage: str, dtype: str) -> str:
    wo = " (wo fp32)" if part == "text_encoder_2" and dtype == "fp16" else ""
    if storage == "dense":
        return dtype + wo
    if storage == "nf4":
        return "NF4"
    if storage == "fp8":
        return "fp8"
    if storage == "int8":
        return "int8" + wo
    return storage_label(part, storage, dtype)


def storage_label(part: str, storage: str, dtype: str) -> str:
    if storage == "dense":
        if part == "text_encoder_2" and dtype == "fp16":
            return "fp16, wo in fp32"
        return dtype
    if storage == "nf4":
        return "NF4 (bitsandbytes)"
    if storage == "fp8":
        return "fp8 weight-only (torchao), the rest in " + dtype
    if storage == "int8":
        return "int8 (bitsandbytes), wo in " + ("fp32" if dtype == "fp16" else dtype)
    if storage.startswith("gguf:"):
        return f"GGUF {storage[5:]}"
    return storage


# ---- working memory ----------------------------------------------------------------------


def _trace_dtype(dtype: str) -> tuple[str, float]:
    """Which trace to read and how to scale it (fp32 runs only on the CPU: twice the bf16 bytes)."""
    return ("bf16", 2.0) if dtype == "fp32" else (dtype, 1.0)


def transformer_working(width: int, height: int, text_tokens: int, dtype: str, hidden: int = 3072) -> int:
    """Activations of one transformer call: traced bytes per (sequence x hidden) element, times the sequence.

    Sequence = (h/16)(w/16) image tokens (8x VAE, 2x2 patches) + the T5 text tokens. The trace is
    exactly linear in it (17.2 elements per sequence x hidden: the single blocks' 4x MLP, q/k/v and the
    float32 rotary-embedding temporaries at once).
    """
    which, _ = _trace_dtype(dtype)
    rows = activations()[which]["transformer"]
    per_element = max(r["peak_bytes"] / (_sequence(r["width"], r["height"], r["text_tokens"]) * 3072 * 2)
                      for r in rows)
    seq = _sequence(width, height, text_tokens)
    return int(per_element * seq * hidden * DTYPE_BYTES[dtype] * workspace_factor())


def _sequence(width: int, height: int, text_tokens: int) -> int:
    return (height // 16) * (width // 16) + text_tokens


def vae_decode_working(width: int, height: int, dtype: str, channels: int = 256) -> int:
    """The VAE decoder's activations: traced bytes per output pixel (three 256-channel tensors at full size)."""
    which, scale = _trace_dtype(dtype)
    per_pixel = max(r["peak_bytes"] / (r["width"] * r["height"]) for r in activations()[which]["vae_decode"])
    return int(per_pixel * width * height * scale * channels / 256 * workspace_factor())


def t5_working(tokens: int, dtype: str) -> int:
    which, scale = _trace_dtype(dtype)
    rows = sorted(activations()[which]["text_encoder_2"], key=lambda r: r["tokens"])
    top = rows[-1]
    if tokens <= top["tokens"]:
        peak = next(r["peak_bytes"] for r in rows if r["tokens"] >= tokens)  # the nearest traced length above
    else:
        peak = top["peak_bytes"] * (tokens / top["tokens"]) ** 2  # the position bias grows with tokens squared
    return int(peak * scale * workspace_factor())


def clip_working(dtype: str) -> int:
    which, scale = _trace_dtype(dtype)
    return int(activations()[which]["text_encoder"][0]["peak_bytes"] * scale * workspace_factor())


def working_bytes(model: "ModelInfo", dtype: str, width: int = 1024, height: int = 1024) -> int:
    """The largest working memory of any part: what must be free beside the weights on the GPU."""
    return max(transformer_working(width, height, model.text_tokens, dtype, model.hidden),
               t5_working(model.text_tokens, dtype), clip_working(dtype),
               vae_decode_working(width, height, dtype, model.vae_channels))


# ---- what a model is, before loading ----------------------------------------------------


@dataclass(frozen=True)
class ModelSizes:
    """Bytes of each part as stored, for a model whose architecture the plan does not know."""

    transformer: int
    text_encoder_2: int
    other: int  # CLIP text encoder + VAE
    prequantized: bool = False  # transformer stored quantized (NF4 repository or GGUF file)

    @property
    def total(self) -> int:
        return self.transformer + self.text_encoder_2 + self.other


@dataclass(frozen=True)
class ModelInfo:
    """What the plan knows about a model before loading it."""

    name: str
    variant: str | None = FLUX_DEV  # FLUX.1 architecture (dev / schnell); None: sizes only
    transformer_storage: str = "dense"  # how the checkpoint stores it: dense | nf4 | gguf:<type>
    sizes: ModelSizes | None = None  # for other architectures: bytes from the files
    hidden: int = 3072  # transformer width (other architectures: from its config)
    vae_channels: int = 256  # channels of the VAE decoder's full-size blocks
    note: str = ""

    @property
    def prequantized(self) -> bool:
        return self.transformer_storage != "dense"

    @property
    def text_tokens(self) -> int:
        return (SCHNELL_DEFAULTS if self.variant == FLUX_SCHNELL else DEV_DEFAULTS).max_sequence_length


GGUF_TYPE_IN_NAME = re.compile(r"(?i)(?:^|[-_.])(" + "|".join(sorted(GGUF_FILE_TYPES, key=len, reverse=True)) + r")\.gguf$")


def flux_variant(name: str) -> str:
    return FLUX_SCHNELL if "schnell" in name.lower() else FLUX_DEV


def hub_model(repo_id: str) -> ModelInfo:
    """A Hub repository, by its name: FLUX.1's architecture; a 4-bit repository holds an NF4 transformer."""
    name = repo_id.lower()
    storage = "nf4" if any(tag in name for tag in ("bnb-4bit", "nf4", "4bit")) else "dense"
    note = "" if "black-forest-labs/flux.1-" in name else "architecture assumed to be FLUX.1's (from the name)"
    return ModelInfo(repo_id, flux_variant(repo_id), storage, note=note)


def single_file_model(location: str, base: ModelInfo, file_bytes: int | None = None) -> ModelInfo:
    """A single-file transformer (.gguf / .safetensors); the other parts come from ``base``.

    ``file_bytes``: the file's size when it is local (used when ``base`` is not FLUX.1's architecture).
    """
    file_name = location.rsplit("/", 1)[-1]
    gguf = file_name.lower().endswith(".gguf")
    if base.variant is None and base.sizes is not None and file_bytes is not None:
        sizes = ModelSizes(file_bytes, base.sizes.text_encoder_2, base.sizes.other, prequantized=gguf)
        return ModelInfo(location, None, "gguf:Q8_0" if gguf else "dense", sizes=sizes, hidden=base.hidden,
                         vae_channels=base.vae_channels, note="sized from its files (not FLUX.1's architecture)")
    variant = base.variant or flux_variant(file_name)
    if not gguf:
        return ModelInfo(location, variant, "dense", note="single-file transformer assumed dense (bf16) FLUX.1")
    match = GGUF_TYPE_IN_NAME.search(file_name)
    if match:
        return ModelInfo(location, variant, "gguf:" + match.group(1).upper())
    return ModelInfo(location, variant, "gguf:Q8_0",
                     note="GGUF type not in the file name: planned as Q8_0, the largest quantized type")


def folder_model(folder: Path, sizes: ModelSizes) -> ModelInfo:
    """A local diffusers folder: FLUX.1 when its transformer config says so, else sized from its files."""
    config = _read_json(folder / "transformer" / "config.json")
    vae = _read_json(folder / "vae" / "config.json")
    flux = _read_json(CONFIGS / FLUX_DEV / "transformer" / "config.json")
    structural = ("in_channels", "num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                  "joint_attention_dim", "pooled_projection_dim")
    if config and all(config.get(k) == flux[k] for k in structural):
        variant = FLUX_DEV if config.get("guidance_embeds", True) else FLUX_SCHNELL
        quant = config.get("quantization_config") or {}
        storage = "nf4" if quant.get("load_in_4bit") or quant.get("bnb_4bit_quant_type") else (
            "dense" if not quant else "unknown")
        if storage != "unknown":
            return ModelInfo(str(folder), variant, storage)
    hidden = int(config.get("num_attention_heads", 24) * config.get("attention_head_dim", 128)) if config else 3072
    channels = vae.get("block_out_channels", [128, 256])
    return ModelInfo(str(folder), None, "nf4" if sizes.prequantized else "dense", sizes=sizes, hidden=hidden,
                     vae_channels=int(channels[1] if len(channels) > 1 else channels[0]),
                     note="sized from its files (not FLUX.1's architecture, or stored in a form the plan does not know)")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ---- the plan ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One part of the pipeline."""

    part: str
    storage: str  # in words
    weights: int  # bytes once loaded
    working: int  # activations while it runs, at the plan's size
    largest_tensor: int  # bytes of its largest tensor, dense (what streams or converts at once)
    via_ram: bool  # read into RAM while loading (else straight to the GPU)
    load_ram: int  # RAM it takes while loading when read through RAM (GGUF: the whole file)
    short: str = ""  # storage in a word or two


@dataclass(frozen=True)
class Plan:
    model: ModelInfo
    gpu: GpuSpec | None  # None: CPU only
    ram_bytes: int
    dtype: str
    profile: str  # full | offload | lowvram | quantized
    placement: str  # gpu | model offload | sequential
    rows: tuple[Row, ...]
    width: int = 1024
    height: int = 1024
    requires: tuple[str, ...] = ()  # packages this needs (bitsandbytes, gguf)
    notes: tuple[str, ...] = ()

    @property
    def weights(self) -> int:
        return sum(r.weights for r in self.rows)

    @property
    def context(self) -> int:
        return CUDA_CONTEXT if self.gpu else 0

    @property
    def gpu_generating(self) -> int:
        if self.gpu is None:
            return 0
        if self.placement == "gpu":
            return self.weights + max(r.working for r in self.rows) + self.context
        if self.placement == "model offload":
            return max(r.weights + r.working for r in self.rows) + self.context
        return max(r.largest_tensor + r.working for r in self.rows) + self.context

    @property
    def gpu_loading(self) -> int:
        if self.gpu is None:
            return 0
        streamed = [r for r in self.rows if not r.via_ram]
        transient = max((r.largest_tensor for r in streamed), default=0)
        if self.placement == "gpu":
            return self.weights + transient + self.context
        return sum(r.weights for r in streamed) + transient + self.context

    @property
    def ram_generating(self) -> int:
        held = self.weights if (self.gpu is None or self.placement != "gpu") else 0
        working = max(r.working for r in self.rows) if self.gpu is None else 0
        return PROCESS_RAM + held + working

    @property
    def ram_loading(self) -> int:
        via_ram = sum(r.load_ram for r in self.rows if r.via_ram)
        transient = max((r.largest_tensor for r in self.rows if not r.via_ram), default=0)
        if self.gpu is not None and self.placement != "gpu":
            # enable_*_offload moves what bitsandbytes put on the GPU into RAM: everything ends there.
            via_ram = max(via_ram, self.weights)
        return PROCESS_RAM + via_ram + transient

    @property
    def gpu_peak(self) -> int:
        return max(self.gpu_generating, self.gpu_loading)

    @property
    def ram_peak(self) -> int:
        return max(self.ram_generating, self.ram_loading)

    @property
    def gpu_short(self) -> int:
        """Bytes missing on the GPU (0 when it fits)."""
        return max(0, self.gpu_peak - self.gpu.total_bytes) if self.gpu else 0

    @property
    def ram_short(self) -> int:
        return max(0, self.ram_peak - self.ram_bytes)

    @property
    def fits(self) -> bool:
        return self.gpu_short == 0 and self.ram_short == 0

    def describe(self) -> str:
        """The profile and storage in a few words."""
        if self.gpu is None:
            return f"{self.profile} on the CPU ({self.dtype})"
        t, t5 = self.rows[0], self.rows[1]
        return f"{self.profile} (transformer {t.short}, T5 {t5.short}), {PLACEMENT_WORDS[self.placement]}"

    def verdict(self) -> str:
        if self.fits:
            return "fits"
        short = [f"GPU {gib(self.gpu_short)} short" if self.gpu_short else "",
                 f"RAM {gib(self.ram_short)} short" if self.ram_short else ""]
        return "does not fit: " + ", ".join(s for s in short if s)

    def render(self) -> str:
        """The plan as a markdown table, with what it rests on."""
        where = (f"{self.gpu.label}: {gib(self.gpu.total_bytes)} GPU memory, compute capability "
                 f"{self.gpu.capability[0]}.{self.gpu.capability[1]}" if self.gpu else "no CUDA GPU: CPU only")
        lines = [
            f"**{self.model.name}** on {where}; {gib(self.ram_bytes)} RAM; {self.dtype}; "
            f"{self.width}x{self.height}, {self.model.text_tokens} text tokens, 1 image",
            "",
            f"{self.describe()}: **{self.verdict()}** ({self._status()})",
            "",
            "| part | stored as | weights | while generating | working memory when it runs |",
            "|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(f"| {PART_LABELS.get(r.part, r.part)} | {r.storage} | {gib(r.weights)} ({r.weights / GB:.2f} GB) "
                         f"| {self._where(r)} | {gib(r.working)} |")
        if self.gpu:
            lines.append(f"| CUDA context | | | GPU | {gib(self.context)} |")
        lines.append(f"| process (Python, torch, app) | | | RAM | {gib(PROCESS_RAM)} |")
        lines += [
            "",
            "| peak | GPU | RAM |",
            "|---|---|---|",
            f"| while loading | {self._gpu(self.gpu_loading)} | {gib(self.ram_loading)} |",
            f"| while generating | {self._gpu(self.gpu_generating)} | {gib(self.ram_generating)} |",
            f"| available | {self._gpu(self.gpu.total_bytes if self.gpu else 0)} | {gib(self.ram_bytes)} |",
            f"| fits | {self._fit(self.gpu_short) if self.gpu else '-'} | {self._fit(self.ram_short)} |",
        ]
        notes = list(self.notes) + ([self.model.note] if self.model.note else [])
        if self.requires:
            gpu_reqs = [r for r in self.requires if r != "torchao"]
            if gpu_reqs:
                notes.append("needs " + " and ".join(gpu_reqs) + " (pip install -r requirements-gpu.txt)")
            if "torchao" in self.requires:  # not in requirements-gpu.txt: only --fp8 needs it
                notes.append("needs torchao for --fp8 (pip install torchao) and a GPU of compute capability 8.9+")
        lines += [""] + [f"* {n}" for n in notes] if notes else []
        return "\n".join(lines)

    def _status(self) -> str:
        if self.gpu is None:
            return "predicted"
        if self.gpu.measured:
            return f"predicted; measured on this GPU: {self.gpu.measured}"
        return "predicted: nothing was measured on this GPU"

    def _where(self, r: Row) -> str:
        if self.gpu is None:
            return "RAM"
        if self.placement == "gpu":
            return "GPU"
        if self.placement == "model offload":
            return "RAM; on the GPU while it runs"
        return "RAM; one layer at a time on the GPU"

    def _gpu(self, n: int) -> str:
        return gib(n) if self.gpu else "-"

    @staticmethod
    def _fit(short: int) -> str:
        return "yes" if short == 0 else f"no ({gib(short)} short)"


def gib(n: int) -> str:
    return f"{n / GiB:.2f} GiB"


def build_plan(model: ModelInfo, gpu: GpuSpec | None, ram_bytes: int | None = None, *, profile: str = "full",
               placement: str | None = None, dtype: str | None = None, bnb: bool = True,
               width: int = 1024, height: int = 1024, fp8: bool = False) -> Plan:
    """What ``profile`` puts where for ``model`` on ``gpu`` (None: CPU only).

    ``placement`` says where ``quantized`` puts the weights (``gpu`` or ``model offload``); the other
    profiles have one. ``bnb``: whether bitsandbytes is there (the quantized profile's T5 in 8-bit).
    ``fp8``: --fp8, a dense transformer's linear weights in float8.
    """
    if profile not in ("full", "offload", "lowvram", "quantized"):
        raise ValueError(f"unknown memory profile {profile!r}")
    ram = gpu.ram_bytes if ram_bytes is None and gpu else ram_bytes
    if ram is None:
        raise ValueError("ram_bytes is needed for a machine without a named GPU")
    dtype = dtype_name(dtype) if dtype else (gpu.dtype if gpu else "fp32")
    if gpu is None:
        profile, placement = "full", "gpu"
    fixed = {"full": "gpu", "offload": "model offload", "lowvram": "sequential"}
    placement = fixed.get(profile, placement or "gpu")
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown placement {placement!r}")
    transformer = model.transformer_storage
    if profile == "quantized" and transformer == "dense":
        transformer = "nf4"
    if fp8 and transformer == "dense":
        transformer = "fp8"
    t5 = "int8" if (profile == "quantized" and bnb) else "dense"
    requires = ["torchao"] if transformer == "fp8" else []
    if transformer == "nf4" or t5 == "int8":
        requires.append("bitsandbytes")
    if transformer.startswith("gguf:"):
        requires.append("gguf")
    notes = []
    if profile == "quantized" and not bnb:
        notes.append("bitsandbytes is not installed: T5 stays in " + dtype)
    rows = _rows(model, transformer, t5, dtype, profile if gpu else "cpu", width, height)
    return Plan(model, gpu, ram, dtype, profile, placement, rows, width, height, tuple(dict.fromkeys(requires)),
                tuple(notes))


def _rows(model: ModelInfo, transformer: str, t5: str, dtype: str, profile: str, width: int,
          height: int) -> tuple[Row, ...]:
    storages = {"transformer": transformer, "text_encoder_2": t5, "text_encoder": "dense", "vae": "dense"}
    working = {
        "transformer": transformer_working(width, height, model.text_tokens, dtype, model.hidden),
        "text_encoder_2": t5_working(model.text_tokens, dtype),
        "text_encoder": clip_working(dtype),
        "vae": vae_decode_working(width, height, dtype, model.vae_channels),
    }
    rows = []
    for part in PARTS:
        storage = storages[part]
        if model.variant is None:
            weights, largest = _sized_part(model.sizes, part, storage, dtype)
            file_bytes = weights
        else:
            weights = component_bytes(model.variant, part, storage, dtype)
            largest = max(dense_bytes(t, part, dtype) for t in flux_tensors(model.variant, part))
            file_bytes = gguf_file_bytes(model.variant, storage[5:]) if storage.startswith("gguf:") else weights
        if part == "transformer" and storage != "dense":
            working[part] += largest  # one dequantized weight at a time for its matmul
        via_ram = storage.startswith("gguf:") or (storage == "dense" and profile != "full")
        rows.append(Row(part, storage_label(part, storage, dtype), weights, working[part], largest, via_ram,
                        file_bytes, storage_short(part, storage, dtype)))
    return tuple(rows)


def _sized_part(sizes: ModelSizes | None, part: str, storage: str, dtype: str) -> tuple[int, int]:
    """(weights, largest tensor) of a part known only by its files' bytes."""
    if sizes is None:
        raise ValueError("a model without FLUX.1's architecture needs its sizes")
    if part == "transformer":
        weights = sizes.transformer
        if storage == "fp8":
            weights = int(weights * component_bytes(FLUX_DEV, "transformer", "fp8", "bf16")
                          / component_bytes(FLUX_DEV, "transformer", "dense", "bf16"))
        if storage == "nf4" and not sizes.prequantized:
            # Quantized while loading: the same share of the bf16 bytes as FLUX.1's NF4 transformer.
            weights = int(weights * component_bytes(FLUX_DEV, "transformer", "nf4", "bf16")
                          / component_bytes(FLUX_DEV, "transformer", "dense", "bf16"))
    elif part == "text_encoder_2":
        weights = sizes.text_encoder_2
        if storage == "int8":
            weights = int(weights * component_bytes(FLUX_DEV, "text_encoder_2", "int8", dtype)
                          / component_bytes(FLUX_DEV, "text_encoder_2", "dense", "bf16"))
    else:
        weights = sizes.other // 2
    return weights, weights // 8  # the largest tensor is unknown: an eighth, a generous guess


# ---- choosing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    profile: str
    placement: str


# What auto tries, best first: full precision before quantized, on the GPU before offloaded.
CANDIDATES = (Candidate("full", "gpu"), Candidate("offload", "model offload"), Candidate("quantized", "gpu"),
              Candidate("quantized", "model offload"), Candidate("lowvram", "sequential"))


def candidates(model: ModelInfo, gpu: GpuSpec, ram_bytes: int | None = None, *, dtype: str | None = None,
               bnb: bool = True, gguf: bool = True, width: int = 1024, height: int = 1024, fp8: bool = False
               ) -> list[tuple[Plan, str]]:
    """Every profile the app could load ``model`` with here, as (plan, why not) -- why not is "" when usable.

    ``fp8``: --fp8 (torchao is checked at start, not here); the quantized profile is then not offered.
    """
    out = []
    for c in CANDIDATES:
        plan = build_plan(model, gpu, ram_bytes, profile=c.profile, placement=c.placement, dtype=dtype, bnb=bnb,
                          width=width, height=height, fp8=fp8)
        missing = [p for p in plan.requires if not {"bitsandbytes": bnb, "gguf": gguf, "torchao": True}[p]]
        if fp8 and c.profile == "quantized":
            why = "--fp8 quantizes the transformer already"
        elif missing:
            why = " and ".join(missing) + " not installed"
        elif c.profile == "lowvram" and model.prequantized:
            why = "sequential offload of a pre-quantized transformer is not supported"
        else:
            why = ""
        out.append((plan, why))
    return out


def choose(model: ModelInfo, gpu: GpuSpec | None, ram_bytes: int | None = None, *, dtype: str | None = None,
           bnb: bool = True, gguf: bool = True, width: int = 1024, height: int = 1024, fp8: bool = False
           ) -> tuple[Plan | None, str, list[tuple[Plan, str]]]:
    """auto: the first usable candidate that fits; (plan or None, why, every candidate)."""
    if gpu is None:
        plan = build_plan(model, None, ram_bytes, dtype=dtype or "fp32", width=width, height=height)
        why = f"no CUDA GPU: everything runs on the CPU ({plan.dtype}); RAM {gib(plan.ram_peak)} of {gib(plan.ram_bytes)}"
        if not plan.fits:
            why += f" ({plan.verdict()})"
        return plan, why, [(plan, "")]
    options = candidates(model, gpu, ram_bytes, dtype=dtype, bnb=bnb, gguf=gguf, width=width, height=height, fp8=fp8)
    for plan, why_not in options:
        if not why_not and plan.fits:
            return plan, (f"{plan.describe()}: GPU {gib(plan.gpu_peak)} of {gib(gpu.total_bytes)}, "
                          f"RAM {gib(plan.ram_peak)} of {gib(plan.ram_bytes)} (predicted, {plan.width}x{plan.height})"), options
    usable = [(p, w) for p, w in options if not w]
    closest = min(usable or options, key=lambda pw: pw[0].gpu_short + pw[0].ram_short)[0]
    why = (f"no memory profile is predicted to fit {model.name} in {gib(gpu.total_bytes)} of GPU memory and "
           f"{gib(closest.ram_bytes)} of RAM ({closest.dtype}, {closest.width}x{closest.height}); the closest, "
           f"{closest.describe()}, {closest.verdict()}")
    return None, why, options


def render_choice(model: ModelInfo, gpu: GpuSpec | None, ram_bytes: int | None = None, *, dtype: str | None = None,
                  bnb: bool = True, gguf: bool = True, profile: str = "auto", width: int = 1024,
                  height: int = 1024, fp8: bool = False) -> str:
    """What --plan prints for one model: auto's choice (or the asked profile) and every candidate."""
    plan, why, options = choose(model, gpu, ram_bytes, dtype=dtype, bnb=bnb, gguf=gguf, width=width, height=height,
                                fp8=fp8)
    lines = [f"auto: {plan.profile if plan else 'nothing fits'} -- {why}", ""]
    shown = plan
    if profile != "auto" and gpu is None:
        if profile != "full":
            lines = [f"--memory {profile} (asked for) needs a CUDA GPU: the app refuses it on the CPU", ""] + lines
    elif profile != "auto":
        asked = [p for p, _ in options if p.profile == profile]
        if profile == "quantized":
            # As apply_memory_profile places it: on the GPU when it fits there, else model offload.
            on_gpu = [p for p in asked if p.placement == "gpu" and p.gpu_short == 0]
            asked = on_gpu or [p for p in asked if p.placement != "gpu"]
        shown = asked[0]
        lines = [f"--memory {profile} (asked for): {shown.describe()}: {shown.verdict()}", ""] + lines
    if shown is None:
        shown = min((p for p, w in options if not w), key=lambda p: p.gpu_short + p.ram_short,
                    default=options[0][0])
    lines.append(shown.render())
    if gpu is not None:
        lines += ["", "| candidate (auto tries them in this order) | GPU peak | RAM peak | verdict |",
                  "|---|---|---|---|"]
        for p, why_not in options:
            verdict = f"not possible here: {why_not}" if why_not else p.verdict()
            lines.append(f"| {p.describe()} | {gib(p.gpu_peak)} | {gib(p.ram_peak)} | {verdict} |")
    return "\n".join(lines)


# What the docs and --plan compare on each GPU: the two FLUX.1 repositories and the two
# pre-quantized checkpoints the app points T4 users to.
REFERENCE_MODELS = (
    "black-forest-labs/FLUX.1-dev",
    "black-forest-labs/FLUX.1-schnell",
    "diffusers/FLUX.1-dev-bnb-4bit",
    "https://huggingface.co/city96/FLUX.1-dev-gguf/blob/main/flux1-dev-Q4_K_S.gguf",
    "https://huggingface.co/city96/FLUX.1-schnell-gguf/blob/main/flux1-schnell-Q4_K_S.gguf",
)


def reference_model(spec: str) -> ModelInfo:
    if spec.endswith(".gguf"):
        return single_file_model(spec, hub_model("black-forest-labs/" + flux_variant(spec)))
    return hub_model(spec)


def summary_table(gpu: GpuSpec, *, bnb: bool = True, gguf: bool = True) -> str:
    """One line per reference model: what auto picks on ``gpu`` and its predicted peaks."""
    lines = ["| model | auto picks | GPU peak | RAM peak | verdict |", "|---|---|---|---|---|"]
    for spec in REFERENCE_MODELS:
        model = reference_model(spec)
        chosen, _, options = choose(model, gpu, dtype=None, bnb=bnb, gguf=gguf)
        shown = chosen or min((p for p, w in options if not w), key=lambda p: p.gpu_short + p.ram_short)
        pick = shown.describe() if chosen else f"**nothing fits**; closest: {shown.describe()}"
        lines.append(f"| `{spec.rsplit('/', 1)[-1] if spec.endswith('.gguf') else spec}` | {pick} | "
                     f"{gib(shown.gpu_peak)} | {gib(shown.ram_peak)} | {shown.verdict()} |")
    return "\n".join(lines)
