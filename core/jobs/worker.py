"""The job worker: its own OS process per slot (a GPU, or the CPU) running queued jobs one at a time, and the reaper
that requeues (or, out of retries, fails) a job as soon as the process running it is gone."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import psutil
from filelock import FileLock, Timeout

from core import config, gpu
from core.jobs import queue as jobs
from core.jobs.context import append_log
from core.jobs.runners import run_job

ROOT = Path(__file__).resolve().parents[2]
HEARTBEAT_S = 1.0
POLL_S = 0.5
IDLE_EXIT_S = 600.0
LOCK_WAIT_S = 5.0
GPU_SLOT_WAIT_S = IDLE_EXIT_S + 60.0  # a multi-GPU job waits this long for the other GPUs' idle workers to exit
STALE_S = 30.0  # a job on another host counts as dead when its heartbeat is older than this


# --- slot locks: held by the worker process for its whole life; the OS drops them when it dies ---------------------

def _lock_path(slot: str) -> Path:
    folder = config.home() / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{slot.replace(':', '-')}.lock"


class SlotLock:
    """An OS file lock (flock) on the slot's lock file: never a lock file that outlives a killed process."""

    def __init__(self, slot: str):
        self.slot = slot
        # One lock per process, whichever thread releases it; never the "soft" lock file a dead process leaves held.
        self.lock = FileLock(_lock_path(slot), thread_local=False, fallback_to_soft=False)

    def acquire(self, wait_s: float = 0.0) -> bool:
        try:
            self.lock.acquire(timeout=wait_s, poll_interval=0.1)
        except Timeout:
            return False
        return True

    def release(self) -> None:
        if self.lock.is_locked:
            self.lock.release(force=True)


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
        return psutil.Process(pid).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def _where(job: jobs.Job) -> str:
    """How far the job got, from its last progress: 'during epoch 3', 'during features', 'before it reported'."""
    stage, epoch = job.progress.get("stage"), job.progress.get("epoch")
    if stage == "train" and epoch:
        return f"during epoch {epoch}"
    return f"during {stage}" if stage else "before it reported any progress"


def _checkpoint_epoch(job: jobs.Job) -> int | None:
    """The epoch of the run's last checkpoint (the last epoch the job recorded as finished), or None without one."""
    if job.kind != "train" or not job.run_dir or not (Path(job.run_dir) / "checkpoint.pt").is_file():
        return None
    finished = [point.get("epoch") for point in job.progress.get("history") or [] if point.get("epoch")]
    return max(finished) if finished else None


