"""SageMaker as a training target, offline: the request sent to moto's server, the polled job, the fetched model,
and the container's entry point run as SageMaker would run it, in an /opt/ml-shaped tree."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from core.jobs import queue as jobs
from core.jobs import sagemaker
from core.jobs.runners import run_job
from core.jobs.runs import get_run
from tests.moto_s3 import shared_world

ROOT = Path(__file__).resolve().parents[1]
def model_archive(run_dir: Path) -> bytes:
    """model.tar.gz of a run folder, as SageMaker packs /opt/ml/model (SageMaker's side, played by the test)."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name in sagemaker.RUN_FILES:
            if (run_dir / name).is_file():
                archive.add(run_dir / name, arcname=name)
    return buffer.getvalue()


TRAINING = {"mode": "frozen", "epochs": 1, "image_size": 96, "batch_size": 16, "num_workers": 0}


@pytest.fixture
def aws(tmp_path_factory, monkeypatch):
    """moto's server (S3 and SageMaker) with an output bucket; the app's S3 and SageMaker settings point at it."""
    world = shared_world(tmp_path_factory)
    for name, value in {"BINSIGHT_S3_ENDPOINT_URL": world.url, "BINSIGHT_S3_ACCESS_KEY_ID": "test-user",
                        "BINSIGHT_S3_SECRET_ACCESS_KEY": "test-secret", "BINSIGHT_SAGEMAKER_ENDPOINT_URL": world.url,
                        "AWS_ACCESS_KEY_ID": "test-user", "AWS_SECRET_ACCESS_KEY": "test-secret",
                        "AWS_DEFAULT_REGION": "us-east-1", "BINSIGHT_SAGEMAKER_POLL_S": "0.1"}.items():
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3", endpoint_url=world.url, region_name="us-east-1",
                      aws_access_key_id="test-admin", aws_secret_access_key="test-admin-secret")
    if "sm-output" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket="sm-output")
    return world, s3


def target(world) -> dict:
    return {"image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/binsight:latest",
            "role": "arn:aws:iam::123456789012:role/BinsightTraining", "input_s3": "s3://my-shards/abid",
            "output_s3": "s3://sm-output/jobs", "checkpoint_s3": "s3://sm-output/checkpoints",
            "instance_type": "ml.g5.12xlarge", "instance_count": 2, "endpoint_url": world.url}


def test_the_request_names_image_role_instances_channels_checkpoints_metrics_and_hyperparameters(aws):
    world, _ = aws
    request = sagemaker.training_job_request("binsight-test-request", {**TRAINING, "data": "/x", "device": "auto"},
                                             sagemaker.SageMakerTarget.from_params(target(world)))
    client = sagemaker.client(sagemaker.SageMakerTarget.from_params(target(world)))
    sagemaker.create(client, request)
    seen = client.describe_training_job(TrainingJobName="binsight-test-request")
    assert seen["AlgorithmSpecification"]["TrainingImage"] == target(world)["image"]
    assert seen["RoleArn"] == target(world)["role"]
    assert seen["ResourceConfig"]["InstanceType"] == "ml.g5.12xlarge" and seen["ResourceConfig"]["InstanceCount"] == 2
    channel = seen["InputDataConfig"][0]
    assert channel["ChannelName"] == "training" and channel["DataSource"]["S3DataSource"]["S3Uri"] == "s3://my-shards/abid"
    assert seen["CheckpointConfig"]["S3Uri"] == "s3://sm-output/checkpoints"
    # (moto does not keep metric definitions: they are checked on the request, and against real log lines below)
    assert {m["Name"] for m in request["AlgorithmSpecification"]["MetricDefinitions"]} >= {"valid:loss", "train:loss"}
    # hyperparameters are the training's settings, JSON-encoded; where the data is and the device are not
    assert {k: json.loads(v) for k, v in seen["HyperParameters"].items()} == TRAINING


def test_metric_definitions_match_what_training_prints():
    import re

    line = "epoch 3/6  train loss 1.2345 acc 0.456  valid loss 1.3456 acc 0.432  7.8 img/s"
    found = {m["Name"]: re.search(m["Regex"], line) for m in sagemaker.METRIC_DEFINITIONS}
    assert float(found["train:loss"].group(1)) == 1.2345 and float(found["valid:loss"].group(1)) == 1.3456
    assert float(found["valid:accuracy"].group(1)) == 0.432 and float(found["train:images_per_s"].group(1)) == 7.8


