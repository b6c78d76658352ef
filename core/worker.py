"""The job worker: its own OS process per slot (a GPU, or the CPU) running queued jobs one at a time, and the reaper
that marks a job failed as soon as the process running it is gone."""
from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
import uuid
from pathlib import Path

from core import config, gpu, jobs

ROOT = Path(__file__).resolve().parents[1]
HEARTBEAT_S = 1.0
POLL_S = 0.5
PROGRESS_EVERY_S = 0.5
CANCEL_CHECK_S = 0.5
IDLE_EXIT_S = 600.0
LOCK_WAIT_S = 5.0
STALE_S = 30.0  # a job on another host counts as dead when its heartbeat is older than this


class JobCancelled(Exception):
    """Raised inside a job when its cancel flag is seen."""


# --- slot locks: held by the worker process for its whole life; the kernel drops them when it dies ---------------

def _lock_path(slot: str) -> Path:
    folder = config.home() / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{slot.replace(':', '-')}.lock"


class SlotLock:
    def __init__(self, slot: str):
        self.slot = slot
        self.handle = None

    def acquire(self, wait_s: float = 0.0) -> bool:
        handle = open(_lock_path(self.slot), "a+")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                self.handle = handle
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.close()
                    return False
                time.sleep(0.1)

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def slot_is_held(slot: str) -> bool:
    """True while a live worker owns `slot`."""
    probe = SlotLock(slot)
    if probe.acquire():
        probe.release()
        return False
    return True


def pid_alive(pid: int | None) -> bool:
    """A running process (a zombie — dead but not yet reaped by its parent — counts as gone)."""
    if not pid:
        return False
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _append_log(path: str | None, text: str) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}\n")


def reap_dead_jobs() -> list[int]:
    """Mark failed every running job whose worker process is gone; returns their ids."""
    reaped = []
    here = jobs.hostname()
    for job in jobs.list_jobs(["running"]):
        if job.host == here:
            dead = not pid_alive(job.pid) or not (job.slot and slot_is_held(job.slot))
        else:
            dead = job.heartbeat is None or time.time() - job.heartbeat > STALE_S
        if dead:
            message = (f"The worker process running this job (pid {job.pid}) stopped unexpectedly: it was killed "
                       "(for example SIGKILL, or out of memory) or crashed. The log shows how far it got; "
                       "launch the job again.")
            if jobs.finish(job.id, "failed", message):
                _append_log(job.log_path, "job failed: " + message)
                reaped.append(job.id)
    for row in jobs.list_workers():
        if row["host"] == here and not pid_alive(row["pid"]):
            jobs.unregister_worker(row["id"])
    return reaped


# --- starting workers --------------------------------------------------------------------------------------------

_spawned: dict[tuple[str, str], tuple[subprocess.Popen, float]] = {}  # (home, slot) → worker started here, when
SPAWN_GRACE_S = 20.0  # a worker just started may still be importing before it takes its slot's lock


def start_worker(slot: str, accepts: list[str], idle_exit_s: float = IDLE_EXIT_S) -> subprocess.Popen:
    """A detached worker process (its own session: stopping the app or its terminal does not stop it)."""
    log = open(jobs.jobs_dir() / f"worker-{slot.replace(':', '-')}.log", "ab")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
           "BINSIGHT_HOME": str(config.home())}
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "core", "worker", "--slot", slot, "--accepts", ",".join(accepts),
             "--idle-exit", str(idle_exit_s)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, close_fds=True,
        )
    finally:
        log.close()
    # Collect its exit status when it ends, so it never lingers as a zombie of this (possibly long-lived) process.
    threading.Thread(target=process.wait, daemon=True).start()
    _spawned[(str(config.home()), slot)] = (process, time.monotonic())
    return process


def _starting(slot: str) -> bool:
    """A worker this process started for `slot` moments ago and that is still alive (it may not hold the lock yet)."""
    process, when = _spawned.get((str(config.home()), slot), (None, 0.0))
    return (process is not None and process.poll() is None and pid_alive(process.pid)
            and time.monotonic() - when < SPAWN_GRACE_S)


