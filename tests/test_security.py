"""Strangers: the share-link password, the queue, file access, the rate limit and hostile input.

Every test here would fail if the protection it names were taken out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from gradio_client.exceptions import AppError

from conftest import ROOT, launch_app, seed_home, wait_until

GENERATE_ARGS = ("prompt", "lora", "lora_scale", "seed", "steps", "guidance", "width", "height", "num_images",
                 "speed")
SHARE_ENV = ("GRADIO_SHARE", "MASUKA_AUTH", "COLAB_RELEASE_TAG", "COLAB_GPU")


def close(app) -> None:
    app.demo.close()
    app.studio.close()


def stuck_jobs(manager) -> list[dict]:
    return manager.jobs.list(status="queued") + manager.jobs.list(status="running")


def raw_call(base_url: str, api_name: str, body: str, *, timeout: float = 60) -> tuple[str, object]:
    """POST raw JSON text to /gradio_api/call/<name> (through the queue) and read the SSE answer.

    Returns ("complete", data) or ("error", message); ("http <code>", text) when refused up front.
    """
    r = httpx.post(
        f"{base_url}gradio_api/call/{api_name}",
        content=body.encode(),
        headers={"content-type": "application/json"},
        timeout=timeout,
    )
    if r.status_code != 200:
        return f"http {r.status_code}", r.text
    event_id = r.json()["event_id"]
    event = None
    with httpx.stream("GET", f"{base_url}gradio_api/call/{api_name}/{event_id}", timeout=timeout) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line[len("event: ") :].strip()
            elif line.startswith("data: ") and event in ("complete", "error"):
                data = json.loads(line[len("data: ") :])
                if event == "error":
                    return "error", (data or {}).get("error") if isinstance(data, dict) else str(data)
                return "complete", data
    raise AssertionError(f"no answer for {api_name} {body[:80]}")


def generate_body(**kwargs) -> str:
    """A /call/generate body; values given as text are written into the JSON as they are
    (so NaN / Infinity / -Infinity literals reach the server)."""
    values = {"prompt": "a calm lake", "lora": "", "lora_scale": 1.0, "seed": 1, "steps": 1}
    values.update(kwargs)
    parts = []
    for name in GENERATE_ARGS:
        value = values.get(name)
        parts.append(value.literal if isinstance(value, Literal) else json.dumps(value))
    return '{"data": [' + ", ".join(parts) + "]}"


class Literal:
    def __init__(self, literal: str):
        self.literal = literal

    def __repr__(self) -> str:
        return self.literal


# --------------------------------------------------------------------------- 1. the public link


def _app_env(home: Path, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SHARE_ENV}
    env.update({"MASUKA_HOME": str(home), "PYTHONPATH": str(ROOT)}, **extra)
    return env


@pytest.mark.parametrize(
    "args, env",
    [
        (["--share"], {}),
        ([], {"COLAB_RELEASE_TAG": "release-colab_20260101-060000_RC00"}),
        ([], {"COLAB_GPU": "1"}),
        ([], {"GRADIO_SHARE": "true"}),
        ([], {"GRADIO_SHARE": "1"}),
    ],
    ids=["--share", "colab-tag", "colab-gpu", "GRADIO_SHARE=true", "GRADIO_SHARE=1"],
)
def test_share_link_without_password_refuses_to_start(tmp_path, args, env):
    home = tmp_path / "home"
    started = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "app.py"), *args],
            env=_app_env(home, env),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=45,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"app.py {args} {env} started instead of refusing")
    took = time.perf_counter() - started
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, output
    assert "--auth" in output and "MASUKA_AUTH" in output, output
    assert took < 20, f"refusing took {took:.1f} s: something heavy ran first"
    assert not home.exists(), "the home folder was created: the app got as far as building the studio"


def test_share_refusal_comes_before_the_model_and_any_tunnel(monkeypatch, tmp_path):
    import gradio
    import gradio.networking

    import app
    import masuka.model.loading
    import masuka.web.server

    reached: list[str] = []

    def stop(what):
        def fake(*args, **kwargs):
            reached.append(what)
            raise RuntimeError(f"{what} reached")

        return fake

    monkeypatch.setattr(gradio.networking, "setup_tunnel", stop("tunnel"))
    monkeypatch.setattr(gradio.Blocks, "launch", stop("gradio launch"))
    monkeypatch.setattr(masuka.model.loading, "load_pipeline", stop("model"))
    monkeypatch.setattr(masuka.web.server, "build_studio", stop("studio"))
    for name in SHARE_ENV:
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    assert app.main(["--share", "--home", str(home)]) == 2
    monkeypatch.setenv("COLAB_RELEASE_TAG", "release-colab")
    assert app.main(["--home", str(home)]) == 2
    assert reached == []
    # The launcher itself refuses too (for scripts and notebooks that skip app.main).
    from masuka.settings import Settings

    with pytest.raises(masuka.web.server.ShareWithoutPassword, match="MASUKA_AUTH"):
        masuka.web.server.launch(Settings(home=home, share=True))
    assert reached == []


def test_password_guards_page_api_and_files_and_jobs_record_the_user(monkeypatch, settings):
    """Auth on: nothing answers without the password; gradio_client works with it; each
    job records its user.  GRADIO_SHARE=true in the environment must not open a link
    that our settings said no to (launch passes share explicitly)."""
    import gradio.networking
    from gradio_client import Client

    tunnels: list[tuple] = []
    monkeypatch.setattr(gradio.networking, "setup_tunnel", lambda *a, **k: tunnels.append(a) or "http://x")
    monkeypatch.setenv("GRADIO_SHARE", "true")
    app = launch_app(replace(settings, auth=("alice", "s3cret-pass")))
    try:
        assert tunnels == [] and app.demo.share is False
        url = app.url
        with pytest.raises(Exception):
            Client(url, verbose=False)
        with pytest.raises(Exception):
            Client(url, verbose=False, auth=("alice", "wrong"))
        client = Client(url, verbose=False, auth=("alice", "s3cret-pass"))
        _images, record = client.predict(prompt="a guarded fox", seed=2, steps=1, api_name="/generate")
        assert record["user"] == "alice"
        assert app.manager.jobs.get(record["job_id"])["user"] == "alice"
        output = record["outputs"][0]

        stranger = httpx.Client(base_url=url, timeout=30)
        refused = {
            "call generate": stranger.post("gradio_api/call/generate", json={"data": ["x"]}),
            "call history": stranger.post("gradio_api/call/history", json={"data": [5, "", ""]}),
            "queue join": stranger.post(
                "gradio_api/queue/join", json={"data": ["x"], "fn_index": 0, "session_hash": "abc"}
            ),
            "api info": stranger.get("gradio_api/info"),
            "output image": stranger.get(f"gradio_api/file={output}"),
            "upload": stranger.post("gradio_api/upload", files={"files": ("a.txt", b"hello")}),
        }
        for what, response in refused.items():
            assert response.status_code in (401, 403), f"{what} answered {response.status_code} without a password"
        config = stranger.get("config")  # the page's layout and endpoints are not handed out
        assert config.status_code == 401 or (config.json().get("auth_required") and "components" not in config.json())
        assert "a guarded fox" not in stranger.get("/").text
    finally:
        close(app)


# --------------------------------------------------------------------------- 2. the queue


def test_queue_is_bounded_reads_answer_at_once_and_cannot_be_skipped(settings):

    app = launch_app(replace(settings, queue_size=2))
    manager = app.manager
    try:
        client = app.client()
        long_job = client.submit(prompt="a long one", steps=100, width=1024, height=1024, api_name="/generate")
        running = wait_until(manager.running_job_id, what="the long job to run")

        # Reads share no group with the GPU: they answer at once while it works.
        for name, kwargs in [
            ("/history", {"limit": 10}),
            ("/job", {"job_id": running}),
            ("/loras", {}),
            ("/cancel", {"job_id": "not-a-job-id"}),
        ]:
            started = time.perf_counter()
            try:
                client.predict(**kwargs, api_name=name)
            except AppError:
                pass  # cancel of an unknown id is an error, but an immediate one
            took = time.perf_counter() - started
            assert took < 2, f"{name} took {took:.2f} s while a job ran"
        assert manager.running_job_id() == running  # still running: the reads did not wait for it

        # Two more wait in the runner's queue (queue_size=2); the next one, by any way in, is refused.
        waiting = [app.client().submit(prompt=f"waiting {i}", steps=1, api_name="/generate") for i in range(2)]
        wait_until(lambda: manager.queue_length() == 2, what="two jobs to wait in the queue")
        with pytest.raises(AppError, match="queue is full"):
            app.client().predict(prompt="one too many", steps=1, api_name="/generate")
        event, message = raw_call(app.url, "generate", generate_body(prompt="raw extra"))
        assert event == "error" and "queue is full" in message

        # A full queue still answers reads at once (they are not queued).
        started = time.perf_counter()
        r = httpx.post(f"{app.url}gradio_api/api/history", json={"data": [5, "", ""]}, timeout=30)
        assert r.status_code == 200 and time.perf_counter() - started < 5
        rows = {row["job_id"]: row["status"] for row in r.json()["data"][0]}
        assert rows[running] == "running" and list(rows.values()).count("queued") == 2

        # No way around the queue for generation: its direct route answers 404.
        for name, data in [("generate", ["x"]), ("add_lora", ["http://example.invalid/x", "", None])]:
            r = httpx.post(f"{app.url}gradio_api/api/{name}", json={"data": data}, timeout=30)
            assert r.status_code == 404, f"/gradio_api/api/{name} answered {r.status_code}"

        assert manager.cancel(running)
        assert long_job.result(timeout=120)[1]["status"] == "cancelled"
        assert [job.result(timeout=120)[1]["status"] for job in waiting] == ["completed", "completed"]
        prompts = [row["prompt"] for row in manager.jobs.list(limit=20)]
        assert "one too many" not in prompts and "raw extra" not in prompts  # refused: never a job
        assert stuck_jobs(manager) == []
    finally:
        close(app)


# --------------------------------------------------------------------------- rate limit


def test_rate_limit_is_a_sliding_window_per_user():
    from masuka.core.ratelimit import RateLimited, RateLimiter
    from masuka.studio import Caller

    now = [1000.0]
    limiter = RateLimiter(3, clock=lambda: now[0])
    alice, bob = Caller("alice", "127.0.0.1", "s1").key, Caller("bob", "127.0.0.1", "s1").key
    for t in (0, 10, 20):
        now[0] = 1000 + t
        limiter.check(alice)
    now[0] = 1059
    with pytest.raises(RateLimited, match=r"at most 3 generations per minute.*try again in 1 s"):
        limiter.check(alice)
    limiter.check(bob)  # another user has a budget of their own
    now[0] = 1060.5  # the first hit has left the window: exactly one more fits
    limiter.check(alice)
    with pytest.raises(RateLimited):
        limiter.check(alice)
    assert Caller(None, "10.0.0.7", "s9").key == "ip:10.0.0.7"
    assert Caller(None, None, "s9").key == "session:s9"
    assert Caller("carol", "10.0.0.7", "s9").key == "user:carol"


def page_generate(app, prompt: str) -> tuple[bool, str]:
    """Run the page's Generate event over raw HTTP (queue join + SSE), as a browser would."""
    fn = next(f for f in app.demo.fns.values() if getattr(f.fn, "__name__", "") == "on_generate")
    data = [getattr(component, "value", None) for component in fn.inputs]
    data[0] = prompt
    session = "page-" + os.urandom(6).hex()
    join = httpx.post(
        f"{app.url}gradio_api/queue/join",
        json={"data": data, "fn_index": fn._id, "session_hash": session, "event_data": None, "trigger_id": None},
        timeout=30,
    )
    assert join.status_code == 200, join.text
    with httpx.stream("GET", f"{app.url}gradio_api/queue/data", params={"session_hash": session}, timeout=120) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                msg = json.loads(line[len("data: ") :])
                if msg.get("msg") == "process_completed":
                    output = msg.get("output") or {}
                    return bool(msg.get("success")), str(output.get("error") or output)
    raise AssertionError("the page's Generate event never completed")


