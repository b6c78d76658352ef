"""Training a counting model end to end: read the dataset and its split, pick the mode, run it, write the run folder."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from core.data.labels.versions import training_rows
from core.evaluation.metrics import format_table
from core.files import atomic_write_json
from core.models import networks as models
from core.models.preprocess import (
    preprocessing,
)
from core.training import distributed
from core.training.config import TrainConfig, TrainingError
from core.training.epochs import Progress, RunLog, seed_everything
from core.training.modes import FinetuneRun, FrozenRun


@dataclass
class Split:
    """A split's photos: file paths, or (from a shard set) photo names with the set's location in `shards`."""

    paths: list
    labels: np.ndarray
    name: str = ""
    shards: str | None = None
    class_index: dict = field(default_factory=dict)  # photo count → label, for streamed photos


def _split_rows(ds, split: str) -> Split:
    # A balanced dataset version repeats oversampled training photos; other splits are read once. Packed photos
    # have no file (path None), so a shard set's rows are its labelled photos of the split.
    if ds.streams:
        rows = ds.labelled()
        rows = rows[rows["split"] == split]
    else:
        rows = training_rows(ds, split) if split == "train" else ds.rows(split)
    index = {c: i for i, c in enumerate(ds.classes)}
    labels = np.array([index[int(c)] for c in rows["cls"]], dtype=np.int64)
    if ds.streams:
        return Split(list(rows["name"]), labels, split, ds.location, index)
    return Split(list(rows["path"]), labels, split)


def _build_meta(config: TrainConfig, ds, backbone_info: dict) -> dict:
    return backbone_info | preprocessing(backbone_info, config.input_height, config.input_aspect) | {
        "format": models.CHECKPOINT_FORMAT,
        "classes": [int(c) for c in ds.classes],
        "class_range": ds.class_range.to_dict(),
        "head": config.head,
        "mode": config.mode,
        "loss": config.loss,
        "tta": config.test_views,
        **({"cut": config.cut} if config.mode == "partial" else {}),
        "dataset_key": ds.key,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _load_resume(out: Path) -> dict:
    path = out / "checkpoint.pt"
    if not path.is_file():
        raise TrainingError(f"{out}: nothing to resume (no checkpoint.pt); start the run without --resume")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise TrainingError(f"{path}: the checkpoint cannot be read ({exc.__class__.__name__}); start again without --resume") from None


def keep_predictions(run, model_path: Path, ds, splits: dict, log) -> None:
    """Each split's probabilities as the run scored them with the saved network, kept in the model's prediction
    store: Evaluate and `python -m core evaluate` read them instead of predicting those photos again. A split is kept
    only when the scored photos line up with its rows (its readable photos, in order, with the same counts).
    splits: {name: Split} of the splits the saved network scored (not valid after a refit: the choosing runs did)."""
    import pandas as pd

    from core.evaluation.predictions import PredictionStore
    from core.models.inference import tempered_probabilities

    if not model_path.is_file():
        return
    kept = []  # (split name, its rows, calibrated probabilities, raw probabilities)
    for name, split in splits.items():
        if split.shards or name not in run.logits:
            continue
        logits, labels = run.logits[name]
        readable = np.array([path not in run.skipped for path in split.paths], dtype=bool)
        rows = ds.rows(name)
        if list(rows["path"]) != list(split.paths) or int(readable.sum()) != len(labels) \
                or not np.array_equal(split.labels[readable], labels.numpy()):
            continue
        kept.append((name, rows[readable], tempered_probabilities(logits, run.temperature).numpy(),
                     tempered_probabilities(logits).numpy()))
    if not kept:
        return
    PredictionStore(model_path).keep(pd.concat([rows for _, rows, _, _ in kept], ignore_index=True),
                                     np.concatenate([probs for _, _, probs, _ in kept]),
                                     np.concatenate([raw for _, _, _, raw in kept]), [int(c) for c in ds.classes])
    for name, rows, _, _ in kept:
        log(f"{name} predictions kept for Evaluate ({len(rows)} photos)")


def train(config: TrainConfig, on_progress=None, should_stop=None) -> dict:
    """Train per `config`, writing model.pt, metrics.json, config.json and log.txt into config.out.

    Returns the metrics (as in metrics.json). Raises TrainingError for unusable settings or data,
    core.data.dataset.DatasetError for an unusable dataset, models.WeightsError for missing weights and
    Cancelled when should_stop() returns True.
    """
    from core.data.layouts.registry import load_dataset

    if distributed.wants_launch(config):
        return distributed.launch(config, on_progress, should_stop)
    out = Path(config.out).expanduser() if config.out else None
    resume_state = None
    if config.resume and out is not None:
        resume_state = _load_resume(out)
        saved = TrainConfig.from_dict(resume_state["config"])
        saved.epochs = config.epochs if config.epochs is not None else saved.epochs
        saved.device, saved.num_workers, saved.resume = config.device, config.num_workers, True
        config = saved
    problems = config.validate()
    if problems:
        raise TrainingError("; ".join(problems))
    ds = load_dataset(config.data)
    config = config.for_dataset(ds)  # balance left to the dataset: its version's recommendation, recorded resolved
    train_split, valid_split, test_split = (_split_rows(ds, s) for s in ("train", "valid", "test"))
    train_split, suspects, uncountable = training_split(config, ds, train_split, on_progress, should_stop)
    problems = config.validate(len(train_split.paths))
    if problems:
        raise TrainingError("; ".join(problems))
    world = distributed.start(models.resolve_device(config.device))
    try:
        if world.is_main:
            out.mkdir(parents=True, exist_ok=True)
            for stale in ("checkpoint.pt", "log.txt", "metrics.json") if resume_state is None else ():
                (out / stale).unlink(missing_ok=True)
        world.barrier()
        return _train(config, ds, (train_split, valid_split, test_split), out, resume_state, world, on_progress,
                      should_stop, suspects, uncountable)
    finally:
        distributed.finish(world)


def _rank_log(rank: int):
    def log(line: str):
        print(f"[rank {rank}] {line}", file=sys.stderr, flush=True)
    return log


def training_split(config: TrainConfig, ds, split: Split, on_progress=None, should_stop=None) -> tuple[Split, int, int]:
    """The training split without the photos `config` leaves out (likely wrong counts, photos marked uncountable),
    and how many of each were left out."""
    suspects = uncountable = 0
    if config.exclude_suspects:
        split, suspects = _without_suspects(ds, split, config.n_epochs, on_progress, should_stop)
    if config.exclude_uncountable:
        from core.data.labels.annotations import uncountable as marked_uncountable

        split, uncountable = _without(split, marked_uncountable(ds.key))
    return split, suspects, uncountable


def _without_suspects(ds, split: Split, epochs: int, on_progress, should_stop) -> tuple[Split, int]:
    """The training split without the photos flagged as likely wrong counts (core.evaluation.label_issues), and how
    many were left out. Computing them (once per labels) shows as the features stage of the progress."""
    from core.evaluation.label_issues import LabelIssuesError, find_label_issues

    if ds.streams:
        raise TrainingError("--exclude-suspects needs the photos as files: train from the dataset folder the shards "
                            "were packed from")

    def report(fraction, text):
        if on_progress:
            on_progress({"stage": "features", "epoch": 0, "epochs": epochs, "fraction": 0.0,
                         "message": f"Finding likely wrong counts: {text}"})

    try:
        issues = find_label_issues(ds, on_progress=report, should_stop=should_stop)
    except LabelIssuesError as exc:
        raise TrainingError(f"likely wrong counts cannot be found: {exc}") from None
    return _without(split, set(issues.frame.loc[issues.frame["flagged"] & (issues.frame["split"] == "train"), "name"]))


def _without(split: Split, names: set[str]) -> tuple[Split, int]:
    """The split without the photos named, and how many were left out."""
    keep = [i for i, path in enumerate(split.paths) if Path(path).name not in names]
    return Split([split.paths[i] for i in keep], split.labels[keep], split.name, split.shards,
                 split.class_index), len(split.paths) - len(keep)


def _train(config, ds, splits, out, resume_state, world, on_progress, should_stop, suspects: int = 0,
           uncountable: int = 0) -> dict:
    train_split, valid_split, test_split = splits
    device = world.device(models.resolve_device(config.device))
    if world.distributed:
        # Rank 0 reports to the run folder (the launcher or the app follows it) and hears the STOP file.
        on_progress = distributed.ProgressFile(out, on_progress) if world.is_main else None
        asked = should_stop
        should_stop = lambda: distributed.stop_requested(out, asked)
    log = RunLog(out) if world.is_main else _rank_log(world.rank)
    progress = Progress(on_progress, str(device), config.n_epochs)
    generator = seed_everything(config.seed)
    backbone, info = models.build_backbone(config.backbone, config.weights, config.feature_set)
    meta = resume_state["meta"] if resume_state else _build_meta(config, ds, info)
    scaling = {"world_size": world.size, "global_batch_size": config.batch_size * world.size,
               "lr_scaling": {"rule": "linear" if world.distributed else "none", "base_lr": config.learning_rate,
                              "factor": world.size, "lr": config.learning_rate * world.size}}
    if world.is_main:
        atomic_write_json(out / "config.json", config.to_dict() | scaling | {
            "dataset": ds.location, "dataset_key": ds.key, "suspects_excluded": suspects,
            "uncountable_excluded": uncountable})
    if world.distributed:
        log(f"{world.size} processes, global batch {scaling['global_batch_size']}, learning rate scaled linearly "
            f"× {world.size} to {scaling['lr_scaling']['lr']:g}")
    if config.exclude_suspects:
        log(f"left out {suspects} training photos flagged as likely wrong counts")
    if config.exclude_uncountable:
        log(f"left out {uncountable} training photos marked as uncountable (items hidden)")
    log(f"{'resuming' if resume_state else 'training'} {config.backbone} ({config.mode}) on {ds.location}: "
        f"{len(train_split.paths)} train, {len(valid_split.paths)} valid, {len(test_split.paths)} test photos, "
        f"classes {ds.classes}, device {device}")
    started = time.perf_counter()
    model = models.CountingModel(backbone, models.make_head(config.head, info["feature_dim"], len(ds.classes), config.backbone))
    if config.mode == "partial":
        from core.training.ensemble import partial_run

        def make_model(name: str):
            """A fresh model on backbone `name` (an ensemble's next member) and its meta."""
            fresh, fresh_info = models.build_backbone(name, config.weights if name == config.backbone else None,
                                                      config.feature_set)
            head = models.make_head(config.head, fresh_info["feature_dim"], len(ds.classes), name)
            return models.CountingModel(fresh, head), _build_meta(config, ds, fresh_info)

        photos = sum(len(split.paths) for split in splits)
        run = partial_run(config, model, meta, device, out, log, progress, should_stop, generator, world, train_split,
                          photos, make_model)
    else:
        runner = FrozenRun if config.mode == "frozen" else FinetuneRun
        run = runner(config, model, meta, device, out, log, progress, should_stop, generator, world)
    result = run.fit(train_split, valid_split, test_split, resume_state)
    result |= {"backbone": config.backbone, "mode": config.mode, "device": str(device), "classes": meta["classes"],
               "dataset": ds.location, "seconds": round(time.perf_counter() - started, 2),
               "config": config.to_dict() | scaling | {"suspects_excluded": suspects,
                                                       "uncountable_excluded": uncountable},
               "dataset_problems": [{"photo": n, "reason": r} for n, r in ds.problems]}
    if not world.is_main:
        return result
    atomic_write_json(out / "metrics.json", result)
    test = result.get("test") or {}
    log("test: " + format_table(test).replace("\n", "\n    ") if test.get("n") else "test: no test photos")
    if test.get("n"):
        log(f"test calibration: ECE {test['ece_uncalibrated']:.3f} before, {test['ece']:.3f} after "
            f"(temperature {result['temperature']:.3f})")
        scored = {"test": test_split} | ({} if config.refit else {"valid": valid_split})
        keep_predictions(run, out / "model.pt", ds, scored, log)
    progress(force=True, stage="done", fraction=1.0, message="Training finished")
    return result