def launch(kind: str, params: dict) -> jobs.Job:
    """Queue a job and make sure a worker will run it: what a page's Launch button does."""
    job = jobs.submit(kind, params)
    ensure_workers()
    return job


def ensure_workers(idle_exit_s: float = IDLE_EXIT_S) -> list[int]:
    """Reap dead jobs, then start a worker for every slot that has queued work and no live worker; returns new pids."""
    reap_dead_jobs()
    if not jobs.list_jobs(["queued"], limit=1):
        return []  # nothing to start; spares the app's first page the torch import that finding GPUs needs
    slots = gpu.training_slots()
    started = []
    for slot in slots:
        accepts = jobs.slot_accepts(slot, slots)
        if jobs.queued_count(accepts) and not _starting(slot) and not slot_is_held(slot):
            started.append(start_worker(slot, accepts, idle_exit_s).pid)
    return started


# --- running jobs ------------------------------------------------------------------------------------------------

class JobContext:
    """What a job runner gets: its job, the device to use, progress reporting, the cancel check and its log."""

    def __init__(self, job: jobs.Job, device: str, worker: "Worker | None" = None):
        self.job = job
        self.device = device
        self.worker = worker
        self.stop_reason: str | None = None
        self._cancelled = False
        self._last_check = 0.0
        self._last_report = 0.0
        self._lock = threading.Lock()

    def should_stop(self) -> bool:
        if self.worker is not None and self.worker.terminating:
            self.stop_reason = "terminated"
            return True
        now = time.monotonic()
        if not self._cancelled and now - self._last_check >= CANCEL_CHECK_S:
            self._last_check = now
            self._cancelled = jobs.cancel_requested(self.job.id)
        if self._cancelled:
            self.stop_reason = "cancelled"
        return self._cancelled

    def report(self, progress: dict, force: bool = False) -> None:
        """Persist the progress snapshot, at most every PROGRESS_EVERY_S unless forced."""
        with self._lock:
            now = time.monotonic()
            if not force and now - self._last_report < PROGRESS_EVERY_S:
                return
            self._last_report = now
            jobs.set_progress(self.job.id, progress)

    def log(self, text: str) -> None:
        _append_log(self.job.log_path, text)


class TrainingProgress:
    """on_progress for core.training.train: keeps per-epoch curves, images/s per stage and GPU use in the job."""

    SPEED_STAGES = ("features", "train")  # the stages whose images/s the estimate of a future run needs

    def __init__(self, ctx: JobContext):
        self.ctx = ctx
        self.state: dict = {"history": [], "speeds": {}}
        self._key = None
        self._epoch_start: tuple = ()
        self._gpu_checked = 0.0

    def __call__(self, update: dict) -> None:
        state = self.state
        for key, value in update.items():
            if key not in ("history", "speeds") and (value is None or isinstance(value, (int, float, str, bool))):
                state[key] = value
        stage, epoch = update.get("stage"), update.get("epoch")
        if stage in self.SPEED_STAGES and update.get("images_per_s"):
            state["speeds"][stage] = float(update["images_per_s"])
        key = (stage, epoch)
        changed = key != self._key
        self._key = key
        losses = (update.get("train_loss"), update.get("valid_loss"))
        if changed:
            self._epoch_start = losses  # the values carried over from the previous epoch
        elif stage == "train" and epoch and (str(update.get("message", "")).endswith("done")
                                             or (losses[1] is not None and losses[1] != self._epoch_start[1])):
            self._record_epoch(update)
        now = time.monotonic()
        if now - self._gpu_checked > 2.0:
            self._gpu_checked = now
            state["gpu"] = gpu.stats_for_device(update.get("device") or self.ctx.device)
        if changed and stage:
            self.ctx.log(_progress_line(update))
        self.ctx.report(state, force=changed or stage == "done")

    def _record_epoch(self, update: dict) -> None:
        point = {k: update.get(k) for k in ("epoch", "train_loss", "valid_loss", "train_acc", "valid_acc",
                                            "images_per_s", "data_wait_fraction")}
        history = self.state["history"]
        if history and history[-1]["epoch"] == point["epoch"]:
            history[-1] = point
        else:
            history.append(point)
            self.ctx.log(_progress_line(update, losses=True))


