"""Tests for masuka.store.jobs (the persistent job history)."""

from __future__ import annotations

import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # allow plain `pytest` without an installed package
    sys.path.insert(0, str(REPO_ROOT))

from conftest import walk_keys  # noqa: E402
from masuka.store.jobs import (  # noqa: E402
    FINAL_STATUSES,
    HISTORY_COLUMNS,
    JOB_STATUSES,
    JobNotFound,
    JobStore,
    ProcessOwner,
    public_record,
)

RECORD_KEYS = {
    "job_id", "status", "user", "session", "created_at", "started_at", "finished_at",
    "duration_s", "prompt", "model", "width", "height", "steps", "guidance", "num_images",
    "seed", "requested_seed", "seeds", "loras", "params", "outputs", "error", "traceback", "notes", "owner",
}
ISO_UTC = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}\+00:00")

PARAMS = {
    "prompt": "A Red Fox in the snow",
    "model": "masuka/tiny-flux",
    "width": 512,
    "height": 384,
    "steps": 4,
    "guidance": 3.5,
    "num_images": 2,
    "seed": -1,
    "max_sequence_length": 256,
}
LORAS = [{"name": "style", "scale": 0.8}, {"name": "detail", "scale": 1.0}]


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "home" / "masuka.db"


@pytest.fixture
def store(db: Path):
    with JobStore(db) as s:
        yield s


def dead_owner() -> ProcessOwner:
    """An owner whose pid exists (this process) but whose start time does not match."""
    me = ProcessOwner.current()
    return ProcessOwner(pid=me.pid, host=me.host, started_at=me.started_at - 1000.0)


def seconds(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


# ---------------------------------------------------------------- round trip


def test_create_get_list_round_trip(store: JobStore, db: Path):
    job_id = store.create(params=PARAMS, loras=LORAS, user="alice", session="s1")
    assert isinstance(job_id, str) and len(job_id) >= 12

    job = store.get(job_id)
    assert set(job) == RECORD_KEYS
    expected = {
        "job_id": job_id, "status": "running", "user": "alice", "session": "s1",
        "prompt": "A Red Fox in the snow", "model": "masuka/tiny-flux", "width": 512,
        "height": 384, "steps": 4, "guidance": 3.5, "num_images": 2,
        "seed": None, "requested_seed": -1,  # random: no seed until it is drawn, never -1
        "seeds": [], "loras": LORAS, "params": PARAMS, "outputs": [], "notes": [],
        "error": None, "traceback": None, "finished_at": None, "duration_s": None,
    }
    for key, value in expected.items():
        assert job[key] == value, key
    assert ISO_UTC.fullmatch(job["created_at"]) and ISO_UTC.fullmatch(job["started_at"])
    assert job["created_at"] <= job["started_at"]
    assert abs(seconds(job["created_at"]) - datetime.now(timezone.utc).timestamp()) < 60
    me = ProcessOwner.current()
    assert job["owner"] == {"pid": me.pid, "host": me.host, "started_at": me.started_at}

    assert store.mark_completed(job_id, seeds=[11, 12], outputs=["/o/a.png", "/o/b.png"], notes=["ok"])
    job = store.get(job_id)
    assert job["status"] == "completed"
    assert job["seeds"] == [11, 12]
    assert (job["seed"], job["requested_seed"]) == (11, -1)  # the seed actually used
    assert job["outputs"] == ["/o/a.png", "/o/b.png"]
    assert job["notes"] == ["ok"]
    assert ISO_UTC.fullmatch(job["finished_at"]) and job["finished_at"] >= job["started_at"]
    assert job["duration_s"] == pytest.approx(seconds(job["finished_at"]) - seconds(job["started_at"]), abs=1e-5)

    assert [j["job_id"] for j in store.list()] == [job_id]
    assert store.list()[0] == job

    # WAL mode on the file itself
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_queued_job_has_no_start_time(store: JobStore):
    job_id = store.create(params={"prompt": "p"}, loras=[], status="queued")
    job = store.get(job_id)
    assert job["status"] == "queued" and job["started_at"] is None
    assert store.mark_running(job_id)
    assert store.get(job_id)["started_at"] is not None


def test_get_missing_raises_job_not_found(store: JobStore):
    with pytest.raises(JobNotFound, match="nope123") as info:
        store.get("nope123")
    assert isinstance(info.value, KeyError)
    for call in (
        lambda: store.mark_running("nope123"),
        lambda: store.mark_cancelled("nope123"),
        lambda: store.set_seeds("nope123", [1]),
    ):
        with pytest.raises(JobNotFound):
            call()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"params": {"prompt": "p"}, "loras": [], "status": "completed"},
        {"params": {"prompt": "p"}, "loras": [], "status": "bogus"},
        {"params": "not a dict", "loras": []},
        {"params": {"prompt": "p"}, "loras": "style:0.8"},
        {"params": {"prompt": object()}, "loras": []},
        {"params": {"prompt": "p"}, "loras": [{"name": "x", "scale": float("nan")}]},
    ],
)
def test_create_rejects_bad_input(store: JobStore, kwargs):
    with pytest.raises(ValueError):
        store.create(**kwargs)
    assert store.list() == []


