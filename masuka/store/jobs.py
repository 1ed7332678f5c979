"""Persistent job history for MASUKA (SQLite in WAL mode).

One ``jobs`` table in ``<home>/masuka.db`` (whatever path the caller passes)
records every generation: who asked, the parameters, the LoRAs, the seeds that
were actually used, the output files, and how the job ended.

Concurrency model
-----------------
* Several processes may share the database file (WAL mode, busy timeout).
* A :class:`JobStore` is used from many threads of a web server: each thread
  gets its own connection (connections of threads that have ended are closed
  when the next new thread connects).  Connections run in autocommit mode and
  every write is one short ``BEGIN IMMEDIATE`` transaction.
* Status transitions are a single conditional ``UPDATE ... WHERE status IN
  (...)`` so two threads or processes can never both move the same job.

Status machine::

    queued  -> running | cancelled | interrupted
    running -> completed | failed | cancelled | interrupted
    final (completed, failed, cancelled, interrupted) never changes

Records (:meth:`JobStore.get`, :meth:`JobStore.list`) are the full story,
for the studio itself: they include the Gradio session and the owner process.
What a client may see is :func:`public_record` of one (no ``session``, no
``owner``) or a :meth:`JobStore.history` row.  In every record ``seed`` is the
seed of the first image actually used (None until the seeds are drawn) and
``requested_seed`` what was asked (-1: random); times are ISO 8601 strings in
UTC; no key is named ``"path"`` anywhere (gradio_client downloads such values
as files): such keys read as ``"file"``.  The database keeps Unix times and the
requested seed in its ``seed`` column.

Nothing happens at import time: no connection, no mkdir.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePath
from typing import Any

import psutil

from masuka.store.atomic import atomic_copy

__all__ = [
    "JOB_STATUSES",
    "FINAL_STATUSES",
    "ACTIVE_STATUSES",
    "ALLOWED_TRANSITIONS",
    "HISTORY_COLUMNS",
    "HISTORY_TEXT_LIMIT",
    "SCHEMA_VERSION",
    "ProcessOwner",
    "JobNotFound",
    "JobStore",
    "public_record",
    "restore_backup",
]

logger = logging.getLogger(__name__)

JOB_STATUSES = ("queued", "running", "completed", "failed", "cancelled", "interrupted")
FINAL_STATUSES = {"completed", "failed", "cancelled", "interrupted"}
ACTIVE_STATUSES = ("queued", "running")

# target status -> statuses it may be reached from
ALLOWED_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "running": ("queued",),
    "completed": ("running",),
    "failed": ("running",),
    "cancelled": ("queued", "running"),
    "interrupted": ("queued", "running"),
}

# The columns of a history row (JobStore.history), in order.
HISTORY_COLUMNS = (
    "job_id",
    "created_at",
    "status",
    "prompt",
    "lora",
    "seed",
    "requested_seed",
    "steps",
    "duration_s",
    "error",
)

HISTORY_TEXT_LIMIT = 300  # prompt and error in history rows; get() has the full text

SCHEMA_VERSION = 1
BUSY_TIMEOUT_S = 30.0
MAX_LIST_LIMIT = 100_000
MAX_ERROR_CHARS = 10_000
MAX_TRACEBACK_CHARS = 100_000
_ID_ATTEMPTS = 5
_START_TIME_TOLERANCE_S = 1.0
_FORBIDDEN_KEY = "path"
_RENAMED_KEY = "file"
_PRIVATE_KEYS = frozenset({"session", "owner"})  # a session hash lets anyone act as that browser

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id           TEXT PRIMARY KEY,
    owner_pid        INTEGER,
    owner_host       TEXT,
    owner_started_at REAL,
    user             TEXT,
    session          TEXT,
    created_at       REAL NOT NULL,  -- Unix times (records show ISO 8601 UTC)
    started_at       REAL,
    finished_at      REAL,
    status           TEXT NOT NULL,
    prompt           TEXT,
    model            TEXT,
    width            INTEGER,
    height           INTEGER,
    steps            INTEGER,
    guidance         REAL,
    num_images       INTEGER,
    seed             INTEGER,  -- the requested seed, -1 random (records: requested_seed)
    seeds            TEXT NOT NULL DEFAULT '[]',
    loras            TEXT NOT NULL DEFAULT '[]',
    params           TEXT NOT NULL DEFAULT '{}',
    outputs          TEXT NOT NULL DEFAULT '[]',
    duration_s       REAL,
    error            TEXT,
    traceback        TEXT,
    notes            TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_created_at ON jobs (created_at);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_user ON jobs (user);
CREATE INDEX IF NOT EXISTS jobs_session ON jobs (session);
"""

