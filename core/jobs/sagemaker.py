"""SageMaker as a place to train: the CreateTrainingJob request, its status and metrics polled into a job, its model fetched."""
from __future__ import annotations

import json
import os
import re
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.data.remote.s3 import S3Source, s3_settings
from core.errors import BinsightError
from core.files import atomic_write_bytes

TERMINAL = ("Completed", "Failed", "Stopped")
ENV_VARS = {"image": "BINSIGHT_SAGEMAKER_IMAGE", "role": "BINSIGHT_SAGEMAKER_ROLE",
            "endpoint_url": "BINSIGHT_SAGEMAKER_ENDPOINT_URL", "region": "BINSIGHT_SAGEMAKER_REGION"}
# What the entry point prints (core/training/epochs.py epoch lines, core/evaluation/metrics.py format_table),
# read back by SageMaker into the job's metrics.
METRIC_DEFINITIONS = [
    {"Name": "train:loss", "Regex": r"train loss ([0-9.]+)"},
    {"Name": "valid:loss", "Regex": r"valid loss ([0-9.]+)"},
    {"Name": "valid:accuracy", "Regex": r"valid loss [0-9.]+ acc ([0-9.]+)"},
    {"Name": "train:images_per_s", "Regex": r"([0-9.]+) img/s"},
    {"Name": "test:balanced_accuracy", "Regex": r"balanced accuracy ([0-9.]+)%"},
]
RUN_FILES = ("model.pt", "metrics.json", "config.json", "log.txt")
NOT_HYPERPARAMETERS = ("data", "out", "device", "resume", "dataset_key", "dataset_version", "n_train", "n_valid",
                       "n_test", "classes", "target", "sagemaker")


class SageMakerError(BinsightError):
    """A training job SageMaker refused, failed or could not be reached for; the message says what to check."""


@dataclass(frozen=True)
class SageMakerTarget:
    """Where and how a training job runs on SageMaker; the image holds this project (entry: python -m core container-train)."""

    image: str
    role: str
    input_s3: str                      # the training channel: a shard set (python -m core shards --out s3://…)
    output_s3: str                     # SageMaker writes <output>/<job>/output/model.tar.gz here
    checkpoint_s3: str | None = None   # epoch checkpoints, so a restarted job resumes
    instance_type: str = "ml.g5.xlarge"
    instance_count: int = 1
    volume_gb: int = 50
    max_runtime_s: int = 24 * 3600
    region: str = "us-east-1"
    endpoint_url: str | None = None    # another SageMaker-compatible API (tests use a local moto server)
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_params(cls, values: dict) -> "SageMakerTarget":
        """From job params (a dict of the fields) completed by the BINSIGHT_SAGEMAKER_* variables."""
        chosen = {k: v for k, v in (values or {}).items() if v not in (None, "")}
        for name, variable in ENV_VARS.items():
            if name not in chosen and os.environ.get(variable):
                chosen[name] = os.environ[variable]
        missing = [n for n in ("image", "role", "input_s3", "output_s3") if not chosen.get(n)]
        if missing:
            raise SageMakerError("a SageMaker training needs " + ", ".join(missing) + " (options --sagemaker-image, "
                                 "--sagemaker-role, --sagemaker-input, --sagemaker-output, or BINSIGHT_SAGEMAKER_*)")
        for name in ("input_s3", "output_s3", "checkpoint_s3"):
            if chosen.get(name) and not str(chosen[name]).startswith("s3://"):
                raise SageMakerError(f"{name} must be an s3:// URI, not {chosen[name]!r}")
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in chosen.items() if k in known})

    def to_params(self) -> dict:
        return asdict(self)


def job_name(job_id: int) -> str:
    """A SageMaker training job name: unique, at most 63 letters, digits and dashes."""
    return f"binsight-job{job_id}-{time.strftime('%Y%m%d-%H%M%S')}"[:63]


def hyperparameters(params: dict) -> dict[str, str]:
    """The training parameters as SageMaker hyperparameters (strings; JSON-encoded values)."""
    return {key: json.dumps(value) for key, value in sorted(params.items())
            if key not in NOT_HYPERPARAMETERS and value is not None}