def test_random_seed_job_records_the_seed_it_drew(store: JobStore):
    job_id = store.create(params={"prompt": "p", "seed": -1}, loras=[])
    store.set_seeds(job_id, [7, 8])
    job = store.get(job_id)
    assert (job["seed"], job["requested_seed"], job["seeds"]) == (7, -1, [7, 8])
    assert [(row["seed"], row["requested_seed"]) for row in store.history()] == [(7, -1)]
    for bad in (["x"], [1.5], "7"):
        with pytest.raises(ValueError):
            store.set_seeds(job_id, bad)
    assert store.get(job_id)["seeds"] == [7, 8]


def test_list_filters_and_limit(store: JobStore):
    ids = {}
    for name, prompt, user in [
        ("a", "Äpfel on a table", "alice"),
        ("b", "a red FOX", "bob"),
        ("c", "blue fox at night", "alice"),
        ("d", "100% cotton_shirt", "bob"),
    ]:
        ids[name] = store.create(params={"prompt": prompt}, loras=[], user=user)
    store.mark_cancelled(ids["b"])

    def names(jobs):
        lookup = {v: k for k, v in ids.items()}
        return [lookup[j["job_id"]] for j in jobs]

    assert names(store.list()) == ["d", "c", "b", "a"]  # newest first
    assert names(store.list(limit=2)) == ["d", "c"]
    assert names(store.list(search="fox")) == ["c", "b"]
    assert names(store.list(search="äPFEL")) == ["a"]
    assert names(store.list(search="0% c")) == ["d"]  # no LIKE wildcards
    assert names(store.list(search="_shirt")) == ["d"]
    assert names(store.list(search="%")) == ["d"]
    assert names(store.list(status="cancelled")) == ["b"]
    assert names(store.list(status="running", search="fox")) == ["c"]
    assert names(store.list(user="alice")) == ["c", "a"]

    for bad in ({"status": "done"}, {"limit": 0}, {"limit": "5"}):
        with pytest.raises(ValueError):
            store.list(**bad)


# ------------------------------------------------------------ transitions


def _job_in_status(store: JobStore, db: Path, status: str) -> str:
    if status == "interrupted":
        with JobStore(db, owner=dead_owner()) as ghost:
            job_id = ghost.create(params={"prompt": "p"}, loras=[])
        assert job_id in store.recover_interrupted()
        return job_id
    job_id = store.create(params={"prompt": "p"}, loras=[], status="queued")
    if status == "queued":
        return job_id
    store.mark_running(job_id)
    if status == "completed":
        store.mark_completed(job_id, seeds=[1], outputs=["x.png"])
    elif status == "failed":
        store.mark_failed(job_id, error="boom", traceback="tb")
    elif status == "cancelled":
        store.mark_cancelled(job_id)
    return job_id


ACTIONS = {
    "running": lambda s, j: s.mark_running(j),
    "completed": lambda s, j: s.mark_completed(j, seeds=[5], outputs=["o.png"]),
    "failed": lambda s, j: s.mark_failed(j, error="err", traceback="tb"),
    "cancelled": lambda s, j: s.mark_cancelled(j, reason="user cancelled"),
}