def stop_orphans(worker_pid: int | None, wait_s: float = 5.0) -> None:
    """Stop what a dead worker left running: its process group (a worker starts its own session, so the group's id
    is its pid), such as a training's DataLoader workers, which outlive it for seconds and hold its slot meanwhile."""
    if not worker_pid:
        return
    try:
        os.killpg(worker_pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:  # the slot frees once the last of them is gone
        try:
            os.killpg(worker_pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


def handle_dead_job(job: jobs.Job) -> str | None:
    """The worker running `job` is gone: requeue it when it has retries left (a training then resumes from its last
    checkpoint), else fail it with the reason. Logs what happened; returns "requeued", "failed" or None (already
    handled by someone else)."""
    where = _where(job)
    if job.host == jobs.hostname():
        stop_orphans(job.pid)
    allowed = job.retries_allowed
    failure = (f"The worker process running this job (pid {job.pid}) stopped unexpectedly {where}: it was killed "
               "(for example SIGKILL, or out of memory) or crashed")
    if allowed and job.attempts > 1:
        failure += f", and it had already been requeued {job.attempts - 1} time(s) (BINSIGHT_JOB_RETRIES={allowed})"
    failure += ". The log shows how far it got; launch the job again."
    outcome = jobs.requeue_or_fail(job, failure)
    if outcome == "requeued":
        epoch = _checkpoint_epoch(job)
        resume = (f"resuming from the checkpoint of epoch {epoch}" if epoch
                  else "starting over (no checkpoint yet)" if job.kind == "train" else "starting over")
        append_log(job.log_path, f"worker died {where} (pid {job.pid}); requeued "
                                 f"(retry {job.attempts} of {allowed}), {resume}")
    elif outcome == "failed":
        append_log(job.log_path, "job failed: " + failure)
    return outcome


def reap_dead_jobs() -> list[int]:
    """Requeue or fail every running job whose worker process is gone; returns their ids."""
    reaped = []
    here = jobs.hostname()
    for job in jobs.list_jobs(["running"]):
        if job.host == here:
            dead = not pid_alive(job.pid) or not (job.slot and slot_is_held(job.slot))
        else:
            dead = job.heartbeat is None or time.time() - job.heartbeat > STALE_S
        if dead and handle_dead_job(job):
            reaped.append(job.id)
    for row in jobs.list_workers():
        if row["host"] == here and not pid_alive(row["pid"]):
            jobs.unregister_worker(row["id"])
    return reaped


def jobs_view(statuses=None, kind: str | None = None, limit: int = 100, start_workers: bool = True) -> list[jobs.Job]:
    """The job list as a person should see it: dead workers' jobs requeued or failed first (and, when one was
    requeued, a worker started for it), then `queue.list_jobs`."""
    reaped = reap_dead_jobs()
    if start_workers and reaped and jobs.list_jobs(["queued"], limit=1):
        ensure_workers()
    return jobs.list_jobs(statuses, kind=kind, limit=limit)


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


def launch(kind: str, params: dict, user: str | None = None) -> jobs.Job:
    """Queue a job and make sure a worker will run it: what a page's Launch button does."""
    job = jobs.submit(kind, params, user=user)
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
                handle_dead_job(job)

    def _run(self, job: jobs.Job) -> None:
        self.current_job = job.id
        print(f"job {job.id} ({job.kind}) started", flush=True)
        saved = self._redirect(job.log_path) if self.redirect_output else None
        extra = self._take_gpu_slots(job)
        try:
            status = run_job(job, self.slot, self) if extra is not None else "failed"
        finally:
            for lock in extra or []:
                lock.release()
            os.environ.pop("CUDA_VISIBLE_DEVICES", None) if extra else None
            if saved:
                self._restore(saved)
            self.current_job = None
        print(f"job {job.id} {status}", flush=True)

    def _take_gpu_slots(self, job: jobs.Job) -> list[SlotLock] | None:
        """A job of N processes on GPUs holds N GPU slots: this one and N − 1 more, waited for (their idle workers
        exit) up to GPU_SLOT_WAIT_S; its processes see those GPUs only (CUDA_VISIBLE_DEVICES). On the CPU the
        single cpu slot runs all processes. [] when nothing more is needed; None (the job failed) when the GPUs
        cannot be had."""
        processes = int(job.params.get("processes") or 1)
        if processes <= 1 or not self.slot.startswith("cuda"):
            return []
        others = [s for s in gpu.training_slots() if s.startswith("cuda") and s != self.slot]
        taken, deadline = [], time.monotonic() + GPU_SLOT_WAIT_S
        while len(taken) < processes - 1 and time.monotonic() < deadline and len(others) >= processes - 1:
            for slot in others:
                lock = SlotLock(slot)
                if len(taken) < processes - 1 and slot not in [t.slot for t in taken] and lock.acquire():
                    taken.append(lock)
            if len(taken) < processes - 1:
                time.sleep(POLL_S)
        if len(taken) < processes - 1:
            for lock in taken:
                lock.release()
            message = (f"this job asks for {processes} GPU processes; {len(others) + 1} GPUs exist and "
                       f"{len(taken) + 1} were free within {GPU_SLOT_WAIT_S:.0f} s: lower processes or launch it later")
            jobs.finish(job.id, "failed", message)
            append_log(job.log_path, "job failed: " + message)
            return None
        slots = [self.slot] + [lock.slot for lock in taken]
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(slot.split(":")[1] for slot in slots)
        append_log(job.log_path, f"holding GPU slots {', '.join(slots)} for {processes} processes")
        return taken

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