def training_job_request(name: str, params: dict, target: SageMakerTarget) -> dict:
    """The CreateTrainingJob arguments for this training on this target (torchrun across the instances' GPUs)."""
    request = {
        "TrainingJobName": name,
        "AlgorithmSpecification": {"TrainingImage": target.image, "TrainingInputMode": "FastFile",
                                   "MetricDefinitions": METRIC_DEFINITIONS},
        "RoleArn": target.role,
        "InputDataConfig": [{"ChannelName": "training", "DataSource": {"S3DataSource": {
            "S3DataType": "S3Prefix", "S3Uri": target.input_s3, "S3DataDistributionType": "FullyReplicated"}}}],
        "OutputDataConfig": {"S3OutputPath": target.output_s3},
        "ResourceConfig": {"InstanceType": target.instance_type, "InstanceCount": int(target.instance_count),
                           "VolumeSizeInGB": int(target.volume_gb)},
        "StoppingCondition": {"MaxRuntimeInSeconds": int(target.max_runtime_s)},
        "HyperParameters": hyperparameters(params),
        # The image's entry point reads these and launches torchrun over every GPU of every instance.
        "Environment": {"BINSIGHT_DISTRIBUTION": "torchrun"},
    }
    if target.checkpoint_s3:
        request["CheckpointConfig"] = {"S3Uri": target.checkpoint_s3, "LocalPath": "/opt/ml/checkpoints"}
    return request


def client(target: SageMakerTarget):
    import boto3

    return boto3.client("sagemaker", region_name=target.region, endpoint_url=target.endpoint_url)


