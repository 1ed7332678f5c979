"""Settings: one dataclass built from CLI flags and environment variables.

Flags win over environment variables, which win over defaults.  Parsing happens
only when `parse_settings` is called (never at import time).
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

TINY_MODEL_ID = "masuka/tiny-flux"  # the built-in demo model (masuka/model/tiny.py builds it)
DEFAULT_HOME = Path("~/.masuka")
DEFAULT_PORT = 7860
DEFAULT_LORA_MAX_BYTES = 2 * 1024**3
# How slow a download may be before it is given up.  A LoRA is at most 2 GiB by default;
# 30 minutes lets that through at 1.2 MiB/s, far below what Colab gets from the Hub or
# Civitai.  50 KiB/s averaged over 30 s is far below any working link, and far above a
# server that sends a byte every few seconds to hold a download slot.
DEFAULT_DOWNLOAD_TIMEOUT_S = 30 * 60.0  # overall, per download; 0 = no limit
DEFAULT_DOWNLOAD_MIN_RATE_KIB = 50.0  # KiB/s averaged over the window; 0 = no minimum
DEFAULT_RATE_WINDOW_S = 30.0  # the rate is first checked after one full window
MEMORY_PROFILES = ("auto", "full", "offload", "lowvram", "quantized")
# Step caching for speed="fast" jobs (masuka.core.speed), and each method's default threshold.
# first-block 0.08: the published "nearly lossless" First Block Cache threshold for FLUX.1-dev (0.35 is
# lossy, about 2x); measured here in bench/speed.py. mag 0.06: diffusers' MagCache default.
CACHE_METHODS = ("first-block", "mag")
CACHE_DEFAULT_THRESHOLDS = {"first-block": 0.08, "mag": 0.06}
DEFAULT_CACHE_THRESHOLD = CACHE_DEFAULT_THRESHOLDS["first-block"]
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
DTYPES = ("auto", "bfloat16", "float16", "float32")
SHARED_RATE_LIMIT = 10  # generations per login per minute when a share link is open and none is set
UPLOAD_MAX_FILES = 4
UPLOAD_OTHER_MAX_MB = 64  # uploads that are not LoRA files (.safetensors)
UPLOAD_QUOTA_LORAS = 4  # the upload folder holds at most this many LoRA size caps
UPLOAD_EXPIRY_MIN = 120
_HOST_ENTRY = re.compile(r"\*|(\*\.)?[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?|\[?[0-9a-f:.]+\]?")


@dataclass(frozen=True)
class Paths:
    """Every folder and file MASUKA writes lives under one home folder.

    The LoRA library and the images may live elsewhere (e.g. on a Google Drive
    mount, to survive a Colab runtime reset); the database always stays in the
    home folder, on local disk, because SQLite's WAL and locks need a real file
    system (it is copied to `db_backup` instead).
    """

    home: Path
    loras_dir: Path | None = None
    outputs_dir: Path | None = None
    db_backup: Path | None = None

    @property
    def db(self) -> Path:
        return self.home / "masuka.db"

    @property
    def loras(self) -> Path:
        return self.loras_dir or self.home / "loras"

    @property
    def outputs(self) -> Path:
        return self.outputs_dir or self.home / "outputs"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def lora_locks(self) -> Path:
        """The LoRA library's lock files: beside the LoRAs, unless those live elsewhere
        (a Drive mount, where file locks are not reliable): then on the home's local disk."""
        return self.home / "locks" / "loras" if self.loras_dir else self.loras

    def create(self) -> None:
        for folder in (self.home, self.loras, self.outputs, self.models, self.lora_locks):
            folder.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Settings:
    model: str = TINY_MODEL_ID
    base_model: str = ""  # single-file transformers: where the other components come from ("" = guess)
    home: Path = DEFAULT_HOME
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    share: bool = False
    auth: tuple[str, str] | None = field(default=None, repr=False)
    device: str = "auto"
    dtype: str = "auto"
    memory: str = "auto"
    compile: bool = False
    cache: str = CACHE_METHODS[0]  # how speed="fast" jobs cache steps
    cache_threshold: float | None = None  # None: the method's default (CACHE_DEFAULT_THRESHOLDS)
    fp8: bool = False  # transformer linear weights in float8 (torchao; compute capability 8.9+)
    queue_size: int = 20
    rate_limit_per_minute: int = 0
    lora_max_bytes: int = DEFAULT_LORA_MAX_BYTES
    lora_cache_mb: int = 2048
    allow_private_urls: bool = False
    download_timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S  # a LoRA download's overall limit; 0 = none
    download_min_rate_kib: float = DEFAULT_DOWNLOAD_MIN_RATE_KIB  # KiB/s averaged over 30 s; 0 = none
    loras_dir: Path | None = None
    outputs_dir: Path | None = None
    db_backup: Path | None = None
    allowed_hosts: tuple[str, ...] = ()  # Host names served besides loopback, --host and the share link
    upload_max_files: int = UPLOAD_MAX_FILES  # files in one upload request
    upload_other_max_bytes: int = UPLOAD_OTHER_MAX_MB * 1024**2  # an upload that is not a .safetensors file
    upload_quota_bytes: int | None = None  # uploads kept at once; None = UPLOAD_QUOTA_LORAS x lora_max_bytes
    upload_expiry_s: int = UPLOAD_EXPIRY_MIN * 60  # uploads (and Gradio's copies of images) older than this go
    plan: str = ""  # --plan: print the memory plan for this machine ("this") or a named GPU, then exit

    @property
    def paths(self) -> Paths:
        return Paths(self.home, self.loras_dir, self.outputs_dir, self.db_backup)

    @property
    def upload_quota(self) -> int:
        if self.upload_quota_bytes is not None:
            return self.upload_quota_bytes
        return UPLOAD_QUOTA_LORAS * self.lora_max_bytes


