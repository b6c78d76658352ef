"""Worker processes sharing one queue: every job runs exactly once, one worker per slot, idle workers exit."""
from __future__ import annotations

import re
import subprocess
import sys

from core.jobs import queue as jobs
from core.jobs import worker
from tests.conftest import ROOT, wait_for

ACCEPTS = ["cpu", "auto"]


def worker_log(slot: str) -> str:
    return (jobs.jobs_dir() / f"worker-{slot.replace(':', '-')}.log").read_text()


def test_two_workers_on_one_queue_run_each_job_once_then_exit_when_idle():
    queued = [jobs.submit("sleep", {"seconds": 0.2}) for _ in range(8)]
    # Two slots taking the same jobs, as two machines sharing one BINSIGHT_HOME would.
    first = worker.start_worker("cpu", ACCEPTS, idle_exit_s=2)
    second = worker.start_worker("cpu-b", ACCEPTS, idle_exit_s=2)
    # Idle for 2 s with nothing queued, each exits by itself (pytest-timeout ends the test if they never do).
    assert first.wait() == 0 and second.wait() == 0

    assert [jobs.get(j.id).status for j in queued] == ["done"] * len(queued)
    started = re.findall(r"job (\d+) \(sleep\) started", worker_log("cpu") + worker_log("cpu-b"))
    assert sorted(map(int, started)) == [j.id for j in queued]  # each claimed once, by one worker
    assert {jobs.get(j.id).worker for j in queued} <= _worker_ids("cpu") | _worker_ids("cpu-b")
    assert jobs.list_workers() == []  # both unregistered themselves
    assert not worker.slot_is_held("cpu") and not worker.slot_is_held("cpu-b")


def _worker_ids(slot: str) -> set[str]:
    return set(re.findall(rf"worker (\S+) on {re.escape(slot)} ", worker_log(slot)))


def test_a_second_worker_for_a_held_slot_is_refused(binsight_home):
    holder = worker.start_worker("cpu", ACCEPTS, idle_exit_s=0)  # 0: never exits when idle
    try:
        jobs.submit("sleep", {"seconds": 0.2})
        # Once the holder has run the job it certainly holds the slot.
        wait_for(lambda: not jobs.list_jobs(["queued", "running"]) or holder.poll() is not None, 120, "the job")
        assert holder.poll() is None and worker.slot_is_held("cpu")
        refused = subprocess.run([sys.executable, "-m", "core", "worker", "--slot", "cpu", "--accepts", "cpu,auto"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and "another worker already runs jobs on cpu" in refused.stderr
        assert holder.poll() is None  # the first one goes on
    finally:
        holder.kill()
        holder.wait()


HOLDER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # like a training's loader workers
print(child.pid, flush=True)
time.sleep(120)
"""


def test_the_reaper_stops_what_a_dead_worker_left_running():
    """A killed worker's children (a training's DataLoader workers) outlive it and would hold its slot: the reaper
    stops the dead worker's process group (a worker is started as a session leader)."""
    import os
    import signal

    holder = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    child = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert worker.pid_alive(child)  # the orphan lives on…
        worker.stop_orphans(holder.pid)
        assert not worker.pid_alive(child)  # …until the reaper stops the dead worker's group
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass
