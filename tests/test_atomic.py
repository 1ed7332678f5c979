"""The one atomic-write recipe: a name holds the old content or the whole new one, and no temp file stays."""

from __future__ import annotations

import pytest

from masuka.store.atomic import atomic_copy, atomic_file, atomic_write_bytes


def files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_a_write_cut_halfway_keeps_the_old_content(tmp_path):
    target = tmp_path / "registry.json"
    atomic_write_bytes(target, b"old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_file(target) as fh:
            fh.write(b"half of the new")
            raise OSError("disk full")
    assert target.read_bytes() == b"old" and files(tmp_path) == ["registry.json"]
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and files(tmp_path) == ["registry.json"]


def test_a_refused_file_never_gets_its_name(tmp_path):
    src = tmp_path / "upload.bin"
    src.write_bytes(b"not a LoRA")
    seen = []

    def refuse(tmp):
        seen.append((tmp.name, tmp.read_bytes()))
        raise ValueError("not a safetensors file")

    with pytest.raises(ValueError, match="not a safetensors"):
        atomic_copy(src, tmp_path / "style.safetensors", suffix=".incomplete", check=refuse)
    assert files(tmp_path) == ["upload.bin"]
    (name, data), = seen
    assert name.startswith(".style.safetensors.") and name.endswith(".incomplete") and data == b"not a LoRA"


def test_no_overwrite_keeps_a_file_made_meanwhile(tmp_path):
    db = tmp_path / "masuka.db"
    db.write_bytes(b"made meanwhile")
    with pytest.raises(FileExistsError):
        with atomic_file(db, overwrite=False) as fh:
            fh.write(b"restored")
    assert db.read_bytes() == b"made meanwhile" and files(tmp_path) == ["masuka.db"]
    with atomic_file(tmp_path / "new.db", overwrite=False, mode=0o644) as fh:
        fh.write(b"restored")
    assert (tmp_path / "new.db").read_bytes() == b"restored" and files(tmp_path) == ["masuka.db", "new.db"]
    assert (tmp_path / "new.db").stat().st_mode & 0o777 == 0o644