def _progress_line(update: dict, losses: bool = False) -> str:
    parts = [f"{update.get('stage')}"]
    if update.get("epoch"):
        parts.append(f"epoch {update['epoch']}/{update.get('epochs')}")
    if losses:
        for key in ("train_loss", "valid_loss", "train_acc", "valid_acc", "images_per_s", "data_wait_fraction"):
            if isinstance(update.get(key), (int, float)):
                parts.append(f"{key} {update[key]:.4g}")
    if update.get("message"):
        parts.append(str(update["message"]))
    return " · ".join(parts)


def check_dataset(params: dict) -> None:
    """A dataset deleted or moved after the job was queued gets a clear message, not a traceback."""
    data = params.get("data")
    if not data:
        raise jobs.JobError("the job names no dataset (params['data'] is empty)")
    if not Path(data).exists():
        raise jobs.JobError(f"The dataset {data} is gone: it was deleted or moved after the job was queued. "
                            "Choose a dataset in the sidebar and launch again.")


def run_training(ctx: JobContext) -> None:
    from core import training

    from core.dataset import load_dataset

    job = ctx.job
    check_dataset(job.params)
    params = dict(job.params)
    facts = jobs.describe_dataset(load_dataset(params["data"]))
    if facts["dataset_version"] != params.get("dataset_version"):
        # Labels, class range or split changed since the job was queued: the run records what it really used.
        ctx.log(f"the dataset changed since this job was queued (version {params.get('dataset_version')} → "
                f"{facts['dataset_version']}); training on the current version")
        params.update(facts, queued_dataset_version=params.get("dataset_version"))
    train_config = jobs.make_train_config(params, job.run_dir, ctx.device)
    progress = TrainingProgress(ctx)
    started = time.time()
    metrics = training.train(train_config, on_progress=progress, should_stop=ctx.should_stop)
    device = progress.state.get("device") or ctx.device
    # The run records the input it really used (a job may leave it to the mode's default), for later estimates.
    params.update(image_size=train_config.input_height, aspect=train_config.input_aspect)
    jobs.register_run(job.run_dir, job.id, params, metrics=jobs.read_run_metrics(job.run_dir) or metrics, extra={
        "speeds": progress.state["speeds"], "device": device, "on_gpu": str(device).startswith("cuda"),
        "duration_s": time.time() - started, "history": progress.state["history"],
    })


def run_sleep(ctx: JobContext) -> None:
    """Waits `seconds`, reporting progress: checks the queue, the worker and the page without training."""
    seconds = float(ctx.job.params.get("seconds", 5))
    steps = max(1, int(seconds / 0.2))
    for step in range(steps):
        if ctx.should_stop():
            raise JobCancelled()
        time.sleep(seconds / steps)
        ctx.report({"stage": "sleep", "fraction": (step + 1) / steps, "device": ctx.device,
                    "message": f"step {step + 1}/{steps}", "eta_s": seconds * (1 - (step + 1) / steps)})
    ctx.report({"stage": "done", "fraction": 1.0, "device": ctx.device}, force=True)


def _run_search(ctx: JobContext) -> None:
    from core import hpo

    hpo.run_search(ctx)


RUNNERS = {"train": run_training, "hpo": _run_search, "sleep": run_sleep}


def describe_error(exc: BaseException) -> str:
    """One readable sentence for the page; the traceback goes to the log."""
    name = type(exc).__name__
    if "OutOfMemory" in name or isinstance(exc, MemoryError):
        return f"Out of memory ({name}): lower the batch size or the image size and launch again."
    if name in ("JobError", "TrainingError", "DatasetError", "LabelError", "ImageError", "ValueError", "FileNotFoundError",
                "NotADirectoryError", "ModelError", "WeightsError"):
        return str(exc) or name
    return f"{name}: {exc}"


