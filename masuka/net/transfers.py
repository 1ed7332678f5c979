"""Transfers into the LoRA library folder.

* :func:`download_url` — an http(s) URL through :mod:`masuka.net.safe` (SSRF checks,
  pinned connection, checked redirects), one download per target file at a time
  (a :class:`filelock.FileLock` next to it), streamed into a unique
  ``.<filename>.<random>.incomplete`` temp file in the same folder, size-capped,
  hashed, completeness-checked, fsynced, verified, then ``os.replace``-d into place.
  Nothing ever appears under the final name unless it is complete and verified.
* :func:`download_hub` — a file from the Hugging Face Hub through huggingface_hub
  (its cache, locks and resume), then copied into the folder through the same
  lock + temp file + fsync + replace path.
* :func:`parse_source` — classify what a user typed (URL / hub repo / hub file).

Lock files (``.<filename>.lock``) are left in place on purpose (deleting a lock
another process may hold breaks mutual exclusion); they and temp files start with
a dot, so library scans should ignore dot-files.
"""

from __future__ import annotations

import contextlib
import email.message
import hashlib
import logging
import os
import re
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

import filelock
import httpx

from masuka.net import safe as netsafe
from masuka.settings import DEFAULT_RATE_WINDOW_S
from masuka.store.atomic import atomic_file
from masuka.units import human_bytes

logger = logging.getLogger(__name__)

CIVITAI_TOKEN_ENV = "CIVITAI_TOKEN"
HF_TOKEN_ENV = "HF_TOKEN"
TEMP_SUFFIX = ".incomplete"
LOCK_SUFFIX = ".lock"
CHUNK_SIZE = 1 << 20
MAX_FILENAME_LENGTH = 200
HUB_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})

ProgressCallback = Callable[[int, "int | None"], None]
VerifyCallback = Callable[[Path], None]

