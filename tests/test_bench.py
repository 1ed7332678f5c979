"""bench/bench.py runs end to end in CPU mode (a smoke test: no timing is asserted)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_cpu_mode_prints_and_writes_the_table(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench.py"), "--mode", "cpu", "--tiny-steps", "2", "--iters", "1", "--ranks", "4",
         "--switches", "3", "--mem-switches", "2", "--models-dir", str(tiny_model_dir.parent), "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "bench.md").read_text(encoding="utf-8")
    assert table in proc.stdout
    for words in ("| raw diffusers | MASUKA | ratio |", "per image (median of 1), pipeline part", "PNG save",
                  "switch to a LoRA used before (none -> r4)", "switch no LoRA -> LoRA", "no-LoRA image after 4 switches"):
        assert words in table
    assert "**no**" not in table.split("no-LoRA image after")[1].splitlines()[0]  # exactness is not timing
    assert "gradio" not in proc.stderr
    assert (out / "bench.json").is_file()
