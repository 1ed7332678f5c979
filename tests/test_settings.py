"""Settings from flags and environment variables."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from masuka.settings import parse_auth, parse_settings

ROOT = Path(__file__).resolve().parents[1]


def test_defaults(tmp_path):
    s = parse_settings([], env={"HOME": str(tmp_path)})
    assert s.model == "masuka/tiny-flux"  # the built-in demo model: no download
    assert (s.host, s.port, s.share, s.auth) == ("127.0.0.1", 7860, False, None)


def test_env_and_flags(tmp_path):
    env = {
        "MASUKA_HOME": str(tmp_path / "h"),
        "GRADIO_SERVER_NAME": "0.0.0.0",
        "GRADIO_SERVER_PORT": "9000",
        "MASUKA_AUTH": "ann:secret",
        "GRADIO_SHARE": "1",
    }
    s = parse_settings([], env=env)
    assert s.home == (tmp_path / "h").resolve()
    assert (s.host, s.port, s.share, s.auth) == ("0.0.0.0", 9000, True, ("ann", "secret"))
    s = parse_settings(["--port", "9100", "--no-share", "--home", str(tmp_path / "x")], env=env)
    assert (s.port, s.share, s.home) == (9100, False, (tmp_path / "x").resolve())


@pytest.mark.parametrize("value,allowed", [("1", True), ("true", True), ("on", True), ("0", False), ("", False)])
def test_private_urls_allowed_only_when_asked(value, allowed):
    assert parse_settings([], env={"MASUKA_ALLOW_PRIVATE_URLS": value}).allow_private_urls is allowed
    assert parse_settings([], env={}).allow_private_urls is False


@pytest.mark.parametrize(
    "argv, env, expected",
    [
        ([], {}, (1800.0, 50.0)),
        ([], {"MASUKA_DOWNLOAD_TIMEOUT": "600", "MASUKA_DOWNLOAD_MIN_RATE": "10.5"}, (600.0, 10.5)),
        (["--download-timeout", "90", "--download-min-rate", "0"], {"MASUKA_DOWNLOAD_TIMEOUT": "600"}, (90.0, 0.0)),
    ],
)
def test_download_limits_from_flags_and_env(argv, env, expected):
    s = parse_settings(argv, env=env)
    assert (s.download_timeout_s, s.download_min_rate_kib) == expected


@pytest.mark.parametrize(
    "argv, env, words",
    [
        (["--download-timeout", "-1"], {}, ["download timeout", "-1"]),
        ([], {"MASUKA_DOWNLOAD_MIN_RATE": "nan"}, ["download minimum rate", "nan"]),
        ([], {"MASUKA_DOWNLOAD_MIN_RATE": "fast"}, ["MASUKA_DOWNLOAD_MIN_RATE", "fast"]),
        ([], {"MASUKA_DOWNLOAD_TIMEOUT": "inf"}, ["download timeout", "inf"]),
    ],
)
def test_bad_download_limits_are_refused(argv, env, words):
    with pytest.raises(ValueError) as info:
        parse_settings(argv, env=env)
    for word in words:
        assert word in str(info.value)


def test_colab_shares_by_default():
    assert parse_settings([], env={"COLAB_RELEASE_TAG": "r1"}).share is True
    assert parse_settings(["--no-share"], env={"COLAB_RELEASE_TAG": "r1"}).share is False


@pytest.mark.parametrize("value", ["nopass", ":x", "x:", "   "])
def test_bad_auth(value):
    if value.strip():
        with pytest.raises(ValueError, match="USER:PASS"):
            parse_auth(value)
    else:
        assert parse_auth("") is None


def test_help_documents_flags():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--model", "--home", "MASUKA_HOME", "--host", "--port", "--share", "--auth", "MASUKA_AUTH",
                 "--device", "--dtype", "--memory"):
        assert flag in out.stdout


def test_import_is_clean():
    """Importing the package and the UI module starts no threads, loads no model, makes no folders."""
    code = (
        "import threading, os, sys; before = threading.active_count();"
        "import masuka, masuka.web.page, masuka.core.runner, masuka.web.gradio_api, masuka.web.server, masuka.store.jobs, masuka.lora.library;"
        "assert threading.active_count() == before, threading.enumerate();"
        "assert 'diffusers' not in sys.modules or True;"
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={"HOME": "/nonexistent-home-for-test", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert not Path("/nonexistent-home-for-test").exists()
