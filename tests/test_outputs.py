"""Output images: the leftovers a process killed while saving leaves behind are removed at start."""

from __future__ import annotations

import os
import time
from pathlib import Path

from PIL import Image

from masuka.store.jobs import JobStore, ProcessOwner
from masuka.store.outputs import read_metadata, remove_leftovers, save_image


def _save(outputs: Path, job_id: str, index: int, seed: int) -> Path:
    return save_image(Image.new("RGB", (8, 8), "red"), outputs, {"prompt": "p", "seed": seed}, f"{job_id}-{index}-{seed}")


def test_leftovers_of_a_killed_save_go_and_everything_else_stays(tmp_path):
    db, outputs = tmp_path / "masuka.db", tmp_path / "outputs"
    store = JobStore(db)
    me = ProcessOwner.current()
    with JobStore(db, owner=ProcessOwner(me.pid, me.host, me.started_at - 1000.0)) as killed_process:
        killed = killed_process.create(params={"prompt": "killed while saving"}, loras=[])
    done = store.create(params={"prompt": "done"}, loras=[])
    kept = [_save(outputs, done, 0, 5), _save(outputs, done, 1, 6)]
    store.mark_completed(done, seeds=[5, 6], outputs=[str(p) for p in kept])
    running = store.create(params={"prompt": "saving right now"}, loras=[])  # this live process owns it
    assert store.recover_interrupted() == [killed]

    day = kept[0].parent
    orphan = day / f"{killed}-0-7.png"  # saved, never recorded: the job died first
    orphan.write_bytes(b"\x89PNG" + b"\0" * 10 * 2**20)
    killed_partial = day / f".{killed}-1-8.png.k2j4h5g6.partial"
    done_partial = day / f".{done}-2-9.png.a1b2c3d4.partial"
    running_partial = day / f".{running}-0-3.png.zzzz9999.partial"
    running_image = day / f"{running}-0-3.png"
    unknown_image = day / "0123456789ab-0-1.png"  # another history's (a shared Drive folder)
    unknown_old_partial = day / ".0123456789ab-1-2.png.q1w2e3r4.partial"
    unknown_new_partial = day / ".0123456789ab-2-3.png.t5y6u7i8.partial"
    not_ours = [day / "holiday.png", outputs / "notes.txt"]
    for file in (killed_partial, done_partial, running_partial, running_image, unknown_image,
                 unknown_old_partial, unknown_new_partial, *not_ours):
        file.write_bytes(b"x")
    an_hour_ago = time.time() - 3700
    os.utime(unknown_old_partial, (an_hour_ago, an_hour_ago))

    removed = remove_leftovers(outputs, store)

    gone = {orphan, killed_partial, done_partial, unknown_old_partial}
    assert set(removed) == gone and not any(p.exists() for p in gone)
    for file in (*kept, running_partial, running_image, unknown_image, unknown_new_partial, *not_ours):
        assert file.exists(), file
    assert read_metadata(kept[1])["seed"] == 6
    assert remove_leftovers(outputs, store) == []
    assert remove_leftovers(tmp_path / "no-outputs-yet", store) == []
    store.close()
