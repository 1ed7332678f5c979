"""Write colab/MASUKA_V2_COLAB.ipynb from the cells below (run: python colab/build_notebook.py).

The notebook is generated so that it stays reviewable as plain Python and so that
tests/test_notebook.py can check the committed file is exactly what this script writes.

Cell tags (used by tests/test_notebook.py, which runs the notebook on CPU in CI):
  parameters        the form fields; CI adds a cell after it with its own values (papermill style)
  ci-replace-clone  network: CI uses the checkout under test instead
  ci-replace-pip    network: CI runs the same pip command with --dry-run --no-index (all installed)
  ci-launch         network (share link): CI launches without a share link and calls /generate once
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

NOTEBOOK = Path(__file__).resolve().parent / "MASUKA_V2_COLAB.ipynb"

INTRO = """\
# MASUKA · FLUX.1 + LoRA image studio

Run the cells from top to bottom (**Runtime › Run all**). The last cell prints a public link and a
password; open the link, log in, and make images. Stop the last cell to stop the app.

* **GPU**: *Runtime › Change runtime type › T4 GPU* (or better). Without a GPU the notebook still
  runs, with the built-in demo model (random weights: the images are colourful noise).
* **FLUX.1-dev** is gated: accept its licence on https://huggingface.co/black-forest-labs/FLUX.1-dev,
  make a read token, and add it as a Colab secret named `HF_TOKEN` (the key icon on the left; allow
  this notebook to read it). Without a token the notebook uses FLUX.1-schnell.
* **Google Drive** (tick `USE_DRIVE`): LoRAs, images and the job history survive a runtime reset.
"""

GPU = """\
#@title 1 · Check the GPU
import shutil
import subprocess

import psutil
import torch

if shutil.which("nvidia-smi"):
    smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True)
    print(smi.stdout or smi.stderr)
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    GPU_NAME, GPU_GB = props.name, props.total_memory / 2**30
    print(f"GPU: {GPU_NAME}, {GPU_GB:.1f} GiB, compute capability {props.major}.{props.minor}")
else:
    GPU_NAME, GPU_GB = None, 0.0
    print("No GPU. For real images: Runtime > Change runtime type > T4 GPU (or better), then Run all.")
    print("Without a GPU this notebook runs the built-in demo model (noise-like images).")
RAM_GB = psutil.virtual_memory().total / 2**30
print(f"RAM: {RAM_GB:.1f} GiB · torch {torch.__version__}")
"""

PARAMETERS = """\
#@title 2 · Settings
#@markdown **Model**: `auto` picks one for this GPU: FLUX.1-schnell, or FLUX.1-dev when an `HF_TOKEN`
#@markdown secret is set and the GPU has room. FLUX.1 does not fit a T4 runtime yet (15 GiB GPU, 12.7 GiB RAM:
#@markdown `python app.py --plan t4`), so there `auto` runs the built-in demo model and says why.
MODEL = "auto"  #@param ["auto", "black-forest-labs/FLUX.1-schnell", "black-forest-labs/FLUX.1-dev", "https://huggingface.co/city96/FLUX.1-schnell-gguf/blob/main/flux1-schnell-Q4_K_S.gguf", "https://huggingface.co/city96/FLUX.1-dev-gguf/blob/main/flux1-dev-Q4_K_S.gguf", "masuka/tiny-flux"] {allow-input: true}
#@markdown **Memory profile**: `auto` decides from GPU memory and RAM (full, offload, lowvram or quantized).
MEMORY = "auto"  #@param ["auto", "full", "offload", "lowvram", "quantized"]
#@markdown **Google Drive**: keep LoRAs, images and the job history in `My Drive/<DRIVE_FOLDER>`.
USE_DRIVE = False  #@param {type:"boolean"}
DRIVE_FOLDER = "MASUKA"  #@param {type:"string"}
#@markdown **Login** for the public link (leave the password empty to get a random one).
USERNAME = "masuka"  #@param {type:"string"}
PASSWORD = ""  #@param {type:"string"}
# Local disk of this runtime: the code, the job database and its locks, the model cache.
WORK_DIR = "/content"
"""

CLONE = """\
#@title 3 · Get the code
#@markdown Used only when this notebook does not already sit in a MASUKA checkout.
REPO_URL = "https://github.com/OWNER/REPO.git"  #@param {type:"string"}
BRANCH = "main"  #@param {type:"string"}
import subprocess
from pathlib import Path


def find_checkout():
    for folder in (Path.cwd(), *Path.cwd().parents, Path(WORK_DIR) / "masuka"):
        if (folder / "app.py").is_file() and (folder / "masuka" / "studio.py").is_file():
            return folder
    return None


