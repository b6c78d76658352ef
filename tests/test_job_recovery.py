"""Jobs that come back after a crash, with real processes: a SIGKILLed worker's training is requeued and resumes
from its last epoch checkpoint; a second death (or a first one with retries 0) fails the job with the reason."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from core.data.layouts.registry import load_dataset
from core.jobs import queue as jobs
from core.jobs import worker
from core.jobs.params import describe_dataset
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 6



def kill_worker_of(job: jobs.Job) -> None:
    os.kill(job.pid, signal.SIGKILL)
    wait_for(lambda: not worker.pid_alive(job.pid), 10, "the worker to be gone")


def running(job_id: int, attempt: int):
    """The job, once a worker runs its `attempt`-th start."""
    job = jobs.get(job_id)
    return job if job.status == "running" and job.attempts == attempt and job.pid else None


def mid_training(job_id: int):
    """The job once it finished an epoch and wrote its checkpoint, and has epochs left to run."""
    job = jobs.get(job_id)
    history = job.progress.get("history") or []
    if job.status == "running" and history and history[-1]["epoch"] < EPOCHS \
            and (Path(job.run_dir) / "checkpoint.pt").is_file():
        return job
    return None


def submit_training(data: Path) -> jobs.Job:
    # simple_cnn at 32 px: a real finetune training whose epochs last long enough to kill the worker mid-training
    facts = describe_dataset(load_dataset(data))
    return jobs.submit("train", {**facts, "backbone": "simple_cnn", "mode": "finetune", "epochs": EPOCHS,
                                 "batch_size": 8, "lr": 0.003, "image_size": 32, "balance": "none", "patience": 0,
                                 "device": "cpu"})


def test_a_killed_training_is_requeued_and_resumes_from_its_checkpoint_to_the_epochs_asked(small_abid):
    job = submit_training(small_abid)
    assert job.retries == 1 and worker.ensure_workers()
    victim = wait_for(lambda: mid_training(job.id), 240, "an epoch and its checkpoint")
    kill_worker_of(victim)

    assert job.id in worker.reap_dead_jobs()
    requeued = jobs.get(job.id)
    assert requeued.status == "queued" and requeued.attempts == 1
    log = requeued.log_tail()
    assert f"worker died during epoch {victim.progress['epoch']}" in log
    assert "requeued (retry 1 of 1), resuming from the checkpoint of epoch" in log

    worker.ensure_workers()
    wait_for(lambda: jobs.get(job.id).status not in jobs.ACTIVE, 240, "the resumed training to finish", every=0.5)
    done = jobs.get(job.id)
    assert done.status == "done", done.error
    assert done.attempts == 2 and done.run_dir == victim.run_dir
    assert "attempt 2: resuming" in done.log_tail(400)
    run_log = (Path(done.run_dir) / "log.txt").read_text()
    assert "resumed after epoch" in run_log
    metrics = json.loads((Path(done.run_dir) / "metrics.json").read_text())
    assert [point["epoch"] for point in metrics["history"]] == list(range(1, EPOCHS + 1))
    assert [point["epoch"] for point in done.progress["history"]][-1] == EPOCHS


def test_a_second_death_fails_the_job_with_the_reason():
    job = jobs.submit("sleep", {"seconds": 120})
    worker.ensure_workers()
    first = wait_for(lambda: running(job.id, 1), 60, "the first start")
    kill_worker_of(first)
    assert worker.jobs_view() and jobs.get(job.id).attempts in (1, 2)  # requeued, and a worker started for it
    second = wait_for(lambda: running(job.id, 2), 60, "the second start")
    assert second.pid != first.pid
    kill_worker_of(second)

    assert job.id in worker.reap_dead_jobs()
    failed = jobs.get(job.id)
    assert failed.status == "failed"
    assert "stopped unexpectedly" in failed.error and "already been requeued 1 time(s)" in failed.error
    log = failed.log_tail()
    assert "requeued (retry 1 of 1), starting over" in log and "job failed: " in log


def test_with_no_retries_the_first_death_fails_the_job(monkeypatch):
    monkeypatch.setenv("BINSIGHT_JOB_RETRIES", "0")
    job = jobs.submit("sleep", {"seconds": 120})
    monkeypatch.delenv("BINSIGHT_JOB_RETRIES")  # the setting is kept with the job
    assert job.retries == 0
    worker.ensure_workers()
    kill_worker_of(wait_for(lambda: running(job.id, 1), 60, "the job to start"))
    assert job.id in worker.reap_dead_jobs()
    failed = jobs.get(job.id)
    assert failed.status == "failed" and "stopped unexpectedly" in failed.error
    assert "requeued" not in failed.log_tail()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_listing_jobs_on_the_command_line_reaps_jobs_whose_worker_is_dead(monkeypatch):
    monkeypatch.setenv("BINSIGHT_JOB_RETRIES", "0")
    doomed = jobs.submit("sleep", {"seconds": 0.2})
    monkeypatch.delenv("BINSIGHT_JOB_RETRIES")
    retried = jobs.submit("sleep", {"seconds": 0.2})
    for job in (doomed, retried):  # claimed by a worker that is already gone
        assert jobs.claim_next("cpu", ["auto"], f"gone-{job.id}", dead_pid()).id == job.id

    listing = subprocess.run([sys.executable, "-m", "core", "jobs"], cwd=ROOT, capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert listing.returncode == 0, listing.stderr
    assert jobs.get(doomed.id).status == "failed"
    assert "stopped unexpectedly before it reported any progress" in listing.stdout
    again = jobs.get(retried.id)
    assert again.status != "failed" and "requeued (retry 1 of 1), starting over" in again.log_tail()
    # the command started a worker for the requeued job, which runs it to the end
    assert wait_for(lambda: jobs.get(retried.id).status == "done", 60, "the requeued job to run", every=0.2)
    assert jobs.get(retried.id).attempts == 2