# (current status, requested status, outcome): True moved, False logged no-op, ValueError refused
TRANSITIONS = [
    ("queued", "running", True),
    ("queued", "cancelled", True),
    ("queued", "completed", ValueError),
    ("queued", "failed", ValueError),
    ("running", "completed", True),
    ("running", "failed", True),
    ("running", "cancelled", True),
    ("running", "running", ValueError),
] + [
    (final, requested, False if requested in ("failed", "cancelled") else ValueError)
    for final in sorted(FINAL_STATUSES)
    for requested in ("running", "completed", "failed", "cancelled")
]


@pytest.mark.parametrize("current,requested,outcome", TRANSITIONS)
def test_status_only_moves_forward(store: JobStore, db: Path, current, requested, outcome):
    job_id = _job_in_status(store, db, current)
    before = store.get(job_id)
    assert before["status"] == current
    if outcome is ValueError:
        with pytest.raises(ValueError) as info:
            ACTIONS[requested](store, job_id)
        message = str(info.value)
        assert job_id in message and current in message and requested in message
        assert store.get(job_id) == before
    elif outcome is False:
        assert ACTIONS[requested](store, job_id) is False
        assert store.get(job_id) == before
    else:
        assert ACTIONS[requested](store, job_id) is True
        after = store.get(job_id)
        assert after["status"] == requested
        if requested in FINAL_STATUSES:
            assert after["finished_at"] is not None
        if requested == "failed":
            assert (after["error"], after["traceback"]) == ("err", "tb")
        if requested == "cancelled":
            assert after["error"] == "user cancelled"


RACES = [
    ("cancelled", "failed"),
    ("cancelled", "cancelled"),
    ("completed", "cancelled"),
    ("completed", "failed"),
]


