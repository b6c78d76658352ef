"""Training parameters as jobs carry them: the TrainConfig they stand for, their problems, and the dataset facts."""
from __future__ import annotations

from pathlib import Path

from core import config


def make_train_config(params: dict, out: str | Path, device: str | None = None):
    """A core.training.loop.TrainConfig from job params (unknown keys, such as the dataset version, are left out)."""
    from dataclasses import fields

    from core.training.config import TrainConfig

    names = {f.name for f in fields(TrainConfig)}
    values = {key: value for key, value in params.items() if key in names}
    values["out"] = str(out)
    if device:
        values["device"] = device
    return TrainConfig(**values)


def training_problems(params: dict, n_train: int, cuda_available: bool) -> list[str]:
    """Why these training parameters cannot work (empty when they can): the training's own checks, plus the device."""
    problems = []
    if str(params.get("device") or "auto").startswith("cuda") and not cuda_available:
        problems.append("CUDA was asked for but this machine has no usable GPU: choose auto or cpu.")
    try:
        problems += make_train_config(params, config.home() / "validate-only").validate(n_train)
    except (TypeError, ValueError) as exc:
        problems.append(str(exc))
    return problems


def describe_dataset(dataset) -> dict:
    """What a job records about its dataset: where, which version (labels, classes and split), split sizes."""
    import hashlib

    rows = dataset.labelled()
    digest = hashlib.sha1()
    for name, cls, split in sorted(zip(rows["name"], rows["cls"].astype(int), rows["split"].astype(str))):
        digest.update(f"{name}:{cls}:{split}\n".encode())
    sizes = rows["split"].value_counts()
    return {"data": str(dataset.source), "dataset_key": dataset.key, "dataset_version": digest.hexdigest()[:10],
            "classes": [int(c) for c in dataset.classes],
            "n_train": int(sizes.get("train", 0)), "n_valid": int(sizes.get("valid", 0)),
            "n_test": int(sizes.get("test", 0))}