_REPO_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_REPO_ID_RE = re.compile(rf"^{_REPO_PART}/{_REPO_PART}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_MKSTEMP_RANDOM_LEN = 8  # tempfile's random part: ".<filename>.<8 chars>.incomplete"


class DownloadError(netsafe.NetworkError):
    """A transfer failed (network, HTTP status, cut transfer, hub error). A ``RuntimeError``.

    ``status_code`` is set when the server answered with an HTTP error status.
    """

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code


class DownloadTooLargeError(DownloadError, ValueError):
    """The file is bigger than the allowed cap. Both a ``DownloadError`` and a ``ValueError``."""

    def __init__(self, message: str, *, max_bytes: int) -> None:
        super().__init__(message)
        self.max_bytes = max_bytes


class AmbiguousSourceError(ValueError):
    """A hub repo without a filename holds zero or several ``.safetensors`` files; ``candidates`` lists them."""

    def __init__(self, message: str, *, candidates: list[str]) -> None:
        super().__init__(message)
        self.candidates = candidates


@dataclass(frozen=True)
class DownloadResult:
    """Outcome of a download.

    ``downloaded`` is False when the final file already existed (then ``final_url``
    and ``suggested_filename`` are None and nothing was transferred).
    ``suggested_filename`` is the server's/URL's name for the file (see
    :func:`filename_from_response`), useful to name the LoRA.
    """

    path: Path
    sha256: str
    size_bytes: int
    downloaded: bool
    final_url: str | None
    suggested_filename: str | None = None


@dataclass(frozen=True)
class Source:
    """A classified LoRA source.

    ``kind`` is ``"url"`` (``url`` set), ``"hub_repo"`` (``repo_id`` set, ``filename``
    None: pick the single safetensors file) or ``"hub_file"`` (``repo_id`` and
    ``filename``, the path inside the repo, set). ``revision`` is set for Hub web
    links that name one.
    """

    kind: Literal["url", "hub_repo", "hub_file"]
    url: str | None = None
    repo_id: str | None = None
    filename: str | None = None
    revision: str | None = None


# --------------------------------------------------------------------------- helpers


def validate_filename(filename: str) -> str:
    """Check a target file name (one plain path component); returns it or raises ``ValueError``."""
    if not isinstance(filename, str) or not filename:
        raise ValueError(f"invalid file name {filename!r}: must be a non-empty string")
    if filename in (".", "..") or "/" in filename or "\\" in filename or _CONTROL_RE.search(filename):
        raise ValueError(f"invalid file name {filename!r}: must be a single plain file name")
    if filename.startswith("."):
        raise ValueError(f"invalid file name {filename!r}: must not start with a dot")
    if filename != filename.strip():
        raise ValueError(f"invalid file name {filename!r}: leading/trailing whitespace")
    if len(filename) > MAX_FILENAME_LENGTH:
        raise ValueError(f"invalid file name {filename[:40]!r}...: longer than {MAX_FILENAME_LENGTH} characters")
    if filename.endswith(TEMP_SUFFIX) or filename.endswith(LOCK_SUFFIX):
        raise ValueError(f"invalid file name {filename!r}: reserved suffix")
    return filename


def _validate_max_bytes(max_bytes: int) -> int:
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes <= 0:
        raise ValueError(f"max_bytes must be a positive integer, got {max_bytes!r}")
    return max_bytes


def _lock_for(dest_dir: Path, filename: str, timeout: float | None) -> filelock.FileLock:
    """The target's lock file, in ``dest_dir`` or a separate lock folder (``lock_dir``: locks
    must live on a local disk when the files live on a network mount such as Google Drive)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    return filelock.FileLock(str(dest_dir / f".{filename}{LOCK_SUFFIX}"), timeout=-1 if timeout is None else timeout)


@contextlib.contextmanager
def _target_lock(dest_dir: Path, filename: str, timeout: float | None) -> Iterator[None]:
    """Hold the per-target lock; a wait past ``timeout`` is a DownloadError naming the target."""
    lock = _lock_for(dest_dir, filename, timeout)
    try:
        lock.acquire()
    except filelock.Timeout as exc:
        raise DownloadError(f"another download of {filename} into {dest_dir} is still running") from exc
    try:
        yield
    finally:
        lock.release()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK_SIZE):
            digest.update(chunk)
    return digest.hexdigest()


def _existing(final: Path) -> DownloadResult | None:
    if not os.path.lexists(final):
        return None
    if final.is_symlink() or not final.is_file():
        raise ValueError(f"{final} already exists and is not a regular file")
    return DownloadResult(
        path=final, sha256=_sha256_file(final), size_bytes=final.stat().st_size, downloaded=False, final_url=None
    )


def _too_large(what: str, size: int | None, max_bytes: int) -> DownloadTooLargeError:
    got = f" ({size} bytes)" if size is not None else ""
    return DownloadTooLargeError(
        f"{what}{got} is larger than the size cap of {human_bytes(max_bytes)}; refused", max_bytes=max_bytes
    )


@contextlib.contextmanager
def _install(final: Path, verify: VerifyCallback | None) -> Iterator[_Hashing]:
    """Stream into ``.<name>.<random>.incomplete`` beside ``final``; on a clean exit,
    ``verify`` (raises ValueError to refuse) and move it into place; on any failure remove it."""
    with atomic_file(final, suffix=TEMP_SUFFIX, mode=0o644, check=verify) as fh:
        yield _Hashing(fh)


class _Hashing:
    """A write handle that counts and hashes what goes through it."""

    def __init__(self, fh) -> None:
        self._fh = fh
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        self._fh.write(chunk)
        self.digest.update(chunk)
        self.size += len(chunk)


def _header(headers: Mapping[str, str] | None, name: str) -> str | None:
    if headers is None:
        return None
    if isinstance(headers, httpx.Headers):
        return headers.get(name)
    low = name.lower()
    for key, value in headers.items():
        if key.lower() == low:
            return value
    return None


def _clean_name(name: str | None) -> str | None:
    if not name:
        return None
    name = name.replace("\\", "/").rsplit("/", 1)[-1]
    name = _CONTROL_RE.sub("", name).strip().lstrip(".").strip()
    if not name or name in (".", ".."):
        return None
    if len(name) > MAX_FILENAME_LENGTH:
        stem, dot, ext = name.rpartition(".")
        if dot and len(ext) < 16:
            name = stem[: MAX_FILENAME_LENGTH - len(ext) - 1] + "." + ext
        else:
            name = name[:MAX_FILENAME_LENGTH]
    return name


def filename_from_response(url: str, headers: Mapping[str, str] | None) -> str | None:
    """A file name for a response: Content-Disposition's filename (RFC 6266/2231), else the URL path's last segment.

    The result is a single sanitized path component (no directories, no leading
    dots, no control characters) or None when there is nothing usable.
    """
    disposition = _header(headers, "content-disposition")
    if disposition:
        msg = email.message.Message()
        msg["content-disposition"] = disposition
        try:
            name = msg.get_filename()
        except (ValueError, LookupError, TypeError):
            name = None
        cleaned = _clean_name(name)
        if cleaned:
            return cleaned
    try:
        path = urllib.parse.urlsplit(str(url)).path
    except ValueError:
        return None
    segment = urllib.parse.unquote(path.rstrip("/").rsplit("/", 1)[-1]) if path else ""
    return _clean_name(segment)


def _is_civitai(url: str) -> bool:
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError):
        return False
    host = parsed.host.lower().rstrip(".")
    return parsed.scheme == "https" and (host == "civitai.com" or host.endswith(".civitai.com"))


def request_headers(
    url: str, headers: Mapping[str, str] | None = None, env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Headers sent for ``url``: the caller's, plus ``Authorization: Bearer $CIVITAI_TOKEN`` for https civitai.com."""
    if env is None:
        env = os.environ
    result = dict(headers or {})
    if not any(k.lower() == "accept-encoding" for k in result):
        result["Accept-Encoding"] = "identity"
    token = env.get(CIVITAI_TOKEN_ENV, "").strip()
    if token and _is_civitai(url) and not any(k.lower() == "authorization" for k in result):
        result["Authorization"] = f"Bearer {token}"
    return result


def _http_error(url: str, response: httpx.Response) -> DownloadError:
    code = response.status_code
    where = netsafe.redact_url(url)
    hint = ""
    if code in (401, 403):
        if _is_civitai(url):
            hint = f"; this Civitai model needs an API token (set {CIVITAI_TOKEN_ENV})"
        else:
            hint = "; access denied"
    elif code == 404:
        hint = "; not found"
    return DownloadError(f"{where} answered HTTP {code} {response.reason_phrase}{hint}", status_code=code)


class _Pace:
    """An overall deadline and a minimum average rate for one transfer, checked as bytes arrive.

    The rate is the bytes received over the last ``window_s`` seconds (at least),
    first judged once a full window has passed since the body started, so a slow
    start is forgiven but a trickle (a byte every few seconds, each read within the
    read timeout) is not. A stall with no byte at all ends at the read timeout.
    """

    def __init__(
        self, where: str, *, max_seconds: float | None, min_rate: float | None, window_s: float, started: float
    ) -> None:
        self.where = where
        self.max_seconds = max_seconds
        self.deadline = None if max_seconds is None else started + max_seconds
        self.min_rate = min_rate
        self.window_s = window_s
        self.samples: deque[tuple[float, int]] = deque()

    def start_body(self) -> None:
        self.samples = deque([(time.monotonic(), 0)])

    def check(self, received: int) -> None:
        now = time.monotonic()
        if self.deadline is not None and now > self.deadline:
            raise DownloadError(
                f"download of {self.where} took longer than {self.max_seconds:g} s; aborted "
                "(the limit is set with --download-timeout / MASUKA_DOWNLOAD_TIMEOUT)"
            )
        if self.min_rate is None or not self.samples:
            return
        samples = self.samples
        if now - samples[-1][0] >= self.window_s / 30:  # a few dozen samples per window, whatever the chunk rate
            samples.append((now, received))
        while len(samples) > 1 and now - samples[1][0] >= self.window_s:
            samples.popleft()  # keep the newest sample that is at least a window old
        then, received_then = samples[0]
        span = now - then
        if span < self.window_s:
            return
        rate = (received - received_then) / span
        if rate < self.min_rate:
            kib = rate / 1024
            shown = f"{kib:.2f}" if kib < 10 else f"{kib:.0f}"
            raise DownloadError(
                f"download too slow: {shown} KiB/s over the last {span:.3g} s; the minimum is "
                f"{self.min_rate / 1024:g} KiB/s ({self.where}; the minimum is set with --download-min-rate / "
                "MASUKA_DOWNLOAD_MIN_RATE)"
            )


def _validate_pace(max_seconds: float | None, min_rate: float | None, window_s: float) -> None:
    for name, value, unit in (("max_seconds", max_seconds, "seconds"), ("min_rate", min_rate, "bytes per second")):
        if value is not None and (isinstance(value, bool) or not 0 < value < float("inf")):
            raise ValueError(f"{name} must be a positive number of {unit} or None (no limit), got {value!r}")
    if isinstance(window_s, bool) or not 0 < window_s < float("inf"):
        raise ValueError(f"rate_window_s must be a positive number of seconds, got {window_s!r}")


# --------------------------------------------------------------------------- URL downloads


def download_url(
    url: str,
    dest_dir: Path,
    *,
    filename: str,
    max_bytes: int,
    allow_private: bool,
    verify: VerifyCallback | None = None,
    headers: Mapping[str, str] | None = None,
    progress: ProgressCallback | None = None,
    timeout: netsafe.Timeout = None,
    lock_timeout: float | None = None,
    max_seconds: float | None = None,
    lock_dir: Path | None = None,
    min_rate: float | None = None,
    rate_window_s: float = DEFAULT_RATE_WINDOW_S,
) -> DownloadResult:
    """Download ``url`` to ``dest_dir / filename`` exactly once, atomically.

    Under a per-target file lock: if the file already exists it is returned with
    ``downloaded=False``. Otherwise the body is streamed into a unique temp file
    next to it, capped at ``max_bytes`` (Content-Length checked up front and the
    count while streaming), hashed, checked against Content-Length, fsynced,
    passed to ``verify(temp_path)`` (which raises ``ValueError`` to refuse), then
    moved into place. On any failure the temp file is removed.

    Raises ``ValueError`` for bad arguments, refused URLs (:class:`netsafe.URLRefusedError`)
    and verify refusals; :class:`DownloadTooLargeError` over the cap;
    :class:`DownloadError` for transfer failures. ``timeout``: see
    :func:`netsafe.make_timeout`; ``lock_timeout``: seconds to wait for another
    download of the same file (None = wait); ``max_seconds``: overall time limit;
    ``min_rate``: the least bytes per second, averaged over ``rate_window_s`` and
    first checked one window after the body starts (None = no minimum). Both raise
    :class:`DownloadError` saying the limit, and leave nothing behind.
    """
    validate_filename(filename)
    _validate_max_bytes(max_bytes)
    _validate_pace(max_seconds, min_rate, rate_window_s)
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / filename
    where = netsafe.redact_url(url)
    with _target_lock(lock_dir or dest_dir, filename, lock_timeout):
        existing = _existing(final)
        if existing is not None:
            logger.info("%s already present; not downloading %s again", final, where)
            return existing
        pace = _Pace(where, max_seconds=max_seconds, min_rate=min_rate, window_s=rate_window_s,
                     started=time.monotonic())
        send_headers = request_headers(url, headers)
        logger.info("downloading %s -> %s", where, final)
        try:
            with netsafe.open_stream(
                url, allow_private=allow_private, headers=send_headers, timeout=timeout
            ) as safe, _install(final, verify) as install:
                response = safe.response
                if not 200 <= response.status_code < 300:
                    raise _http_error(safe.url, response)
                encoding = response.headers.get("content-encoding", "identity").strip().lower()
                expected: int | None = None
                length = response.headers.get("content-length")
                if length is not None and encoding in ("", "identity"):
                    try:
                        expected = int(length)
                    except ValueError:
                        expected = None
                if expected is not None and expected > max_bytes:
                    raise _too_large(f"{where} (Content-Length {expected})", None, max_bytes)
                if progress is not None:
                    progress(0, expected)
                pace.start_body()
                for chunk in response.iter_bytes():
                    if install.size + len(chunk) > max_bytes:
                        raise _too_large(where, None, max_bytes)
                    install.write(chunk)
                    if progress is not None:
                        progress(install.size, expected)
                    pace.check(install.size)
                if expected is not None and install.size != expected:
                    raise DownloadError(
                        f"transfer of {where} was cut: got {install.size} of {expected} bytes"
                    )
                suggested = filename_from_response(safe.url, response.headers)
                final_url = safe.url
            sha256, size = install.digest.hexdigest(), install.size
        except DownloadError:
            raise
        except netsafe.NetworkError as exc:
            raise DownloadError(str(exc)) from exc
        logger.info("downloaded %s (%d bytes, sha256 %s)", final, size, sha256)
        return DownloadResult(
            path=final,
            sha256=sha256,
            size_bytes=size,
            downloaded=True,
            final_url=final_url,
            suggested_filename=suggested,
        )


def _target_of_partial(name: str) -> str | None:
    if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
        return None
    core = name[1 : -len(TEMP_SUFFIX)]
    if len(core) < _MKSTEMP_RANDOM_LEN + 2 or core[-_MKSTEMP_RANDOM_LEN - 1] != ".":
        return None
    return core[: -_MKSTEMP_RANDOM_LEN - 1]


def cleanup_stale_partials(dest_dir: Path, older_than_s: float = 3600, lock_dir: Path | None = None) -> list[Path]:
    """Remove leftover ``.<name>.<random>.incomplete`` temp files (e.g. from a killed process).

    A temp file is removed only when it is older than ``older_than_s`` seconds AND
    nobody holds its target's lock (i.e. no download of that file is running).
    Returns the removed paths. Lock files are never removed.
    """
    dest_dir = Path(dest_dir)
    removed: list[Path] = []
    if not dest_dir.is_dir():
        return removed
    now = time.time()
    for entry in dest_dir.iterdir():
        target = _target_of_partial(entry.name)
        if target is None or entry.is_symlink() or not entry.is_file():
            continue
        try:
            age = now - entry.stat().st_mtime
        except FileNotFoundError:
            continue
        if age < older_than_s:
            continue
        lock = _lock_for(lock_dir or dest_dir, target, 0)
        try:
            lock.acquire()
        except filelock.Timeout:
            logger.debug("skipping %s: a download of %s is running", entry, target)
            continue
        try:
            entry.unlink()
            removed.append(entry)
            logger.info("removed stale partial download %s", entry)
        except FileNotFoundError:
            pass
        finally:
            lock.release()
    return removed


# --------------------------------------------------------------------------- Hugging Face Hub


def _validate_repo_id(repo_id: str) -> str:
    if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id) or ".." in repo_id or "--" in repo_id:
        raise ValueError(f"invalid Hugging Face repo id {repo_id!r}: expected 'owner/name'")
    if len(repo_id) > 96 * 2 + 1:
        raise ValueError(f"invalid Hugging Face repo id {repo_id!r}: too long")
    return repo_id