def parse_auth(value: str | None) -> tuple[str, str] | None:
    """`USER:PASS` -> (user, password).  Empty means no auth."""
    if not value:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ValueError("auth must look like USER:PASS with a non-empty user and password")
    return user, password


def parse_allowed_hosts(value: str | None) -> tuple[str, ...]:
    """`a.example,*.lan,10.0.0.5` -> ("a.example", "*.lan", "10.0.0.5"); `*` allows any Host."""
    hosts = []
    for entry in (value or "").split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if not _HOST_ENTRY.fullmatch(entry):
            raise ValueError(
                f"allowed host {entry!r} is not a host name, *.domain, an address or *; no scheme, port or path"
            )
        hosts.append(entry)
    return tuple(hosts)


def _env_flag(env: Mapping[str, str], name: str) -> bool | None:
    raw = env.get(name)
    if raw is None or raw == "":
        return None
    return raw.strip().lower() in ("1", "true", "yes", "on")


def on_colab(env: Mapping[str, str] = os.environ) -> bool:
    return "COLAB_RELEASE_TAG" in env or "COLAB_GPU" in env


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="app.py",
        description="MASUKA: a FLUX.1 image studio with LoRAs (Gradio UI and client API).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--model",
        default=None,
        help=f"'{TINY_MODEL_ID}' (built-in demo model with random weights, no download), a Hub id "
        "such as black-forest-labs/FLUX.1-schnell, a local diffusers folder with model_index.json, "
        "or a single-file transformer (.safetensors/.gguf). Env: MASUKA_MODEL. Default: "
        f"{TINY_MODEL_ID}",
    )
    p.add_argument(
        "--base-model",
        default=None,
        help="for a single-file --model (.safetensors/.gguf transformer): the Hub id or diffusers folder "
        "that gives the text encoders, VAE, scheduler and transformer config. Env: MASUKA_BASE_MODEL. "
        "Default: black-forest-labs/FLUX.1-schnell if the file name says schnell, else "
        "black-forest-labs/FLUX.1-dev (gated: needs HF_TOKEN)",
    )
    p.add_argument(
        "--home",
        default=None,
        help="folder for the job database, the LoRA library, output images and the built-in "
        f"model. Env: MASUKA_HOME. Default: {DEFAULT_HOME}",
    )
    p.add_argument(
        "--loras-dir",
        default=None,
        help="LoRA library folder (may be a Google Drive folder). Env: MASUKA_LORAS_DIR. Default: <home>/loras",
    )
    p.add_argument(
        "--outputs-dir",
        default=None,
        help="folder for generated images (may be a Google Drive folder). Env: MASUKA_OUTPUTS_DIR. "
        "Default: <home>/outputs",
    )
    p.add_argument(
        "--db-backup",
        default=None,
        help="file to copy the job database to after every job (e.g. on Google Drive), and to restore "
        "it from at start when the local database is missing. Env: MASUKA_DB_BACKUP. Default: none",
    )
    p.add_argument("--host", default=None, help="address to listen on. Env: GRADIO_SERVER_NAME. Default: 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help=f"port. Env: GRADIO_SERVER_PORT. Default: {DEFAULT_PORT}")
    p.add_argument(
        "--share",
        action="store_true",
        default=None,
        help="open a public Gradio share link (requires --auth). Env: GRADIO_SHARE. Default on Colab",
    )
    p.add_argument("--no-share", dest="share", action="store_false", help="never open a share link, even on Colab")
    p.add_argument("--auth", default=None, help="USER:PASS required for the page and the API. Env: MASUKA_AUTH")
    p.add_argument("--device", default=None, help="auto, cpu, cuda or cuda:N. Env: MASUKA_DEVICE. Default: auto")
    p.add_argument(
        "--dtype",
        default=None,
        choices=DTYPES,
        help="auto = bfloat16 on GPUs of compute capability >= 8.0, float16 on older GPUs, float32 on CPU. "
        "Env: MASUKA_DTYPE",
    )
    p.add_argument(
        "--memory",
        default=None,
        choices=MEMORY_PROFILES,
        help="where the weights live: full (all on the GPU), offload (model CPU offload), lowvram "
        "(sequential offload, slow), quantized (NF4 or GGUF transformer, 8-bit T5; needs "
        "requirements-gpu.txt), auto (picked from GPU memory and RAM, and says why). "
        "See docs/memory-profiles.md. Env: MASUKA_MEMORY. Default: auto",
    )
    p.add_argument(
        "--plan",
        nargs="?",
        const="this",
        default=None,
        metavar="GPU",
        help="print the memory plan for --model / --memory (what sits on the GPU and in RAM while loading and "
        "generating, what auto picks and why) and exit, without loading a model or opening a port: for this "
        "machine, or for a Colab GPU: t4, l4, a100-40, a100-80, h100 (or h200). See docs/memory-profiles.md",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="torch.compile the transformer's repeated blocks at start, with a warm-up image at the default "
        "size; needs memory profile full or offload; LoRAs that cannot be fused into the weights are refused. "
        "Env: MASUKA_COMPILE",
    )
    p.add_argument(
        "--cache",
        choices=CACHE_METHODS,
        default=None,
        help="how jobs asking for speed=fast skip transformer steps: first-block (diffusers' First Block Cache) "
        "or mag (MagCache, with diffusers' FLUX magnitude ratios). Exact jobs never use it. Env: MASUKA_CACHE. "
        "Default: first-block",
    )
    p.add_argument(
        "--cache-threshold",
        type=float,
        default=None,
        help="the cache's threshold for fast jobs, above 0 and at most 1: higher skips more steps and "
        "costs more quality (first-block: 0.08 nearly lossless, 0.35 lossy). Env: MASUKA_CACHE_THRESHOLD. "
        "Default: 0.08 for first-block, 0.06 for mag",
    )
    p.add_argument(
        "--fp8",
        action="store_true",
        default=None,
        help="store the transformer's linear weights in float8 (torchao, about half the memory of bf16); needs a "
        "GPU of compute capability 8.9+ (L4, H100) and `pip install torchao`; refused at start otherwise. "
        "Env: MASUKA_FP8",
    )
    p.add_argument("--queue-size", type=int, default=None, help="max jobs waiting in the queue. Env: MASUKA_QUEUE_SIZE. Default: 20")
    p.add_argument(
        "--rate-limit",
        type=int,
        default=None,
        help="max generations per user per minute, 0 = unlimited. Env: MASUKA_RATE_LIMIT. "
        f"Default: {SHARED_RATE_LIMIT} with a share link, else 0",
    )
    p.add_argument(
        "--lora-max-mb",
        type=int,
        default=None,
        help="largest LoRA file accepted (also the upload limit). Env: MASUKA_LORA_MAX_MB. Default: 2048",
    )
    p.add_argument(
        "--download-timeout",
        type=float,
        default=None,
        help="seconds a LoRA download from a link may take in all, 0 = no limit. Env: MASUKA_DOWNLOAD_TIMEOUT. "
        f"Default: {DEFAULT_DOWNLOAD_TIMEOUT_S:g}",
    )
    p.add_argument(
        "--download-min-rate",
        type=float,
        default=None,
        help="KiB/s a LoRA download from a link must average over 30 s (checked after the first 30 s), "
        f"0 = no minimum. Env: MASUKA_DOWNLOAD_MIN_RATE. Default: {DEFAULT_DOWNLOAD_MIN_RATE_KIB:g}",
    )
    p.add_argument(
        "--allowed-hosts",
        default=None,
        help="comma-separated Host names the app also answers to (e.g. a reverse proxy's name, *.lan); "
        "loopback names, the --host address (any address with 0.0.0.0) and the share link always work; "
        "* turns the check off. Env: MASUKA_ALLOWED_HOSTS. Default: none",
    )
    p.add_argument(
        "--upload-quota-mb",
        type=int,
        default=None,
        help="MB of uploads kept at once (a fuller folder refuses uploads until old ones expire). "
        f"Env: MASUKA_UPLOAD_QUOTA_MB. Default: {UPLOAD_QUOTA_LORAS} x --lora-max-mb",
    )
    p.add_argument(
        "--upload-max-mb",
        type=int,
        default=None,
        help="largest upload that is not a LoRA (.safetensors) file. Env: MASUKA_UPLOAD_MAX_MB. "
        f"Default: {UPLOAD_OTHER_MAX_MB}",
    )
    p.add_argument(
        "--upload-max-files",
        type=int,
        default=None,
        help=f"files in one upload request. Env: MASUKA_UPLOAD_MAX_FILES. Default: {UPLOAD_MAX_FILES}",
    )
    p.add_argument(
        "--upload-expiry-min",
        type=int,
        default=None,
        help="minutes before uploads (and Gradio's copies of shown images) are deleted. "
        f"Env: MASUKA_UPLOAD_EXPIRY_MIN. Default: {UPLOAD_EXPIRY_MIN}",
    )
    return p


def _pick(flag, env: Mapping[str, str], name: str, default, cast=str):
    if flag is not None:
        return flag
    raw = env.get(name)
    if raw is not None and raw != "":
        try:
            return cast(raw)
        except ValueError as exc:
            raise ValueError(f"{name}={raw!r} is not valid: {exc}") from exc
    return default


def _optional_path(value: str | None) -> Path | None:
    return Path(value).expanduser().resolve() if value else None


def parse_settings(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    args = build_parser().parse_args(argv)
    share = args.share
    if share is None:
        share = _env_flag(env, "GRADIO_SHARE")
    if share is None:
        # Gradio opens a share link by default on Colab; we say so explicitly
        # so the password check sees the same decision Gradio would make.
        share = on_colab(env)
    lora_mb = _pick(args.lora_max_mb, env, "MASUKA_LORA_MAX_MB", DEFAULT_LORA_MAX_BYTES // 1024**2, int)
    quota_mb = _pick(args.upload_quota_mb, env, "MASUKA_UPLOAD_QUOTA_MB", None, int)
    settings = Settings(
        model=_pick(args.model, env, "MASUKA_MODEL", TINY_MODEL_ID),
        base_model=_pick(args.base_model, env, "MASUKA_BASE_MODEL", ""),
        home=Path(_pick(args.home, env, "MASUKA_HOME", str(DEFAULT_HOME))).expanduser().resolve(),
        host=_pick(args.host, env, "GRADIO_SERVER_NAME", "127.0.0.1"),
        port=_pick(args.port, env, "GRADIO_SERVER_PORT", DEFAULT_PORT, int),
        share=bool(share),
        auth=parse_auth(_pick(args.auth, env, "MASUKA_AUTH", None)),
        device=_pick(args.device, env, "MASUKA_DEVICE", "auto"),
        dtype=_pick(args.dtype, env, "MASUKA_DTYPE", "auto"),
        memory=_pick(args.memory, env, "MASUKA_MEMORY", "auto"),
        compile=bool(args.compile or _env_flag(env, "MASUKA_COMPILE")),
        cache=_pick(args.cache, env, "MASUKA_CACHE", CACHE_METHODS[0]),
        cache_threshold=_pick(args.cache_threshold, env, "MASUKA_CACHE_THRESHOLD", None, float),
        fp8=bool(args.fp8 or _env_flag(env, "MASUKA_FP8")),
        queue_size=_pick(args.queue_size, env, "MASUKA_QUEUE_SIZE", 20, int),
        # A share link reaches strangers' browsers: one login should not hold the GPU by default.
        rate_limit_per_minute=_pick(args.rate_limit, env, "MASUKA_RATE_LIMIT", SHARED_RATE_LIMIT if share else 0, int),
        lora_max_bytes=int(lora_mb) * 1024**2,
        allow_private_urls=bool(_env_flag(env, "MASUKA_ALLOW_PRIVATE_URLS")),
        download_timeout_s=_pick(
            args.download_timeout, env, "MASUKA_DOWNLOAD_TIMEOUT", DEFAULT_DOWNLOAD_TIMEOUT_S, float
        ),
        download_min_rate_kib=_pick(
            args.download_min_rate, env, "MASUKA_DOWNLOAD_MIN_RATE", DEFAULT_DOWNLOAD_MIN_RATE_KIB, float
        ),
        loras_dir=_optional_path(_pick(args.loras_dir, env, "MASUKA_LORAS_DIR", None)),
        outputs_dir=_optional_path(_pick(args.outputs_dir, env, "MASUKA_OUTPUTS_DIR", None)),
        db_backup=_optional_path(_pick(args.db_backup, env, "MASUKA_DB_BACKUP", None)),
        allowed_hosts=parse_allowed_hosts(_pick(args.allowed_hosts, env, "MASUKA_ALLOWED_HOSTS", "")),
        upload_max_files=_pick(args.upload_max_files, env, "MASUKA_UPLOAD_MAX_FILES", UPLOAD_MAX_FILES, int),
        upload_other_max_bytes=_pick(args.upload_max_mb, env, "MASUKA_UPLOAD_MAX_MB", UPLOAD_OTHER_MAX_MB, int)
        * 1024**2,
        upload_quota_bytes=None if quota_mb is None else int(quota_mb) * 1024**2,
        upload_expiry_s=_pick(args.upload_expiry_min, env, "MASUKA_UPLOAD_EXPIRY_MIN", UPLOAD_EXPIRY_MIN, int) * 60,
        plan=(args.plan or "").strip().lower(),
    )
    validate_settings(settings)
    return settings


def validate_settings(settings: Settings) -> None:
    if not _DEVICE.match(settings.device):
        raise ValueError(f"device {settings.device!r} is not one of auto, cpu, cuda or cuda:N")
    if settings.dtype not in DTYPES:
        raise ValueError(f"dtype {settings.dtype!r} is not one of {', '.join(DTYPES)}")
    if settings.memory not in MEMORY_PROFILES:
        raise ValueError(f"memory profile {settings.memory!r} is not one of {', '.join(MEMORY_PROFILES)}")
    if settings.cache not in CACHE_METHODS:
        raise ValueError(f"cache method {settings.cache!r} (--cache) is not one of {', '.join(CACHE_METHODS)}")
    if settings.cache_threshold is not None and not 0 < settings.cache_threshold <= 1:  # also refuses NaN
        raise ValueError(f"cache threshold {settings.cache_threshold:g} (--cache-threshold) must be above 0 and at most 1")
    if not 1 <= settings.port <= 65535:
        raise ValueError(f"port {settings.port} is not in 1..65535")
    if settings.queue_size < 1:
        raise ValueError(f"queue size {settings.queue_size} must be at least 1")
    if settings.rate_limit_per_minute < 0:
        raise ValueError(f"rate limit {settings.rate_limit_per_minute} must be 0 (off) or more")
    if settings.db_backup is not None and settings.db_backup.resolve() == settings.paths.db.resolve():
        raise ValueError(f"db backup {settings.db_backup} is the database itself; pick another file")
    if settings.lora_max_bytes < 1024**2:
        raise ValueError(f"LoRA size cap {settings.lora_max_bytes // 1024**2} MB must be at least 1 MB")
    if settings.upload_max_files < 1:
        raise ValueError(f"upload file count {settings.upload_max_files} (--upload-max-files) must be at least 1")
    if settings.upload_other_max_bytes < 1024**2:
        raise ValueError(
            f"upload size cap {settings.upload_other_max_bytes // 1024**2} MB (--upload-max-mb) must be at least 1 MB"
        )
    if settings.upload_quota < settings.lora_max_bytes:
        raise ValueError(
            f"upload quota {settings.upload_quota // 1024**2} MB (--upload-quota-mb) is below the LoRA size cap "
            f"{settings.lora_max_bytes // 1024**2} MB: no LoRA of the largest size could be uploaded"
        )
    if settings.upload_expiry_s < 1:
        raise ValueError(f"upload expiry {settings.upload_expiry_s} s (--upload-expiry-min) must be at least 1 minute")
    for what, value in (
        ("download timeout (--download-timeout)", settings.download_timeout_s),
        ("download minimum rate (--download-min-rate)", settings.download_min_rate_kib),
    ):
        if not 0 <= value < float("inf"):  # also refuses NaN
            raise ValueError(f"{what} {value:g} must be 0 (no limit) or a positive finite number")


def resolve_device_dtype(device: str = "auto", dtype: str = "auto"):
    """Pick (torch.device, torch.dtype).

    bf16 only on compute capability >= 8.0: `torch.cuda.is_bf16_supported()`
    says yes on a T4 through slow emulation, so we look at the capability.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not _DEVICE.match(device):
        raise ValueError(f"device {device!r} is not one of auto, cpu, cuda or cuda:N")
    dev = torch.device(device)
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"device {device!r} was asked for, but torch sees no CUDA GPU here; use --device cpu or auto")
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device {device!r} was asked for, but torch sees {count} CUDA GPU(s) (cuda:0..cuda:{count - 1})")
    if dtype != "auto":
        return dev, getattr(torch, dtype)
    if dev.type == "cuda":
        major, _minor = torch.cuda.get_device_capability(dev)
        return dev, torch.bfloat16 if major >= 8 else torch.float16
    return dev, torch.float32
