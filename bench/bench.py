"""MASUKA vs raw diffusers, on the same pipeline, in one process: a table of ratios.

    python bench/bench.py --mode cpu            # tiny model, a few iterations (CI smoke test)
    python bench/bench.py --mode gpu            # full-size FLUX.1-dev/schnell architectures, 1024x1024
    python bench/bench.py --mode gpu --device cpu --small   # the GPU code path at toy size (checks it runs)

GPU mode builds the FLUX.1 architectures with random weights directly on the GPU in
bf16 (no download).  The transformer and VAE are full size; the text encoders are
small random stand-ins with the real output sizes (T5 d_model 4096, CLIP 768), since
the per-image time is dominated by the transformer.  Images are therefore noise, and
only time, memory and bit-equality are measured.

Measured: per-image time of raw ``pipe(...)`` (prompt to image in memory) vs MASUKA's
``GeneratorManager.generate`` (its pipeline part; saving the PNG and the cleanup after
the run are timed and reported apart); LoRA load/switch/generation times for raw
diffusers (unfused adapters) and MASUKA's switch; GPU memory after each switch; the
no-LoRA output after many switches vs the output before any LoRA; empty_cache cost.

Prints a markdown table and writes it to ``$OUT/bench.md`` (and ``bench.json``) when
``$OUT`` is set, or to ``--out``.  Never imports gradio.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench")

PROMPT = "a lighthouse on a cliff at dusk, waves, dramatic sky"
SEED = 1234

# FLUX.1 as released (FluxTransformer2DModel's defaults are FLUX.1-dev).
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, axes_dims_rope=(16, 56, 56),
)
FLUX_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024)
SMALL_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=1, num_single_layers=2, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=24, axes_dims_rope=(4, 6, 6),
)
SMALL_VAE = dict(block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=4, sample_size=256)
FLUX_VAE_SCALING, FLUX_VAE_SHIFT = 0.3611, 0.1159


@dataclass
class Variant:
    name: str  # schnell | dev | tiny
    steps: int
    guidance: float
    max_sequence_length: int
    guidance_embeds: bool


@dataclass
class Row:
    section: str
    what: str
    raw: str = ""
    masuka: str = ""
    ratio: str = ""
    goal: str = ""
    verdict: str = ""


@dataclass
class Report:
    device_name: str
    mode: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, *args, **kwargs) -> None:
        row = Row(*args, **kwargs)
        self.rows.append(row)
        log.info("| %s | %s | %s | %s | %s | %s | %s |", row.section, row.what, row.raw, row.masuka,
                 row.ratio, row.goal, row.verdict)

    def flush(self, out: str | None) -> None:
        """Write what is measured so far (a run cut short still leaves its table)."""
        if not out:
            return
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "bench.md").write_text(self.markdown(), encoding="utf-8")
        (folder / "bench.json").write_text(json.dumps(self.data, indent=1, default=str), encoding="utf-8")

    def markdown(self) -> str:
        lines = [
            f"# MASUKA benchmark ({self.mode} mode) on {self.device_name}",
            "",
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; " + "; ".join(self.data.get("versions", [])),
            "",
            "| section | measurement | raw diffusers | MASUKA | ratio | goal | met |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(f"| {r.section} | {r.what} | {r.raw} | {r.masuka} | {r.ratio} | {r.goal} | {r.verdict} |")
        if self.notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


# ---- timing helpers ------------------------------------------------------------

def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def fmt_s(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x * 1000:.1f} ms" if x < 1 else f"{x:.3f} s"


def fmt_ratio(a: float, b: float) -> str:
    return f"x{a / b:.3f}" if b > 0 else "n/a"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def psnr(a, b) -> float:
    import numpy as np

    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


# ---- building pipelines --------------------------------------------------------

@contextlib.contextmanager
def default_dtype(dtype):
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_random_flux(variant: Variant, device, dtype, small: bool):
    """FLUX.1 architecture with random weights, built on ``device`` (no CPU init of 12B params)."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from masuka.model.tiny import SCHEDULER_CONFIG, build_tiny_components

    tiny = build_tiny_components()  # only for its tokenizers (small vocabularies, real special tokens)
    tokenizer, tokenizer_2 = tiny["tokenizer"], tiny["tokenizer_2"]
    tcfg = dict(SMALL_TRANSFORMER if small else FLUX_TRANSFORMER, guidance_embeds=variant.guidance_embeds)
    vcfg = SMALL_VAE if small else FLUX_VAE
    torch.manual_seed(0)
    started = time.perf_counter()
    with torch.device(device), default_dtype(dtype), torch.no_grad():
        transformer = FluxTransformer2DModel(**tcfg).eval()
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, act_fn="silu", latent_channels=16,
            scaling_factor=FLUX_VAE_SCALING, shift_factor=FLUX_VAE_SHIFT, force_upcast=True,
            use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True, **vcfg,
        ).eval()
        t5 = T5EncoderModel(T5Config(
            vocab_size=len(tokenizer_2), d_model=tcfg["joint_attention_dim"], d_kv=64, d_ff=1024, num_layers=1,
            num_heads=4, relative_attention_num_buckets=32, feed_forward_proj="gated-gelu",
            is_encoder_decoder=False, use_cache=False, tie_word_embeddings=False,
            pad_token_id=tokenizer_2.pad_token_id, eos_token_id=tokenizer_2.eos_token_id,
            decoder_start_token_id=tokenizer_2.pad_token_id,
        )).eval()
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=tcfg["pooled_projection_dim"], intermediate_size=1024,
            projection_dim=tcfg["pooled_projection_dim"], num_hidden_layers=1, num_attention_heads=4,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )).eval()
    sync(device)
    pipe = FluxPipeline(
        transformer=transformer, vae=vae, text_encoder=clip, text_encoder_2=t5,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
    )
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in transformer.parameters())
    log.info("built %s: transformer %.2f B params (%s) in %.1f s", variant.name, params / 1e9,
             {p.dtype for p in transformer.parameters()}, time.perf_counter() - started)
    return pipe