def _validate_repo_path(path: str) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or "\\" in path or _CONTROL_RE.search(path):
        raise ValueError(f"invalid file path in repo: {path!r}")
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"invalid file path in repo: {path!r}")
    return path


def _is_safetensors(path: str) -> bool:
    return path.lower().endswith(".safetensors")


def parse_source(source: str) -> Source:
    """Classify a LoRA source.

    * ``http(s)://...`` → ``url`` — except Hugging Face web links:
      ``https://huggingface.co/owner/repo`` → ``hub_repo`` and
      ``https://huggingface.co/owner/repo/(resolve|blob)/REV/path.safetensors`` →
      ``hub_file`` with ``revision`` (a ``blob`` link would otherwise download an HTML page).
    * ``owner/repo`` (optionally ``hf://owner/repo``) → ``hub_repo``.
    * ``owner/repo/path/to/file.safetensors`` → ``hub_file``.

    Anything else raises ``ValueError`` naming the source.
    """
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"empty LoRA source {source!r}")
    text = source.strip()
    lowered = text.lower()
    if lowered.startswith(("http://", "https://")):
        try:
            parsed = httpx.URL(text)
        except (httpx.InvalidURL, ValueError) as exc:
            raise ValueError(f"malformed URL source {netsafe.redact_url(text)!r}: {exc}") from exc
        if not parsed.host:
            raise ValueError(f"URL source {netsafe.redact_url(text)!r} has no host")
        if parsed.host.lower() in HUB_HOSTS:
            hub = _parse_hub_web_link(parsed.path)
            if hub is not None:
                return hub
        return Source(kind="url", url=str(parsed))
    if lowered.startswith("hf://"):
        text = text[len("hf://") :]
    elif "://" in text:
        scheme = text.split("://", 1)[0]
        raise ValueError(f"unsupported LoRA source {source!r}: scheme {scheme!r} (use http(s) or owner/repo)")
    parts = text.split("/")
    if len(parts) >= 2 and not text.startswith("/"):
        repo_id = "/".join(parts[:2])
        try:
            _validate_repo_id(repo_id)
        except ValueError:
            raise ValueError(f"unrecognized LoRA source {source!r}: not a URL or owner/repo[/file.safetensors]") from None
        if len(parts) == 2:
            return Source(kind="hub_repo", repo_id=repo_id)
        path = "/".join(parts[2:])
        try:
            _validate_repo_path(path)
        except ValueError:
            raise ValueError(f"unrecognized LoRA source {source!r}: bad file path in repo") from None
        if not _is_safetensors(path):
            raise ValueError(f"unrecognized LoRA source {source!r}: a hub file must be a .safetensors file")
        return Source(kind="hub_file", repo_id=repo_id, filename=path)
    raise ValueError(f"unrecognized LoRA source {source!r}: expected an http(s) URL, owner/repo or "
                     "owner/repo/path/file.safetensors")