def run_job(job: jobs.Job, device: str, worker: "Worker | None" = None) -> str:
    """Run one claimed job to its end and record the outcome; returns the final status."""
    ctx = JobContext(job, device, worker)
    ctx.log(f"job {job.id} ({job.kind}) started on {device}, pid {os.getpid()}; params {job.params}")
    status, error = "done", None
    try:
        RUNNERS[job.kind](ctx)
    except Exception as exc:
        cancelled_by_flag = type(exc).__name__ in ("Cancelled", "JobCancelled") or ctx.stop_reason is not None
        if cancelled_by_flag and ctx.stop_reason == "cancelled":
            status, error = "cancelled", "cancelled while running"
        elif cancelled_by_flag and ctx.stop_reason == "terminated":
            status, error = "failed", "The worker was stopped (SIGTERM) while this job ran; launch it again."
        else:
            status, error = "failed", describe_error(exc)
            ctx.log("".join(traceback.format_exception(exc)).rstrip())
    jobs.finish(job.id, status, error)
    ctx.log(f"job {job.id} {status}" + (f": {error}" if error else ""))
    return status


class Worker:
    """Runs the queued jobs its slot accepts, one at a time, heartbeating; exits after `idle_exit_s` without work."""

    def __init__(self, slot: str = "cpu", accepts: list[str] | None = None, idle_exit_s: float = IDLE_EXIT_S,
                 redirect_output: bool = False):
        self.slot = slot
        self.accepts = accepts or jobs.slot_accepts(slot, gpu.training_slots())
        self.idle_exit_s = idle_exit_s
        self.redirect_output = redirect_output
        self.id = f"{jobs.hostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lock = SlotLock(slot)
        self.terminating = False
        self.current_job: int | None = None
        self._stop_heartbeat = threading.Event()

    def run(self) -> int:
        """0 after an idle exit or SIGTERM; 3 when another worker already owns the slot."""
        if not self.lock.acquire(wait_s=LOCK_WAIT_S):
            print(f"another worker already runs jobs on {self.slot}", flush=True)
            return 3
        jobs.register_worker(self.id, self.slot, os.getpid())
        self._fail_orphans()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)
        beat = threading.Thread(target=self._heartbeat, daemon=True)
        beat.start()
        print(f"worker {self.id} on {self.slot} (accepts {', '.join(self.accepts)})", flush=True)
        try:
            idle_since = time.monotonic()
            while not self.terminating:
                job = jobs.claim_next(self.slot, self.accepts, self.id, os.getpid())
                if job is not None:
                    self._run(job)
                    idle_since = time.monotonic()
                    continue
                if time.monotonic() - idle_since >= self.idle_exit_s and \
                        jobs.retire_worker_if_idle(self.id, self.accepts, self.lock.release):
                    break
                time.sleep(POLL_S)
        finally:
            self._stop_heartbeat.set()
            jobs.unregister_worker(self.id)
            self.lock.release()
        return 0

    def _fail_orphans(self) -> None:
        """Jobs left 'running' on this slot by a worker that died: we own the slot now, so theirs is gone."""
        for job in jobs.list_jobs(["running"]):
            if job.slot == self.slot and job.host == jobs.hostname() and job.worker != self.id:
                message = (f"The worker process running this job (pid {job.pid}) stopped unexpectedly "
                           "(killed or crashed); launch the job again.")
                if jobs.finish(job.id, "failed", message):
                    _append_log(job.log_path, "job failed: " + message)

    def _run(self, job: jobs.Job) -> None:
        self.current_job = job.id
        print(f"job {job.id} ({job.kind}) started", flush=True)
        saved = self._redirect(job.log_path) if self.redirect_output else None
        try:
            status = run_job(job, self.slot, self)
        finally:
            if saved:
                self._restore(saved)
            self.current_job = None
        print(f"job {job.id} {status}", flush=True)

    @staticmethod
    def _redirect(log_path: str) -> tuple[int, int]:
        """Send this process's stdout/stderr (prints, warnings, library output) to the job's log while it runs."""
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        return saved

    @staticmethod
    def _restore(saved: tuple[int, int]) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        os.close(saved[0])
        os.close(saved[1])

    def _heartbeat(self) -> None:
        while not self._stop_heartbeat.wait(HEARTBEAT_S):
            try:
                jobs.worker_heartbeat(self.id, self.current_job)
            except Exception as exc:  # a locked or briefly unavailable database must not end the worker
                print(f"heartbeat failed: {exc}", file=sys.__stderr__, flush=True)

    def _on_sigterm(self, signum, frame) -> None:
        self.terminating = True