def test_a_missing_setting_is_a_clear_error():
    with pytest.raises(sagemaker.SageMakerError, match="role"):
        sagemaker.SageMakerTarget.from_params({"image": "x", "input_s3": "s3://a/b", "output_s3": "s3://a/c"})
    with pytest.raises(sagemaker.SageMakerError, match="s3://"):
        sagemaker.SageMakerTarget.from_params({"image": "x", "role": "r", "input_s3": "/local", "output_s3": "s3://a/c"})


def test_a_sagemaker_job_is_polled_into_the_job_table_and_its_model_registered(aws, small_runs):
    world, s3 = aws
    params = {**TRAINING, "data": str(small_runs["data"]), "sagemaker": target(world), "device": "remote",
              "sagemaker_job": "binsight-test-polled"}
    job = jobs.submit("sagemaker", params)
    assert job.device == "remote" and jobs.slot_accepts("remote", ["cpu", "remote"]) == ["remote"]
    # SageMaker's container would upload the model here; moto completes jobs at once without running them.
    archive = model_archive(small_runs["runs"]["baseline"])
    s3.put_object(Bucket="sm-output", Key="jobs/binsight-test-polled/output/model.tar.gz", Body=archive)
    claimed = jobs.claim_next("remote", ["remote"], "test-worker", os.getpid())
    assert run_job(claimed, "remote") == "done", jobs.get(job.id).error
    done = jobs.get(job.id)
    assert done.progress["status"] == "Completed" and done.progress["sagemaker_job"] == "binsight-test-polled"
    run = get_run(Path(done.run_dir).name)
    assert run.exists and run.extra["sagemaker_job"] == "binsight-test-polled"
    original = small_runs["runs"]["baseline"] / "model.pt"
    assert run.model_path.read_bytes() == original.read_bytes()
    assert "registered as run" in done.log_tail()


def test_a_job_without_a_model_artefact_fails_with_the_reason(aws, small_runs):
    world, _ = aws
    job = jobs.submit("sagemaker", {**TRAINING, "data": str(small_runs["data"]), "sagemaker": target(world),
                                    "device": "remote", "sagemaker_job": "binsight-test-no-model"})
    claimed = jobs.claim_next("remote", ["remote"], "test-worker", os.getpid())
    assert run_job(claimed, "remote") == "failed"
    assert "model artefact" in jobs.get(job.id).error and "not in the bucket" in jobs.get(job.id).error


def test_submit_train_target_sagemaker_queues_a_remote_job(aws, small_runs, capsys):
    from core.cli import main

    world, _ = aws
    t = target(world)
    code = main(["submit", "train", "--data", str(small_runs["data"]), "--mode", "frozen", "--epochs", "1",
                 "--target", "sagemaker", "--sagemaker-image", t["image"], "--sagemaker-role", t["role"],
                 "--sagemaker-input", t["input_s3"], "--sagemaker-output", t["output_s3"], "--no-start"])
    assert code == 0
    job = jobs.list_jobs(limit=1)[0]
    assert job.kind == "sagemaker" and job.device == "remote" and job.params["sagemaker"]["role"] == t["role"]
    assert main(["submit", "train", "--data", str(small_runs["data"]), "--target", "sagemaker", "--no-start"]) == 2
    assert "needs image, role" in capsys.readouterr().err


