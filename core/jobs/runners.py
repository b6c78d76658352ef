"""Job runners: what each job kind does (train, hpo, sleep), and running one claimed job to its recorded end."""
from __future__ import annotations

import os
import time
import traceback
from pathlib import Path

from core.errors import Cancelled, describe_error
from core.jobs import hpo, sagemaker
from core.jobs import queue as jobs
from core.jobs.context import JobContext, TrainingProgress, check_dataset
from core.jobs.params import describe_dataset
from core.jobs.runs import read_run_metrics, register_run
from core.training.config import TrainConfig


def run_training(ctx: JobContext) -> None:
    # torch is imported only when a job runs, so starting a worker (and the app's first page) stays light
    from core.data.layouts.registry import load_dataset
    from core.training import loop as training

    job = ctx.job
    check_dataset(job.params)
    params = dict(job.params)
    facts = describe_dataset(load_dataset(params["data"]))
    if facts["dataset_version"] != params.get("dataset_version"):
        # Labels, class range or split changed since the job was queued: the run records what it really used.
        ctx.log(f"the dataset changed since this job was queued (version {params.get('dataset_version')} → "
                f"{facts['dataset_version']}); training on the current version")
        params.update(facts, queued_dataset_version=params.get("dataset_version"))
    train_config = TrainConfig.from_params(params, job.run_dir, ctx.device)
    progress = TrainingProgress(ctx)
    if job.attempts > 1 and (Path(job.run_dir) / "checkpoint.pt").is_file():
        # Requeued after its worker died: carry on from the last finished epoch, in the same run folder.
        train_config.resume = True
        progress.state["history"] = list(job.progress.get("history") or [])
        ctx.log(f"attempt {job.attempts}: resuming {job.run_dir} from its checkpoint")
    elif job.attempts > 1:
        ctx.log(f"attempt {job.attempts}: no checkpoint was written before the worker died; starting over")
    started = time.time()
    metrics = training.train(train_config, on_progress=_epochs_saved_at_once(progress, ctx),
                             should_stop=ctx.should_stop)
    device = progress.state.get("device") or ctx.device
    # The run records the input and balance it really used (a job may leave them to the mode's or dataset's default).
    params.update(image_size=train_config.input_height, aspect=train_config.input_aspect,
                  balance=(metrics.get("config") or {}).get("balance", params.get("balance")))
    register_run(job.run_dir, job.id, params, metrics=read_run_metrics(job.run_dir) or metrics, extra={
        "speeds": progress.state["speeds"], "device": device, "on_gpu": str(device).startswith("cuda"),
        "duration_s": time.time() - started, "history": progress.state["history"],
    })


def _epochs_saved_at_once(progress: TrainingProgress, ctx: JobContext):
    """Training progress whose per-epoch history reaches the database as soon as an epoch ends (the epoch's
    checkpoint is written just before), so a reaper that finds the worker dead knows which epoch resumes."""
    def on_progress(update: dict) -> None:
        progress(update)
        if str(update.get("message", "")).endswith("done"):
            ctx.report(progress.state, force=True)
    return on_progress


def run_sleep(ctx: JobContext) -> None:
    """Waits `seconds`, reporting progress: checks the queue, the worker and the page without training."""
    seconds = float(ctx.job.params.get("seconds", 5))
    steps = max(1, int(seconds / 0.2))
    for step in range(steps):
        if ctx.should_stop():
            raise Cancelled("the check was stopped")
        time.sleep(seconds / steps)
        ctx.report({"stage": "sleep", "fraction": (step + 1) / steps, "device": ctx.device,
                    "message": f"step {step + 1}/{steps}", "eta_s": seconds * (1 - (step + 1) / steps)})
    ctx.report({"stage": "done", "fraction": 1.0, "device": ctx.device}, force=True)


def run_shards(ctx: JobContext) -> None:
    """Packs a dataset into WebDataset shards (core.data.remote.shards), reporting each photo; a stopped packing resumes."""
    from core.data.layouts.registry import load_dataset
    from core.data.remote.shards import pack_shards

    params = ctx.job.params
    check_dataset(params)

    def progress(fraction: float, text: str) -> None:
        if ctx.should_stop():
            raise Cancelled("packing stopped: the finished shards are kept and packing again resumes after them")
        ctx.report({"stage": "shards", "fraction": float(fraction), "message": text, "device": ctx.device})

    index = pack_shards(load_dataset(params["data"]), params["dest"], params.get("shard_size") or "200MB",
                        int(params.get("seed") or 0), on_progress=progress)
    summary = f"{sum(s['samples'] for s in index['shards']):,} photos in {len(index['shards'])} shards at {params['dest']}"
    ctx.report({"stage": "done", "fraction": 1.0, "message": summary, "device": ctx.device}, force=True)
    ctx.log(summary)


RUNNERS = {"train": run_training, "hpo": hpo.run_search, "sleep": run_sleep, "sagemaker": sagemaker.run_training_job,
           "shards": run_shards}


def run_job(job: jobs.Job, device: str, worker=None) -> str:
    """Run one claimed job to its end and record the outcome; returns the final status."""
    ctx = JobContext(job, device, worker)
    ctx.log(f"job {job.id} ({job.kind}) started on {device}, pid {os.getpid()}; params {job.params}")
    status, error = "done", None
    try:
        RUNNERS[job.kind](ctx)
    except Exception as exc:
        cancelled_by_flag = isinstance(exc, Cancelled) or ctx.stop_reason is not None
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