REPO_DIR = find_checkout()
if REPO_DIR is None:
    if "OWNER/REPO" in REPO_URL:
        raise ValueError("Set REPO_URL to the MASUKA repository (https://github.com/<owner>/<repo>.git)")
    REPO_DIR = Path(WORK_DIR) / "masuka"
    clone = subprocess.run(["git", "clone", "--depth", "1", "--branch", BRANCH, REPO_URL, str(REPO_DIR)],
                           capture_output=True, text=True)
    if clone.returncode != 0:
        raise RuntimeError(f"git clone failed:\\n{clone.stderr}")
print("MASUKA code:", REPO_DIR)
"""

PIP = """\
#@title 4 · Install the requirements (keeps Colab's torch)
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import torch

# Colab's torch is built for its CUDA: pin it, so pip can never replace it. The pin is the public
# version ("2.5.1", not "2.5.1+cu121"): it matches whatever local build label the installed one has.
pin = Path(WORK_DIR) / "torch-pin.txt"
pin.write_text(f"torch=={version('torch').split('+')[0]}\\n")
requirements = ["-r", "requirements.txt"]
if torch.cuda.is_available():
    requirements += ["-r", "requirements-gpu.txt"]  # 4-bit models (bitsandbytes, GGUF)
numpy_before = version("numpy")
pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *requirements, "-c", str(pin)],
                     cwd=REPO_DIR, capture_output=True, text=True)
if pip.returncode != 0:
    raise RuntimeError(f"pip install failed:\\n{pip.stdout[-3000:]}\\n{pip.stderr[-3000:]}")
print(f"requirements installed; torch {torch.__version__} kept")
if version("numpy") != numpy_before:
    print("numpy changed: Runtime > Restart session, then Run all again.")
"""

TOKEN = """\
#@title 5 · Hugging Face token (for FLUX.1-dev)
import os


def colab_secret(name):
    try:
        from google.colab import userdata

        return userdata.get(name)
    except Exception:  # no such secret, access not granted, or not on Colab: run without it
        return None


_token = os.environ.get("HF_TOKEN") or colab_secret("HF_TOKEN")
if _token:
    os.environ["HF_TOKEN"] = _token  # the app reads it from the environment; never printed
print("HF_TOKEN: found (hidden)" if _token else "HF_TOKEN: none (FLUX.1-dev needs one; schnell does not)")
HAS_TOKEN = bool(_token)
del _token
"""

STORAGE = """\
#@title 6 · Storage (local disk, optionally Google Drive)
# SQLite's WAL and file locks are not reliable on the Drive mount: the job database stays on local
# disk and the app copies it to Drive after every job (and restores it from there at start).
import os
from pathlib import Path

LOCAL_HOME = Path(WORK_DIR) / "masuka-home"
os.environ["MASUKA_HOME"] = str(LOCAL_HOME)
for name in ("MASUKA_LORAS_DIR", "MASUKA_OUTPUTS_DIR", "MASUKA_DB_BACKUP"):
    os.environ.pop(name, None)
if USE_DRIVE:
    from google.colab import drive

    mount = Path(WORK_DIR) / "drive"
    drive.mount(str(mount))
    KEEP = mount / "MyDrive" / DRIVE_FOLDER
    KEEP.mkdir(parents=True, exist_ok=True)
    os.environ["MASUKA_LORAS_DIR"] = str(KEEP / "loras")
    os.environ["MASUKA_OUTPUTS_DIR"] = str(KEEP / "outputs")
    os.environ["MASUKA_DB_BACKUP"] = str(KEEP / "masuka.db")
    print(f"LoRAs, images and the job history backup: {KEEP}")
else:
    print(f"Everything in {LOCAL_HOME}: lost when the runtime resets (tick USE_DRIVE to keep it).")
"""

MODEL_CELL = """\
#@title 7 · Pick the model
SCHNELL = "black-forest-labs/FLUX.1-schnell"
DEV = "black-forest-labs/FLUX.1-dev"
SCHNELL_4BIT = "https://huggingface.co/city96/FLUX.1-schnell-gguf/blob/main/flux1-schnell-Q4_K_S.gguf"
DEV_4BIT = "https://huggingface.co/city96/FLUX.1-dev-gguf/blob/main/flux1-dev-Q4_K_S.gguf"


