"""The studio's job queue, kept in the workspace (studio/jobs.sqlite), so that it outlives the browser and the
server: each job trains one run as `lookalike sweep` does (`python -m lookalike train CONFIG --run NAME --resume`,
in a process of its own), one at a time.

A job's state is never stored as "running": a started job is what its run truly is (workspace.RunPaths.state:
running while a live process holds the run, else done, failed or interrupted), so a studio restarted after a crash
shows the truth, and a job that was running goes on as a process of its own. Training is never done twice: a job's
command resumes its run from its last checkpoint, and a done run is skipped by `train` itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from lookalike.errors import LookalikeError
from lookalike.processes import started, still_running
from lookalike.sweep.runner import child_outcome, train_command
from lookalike.workspace import RunPaths, Workspace, check_run_name

SCHEMA = """CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, run TEXT NOT NULL, config TEXT NOT NULL, state TEXT NOT NULL,
    pid INTEGER, pid_started INTEGER, created REAL NOT NULL, started REAL)"""
# What the queue itself records; a started job's state beyond these is its run's.
QUEUED, STARTED, CANCELLED = "queued", "started", "cancelled"


@dataclass(frozen=True)
class Job:
    id: int
    run: str
    config: str  # the config file the job trains with: a snapshot the studio wrote into the workspace
    state: str  # queued | started | cancelled
    pid: int | None
    pid_started: int | None
    created: float
    started: float | None

    def command(self) -> list[str]:
        return train_command(Path(self.config), self.run, [])


class JobQueue:
    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self.file = workspace.root / "studio" / "jobs.sqlite"
        self._children: dict[int, tuple[subprocess.Popen, RunPaths, float]] = {}  # the jobs this process started

    @contextlib.contextmanager
    def _db(self):
        self.file.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.file, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(SCHEMA)
            yield db
        finally:
            db.close()

    def jobs(self) -> list[Job]:
        with self._db() as db:
            return [Job(**dict(row)) for row in db.execute("SELECT * FROM jobs ORDER BY id")]

    def job(self, job_id: int) -> Job:
        found = [job for job in self.jobs() if job.id == job_id]
        if not found:
            raise LookalikeError(f"no job {job_id} in {self.file}")
        return found[0]

    def submit(self, config: Path, run: str) -> Job:
        """Queue a run; refused while a job of the same run waits or runs (one process trains a run)."""
        check_run_name(run, "run name")
        if any(job.run == run and self.state(job) in ("queued", "starting", "running") for job in self.jobs()):
            raise LookalikeError(f"run {run!r} already has a job waiting or running")
        with self._db() as db:
            cursor = db.execute("INSERT INTO jobs (run, config, state, created) VALUES (?, ?, ?, ?)",
                                (run, str(config), QUEUED, time.time()))
            return self.job(cursor.lastrowid)

    def _set(self, job_id: int, **values) -> None:
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {', '.join(f'{key} = ?' for key in values)} WHERE id = ?",
                       (*values.values(), job_id))

    def state(self, job: Job) -> str:
        """queued | cancelled, or for a started job its run's true state: starting (its process runs but has not
        written the run's status yet), running, done, failed, interrupted (a stopped job's process may still be
        ending: the next job starts once it has)."""
        if job.state != STARTED:
            return job.state
        run = self.workspace.run(job.run)
        said = (run.read_status() or {}).get("updated", 0) >= (job.started or 0)
        if not said and still_running(job.pid, job.pid_started):
            return "starting"
        return run.state()

    def busy(self) -> bool:
        """Whether a job's process is training now (the studio runs one job at a time)."""
        return any(still_running(job.pid, job.pid_started) for job in self.jobs() if job.state == STARTED)

    def start_next(self) -> Job | None:
        """Start the oldest queued job when none is training; a job whose run another process holds (a terminal's
        `lookalike train`) waits for it."""
        if self.busy():
            return None
        for job in self.jobs():
            if job.state == QUEUED and not self.workspace.run(job.run).held_elsewhere():
                return self._start(job)
        return None

    def _start(self, job: Job) -> Job:
        run = self.workspace.run(job.run)
        run.root.mkdir(parents=True, exist_ok=True)
        with run.log.open("a") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} studio job {job.id}: {' '.join(job.command())}\n")
            log.flush()
            # Its own session: it outlives the studio's server, and a stop reaches it alone.
            child = subprocess.Popen(job.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)
        self._set(job.id, state=STARTED, pid=child.pid, pid_started=started(child.pid), started=time.time())
        self._children[job.id] = (child, run, time.time())
        return self.job(job.id)

    def reap(self) -> None:
        """For each job this process started whose process has ended: its run's outcome, as a sweep records it (a
        process that died without saying why gets a status that does, and the results table its row)."""
        for job_id, (child, run, began) in list(self._children.items()):
            code = child.poll()
            # The queue's thread and a Stop both reap: the one that takes the child records it.
            if code is not None and self._children.pop(job_id, None) is not None:
                child_outcome(run, code, time.time() - began, self.workspace.results)

    def stop(self, job_id: int, wait_s: float = 60) -> None:
        """Stop a started job's training as Ctrl-C does (its run says interrupted, resumable), and wait for its
        process to end, so that what is shown next is true; a queued job is cancelled."""
        job = self.job(job_id)
        if job.state == QUEUED:
            self._set(job_id, state=CANCELLED)
        elif job.state == STARTED and still_running(job.pid, job.pid_started):
            os.killpg(job.pid, signal.SIGTERM)
            deadline = time.time() + wait_s
            while still_running(job.pid, job.pid_started) and time.time() < deadline:
                self.reap()  # a child of this process ends only once it is waited for
                time.sleep(0.2)

    def cancel(self, job_id: int) -> None:
        """Leave a job out for good: stopped if it trains, never started again."""
        self.stop(job_id)
        self._set(job_id, state=CANCELLED)

    def requeue(self, job_id: int) -> Job:
        """Resume or retry: the job waits again, and its command resumes the run from its last checkpoint.
        Refused while it trains, or while another process holds its run."""
        job = self.job(job_id)
        state = self.state(job)
        if state in ("starting", "running", "queued"):
            raise LookalikeError(f"job {job_id} ({job.run}) is {state}")
        if self.workspace.run(job.run).held_elsewhere():
            raise LookalikeError(f"run {job.run!r} is being trained by another process")
        self._set(job_id, state=QUEUED, pid=None, pid_started=None, started=None)
        return self.job(job_id)

