"""Training parameters as jobs carry them (TrainConfig.to_params / from_params): their problems, the dataset facts."""
from __future__ import annotations

from core import config
from core.training.config import TrainConfig


def training_problems(params: dict, n_train: int, cuda_available: bool) -> list[str]:
    """Why these job params cannot be trained (empty when they can): TrainConfig.validate on what they stand for."""
    try:
        return TrainConfig.from_params(params, config.home() / "validate-only").validate(n_train, cuda_available)
    except (TypeError, ValueError) as exc:  # a value of the wrong type, e.g. text for the epochs
        return [str(exc)]


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
