"""The job queue in SQLite: submitting, claiming, progress, cancelling and finishing jobs, and the worker rows."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from core import config, db
from core.errors import BinsightError

KINDS = ("train", "hpo", "sleep", "sagemaker", "shards")  # sleep: waits, reporting progress; checks the queue without training
STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
DEVICES = ("auto", "cpu", "cuda", "remote")  # remote: the job runs elsewhere (SageMaker); its worker only polls
DEFAULT_RETRIES = 1  # a job whose worker died is requeued this many times (BINSIGHT_JOB_RETRIES) before it fails

class JobError(BinsightError, ValueError):
    """A job that cannot be submitted or changed; the message says why."""


@dataclass
class Job:
    id: int
    kind: str
    params: dict
    device: str
    status: str
    progress: dict
    pid: int | None
    host: str | None
    worker: str | None
    slot: str | None
    created: float
    started: float | None
    finished: float | None
    heartbeat: float | None
    log_path: str | None
    run_dir: str | None
    error: str | None
    cancel_requested: bool
    user: str | None = None  # who launched it; None for jobs queued before this was recorded
    attempts: int = 0  # how many times a worker started it (more than 1 after its worker died and it was requeued)
    retries: int | None = None  # requeues allowed after a worker died; None: the current job_retries()

    @property
    def retries_allowed(self) -> int:
        return job_retries() if self.retries is None else self.retries

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def elapsed_s(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, "rb") as handle:
                handle.seek(0, 2)
                handle.seek(max(0, handle.tell() - 64_000))
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def _job(row) -> Job:
    data = dict(row)
    data["params"] = json.loads(data["params"] or "{}")
    data["progress"] = json.loads(data["progress"] or "{}")
    data["cancel_requested"] = bool(data["cancel_requested"])
    return Job(**data)


def jobs_dir() -> Path:
    path = config.home() / "jobs"
    path.mkdir(parents=True, exist_ok=True)
    return path


def hostname() -> str:
    return socket.gethostname()


def job_retries() -> int:
    """How many times a job whose worker died is requeued before it fails: $BINSIGHT_JOB_RETRIES (0 = never)."""
    value = os.environ.get("BINSIGHT_JOB_RETRIES", "").strip()
    if not value:
        return DEFAULT_RETRIES
    try:
        return max(0, int(value))
    except ValueError:
        raise JobError(f"BINSIGHT_JOB_RETRIES={value!r}: use a whole number (0 = never requeue)") from None


# --- the queue ---------------------------------------------------------------------------------------------------

def submit(kind: str, params: dict, user: str | None = None) -> Job:
    """Queue a job (launched by `user`, when known); its output folder and log path are fixed now so the page can
    show them at once."""
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}: one of {', '.join(KINDS)}")
    device = str(params.get("device") or "auto")
    if device.split(":")[0] not in DEVICES:
        raise JobError(f"device {device!r}: use auto, cpu or cuda")
    if (kind == "sagemaker") != (device == "remote"):
        raise JobError("a SageMaker job runs on the device 'remote', and only it does")
    params = {**params, "device": device}
    json.dumps(params)  # refuse what cannot be persisted before anything is written
    with db.transaction() as conn:
        job_id = conn.execute(
            "INSERT INTO jobs (kind, params, device, created, user, retries) VALUES (?, ?, ?, ?, ?, ?)",
            (kind, json.dumps(params), device, time.time(), (user or "").strip() or None, job_retries()),
        ).lastrowid
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = None
        if kind in ("train", "sagemaker"):
            name = "-".join(str(p) for p in (stamp, params.get("backbone"), params.get("mode"), f"job{job_id}") if p)
            run_dir = config.runs_dir() / name
        elif kind == "hpo":
            run_dir = config.home() / "searches" / f"{stamp}-job{job_id}"
        log_path = jobs_dir() / f"job{job_id}.log"
        conn.execute("UPDATE jobs SET run_dir = ?, log_path = ? WHERE id = ?",
                     (str(run_dir) if run_dir else None, str(log_path), job_id))
    return get(job_id)


def get(job_id: int) -> Job:
    with db.connection() as conn:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
    if row is None:
        raise JobError(f"there is no job {job_id}")
    return _job(row)


def list_jobs(statuses: tuple[str, ...] | list[str] | None = None, kind: str | None = None,
              limit: int = 100) -> list[Job]:
    """Newest first."""
    where, args = [], []
    if statuses:
        where.append(f"status IN ({','.join('?' * len(statuses))})")
        args += list(statuses)
    if kind:
        where.append("kind = ?")
        args.append(kind)
    sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT ?"
    with db.connection() as conn:
        return [_job(r) for r in conn.execute(sql, args + [limit]).fetchall()]


def queue_position(job_id: int) -> int:
    """1 for the next queued job to start."""
    with db.connection() as conn:
        return conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND id <= ?", (job_id,)).fetchone()[0]


def cancel(job_id: int) -> Job:
    """A queued job is cancelled at once; a running one stops at its next check (the training's should_stop)."""
    with db.transaction() as conn:
        row = conn.execute("SELECT status FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
        if row is None:
            raise JobError(f"there is no job {job_id}")
        if row["status"] == "queued":
            conn.execute("UPDATE jobs SET status = 'cancelled', finished = ?, error = 'cancelled before it started' "
                         "WHERE id = ?", (time.time(), job_id))
        elif row["status"] == "running":
            conn.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
    return get(job_id)


def cancel_requested(job_id: int) -> bool:
    with db.connection() as conn:
        row = conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return bool(row and row[0])


def slot_accepts(slot: str, slots: list[str]) -> list[str]:
    """The job devices a worker on `slot` runs: 'auto' goes to a GPU when the machine has one, else the CPU."""
    has_gpu = any(s.startswith("cuda") for s in slots)
    if slot == "remote":
        return ["remote"]
    if slot == "cpu":
        return ["cpu"] if has_gpu else ["cpu", "auto"]
    return ["auto", "cuda", slot]


def queued_count(devices: list[str]) -> int:
    with db.connection() as conn:
        return conn.execute(
            f"SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND device IN ({','.join('?' * len(devices))})",
            devices,
        ).fetchone()[0]


def claim_next(slot: str, devices: list[str], worker_id: str, pid: int) -> Job | None:
    """Atomically move the oldest queued job this slot accepts to running, owned by this worker."""
    with db.transaction() as conn:
        row = conn.execute(
            f"SELECT id FROM jobs WHERE status = 'queued' AND device IN ({','.join('?' * len(devices))}) "
            "ORDER BY id LIMIT 1", devices,
        ).fetchone()
        if row is None:
            return None
        now = time.time()
        conn.execute(
            "UPDATE jobs SET status = 'running', pid = ?, host = ?, worker = ?, slot = ?, started = ?, heartbeat = ?, "
            "attempts = attempts + 1 WHERE id = ?", (pid, hostname(), worker_id, slot, now, now, row["id"]),
        )
        conn.execute("UPDATE workers SET job_id = ? WHERE id = ?", (row["id"], worker_id))
    return get(row["id"])


def set_progress(job_id: int, progress: dict) -> None:
    with db.connection() as conn:
        conn.execute("UPDATE jobs SET progress = ?, heartbeat = ? WHERE id = ?",
                     (json.dumps(progress, default=_jsonable), time.time(), job_id))


def finish(job_id: int, status: str, error: str | None = None, only_if_running: bool = True) -> bool:
    """Record the outcome; with only_if_running a job already finished (e.g. by the reaper) is left alone."""
    if status not in ("done", "failed", "cancelled"):
        raise JobError(f"a job finishes as done, failed or cancelled, not {status!r}")
    with db.connection() as conn:
        sql = "UPDATE jobs SET status = ?, error = ?, finished = ? WHERE id = ?"
        if only_if_running:
            sql += " AND status = 'running'"
        return conn.execute(sql, (status, error, time.time(), job_id)).rowcount > 0


def requeue_or_fail(job: Job, failure: str) -> str | None:
    """The worker running `job` (as read by the caller) died: queue it again when it has retries left, else fail it
    with `failure`. Returns "requeued" or "failed", or None when the job had moved on meanwhile (finished, or already
    requeued and claimed by another worker), so a job is only ever handled once whoever notices the death first."""
    with db.transaction() as conn:
        row = conn.execute("SELECT status, worker, attempts, retries FROM jobs WHERE id = ?", (job.id,)).fetchone()
        if row is None or row["status"] != "running" or row["worker"] != job.worker:
            return None
        allowed = job_retries() if row["retries"] is None else row["retries"]
        if row["attempts"] - 1 < allowed:  # the first start is not a retry
            conn.execute("UPDATE jobs SET status = 'queued', pid = NULL, worker = NULL, slot = NULL, heartbeat = NULL "
                         "WHERE id = ?", (job.id,))
            return "requeued"
        conn.execute("UPDATE jobs SET status = 'failed', error = ?, finished = ? WHERE id = ?",
                     (failure, time.time(), job.id))
        return "failed"


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


# --- workers (rows written by core.worker; kept here so all SQL lives in one module) -------------------------------

def register_worker(worker_id: str, slot: str, pid: int) -> None:
    now = time.time()
    with db.connection() as conn:
        conn.execute("INSERT OR REPLACE INTO workers (id, slot, pid, host, started, heartbeat) VALUES (?, ?, ?, ?, ?, ?)",
                     (worker_id, slot, pid, hostname(), now, now))


def worker_heartbeat(worker_id: str, job_id: int | None) -> None:
    now = time.time()
    with db.connection() as conn:
        conn.execute("UPDATE workers SET heartbeat = ?, job_id = ? WHERE id = ?", (now, job_id, worker_id))
        if job_id is not None:
            conn.execute("UPDATE jobs SET heartbeat = ? WHERE id = ? AND status = 'running'", (now, job_id))


def unregister_worker(worker_id: str) -> None:
    with db.connection() as conn:
        conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))


def retire_worker_if_idle(worker_id: str, devices: list[str], release) -> bool:
    """Unregister the worker and call release() (its slot lock) only if nothing it accepts is queued, atomically:
    a job submitted meanwhile either is seen here or finds the slot free and gets a new worker."""
    with db.transaction() as conn:
        waiting = conn.execute(
            f"SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND device IN ({','.join('?' * len(devices))})",
            devices,
        ).fetchone()[0]
        if waiting:
            return False
        conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))
        release()
        return True


def list_workers() -> list[dict]:
    with db.connection() as conn:
        return [dict(r) for r in conn.execute("SELECT * FROM workers ORDER BY started").fetchall()]
