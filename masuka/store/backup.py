"""Copying the job history to a backup file (e.g. on Google Drive) after each job.

The copy runs on one background thread so a job's answer never waits for a
slow Drive write; requests that arrive while a copy runs are coalesced into one
more copy.  The thread starts on the first request, never at import.
"""

from __future__ import annotations

import atexit
import logging
import sqlite3
import threading
from pathlib import Path

from masuka.store.jobs import JobStore

log = logging.getLogger(__name__)


class DbBackup:
    def __init__(self, jobs: JobStore, dest: Path):
        self.jobs = jobs
        self.dest = Path(dest)
        self._cond = threading.Condition()
        self._wanted = 0  # requests made
        self._done = 0  # requests covered by a finished copy (successful or not)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.failures = 0

    def request(self, _job_id: str | None = None) -> None:
        """Ask for a copy soon (the manager calls this after each job is recorded)."""
        with self._cond:
            if self._stopping:
                return
            self._wanted += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="masuka-db-backup", daemon=True)
                self._thread.start()
                atexit.register(self.close)
            self._cond.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every request made so far is covered by a finished copy."""
        with self._cond:
            target = self._wanted
            return self._cond.wait_for(lambda: self._done >= target, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the pending copy, then stop the thread."""
        self.flush(timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted > self._done or self._stopping)
                if self._wanted <= self._done:
                    return  # stopping with nothing left to copy
                target = self._wanted
            try:
                self.jobs.backup_to(self.dest)
            except (OSError, sqlite3.Error, RuntimeError) as exc:
                # A Drive that went away must not stop the studio; the next job tries again.
                self.failures += 1
                log.warning("could not back up the job history to %s: %s", self.dest, exc)
            with self._cond:
                self._done = target
                self._cond.notify_all()
