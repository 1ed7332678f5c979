"""Faults, each recorded and recovered from: out of memory, a LoRA that fails halfway,
cancel, a killed process, a full or read-only disk.

Faults are injected by patching at the boundary (the pipeline call, peft's layer
injection, the PNG write, the rename); the application carries no test switches.
"""

from __future__ import annotations

import errno
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, pixels
from masuka.core.runner import JobFailed


def run(manager, **kw):
    kw.setdefault("prompt", "a lighthouse at dusk")
    kw.setdefault("seed", 7)
    kw.setdefault("steps", 2)
    return manager.generate(manager.validate(**kw))


def assert_nothing_stuck(manager) -> None:
    assert manager.jobs.list(status="running") == [] and manager.jobs.list(status="queued") == []


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_weights(module: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    now = module.state_dict()
    assert sorted(now) == sorted(before), "the module's layers changed (a LoRA layer is still wrapped in)"
    changed = [k for k in before if not torch.equal(now[k], before[k])]
    assert changed == [], f"weights not restored exactly: {changed[:3]}"


def no_lora_layers(module: torch.nn.Module) -> bool:
    return not any(hasattr(m, "lora_A") for m in module.modules())


# --------------------------------------------------------------------------- out of memory


def test_cuda_oom_fails_the_job_with_advice_releases_memory_and_the_next_job_runs(manager, monkeypatch):
    pipe_type = type(manager.pipe)
    calls: list[str] = []

    def out_of_memory(self, *args, **kwargs):
        calls.append("pipe")
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as patch:
        patch.setattr(pipe_type, "__call__", out_of_memory)
        # Seen from the CPU: pretend a GPU is there, to watch the cache being emptied.
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
        patch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
        patch.setattr(torch.cuda, "memory_reserved", lambda *a, **k: 0)
        with pytest.raises(JobFailed) as info:
            run(manager, width=1024, height=1024, num_images=4)
    assert calls == ["pipe", "empty_cache"]
    reason = info.value.reason
    for words in ("out of memory", "smaller", "fewer images", "--memory"):
        assert words in reason, reason
    record = manager.jobs.get(info.value.job_id)
    assert record["status"] == "failed" and record["error"] == reason
    assert "OutOfMemoryError" in record["traceback"]
    assert record["outputs"] == [] and not list(manager.outputs_dir.rglob(f"{info.value.job_id}*"))
    assert run(manager).status == "completed"
    assert_nothing_stuck(manager)


# --------------------------------------------------------------------------- LoRA failing halfway


def _lora_with_bias(transformer, path: Path) -> Path:
    """A PEFT LoRA that also trains lora_B biases: only diffusers' adapters can apply it."""
    from safetensors.torch import load_file, save_file

    from lora_factory import make_peft_lora

    make_peft_lora(transformer, path, seed=5)
    state = load_file(str(path))
    for key in [k for k in state if k.endswith("lora_B.weight")]:
        state[key[: -len("weight")] + "bias"] = torch.full((state[key].shape[0],), 0.05)
    save_file(state, str(path), metadata={"format": "pt"})
    return path


def _fail_after_first(monkeypatch, owner, attribute: str, failures: list[int]) -> None:
    real = getattr(owner, attribute)

    def flaky(*args, **kwargs):
        failures[0] += 1
        if failures[0] >= 2:
            raise RuntimeError("injected: the LoRA load broke after its first layer")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attribute, flaky)


@pytest.mark.parametrize("path", ["adapters", "fused"])
def test_lora_failing_halfway_leaves_the_pipeline_with_no_lora(manager, monkeypatch, path):
    transformer = manager.pipe.transformer
    lora_file = manager.loras.folder / "half.safetensors"
    if path == "adapters":
        import peft.tuners.lora.layer as lora_layer

        _lora_with_bias(transformer, lora_file)
        owner, attribute = lora_layer.LoraLayer, "update_layer"
    else:
        fastlora = pytest.importorskip("masuka.core.fastlora")
        from lora_factory import make_peft_lora

        make_peft_lora(transformer, lora_file, seed=6)
        owner, attribute = fastlora, "_fuse_one"
    manager.loras.scan()
    base = pixels(run(manager).images[0])
    original = weights(transformer)

    failures = [0]
    with monkeypatch.context() as patch:
        _fail_after_first(patch, owner, attribute, failures)
        with pytest.raises(JobFailed) as info:
            run(manager, lora="half")
    assert failures[0] >= 2, "the injected failure was never reached"
    record = manager.jobs.get(info.value.job_id)
    assert record["status"] == "failed" and "injected" in record["error"]
    # Not a half state: no adapter, no wrapped layer, every weight bit as it was.
    assert no_lora_layers(transformer)
    assert manager.active_loras() == []
    assert_same_weights(transformer, original)
    assert np.array_equal(pixels(run(manager).images[0]), base)
    # And the LoRA itself still works once loading works.
    with_lora = run(manager, lora="half")
    assert with_lora.status == "completed" and not np.array_equal(pixels(with_lora.images[0]), base)
    assert_nothing_stuck(manager)


