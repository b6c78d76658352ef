"""The job queue and the runs registry, persisted in SQLite: what to train, how it went, which model is current."""
from __future__ import annotations

import json
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core import config, db

KINDS = ("train", "hpo", "sleep")  # sleep: waits, reporting progress; checks the queue without training
STATUSES = ("queued", "running", "done", "failed", "cancelled")
ACTIVE = ("queued", "running")
DEVICES = ("auto", "cpu", "cuda")

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    params TEXT NOT NULL,
    device TEXT NOT NULL DEFAULT 'auto',
    status TEXT NOT NULL DEFAULT 'queued',
    progress TEXT NOT NULL DEFAULT '{}',
    pid INTEGER,
    host TEXT,
    worker TEXT,
    slot TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    heartbeat REAL,
    log_path TEXT,
    run_dir TEXT,
    error TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, id);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    job_id INTEGER,
    path TEXT NOT NULL,
    params TEXT NOT NULL DEFAULT '{}',
    metrics TEXT NOT NULL DEFAULT '{}',
    extra TEXT NOT NULL DEFAULT '{}',
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS workers (
    id TEXT PRIMARY KEY,
    slot TEXT NOT NULL,
    pid INTEGER NOT NULL,
    host TEXT NOT NULL,
    started REAL NOT NULL,
    heartbeat REAL NOT NULL,
    job_id INTEGER
);
"""


class JobError(ValueError):
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


@dataclass
class Run:
    id: str
    job_id: int | None
    path: str
    params: dict
    metrics: dict
    created: float
    extra: dict = field(default_factory=dict)

    @property
    def model_path(self) -> Path:
        return Path(self.path) / "model.pt"

    @property
    def exists(self) -> bool:
        return self.model_path.is_file()


def connect():
    return db.connect(SCHEMA)


@contextmanager
def transaction():
    """A write transaction taken up front (BEGIN IMMEDIATE), so check-then-update steps cannot interleave."""
    conn = connect()
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
    finally:
        conn.close()


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


# --- the queue ---------------------------------------------------------------------------------------------------

def submit(kind: str, params: dict) -> Job:
    """Queue a job; its output folder and log path are fixed now so the page can show them at once."""
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}: one of {', '.join(KINDS)}")
    device = str(params.get("device") or "auto")
    if device.split(":")[0] not in DEVICES:
        raise JobError(f"device {device!r}: use auto, cpu or cuda")
    params = {**params, "device": device}
    json.dumps(params)  # refuse what cannot be persisted before anything is written
    with transaction() as conn:
        job_id = conn.execute(
            "INSERT INTO jobs (kind, params, device, created) VALUES (?, ?, ?, ?)",
            (kind, json.dumps(params), device, time.time()),
        ).lastrowid
        stamp = time.strftime("%Y%m%d-%H%M%S")
        run_dir = None
        if kind == "train":
            name = "-".join(str(p) for p in (stamp, params.get("backbone"), params.get("mode"), f"job{job_id}") if p)
            run_dir = config.runs_dir() / name
        elif kind == "hpo":
            run_dir = config.home() / "searches" / f"{stamp}-job{job_id}"
        log_path = jobs_dir() / f"job{job_id}.log"
        conn.execute("UPDATE jobs SET run_dir = ?, log_path = ? WHERE id = ?",
                     (str(run_dir) if run_dir else None, str(log_path), job_id))
    return get(job_id)


def get(job_id: int) -> Job:
    conn = connect()
    try:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (int(job_id),)).fetchone()
    finally:
        conn.close()
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
    conn = connect()
    try:
        return [_job(r) for r in conn.execute(sql, args + [limit]).fetchall()]
    finally:
        conn.close()


def queue_position(job_id: int) -> int:
    """1 for the next queued job to start."""
    conn = connect()
    try:
        return conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND id <= ?", (job_id,)).fetchone()[0]
    finally:
        conn.close()


def cancel(job_id: int) -> Job:
    """A queued job is cancelled at once; a running one stops at its next check (the training's should_stop)."""
    with transaction() as conn:
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
    conn = connect()
    try:
        row = conn.execute("SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)).fetchone()
    finally:
        conn.close()
    return bool(row and row[0])


def slot_accepts(slot: str, slots: list[str]) -> list[str]:
    """The job devices a worker on `slot` runs: 'auto' goes to a GPU when the machine has one, else the CPU."""
    has_gpu = any(s.startswith("cuda") for s in slots)
    if slot == "cpu":
        return ["cpu"] if has_gpu else ["cpu", "auto"]
    return ["auto", "cuda", slot]


def queued_count(devices: list[str]) -> int:
    conn = connect()
    try:
        return conn.execute(
            f"SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND device IN ({','.join('?' * len(devices))})",
            devices,
        ).fetchone()[0]
    finally:
        conn.close()


def claim_next(slot: str, devices: list[str], worker_id: str, pid: int) -> Job | None:
    """Atomically move the oldest queued job this slot accepts to running, owned by this worker."""
    with transaction() as conn:
        row = conn.execute(
            f"SELECT id FROM jobs WHERE status = 'queued' AND device IN ({','.join('?' * len(devices))}) "
            "ORDER BY id LIMIT 1", devices,
        ).fetchone()
        if row is None:
            return None
        now = time.time()
        conn.execute(
            "UPDATE jobs SET status = 'running', pid = ?, host = ?, worker = ?, slot = ?, started = ?, heartbeat = ? "
            "WHERE id = ?", (pid, hostname(), worker_id, slot, now, now, row["id"]),
        )
        conn.execute("UPDATE workers SET job_id = ? WHERE id = ?", (row["id"], worker_id))
    return get(row["id"])


def set_progress(job_id: int, progress: dict) -> None:
    conn = connect()
    try:
        conn.execute("UPDATE jobs SET progress = ?, heartbeat = ? WHERE id = ?",
                     (json.dumps(progress, default=_jsonable), time.time(), job_id))
    finally:
        conn.close()


def finish(job_id: int, status: str, error: str | None = None, only_if_running: bool = True) -> bool:
    """Record the outcome; with only_if_running a job already finished (e.g. by the reaper) is left alone."""
    if status not in ("done", "failed", "cancelled"):
        raise JobError(f"a job finishes as done, failed or cancelled, not {status!r}")
    conn = connect()
    try:
        sql = "UPDATE jobs SET status = ?, error = ?, finished = ? WHERE id = ?"
        if only_if_running:
            sql += " AND status = 'running'"
        return conn.execute(sql, (status, error, time.time(), job_id)).rowcount > 0
    finally:
        conn.close()


def _jsonable(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


# --- workers (rows written by core.worker; kept here so all SQL lives in one module) -------------------------------

def register_worker(worker_id: str, slot: str, pid: int) -> None:
    now = time.time()
    conn = connect()
    try:
        conn.execute("INSERT OR REPLACE INTO workers (id, slot, pid, host, started, heartbeat) VALUES (?, ?, ?, ?, ?, ?)",
                     (worker_id, slot, pid, hostname(), now, now))
    finally:
        conn.close()


def worker_heartbeat(worker_id: str, job_id: int | None) -> None:
    now = time.time()
    conn = connect()
    try:
        conn.execute("UPDATE workers SET heartbeat = ?, job_id = ? WHERE id = ?", (now, job_id, worker_id))
        if job_id is not None:
            conn.execute("UPDATE jobs SET heartbeat = ? WHERE id = ? AND status = 'running'", (now, job_id))
    finally:
        conn.close()


def unregister_worker(worker_id: str) -> None:
    conn = connect()
    try:
        conn.execute("DELETE FROM workers WHERE id = ?", (worker_id,))
    finally:
        conn.close()


def retire_worker_if_idle(worker_id: str, devices: list[str], release) -> bool:
    """Unregister the worker and call release() (its slot lock) only if nothing it accepts is queued, atomically:
    a job submitted meanwhile either is seen here or finds the slot free and gets a new worker."""
    with transaction() as conn:
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
    conn = connect()
    try:
        return [dict(r) for r in conn.execute("SELECT * FROM workers ORDER BY started").fetchall()]
    finally:
        conn.close()


# --- runs: finished training jobs and the current model ------------------------------------------------------------

def register_run(path: str | Path, job_id: int | None = None, params: dict | None = None,
                 metrics: dict | None = None, extra: dict | None = None) -> Run:
    """Record a finished run folder (metrics default to its metrics.json); the first run becomes the current model."""
    path = Path(path)
    if metrics is None:
        try:
            metrics = json.loads((path / "metrics.json").read_text())
        except (OSError, ValueError):
            metrics = {}
    if params is None:
        try:
            params = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            params = {}
    conn = connect()
    try:
        conn.execute(
            "INSERT OR REPLACE INTO runs (id, job_id, path, params, metrics, extra, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (path.name, job_id, str(path), json.dumps(params, default=_jsonable),
             json.dumps(metrics, default=_jsonable), json.dumps(extra or {}, default=_jsonable), time.time()))
    finally:
        conn.close()
    if current_run() is None:
        set_current_run(path.name)
    return get_run(path.name)


def _run(row) -> Run:
    return Run(id=row["id"], job_id=row["job_id"], path=row["path"], params=json.loads(row["params"] or "{}"),
               metrics=json.loads(row["metrics"] or "{}"), extra=json.loads(row["extra"] or "{}"),
               created=row["created"])


def get_run(run_id: str) -> Run:
    conn = connect()
    try:
        row = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    finally:
        conn.close()
    if row is None:
        raise JobError(f"there is no run {run_id!r}")
    return _run(row)


def list_runs() -> list[Run]:
    """Newest first, runs whose folder was deleted left out."""
    conn = connect()
    try:
        rows = conn.execute("SELECT * FROM runs ORDER BY created DESC").fetchall()
    finally:
        conn.close()
    return [run for run in map(_run, rows) if Path(run.path).is_dir()]


def set_current_run(run_id: str) -> Run:
    """Make `run_id` the model Predict uses; a run folder trained from the CLI under runs/ is registered first."""
    try:
        run = get_run(run_id)
    except JobError:
        folder = config.runs_dir() / run_id
        if not (folder / "model.pt").is_file():
            raise
        run = register_run(folder)
    if not run.exists:
        raise JobError(f"run {run_id!r} has no model file ({run.model_path})")
    config.save_settings(current_run=run_id)
    return run


def current_run() -> Run | None:
    """The model the Predict page uses, or None when none was chosen or its files are gone."""
    chosen = config.load_settings().get("current_run")
    if not chosen:
        return None
    try:
        run = get_run(chosen)
    except JobError:
        return None
    return run if run.exists else None


def final_test_metrics(metrics: dict) -> dict:
    """The final test metrics inside a metrics.json (or the dict itself when it is already flat)."""
    for key in ("test", "final", "test_metrics"):
        if isinstance(metrics.get(key), dict):
            return metrics[key]
    return metrics


def final_metrics(run: Run) -> dict:
    """The run's final test metrics, wherever the training put them in metrics.json."""
    return final_test_metrics(run.metrics or {})


def read_run_metrics(run_dir: str | Path) -> dict:
    try:
        data = json.loads((Path(run_dir) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe_dataset(dataset) -> dict:
    """What a job records about its dataset: where, which version (labels, classes and split), split sizes."""
    import hashlib

    rows = dataset.labelled()
    digest = hashlib.sha1()
    for name, cls, split in sorted(zip(rows["name"], rows["cls"].astype(int), rows["split"].astype(str))):
        digest.update(f"{name}:{cls}:{split}\n".encode())
    sizes = rows["split"].value_counts()
    return {"data": str(dataset.source), "dataset_key": dataset.key, "dataset_version": digest.hexdigest()[:10],
            "classes": [int(c) for c in dataset.classes],
            "n_train": int(sizes.get("train", 0)), "n_valid": int(sizes.get("valid", 0)),
            "n_test": int(sizes.get("test", 0))}


# --- training parameters -----------------------------------------------------------------------------------------

def make_train_config(params: dict, out: str | Path, device: str | None = None):
    """A core.training.TrainConfig from job params (unknown keys, such as the dataset version, are left out)."""
    from dataclasses import fields

    from core.training import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values = {key: value for key, value in params.items() if key in names}
    values["out"] = str(out)
    if device:
        values["device"] = device
    return TrainConfig(**values)


def training_problems(params: dict, n_train: int, cuda_available: bool) -> list[str]:
    """Why these training parameters cannot work (empty when they can): the training's own checks, plus the device."""
    problems = []
    if str(params.get("device") or "auto").startswith("cuda") and not cuda_available:
        problems.append("CUDA was asked for but this machine has no usable GPU: choose auto or cpu.")
    try:
        problems += make_train_config(params, config.home() / "validate-only").validate(n_train)
    except (TypeError, ValueError) as exc:
        problems.append(str(exc))
    return problems


# --- estimates ---------------------------------------------------------------------------------------------------

# Rough images/s on 2 CPU cores at 224 px before any run has measured this machine.
DEFAULT_SPEED = {"features": 25.0, "train": 6.0, "head": 5000.0}
GPU_SPEEDUP = 25.0


def input_shape(params: dict) -> tuple[int, float]:
    """(height px, width / height) a training with these params sees its photos at (mode defaults included)."""
    config = make_train_config(params, "")
    return config.input_height, config.input_aspect


def _pixels(params: dict) -> float:
    """Input pixels of a training's photos, which its speed scales with."""
    height, aspect = input_shape(params)
    return float(height) ** 2 * float(aspect)


def measured_speeds(params: dict, on_gpu: bool) -> dict | None:
    """images/s per stage from the latest finished run with the same backbone, mode and device kind."""
    for run in list_runs():
        if run.params.get("backbone") != params.get("backbone") or run.params.get("mode") != params.get("mode"):
            continue
        speeds = run.extra.get("speeds") or {}
        if not speeds or bool(run.extra.get("on_gpu")) != on_gpu:
            continue
        scale = _pixels(run.params) / _pixels(params)
        return {stage: value * scale for stage, value in speeds.items() if value}
    return None


def estimate_seconds(params: dict, n_train: int, n_valid: int, n_test: int, on_gpu: bool) -> tuple[float, bool]:
    """(seconds, measured): the duration of a training from this machine's measured images/s, else a rough guess."""
    from core.preprocess import TTA_VIEWS

    speeds = measured_speeds(params, on_gpu)
    measured = speeds is not None
    if speeds is None:
        scale = 224 ** 2 / _pixels(params) * (GPU_SPEEDUP if on_gpu else 1.0)
        speeds = {stage: value * scale for stage, value in DEFAULT_SPEED.items()}
    epochs = max(int(params.get("epochs") or 1), 1)
    features = speeds.get("features") or DEFAULT_SPEED["features"]
    views = len(TTA_VIEWS.get(make_train_config(params, "").test_views, ("plain",)))  # test-time views scored
    if params.get("mode") == "frozen":
        head = max(speeds.get("train") or 0, DEFAULT_SPEED["head"]) if measured else DEFAULT_SPEED["head"]
        seconds = views * (n_train + n_valid + n_test) / features + epochs * (n_train + n_valid) / head
    else:
        train = speeds.get("train") or DEFAULT_SPEED["train"]
        evaluate = speeds.get("features") or 3 * train  # a forward pass costs about a third of a training step
        seconds = epochs * (n_train / train + n_valid / evaluate) + views * (n_valid + n_test) / evaluate
    return seconds, measured
