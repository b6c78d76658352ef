"""What a running job gets: its context (device, progress, cancel check, log) and the progress adapter for training."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from core import gpu
from core.jobs import queue as jobs

PROGRESS_EVERY_S = 0.5
CANCEL_CHECK_S = 0.5


def append_log(path: str | None, text: str) -> None:
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}\n")


class JobContext:
    """What a job runner gets: its job, the device to use, progress reporting, the cancel check and its log.

    `worker` is the Worker running it (anything with a `terminating` flag), or None.
    """

    def __init__(self, job: jobs.Job, device: str, worker=None):
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
        append_log(self.job.log_path, text)


class TrainingProgress:
    """on_progress for core.training.loop.train: keeps per-epoch curves, images/s per stage and GPU use in the job."""

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
    if not str(data).startswith("s3://") and not Path(data).exists():
        raise jobs.JobError(f"The dataset {data} is gone: it was deleted or moved after the job was queued. "
                            "Choose a dataset in the sidebar and launch again.")
