"""Speed settings: exact vs fast (First Block Cache) on the built-in tiny model.

    python bench/speed.py                               # 28 steps, 256x256, 3 timed images each
    python bench/speed.py --steps 4 --iters 1 --thresholds 0.08   # a quick smoke run (CI)

For each threshold it times whole images (the transformer loop and the VAE decode) with
the cache on (`--method`: first-block or mag), the same way the runner switches it (`masuka.core.speed.step_cache`), and
counts how many transformer steps ran in full and how many were skipped (the cache's own
decision, counted by wrapping diffusers' head-block hook). Exact runs are interleaved with
the fast ones, and the first exact image is also checked to come back bit-identical after
the fast runs. Pixel difference: mean absolute difference of the 8-bit RGB image against
the exact one (0-255). The tiny model has random weights: its skip share is a rough signal,
not FLUX.1-dev's.

Prints a markdown table; writes it to `$OUT/speed.md` (+ `speed.json`) when `$OUT` is set,
or to `--out`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench.speed")
PROMPT = "a lighthouse at dusk"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--iters", type=int, default=3, help="timed images per setting (the median is reported)")
    p.add_argument("--method", default="first-block", choices=("first-block", "mag"), help="the fast jobs' cache")
    p.add_argument("--thresholds", default="0.05,0.08,0.12,0.2,0.35", help="comma-separated cache thresholds")
    p.add_argument("--models-dir", type=Path, default=None, help="where the tiny model is (built there if missing)")
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args(argv)


class SkipCounter:
    """Counts the cache's own decisions, step by step: full steps and skipped steps."""

    def __init__(self) -> None:
        from diffusers.hooks import first_block_cache, mag_cache

        self.full = self.skipped = 0
        counter = self
        fbc = first_block_cache.FBCHeadBlockHook
        fbc_check = fbc._should_compute_remaining_blocks

        def fbc_counted(self, residual):
            compute = fbc_check(self, residual)
            counter.count(compute)
            return compute

        fbc._should_compute_remaining_blocks = fbc_counted
        mag = mag_cache.MagCacheHeadHook
        mag_forward = mag.new_forward

        def mag_counted(self, module, *args, **kwargs):
            out = mag_forward(self, module, *args, **kwargs)
            counter.count(self.state_manager.get_state().should_compute)
            return out

        mag.new_forward = mag_counted

    def count(self, compute: bool) -> None:
        if compute:
            self.full += 1
        else:
            self.skipped += 1

    def reset(self) -> None:
        self.full = self.skipped = 0


def image(pipe, args, cache) -> tuple[float, "object"]:
    import numpy as np
    import torch

    from masuka.core.speed import step_cache

    generator = torch.Generator(device="cpu").manual_seed(7)
    started = time.perf_counter()
    with torch.inference_mode(), step_cache(pipe.transformer, cache, args.steps):
        out = pipe(PROMPT, width=args.size, height=args.size, num_inference_steps=args.steps, guidance_scale=3.5,
                   generator=generator, output_type="np")
    seconds = time.perf_counter() - started
    return seconds, (np.clip(out.images[0], 0, 1) * 255).round().astype(np.int16)


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch
    from diffusers import FluxPipeline

    from masuka.core.speed import StepCache
    from masuka.model.tiny import ensure_tiny_model

    models = args.models_dir or Path(os.environ.get("MASUKA_HOME", Path.home() / ".masuka")) / "models"
    pipe = FluxPipeline.from_pretrained(str(ensure_tiny_model(models)), torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    counter = SkipCounter()
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
    image(pipe, args, None)  # warm-up
    exact_times, fast = [], {t: {"times": [], "full": 0, "skipped": 0} for t in thresholds}
    _s, reference = image(pipe, args, None)
    pixels = {}
    for _ in range(args.iters):
        seconds, exact = image(pipe, args, None)
        exact_times.append(seconds)
        for t in thresholds:
            counter.reset()
            seconds, picture = image(pipe, args, StepCache(args.method, t))
            fast[t]["times"].append(seconds)
            fast[t]["full"], fast[t]["skipped"] = counter.full, counter.skipped
            pixels[t] = float(np.abs(picture - reference).mean())
    _s, after = image(pipe, args, None)
    exact_s = statistics.median(exact_times)
    rows = [{"speed": "exact", "threshold": None, "seconds": exact_s, "full": args.steps, "skipped": 0,
             "speedup": 1.0, "pixel_diff": 0.0}]
    for t in thresholds:
        s = statistics.median(fast[t]["times"])
        rows.append({"speed": "fast", "threshold": t, "seconds": s, "full": fast[t]["full"],
                     "skipped": fast[t]["skipped"], "speedup": exact_s / s, "pixel_diff": pixels[t]})
    return {"method": args.method, "steps": args.steps, "size": args.size, "iters": args.iters, "torch_threads": torch.get_num_threads(),
            "exact_unchanged_after_fast": bool(np.array_equal(reference, after)), "rows": rows}


def table(result: dict) -> str:
    lines = [
        f"Tiny model, CPU, cache {result['method']}, {result['size']}x{result['size']}, {result['steps']} steps, median of "
        f"{result['iters']} image(s), {result['torch_threads']} torch threads.",
        "",
        "| speed | threshold | s/image | transformer steps run | skipped | speed-up | mean pixel diff vs exact |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        threshold = "-" if r["threshold"] is None else f"{r['threshold']:g}"
        lines.append(f"| {r['speed']} | {threshold} | {r['seconds']:.3f} | {r['full']} | {r['skipped']} | "
                     f"{r['speedup']:.2f}x | {r['pixel_diff']:.2f} |")
    lines += ["", f"Exact image unchanged after the fast runs: {'yes' if result['exact_unchanged_after_fast'] else '**no**'}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING)
    args = parse_args(argv)
    result = run(args)
    text = table(result)
    sys.stdout.write(text)
    out = args.out or (Path(os.environ["OUT"]) if os.environ.get("OUT") else None)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.md").write_text(text, encoding="utf-8")
        (out / "speed.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0 if result["exact_unchanged_after_fast"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