def test_rate_limit_through_the_api(home):
    from masuka.settings import parse_settings

    settings = parse_settings(["--home", str(home)], env={"MASUKA_RATE_LIMIT": "2"})
    app = launch_app(settings)
    try:
        client = app.client()
        with pytest.raises(AppError, match="prompt"):
            client.predict(prompt="", api_name="/generate")  # refused by validation: not counted
        for i in range(2):
            assert client.predict(prompt=f"allowed {i}", steps=1, api_name="/generate")[1]["status"] == "completed"
        with pytest.raises(AppError) as info:
            client.predict(prompt="over the limit", steps=1, api_name="/generate")
        assert "2 generations per minute" in str(info.value) and "MASUKA_RATE_LIMIT" in str(info.value)
        assert "over the limit" not in [r["prompt"] for r in app.manager.jobs.list(limit=10)]
        assert client.predict(limit=5, api_name="/history")  # reads are not limited
        # The page's own Generate event (reachable by fn_index, like any event) counts too.
        success, message = page_generate(app, "from the page")
        assert not success and "2 generations per minute" in message
        assert "from the page" not in [r["prompt"] for r in app.manager.jobs.list(limit=10)]
    finally:
        close(app)


# --------------------------------------------------------------------------- 3. file access


@pytest.fixture
def home_outside_tmp(tiny_model_dir):
    """A home outside the temp folder (Gradio's own cache lives there)."""
    base = Path("/var/tmp") if Path("/var/tmp").is_dir() else ROOT / "test-artifacts"
    base.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="masuka-files-", dir=base))
    assert not str(folder).startswith(tempfile.gettempdir() + os.sep)
    yield seed_home(folder / "home", tiny_model_dir)
    shutil.rmtree(folder, ignore_errors=True)


