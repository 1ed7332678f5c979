"""The Colab notebook cannot rot: it is valid, matches its generator, and runs top to bottom on CPU.

`google.colab` is a fake package on the kernel's path (drive.mount makes a folder, userdata.get
reads a fake secret); the cells that need the network are swapped by tag for local equivalents:
ci-replace-clone (use this checkout), ci-replace-pip (the same pip command, --dry-run --no-index:
everything is installed, so it must resolve against the installed torch and its pin), ci-launch
(no share link: launch on a free port, call /generate once through gradio_client, close).
"""

from __future__ import annotations

import ast
import importlib.util
import json
import re
import sqlite3
from contextlib import closing
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient
from nbformat.v4 import new_code_cell

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "colab" / "MASUKA_V2_COLAB.ipynb"
FAKE_TOKEN = "hf_fake_ci_token_never_printed_4821"

FAKE_COLAB = {
    "google/colab/__init__.py": "",
    "google/colab/drive.py": """
from pathlib import Path

def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    Path(mountpoint, "MyDrive").mkdir(parents=True, exist_ok=True)
    print("Mounted at", mountpoint)
""",
    "google/colab/userdata.py": """
import os

class SecretNotFoundError(Exception):
    pass

def get(key):
    value = os.environ.get("FAKE_COLAB_SECRET_" + key)
    if value is None:
        raise SecretNotFoundError(key)
    return value
""",
}

CI_CLONE = f"""\
from pathlib import Path
REPO_DIR = Path({str(ROOT)!r})  # CI: the checkout under test, no clone
"""

PIP_COMMAND = '"install", "-q",'
CI_PIP_FLAGS = '"install", "-q", "--dry-run", "--no-index",'  # CI: everything is installed; no network

CI_LAUNCH_PRELUDE = """\
import socket
from dataclasses import replace

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
ci_shared = settings.share
settings = replace(settings, share=False, port=port)  # CI: no tunnel
"""

# Instead of demo.block_thread(): call the app once through gradio_client, then close it.
CI_CALLS = """\
import json

from gradio_client import Client

try:
    client = Client(local_url, auth=(USERNAME, PASSWORD), verbose=False)
    images, record = client.predict(prompt="a lighthouse at dusk", seed=7, api_name="/generate")
    history = client.predict(limit=10, api_name="/history")
    backed_up = studio.backup.flush(30) if studio.backup else None
finally:
    demo.close()
print("CI-RESULT " + json.dumps({
    "share": ci_shared, "auth_user": settings.auth[0], "model": MODEL_ID,
    "status": record["status"], "outputs": record["outputs"], "images": len(images),
    "history": [row["job_id"] for row in history], "backed_up": backed_up,
}))
"""

CI_RUN_AGAIN = """\
ci_first_manager = studio.runner
{launch}
assert studio.runner is ci_first_manager, "running the launch cell again loaded the model again"
studio.close()
print("CI-REUSED")
"""


def load_builder():
    spec = importlib.util.spec_from_file_location("build_notebook", ROOT / "colab" / "build_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_notebook() -> nbformat.NotebookNode:
    return nbformat.read(NOTEBOOK, as_version=4)


def tagged(nb, tag: str) -> list:
    return [c for c in nb.cells if tag in c.metadata.get("tags", [])]


def test_notebook_is_valid_and_is_what_its_generator_writes():
    nb = read_notebook()
    nbformat.validate(nb)
    assert NOTEBOOK.read_text(encoding="utf-8") == load_builder().render(), (
        "colab/MASUKA_V2_COLAB.ipynb is stale: run python colab/build_notebook.py"
    )
    for tag in ("parameters", "ci-replace-clone", "ci-replace-pip", "ci-launch"):
        assert len(tagged(nb, tag)) == 1, tag
    code = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert not re.search(r"pip[^\n]*install[^\n]*[\s'\"]torch\b", code), "never reinstall Colab's torch"
    assert "-c" in tagged(nb, "ci-replace-pip")[0].source  # pip is held to the installed torch
    assert "--share" in code and "userdata.get" in code and "drive.mount" in code


def pick_model_function():
    source = next(c.source for c in read_notebook().cells if "def pick_model" in c.source)
    tree = ast.parse(source)
    keep = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "pick_model"]
    keep += [n for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id.isupper()]
    namespace: dict = {}
    exec(compile(ast.Module(body=keep, type_ignores=[]), "model-cell", "exec"), namespace)
    return namespace["pick_model"]


@pytest.mark.parametrize(
    "gpu_gb, ram_gb, token, expect",
    [
        (0, 12.7, True, "masuka/tiny-flux"),  # CPU runtime
        (15, 12.7, False, "masuka/tiny-flux"),  # free T4: no FLUX.1 fits yet (the plan), said so
        (15, 12.7, True, "masuka/tiny-flux"),  # a token does not make dev fit a T4
        (22.5, 53, True, "black-forest-labs/FLUX.1-dev"),  # L4
        (22.5, 53, False, "black-forest-labs/FLUX.1-schnell"),
        (22.5, 16, True, "flux1-dev-Q4"),  # too little RAM to read bf16
        (40, 83, True, "black-forest-labs/FLUX.1-dev"),  # A100
        (80, 12, False, "black-forest-labs/FLUX.1-schnell"),  # fits the GPU at once
    ],
)
def test_auto_model_choice(gpu_gb, ram_gb, token, expect):
    model, why = pick_model_function()(gpu_gb, ram_gb, token)
    assert expect in model and why