def _explain(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    error = response.get("Error", {})
    return f"{error.get('Code') or type(exc).__name__}: {error.get('Message') or exc}"


def create(sagemaker, request: dict) -> str:
    try:
        return sagemaker.create_training_job(**request)["TrainingJobArn"]
    except Exception as exc:  # botocore's errors: refused request, no credentials, endpoint unreachable
        raise SageMakerError(f"SageMaker refused the training job: {_explain(exc)}") from None


def describe(sagemaker, name: str) -> dict:
    try:
        return sagemaker.describe_training_job(TrainingJobName=name)
    except Exception as exc:
        raise SageMakerError(f"cannot read the state of SageMaker job {name}: {_explain(exc)}") from None


def stop(sagemaker, name: str) -> str | None:
    """Ask SageMaker to stop the job; None when asked, else why it could not be."""
    try:
        sagemaker.stop_training_job(TrainingJobName=name)
        return None
    except Exception as exc:
        return _explain(exc)


def progress_of(description: dict) -> dict:
    """The job's state as a progress snapshot for the job table (stage, fraction, message, metrics)."""
    status = description.get("TrainingJobStatus", "InProgress")
    secondary = description.get("SecondaryStatus") or status
    metrics = {m["MetricName"]: m["Value"] for m in description.get("FinalMetricDataList") or []}
    fraction = 1.0 if status in TERMINAL else {"Starting": 0.02, "Downloading": 0.05, "Training": 0.5,
                                                "Uploading": 0.95}.get(secondary, 0.1)
    if "train:progress" in metrics and status not in TERMINAL:
        fraction = max(fraction, min(0.99, metrics["train:progress"] / 100))
    return {"stage": "sagemaker", "status": status, "secondary_status": secondary, "fraction": fraction,
            "message": f"SageMaker: {secondary}", "metrics": metrics,
            "valid_loss": metrics.get("valid:loss"), "train_loss": metrics.get("train:loss"),
            "images_per_s": metrics.get("train:images_per_s"), "device": description.get("ResourceConfig", {}).get(
                "InstanceType", "sagemaker")}


def fetch_model(description: dict, run_dir: str | Path, source: S3Source | None = None) -> Path:
    """Download the job's model.tar.gz and put its run files (model.pt, metrics.json, …) into `run_dir`."""
    uri = (description.get("ModelArtifacts") or {}).get("S3ModelArtifacts")
    match = re.match(r"^s3://([^/]+)/(.+)$", uri or "")
    if not match:
        raise SageMakerError(f"the SageMaker job left no model artefact (ModelArtifacts: {uri!r})")
    bucket, key = match.groups()
    source = source or S3Source(s3_settings(bucket=bucket))
    path = source.fetch([key], missing_ok=True).get(key)
    if path is None:
        raise SageMakerError(f"the model artefact {uri} is not in the bucket")
    run_dir = Path(run_dir)
    found = []
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive.getmembers():
                name = Path(member.name).name
                if member.isfile() and name in RUN_FILES:
                    atomic_write_bytes(run_dir / name, archive.extractfile(member).read())
                    found.append(name)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise SageMakerError(f"the model artefact {uri} is not a readable model.tar.gz ({exc})") from None
    if "model.pt" not in found:
        raise SageMakerError(f"the model artefact {uri} holds no model.pt (found: {', '.join(found) or 'nothing'})")
    return run_dir / "model.pt"



def _new_log_lines(logs, name: str, seen: dict) -> list[str]:
    """CloudWatch lines of the job not shown yet (best effort: the job goes on without them)."""
    group, lines = "/aws/sagemaker/TrainingJobs", []
    try:
        streams = logs.describe_log_streams(logGroupName=group, logStreamNamePrefix=name).get("logStreams", [])
        for stream in streams:
            token = seen.get(stream["logStreamName"])
            kwargs = {"logGroupName": group, "logStreamName": stream["logStreamName"], "startFromHead": True}
            if token:
                kwargs["nextToken"] = token
            page = logs.get_log_events(**kwargs)
            lines += [f"[{stream['logStreamName']}] {e['message']}" for e in page.get("events", [])]
            seen[stream["logStreamName"]] = page.get("nextForwardToken")
    except Exception:  # no log group yet, or logs not reachable: only the log copy is missed
        return lines
    return lines


def run_training_job(ctx) -> None:
    """The worker's runner for a 'sagemaker' job (ctx: core.jobs.context.JobContext): create, poll, fetch, register."""
    import boto3

    from core.jobs.runs import register_run

    job = ctx.job
    params = dict(job.params)
    target = SageMakerTarget.from_params(params.get("sagemaker") or {})
    sagemaker = client(target)
    logs = boto3.client("logs", region_name=target.region, endpoint_url=target.endpoint_url)
    name = params.get("sagemaker_job") or job_name(job.id)
    arn = create(sagemaker, training_job_request(name, params, target))
    ctx.log(f"SageMaker training job {name} created ({arn}) on {target.instance_count} × {target.instance_type}")
    poll_s = float(os.environ.get("BINSIGHT_SAGEMAKER_POLL_S", "30"))
    seen: dict = {}
    while True:
        description = describe(sagemaker, name)
        progress = progress_of(description) | {"sagemaker_job": name}
        ctx.report(progress, force=True)
        for line in _new_log_lines(logs, name, seen):
            ctx.log(line)
        if description.get("TrainingJobStatus") in TERMINAL:
            break
        if ctx.should_stop():
            problem = stop(sagemaker, name)
            ctx.log(f"stop asked of SageMaker job {name}" + (f", but it answered: {problem}" if problem else ""))
            from core.errors import Cancelled

            raise Cancelled(f"SageMaker job {name} was asked to stop")
        time.sleep(poll_s)
    status = description["TrainingJobStatus"]
    if status != "Completed":
        raise SageMakerError(f"SageMaker job {name} {status.lower()}: {description.get('FailureReason') or 'no reason given'}")
    Path(job.run_dir).mkdir(parents=True, exist_ok=True)
    fetch_model(description, job.run_dir)
    register_run(job.run_dir, job.id, params, extra={"sagemaker_job": name, "device": progress["device"],
                                                      "on_gpu": str(progress["device"]).startswith("ml.g")})
    ctx.log(f"model of SageMaker job {name} registered as run {Path(job.run_dir).name}")