def pick_model(gpu_gb, ram_gb, has_token):
    \"\"\"(model, why) for MODEL = "auto".\"\"\"
    if gpu_gb == 0:
        return "masuka/tiny-flux", "no GPU: the built-in demo model"
    if gpu_gb < 20:
        # The memory plan (python app.py --plan t4) finds no form of FLUX.1 MASUKA can load that fits
        # both the T4's 15 GiB GPU and its 12.7 GiB of RAM; loading one anyway gets the runtime killed.
        return "masuka/tiny-flux", (
            f"{gpu_gb:.0f} GiB GPU: FLUX.1 does not fit this runtime yet (see python app.py --plan t4); "
            "the built-in demo model runs instead. For real pictures pick an L4 or A100 runtime"
        )
    # The bf16 weights (~34 GB) go through RAM while loading unless they fit on the GPU at once.
    bf16_fits = ram_gb >= 40 or gpu_gb >= 40
    if has_token:
        return (DEV, "FLUX.1-dev in bf16") if bf16_fits else (DEV_4BIT, "FLUX.1-dev in 4 bits: too little RAM for bf16")
    why = "no HF_TOKEN, so the ungated FLUX.1-schnell"
    return (SCHNELL, why) if bf16_fits else (SCHNELL_4BIT, why + " in 4 bits: too little RAM for bf16")


if MODEL == "auto":
    MODEL_ID, why = pick_model(GPU_GB, RAM_GB, HAS_TOKEN)
else:
    MODEL_ID, why = MODEL, "chosen in the settings"
print(f"model: {MODEL_ID} ({why}) · memory profile: {MEMORY}")
"""

PREPARE = """\
#@title 8 · Password and app settings
import logging
import os
import secrets
import sys

if str(REPO_DIR) not in sys.path:
    sys.path.insert(0, str(REPO_DIR))
os.chdir(REPO_DIR)
if ":" in USERNAME or not USERNAME:
    raise ValueError(f"USERNAME {USERNAME!r} must be non-empty and without ':'")
generated = not PASSWORD
if generated:
    PASSWORD = secrets.token_urlsafe(12)
os.environ["MASUKA_AUTH"] = f"{USERNAME}:{PASSWORD}"

from masuka.web.server import check_share_policy
from masuka.settings import parse_settings

settings = parse_settings(["--share", "--model", MODEL_ID, "--memory", MEMORY], env=os.environ)
check_share_policy(settings)  # a public link always has a password
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
print(f"user: {USERNAME}")
print(f"password: {PASSWORD}" if generated else "password: the one you set")
"""

LAUNCH = """\
#@title 9 · Launch (the public link appears below; stop this cell to stop the app)
import dataclasses
import gc

import torch
from masuka.studio import build_studio
from masuka.web.server import launch


def same_app(a, b):
    return dataclasses.replace(a, auth=None) == dataclasses.replace(b, auth=None)


# Run again after stopping: the loaded model is reused unless the settings changed.
if globals().get("studio") is not None and not same_app(studio.settings, settings):
    studio.close()
    studio = None
    gc.collect()
    torch.cuda.empty_cache()
if globals().get("studio") is None:
    studio = build_studio(settings)  # loads the model: several minutes the first time (download)
demo, local_url, share_url = launch(settings, block=False, studio=studio)
print(f"\\n  Open {share_url or local_url}  ·  user {USERNAME}  ·  password printed above\\n")
if not share_url:
    print("No share link (Gradio could not open its tunnel); retry this cell.")
demo.block_thread()
"""

FROM_PYTHON = """\
### Use it from Python
```python
from gradio_client import Client
client = Client("<the public link>", auth=("masuka", "<password>"))
images, job = client.predict(prompt="a lighthouse at dusk", seed=42, api_name="/generate")
```
Every endpoint (LoRAs, history, errors, cancel) is in the README's *Use it from Python* section.
"""


def build() -> nbformat.NotebookNode:
    def code(cell_id: str, source: str, *tags: str):
        cell = new_code_cell(source.rstrip("\n"), id=cell_id)
        cell.metadata["cellView"] = "form"  # Colab shows the form and hides the code
        if tags:
            cell.metadata["tags"] = list(tags)
        return cell

    nb = new_notebook(
        cells=[
            new_markdown_cell(INTRO.rstrip("\n"), id="intro"),
            code("gpu", GPU),
            code("settings", PARAMETERS, "parameters"),
            code("code", CLONE, "ci-replace-clone"),
            code("install", PIP, "ci-replace-pip"),
            code("token", TOKEN),
            code("storage", STORAGE),
            code("model", MODEL_CELL),
            code("prepare", PREPARE),
            code("launch", LAUNCH, "ci-launch"),
            new_markdown_cell(FROM_PYTHON.rstrip("\n"), id="from-python"),
        ],
        metadata={
            "accelerator": "GPU",
            "colab": {"provenance": [], "gpuType": "T4"},
            "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
            "language_info": {"name": "python"},
        },
    )
    nbformat.validate(nb)
    return nb


def render() -> str:
    return nbformat.writes(build()) + "\n"


def main() -> int:
    NOTEBOOK.write_text(render(), encoding="utf-8")
    sys.stdout.write(f"wrote {NOTEBOOK}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