# --------------------------------------------------------------------------- cancel


# --------------------------------------------------------------------------- killed process

# A second process that shares the home and owns a running job (no model needed for that).
HOLDER = r"""
import sys, threading
from pathlib import Path
from masuka.studio import build_studio
from masuka.settings import Settings

runner = build_studio(Settings(home=Path(sys.argv[1]))).runner

def on_step(done, total):
    print("RUNNING", flush=True)
    threading.Event().wait()  # a very long generation

ticket = runner.submit(runner.validate(prompt=sys.argv[2], steps=50), on_step=on_step)
print("JOB", ticket.job_id, flush=True)
ticket.done.wait()
"""


def _start_holder(home: Path, prompt: str, script: str = HOLDER) -> tuple[subprocess.Popen, queue.Queue]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(home), prompt],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line.strip()) for line in proc.stdout], daemon=True).start()
    return proc, lines


def _wait_running(proc, lines: queue.Queue, timeout: float = 120) -> str:
    job_id = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            assert proc.poll() is None, "the job holder exited early"
            continue
        if line.startswith("JOB "):
            job_id = line.split()[1]
        elif line == "RUNNING" and job_id:
            return job_id
    raise AssertionError("the job holder never started its job")


def test_a_job_of_a_killed_app_is_interrupted_at_restart_and_the_app_serves(home):
    """(That a job whose process still lives is left alone is tested at the store, test_jobs.)"""
    from masuka.settings import Settings
    from masuka.studio import build_studio

    killed, killed_out = _start_holder(home, "killed mid-job")
    try:
        killed_job = _wait_running(killed, killed_out)
        killed.send_signal(signal.SIGKILL)
        killed.wait(30)
    finally:
        if killed.poll() is None:
            killed.kill()
            killed.wait(30)
    studio = build_studio(Settings(home=home))  # the restart
    try:
        record = studio.job(killed_job)
        assert record["status"] == "interrupted" and "process ended" in record["error"]
        assert run(studio.runner).status == "completed"
    finally:
        studio.close()


def _leftovers(outputs: Path, job_id: str) -> list[Path]:
    return [p for p in outputs.rglob("*") if p.is_file() and (p.suffix == ".partial" or job_id in p.name)]


def test_disk_full_while_writing_the_second_image(manager, monkeypatch):
    real_save = Image.Image.save
    writes = [0]

    def save(self, fp, *args, **kwargs):
        writes[0] += 1
        if writes[0] == 2:
            fp.write(b"\x89PNG half an image")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(self, fp, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Image.Image, "save", save)
        with pytest.raises(JobFailed) as info:
            run(manager, num_images=2)
    job_id = info.value.job_id
    assert "No space left on device" in info.value.reason
    record = manager.jobs.get(job_id)
    assert record["status"] == "failed" and "No space left on device" in record["error"]
    assert record["outputs"] == []
    assert _leftovers(manager.outputs_dir, job_id) == []  # neither the half image nor the first, whole one
    assert run(manager).status == "completed"
    assert_nothing_stuck(manager)


def test_read_only_disk_at_the_final_rename(manager, monkeypatch):
    import masuka.store.outputs

    real_replace = os.replace
    outputs = str(manager.outputs_dir)

    def replace(src, dst, *args, **kwargs):
        if str(dst).startswith(outputs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(masuka.store.outputs.os, "replace", replace)
        with pytest.raises(JobFailed) as info:
            run(manager)
    job_id = info.value.job_id
    assert "Read-only file system" in info.value.reason
    record = manager.jobs.get(job_id)
    assert record["status"] == "failed" and "Read-only file system" in record["error"]
    assert record["outputs"] == [] and _leftovers(manager.outputs_dir, job_id) == []
    row = manager.jobs.history(limit=5)[0]
    assert row["job_id"] == job_id and row["status"] == "failed"
    assert run(manager).status == "completed"
    assert_nothing_stuck(manager)