def test_only_outputs_are_served_and_uploads_are_capped(home_outside_tmp):
    from huggingface_hub import constants

    from masuka.settings import Settings

    home = home_outside_tmp
    settings = Settings(home=home, lora_max_bytes=1024**2)
    (home / "loras").mkdir(parents=True, exist_ok=True)
    lora = home / "loras" / "x.safetensors"
    lora.write_bytes(b"\0" * 64)
    model_file = home / "models" / "weights.safetensors"
    model_file.write_bytes(b"\0" * 64)
    hf_cache = Path(constants.HF_HUB_CACHE)
    hf_cache.mkdir(parents=True, exist_ok=True)
    hf_file = Path(tempfile.mkstemp(prefix="masuka-test-", suffix=".json", dir=hf_cache)[1])
    app = launch_app(settings)
    try:
        _images, record = app.client().predict(prompt="a served image", seed=3, steps=1, api_name="/generate")
        output = Path(record["outputs"][0])
        assert output.is_file()
        web = httpx.Client(base_url=app.url, timeout=30)
        got = web.get(f"gradio_api/file={output}")
        assert got.status_code == 200 and got.content == output.read_bytes()

        model_link = next(p for p in (home / "models").iterdir() if p.is_dir()) / "model_index.json"
        secrets = {
            "database": settings.paths.db,
            "database via ..": f"{settings.paths.outputs}/../{settings.paths.db.name}",
            "LoRA file": lora,
            "model file": model_file,
            "model via its link": model_link,
            "HF cache": hf_file,
            "/etc/passwd": "/etc/passwd",
            "home folder": home,
        }
        for what, target in secrets.items():
            assert Path(str(target)).exists() or ".." in str(target)
            r = web.get(f"gradio_api/file={target}")
            assert r.status_code in (403, 404), f"{what} answered {r.status_code}"
            assert b"SQLite format" not in r.content and b"root:" not in r.content

        small = web.post("gradio_api/upload", files={"files": ("small.bin", b"\1" * 1000)})
        assert small.status_code == 200
        big = web.post("gradio_api/upload", files={"files": ("big.safetensors", b"\1" * (1024**2 + 4096))})
        assert big.status_code == 413, big.text
    finally:
        close(app)
        hf_file.unlink(missing_ok=True)


