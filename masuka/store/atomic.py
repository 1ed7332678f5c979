"""Writing a file so that its name only ever holds the old content or the whole new one.

The one recipe, used for every file MASUKA writes in place: a temp file in the
target's folder (so the rename never crosses file systems), write, flush,
fsync, ``os.replace`` (or a hard link when an existing file must never be
overwritten), then fsync the folder so the new name survives a power cut.
On any failure the temp file is removed and the target is untouched.

Temp files are named ``.<name>.<random><suffix>``: they start with a dot, so
listings skip them, and a cleanup can tell whose temp file it is.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

COPY_CHUNK = 1 << 20

Check = Callable[[Path], None]


def fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable; a folder that cannot be fsynced (some mounts) is only logged."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        log.debug("cannot open %s to fsync it: %s", path, exc)
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        log.debug("fsync of folder %s failed: %s", path, exc)
    finally:
        os.close(fd)


def _temp_prefix(path: Path) -> str:
    """The start of every temp file name made for ``path`` (``.registry.json`` -> ``.registry.json.``)."""
    return f".{Path(path).name.lstrip('.')}."


@contextmanager
def atomic_file(
    path: Path,
    *,
    suffix: str = ".tmp",
    mode: int | None = None,
    check: Check | None = None,
    overwrite: bool = True,
) -> Iterator[BinaryIO]:
    """Yield a binary handle on a temp file beside ``path``; on a clean exit it becomes ``path``.

    ``check(temp_path)`` runs once the data is on disk and the handle closed, before the
    file gets its name; it raises to refuse the file (the exception propagates, nothing
    is left).  ``mode``: the file's permission bits (default: the temp file's 0o600).
    ``overwrite=False``: an existing ``path`` is never replaced, ``FileExistsError`` instead.
    """
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path), suffix=suffix)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if check is not None:
            check(tmp)
        if mode is not None:
            os.chmod(tmp, mode)
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes, *, suffix: str = ".tmp") -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path, suffix=suffix) as fh:
        fh.write(data)


def atomic_copy(
    src: Path, dest: Path, *, suffix: str = ".tmp", check: Check | None = None, overwrite: bool = True
) -> None:
    """Copy ``src`` to ``dest`` atomically (see :func:`atomic_file`)."""
    with atomic_file(dest, suffix=suffix, check=check, overwrite=overwrite) as out, open(src, "rb") as inp:
        shutil.copyfileobj(inp, out, COPY_CHUNK)


def _link_new(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic, and never overwrites a file made meanwhile
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        os.replace(tmp, path)
        return
    _remove_quietly(tmp)  # the file now has its name; the temp name is only a second link


def _remove_quietly(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("could not remove temporary file %s: %s", tmp, exc)