def build_tiny(models_dir: Path):
    from diffusers import FluxPipeline

    from masuka.model.tiny import ensure_tiny_model

    pipe = FluxPipeline.from_pretrained(str(ensure_tiny_model(models_dir)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---- LoRA files ------------------------------------------------------------------

LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
    "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
    "ff_context.net.2", "proj_mlp", "proj_out",
)


def make_lora(transformer, path: Path, rank: int, seed: int, device, strength: float = 0.03) -> int:
    """A random diffusers-format LoRA on every attention and feed-forward linear layer (lora_B != 0).

    ``strength``: the LoRA's change of each weight (its standard deviation) relative to the
    weight's own.  Trained LoRAs change weights by a few per cent; the exact-restore fixes
    a fused LoRA holds grow with it (measured on bf16: ~1.3 % of elements at 0.01, ~3 % at
    0.03, ~8 % at 0.1, ~33 % at 1.0).
    """
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator(device=device).manual_seed(seed)
    tensors = {}
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
            continue
        if not name.endswith(LORA_TARGETS):
            continue
        dt = torch.bfloat16
        down = torch.randn(rank, module.in_features, generator=gen, device=device) / math.sqrt(module.in_features)
        # std(up @ down) = std(up) * sqrt(rank) * std(down) * sqrt(in) = std(up) * sqrt(rank)
        w_std = module.weight.detach().float().std().item()
        up = torch.randn(module.out_features, rank, generator=gen, device=device) * (strength * w_std / math.sqrt(rank))
        tensors[f"transformer.{name}.lora_A.weight"] = down.to(dt).cpu().contiguous()
        tensors[f"transformer.{name}.lora_B.weight"] = up.to(dt).cpu().contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path.stat().st_size


# ---- MASUKA's manager around the same pipeline -------------------------------------

class TimedManager:
    """MASUKA's Runner on ``pipe``, with the PNG save and the cleanup timed apart."""

    def __init__(self, pipe, variant: Variant, size: int, device, dtype, home: Path):
        import masuka.core.runner as generator
        from masuka.store.jobs import JobStore
        from masuka.lora.cache import LoraStateCache
        from masuka.lora.library import LoraLibrary
        from masuka.model.loading import LoadedModel
        from masuka.model.defaults import ModelDefaults

        home.mkdir(parents=True, exist_ok=True)
        defaults = ModelDefaults(width=size, height=size, steps=variant.steps, guidance=variant.guidance,
                                 max_sequence_length=variant.max_sequence_length)
        loaded = LoadedModel(pipe=pipe, spec=f"bench/{variant.name}", defaults=defaults, device=device,
                             dtype=dtype, is_demo=True, memory_profile="full", memory_reason="bench")
        self.jobs = JobStore(home / "masuka.db")
        self.library = LoraLibrary(home / "loras", max_bytes=4 * 1024**3)
        self.manager = generator.Runner(loaded, self.jobs, self.library, home / "outputs",
                                                  lora_cache=LoraStateCache(max_bytes=2 * 1024**3))
        self.variant, self.size, self.device = variant, size, device
        self.save_s = 0.0
        self.cleanup_s = 0.0
        original_save = generator.save_image

        def timed_save(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original_save(*args, **kwargs)
            finally:
                self.save_s += time.perf_counter() - start

        generator.save_image = timed_save  # the bench's own process: time the save apart
        self._restore_save = lambda: setattr(generator, "save_image", original_save)
        original_release = self.manager._release_memory

        def timed_release():
            start = time.perf_counter()
            try:
                return original_release()
            finally:
                self.cleanup_s += time.perf_counter() - start

        self.manager._release_memory = timed_release

    def generate(self, lora: str = "", seed: int = SEED) -> dict[str, float]:
        """One image; returns total, save, cleanup and pipeline (total - save - cleanup) seconds."""
        self.save_s = self.cleanup_s = 0.0
        request = self.manager.validate(prompt=PROMPT, lora=lora, seed=seed, steps=self.variant.steps,
                                        guidance=self.variant.guidance, width=self.size, height=self.size)
        total, result = timed(lambda: self.manager.generate(request), self.device)
        if result.status != "completed":
            raise RuntimeError(f"MASUKA job {result.job_id} ended {result.status}")
        return {"total": total, "save": self.save_s, "cleanup": self.cleanup_s,
                "pipeline": total - self.save_s - self.cleanup_s, "image": result.images[0]}

    def switch(self, spec: str) -> float:
        """Make the pipeline hold exactly ``spec``'s LoRAs; seconds (GPU work included)."""
        manager = self.manager
        return timed(lambda: manager.set_loras(spec), self.device)[0]

    def strategy(self) -> str:
        status = getattr(self.manager, "lora_status", None)
        if status is None:
            return "adapters (diffusers)"
        s = status()
        return s["strategy"] + (f" (fallback: {s['fallback_reason']})" if s.get("fallback_reason") else "")

    def close(self) -> None:
        # The patched save_image holds this object, and so the pipeline: undo it to free the GPU.
        self._restore_save()
        self.jobs.close()


def raw_generate(pipe, variant: Variant, size: int, seed: int = SEED):
    import torch

    generator = torch.Generator(device="cpu").manual_seed(seed)
    with torch.inference_mode():
        return pipe(prompt=PROMPT, width=size, height=size, num_inference_steps=variant.steps,
                    guidance_scale=variant.guidance, generator=generator,
                    max_sequence_length=variant.max_sequence_length).images[0]


def pixels(image):
    import numpy as np
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.open(image)
    return np.asarray(image.convert("RGB"))


def weights_checksum(module) -> tuple[int, int]:
    """Two integer checksums of every parameter's bits (sum and sum of squares of 16-bit words)."""
    import torch

    s1 = s2 = 0
    with torch.no_grad():
        for p in module.parameters():
            words = p.detach().reshape(-1).view(torch.int16) if p.element_size() == 2 else p.detach().reshape(-1).view(torch.int32)
            w = words.to(torch.int64)
            s1 += int(w.sum())
            s2 += int((w * w).sum())
    return s1, s2


def mem_allocated(device) -> int | None:
    import torch

    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


# ---- sections -------------------------------------------------------------------

def bench_generation(report: Report, pipe, tm: TimedManager, variant: Variant, size: int, iters: int, device) -> dict:
    """Raw pipe(...) vs MASUKA's generate, interleaved, medians."""
    log.info("%s: warm-up (raw and MASUKA)", variant.name)
    raw_generate(pipe, variant, size)
    tm.generate()
    raw_t, ms = [], []
    for i in range(iters):
        raw_t.append(timed(lambda: raw_generate(pipe, variant, size), device)[0])
        ms.append(tm.generate())
        log.info("%s iter %d: raw %.3f s, MASUKA pipeline %.3f s (total %.3f, save %.3f, cleanup %.3f)",
                 variant.name, i, raw_t[-1], ms[-1]["pipeline"], ms[-1]["total"], ms[-1]["save"], ms[-1]["cleanup"])
    raw = statistics.median(raw_t)
    med = {k: statistics.median(m[k] for m in ms) for k in ("pipeline", "total", "save", "cleanup")}
    sec = f"{variant.name} {size}x{size}, {variant.steps} steps"
    ok = med["pipeline"] / raw <= 1.02
    report.add(sec, f"per image (median of {iters}), pipeline part", fmt_s(raw), fmt_s(med["pipeline"]),
               fmt_ratio(med["pipeline"], raw), "<= x1.02", verdict(ok))
    report.add(sec, "MASUKA total incl. PNG save + cleanup", fmt_s(raw), fmt_s(med["total"]),
               fmt_ratio(med["total"], raw), "", "")
    report.add(sec, "PNG save (MASUKA, apart)", "", fmt_s(med["save"]), "", "", "")
    report.add(sec, "cleanup after run (empty_cache + log)", "", fmt_s(med["cleanup"]), "", "", "")
    report.data[f"gen_{variant.name}"] = {"raw": raw_t, "masuka": [{k: v for k, v in m.items() if k != "image"} for m in ms]}
    return {"raw": raw, **med}


def bench_empty_cache(report: Report, device) -> None:
    import torch

    if device.type != "cuda":
        report.add("memory", "torch.cuda.empty_cache()", "n/a (no CUDA)", "", "", "", "")
        return
    times = []
    for _ in range(5):
        times.append(timed(torch.cuda.empty_cache, device)[0])
    report.add("memory", "torch.cuda.empty_cache() (median of 5, after a run)", fmt_s(statistics.median(times)),
               "", "", "", "")


def bench_loras(report: Report, pipe, tm: TimedManager, variant: Variant, size: int, device, args,
                deadline: float, no_lora_pipeline_s: float) -> None:
    import torch

    sec = f"LoRA ({variant.name}, {variant.steps} steps)"
    folder = tm.library.folder
    folder.mkdir(parents=True, exist_ok=True)
    ranks = args.ranks
    files = {}
    for i, rank in enumerate(ranks):
        path = folder / f"r{rank}.safetensors"
        size_b = make_lora(pipe.transformer, path, rank, seed=10 + i, device=device, strength=args.lora_strength)
        files[rank] = path
        log.info("LoRA rank %d: %.3f MB", rank, size_b / 1e6)
        report.notes.append(f"LoRA rank {rank}: {size_b / 1e6:.3g} MB (bf16, {len(LORA_TARGETS)} kinds of "
                            "attention/feed-forward linear layers in every block)")
    tm.library.scan()
    r_small, r_big = f"r{ranks[0]}", f"r{ranks[-1]}"

    # Reference: the no-LoRA image before any LoRA touched the pipeline.
    tm.switch("")
    reference = pixels(raw_generate(pipe, variant, size))
    checksum_before = weights_checksum(pipe.transformer)

    # -- raw diffusers: load / generate unfused / unload
    raw_load, raw_unload = {}, {}
    for rank in ranks:
        raw_load[rank] = timed(lambda: pipe.load_lora_weights(str(files[rank]), adapter_name=f"raw{rank}"), device)[0]
        if rank == ranks[0]:
            raw_lora_gen = timed(lambda: raw_generate(pipe, variant, size), device)[0]
        raw_unload[rank] = timed(pipe.unload_lora_weights, device)[0]
    after_raw = pixels(raw_generate(pipe, variant, size))
    raw_unload_exact = bool((after_raw == reference).all())

    # -- MASUKA: first switch (disk read + apply), a LoRA used before (cached), none
    first = {rank: None for rank in ranks}
    first[ranks[0]] = tm.switch(r_small)
    strategy = tm.strategy()
    gen_lora = [tm.generate(lora=r_small) for _ in range(args.lora_iters)]
    gen_lora_s = statistics.median(g["pipeline"] for g in gen_lora)
    if len(ranks) > 1:
        first[ranks[-1]] = tm.switch(r_big)
    if len(ranks) == 1:
        tm.switch("")  # else the next switch would have nothing to do
    again_small = tm.switch(r_small)
    again_big = tm.switch(r_big) if len(ranks) > 1 else None
    to_none = tm.switch("")

    for rank in ranks:
        report.add(sec, f"load rank-{rank} LoRA, first time (file read + apply)", fmt_s(raw_load[rank]),
                   fmt_s(first[rank]), fmt_ratio(first[rank], raw_load[rank]), "", "")
    report.add(sec, f"switch to a LoRA used before ({r_big} -> {r_small})" if again_big is not None
               else f"switch to a LoRA used before (none -> {r_small})", "", fmt_s(again_small), "", "<= 0.3 s",
               verdict(again_small <= 0.3))
    if again_big is not None:
        report.add(sec, f"switch to a LoRA used before ({r_small} -> {r_big})", "", fmt_s(again_big), "", "<= 0.3 s",
                   verdict(again_big <= 0.3))
    report.add(sec, "back to no LoRA (raw: unload_lora_weights)", fmt_s(raw_unload[ranks[0]]), fmt_s(to_none), "", "", "")
    report.add(sec, f"generation with {r_small} (raw: unfused adapter) vs no LoRA", fmt_s(raw_lora_gen),
               fmt_s(gen_lora_s), f"raw x{raw_lora_gen / no_lora_pipeline_s:.3f}, MASUKA x{gen_lora_s / no_lora_pipeline_s:.3f}",
               "MASUKA <= x1.05 of no LoRA", verdict(gen_lora_s / no_lora_pipeline_s <= 1.05))
    report.add(sec, "MASUKA LoRA strategy", "", strategy, "", "", "")
    report.add(sec, "raw unload_lora_weights leaves the no-LoRA image bit-exact", verdict(raw_unload_exact), "", "", "", "")

    # -- memory over switches, then many switches and the no-LoRA image again
    cycle = [r_small, "", r_big, r_small, r_big, ""] if len(ranks) > 1 else [r_small, ""]
    mems, times = [], []
    by_kind: dict[str, list[float]] = {"no LoRA -> LoRA": [], "LoRA -> other LoRA": [], "LoRA -> no LoRA": []}
    total_switches = 0
    target = args.switches
    previous = ""
    while total_switches < target:
        spec = cycle[total_switches % len(cycle)]
        times.append(tm.switch(spec))
        kind = "LoRA -> no LoRA" if not spec else ("no LoRA -> LoRA" if not previous else "LoRA -> other LoRA")
        by_kind[kind].append(times[-1])
        previous = spec
        total_switches += 1
        if total_switches <= args.mem_switches:
            mems.append((spec, mem_allocated(device)))
        if total_switches >= args.mem_switches and time.monotonic() > deadline:
            log.warning("time budget: stopping switches at %d", total_switches)
            break
    tm.switch("")
    after = pixels(raw_generate(pipe, variant, size))
    checksum_after = weights_checksum(pipe.transformer)
    if mems and mems[0][1] is not None:
        # The same LoRA set must always take the same memory: compare each switch with the
        # first switch that reached the same set.
        first_of: dict[str, int] = {}
        drift = 0
        for spec, m in mems:
            first_of.setdefault(spec, m)
            drift = max(drift, abs(m - first_of[spec]))
        report.add(sec, f"GPU memory after each of {len(mems)} switches vs the first switch to the same LoRA set",
                   "", f"max drift {mib(drift)}", "", "<= 1 MiB", verdict(drift <= 2**20))
        for spec in first_of:
            if spec:
                report.add(sec, f"GPU memory held while {spec} is applied (over no LoRA)", "",
                           mib(first_of[spec] - first_of.get("", first_of[spec])), "", "", "")
        report.data["switch_memory"] = mems
    else:
        report.add(sec, f"memory after each of {len(mems)} switches", "", "n/a (no CUDA)", "", "<= 1 MiB", "n/a")
    report.add(sec, f"switch time over {total_switches} switches (median / max)", "",
               f"{fmt_s(statistics.median(times))} / {fmt_s(max(times))}", "", "", "")
    for kind, values in by_kind.items():
        if values:
            goal = "<= 0.3 s" if kind != "LoRA -> no LoRA" else ""
            report.add(sec, f"switch {kind}, LoRAs used before (median of {len(values)} / max)", "",
                       f"{fmt_s(statistics.median(values))} / {fmt_s(max(values))}", "", goal,
                       verdict(statistics.median(values) <= 0.3) if goal else "")
    exact = bool((after == reference).all())
    report.add(sec, f"no-LoRA image after {total_switches + 1} switches vs before any LoRA", "",
               "bit-exact" if exact else f"PSNR {psnr(after, reference):.1f} dB", "",
               "bit-exact or PSNR >= 45 dB", verdict(exact or psnr(after, reference) >= 45))
    report.add(sec, "transformer weights after the switches (bit checksum)", "",
               "identical" if checksum_after == checksum_before else "**changed**", "", "identical",
               verdict(checksum_after == checksum_before))
    report.data["switch_times"] = times
    if device.type == "cuda":
        report.data["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30


def bench_compile(report: Report, pipe, tm: TimedManager, variant: Variant, size: int, device, r_small: str) -> None:
    import torch

    sec = f"compiled ({variant.name}, {variant.steps} steps)"
    tm.switch("")
    t0 = time.perf_counter()
    pipe.transformer.compile_repeated_blocks(fullgraph=True)
    tm.generate()  # compiles
    warm = time.perf_counter() - t0
    base = statistics.median(tm.generate()["pipeline"] for _ in range(2))
    counters = torch._dynamo.utils.counters
    before = sum(counters["stats"].values())
    switch = tm.switch(r_small)
    with_lora = statistics.median(tm.generate(lora=r_small)["pipeline"] for _ in range(2))
    back = tm.switch("")
    again = tm.generate()["pipeline"]
    recompiles = sum(counters["stats"].values()) - before
    report.add(sec, "first call (compile)", "", fmt_s(warm), "", "", "")
    report.add(sec, "per image no LoRA / with LoRA", "", f"{fmt_s(base)} / {fmt_s(with_lora)}",
               fmt_ratio(with_lora, base), "<= x1.05", verdict(with_lora / base <= 1.05))
    report.add(sec, "switch to LoRA / back (compiled)", "", f"{fmt_s(switch)} / {fmt_s(back)}", "", "", "")
    report.add(sec, "no LoRA after the switches", "", fmt_s(again), fmt_ratio(again, base), "", "")
    report.add(sec, "dynamo compile events during switches (0 = no recompile)", "", str(recompiles), "", "0",
               verdict(recompiles == 0))


# ---- main -------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--device", default=None, help="default: cpu in cpu mode, cuda in gpu mode")
    p.add_argument("--small", action="store_true", help="gpu mode at toy size (to check the code path on a CPU)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (gpu: 1024, cpu/small: 256)")
    p.add_argument("--iters", type=int, default=None, help="timed images per variant (gpu: 3, cpu: 2)")
    p.add_argument("--dev-steps", type=int, default=28)
    p.add_argument("--schnell-steps", type=int, default=4)
    p.add_argument("--tiny-steps", type=int, default=4, help="cpu mode")
    p.add_argument("--lora-strength", type=float, default=0.03,
                   help="random LoRA change of each weight relative to the weight (std ratio); trained LoRAs: a few per cent")
    p.add_argument("--ranks", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="LoRA ranks (gpu: 16,64; cpu: 4,8)")
    p.add_argument("--lora-iters", type=int, default=1)
    p.add_argument("--mem-switches", type=int, default=20)
    p.add_argument("--switches", type=int, default=50)
    p.add_argument("--compile", action="store_true", help="also time compile_repeated_blocks (gpu)")
    p.add_argument("--budget-s", type=float, default=420, help="stop optional work after this many seconds")
    p.add_argument("--out", default=None, help="folder for bench.md/bench.json (default: $OUT when set)")
    p.add_argument("--variants", default=None, help="comma list among schnell,dev (gpu mode)")
    p.add_argument("--models-dir", default=None, help="cpu mode: where the built-in tiny model is (built if missing)")
    args = p.parse_args(argv)
    gpu_full = args.mode == "gpu" and not args.small
    args.device = args.device or ("cuda" if args.mode == "gpu" else "cpu")
    args.size = args.size or (1024 if gpu_full else 256)
    args.iters = args.iters or (3 if gpu_full else 2)
    args.ranks = args.ranks or ([16, 64] if gpu_full else [4, 8])
    return args


def versions() -> list[str]:
    import diffusers
    import torch
    import transformers

    out = [f"torch {torch.__version__}", f"diffusers {diffusers.__version__}", f"transformers {transformers.__version__}"]
    try:
        import peft

        out.append(f"peft {peft.__version__}")
    except ImportError:
        pass
    return out


def run(args) -> Report:
    import torch

    started = time.monotonic()
    deadline = started + args.budget_s
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch sees no CUDA GPU (use --mode cpu)")
    # gpu mode is bf16 on any device, so its CPU check (--small --device cpu) runs the same dtype path.
    dtype = torch.bfloat16 if args.mode == "gpu" else torch.float32
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report = Report(device_name=name, mode=args.mode + (" small" if args.small else ""))
    report.data["versions"] = versions()
    if args.mode == "cpu":
        variants = [Variant("tiny", args.tiny_steps, 3.5, 512, True)]
        report.notes.append("CPU mode: the built-in tiny model; a smoke test, its times say little")
    else:
        wanted = (args.variants or "schnell,dev").split(",")
        variants = [v for v in (Variant("schnell", args.schnell_steps, 0.0, 256, False),
                                Variant("dev", args.dev_steps, 3.5, 512, True)) if v.name in wanted]
        report.notes.append(
            "Random weights, FLUX.1 architecture: full-size transformer and VAE in bf16, built on the device; "
            "the text encoders are small random stand-ins with the real output sizes (T5 4096, CLIP 768), "
            "since the per-image time is dominated by the transformer (and the prompt is encoded once per job)."
        )
    with tempfile.TemporaryDirectory(prefix="masuka-bench-") as tmp:
        work = Path(tmp)
        for index, variant in enumerate(variants):
            if args.mode == "cpu":
                pipe = build_tiny(Path(args.models_dir) if args.models_dir else work / "models")
            else:
                pipe = build_random_flux(variant, device, dtype, args.small)
            pipe.to(device)
            tm = TimedManager(pipe, variant, args.size, device, dtype, work / f"home-{variant.name}")
            try:
                gen = bench_generation(report, pipe, tm, variant, args.size, args.iters, device)
                if device.type == "cuda":
                    peak = torch.cuda.max_memory_allocated(device) / 2**30
                    report.data[f"peak_gib_{variant.name}"] = peak
                    report.add(f"{variant.name}", "peak GPU memory allocated (whole pipeline + activations)",
                               "", f"{peak:.1f} GiB", "", "", "")
                report.flush(args.out)
                if index == len(variants) - 1:
                    bench_empty_cache(report, device)
                    bench_loras(report, pipe, tm, variant, args.size, device, args, deadline, gen["pipeline"])
                    report.flush(args.out)
                    if args.compile:
                        if time.monotonic() < deadline - 60:
                            try:
                                bench_compile(report, pipe, tm, variant, args.size, device, f"r{args.ranks[0]}")
                            except Exception as exc:  # an optional section: report, keep the rest
                                log.exception("compile section failed")
                                report.notes.append(f"--compile failed: {type(exc).__name__}: {str(exc)[:300]}")
                        else:
                            report.notes.append("--compile skipped: not enough of the time budget left")
            finally:
                tm.close()
                del tm, pipe
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
    report.data["elapsed_s"] = time.monotonic() - started
    return report


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = parse_args(argv)
    args.out = args.out or os.environ.get("OUT") or None
    report = run(args)
    sys.stdout.write("\n" + report.markdown())
    report.flush(args.out)
    if args.out:
        log.info("wrote %s", Path(args.out) / "bench.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