def test_an_outputs_folder_holding_private_files_is_refused(tmp_path):
    import app as app_module
    from masuka.web.server import check_served_folder
    from masuka.settings import Settings

    home = tmp_path / "drive" / "masuka"
    with pytest.raises(ValueError, match="outputs folder"):
        check_served_folder(Settings(home=home, outputs_dir=tmp_path / "drive"))
    with pytest.raises(ValueError, match="outputs folder"):
        check_served_folder(Settings(home=home, loras_dir=tmp_path / "out" / "loras", outputs_dir=tmp_path / "out"))
    check_served_folder(Settings(home=home, outputs_dir=tmp_path / "drive" / "masuka-outputs"))
    assert app_module.main(["--home", str(home), "--outputs-dir", str(tmp_path / "drive")]) == 2


# --------------------------------------------------------------------------- 5. bad input


@pytest.fixture(scope="module")
def module_app(tmp_path_factory, tiny_model_dir):
    from masuka.settings import Settings

    home = seed_home(tmp_path_factory.mktemp("strangers") / "home", tiny_model_dir)
    app = launch_app(Settings(home=home))
    yield app
    close(app)


LONG_PROMPT = "a very long prompt about a lighthouse " * 100  # 3700 characters, far beyond 512 T5 tokens
NaN, Inf, NegInf = Literal("NaN"), Literal("Infinity"), Literal("-Infinity")

