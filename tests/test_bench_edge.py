"""bench/edge.py runs end to end (a smoke test: timings are printed, never asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"(-?\d+(?:\.\d+)?)"


def cell_numbers(table: str, label: str) -> list[float]:
    """The numbers in the row of a markdown table that starts with `label`."""
    for line in table.splitlines():
        if line.startswith(f"| {label} |"):
            return [float(a or b) for a, b in re.findall(NUMBER + r" (?:ms|%)|x" + NUMBER, line)]
    raise AssertionError(f"no row {label!r} in:\n{table}")


def test_edge_bench_prints_the_table(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "edge.py"), "--calls", "5", "--warmup", "1", "--idle-seconds", "2",
         "--settle-seconds", "0.5", "--models-dir", str(tiny_model_dir.parent), "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (out / "edge.md").read_text(encoding="utf-8")
    assert table in proc.stdout
    bare, masuka, pipeline = (cell_numbers(table, label)[0] for label in (
        "bare Gradio app, per call", "MASUKA /generate, per call", "pipeline alone, per image"))
    assert bare > 0 and masuka > 0 and pipeline > 0
    overhead = cell_numbers(table, "MASUKA overhead beyond the pipeline")[0]
    assert abs(overhead - (masuka - pipeline)) < 0.2  # ms, rounding
    ratio = cell_numbers(table, "overhead / bare Gradio per call")
    assert abs(ratio[0] - overhead / bare) < 0.02 and ratio[1] == 1.1
    for label in ("idle CPU after start", "idle CPU after the calls"):
        bare_pct, masuka_pct, diff, goal = cell_numbers(table, label)
        assert bare_pct >= 0 and masuka_pct >= 0 and goal == 1
        assert abs(diff - (masuka_pct - bare_pct)) < 0.02
    assert (out / "edge.json").is_file()
    assert "network: 0 connection(s) or look-up(s) off this machine refused" in table


def test_saved_png_holds_the_exact_pixels_and_is_compressed(tmp_path):
    import numpy as np
    from PIL import Image

    from masuka.store.outputs import read_metadata, save_image

    gradient = np.add.outer(np.arange(256), np.arange(256)).astype(np.uint8) // 2
    rng = np.random.default_rng(0)
    pixels = np.stack([gradient, gradient.T, rng.integers(0, 4, (256, 256), dtype=np.uint8)], axis=-1)
    meta = {"prompt": "a gradient", "seed": 1, "job_id": "j1"}
    saved = save_image(Image.fromarray(pixels), tmp_path, meta, "j1-0-1")
    assert np.array_equal(np.asarray(Image.open(saved).convert("RGB")), pixels)  # lossless
    assert saved.stat().st_size < pixels.nbytes / 2  # and still compressed
    assert read_metadata(saved) == meta


def test_a_queued_job_is_recorded_with_its_seeds_in_one_write(tmp_path):
    import pytest

    from masuka.store.jobs import JobStore

    with JobStore(tmp_path / "masuka.db") as store:
        job_id = store.create(params={"prompt": "p", "seed": -1}, loras=[], status="queued", seeds=[5, 6])
        assert store.get(job_id)["seeds"] == [5, 6]
        with pytest.raises(ValueError, match="seed must be an integer"):
            store.create(params={"prompt": "p"}, loras=[], status="queued", seeds=["x"])
        assert [r["job_id"] for r in store.list()] == [job_id]  # the refused one left no record