def prepared_notebook(work: Path) -> nbformat.NotebookNode:
    nb = read_notebook()
    pip_cell = tagged(nb, "ci-replace-pip")[0].source
    assert pip_cell.count(PIP_COMMAND) == 1
    launch_cell = tagged(nb, "ci-launch")[0].source
    assert launch_cell.count("demo.block_thread()") == 1
    replacements = {
        "ci-replace-clone": CI_CLONE,
        "ci-replace-pip": pip_cell.replace(PIP_COMMAND, CI_PIP_FLAGS),  # the real cell, resolved offline
        "ci-launch": CI_LAUNCH_PRELUDE + launch_cell.replace("demo.block_thread()", CI_CALLS),
    }
    cells = []
    for cell in nb.cells:
        tags = cell.metadata.get("tags", [])
        swap = [replacements[t] for t in tags if t in replacements]
        if swap:
            cell = new_code_cell(swap[0], metadata={"tags": tags})
        cells.append(cell)
        if "ci-launch" in tags:  # stop and run the launch cell again
            again = CI_RUN_AGAIN.format(launch=launch_cell.replace("demo.block_thread()", "demo.close()"))
            cells.append(new_code_cell(again, metadata={"tags": ["ci-run-again"]}))
        if "parameters" in tags:  # papermill style: CI values after the form
            values = f"WORK_DIR = {str(work)!r}\nUSE_DRIVE = True"
            if torch.cuda.is_available():  # "auto" would pick a real FLUX model there
                values += '\nMODEL = "masuka/tiny-flux"'
            cells.append(new_code_cell(values, metadata={"tags": ["injected-parameters"]}))
    nb.cells = cells
    return nb


def outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.extend(str(v) for v in out.get("data", {}).values())
            parts.extend(out.get("traceback", []))
    return "\n".join(parts)


def test_notebook_runs_top_to_bottom_on_cpu(tmp_path, tiny_model_dir, monkeypatch):
    from conftest import seed_home

    from masuka.store.jobs import JobStore

    fake = tmp_path / "fake-colab"
    for name, text in FAKE_COLAB.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    work = tmp_path / "content"
    seed_home(work / "masuka-home", tiny_model_dir)  # the built-in model, already built
    # The Drive holds the history backup of an earlier runtime: it must come back.
    drive = work / "drive" / "MyDrive" / "MASUKA"
    earlier = JobStore(tmp_path / "earlier" / "masuka.db")
    old_job = earlier.create(params={"prompt": "from the last runtime"}, loras=[], status="running")
    earlier.mark_completed(old_job, seeds=[1], outputs=[])
    earlier.backup_to(drive / "masuka.db")
    earlier.close()

    monkeypatch.setenv("PYTHONPATH", f"{fake}:{ROOT}")
    monkeypatch.setenv("FAKE_COLAB_SECRET_HF_TOKEN", FAKE_TOKEN)
    for name in ("HF_TOKEN", "MASUKA_HOME", "MASUKA_AUTH", "MASUKA_MODEL", "MASUKA_MEMORY", "GRADIO_SHARE",
                 "MASUKA_LORAS_DIR", "MASUKA_OUTPUTS_DIR", "MASUKA_DB_BACKUP"):
        monkeypatch.delenv(name, raising=False)

    nb = prepared_notebook(work)
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code_cells)
    assert not [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    text = outputs_text(nb)
    assert FAKE_TOKEN not in text and "HF_TOKEN: found (hidden)" in text
    assert "requirements installed; torch" in text and (work / "torch-pin.txt").read_text().startswith("torch==")
    password = re.search(r"^password: (\S+)$", text, re.M).group(1)
    assert len(password) >= 16
    result = json.loads(re.search(r"^CI-RESULT (.*)$", text, re.M).group(1))
    assert result["share"] is True and result["auth_user"] == "masuka"  # Colab launches a shared, locked app
    assert result["model"] == "masuka/tiny-flux"  # what auto picks on a machine without a GPU
    assert result["status"] == "completed" and result["images"] == 1
    image = Path(result["outputs"][0])
    assert image.is_file() and image.is_relative_to(drive / "outputs")  # images on Drive
    assert old_job in result["history"]  # restored from the Drive backup
    assert result["backed_up"] is True
    assert "CI-REUSED" in text
    with closing(sqlite3.connect(f"file:{drive / 'masuka.db'}?mode=ro", uri=True)) as conn:
        assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 2  # the new job reached Drive
    assert not list(drive.glob("masuka.db-*"))  # no WAL or lock files on Drive
    assert (work / "masuka-home" / "masuka.db").is_file()  # the live database is on local disk