BAD_INPUT = [
    ("empty prompt", {"prompt": ""}, ["prompt"]),
    ("blank prompt", {"prompt": "   \n "}, ["prompt"]),
    ("null prompt", {"prompt": None}, ["prompt"]),
    ("numeric prompt", {"prompt": 42}, ["prompt"]),
    ("over-long prompt", {"prompt": LONG_PROMPT}, ["prompt", "T5 tokens", "512"]),
    ("megabyte prompt", {"prompt": "\u2603" * 1_000_000}, ["prompt is 1000000 characters", "limit is 4000"]),
    ("width not /16", {"width": 300}, ["width", "multiple of 16"]),
    ("height not /16", {"height": 264.5}, ["height", "multiple of 16"]),
    ("width too small", {"width": 128}, ["width", "256"]),
    ("width too big", {"width": 4096}, ["width", "2048"]),
    ("height zero", {"height": 0}, ["height"]),
    ("negative width", {"width": -256}, ["width"]),
    ("steps zero", {"steps": 0}, ["steps", "1 to 100"]),
    ("steps too many", {"steps": 101}, ["steps", "100"]),
    ("steps fraction", {"steps": 2.5}, ["steps", "whole number"]),
    ("guidance negative", {"guidance": -1}, ["guidance", "0 to 30"]),
    ("guidance too big", {"guidance": 31}, ["guidance", "30"]),
    ("images zero", {"num_images": 0}, ["num_images", "1 to 8"]),
    ("images too many", {"num_images": 9}, ["num_images", "8"]),
    ("seed below -1", {"seed": -5}, ["seed"]),
    ("seed too big", {"seed": 2**60}, ["seed"]),
    ("lora scale too big", {"lora_scale": 10}, ["lora_scale"]),
    ("NaN steps", {"steps": NaN}, ["steps", "finite"]),
    ("NaN guidance", {"guidance": NaN}, ["guidance", "finite"]),
    ("Infinity guidance", {"guidance": Inf}, ["guidance", "finite"]),
    ("-Infinity width", {"width": NegInf}, ["width", "finite"]),
    ("NaN seed", {"seed": NaN}, ["seed", "finite"]),
    ("Infinity images", {"num_images": Inf}, ["num_images", "finite"]),
    ("NaN lora scale", {"lora_scale": NaN}, ["lora_scale", "finite"]),
    ("text steps", {"steps": "abc"}, ["steps", "number"]),
    ("list width", {"width": [512]}, ["width", "number"]),
    ("object guidance", {"guidance": {"a": 1}}, ["guidance", "number"]),
    ("boolean images", {"num_images": True}, ["num_images", "number"]),
    ("text seed", {"seed": "0x10"}, ["seed", "number"]),
    ("path traversal LoRA", {"lora": "../../etc/passwd"}, ["LoRA name", "not allowed"]),
    ("absolute path LoRA", {"lora": "/etc/passwd"}, ["LoRA name", "not allowed"]),
    ("slash LoRA", {"lora": "a/b"}, ["LoRA name", "not allowed"]),
    ("dot-dot LoRA", {"lora": ".."}, ["LoRA name", "not allowed"]),
    ("hidden LoRA", {"lora": ".registry"}, ["LoRA name", "not allowed"]),
    ("NUL LoRA", {"lora": "a\u0000b"}, ["LoRA name", "not allowed"]),
    ("unicode LoRA", {"lora": "名前"}, ["LoRA name", "not allowed"]),
    ("long LoRA", {"lora": "x" * 101}, ["LoRA name", "not allowed"]),
    ("backslash LoRA", {"lora": "..\\..\\win"}, ["LoRA name", "not allowed"]),
    ("bad LoRA scale", {"lora": "style:lots"}, ["scale of LoRA", "number"]),
    ("LoRA twice", {"lora": "a,a"}, ["listed twice"]),
    ("too many LoRAs", {"lora": "a,b,c,d,e"}, ["at most 4"]),
    ("numeric LoRA", {"lora": 5}, ["lora must be a string"]),
]


