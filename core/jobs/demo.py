"""A model that is alive at first start: on the embedded demo set, a small one trains in the background once."""
from __future__ import annotations

import os

from core import config
from core.jobs import queue as jobs
from core.jobs import worker
from core.jobs.params import describe_dataset, training_problems
from core.jobs.runs import list_runs

# A frozen EfficientNet-Lite0 on small photos: about a minute on two CPU cores for the demo's photos.
DEMO_TRAINING = {"backbone": "efficientnet_lite0", "mode": "frozen", "image_size": 128, "epochs": 20,
                 "balance": "weights", "device": "auto"}
DEMO_USER = "binsight (demo model)"
SETTING = "demo_model_job"
# BINSIGHT_DEMO_MODEL=0 keeps a first start on the demo set from training anything (tests, a shared server).
ENV = "BINSIGHT_DEMO_MODEL"


def wanted() -> bool:
    """Whether a first start should train the demo model: on the demo set, unless switched off."""
    return os.environ.get(ENV, "1") != "0" and config.data_dir() is None


def start_demo_training(dataset) -> jobs.Job | None:
    """Queue the demo model's training when this is a first start on the demo set (no run, no training job, never
    started before); the job, or None when there is nothing to do."""
    if not wanted() or config.load_settings().get(SETTING) is not None or list_runs() \
            or jobs.list_jobs(kind="train", limit=1):
        return None
    facts = describe_dataset(dataset)
    params = {**facts, **DEMO_TRAINING, "batch_size": max(1, min(32, facts["n_train"]))}
    if facts["n_train"] == 0 or training_problems(params, facts["n_train"], cuda_available=False):
        return None
    config.save_settings(**{SETTING: -1})  # claimed before the job exists: a second session does not queue another
    job = worker.launch("train", params, user=DEMO_USER)
    config.save_settings(**{SETTING: job.id})
    return job


def demo_training() -> jobs.Job | None:
    """The demo model's training job while it is queued or running, else None."""
    job_id = config.load_settings().get(SETTING)
    if not isinstance(job_id, int) or job_id < 0:
        return None
    try:
        job = jobs.get(job_id)
    except jobs.JobError:
        return None
    return job if job.active else None