def _parse_hub_web_link(path: str) -> Source | None:
    parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/") if p]
    if len(parts) < 2:
        return None
    repo_id = "/".join(parts[:2])
    if repo_id.split("/")[0] in ("datasets", "spaces", "api", "models"):
        return None
    try:
        _validate_repo_id(repo_id)
    except ValueError:
        return None
    if len(parts) == 2:
        return Source(kind="hub_repo", repo_id=repo_id)
    if len(parts) >= 5 and parts[2] in ("resolve", "blob"):
        file_path = "/".join(parts[4:])
        try:
            _validate_repo_path(file_path)
        except ValueError:
            return None
        if _is_safetensors(file_path):
            return Source(kind="hub_file", repo_id=repo_id, filename=file_path, revision=parts[3])
    return None


def _hub_token(token: str | None) -> str | None:
    if token:
        return token
    env_token = os.environ.get(HF_TOKEN_ENV, "").strip()
    return env_token or None


def _hub_errors() -> tuple[type[BaseException], ...]:
    from huggingface_hub import errors as hf_errors

    classes: list[type[BaseException]] = [hf_errors.HfHubHTTPError, hf_errors.EntryNotFoundError, OSError]
    http_error = getattr(hf_errors, "HTTPError", None)
    if isinstance(http_error, type):
        classes.append(http_error)
    return tuple(classes)


