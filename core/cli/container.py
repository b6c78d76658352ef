"""CLI `container-train`: the entry point of a SageMaker training container (its /opt/ml contract, then `train`)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from core.errors import UsageError
from core.jobs.sagemaker import RUN_FILES  # what SageMaker packs from SM_MODEL_DIR


def _decoded(value):
    """SageMaker hands hyperparameters over as strings; Binsight sends each JSON-encoded."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def hyperparameters(env: dict) -> dict:
    """SM_HPS, else /opt/ml/input/config/hyperparameters.json (or under SM_INPUT_CONFIG_DIR)."""
    if env.get("SM_HPS"):
        raw = json.loads(env["SM_HPS"])
    else:
        path = Path(env.get("SM_INPUT_CONFIG_DIR", "/opt/ml/input/config")) / "hyperparameters.json"
        raw = json.loads(path.read_text()) if path.is_file() else {}
    return {key: _decoded(value) for key, value in raw.items()}


def container_plan(env: dict) -> dict:
    """What this container runs, from SageMaker's variables: data, run folder, model folder and the torchrun layout."""
    hps = hyperparameters(env)
    data = hps.pop("data", None) or env.get("SM_CHANNEL_TRAINING")
    if not data:
        raise UsageError("no training data: SageMaker's 'training' channel (SM_CHANNEL_TRAINING) is not set and no "
                         "'data' hyperparameter was given")
    hosts = json.loads(env.get("SM_HOSTS") or '["localhost"]')
    current = env.get("SM_CURRENT_HOST") or hosts[0]
    gpus = int(env.get("SM_NUM_GPUS") or 0)
    processes = int(hps.pop("processes", 0) or 0) or max(1, gpus)
    return {"data": data, "hyperparameters": hps,
            "model_dir": Path(env.get("SM_MODEL_DIR", "/opt/ml/model")),
            "run_dir": Path(env.get("BINSIGHT_CHECKPOINT_DIR", "/opt/ml/checkpoints")),  # synced with CheckpointConfig
            "hosts": hosts, "node_rank": hosts.index(current), "processes": processes,
            "rdzv": f"{hosts[0]}:{env.get('BINSIGHT_RDZV_PORT', '29400')}"}


def train_argv(plan: dict) -> list[str]:
    """`python -m core train …` for the plan: every hyperparameter as its TrainConfig option, resuming when a
    checkpoint of an earlier (interrupted) attempt is in the run folder."""
    from core.training.config import settings

    by_name = {item.name: item for item in settings()}
    argv = ["train", "--data", str(plan["data"]), "--out", str(plan["run_dir"])]
    for name, value in plan["hyperparameters"].items():
        item = by_name.get(name)
        if item is None or name in ("data", "out", "resume") or value is None:
            continue
        if item.type is bool:
            if bool(value) != bool(item.default):
                argv.append(item.flag)
        else:
            argv += [item.flag, str(value)]
    if (plan["run_dir"] / "checkpoint.pt").is_file():
        argv.append("--resume")
    world = plan["processes"] * len(plan["hosts"])
    if world > 1:
        if "processes" not in by_name:
            raise UsageError(f"this image cannot train on {world} processes: distributed training is not built in")
        argv += [by_name["processes"].flag, str(plan["processes"])]
        if len(plan["hosts"]) > 1:
            argv += [by_name["nnodes"].flag, str(len(plan["hosts"])), by_name["rdzv"].flag, plan["rdzv"]]
    return argv


def _container_train(args) -> int:
    from core.cli import main

    plan = container_plan(dict(os.environ))
    plan["run_dir"].mkdir(parents=True, exist_ok=True)
    argv = train_argv(plan)
    print("container-train: python -m core " + " ".join(argv), flush=True)
    code = main(argv)
    if code:
        return code
    if plan["node_rank"] == 0:  # SageMaker uploads /opt/ml/model of every host; the run is rank 0's
        plan["model_dir"].mkdir(parents=True, exist_ok=True)
        for name in RUN_FILES:
            if (plan["run_dir"] / name).is_file():
                shutil.copy2(plan["run_dir"] / name, plan["model_dir"] / name)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "container-train", help="the entry point of a SageMaker training container (reads SM_* and /opt/ml)")
    parser.set_defaults(handler=_container_train)
