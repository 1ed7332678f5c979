"""The LoRA library: the folder `<home>/loras/` and its registry.

The library owns its folder.  Every file is verified before it is listed as
usable; files dropped in by hand (a Drive sync, a copy) are verified on scan.
The registry is a JSON file written atomically under a file lock, so several
processes can share one home folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from filelock import FileLock

from .generator import LoraNotUsable, ResolvedLora
from .validation import validate_name

log = logging.getLogger(__name__)

REGISTRY = ".registry.json"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
FitChecker = Callable[[Path], "str | None"]


@dataclass
class LoraRecord:
    name: str
    file: str  # file name inside the library folder (never a key named "path")
    sha256: str = ""
    size_bytes: int = 0
    source: str = "folder"
    format: str = ""
    rank: int | None = None
    trigger_words: list[str] = field(default_factory=list)
    added_at: float = 0.0
    mtime: float = 0.0
    state: str = "usable"  # usable | refused | not fitting
    reason: str = ""

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("mtime")
        return d


class LoraLibrary:
    def __init__(self, folder: Path, *, max_bytes: int = 2 * 1024**3, fits: FitChecker | None = None):
        self.folder = Path(folder)
        self.max_bytes = max_bytes
        self.fits = fits
        self._records: dict[str, LoraRecord] = {}
        self._mutex = threading.RLock()
        self._fit_cache: dict[str, str | None] = {}  # sha256 -> reason it does not fit

    # ---- registry --------------------------------------------------------
    @property
    def _lock(self) -> FileLock:
        return FileLock(str(self.folder / ".registry.lock"))

    def _read_registry(self) -> dict[str, dict[str, Any]]:
        try:
            data = json.loads((self.folder / REGISTRY).read_text())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, OSError) as exc:
            log.warning("LoRA registry unreadable (%s); rebuilding it from the folder", exc)
            return {}
        return data if isinstance(data, dict) else {}

    def _write_registry(self, records: dict[str, LoraRecord]) -> None:
        data = {name: asdict(rec) for name, rec in sorted(records.items())}
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".registry.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.folder / REGISTRY)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ---- judging files ---------------------------------------------------
    def _judge(self, file: Path, old: LoraRecord | None) -> LoraRecord:
        from .lora_formats import LoraRefused, inspect_lora_file

        st = file.stat()
        name = file.stem if file.suffix.lower() == ".safetensors" else file.name
        rec = LoraRecord(
            name=name,
            file=file.name,
            size_bytes=st.st_size,
            mtime=st.st_mtime,
            source=old.source if old else "folder",
            added_at=old.added_at if old else time.time(),
        )
        if old and old.sha256 and old.size_bytes == st.st_size and old.mtime == st.st_mtime:
            # Unchanged since it was judged: keep the verdict, skip re-hashing.
            return LoraRecord(**{**asdict(old), "name": name, "file": file.name})
        try:
            validate_name(name)
        except ValueError as exc:
            rec.state, rec.reason = "refused", str(exc)
            return rec
        if st.st_size > self.max_bytes:
            rec.state, rec.reason = "refused", self._too_big(st.st_size)
            return rec
        try:
            info = inspect_lora_file(file)
        except LoraRefused as exc:
            rec.state, rec.reason = "refused", str(exc)
            return rec
        rec.sha256, rec.format, rec.rank = info.sha256, info.format, info.rank
        rec.trigger_words = list(old.trigger_words) if old and old.trigger_words else list(info.trigger_words)
        rec.state, rec.reason = "usable", ""
        return rec

    def _too_big(self, size: int) -> str:
        return f"file is {size / 2**20:.0f} MiB; the LoRA size cap is {self.max_bytes / 2**20:.0f} MiB"

    def _fit_reason(self, rec: LoraRecord) -> str | None:
        if self.fits is None or rec.state == "refused":
            return None
        if rec.sha256 not in self._fit_cache:
            self._fit_cache[rec.sha256] = self.fits(self.folder / rec.file)
        return self._fit_cache[rec.sha256]

    def _with_fit(self, rec: LoraRecord) -> LoraRecord:
        reason = self._fit_reason(rec)
        if reason:
            return LoraRecord(**{**asdict(rec), "state": "not fitting", "reason": reason})
        return rec

    # ---- public ----------------------------------------------------------
    def scan(self) -> list[LoraRecord]:
        """Verify every file in the folder (new or changed ones only) and refresh the registry."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with self._mutex, self._lock:
            old = {rec.get("file"): LoraRecord(**rec) for rec in self._read_registry().values() if "file" in rec}
            records: dict[str, LoraRecord] = {}
            for file in sorted(self.folder.iterdir()):
                if file.name.startswith(".") or not file.is_file():
                    continue
                if file.suffix.lower() not in (".safetensors",) + PICKLE_SUFFIXES:
                    continue
                rec = self._judge(file, old.get(file.name))
                records[rec.name] = rec
            self._write_registry(records)
            self._records = {name: self._with_fit(rec) for name, rec in records.items()}
            return list(self._records.values())

    def list(self) -> list[LoraRecord]:
        with self._mutex:
            return list(self._records.values())

    def usable_names(self) -> list[str]:
        return [r.name for r in self.list() if r.state == "usable"]

    def get(self, name: str) -> LoraRecord:
        validate_name(name)
        with self._mutex:
            rec = self._records.get(name)
        if rec is None or not (self.folder / rec.file).exists():
            self.scan()  # a file may have been dropped in since the last scan
            with self._mutex:
                rec = self._records.get(name)
        if rec is None:
            known = ", ".join(self.usable_names()) or "none"
            raise ValueError(f"LoRA {name!r} is not in the library (usable LoRAs: {known})")
        return rec

    def resolve(self, name: str) -> ResolvedLora:
        rec = self.get(name)
        if rec.state != "usable":
            raise LoraNotUsable(f"LoRA {name!r} cannot be used: {rec.reason}")
        return ResolvedLora(rec.name, self.folder / rec.file, rec.sha256)

    def table(self):
        import pandas as pd

        rows = [
            {
                "name": r.name,
                "size_mb": round(r.size_bytes / 2**20, 2),
                "sha256": r.sha256,
                "source": r.source,
                "format": r.format,
                "trigger_words": ", ".join(r.trigger_words),
                "state": r.state,
                "reason": r.reason,
            }
            for r in self.list()
        ]
        cols = ["name", "size_mb", "sha256", "source", "format", "trigger_words", "state", "reason"]
        return pd.DataFrame(rows, columns=cols)

    def add_file(self, src: Path, *, name: str, source: str, trigger_words: Iterable[str] = ()) -> LoraRecord:
        """Verify a local file (an upload) and copy it into the library under `name`."""
        from .lora_formats import inspect_lora_file

        validate_name(name)
        src = Path(src)
        size = src.stat().st_size
        if size > self.max_bytes:
            raise ValueError(self._too_big(size))
        info = inspect_lora_file(src)  # raises LoraRefused (a ValueError) before anything is copied
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"{name}.safetensors"
        with self._mutex, FileLock(str(self.folder / f".{name}.safetensors.lock")):
            existing = self._read_registry().get(name)
            if final.exists() or existing:
                same = existing and existing.get("sha256") == info.sha256
                if same:
                    return self.get(name)
                raise ValueError(f"a LoRA named {name!r} already exists; pick another name")
            fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=f".{name}.", suffix=".incomplete")
            try:
                with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                    shutil.copyfileobj(inp, out, 1024 * 1024)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, final)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        return self.register(final, source=source, trigger_words=trigger_words)

    def register(self, file: Path, *, source: str, trigger_words: Iterable[str] = ()) -> LoraRecord:
        """Record where a file already in the folder came from, then rescan."""
        with self._mutex, self._lock:
            registry = self._read_registry()
            name = file.stem
            st = file.stat()
            rec = self._judge(file, None)
            rec.source = source
            extra = [w for w in trigger_words if w]
            if extra:
                rec.trigger_words = list(dict.fromkeys(extra + rec.trigger_words))
            registry[name] = asdict(rec)
            rec.mtime = st.st_mtime
            self._write_registry({n: LoraRecord(**r) for n, r in registry.items()})
        self.scan()
        return self.get(name)

    def delete(self, name: str, in_use: Iterable[str] = ()) -> None:
        rec = self.get(name)
        if name in set(in_use):
            raise ValueError(f"LoRA {name!r} is in use by a running job or the loaded pipeline; try again later")
        with self._mutex, self._lock:
            (self.folder / rec.file).unlink(missing_ok=True)
            registry = self._read_registry()
            registry.pop(name, None)
            self._write_registry({n: LoraRecord(**r) for n, r in registry.items()})
            self._records.pop(name, None)