@pytest.mark.parametrize("first,second", RACES)
@pytest.mark.parametrize("shared", [True, False], ids=["one-store", "two-stores"])
def test_concurrent_marks_exactly_one_wins(db: Path, first, second, shared):
    store_a = JobStore(db)
    store_b = store_a if shared else JobStore(db)
    try:
        for _ in range(15):
            job_id = store_a.create(params={"prompt": "race"}, loras=[])
            barrier = threading.Barrier(2)
            results: dict[str, object] = {}

            def run(tag, action, store):
                barrier.wait()
                try:
                    results[tag] = ACTIONS[action](store, job_id)
                except ValueError as exc:  # a refused mark_completed
                    results[tag] = exc

            threads = [
                threading.Thread(target=run, args=("a", first, store_a)),
                threading.Thread(target=run, args=("b", second, store_b)),
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(10)
            winners = [tag for tag, result in results.items() if result is True]
            assert len(results) == 2 and len(winners) == 1, results
            final = store_a.get(job_id)["status"]
            assert final == {"a": first, "b": second}[winners[0]]
    finally:
        store_a.close()
        store_b.close()


def test_many_threads_share_one_store(store: JobStore):
    errors: list[BaseException] = []

    def work():
        try:
            for _ in range(10):
                job_id = store.create(params={"prompt": "t"}, loras=[])
                store.mark_completed(job_id, seeds=[1], outputs=[])
                store.list(limit=5)
        except BaseException as exc:  # noqa: BLE001 - collected and re-asserted
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    assert len(store.list(limit=1000, status="completed")) == 80


# --------------------------------------------------------------- persistence


def test_history_survives_reopening(db: Path):
    with JobStore(db) as first:
        done = first.create(params=PARAMS, loras=LORAS, user="u")
        first.mark_completed(done, seeds=[3, 4], outputs=["a.png", "b.png"])
        queued = first.create(params={"prompt": "later"}, loras=[], status="queued")
        snapshot = first.list()
    with JobStore(db) as second:
        assert second.list() == snapshot
        assert second.get(done)["seeds"] == [3, 4]
        assert second.get(queued)["status"] == "queued"
        assert second.recover_interrupted() == []  # owned by this live process


# ---------------------------------------------------------------- dataframe


def test_history_rows_and_dataframe(store: JobStore):
    first = store.create(params=PARAMS, loras=LORAS)
    store.set_seeds(first, [42, 43])
    store.mark_completed(first, seeds=[42, 43], outputs=["a.png"])
    second = store.create(params={"prompt": "a cat", "steps": 8, "seed": 5}, loras=[])
    store.mark_failed(second, error="CUDA out of memory", traceback="tb")
    third = store.create(params={"prompt": "Another FOX", "seed": -1}, loras=[], status="queued")

    rows = store.history()
    assert [list(row) for row in rows] == [list(HISTORY_COLUMNS)] * 3
    assert [row["job_id"] for row in rows] == [third, second, first]
    done = rows[2]
    assert done["lora"] == "style:0.8, detail:1"
    assert (done["seed"], done["requested_seed"]) == (42, -1)
    assert (done["steps"], done["status"], done["error"]) == (4, "completed", "")
    assert ISO_UTC.fullmatch(done["created_at"]) and done["created_at"] == store.get(first)["created_at"]
    assert done["duration_s"] == round(done["duration_s"], 2)
    assert rows[1]["error"] == "CUDA out of memory"
    assert (rows[1]["seed"], rows[1]["requested_seed"]) == (None, 5)  # never drew its seeds
    assert (rows[0]["lora"], rows[0]["seed"], rows[0]["requested_seed"]) == ("", None, -1)

    assert list(rows[0]) == list(HISTORY_COLUMNS)
    assert [r["job_id"] for r in store.history(status="failed")] == [second]
    assert [r["job_id"] for r in store.history(search="fox")] == [third, first]
    assert [r["job_id"] for r in store.history(limit=1)] == [third]
    assert store.history(status="interrupted") == []


def test_history_rows_cut_long_texts_but_the_record_keeps_them(store: JobStore):
    prompt = "a fox " * 200_000  # 1.2 MB
    job_id = store.create(params={"prompt": prompt}, loras=[])
    store.mark_failed(job_id, error="x" * 5000, traceback="tb")
    row = store.history()[0]
    assert len(row["prompt"]) == 300 and row["prompt"].endswith("\u2026") and prompt.startswith(row["prompt"][:-1])
    assert len(row["error"]) == 300 and row["error"].endswith("\u2026")
    assert store.get(job_id)["prompt"] == prompt and len(store.get(job_id)["error"]) == 5000
    short = store.create(params={"prompt": "p" * 300}, loras=[])
    assert store.history()[0]["job_id"] == short and store.history()[0]["prompt"] == "p" * 300


# ---------------------------------------------------------------- "path" key


def test_no_path_key_anywhere(store: JobStore):
    params = dict(PARAMS, path="/tmp/x", init_image={"path": "/tmp/in.png", "size": 3},
                  extras=[{"path": "a"}, {"nested": {"path": "b"}}])
    loras = [{"name": "style", "scale": 0.5, "path": "/loras/style.safetensors"}]
    job_id = store.create(params=params, loras=loras, session="s1")
    store.mark_completed(job_id, seeds=[1], outputs=[Path("/out/1.png")], notes=["n"])
    records = [store.get(job_id), *store.list(), *store.history(), public_record(store.get(job_id))]
    for record in records:
        assert "path" not in set(walk_keys(record))
    job = records[0]
    assert job["params"]["file"] == "/tmp/x"
    assert job["params"]["init_image"] == {"file": "/tmp/in.png", "size": 3}
    assert job["params"]["extras"] == [{"file": "a"}, {"nested": {"file": "b"}}]
    assert job["loras"] == [{"name": "style", "scale": 0.5, "file": "/loras/style.safetensors"}]
    assert job["outputs"] == ["/out/1.png"]


def test_public_record_hides_the_session_and_the_owner(store: JobStore):
    job_id = store.create(params={"prompt": "p", "seed": 3}, loras=[], user="alice", session="gradio-session-hash")
    store.set_seeds(job_id, [3])
    full = store.get(job_id)
    assert full["session"] == "gradio-session-hash" and full["owner"]["pid"] == os.getpid()  # for the studio
    public = public_record(full)
    assert set(public) == RECORD_KEYS - {"session", "owner"}
    assert "gradio-session-hash" not in repr(public) and str(os.getpid()) not in repr(public)
    assert (public["user"], public["seed"], public["requested_seed"]) == ("alice", 3, 3)
    assert full["session"] == "gradio-session-hash"  # the caller's record is not changed
    assert public_record({"job_id": "x", "path": "/a", "session": "s", "owner": {}}) == {"job_id": "x", "file": "/a"}


# ------------------------------------------------------------ process owners


CHILD = r"""
import sys, time
from pathlib import Path
from masuka.store.jobs import JobStore
store = JobStore(Path(sys.argv[1]))
job_id = store.create(params={"prompt": sys.argv[2]}, loras=[])
store.close()
sys.stdout.write(job_id + "\n")
sys.stdout.flush()
if sys.argv[3] == "sleep":
    time.sleep(60)
"""


def _spawn(db: Path, prompt: str, mode: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db), prompt, mode],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    line = proc.stdout.readline().strip()
    assert line, f"child {mode} produced no job id (rc={proc.poll()})"
    return proc, line


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()


