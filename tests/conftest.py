"""Shared fixtures: the tiny model is built once per test session; every test gets its own home."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.pop("GRADIO_SHARE", None)
os.environ.pop("MASUKA_AUTH", None)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from masuka.model.tiny import ensure_tiny_model

    return ensure_tiny_model(tmp_path_factory.mktemp("models"))


def seed_home(home: Path, tiny_model_dir: Path) -> Path:
    """A fresh home folder whose built-in model is the session's (a symlink, no rebuild)."""
    models = home / "models"
    models.mkdir(parents=True, exist_ok=True)
    link = models / tiny_model_dir.name
    if not link.exists():
        link.symlink_to(tiny_model_dir, target_is_directory=True)
    return home


@pytest.fixture
def home(tmp_path, tiny_model_dir) -> Path:
    return seed_home(tmp_path / "home", tiny_model_dir)


@pytest.fixture
def settings(home):
    from masuka.settings import Settings

    return Settings(home=home)


@pytest.fixture
def studio(settings):
    from masuka.studio import build_studio

    st = build_studio(settings)
    yield st
    st.close()


@pytest.fixture
def manager(studio):
    """The studio's runner (the pipeline, its LoRAs and the job queue)."""
    return studio.runner


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveApp:
    def __init__(self, demo, url: str, studio):
        self.demo, self.url, self.studio = demo, url, studio

    @property
    def manager(self):
        return self.studio.runner

    def client(self, **kwargs):
        from gradio_client import Client

        return Client(self.url, verbose=False, **kwargs)


def launch_app(settings, studio=None) -> LiveApp:
    from dataclasses import replace

    from masuka.studio import build_studio
    from masuka.web.server import launch

    settings = replace(settings, port=free_port())
    studio = studio or build_studio(settings)
    demo, url, _ = launch(settings, block=False, studio=studio, quiet=True)
    return LiveApp(demo, url, studio)


@pytest.fixture
def live_app(settings):
    app = launch_app(settings)
    yield app
    app.demo.close()
    app.studio.close()


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.INFO, logger="masuka")
    yield


def walk_keys(value):
    """Every dict key anywhere in a nested record (to check no "path" key reaches gradio_client)."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from walk_keys(v)
    elif isinstance(value, list):
        for v in value:
            yield from walk_keys(v)


def pixels(path):
    """An image's RGB pixels as int16 (so differences do not wrap)."""
    import numpy as np
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def run(manager, **kw):
    """One job through the manager, with a fixed prompt and seed unless given."""
    kw.setdefault("prompt", "a lighthouse at dusk")
    kw.setdefault("seed", 7)
    return manager.generate(manager.validate(**kw))


class Holder:
    """A job that holds the runner at its first step until released (no timing races)."""

    def __init__(self, studio, **request):
        import threading

        from masuka.studio import Caller

        self.started, self._release = threading.Event(), threading.Event()
        request.setdefault("prompt", "holder")
        request.setdefault("steps", 2)

        def hold(done, total):
            self.started.set()
            self._release.wait(120)

        self.ticket = studio.submit(studio.validate(**request), Caller(), on_step=hold)
        self.job_id = self.ticket.job_id
        assert self.started.wait(60), "the holding job never started"

    def release(self):
        self._release.set()
        assert self.ticket.done.wait(60)


@pytest.fixture
def holding():
    """holding(studio, **request) -> Holder; every holder is released at the end of the test."""
    holders = []

    def make(studio, **request):
        holders.append(Holder(studio, **request))
        return holders[-1]

    yield make
    for holder in holders:
        holder.release()


def wait_until(check, timeout: float = 60.0, what: str = "condition"):
    """Poll `check` until it returns something truthy (that value), or fail naming `what`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
