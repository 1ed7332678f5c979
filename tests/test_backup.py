"""The job history survives a Colab runtime reset: backup to (Drive) after each job, restore at start."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from masuka.store.jobs import JobStore, restore_backup
from masuka.settings import Settings, parse_settings


def read_backup(path: Path) -> dict[str, str]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # one file, no -wal needed
        return dict(conn.execute("SELECT job_id, status FROM jobs").fetchall())
    finally:
        conn.close()


def make_job(store: JobStore, prompt: str, final: str | None = "completed") -> str:
    job_id = store.create(params={"prompt": prompt, "seed": 1}, loras=[], status="running")
    if final == "completed":
        store.mark_completed(job_id, seeds=[1], outputs=[])
    elif final == "failed":
        store.mark_failed(job_id, error="boom", traceback="Traceback ...")
    return job_id


def test_settings_paths_flags_and_env(tmp_path):
    env = {
        "MASUKA_HOME": str(tmp_path / "local"),
        "MASUKA_LORAS_DIR": str(tmp_path / "drive" / "loras"),
        "MASUKA_OUTPUTS_DIR": str(tmp_path / "drive" / "images"),
        "MASUKA_DB_BACKUP": str(tmp_path / "drive" / "masuka.db"),
    }
    paths = parse_settings([], env=env).paths
    assert paths.db == tmp_path / "local" / "masuka.db"  # the live database stays local
    assert paths.loras == tmp_path / "drive" / "loras"
    assert paths.outputs == tmp_path / "drive" / "images"
    assert paths.db_backup == tmp_path / "drive" / "masuka.db"
    flags = parse_settings(["--loras-dir", str(tmp_path / "L"), "--outputs-dir", str(tmp_path / "O"),
                            "--db-backup", str(tmp_path / "b.db")], env=env).paths
    assert (flags.loras, flags.outputs, flags.db_backup) == (tmp_path / "L", tmp_path / "O", tmp_path / "b.db")
    plain = parse_settings([], env={"MASUKA_HOME": str(tmp_path / "h")}).paths
    assert (plain.loras, plain.outputs, plain.db_backup) == (tmp_path / "h" / "loras", tmp_path / "h" / "outputs", None)
    with pytest.raises(ValueError, match="database itself"):
        parse_settings(["--db-backup", str(tmp_path / "local" / "masuka.db")], env=env)


def test_backup_is_one_whole_file_taken_while_writes_go_on(tmp_path):
    store = JobStore(tmp_path / "local" / "masuka.db")
    first = make_job(store, "first")
    dest = tmp_path / "drive" / "MASUKA" / "masuka.db"
    store.backup_to(dest)
    assert read_backup(dest) == {first: "completed"}

    stop = threading.Event()

    def writer():
        while not stop.is_set():
            make_job(store, "busy")

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(5):
            store.backup_to(dest)
            assert first in read_backup(dest)
    finally:
        stop.set()
        thread.join()
    store.backup_to(dest)
    assert len(read_backup(dest)) == len(store.list(limit=100_000))
    leftovers = [p.name for p in dest.parent.iterdir() if p != dest] + [
        p.name for p in store.db_path.parent.iterdir() if p.name.endswith((".backup", ".tmp"))
    ]
    assert leftovers == []
    store.close()


def test_restore_brings_history_back_and_ends_unfinished_jobs(tmp_path):
    old = JobStore(tmp_path / "old" / "masuka.db")
    done, failed = make_job(old, "done"), make_job(old, "failed", "failed")
    running = make_job(old, "was running", final=None)
    backup = old.backup_to(tmp_path / "drive" / "masuka.db")
    old.close()

    fresh_db = tmp_path / "fresh" / "masuka.db"
    assert restore_backup(fresh_db, backup) is True
    store = JobStore(fresh_db)
    assert store.get(done)["status"] == "completed"
    assert store.get(failed)["error"] == "boom"
    lost = store.get(running)
    assert lost["status"] == "interrupted" and "restored" in lost["error"]
    make_job(store, "new work")
    # An existing database is never overwritten by an older backup.
    assert restore_backup(fresh_db, backup) is False
    assert len(store.list()) == 4
    store.close()
    assert restore_backup(tmp_path / "other" / "masuka.db", tmp_path / "missing.db") is False


def test_damaged_backup_is_kept_aside_and_the_app_starts_empty(tmp_path):
    backup = tmp_path / "drive" / "masuka.db"
    backup.parent.mkdir()
    backup.write_bytes(b"this is not a database" * 100)
    db = tmp_path / "local" / "masuka.db"
    assert restore_backup(db, backup) is False
    assert not db.exists() and not backup.exists()
    aside = list(backup.parent.glob("masuka.db.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not")


def test_runtime_reset_keeps_history_images_and_loras_on_drive(tmp_path, tiny_model_dir):
    from conftest import seed_home

    from masuka.studio import build_studio

    drive = tmp_path / "drive" / "MASUKA"
    settings = Settings(
        home=seed_home(tmp_path / "runtime1", tiny_model_dir),
        loras_dir=drive / "loras",
        outputs_dir=drive / "outputs",
        db_backup=drive / "masuka.db",
    )
    studio = build_studio(settings)
    manager = studio.runner
    result = manager.generate(manager.validate(prompt="a lighthouse", seed=5))
    assert result.images[0].is_relative_to(drive / "outputs")
    assert studio.backup.flush(30)
    assert read_backup(drive / "masuka.db")[result.job_id] == "completed"
    studio.close()

    # A new runtime: empty local disk, the same Drive folder.
    settings2 = replace(settings, home=seed_home(tmp_path / "runtime2", tiny_model_dir))
    studio2 = build_studio(settings2)
    record = studio2.runner.jobs.get(result.job_id)
    assert record["status"] == "completed" and Path(record["outputs"][0]).is_file()
    assert (tmp_path / "runtime2" / "masuka.db").is_file()
    studio2.close()


def test_slow_or_broken_drive_never_holds_up_or_fails_a_job(tmp_path, tiny_model_dir):
    from conftest import seed_home

    from masuka.studio import build_studio

    settings = Settings(home=seed_home(tmp_path / "home", tiny_model_dir), db_backup=tmp_path / "drive" / "m.db")
    studio = build_studio(settings)
    manager = studio.runner
    assert studio.backup.flush(30)
    gate, calls = threading.Event(), []
    real_backup = manager.jobs.backup_to

    def slow_backup(dest):
        calls.append(threading.current_thread())
        gate.wait(10)  # a Drive write that hangs
        return real_backup(dest)

    manager.jobs.backup_to = slow_backup
    first = manager.generate(manager.validate(prompt="one", seed=1))
    second = manager.generate(manager.validate(prompt="two", seed=2))  # answered while the copy hangs
    assert first.status == second.status == "completed" and not gate.is_set()
    assert calls and threading.current_thread() not in calls  # the copy ran beside the jobs, not in them
    gate.set()
    assert studio.backup.flush(30)
    assert set(read_backup(tmp_path / "drive" / "m.db")) >= {first.job_id, second.job_id}

    def broken(dest):
        raise OSError(107, "Transport endpoint is not connected")

    manager.jobs.backup_to = broken
    third = manager.generate(manager.validate(prompt="three", seed=3))
    assert third.status == "completed"
    assert studio.backup.flush(30) and studio.backup.failures == 1
    studio.close()


def test_lora_locks_stay_on_local_disk_when_the_library_is_elsewhere(tmp_path, tiny_model_dir):
    """With --loras-dir on a (Drive-like) mount, no lock file is ever made there."""
    import threading
    from dataclasses import replace
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from lora_factory import make_peft_lora, make_tiny_transformer

    from conftest import seed_home
    from masuka.studio import build_studio
    from masuka.settings import Settings

    home = seed_home(tmp_path / "home", tiny_model_dir)
    drive = tmp_path / "drive" / "loras"
    settings = replace(Settings(home=home), loras_dir=drive, allow_private_urls=True)
    served = tmp_path / "served"
    served.mkdir()
    make_peft_lora(make_tiny_transformer(), served / "style.safetensors", seed=1)

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        studio = build_studio(settings)
        rec = studio.runner.loras.add_source(f"http://127.0.0.1:{server.server_port}/style.safetensors", "style")
        assert rec.name == "style" and (drive / "style.safetensors").is_file()
        studio.runner.loras.scan()
        assert not [p for p in drive.rglob("*.lock")], "lock files on the Drive-like folder"
        assert list((home / "locks" / "loras").rglob("*.lock"))  # they are on the home's disk
        studio.close()
    finally:
        server.shutdown()