@pytest.mark.parametrize("kwargs, words", [row[1:] for row in BAD_INPUT], ids=[row[0] for row in BAD_INPUT])
def test_bad_input_over_raw_http_is_a_clear_error(module_app, kwargs, words):
    manager = module_app.manager
    before = len(manager.jobs.list(limit=1000))
    event, message = raw_call(module_app.url, "generate", generate_body(**kwargs))
    assert event == "error", f"accepted: {message!r}"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    assert len(manager.jobs.list(limit=1000)) == before  # refused before any job existed
    assert stuck_jobs(manager) == []


def test_malformed_json_is_refused(module_app):
    for body in ('{"data": [', '{"data": "x"}', "[]", '{"data": [1e999]}'):
        event, message = raw_call(module_app.url, "generate", body)
        assert event != "complete", body
    assert stuck_jobs(module_app.manager) == []


@pytest.mark.parametrize(
    "job_id",
    ["does-not-exist", "../../etc/passwd", "' OR 1=1 --", "x" * 5000, "", None, 12, Literal("NaN")],
    ids=["unknown", "traversal", "sql", "huge", "empty", "null", "number", "NaN"],
)
def test_job_and_cancel_of_a_job_that_does_not_exist(module_app, job_id):
    body = '{"data": [' + (job_id.literal if isinstance(job_id, Literal) else json.dumps(job_id)) + "]}"
    for name in ("job", "cancel"):
        event, message = raw_call(module_app.url, name, body)
        assert event == "error", f"/{name} answered {message!r}"
        assert "no job" in message
    assert stuck_jobs(module_app.manager) == []