def test_the_container_entry_point_trains_as_sagemaker_runs_it(small_abid, tmp_path):
    """The container contract: SM_* variables and an /opt/ml-shaped tree; the run lands in SM_MODEL_DIR."""
    opt = tmp_path / "opt" / "ml"
    (opt / "input" / "config").mkdir(parents=True)
    (opt / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({k: json.dumps(v) for k, v in TRAINING.items()}))
    env = {**os.environ, "SM_CHANNEL_TRAINING": str(small_abid), "SM_MODEL_DIR": str(opt / "model"),
           "SM_INPUT_CONFIG_DIR": str(opt / "input" / "config"), "BINSIGHT_CHECKPOINT_DIR": str(opt / "checkpoints"),
           "SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1", "SM_NUM_GPUS": "0",
           "BINSIGHT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}
    env.pop("SM_HPS", None)
    done = subprocess.run([sys.executable, "-m", "core", "container-train"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "container-train: python -m core train --data" in done.stdout
    assert {"model.pt", "metrics.json", "config.json", "log.txt"} <= {p.name for p in (opt / "model").iterdir()}
    config = json.loads((opt / "model" / "config.json").read_text())
    assert config["epochs"] == 1 and config["image_size"] == 96 and config["mode"] == "frozen"
    assert (opt / "checkpoints" / "checkpoint.pt").is_file()  # SageMaker syncs this folder to CheckpointConfig


def test_the_container_plan_reads_hosts_gpus_and_resumes():
    from core.cli.container import container_plan, train_argv

    env = {"SM_HPS": json.dumps({"epochs": "3", "augment": "false", "data": '"s3://my-shards/abid"'}),
           "SM_HOSTS": '["algo-1", "algo-2"]', "SM_CURRENT_HOST": "algo-2", "SM_NUM_GPUS": "4",
           "SM_MODEL_DIR": "/tmp/none/model", "BINSIGHT_CHECKPOINT_DIR": "/tmp/none/checkpoints"}
    plan = container_plan(env)
    assert plan["data"] == "s3://my-shards/abid" and plan["node_rank"] == 1 and plan["processes"] == 4
    assert plan["rdzv"] == "algo-1:29400"
    two_nodes = train_argv(plan)
    assert two_nodes[two_nodes.index("--processes") + 1] == "4" and two_nodes[two_nodes.index("--nnodes") + 1] == "2"
    assert two_nodes[two_nodes.index("--rendezvous") + 1] == "algo-1:29400"
    plan["hosts"] = ["algo-1"]
    plan["processes"] = 1
    argv = train_argv(plan)
    assert argv[:5] == ["train", "--data", "s3://my-shards/abid", "--out", "/tmp/none/checkpoints"]
    assert "--epochs" in argv and argv[argv.index("--epochs") + 1] == "3" and "--no-augment" in argv
    assert "--resume" not in argv


def test_the_train_page_launches_a_sagemaker_job(small_abid, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from core.jobs import worker

    monkeypatch.setenv("BINSIGHT_DATA", str(small_abid))
    monkeypatch.setattr(worker, "ensure_workers", lambda *a, **k: [])  # queued only: nothing to run it here
    at = AppTest.from_file(str(ROOT / "app_pages" / "train.py"), default_timeout=120).run()
    at.radio(key="train_target").set_value("SageMaker").run()
    assert at.button(key="train_launch").disabled and any("needs image, role" in i.value for i in at.info)
    for key, value in {"sm_image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/binsight:latest",
                       "sm_role": "arn:aws:iam::123456789012:role/BinsightTraining",
                       "sm_input": "s3://my-shards/abid", "sm_output": "s3://sm-output/jobs"}.items():
        at.text_input(key=key).set_value(value).run()
    at.button(key="train_launch").click().run()
    assert not at.exception
    job = jobs.list_jobs(limit=1)[0]
    assert job.kind == "sagemaker" and job.device == "remote" and job.status == "queued"
    assert job.params["sagemaker"]["input_s3"] == "s3://my-shards/abid" and job.params["mode"] == "frozen"


def test_the_container_trains_on_two_processes_from_shards_on_the_local_s3_server(aws, small_abid, tmp_path):
    """As SageMaker would run it with torch_distributed: torchrun, 2 processes, the shard channel read from S3."""
    from core.data.layouts.registry import load_dataset
    from core.data.remote.shards import pack_shards

    world, s3 = aws
    if "my-shards" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket="my-shards")
    data = f"s3://my-shards/container-{tmp_path.name}"
    pack_shards(load_dataset(small_abid), data, shard_size="2MB")
    opt = tmp_path / "opt" / "ml"
    hps = {"data": data, "processes": 2, "mode": "finetune", "backbone": "simple_cnn", "image_size": 64,
           "epochs": 1, "batch_size": 8, "num_workers": 0}
    env = {**os.environ, "SM_HPS": json.dumps({k: json.dumps(v) for k, v in hps.items()}),
           "SM_MODEL_DIR": str(opt / "model"), "BINSIGHT_CHECKPOINT_DIR": str(opt / "checkpoints"),
           "SM_HOSTS": '["algo-1"]', "SM_CURRENT_HOST": "algo-1", "SM_NUM_GPUS": "0",
           "BINSIGHT_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "core", "container-train"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-1500:], done.stderr[-1500:])
    assert "--processes 2" in done.stdout
    config = json.loads((opt / "model" / "config.json").read_text())
    assert config["world_size"] == 2 and config["dataset"].startswith("s3://my-shards/")
    assert (opt / "model" / "model.pt").is_file()