def test_recover_interrupted_across_processes(store: JobStore, db: Path):
    mine = store.create(params={"prompt": "mine"}, loras=[])
    mine_queued = store.create(params={"prompt": "mine queued"}, loras=[], status="queued")
    exited, exited_id = _spawn(db, "exited", "exit")
    killed, killed_id = _spawn(db, "killed", "sleep")
    live, live_id = _spawn(db, "live", "sleep")
    try:
        exited.wait(10)
        _stop(killed)  # SIGKILL: no chance to clean up
        assert store.get(killed_id)["status"] == "running"

        changed = store.recover_interrupted()

        assert sorted(changed) == sorted([exited_id, killed_id])
        for job_id, pid in ((exited_id, exited.pid), (killed_id, killed.pid)):
            job = store.get(job_id)
            assert job["status"] == "interrupted"
            assert job["error"] == (
                f"process ended while the job was running (pid {pid} on {socket.gethostname()})"
            )
            assert job["finished_at"] is not None
        assert store.get(live_id)["status"] == "running"
        assert store.get(mine)["status"] == "running"
        assert store.get(mine_queued)["status"] == "queued"
        assert store.recover_interrupted() == []  # idempotent
        assert ProcessOwner(**store.get(live_id)["owner"]).is_alive()
        assert not ProcessOwner(**store.get(killed_id)["owner"]).is_alive()
    finally:
        _stop(live)
        _stop(exited)
    assert store.recover_interrupted() == [live_id]


def test_recycled_pid_counts_as_gone(store: JobStore, db: Path):
    with JobStore(db, owner=dead_owner()) as ghost:
        ghost_job = ghost.create(params={"prompt": "ghost"}, loras=[], status="queued")
    mine = store.create(params={"prompt": "mine"}, loras=[])
    assert store.recover_interrupted() == [ghost_job]
    assert store.get(ghost_job)["status"] == "interrupted"
    assert str(os.getpid()) in store.get(ghost_job)["error"]
    assert store.get(mine)["status"] == "running"


@pytest.mark.parametrize(
    "make_owner,alive",
    [
        (lambda me: me, True),
        (lambda me: ProcessOwner(me.pid, me.host, me.started_at + 0.5), True),
        (lambda me: ProcessOwner(me.pid, me.host, me.started_at - 5.0), False),
        (lambda me: ProcessOwner(me.pid, "some-other-host.invalid", 0.0), True),
        (lambda me: ProcessOwner(2**22 + 12345, me.host, me.started_at), False),
    ],
    ids=["self", "within-1s", "recycled-pid", "other-host", "no-such-pid"],
)
def test_process_owner_is_alive(make_owner, alive):
    assert make_owner(ProcessOwner.current()).is_alive() is alive


def test_import_has_no_side_effects(tmp_path: Path):
    code = (
        "import sys, masuka.store.jobs; "
        "assert 'pandas' not in sys.modules, 'pandas imported eagerly'; "
        "assert masuka.store.jobs.JOB_STATUSES[0] == 'queued'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=30,
        env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
    )
    assert result.returncode == 0, result.stderr
    assert list(tmp_path.iterdir()) == []
    assert set(JOB_STATUSES) >= FINAL_STATUSES