_JSON_COLUMNS = {"seeds": list, "loras": list, "params": dict, "outputs": list, "notes": list}

_RECORD_KEYS = (
    "job_id",
    "status",
    "user",
    "session",
    "created_at",
    "started_at",
    "finished_at",
    "duration_s",
    "prompt",
    "model",
    "width",
    "height",
    "steps",
    "guidance",
    "num_images",
    "seed",
    "requested_seed",
    "seeds",
    "loras",
    "params",
    "outputs",
    "error",
    "traceback",
    "notes",
)


# --------------------------------------------------------------------------- owner


def _hostname() -> str:
    return socket.gethostname()


def _process_create_time(pid: int) -> float | None:
    """Start time of ``pid`` (epoch seconds) or None when unknown / no such process."""
    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.Error, OSError, ValueError):
        return None


@dataclass(frozen=True)
class ProcessOwner:
    """The process that created (and is executing) a job."""

    pid: int
    host: str
    started_at: float  # the process start time, epoch seconds

    @classmethod
    def current(cls) -> ProcessOwner:
        pid = os.getpid()
        started = _process_create_time(pid)
        if started is None:
            logger.debug("process start time unavailable for pid %d; using now", pid)
            started = time.time()
        return cls(pid=pid, host=_hostname(), started_at=started)

    def is_alive(self) -> bool:
        """Whether the owning process is still running.

        Same host: the pid must exist, not be a zombie, and have a start time
        within 1 s of ``started_at`` (so a recycled pid is not mistaken for the
        owner).  Another host: cannot tell, assume alive.
        """
        if self.host != _hostname():
            return True
        if not isinstance(self.pid, int) or self.pid <= 0:
            return False
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            created = float(proc.create_time())
        except psutil.NoSuchProcess:  # includes ZombieProcess
            return False
        except psutil.AccessDenied:
            logger.debug("access denied inspecting pid %d; assuming it is alive", self.pid)
            return True
        if self.started_at is None:
            return False
        return abs(created - float(self.started_at)) <= _START_TIME_TOLERANCE_S


# ----------------------------------------------------------------------- errors


class JobNotFound(KeyError):
    """No job with this id."""

    def __init__(self, job_id: object) -> None:
        super().__init__(job_id)
        self.job_id = job_id

    def __str__(self) -> str:
        return f"job not found: {self.job_id!r}"


# ---------------------------------------------------------------------- helpers