def test_still_serving_after_the_strangers(module_app):
    _images, record = module_app.client().predict(prompt="after all that", steps=1, api_name="/generate")
    assert record["status"] == "completed"


def test_leftovers_of_a_crash_while_saving_are_never_served(settings):
    """kill -9 while saving leaves an image no job lists and a temp file; the next start removes them."""
    import datetime

    from masuka.store.jobs import JobStore, ProcessOwner

    me = ProcessOwner.current()
    crashed_owner = ProcessOwner(pid=me.pid, host=me.host, started_at=me.started_at - 1000.0)  # a dead process
    settings.paths.create()
    with JobStore(settings.paths.db, owner=crashed_owner) as store:
        job_id = store.create(params={"prompt": "saving when killed"}, loras=[])
    day = settings.paths.outputs / datetime.date.today().isoformat()
    day.mkdir(parents=True, exist_ok=True)
    image = day / f"{job_id}-0-7.png"
    partial = day / f".{job_id}-1-8.png.x1y2.partial"
    for leftover in (image, partial):
        leftover.write_bytes(b"\x89PNG" + b"\0" * 10_000)
    app = launch_app(settings)
    try:
        assert app.studio.job(job_id)["status"] == "interrupted"
        for leftover in (image, partial):
            r = httpx.get(f"{app.url}gradio_api/file={leftover}", timeout=30)
            assert r.status_code in (403, 404), f"{leftover.name} answered {r.status_code}"
            assert not leftover.exists()
    finally:
        close(app)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid RGBA PNG of zero pixels (a few hundred KB on disk) whose settings chunk comes after the pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = bytes(1 + 4 * width)
    pixels = b"".join(packer.compress(row) for _ in range(height)) + packer.flush()
    settings = b"masuka\x00" + json.dumps({"prompt": "boom", "seed": 1}).encode()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0))
            + chunk(b"IDAT", pixels) + chunk(b"tEXt", settings) + chunk(b"IEND", b""))


def test_parallel_bomb_drops_do_not_exhaust_memory(module_app, tmp_path):
    """16 parallel drops of an 8000x8000 PNG (256 MB of pixels each) into "Load settings from a MASUKA image"."""
    import concurrent.futures

    import psutil

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_bomb_png(8000, 8000))
    upload = httpx.post(f"{module_app.url}gradio_api/upload", files={"files": ("bomb.png", bomb.read_bytes(), "image/png")},
                        timeout=60)
    assert upload.status_code == 200, upload.text
    server_path = upload.json()[0]
    drop = next(f for f in module_app.demo.fns.values() if f.concurrency_id == "settings-image")
    payload = {"path": server_path, "orig_name": "bomb.png", "meta": {"_type": "gradio.FileData"}}

    def drop_once(i: int) -> str:
        session = f"bomb-{i}-" + os.urandom(4).hex()
        join = httpx.post(f"{module_app.url}gradio_api/queue/join", timeout=60, json={
            "data": [payload], "fn_index": drop._id, "session_hash": session, "event_data": None, "trigger_id": None})
        assert join.status_code == 200, join.text
        with httpx.stream("GET", f"{module_app.url}gradio_api/queue/data", params={"session_hash": session},
                          timeout=120) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: ") and '"process_completed"' in line:
                    return line
        raise AssertionError("a drop never completed")

    process = psutil.Process()
    baseline, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=16) as pool:
            answers = list(pool.map(drop_once, range(16)))
    finally:
        done.set()
        sampler.join()
    growth_mb = (peak[0] - baseline) / 2**20
    assert growth_mb < 200, f"the app grew by {growth_mb:.0f} MB during 16 bomb drops"
    assert all("the limit is 40" in answer for answer in answers), answers[0][-600:]