def _hub_failure(exc: BaseException, what: str) -> DownloadError:
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.GatedRepoError):
        reason = f"the repository is gated: accept its terms on huggingface.co and set {HF_TOKEN_ENV}"
    elif isinstance(exc, hf_errors.RepositoryNotFoundError):
        reason = f"repository not found (or private: set {HF_TOKEN_ENV})"
    elif isinstance(exc, hf_errors.RevisionNotFoundError):
        reason = "revision not found"
    elif isinstance(exc, hf_errors.EntryNotFoundError):
        reason = "file not found in the repository"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    return DownloadError(f"{what}: {reason}", status_code=status if isinstance(status, int) else None)


def list_hub_safetensors(repo_id: str, *, token: str | None = None, revision: str | None = None) -> list[str]:
    """All ``.safetensors`` paths in a Hub model repo (sorted). Raises :class:`DownloadError` on hub failures."""
    import huggingface_hub

    _validate_repo_id(repo_id)
    try:
        files = huggingface_hub.HfApi().list_repo_files(repo_id, revision=revision, token=_hub_token(token))
    except _hub_errors() as exc:
        raise _hub_failure(exc, f"cannot list files of Hugging Face repo {repo_id}") from exc
    return sorted(f for f in files if _is_safetensors(f))


def download_hub(
    repo_id: str,
    filename: str | None,
    dest_dir: Path,
    *,
    token: str | None = None,
    max_bytes: int,
    revision: str | None = None,
    dest_filename: str | None = None,
    verify: VerifyCallback | None = None,
    progress: ProgressCallback | None = None,
    cache_dir: Path | None = None,
    lock_timeout: float | None = None,
    lock_dir: Path | None = None,
) -> DownloadResult:
    """Fetch ``filename`` (a path in the repo) from Hub repo ``repo_id`` into ``dest_dir``.

    ``filename=None``: the repo must hold exactly one ``.safetensors`` file, else
    :class:`AmbiguousSourceError` (a ``ValueError``) listing the candidates. The size
    is checked against ``max_bytes`` from the file's metadata before downloading
    (:class:`DownloadTooLargeError`). The file goes through huggingface_hub's cache
    (``cache_dir`` or its default), then is copied to ``dest_dir / dest_filename``
    (default: the file's base name) with the same lock + temp + fsync + verify +
    replace steps as :func:`download_url`. Token: ``token`` or ``$HF_TOKEN`` (or
    huggingface_hub's stored login). Hub failures raise :class:`DownloadError`.
    """
    import huggingface_hub

    _validate_repo_id(repo_id)
    _validate_max_bytes(max_bytes)
    hub_token = _hub_token(token)
    if filename is None:
        candidates = list_hub_safetensors(repo_id, token=hub_token, revision=revision)
        if len(candidates) != 1:
            listing = ", ".join(candidates) if candidates else "none"
            raise AmbiguousSourceError(
                f"Hugging Face repo {repo_id} must contain exactly one .safetensors file to pick it "
                f"automatically; found {len(candidates)}: {listing}. Name the file as {repo_id}/<path>.",
                candidates=candidates,
            )
        filename = candidates[0]
    _validate_repo_path(filename)
    target = validate_filename(dest_filename if dest_filename is not None else PurePosixPath(filename).name)
    what = f"Hugging Face file {repo_id}/{filename}" + (f"@{revision}" if revision else "")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    final = dest_dir / target
    with _target_lock(lock_dir or dest_dir, target, lock_timeout):
        existing = _existing(final)
        if existing is not None:
            logger.info("%s already present; not downloading %s again", final, what)
            return existing
        url = huggingface_hub.hf_hub_url(repo_id, filename, revision=revision)
        try:
            metadata = huggingface_hub.get_hf_file_metadata(url, token=hub_token)
        except _hub_errors() as exc:
            raise _hub_failure(exc, f"cannot get metadata of {what}") from exc
        size = getattr(metadata, "size", None)
        if isinstance(size, int) and size > max_bytes:
            raise _too_large(what, size, max_bytes)
        logger.info("downloading %s (%s bytes) via huggingface_hub", what, size)
        try:
            cached = huggingface_hub.hf_hub_download(
                repo_id, filename, revision=revision, token=hub_token, cache_dir=cache_dir
            )
        except _hub_errors() as exc:
            raise _hub_failure(exc, f"cannot download {what}") from exc
        cached_path = Path(cached)
        cached_size = cached_path.stat().st_size
        if cached_size > max_bytes:
            raise _too_large(what, cached_size, max_bytes)
        with _install(final, verify) as install, open(cached_path, "rb") as src:
            if progress is not None:
                progress(0, cached_size)
            while chunk := src.read(CHUNK_SIZE):
                if install.size + len(chunk) > max_bytes:
                    raise _too_large(what, None, max_bytes)
                install.write(chunk)
                if progress is not None:
                    progress(install.size, cached_size)
        sha256, copied = install.digest.hexdigest(), install.size
        logger.info("installed %s as %s (%d bytes, sha256 %s)", what, final, copied, sha256)
        return DownloadResult(
            path=final,
            sha256=sha256,
            size_bytes=copied,
            downloaded=True,
            final_url=url,
            suggested_filename=PurePosixPath(filename).name,
        )


def hub_instance_prompt(repo_id: str, token: str | None = None) -> str | None:
    """The model card's ``instance_prompt`` (trigger words) of a Hub repo, or None (failures are logged)."""
    try:
        import huggingface_hub

        _validate_repo_id(repo_id)
        info = huggingface_hub.HfApi().model_info(repo_id, token=_hub_token(token))
        card = getattr(info, "card_data", None)
        if card is None:
            return None
        value = card.get("instance_prompt") if hasattr(card, "get") else None
    except Exception as exc:  # noqa: BLE001 - optional metadata: any failure means "unknown"
        logger.warning("could not read instance_prompt of Hugging Face repo %s: %s: %s", repo_id,
                       type(exc).__name__, exc)
        return None
    if isinstance(value, str) and value.strip():
        return value.strip()
    return None


__all__ = [
    "AmbiguousSourceError",
    "DownloadError",
    "DownloadResult",
    "DownloadTooLargeError",
    "Source",
    "cleanup_stale_partials",
    "download_hub",
    "download_url",
    "filename_from_response",
    "hub_instance_prompt",
    "list_hub_safetensors",
    "parse_source",
    "request_headers",
    "validate_filename",
]