def _json_default(value: Any) -> Any:
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    item = getattr(value, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return item()
        except (TypeError, ValueError):
            pass
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _dumps(value: Any, what: str) -> str:
    try:
        return json.dumps(value, default=_json_default, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON serializable: {value!r} ({exc})") from exc


def _rename_path_keys(value: Any) -> Any:
    """A copy of ``value`` where every dict key named "path" is named "file"."""
    if isinstance(value, Mapping):
        out: dict[Any, Any] = {}
        for key, item in value.items():
            new_key = key
            if key == _FORBIDDEN_KEY:
                new_key = _RENAMED_KEY
                if _RENAMED_KEY in value:
                    logger.warning("dropping key %r: %r is also present", key, _RENAMED_KEY)
                    continue
            out[new_key] = _rename_path_keys(item)
        return out
    if isinstance(value, (list, tuple)):
        return [_rename_path_keys(item) for item in value]
    return value


def public_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """What a client may see of a job record: no ``session``, no ``owner``, no key named "path"."""
    return _rename_path_keys({key: value for key, value in record.items() if key not in _PRIVATE_KEYS})


def _loads(text: str | None, kind: type, column: str, job_id: str) -> Any:
    if text is None:
        return kind()
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        logger.warning("job %s: column %s holds invalid JSON; ignoring it", job_id, column)
        return kind()
    if not isinstance(value, kind):
        logger.warning("job %s: column %s is not a %s; ignoring it", job_id, column, kind.__name__)
        return kind()
    return value


def _check_job_id(job_id: Any) -> str:
    if not isinstance(job_id, str) or not job_id:
        raise ValueError(f"job id must be a non-empty string, got {job_id!r}")
    return job_id


def _check_seeds(seeds: Any) -> list[int]:
    """The seeds column feeds every record's ``seed``: whole numbers only."""
    if not isinstance(seeds, (list, tuple)):
        raise ValueError(f"seeds must be a list of integers, got {seeds!r}")
    for seed in seeds:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
    return list(seeds)


def _clip(text: Any, limit: int, what: str) -> str:
    if text is None:
        text = ""
    if not isinstance(text, str):
        text = str(text)
    if len(text) > limit:
        logger.debug("%s truncated from %d to %d characters", what, len(text), limit)
        text = text[: limit - 15] + "\n...[truncated]"
    return text


def _shorten(text: str | None, limit: int = HISTORY_TEXT_LIMIT) -> str:
    """``text`` cut to ``limit`` characters, the last one an ellipsis when anything was cut."""
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _casefold(text: Any) -> str:
    return text.casefold() if isinstance(text, str) else ""


def _format_scale(scale: Any) -> str:
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        return f"{scale:g}"
    return str(scale)


def _lora_label(loras: list[Any]) -> str:
    return ", ".join(
        f"{lora.get('name', '?')}:{_format_scale(lora.get('scale'))}" for lora in loras if isinstance(lora, Mapping)
    )


def _iso_utc(ts: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC with its zone: "2026-11-30T06:10:03.123456+00:00"."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="microseconds")


# ------------------------------------------------------------------------ store


class JobStore:
    """The persistent job history.  Thread-safe; safe to share between processes."""

    def __init__(self, db_path: Path, owner: ProcessOwner | None = None) -> None:
        self.db_path = Path(db_path)
        self.owner = owner if owner is not None else ProcessOwner.current()
        self._lock = threading.Lock()
        self._conns: dict[int, sqlite3.Connection] = {}
        self._pid = os.getpid()
        self._closed = False
        self._backup_lock = threading.Lock()
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    def __repr__(self) -> str:
        return f"JobStore({str(self.db_path)!r}, owner={self.owner!r})"

    # -- connections --------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            str(self.db_path),
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,  # autocommit; explicit BEGIN IMMEDIATE for writes
            check_same_thread=False,  # only so close() may run from any thread
        )
        conn.row_factory = sqlite3.Row
        conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.create_function("masuka_casefold", 1, _casefold, deterministic=True)
        return conn

    def _conn(self) -> sqlite3.Connection:
        ident = threading.get_ident()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self!r} is closed")
            if self._pid != os.getpid():  # forked: never reuse the parent's connections
                self._conns = {}
                self._pid = os.getpid()
            conn = self._conns.get(ident)
            if conn is not None:
                return conn
            alive = {thread.ident for thread in threading.enumerate()}
            for dead in [key for key in self._conns if key not in alive]:
                self._conns.pop(dead).close()
            conn = self._connect()
            self._conns[ident] = conn
            return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection; the store cannot be used afterwards."""
        with self._lock:
            self._closed = True
            conns, self._conns = list(self._conns.values()), {}
        for conn in conns:
            conn.close()

    def backup_to(self, dest: Path) -> Path:
        """Copy the whole history to ``dest`` as one self-contained SQLite file.

        SQLite's backup API takes a consistent snapshot while other threads keep
        writing.  The snapshot is made on local disk beside the database (SQLite
        never opens a file at ``dest``, which may be a Google Drive mount where
        its locks are unreliable), switched out of WAL mode so it is a single
        file, copied beside ``dest`` and moved into place with ``os.replace``:
        ``dest`` is always either the previous backup or the new one, whole.
        """
        dest = Path(dest)
        with self._backup_lock:
            fd, snapshot = tempfile.mkstemp(
                dir=self.db_path.parent, prefix=f".{self.db_path.name}.", suffix=".backup"
            )
            os.close(fd)
            try:
                target = sqlite3.connect(snapshot, isolation_level=None)
                try:
                    self._conn().backup(target)
                    target.execute("PRAGMA journal_mode = DELETE")
                finally:
                    target.close()
                dest.parent.mkdir(parents=True, exist_ok=True)
                atomic_copy(Path(snapshot), dest)
            finally:
                Path(snapshot).unlink(missing_ok=True)
        logger.debug("job database backed up to %s", dest)
        return dest

    def __enter__(self) -> JobStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _init_schema(self) -> None:
        conn = self._conn()
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            logger.warning("SQLite WAL mode unavailable for %s (journal_mode=%s)", self.db_path, mode)
        with self._write() as tx:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    tx.execute(statement)
            version = tx.execute("PRAGMA user_version").fetchone()[0]
            if version == 0:
                tx.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            elif version > SCHEMA_VERSION:
                logger.warning(
                    "job database %s has schema version %d, newer than %d",
                    self.db_path,
                    version,
                    SCHEMA_VERSION,
                )

    # -- records ------------------------------------------------------------

    def _record(self, row: sqlite3.Row) -> dict[str, Any]:
        job_id = row["job_id"]
        seeds = _loads(row["seeds"], list, "seeds", job_id)
        record: dict[str, Any] = {}
        for key in _RECORD_KEYS:
            if key == "seed":  # the seed of the first image, once drawn
                record[key] = seeds[0] if seeds and isinstance(seeds[0], int) else None
            elif key == "requested_seed":  # stored in the seed column
                record[key] = row["seed"]
            elif key == "seeds":
                record[key] = seeds
            elif key in _JSON_COLUMNS:
                record[key] = _loads(row[key], _JSON_COLUMNS[key], key, job_id)
            elif key in ("created_at", "started_at", "finished_at"):
                record[key] = _iso_utc(row[key])
            else:
                record[key] = row[key]
        record["owner"] = {
            "pid": row["owner_pid"],
            "host": row["owner_host"],
            "started_at": row["owner_started_at"],
        }
        return _rename_path_keys(record)

    def _status_of(self, job_id: str) -> str:
        row = self._conn().execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return row["status"]

    # -- writing ------------------------------------------------------------

    def create(
        self,
        *,
        params: dict,
        loras: list[dict],
        user: str | None = None,
        session: str | None = None,
        status: str = "running",
        seeds: list[int] | None = None,
    ) -> str:
        """Record a new job owned by this store's process; return its id.

        ``params`` are a checked request's (``GenerateRequest.params()`` and the model);
        they are not checked again here, only made sure to fit the database.
        ``seeds``: the seeds already drawn, stored in the same transaction (no set_seeds after).
        """
        if status not in ACTIVE_STATUSES:
            raise ValueError(f"a new job must be 'queued' or 'running', got {status!r}")
        if not isinstance(params, Mapping):
            raise ValueError(f"params must be a dict, got {params!r}")
        if not isinstance(loras, (list, tuple)):
            raise ValueError(f"loras must be a list, got {loras!r}")
        for name, value in (("user", user), ("session", session)):
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{name} must be a string or None, got {value!r}")
        params_json = _dumps(dict(params), "params")
        loras_json = _dumps(list(loras), "loras")
        seeds_json = "[]" if seeds is None else _dumps(_check_seeds(seeds), "seeds")
        now = time.time()
        values = {
            "owner_pid": self.owner.pid,
            "owner_host": self.owner.host,
            "owner_started_at": self.owner.started_at,
            "user": user,
            "session": session,
            "created_at": now,
            "started_at": now if status == "running" else None,
            "status": status,
            "prompt": params.get("prompt"),
            "model": params.get("model"),
            "width": params.get("width"),
            "height": params.get("height"),
            "steps": params.get("steps"),
            "guidance": params.get("guidance"),
            "num_images": params.get("num_images"),
            "seed": params.get("seed"),
            "seeds": seeds_json,
            "loras": loras_json,
            "params": params_json,
            "outputs": "[]",
            "notes": "[]",
        }
        columns = ", ".join(["job_id", *values])
        marks = ", ".join("?" * (len(values) + 1))
        for attempt in range(_ID_ATTEMPTS):
            job_id = uuid.uuid4().hex[:12]
            try:
                with self._write() as tx:
                    tx.execute(
                        f"INSERT INTO jobs ({columns}) VALUES ({marks})",
                        (job_id, *values.values()),
                    )
            except sqlite3.IntegrityError:
                logger.warning("job id collision on %s (attempt %d); retrying", job_id, attempt + 1)
                continue
            logger.info("job %s created (%s) for user=%s session=%s", job_id, status, user, session)
            return job_id
        raise RuntimeError(f"could not allocate a unique job id after {_ID_ATTEMPTS} attempts")

    def _transition(
        self,
        job_id: str,
        target: str,
        extra: dict[str, Any] | None = None,
        *,
        lenient_if_final: bool = False,
    ) -> bool:
        job_id = _check_job_id(job_id)
        sources = ALLOWED_TRANSITIONS[target]
        now = time.time()
        assignments = ["status = ?"]
        args: list[Any] = [target]
        if target == "running":
            assignments.append("started_at = COALESCE(started_at, ?)")
            args.append(now)
        else:
            assignments.append("finished_at = ?")
            args.append(now)
            if target != "interrupted":
                assignments.append(
                    "duration_s = CASE WHEN started_at IS NULL THEN NULL "
                    "ELSE MAX(0.0, ? - started_at) END"
                )
                args.append(now)
        for column, value in (extra or {}).items():
            assignments.append(f"{column} = ?")
            args.append(value)
        placeholders = ", ".join("?" * len(sources))
        sql = (
            f"UPDATE jobs SET {', '.join(assignments)} "
            f"WHERE job_id = ? AND status IN ({placeholders})"
        )
        with self._write() as tx:
            changed = tx.execute(sql, (*args, job_id, *sources)).rowcount
        if changed:
            logger.info("job %s -> %s", job_id, target)
            return True
        current = self._status_of(job_id)
        if lenient_if_final and current in FINAL_STATUSES:
            logger.info("job %s is already %s; not marking it %s", job_id, current, target)
            return False
        raise ValueError(f"job {job_id!r}: cannot move from status {current!r} to {target!r}")

    def mark_running(self, job_id: str) -> bool:
        """queued -> running (records started_at)."""
        return self._transition(job_id, "running")

    def mark_completed(
        self,
        job_id: str,
        *,
        seeds: list[int],
        outputs: list[str],
        notes: list[str] | None = None,
    ) -> bool:
        """running -> completed.  ``notes=None`` keeps the notes already stored."""
        extra: dict[str, Any] = {
            "seeds": _dumps(_check_seeds(seeds), "seeds"),
            "outputs": _dumps([str(output) for output in outputs], "outputs"),
        }
        if notes is not None:
            extra["notes"] = _dumps(list(notes), "notes")
        return self._transition(job_id, "completed", extra)

    def mark_failed(self, job_id: str, *, error: str, traceback: str) -> bool:
        """running -> failed.  On an already-final job: log and return False."""
        extra = {
            "error": _clip(error, MAX_ERROR_CHARS, "error"),
            "traceback": _clip(traceback, MAX_TRACEBACK_CHARS, "traceback"),
        }
        return self._transition(job_id, "failed", extra, lenient_if_final=True)

    def mark_cancelled(self, job_id: str, *, reason: str = "cancelled") -> bool:
        """queued/running -> cancelled (reason stored in ``error``).  On a final job: False."""
        extra = {"error": _clip(reason, MAX_ERROR_CHARS, "reason")}
        return self._transition(job_id, "cancelled", extra, lenient_if_final=True)

    def set_seeds(self, job_id: str, seeds: list[int]) -> None:
        """Store the actual seeds (e.g. once random seeds are drawn)."""
        job_id = _check_job_id(job_id)
        seeds_json = _dumps(_check_seeds(seeds), "seeds")
        with self._write() as tx:
            changed = tx.execute(
                "UPDATE jobs SET seeds = ? WHERE job_id = ?", (seeds_json, job_id)
            ).rowcount
        if not changed:
            raise JobNotFound(job_id)

    def recover_interrupted(self) -> list[str]:
        """Mark queued/running jobs whose owner process is gone as interrupted.

        Jobs owned by live processes (this one or any other sharing the
        database) are left alone.  Returns the ids that were changed.
        """
        rows = self._conn().execute(
            "SELECT job_id, owner_pid, owner_host, owner_started_at FROM jobs "
            "WHERE status IN (?, ?)",
            ACTIVE_STATUSES,
        ).fetchall()
        verdicts: dict[tuple[Any, Any, Any], bool] = {}
        changed: list[str] = []
        for row in rows:
            key = (row["owner_pid"], row["owner_host"], row["owner_started_at"])
            if key not in verdicts:
                pid, host, started = key
                if pid is None or host is None:
                    verdicts[key] = False  # no owner recorded: nobody can finish it
                else:
                    verdicts[key] = ProcessOwner(int(pid), str(host), started).is_alive()
            if verdicts[key]:
                continue
            pid, host, _ = key
            message = f"process ended while the job was running (pid {pid} on {host})"
            with self._write() as tx:
                done = tx.execute(
                    "UPDATE jobs SET status = 'interrupted', finished_at = ?, error = ? "
                    "WHERE job_id = ? AND status IN (?, ?) "
                    "AND owner_pid IS ? AND owner_host IS ? AND owner_started_at IS ?",
                    (time.time(), message, row["job_id"], *ACTIVE_STATUSES, *key),
                ).rowcount
            if done:
                logger.warning("job %s interrupted: %s", row["job_id"], message)
                changed.append(row["job_id"])
        return changed

    # -- reading ------------------------------------------------------------

    def get(self, job_id: str) -> dict[str, Any]:
        """The full record of one job; raises JobNotFound."""
        job_id = _check_job_id(job_id)
        row = self._conn().execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return self._record(row)

    def list(
        self,
        *,
        limit: int = 50,
        status: str | None = None,
        search: str | None = None,
        user: str | None = None,
    ) -> list[dict[str, Any]]:
        """Jobs newest first.  ``search``: case-insensitive substring of the prompt."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIST_LIMIT:
            raise ValueError(f"limit must be an integer in 1..{MAX_LIST_LIMIT}, got {limit!r}")
        where: list[str] = []
        args: list[Any] = []
        if status is not None:
            if status not in JOB_STATUSES:
                raise ValueError(f"unknown job status {status!r}; expected one of {JOB_STATUSES}")
            where.append("status = ?")
            args.append(status)
        if search is not None:
            if not isinstance(search, str):
                raise ValueError(f"search must be a string, got {search!r}")
            if search:
                where.append("instr(masuka_casefold(prompt), ?) > 0")
                args.append(search.casefold())
        if user is not None:
            if not isinstance(user, str):
                raise ValueError(f"user must be a string, got {user!r}")
            where.append("user = ?")
            args.append(user)
        sql = "SELECT * FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY created_at DESC, rowid DESC LIMIT ?"
        rows = self._conn().execute(sql, (*args, limit)).fetchall()
        return [self._record(row) for row in rows]

    def history(self, **filters: Any) -> list[dict[str, Any]]:
        """Rows for a history table, newest first: the ``HISTORY_COLUMNS`` of each job.

        ``filters``: those of :meth:`list` (limit, status, search, user).  Prompt and
        error are cut to ``HISTORY_TEXT_LIMIT`` characters (``get`` has them whole), so
        a huge prompt cannot swell a listing; ``duration_s`` is rounded to 0.01 s.
        """
        rows = []
        for job in self.list(**filters):
            duration = job["duration_s"]
            rows.append(
                {
                    "job_id": job["job_id"],
                    "created_at": job["created_at"],
                    "status": job["status"],
                    "prompt": _shorten(job["prompt"]),
                    "lora": _lora_label(job["loras"]),
                    "seed": job["seed"],
                    "requested_seed": job["requested_seed"],
                    "steps": job["steps"],
                    "duration_s": None if duration is None else round(float(duration), 2),
                    "error": _shorten(job["error"]),
                }
            )
        return rows


# ----------------------------------------------------------------------- backup


def restore_backup(db_path: Path, backup: Path) -> bool:
    """Bring the history back from ``backup`` when the database at ``db_path`` is missing.

    Used at start on a fresh machine (a Colab runtime after a reset).  An
    existing database is never overwritten.  Jobs the backup shows as queued or
    running belonged to a process that is gone, so they become ``interrupted``
    (on another host :meth:`JobStore.recover_interrupted` could not tell).  A
    backup that is not a readable job database is renamed ``*.damaged-<time>``
    and the app starts with an empty history.  Returns True when restored.
    """
    db_path, backup = Path(db_path), Path(backup)
    if db_path.exists() or not backup.is_file():
        return False
    db_path.parent.mkdir(parents=True, exist_ok=True)
    moved: list[int] = []

    def check(copy: Path) -> None:
        moved.append(_check_restored(copy, backup))
        # A stale WAL beside a missing database belongs to some other file.
        for suffix in ("-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)

    try:
        atomic_copy(backup, db_path, suffix=".restore", check=check, overwrite=False)
    except sqlite3.DatabaseError as exc:
        aside = backup.with_name(f"{backup.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        logger.error("backup %s is not a readable job database (%s); kept as %s", backup, exc, aside)
        os.replace(backup, aside)
        return False
    except FileExistsError:  # a database was made meanwhile: it wins
        return False
    logger.info("job history restored from %s (%d unfinished job(s) marked interrupted)", backup, moved[0])
    return True


def _check_restored(file: Path, backup: Path) -> int:
    conn = sqlite3.connect(str(file), isolation_level=None)
    try:
        verdict = conn.execute("PRAGMA quick_check").fetchone()[0]
        if verdict != "ok":
            raise sqlite3.DatabaseError(verdict)
        conn.execute("SELECT job_id, status FROM jobs LIMIT 1").fetchall()
        message = f"the machine was reset while the job was waiting or running (restored from {backup.name})"
        placeholders = ", ".join("?" * len(ACTIVE_STATUSES))
        return conn.execute(
            f"UPDATE jobs SET status = 'interrupted', finished_at = ?, error = ? "
            f"WHERE status IN ({placeholders})",
            (time.time(), message, *ACTIVE_STATUSES),
        ).rowcount
    finally:
        conn.close()
