"""Every endpoint through gradio_client against an app launched in the test."""

from __future__ import annotations


import numpy as np
import pytest
from conftest import walk_keys
from gradio_client.exceptions import AppError
from conftest import launch_app, wait_until
from PIL import Image


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    from conftest import seed_home

    from masuka.settings import Settings

    live = launch_app(Settings(home=seed_home(tmp_path_factory.mktemp("api") / "home", tiny_model_dir)))
    yield live
    live.demo.close()
    live.studio.close()


def image_files(images):
    return [img if isinstance(img, str) else img.get("path") or img.get("image") for img in images]


def test_generate_history_job_loras(app):
    client = app.client()
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
    # A stranger reading records learns no browser session id (it drove the page's cancel) and no process.
    assert not {"session", "owner"} & (set(full) | set(record) | set(rows[0]))
    assert app.studio.jobs.get(record["job_id"])["session"]  # the studio itself still knows it
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
def test_invalid_parameters_are_clear_errors(app, kwargs, words):
    client = app.client()
    with pytest.raises(AppError) as info:
        client.predict(**kwargs, api_name="/generate")
    for w in words:
        assert w in str(info.value)
    images, record = client.predict(prompt="still serving", api_name="/generate")
    assert record["status"] == "completed"


def test_unknown_lora_fails_with_job_id_and_traceback(app):
    client = app.client()
    with pytest.raises(AppError) as info:
        client.predict(prompt="x", lora="ghost", api_name="/generate")
    message = str(info.value)
    assert "ghost" in message and "job " in message
    failed = client.predict(limit=1, api_name="/history")[0]
    assert failed["status"] == "failed" and "ghost" in failed["error"] and failed["job_id"] in message
    detail = client.predict(job_id=failed["job_id"], api_name="/job")
    assert "Traceback" in detail["traceback"] and "ghost" in detail["error"]


def test_reads_answer_and_cancel_works_while_the_runner_is_busy(app, holding):
    """The runner is held by a job that never ends by itself: anything that waited for it would hang."""
    client = app.client()
    holder = holding(app.studio, prompt="held")
    waiting = client.submit(prompt="waits its turn", api_name="/generate")
    wait_until(lambda: app.studio.position(newest(client)["job_id"]) == 1)
    queued = newest(client)
    assert queued["status"] == "queued" and queued["prompt"] == "waits its turn"
    for name, kwargs in [("/history", {"limit": 5}), ("/job", {"job_id": holder.job_id}), ("/loras", {})]:
        client.submit(**kwargs, api_name=name).result(timeout=30)  # answers while the GPU is held
    assert client.predict(job_id=queued["job_id"], api_name="/cancel") == {
        "job_id": queued["job_id"], "cancelled": True, "status": "cancelled"}
    images, record = waiting.result(timeout=30)
    assert images == [] and record["status"] == "cancelled" and record["started_at"] is None
    assert client.predict(job_id=holder.job_id, api_name="/cancel")["cancelled"] is True
    holder.release()
    assert client.predict(job_id=holder.job_id, api_name="/job")["status"] == "cancelled"
    assert client.predict(job_id=holder.job_id, api_name="/cancel")["cancelled"] is False


def newest(client):
    return client.predict(limit=1, api_name="/history")[0]
