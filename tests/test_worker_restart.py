"""Restart safety with real processes: the app dies while a job runs, the worker is SIGKILLed, the app restarts
with queued jobs."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.data.layouts.registry import load_dataset
from core.jobs import queue as jobs
from core.jobs import worker
from core.jobs.params import describe_dataset
from core.jobs.runs import current_run, final_metrics, run_name
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "app_pages" / "train.py"

# The app process: queue a job and make sure a worker runs it, as the app does on every page, then wait to be killed.
APP = """
import sys, time
from core.jobs import queue as jobs, worker
job = jobs.submit("sleep", {"seconds": float(sys.argv[1])})
worker.ensure_workers()
time.sleep(600)
"""


def worker_pids() -> set[int]:
    """Worker processes started for this test's BINSIGHT_HOME (never this test process, never anyone else's)."""
    home = f"BINSIGHT_HOME={os.environ['BINSIGHT_HOME']}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environment = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if command[1:4] == [b"-m", b"core", b"worker"] and home in environment:
            found.add(int(entry.name))
    return found


@pytest.fixture(autouse=True)
def data_and_cleanup(small_abid, monkeypatch):
    monkeypatch.setenv("BINSIGHT_DATA", str(small_abid))
    yield
    for pid in worker_pids():
        os.kill(pid, signal.SIGKILL)



def page() -> AppTest:
    return AppTest.from_file(str(PAGE), default_timeout=120).run()


def shown_text(at: AppTest) -> str:
    return "\n".join(str(e.value) for kind in ("markdown", "error", "success", "caption", "code")
                     for e in at.get(kind))


def test_a_job_keeps_running_when_the_app_is_stopped_and_the_restarted_page_shows_it():
    # 60 s: long enough to outlast a loaded machine's slow app exit and restarted page; the test cancels it anyway.
    app = subprocess.Popen([sys.executable, "-c", APP, "60"], cwd=ROOT, start_new_session=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT)
    try:
        job = wait_for(lambda: next((j for j in jobs.list_jobs(["running"]) if j.progress.get("fraction")), None),
                       60, "the job to run")
    finally:
        # Stop the app as a terminal does (Ctrl-C to its process group); if it does not end, for good.
        os.killpg(app.pid, signal.SIGINT)
        try:
            app.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(app.pid, signal.SIGKILL)
            app.wait()
    assert app.returncode is not None and job.pid != app.pid and worker.pid_alive(job.pid)
    later = wait_for(lambda: (j := jobs.get(job.id)).progress["fraction"] > job.progress["fraction"] and j, 30,
                     "the job to go on after the app stopped")
    assert later.status == "running"

    at = page()  # the restarted app
    assert not at.exception
    assert f"Job {job.id}** · sleep · running" in shown_text(at)
    assert len(at.get("progress")) == 1
    at.button(key=f"train_cancel_{job.id}").click().run()  # the detached worker reads the flag
    assert not at.exception and "Cancelling…" in shown_text(at)
    assert wait_for(lambda: jobs.get(job.id).status != "running", 10, "the job to stop", every=0.2)
    assert jobs.get(job.id).status == "cancelled"


def test_a_sigkilled_worker_fails_its_job_within_seconds_with_its_log_and_the_queue_goes_on(monkeypatch):
    monkeypatch.setenv("BINSIGHT_JOB_RETRIES", "0")  # no requeue (tests/test_job_recovery.py covers that)
    victim = jobs.submit("sleep", {"seconds": 60})
    assert worker.ensure_workers()
    running = wait_for(lambda: jobs.get(victim.id).progress.get("fraction") and jobs.get(victim.id), 60,
                       "the job to run")
    follower = jobs.submit("sleep", {"seconds": 0.5})
    os.kill(running.pid, signal.SIGKILL)
    wait_for(lambda: victim.id in worker.reap_dead_jobs(), 10, "the reaper to fail the job within seconds")
    failed = jobs.get(victim.id)
    assert failed.status == "failed" and "stopped unexpectedly" in failed.error
    log = failed.log_tail()
    assert f"job {victim.id} (sleep) started on cpu" in log and "job failed" in log

    at = page()  # shows the error and the log, and starts a new worker for the queued job
    text = shown_text(at)
    assert "**Failed:** The worker process running this job" in text and "started on cpu" in text
    assert wait_for(lambda: jobs.get(follower.id).status == "done", 60, "the next job to run", every=0.5)


def test_jobs_queued_while_the_app_was_down_run_when_it_restarts(small_abid):
    facts = describe_dataset(load_dataset(small_abid))
    job = jobs.submit("train", {**facts, "backbone": "efficientnet_lite0", "mode": "frozen", "epochs": 2,
                                "batch_size": 16, "lr": 0.01, "image_size": 96, "balance": "none"})
    # nothing runs it yet: no worker process for this home, no slot held
    assert worker_pids() == set() and not worker.slot_is_held("cpu") and jobs.get(job.id).status == "queued"

    page()  # the app restarts: its Train page starts a worker
    wait_for(lambda: jobs.get(job.id).status not in jobs.ACTIVE, 150, "the training to finish", every=0.5)
    done = jobs.get(job.id)
    assert done.status == "done", done.error
    assert [p["epoch"] for p in done.progress["history"]] == [1, 2]
    assert done.progress["speeds"]["features"] > 0
    run = current_run()
    assert run is not None and run.job_id == job.id and run.model_path.is_file()
    saved = json.loads((run.model_path.parent / "metrics.json").read_text())["test"]
    assert final_metrics(run)["balanced_accuracy"] == saved["balanced_accuracy"]
    assert final_metrics(run)["confusion_matrix"] == saved["confusion_matrix"]
    assert run.params["dataset_version"] == facts["dataset_version"]

    at = page()
    assert run.id in at.dataframe[0].value["run"].tolist()
    assert f"**{run_name(run)}** is the current model." in shown_text(at)


def test_a_slot_lock_is_dropped_by_the_os_when_its_process_is_killed():
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from core.jobs.worker import SlotLock; lock = SlotLock('cpu'); "
                               "assert lock.acquire(); print('held', flush=True); sys.stdin.read()"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert worker.slot_is_held("cpu") and not worker.SlotLock("cpu").acquire()
        assert worker.pid_alive(holder.pid)
        holder.kill()
        os.waitid(os.P_PID, holder.pid, os.WEXITED | os.WNOWAIT)  # dead, not reaped yet: a zombie
        assert not worker.pid_alive(holder.pid)
        assert not worker.slot_is_held("cpu")
        mine = worker.SlotLock("cpu")
        assert mine.acquire()
        mine.release()
    finally:
        holder.kill()
        holder.wait()
