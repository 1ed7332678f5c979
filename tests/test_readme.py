"""The README's "Use it from Python" examples run, in order, against a live app.

Each ```python block after an `<!-- example -->` marker runs in one shared namespace (like one
session). The app URL in the README is swapped for the live app's, and the LoRA link for a file
served by a loopback HTTP server (private URLs allowed, as MASUKA_ALLOW_PRIVATE_URLS=1 does).
"""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import launch_app
from lora_factory import make_peft_lora
from lora_server import LoraServer
from masuka.settings import parse_settings

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
README_URL = "http://127.0.0.1:7860/"
README_LORA_URL = "https://example.com/loras/paper-cut.safetensors"
EXAMPLE = re.compile(r"<!-- example -->\s*```python\n(.*?)```", re.S)

pytestmark = pytest.mark.timeout(300)


def examples() -> list[str]:
    return EXAMPLE.findall(README.read_text(encoding="utf-8"))


def test_examples_cover_every_endpoint():
    code = "\n".join(examples())
    for endpoint in ("/generate", "/add_lora", "/loras", "/history", "/job", "/cancel", "/delete_lora"):
        assert f'api_name="{endpoint}"' in code, endpoint
    assert README_URL in code and README_LORA_URL in code


def test_readme_keeps_its_commands_and_links():
    text = README.read_text(encoding="utf-8")
    assert "pip install torch==2.13.0 && pip install -r requirements.txt && python app.py" in text
    assert "bash .ci/run" in text and "python3 -m pytest -q" in (ROOT / ".ci" / "run").read_text()
    badge = re.search(r"https://colab\.research\.google\.com/github/([^/]+)/([^/]+)/blob/main/(\S+?\.ipynb)", text)
    assert badge and (ROOT / badge.group(3)).is_file()
    for heading in ("## Open it in Colab", "## Use it from Python", "## Architecture", "## Troubleshooting"):
        assert heading in text
    for problem in ("Out of memory", "Gated model", "LoRA refused", "Share link refused without a password"):
        assert problem in text


def test_every_flag_is_in_the_readme():
    out = subprocess.run([sys.executable, "app.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z-]+)", out.stdout)) - {"--help"}
    text = README.read_text(encoding="utf-8")
    missing = sorted(f for f in flags if f"`{f}" not in text)
    assert not missing, f"flags missing from the README's table: {missing}"


def test_python_examples_run_against_a_live_app(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import seed_home

    home = seed_home(tmp_path / "home", tiny_model_dir)
    settings = parse_settings(["--home", str(home)], env={"MASUKA_ALLOW_PRIVATE_URLS": "1"})
    app = launch_app(settings)
    server = LoraServer()
    try:
        transformer = app.manager.pipe.transformer
        served = make_peft_lora(transformer, tmp_path / "served.safetensors", seed=1).read_bytes()
        lora_url = server.add("/loras/paper-cut.safetensors", served)
        workdir = tmp_path / "client"
        workdir.mkdir()
        make_peft_lora(transformer, workdir / "my_style.safetensors", seed=2)
        monkeypatch.chdir(workdir)  # where "my_style.safetensors" is

        namespace: dict = {}
        printed = io.StringIO()
        for index, block in enumerate(examples()):
            code = block.replace(README_URL, app.url).replace(README_LORA_URL, lora_url)
            with contextlib.redirect_stdout(printed):
                exec(compile(code, f"README example {index + 1}", "exec"), namespace)
    finally:
        server.close()
        app.demo.close()
        app.studio.close()

    out = printed.getvalue()
    ns = namespace
    assert ns["lora"]["name"] == "paper-cut" and ns["lora"]["state"] == "usable"
    assert ns["mine"]["name"] == "my-style" and ns["mine"]["source"] == "upload"
    assert "('paper-cut', 'usable')" in out and "('my-style', 'usable')" in out  # the /loras listing
    job = ns["job"]
    assert job["status"] == "completed" and job["seeds"] == [42, 43]
    assert job["loras"] == [{"name": "paper-cut", "scale": 0.8}]
    assert len(ns["images"]) == 0  # rebound by the cancel example: a cancelled job has no images
    assert job["job_id"] in out and "paper-cut fox" in out  # the history example printed the job
    failed = ns["record"]
    assert failed["status"] == "failed" and "no-such-lora" in failed["error"]
    assert "Traceback" in failed["traceback"] and failed["job_id"] in out
    assert ns["cancelled"]["status"] == "cancelled"
    assert "'cancelled': True" in out
    assert out.rstrip().endswith("True")  # /delete_lora said deleted
