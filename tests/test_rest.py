"""The REST API (/api/v1) over HTTP against apps launched in the test: one plain, one with a password."""

from __future__ import annotations

import io
import re
import threading
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest
from conftest import launch_app, seed_home, wait_until
from PIL import Image

from masuka.settings import Settings
from masuka.studio import Caller

AUTH = ("u", "pw-long-enough")
QUEUE_SIZE = 4


@pytest.fixture(scope="module")
def app(tiny_model_dir, tmp_path_factory):
    home = seed_home(tmp_path_factory.mktemp("rest") / "home", tiny_model_dir)
    live = launch_app(Settings(home=home, queue_size=QUEUE_SIZE))
    yield live
    live.demo.close()
    live.studio.close()


@pytest.fixture(scope="module")
def api(app):
    with httpx.Client(base_url=app.url.rstrip("/"), timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def auth_app(tiny_model_dir, tmp_path_factory):
    home = seed_home(tmp_path_factory.mktemp("rest-auth") / "home", tiny_model_dir)
    live = launch_app(Settings(home=home, auth=AUTH, rate_limit_per_minute=2))
    yield live
    live.demo.close()
    live.studio.close()


@pytest.fixture(scope="module")
def auth_api(auth_app):
    with httpx.Client(base_url=auth_app.url.rstrip("/"), timeout=60) as client:
        yield client


def poll_until_ended(api, job_id: str, **kwargs) -> dict:
    def ended():
        record = api.get(f"/api/v1/jobs/{job_id}", **kwargs).json()
        return record if record["status"] not in ("queued", "running") else None

    return wait_until(ended, what=f"job {job_id} to end")


def rows_with_prompt(api, prompt: str, **params) -> list[dict]:
    return [row for row in api.get("/api/v1/jobs", params=params).json() if row["prompt"] == prompt]


def as_time(value) -> datetime:
    """A record's time: an ISO string, or (older stores) seconds since the epoch."""
    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return datetime.fromtimestamp(float(value), tz=timezone.utc)


@contextmanager
def held_runner(live):
    """The runner busy with a job that blocks after its first step until the block ends."""
    release, started = threading.Event(), threading.Event()

    def block(_done: int, _total: int) -> None:
        started.set()
        release.wait(60)

    studio = live.studio
    ticket = studio.submit(studio.validate(prompt="hold the line", steps=1), Caller(session="holder"), on_step=block)
    try:
        assert started.wait(60), "the holding job never started"
        yield
    finally:
        release.set()
        studio.outcome(ticket)


def test_generate_answers_202_then_poll_and_fetch_the_pngs(app, api):
    body = {"prompt": "a red fox", "seed": 5, "steps": 1, "height": 320, "num_images": 2}
    r = api.post("/api/v1/generate", json=body)
    assert r.status_code == 202
    queued = r.json()
    job_id = queued["job_id"]
    assert r.headers["Location"] == f"/api/v1/jobs/{job_id}"
    assert queued["status"] in ("queued", "running") and queued["prompt"] == "a red fox"
    assert queued["images"] == []
    assert "path" not in queued

    record = poll_until_ended(api, job_id)
    assert record["status"] == "completed" and record["seeds"] == [5, 6] and record["position"] is None
    assert record["images"] == [f"/api/v1/jobs/{job_id}/images/0", f"/api/v1/jobs/{job_id}/images/1"]
    for url in record["images"]:
        png = api.get(url)
        assert png.status_code == 200 and png.headers["content-type"] == "image/png"
        image = Image.open(io.BytesIO(png.content))
        assert image.format == "PNG" and image.size == (256, 320)

    assert job_id in [row["job_id"] for row in api.get("/api/v1/jobs", params={"status": "completed"}).json()]
    assert job_id not in [row["job_id"] for row in api.get("/api/v1/jobs", params={"status": "failed"}).json()]
    found = api.get("/api/v1/jobs", params={"search": "RED FOX", "limit": 5}).json()
    assert [row["job_id"] for row in found] == [job_id] and found[0]["seed"] == 5

    missing = api.get(f"/api/v1/jobs/{job_id}/images/2")
    assert missing.status_code == 404 and "no image 2" in missing.json()["detail"]
    assert api.get(f"/api/v1/jobs/{job_id}/images/-1").status_code == 404
    unknown = api.get("/api/v1/jobs/0123456789ab")
    assert unknown.status_code == 404 and unknown.json()["detail"] == "no job with id '0123456789ab'"
    assert api.get("/api/v1/jobs/0123456789ab/images/0").status_code == 404

    # A file gone from disk is a 404, not an error page.
    Path(record["outputs"][1]).unlink()
    gone = api.get(record["images"][1])
    assert gone.status_code == 404 and "no longer on disk" in gone.json()["detail"]


def test_wait_true_answers_with_the_ended_job(api):
    r = api.post("/api/v1/generate", params={"wait": "true"}, json={"prompt": "a lighthouse", "steps": 1})
    assert r.status_code == 200
    done = r.json()
    assert done["status"] == "completed" and len(done["images"]) == 1 and done["position"] is None
    assert api.get(done["images"][0]).headers["content-type"] == "image/png"

    failed = api.post("/api/v1/generate?wait=true", json={"prompt": "x", "lora": "ghost", "steps": 1})
    assert failed.status_code == 200
    record = failed.json()
    assert record["status"] == "failed" and "ghost" in record["error"] and record["images"] == []
    assert record["job_id"] in [row["job_id"] for row in api.get("/api/v1/jobs", params={"status": "failed"}).json()]


@pytest.mark.parametrize(
    "body, parameter, words",
    [
        ({"prompt": "x", "width": 300}, "width", ["multiple of 16", "300"]),
        ({"prompt": "x", "steps": 500}, "steps", ["100", "500"]),
        ({"prompt": "x", "steps": "many"}, "steps", ["number"]),
        ({"prompt": ""}, "prompt", ["non-empty"]),
        ({"steps": 2}, "prompt", ["required"]),
        ({"prompt": "x", "colour": "red"}, "colour", ["unknown parameter"]),
        ({"prompt": "x", "lora": "../../etc/passwd"}, "lora", ["LoRA name"]),
        (["not", "an", "object"], "body", []),
    ],
)
def test_invalid_requests_are_422_naming_the_parameter(api, body, parameter, words):
    before = len(api.get("/api/v1/jobs", params={"limit": 1000}).json())
    r = api.post("/api/v1/generate", json=body)
    assert r.status_code == 422
    answer = r.json()
    assert answer["parameter"] == parameter
    for word in words:
        assert word in answer["detail"]
    assert len(api.get("/api/v1/jobs", params={"limit": 1000}).json()) == before  # no job was made


@pytest.mark.parametrize(
    "params, parameter",
    [({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "ten"}, "limit"), ({"status": "done"}, "status")],
)
def test_bad_history_parameters_are_422(api, params, parameter):
    r = api.get("/api/v1/jobs", params=params)
    assert r.status_code == 422 and r.json()["parameter"] == parameter and parameter in r.json()["detail"]


def test_cancel_a_waiting_job(app, api):
    outcome: dict = {}

    def wait_for_it() -> None:
        body = {"prompt": "never drawn", "steps": 1}
        outcome["answer"] = api.post("/api/v1/generate", params={"wait": "true"}, json=body)

    with held_runner(app):
        first = api.post("/api/v1/generate", json={"prompt": "cancel me", "steps": 1}).json()
        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        second = wait_until(lambda: rows_with_prompt(api, "never drawn", status="queued"), what="the waiting job")[0]
        assert api.get(f"/api/v1/jobs/{second['job_id']}").json()["position"] == 2

        r = api.post(f"/api/v1/jobs/{first['job_id']}/cancel")
        assert r.status_code == 200
        assert r.json()["cancelled"] is True and r.json()["status"] == "cancelled"
        assert api.get(f"/api/v1/jobs/{second['job_id']}").json()["position"] == 1  # moved up

        assert api.post(f"/api/v1/jobs/{second['job_id']}/cancel").json()["cancelled"] is True
        waiter.join(30)
        assert outcome["answer"].status_code == 200 and outcome["answer"].json()["status"] == "cancelled"

    again = api.post(f"/api/v1/jobs/{first['job_id']}/cancel")
    assert again.status_code == 200 and again.json()["cancelled"] is False
    record = api.get(f"/api/v1/jobs/{first['job_id']}").json()
    assert record["status"] == "cancelled" and record["started_at"] is None and record["images"] == []
    assert api.post("/api/v1/jobs/0123456789ab/cancel").status_code == 404


def test_rest_and_gradio_client_share_one_fifo_queue(app, api):
    client = app.client()
    job_ids, pending = [], []
    with held_runner(app):
        for i in range(QUEUE_SIZE):
            if i % 2 == 0:
                r = api.post("/api/v1/generate", json={"prompt": f"rest {i}", "steps": 1, "seed": i})
                assert r.status_code == 202
                job_ids.append(r.json()["job_id"])
            else:
                pending.append(client.submit(prompt=f"client {i}", steps=1, seed=i, api_name="/generate"))
                newest = wait_until(
                    lambda: rows_with_prompt(api, f"client {i}", limit=1), what=f"gradio_client job {i} in the queue"
                )[0]
                job_ids.append(newest["job_id"])
        positions = [api.get(f"/api/v1/jobs/{job_id}").json()["position"] for job_id in job_ids]
        assert positions == [1, 2, 3, 4]

        full = api.post("/api/v1/generate", json={"prompt": "one too many", "steps": 1})
        assert full.status_code == 503 and "queue is full" in full.json()["detail"]
        assert int(full.headers["Retry-After"]) > 0

    for job in pending:
        job.result(timeout=60)
    records = [poll_until_ended(api, job_id) for job_id in job_ids]
    assert [r["status"] for r in records] == ["completed"] * QUEUE_SIZE
    assert [r["prompt"] for r in records] == [f"{'rest' if i % 2 == 0 else 'client'} {i}" for i in range(QUEUE_SIZE)]
    started = [as_time(r["started_at"]) for r in records]
    finished = [as_time(r["finished_at"]) for r in records]
    assert started == sorted(started)
    assert all(finished[i] <= started[i + 1] for i in range(QUEUE_SIZE - 1))  # one at a time, in order


def test_loras_lists_the_library(app, api):
    from lora_factory import make_peft_lora

    assert api.get("/api/v1/loras").json() == []
    make_peft_lora(app.studio.loaded.pipe.transformer, app.studio.lora_folder / "paper-cut.safetensors")
    loras = api.get("/api/v1/loras").json()
    assert [entry["name"] for entry in loras] == ["paper-cut"]
    assert loras[0]["sha256"] and loras[0]["size_bytes"] > 0


def test_gradio_routes_still_answer_beside_the_rest_api(app, api):
    assert api.get("/").status_code == 200
    assert api.get("/gradio_api/info").status_code == 200
    assert api.get("/api/v1/openapi.json").json()["info"]["title"] == "MASUKA REST API"
    assert "/api/v1/openapi.json" in api.get("/api/v1/docs").text


@pytest.mark.parametrize(
    "method, path",
    [
        ("GET", "/api/v1/jobs"),
        ("GET", "/api/v1/loras"),
        ("GET", "/api/v1/docs"),
        ("GET", "/api/v1/openapi.json"),
        ("GET", "/api/v1/jobs/0123456789ab/images/0"),
        ("POST", "/api/v1/generate"),
    ],
)
def test_every_route_needs_the_password(auth_api, method, path):
    for credentials in (None, (AUTH[0], "wrong-password"), ("someone", AUTH[1])):
        r = auth_api.request(method, path, json={"prompt": "x"} if method == "POST" else None, auth=credentials)
        assert r.status_code == 401
        assert r.headers["WWW-Authenticate"] == 'Basic realm="MASUKA"'
    prompts = [row["prompt"] for row in auth_api.get("/api/v1/jobs", auth=AUTH).json()]
    assert "x" not in prompts  # the refused generate made no job


def test_right_password_opens_the_api_and_docs(auth_api):
    assert auth_api.get("/api/v1/loras", auth=AUTH).status_code == 200
    docs = auth_api.get("/api/v1/docs", auth=AUTH)
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    schema = auth_api.get("/api/v1/openapi.json", auth=AUTH).json()
    assert "/generate" in schema["paths"] and "/jobs/{job_id}/images/{index}" in schema["paths"]


def test_rate_limit_counts_rest_and_client_jobs_of_one_login(auth_app, auth_api):
    client = auth_app.client(auth=AUTH)
    _images, by_client = client.predict(prompt="first", steps=1, api_name="/generate")
    assert by_client["user"] == AUTH[0]
    by_rest = auth_api.post("/api/v1/generate?wait=true", json={"prompt": "second", "steps": 1}, auth=AUTH)
    assert by_rest.status_code == 200 and by_rest.json()["user"] == AUTH[0]

    third = auth_api.post("/api/v1/generate", json={"prompt": "third", "steps": 1}, auth=AUTH)
    assert third.status_code == 429 and "rate limit" in third.json()["detail"]
    assert 0 < int(third.headers["Retry-After"]) <= 60
    prompts = [row["prompt"] for row in auth_api.get("/api/v1/jobs", auth=AUTH).json()]
    assert "third" not in prompts and {"first", "second"} <= set(prompts)


def test_cancelling_another_logins_job_is_403(auth_app, auth_api):
    studio = auth_app.studio
    ticket = studio.submit(studio.validate(prompt="not yours", steps=1), Caller(user="someone-else"))
    try:
        r = auth_api.post(f"/api/v1/jobs/{ticket.job_id}/cancel", auth=AUTH)
        assert r.status_code == 403 and "another user" in r.json()["detail"]
    finally:
        studio.outcome(ticket)
    assert auth_api.get(f"/api/v1/jobs/{ticket.job_id}", auth=AUTH).json()["status"] == "completed"


def test_readme_lists_every_rest_route(api):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Use it over REST", 1)[1].split("\n## ", 1)[0]
    schema = api.get("/api/v1/openapi.json").json()
    for path, methods in schema["paths"].items():
        for method in methods:
            route = re.compile(rf"`{method.upper()} /api/v1{re.escape(path)}[`?]")
            assert route.search(section), f"README misses {method.upper()} {path}"
