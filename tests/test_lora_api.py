"""/add_lora, /loras and /delete_lora through gradio_client against a launched app.

Links are served by a loopback HTTP server (the app runs with private URLs allowed).
"""

from __future__ import annotations

import hashlib
import time

import pytest
from conftest import walk_keys
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from conftest import launch_app, seed_home
from lora_factory import make_kohya_lora, make_peft_lora
from lora_server import LoraServer, leftovers
from masuka.settings import Settings

pytestmark = pytest.mark.timeout(180)




@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    home = seed_home(tmp_path_factory.mktemp("home"), tiny_model_dir)
    # A short overall deadline: every honest transfer here is local and takes milliseconds.
    live = launch_app(Settings(home=home, allow_private_urls=True, download_timeout_s=3))
    yield live
    live.demo.close()
    live.studio.close()


@pytest.fixture(scope="module")
def server():
    srv = LoraServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(app):
    return app.client()


def lora_file(app, tmp_path, maker, name, seed):
    return maker(app.manager.pipe.transformer, tmp_path / name, seed=seed)


def test_add_by_link_list_use_delete(app, client, server, tmp_path):
    data = lora_file(app, tmp_path, make_kohya_lora, "k.safetensors", 11).read_bytes()
    url = server.add(
        "/api/download/models/77", data, headers={"Content-Disposition": 'attachment; filename="ink.safetensors"'}
    )
    record = client.predict(source=url, api_name="/add_lora")
    assert "path" not in set(walk_keys(record))
    assert record["name"] == "ink" and record["state"] == "usable" and record["format"] == "kohya"
    assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["size_bytes"] == len(data)
    assert record["source"] == url and record["trigger_words"] == []
    listed = {r["name"]: r for r in client.predict(api_name="/loras")}
    assert listed["ink"]["sha256"] == record["sha256"]
    _, job = client.predict(prompt="ink test", lora="ink:0.7", api_name="/generate")
    assert job["status"] == "completed" and job["loras"] == [{"name": "ink", "scale": 0.7}]
    deleted = client.predict(name="ink", api_name="/delete_lora")
    assert deleted["deleted"] is True and deleted["name"] == "ink"
    assert "ink" not in {r["name"] for r in client.predict(api_name="/loras")}
    assert not (app.manager.loras.folder / "ink.safetensors").exists()
    with pytest.raises(AppError, match="not in the library"):
        client.predict(name="ink", api_name="/delete_lora")


def test_a_trickling_link_does_not_hold_a_download_slot(app, client, server):
    """A server that sends one byte at a time is given up at the deadline, leaving nothing behind."""
    url = server.add("/trickle.safetensors", b"x" * 4096, chunk=1, delay=0.05)  # 200 s for the whole body
    started = time.monotonic()
    with pytest.raises(AppError, match="took longer than 3 s"):
        client.predict(source=url, name="trickle", api_name="/add_lora")
    assert time.monotonic() - started < 30
    assert not [n for n in leftovers(app.studio.lora_folder) if "trickle" in n or n.endswith(".incomplete")]
    assert "trickle" not in [r["name"] for r in client.predict(api_name="/loras")]


def test_add_by_upload(app, client, tmp_path):
    path = lora_file(app, tmp_path, make_peft_lora, "Paper Cut.safetensors", 12)
    record = client.predict(file=handle_file(str(path)), api_name="/add_lora")
    assert record["name"] == "Paper_Cut" and record["source"] == "upload" and record["format"] == "diffusers"
    assert record["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    again = client.predict(file=handle_file(str(path)), name="paper2", api_name="/add_lora")
    assert again["name"] == "paper2" and again["sha256"] == record["sha256"]
    names = {r["name"] for r in client.predict(api_name="/loras")}
    assert {"Paper_Cut", "paper2"} <= names
    for name in ("Paper_Cut", "paper2"):
        client.predict(name=name, api_name="/delete_lora")


@pytest.mark.parametrize(
    "kwargs, words",
    [
        ({}, ["nothing to add"]),
        ({"source": "https://example.com/a.safetensors", "name": "../../x"}, ["'../../x'", "not allowed"]),
        ({"source": "ftp://example.com/a.safetensors"}, ["ftp"]),
        ({"source": "someone"}, ["someone"]),
    ],
)
def test_add_errors_are_clear(app, client, kwargs, words):
    with pytest.raises(AppError) as info:
        client.predict(**kwargs, api_name="/add_lora")
    for word in words:
        assert word in str(info.value)
    assert leftovers(app.manager.loras.folder) == []


def test_a_path_on_the_server_is_not_an_upload(app, client, tmp_path):
    """A client must not make the server import a file from the server's own disk."""
    import httpx

    path = lora_file(app, tmp_path, make_peft_lora, "local.safetensors", 13)
    with pytest.raises(AppError, match="must be an upload"):
        client.predict(file=str(path), api_name="/add_lora")
    # Raw calls (no client-side upload): Gradio refuses a FileData outside its upload
    # folder, and the endpoint itself refuses a bare dict that Gradio lets through.
    for payload in ({"path": str(path), "meta": {"_type": "gradio.FileData"}}, {"path": str(path)}):
        r = httpx.post(f"{app.url}gradio_api/call/add_lora", json={"data": ["", "", payload]}, timeout=30)
        events = httpx.get(f"{app.url}gradio_api/call/add_lora/{r.json()['event_id']}", timeout=60).text
        assert "event: error" in events and ("not uploaded by a user" in events or "must be an upload" in events)
    assert leftovers(app.manager.loras.folder) == []


def test_delete_is_refused_while_a_waiting_or_running_job_uses_it(app, client, tmp_path, holding):
    for name, seed in (("busy", 14), ("next", 15)):
        path = lora_file(app, tmp_path, make_peft_lora, f"{name}.safetensors", seed)
        client.predict(file=handle_file(str(path)), api_name="/add_lora")
    holder = holding(app.studio, lora="busy")  # runs with "busy" and holds the runner
    waiting = client.submit(prompt="after", lora="next", api_name="/generate")
    deadline = time.monotonic() + 30
    while app.studio.queue_length() == 0:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    with pytest.raises(AppError, match="used by the running job"):
        client.predict(name="busy", api_name="/delete_lora")
    with pytest.raises(AppError, match="used by the waiting job"):
        client.predict(name="next", api_name="/delete_lora")
    assert (app.studio.lora_folder / "busy.safetensors").exists()
    holder.release()
    assert waiting.result(timeout=60)[1]["status"] == "completed"
    for name in ("busy", "next"):
        assert client.predict(name=name, api_name="/delete_lora")["deleted"] is True
