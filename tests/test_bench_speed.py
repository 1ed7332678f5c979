"""bench/speed.py runs tiny and its table parses (a smoke test: no timing is asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_speed_bench_reports_steps_skipped_and_exact_unchanged(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"} | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "speed.py"), "--steps", "6", "--iters", "1", "--thresholds", "0.08,0.35",
         "--models-dir", str(tiny_model_dir.parent), "--out", str(out)],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (out / "speed.md").read_text(encoding="utf-8")
    assert text in proc.stdout
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| exact") or
            line.startswith("| fast")]
    assert [r[0].strip() for r in rows] == ["exact", "fast", "fast"]
    for cells in rows:
        run, skipped = int(cells[3]), int(cells[4])
        assert run + skipped == 6 and float(cells[2]) > 0 and cells[5].strip().endswith("x")
    assert int(rows[0][4]) == 0
    assert "Exact image unchanged after the fast runs: yes" in text
    result = json.loads((out / "speed.json").read_text(encoding="utf-8"))
    assert [r["threshold"] for r in result["rows"]] == [None, 0.08, 0.35]
