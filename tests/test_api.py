"""Every endpoint through gradio_client against an app launched in the test."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from conftest import walk_keys
from gradio_client.exceptions import AppError
from PIL import Image




def image_files(images):
    return [img if isinstance(img, str) else img.get("path") or img.get("image") for img in images]


def test_generate_history_job_loras(live_app):
    client = live_app.client()
    images, record = client.predict(prompt="a red fox", seed=3, num_images=2, api_name="/generate")
    files = image_files(images)
    assert len(files) == 2
    a = np.asarray(Image.open(files[0]))
    assert a.shape == (256, 256, 3)
    assert record["status"] == "completed" and record["seed"] == 3 and record["seeds"] == [3, 4]
    assert "path" not in set(walk_keys(record))
    again, _ = client.predict(prompt="a red fox", seed=4, api_name="/generate")
    assert np.array_equal(np.asarray(Image.open(image_files(again)[0])), np.asarray(Image.open(files[1])))

    rows = client.predict(limit=10, api_name="/history")
    assert rows[0]["job_id"] != rows[1]["job_id"]
    assert {r["job_id"] for r in rows} >= {record["job_id"]}
    assert set(rows[0]) >= {"job_id", "created_at", "status", "prompt", "lora", "seed", "steps", "duration_s", "error"}

    full = client.predict(job_id=record["job_id"], api_name="/job")
    assert full["prompt"] == "a red fox" and len(full["outputs"]) == 2 and full["traceback"] in (None, "")
    assert "path" not in set(walk_keys(full))

    loras = client.predict(api_name="/loras")
    assert loras == []


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({"prompt": ""}, ["prompt"]),
        ({"prompt": "x", "width": 300}, ["width", "multiple of 16"]),
        ({"prompt": "x", "steps": 500}, ["steps", "100"]),
        ({"prompt": "x", "guidance": 99}, ["guidance", "30"]),
        ({"prompt": "x", "num_images": 20}, ["num_images", "8"]),
        ({"prompt": "x", "lora": "../../etc/passwd"}, ["LoRA name"]),
    ],
)
def test_invalid_parameters_are_clear_errors(live_app, kwargs, words):
    client = live_app.client()
    with pytest.raises(AppError) as info:
        client.predict(**kwargs, api_name="/generate")
    for w in words:
        assert w in str(info.value)
    images, record = client.predict(prompt="still serving", api_name="/generate")
    assert record["status"] == "completed"


def test_unknown_lora_fails_with_job_id_and_traceback(live_app):
    client = live_app.client()
    with pytest.raises(AppError) as info:
        client.predict(prompt="x", lora="ghost", api_name="/generate")
    message = str(info.value)
    assert "ghost" in message and "job " in message
    failed = client.predict(limit=1, api_name="/history")[0]
    assert failed["status"] == "failed" and "ghost" in failed["error"] and failed["job_id"] in message
    detail = client.predict(job_id=failed["job_id"], api_name="/job")
    assert "Traceback" in detail["traceback"] and "ghost" in detail["error"]


def test_job_that_does_not_exist(live_app):
    with pytest.raises(AppError, match="no job"):
        live_app.client().predict(job_id="doesnotexist", api_name="/job")


def test_cancel_a_running_job_and_read_endpoints_answer_while_it_runs(live_app):
    client = live_app.client()
    job = client.submit(prompt="long", steps=100, width=512, height=512, api_name="/generate")
    running = None
    deadline = time.time() + 60
    while time.time() < deadline and running is None:
        t0 = time.perf_counter()
        rows = client.predict(limit=5, status="running", api_name="/history")
        assert time.perf_counter() - t0 < 5  # history answers at once, beside the GPU job
        running = rows[0]["job_id"] if rows else None
        time.sleep(0.05)
    assert running
    out = client.predict(job_id=running, api_name="/cancel")
    assert out["cancelled"] is True
    images, record = job.result(timeout=60)
    assert images == [] and record["status"] == "cancelled"
    assert client.predict(job_id=running, api_name="/job")["status"] == "cancelled"
    assert client.predict(job_id=running, api_name="/cancel")["cancelled"] is False


def test_queue_cannot_be_skipped(live_app):
    import httpx

    r = httpx.post(f"{live_app.url}gradio_api/api/generate", json={"data": ["x"]}, timeout=30)
    assert r.status_code == 404
