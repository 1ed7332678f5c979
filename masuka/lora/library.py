"""The LoRA library: the folder `<home>/loras/` and its registry.

The library owns its folder.  Every file is verified before it is listed as
usable; files dropped in by hand (a Drive sync, a copy) are verified on scan.
Several processes may share one home folder:

* the registry (`.registry.json`) is only written under `.registry.lock`, by
  writing a temp file, fsyncing it and `os.replace`-ing it into place;
* adding from a source holds `.source-<hash>.lock` for the whole transfer, and
  looks in the registry again once it has the lock, so the same link added by
  several processes at once is transferred once;
* transfers land in `.incoming/` (verified, under a temp name) and are moved to
  `<name>.safetensors` under the registry lock, so nothing unverified or half
  written ever carries a final name.

Lock files are never deleted (another process may hold them); they, the
registry and `.incoming/` start with a dot and are never listed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable

from filelock import FileLock
from filelock import Timeout as LockTimeout

from masuka.lora.formats import PICKLE_EXTENSIONS, LoraRefused, check_fits, inspect_lora_file
from masuka.net import safe as netsafe
from masuka.net import transfers as downloads
from masuka.net.transfers import cleanup_stale_partials
from masuka.lora.types import LoraInUse, LoraNotUsable, ResolvedLora, validate_name
from masuka.settings import DEFAULT_DOWNLOAD_MIN_RATE_KIB, DEFAULT_DOWNLOAD_TIMEOUT_S, DEFAULT_RATE_WINDOW_S
from masuka.store.atomic import atomic_copy, atomic_write_bytes
from masuka.units import human_bytes

log = logging.getLogger(__name__)

REGISTRY = ".registry.json"
REGISTRY_LOCK = ".registry.lock"
INCOMING = ".incoming"
LORA_SUFFIX = ".safetensors"
# Pickles are listed (as refused) so a user sees why a dropped one is not offered; never opened.
LISTED_SUFFIXES = (LORA_SUFFIX, *sorted(PICKLE_EXTENSIONS))
STALE_SECONDS = 3600  # leftovers of a killed process older than this are removed on scan
GENERIC_STEMS = {"pytorch_lora_weights", "lora", "adapter_model", "model", "diffusion_pytorch_model"}

FitChecker = Callable[[Path], "str | None"]
ProgressCallback = Callable[[int, "int | None"], None]


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
    # Fit verdicts per model shape (fit_checker's key): "" fits, else why not.  Kept in
    # the registry so a start does not read every LoRA again; processes running other
    # models on the same home keep their own verdicts.
    fits: dict[str, str] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("mtime")
        d.pop("fits")
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LoraRecord":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def name_from_filename(filename: str | None) -> str | None:
    """A valid LoRA name from a file name ("My LoRA (v2).safetensors" -> "My_LoRA_v2"), or None."""
    if not filename:
        return None
    stem = Path(filename.replace("\\", "/")).name
    for suffix in LISTED_SUFFIXES:
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)
    stem = re.sub(r"\.{2,}", ".", stem).strip("._-")[:100].rstrip("._-")
    try:
        return validate_name(stem)
    except ValueError:
        return None


def fit_checker(transformer: Any) -> FitChecker:
    """`check_fits` against a shape-only (meta device) copy of `transformer`.

    The live transformer gains and loses LoRA layers while jobs run, and fit checks
    (an add, a scan) run beside jobs; the copy never changes and costs no memory.
    The returned function's `key` names the shapes (a hash of every linear layer's
    name and size), under which verdicts are kept in the registry.
    """
    import torch

    shadow = transformer
    try:
        with torch.device("meta"):
            shadow = type(transformer).from_config(transformer.config)
    except Exception as exc:  # noqa: BLE001 - any model class: fall back to the live module
        log.info("no shape-only copy of the transformer (%s); fit checks read the live one", exc)
    digest = hashlib.sha256()
    for module_name, module in shadow.named_modules():
        if isinstance(module, torch.nn.Linear):
            digest.update(f"{module_name}:{module.in_features}x{module.out_features};".encode())

    def fits(file: Path) -> str | None:
        return check_fits(file, shadow)

    fits.key = digest.hexdigest()[:16]  # type: ignore[attr-defined]
    return fits


class LoraLibrary:
    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int = 2 * 1024**3,
        fits: FitChecker | None = None,
        allow_private: bool = False,
        lock_dir: Path | None = None,
        download_timeout_s: float = DEFAULT_DOWNLOAD_TIMEOUT_S,
        download_min_rate_kib: float = DEFAULT_DOWNLOAD_MIN_RATE_KIB,
        download_rate_window_s: float = DEFAULT_RATE_WINDOW_S,
    ):
        self.folder = Path(folder)
        # Locks need a local disk: with the library on a Drive mount they live elsewhere.
        self.lock_dir = Path(lock_dir) if lock_dir is not None else self.folder
        self.max_bytes = max_bytes
        self.fits = fits
        self.allow_private = allow_private
        # URL downloads: overall limit (s) and least average rate (KiB/s over the window); 0 = none.
        self.download_timeout_s = download_timeout_s
        self.download_min_rate_kib = download_min_rate_kib
        self.download_rate_window_s = download_rate_window_s
        self._records: dict[str, LoraRecord] = {}
        self._mutex = threading.RLock()  # one thread of this process in the registry at a time
        # One instance: filelock is re-entrant per instance, and two instances on
        # one path in one thread would deadlock.
        self._registry_lock = FileLock(str(self.lock_dir / REGISTRY_LOCK))
        self._fit_cache: dict[str, str | None] = {}  # sha256 -> reason it does not fit

    def _download_lock_dir(self) -> Path | None:
        return None if self.lock_dir == self.folder else self.lock_dir / INCOMING

    # ---- registry --------------------------------------------------------
    def _read_registry(self) -> dict[str, LoraRecord]:
        try:
            data = json.loads((self.folder / REGISTRY).read_text())
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, OSError, UnicodeDecodeError) as exc:
            log.warning("LoRA registry unreadable (%s); rebuilding it from the folder", exc)
            return {}
        if not isinstance(data, dict):
            return {}
        records = {}
        for name, rec in data.items():
            try:
                records[name] = LoraRecord.from_dict(rec)
            except TypeError:
                log.warning("ignoring a malformed registry entry %r", name)
        return records

    def _write_registry(self, records: dict[str, LoraRecord]) -> None:
        data = {name: asdict(rec) for name, rec in sorted(records.items())}
        atomic_write_bytes(self.folder / REGISTRY, json.dumps(data, indent=1).encode("utf-8"))

    # ---- judging files ---------------------------------------------------
    def _library_files(self) -> list[Path]:
        out = []
        for file in sorted(self.folder.iterdir()):
            if file.name.startswith(".") or file.suffix.lower() not in LISTED_SUFFIXES:
                continue
            if file.is_file():
                out.append(file)
        return out

    @staticmethod
    def _name_of(file: Path) -> str:
        return file.name[: -len(LORA_SUFFIX)] if file.name.lower().endswith(LORA_SUFFIX) else file.name

    @staticmethod
    def _unchanged(rec: LoraRecord | None, st: os.stat_result) -> bool:
        """The record holds a verdict on exactly this file version (same size and mtime)."""
        return (
            rec is not None
            and rec.size_bytes == st.st_size
            and rec.mtime == st.st_mtime
            and (bool(rec.sha256) or rec.state == "refused")
        )

    def _verify(self, file: Path):
        """Inspect a file for the library (size cap, header, completeness, format); raises LoraRefused."""
        size = file.stat().st_size
        if size > self.max_bytes:
            raise LoraRefused(self._too_big(size))
        return inspect_lora_file(file)

    def _judge(self, file: Path, old: LoraRecord | None) -> LoraRecord:
        st = file.stat()
        name = self._name_of(file)
        if self._unchanged(old, st):
            # Unchanged since it was judged: keep the verdict, skip re-hashing.
            return replace(old, name=name, file=file.name)
        rec = LoraRecord(name=name, file=file.name, size_bytes=st.st_size, mtime=st.st_mtime, added_at=time.time())
        try:
            validate_name(name)
            info = self._verify(file)
        except (LoraRefused, ValueError) as exc:
            rec.state, rec.reason = "refused", str(exc)
            return rec
        except OSError as exc:
            rec.state, rec.reason = "refused", f"cannot read the file: {exc.strerror or exc}"
            return rec
        rec.sha256, rec.format, rec.rank = info.sha256, info.format, info.rank
        rec.trigger_words = list(info.trigger_words)
        if old is not None and old.sha256 == info.sha256:
            # Same bytes, new mtime (a sync tool touched it): keep where it came from.
            rec.source, rec.added_at, rec.fits = old.source, old.added_at, dict(old.fits)
            rec.trigger_words = list(old.trigger_words) or rec.trigger_words
        return rec

    def _too_big(self, size: int) -> str:
        return (
            f"file is {human_bytes(size)}, larger than the LoRA size cap of {human_bytes(self.max_bytes)} "
            "(MASUKA_LORA_MAX_MB / --lora-max-mb)"
        )

    @property
    def _fit_key(self) -> str | None:
        return getattr(self.fits, "key", None)

    def _fit_reason(self, rec: LoraRecord) -> str | None:
        if self.fits is None or rec.state != "usable":
            return None
        key = self._fit_key
        if key is not None and key in rec.fits:
            return rec.fits[key] or None
        if rec.sha256 not in self._fit_cache:
            try:
                self._fit_cache[rec.sha256] = self.fits(self.folder / rec.file)
            except Exception as exc:  # noqa: BLE001 - a file replaced mid-check must not break the listing
                log.warning("fit check of LoRA %s failed: %s", rec.name, exc)
                return f"cannot be checked against this model: {exc}"
        return self._fit_cache[rec.sha256]

    def _with_fits(self, records: Iterable[LoraRecord]) -> list[LoraRecord]:
        """Records with this model's fit verdict applied; new verdicts are saved in the registry."""
        out, new = [], {}
        key = self._fit_key
        for rec in records:
            reason = self._fit_reason(rec)
            if key is not None and rec.state == "usable" and key not in rec.fits and rec.sha256 in self._fit_cache:
                new[rec.sha256] = reason or ""
            out.append(replace(rec, state="not fitting", reason=reason) if reason else rec)
        if new:
            self._save_fits(key, new)
        return out

    def _save_fits(self, key: str, verdicts: dict[str, str]) -> None:
        with self._mutex, self._registry_lock:
            registry = self._read_registry()
            changed = False
            for rec in registry.values():
                if rec.sha256 in verdicts and rec.fits.get(key) != verdicts[rec.sha256]:
                    rec.fits = {**rec.fits, key: verdicts[rec.sha256]}
                    changed = True
            if changed:
                self._write_registry(registry)

    def _remember(self, rec: LoraRecord) -> LoraRecord:
        (rec,) = self._with_fits([rec])
        with self._mutex:
            self._records[rec.name] = rec
        return rec

    # ---- scanning --------------------------------------------------------
    def scan(self) -> list[LoraRecord]:
        """Verify every new or changed file in the folder and refresh the registry.

        Hashing happens outside the registry lock; the merge re-reads the registry
        under it, so records written meanwhile by another process are kept.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        self._clean_leftovers()
        before = {rec.file: rec for rec in self._read_registry().values()}
        judged: dict[str, LoraRecord] = {}
        for file in self._library_files():
            try:
                judged[file.name] = self._judge(file, before.get(file.name))
            except FileNotFoundError:
                continue
        with self._mutex, self._registry_lock:
            current = self._read_registry()
            by_file = {rec.file: rec for rec in current.values()}
            records: dict[str, LoraRecord] = {}
            for file in self._library_files():
                try:
                    st = file.stat()
                    reg = by_file.get(file.name)
                    if self._unchanged(reg, st):
                        rec = replace(reg, name=self._name_of(file))
                    elif self._unchanged(judged.get(file.name), st):
                        rec = judged[file.name]
                    else:  # appeared or changed while we were hashing
                        rec = self._judge(file, reg)
                except FileNotFoundError:
                    continue
                if rec.name in records:
                    rec = replace(
                        rec, name=file.name, state="refused",
                        reason=f"another file already uses the name {rec.name!r}",
                    )
                records[rec.name] = rec
            if {n: asdict(r) for n, r in records.items()} != {n: asdict(r) for n, r in current.items()}:
                self._write_registry(records)
        fitted = self._with_fits(records.values())
        with self._mutex:
            self._records = {rec.name: rec for rec in fitted}
        return fitted

    def _clean_leftovers(self) -> None:
        """Temp files and staged transfers of killed processes (old, and nobody holds their lock)."""
        incoming = self.folder / INCOMING
        cleanup_stale_partials(incoming, STALE_SECONDS, lock_dir=self._download_lock_dir())
        now = time.time()
        for tmp in self.folder.glob(".registry.*.tmp"):  # a registry write cut by a kill
            try:
                if now - tmp.stat().st_mtime > STALE_SECONDS:
                    tmp.unlink()
            except FileNotFoundError:
                continue
        if not incoming.is_dir():
            return
        for staged in incoming.glob(f"*{LORA_SUFFIX}"):
            try:
                if now - staged.stat().st_mtime < STALE_SECONDS:
                    continue
            except FileNotFoundError:
                continue
            lock = FileLock(str(self.lock_dir / f".source-{staged.name[: -len(LORA_SUFFIX)]}.lock"), timeout=0)
            try:
                with lock:
                    staged.unlink(missing_ok=True)
            except LockTimeout:
                continue

    # ---- reading ---------------------------------------------------------
    def list(self) -> list[LoraRecord]:
        with self._mutex:
            return list(self._records.values())

    def usable_names(self) -> list[str]:
        return [r.name for r in self.list() if r.state == "usable"]

    def _stale(self, rec: LoraRecord) -> bool:
        try:
            st = (self.folder / rec.file).stat()
        except FileNotFoundError:
            return True
        return st.st_size != rec.size_bytes or st.st_mtime != rec.mtime

    def get(self, name: str) -> LoraRecord:
        validate_name(name)
        with self._mutex:
            rec = self._records.get(name)
        if rec is None or self._stale(rec):
            self.scan()  # dropped in, changed or removed since the last scan (maybe by another process)
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

    # ---- adding ----------------------------------------------------------
    def _current(self, name: str, registry: dict[str, LoraRecord]) -> LoraRecord | None:
        """What the library holds under `name` right now (registry lock held), judged if need be."""
        rec = registry.get(name)
        if rec is not None:
            file = self.folder / rec.file
            try:
                st = file.stat()
            except FileNotFoundError:
                rec = None
            else:
                return rec if self._unchanged(rec, st) else self._judge(file, rec)
        final = self.folder / f"{name}{LORA_SUFFIX}"
        if final.is_file():  # dropped in by hand, not scanned yet
            return self._judge(final, None)
        return None

    def _install(
        self, staged: Path, info, name: str, *, source: str, trigger_words: Iterable[str] = ()
    ) -> LoraRecord:
        """Move a verified file from `.incoming/` to `<name>.safetensors` and record it (all or nothing)."""
        validate_name(name)
        final = self.folder / f"{name}{LORA_SUFFIX}"
        words = list(dict.fromkeys(w.strip() for w in [*trigger_words, *info.trigger_words] if w and w.strip()))
        with self._mutex, self._registry_lock:
            registry = self._read_registry()
            current = self._current(name, registry)
            if current is not None:
                if current.sha256 and current.sha256 == info.sha256:
                    log.info("LoRA %s is already in the library with the same content", name)
                    staged.unlink(missing_ok=True)
                    registry[name] = current
                    rec = current
                else:
                    what = f"refused: {current.reason}" if current.state == "refused" else f"sha256 {current.sha256[:12]}"
                    raise ValueError(
                        f"a LoRA named {name!r} already exists with different content ({what}); "
                        "choose another name or delete it first"
                    )
            else:
                st = staged.stat()  # os.replace keeps the mtime
                rec = LoraRecord(
                    name=name,
                    file=final.name,
                    sha256=info.sha256,
                    size_bytes=st.st_size,
                    source=source,
                    format=info.format,
                    rank=info.rank,
                    trigger_words=words,
                    added_at=time.time(),
                    mtime=st.st_mtime,
                )
                os.replace(staged, final)
                registry[name] = rec
                try:
                    self._write_registry(registry)
                except BaseException:
                    final.unlink(missing_ok=True)  # no file without its record
                    raise
                log.info("added LoRA %s (%s, %d bytes, from %s)", name, info.format, st.st_size, source)
        return self._remember(rec)

    def _staging(self) -> Path:
        staging = self.folder / INCOMING
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def add_file(
        self,
        src: Path,
        name: str = "",
        *,
        source: str = "upload",
        original_name: str | None = None,
        trigger_words: Iterable[str] = (),
    ) -> LoraRecord:
        """Verify a local file (an upload) and copy it into the library (default name: its file name)."""
        name = (name or "").strip()
        if name:
            validate_name(name)
        src = Path(src)
        if not src.is_file():
            raise ValueError(f"uploaded file {src.name!r} is missing or not a file")
        size = src.stat().st_size
        if size > self.max_bytes:
            raise LoraRefused(self._too_big(size))
        staged = self._staging() / f"upload-{uuid.uuid4().hex}{LORA_SUFFIX}"
        verdicts = []
        try:
            # The copy is judged, not the original that may still change.
            atomic_copy(src, staged, suffix=".incomplete", check=lambda tmp: verdicts.append(self._verify(tmp)))
            info = verdicts[-1]
            default = name_from_filename(original_name or src.name) or f"lora-{info.sha256[:8]}"
            return self._install(staged, info, name or default, source=source, trigger_words=trigger_words)
        finally:
            staged.unlink(missing_ok=True)

    def add_source(
        self,
        source: str,
        name: str = "",
        *,
        token: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> LoraRecord:
        """Add a LoRA from an http(s) URL, `owner/repo` or `owner/repo/path/file.safetensors`.

        URLs are judged by content (Civitai's `/api/download/models/N` has no
        extension); the default name comes from Content-Disposition or the URL,
        the Hub repo or file name.  Refusals raise ValueError (LoraRefused,
        URLRefusedError, AmbiguousSourceError, DownloadTooLargeError) or
        DownloadError; nothing is left behind.
        """
        name = (name or "").strip()
        if name:
            validate_name(name)  # before any transfer
        src = downloads.parse_source(source)
        if src.kind == "url":
            netsafe.check_url(src.url, allow_private=self.allow_private)  # fail fast; every hop is checked again
            label, identity = netsafe.redact_url(src.url), src.url
        else:
            label = f"hf://{src.repo_id}" + (f"/{src.filename}" if src.filename else "")
            label += f"@{src.revision}" if src.revision else ""
            identity = label
        key = hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock_dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.lock_dir / f".source-{key}.lock")):
            # Checked again under the lock: another process may have just added it.
            done = self._added_from(label, name)
            if done is not None:
                log.info("LoRA source %s is already in the library as %s", label, done.name)
                return done
            staging = self._staging()
            staged = staging / f"{key}{LORA_SUFFIX}"
            staged.unlink(missing_ok=True)  # a verified leftover of a process killed before it installed
            verdicts = []

            def verify(tmp: Path) -> None:
                verdicts.append(self._verify(tmp))

            try:
                if src.kind == "url":
                    result = downloads.download_url(
                        src.url, staging, filename=staged.name, max_bytes=self.max_bytes,
                        allow_private=self.allow_private, verify=verify, progress=progress,
                        lock_dir=self._download_lock_dir(), max_seconds=self.download_timeout_s or None,
                        min_rate=self.download_min_rate_kib * 1024 or None, rate_window_s=self.download_rate_window_s,
                    )
                    default = name_from_filename(result.suggested_filename)
                    words: list[str] = []
                else:
                    result = downloads.download_hub(
                        src.repo_id, src.filename, staging, token=token, max_bytes=self.max_bytes,
                        revision=src.revision, dest_filename=staged.name, verify=verify, progress=progress,
                        lock_dir=self._download_lock_dir(),
                    )
                    stem = name_from_filename(result.suggested_filename)
                    repo_name = name_from_filename(src.repo_id.split("/", 1)[1])
                    default = repo_name if src.filename is None or (stem or "").lower() in GENERIC_STEMS else stem
                    prompt = downloads.hub_instance_prompt(src.repo_id, token=token)
                    words = [prompt] if prompt else []
                info = verdicts[-1] if verdicts else self._verify(result.path)
                return self._install(
                    result.path, info, name or default or f"lora-{info.sha256[:8]}", source=label, trigger_words=words
                )
            finally:
                staged.unlink(missing_ok=True)

    def _added_from(self, label: str, name: str) -> LoraRecord | None:
        for rec in self._read_registry().values():
            if rec.source != label or (name and rec.name != name) or rec.state == "refused":
                continue
            if (self.folder / rec.file).is_file():
                try:
                    return self.get(rec.name)
                except ValueError:
                    return None
        return None

    # ---- deleting --------------------------------------------------------
    def delete(self, name: str, in_use: Iterable[str] = ()) -> LoraRecord:
        """Remove a LoRA's file and record; refused (LoraInUse) when `name` is in `in_use`."""
        rec = self.get(name)
        if name in set(in_use):
            raise LoraInUse(f"LoRA {name!r} is used by the running job; delete it when that job has ended")
        if Path(rec.file).name != rec.file or rec.file.startswith("."):
            raise ValueError(f"LoRA {name!r} has an invalid file name {rec.file!r} in the registry")
        with self._mutex, self._registry_lock:
            (self.folder / rec.file).unlink(missing_ok=True)
            registry = self._read_registry()
            if registry.pop(name, None) is not None:
                self._write_registry(registry)
            self._records.pop(name, None)
        self._fit_cache.pop(rec.sha256, None)
        log.info("deleted LoRA %s (%s)", name, rec.file)
        return rec
