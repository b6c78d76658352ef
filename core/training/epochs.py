"""The epoch loop both modes share: optimiser, schedule, progress, early stopping, checkpoints and resuming."""
from __future__ import annotations

import io
import math
import random
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from core.errors import Cancelled
from core.evaluation.calibration import (
    FLAG_SHARE,
    confidence_quantiles,
    expected_calibration_error,
    fit_temperature,
    flag_threshold,
)
from core.evaluation.metrics import compute_metrics
from core.files import atomic_write_bytes
from core.models import networks as models
from core.models.inference import tempered_probabilities
from core.training import distributed
from core.training.config import TrainConfig
from core.training.distributed import World
from core.training.losses import CountLoss, balanced_sampler, class_weights

PROGRESS_EVERY_S = 0.5


class Progress:
    """Calls on_progress with the full set of keys, at most every PROGRESS_EVERY_S unless forced."""

    def __init__(self, on_progress, device: str, epochs: int):
        self.on_progress = on_progress
        self.started = time.perf_counter()
        self.last = 0.0
        self.state = {"stage": "features", "epoch": 0, "epochs": epochs, "fraction": 0.0, "train_loss": None,
                      "valid_loss": None, "train_acc": None, "valid_acc": None, "images_per_s": None,
                      "data_wait_fraction": None, "device": device, "eta_s": None, "message": ""}

    def __call__(self, force: bool = False, **changes):
        self.state.update(changes)
        now = time.perf_counter()
        fraction = min(max(self.state["fraction"], 0.0), 1.0)
        elapsed = now - self.started
        self.state["eta_s"] = elapsed * (1 - fraction) / fraction if fraction > 0.01 else None
        if self.on_progress and (force or now - self.last >= PROGRESS_EVERY_S):
            self.last = now
            self.on_progress(dict(self.state))


class RunLog:
    def __init__(self, folder: Path):
        self.path = folder / "log.txt"

    def __call__(self, line: str):
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(f"{stamp}  {line}\n")


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def make_optimizer(config: TrainConfig, model: models.CountingModel, frozen: bool,
                   lr_scale: float = 1.0, backbone_parameters=None) -> torch.optim.Optimizer:
    """lr_scale: the linear scaling of the learning rate with the global batch (the number of processes);
    backbone_parameters: the backbone's trained parameters (default: all of them)."""
    lr = config.learning_rate * lr_scale
    if frozen:
        groups = [{"params": model.head.parameters(), "lr": lr}]
    else:
        trained = model.backbone.parameters() if backbone_parameters is None else backbone_parameters
        groups = [{"params": trained, "lr": lr * config.backbone_lr_factor},
                  {"params": model.head.parameters(), "lr": lr}]
    kind = torch.optim.AdamW if config.optimizer == "adamw" else torch.optim.Adam
    return kind(groups, lr=lr, weight_decay=config.weight_decay)


def make_scheduler(config: TrainConfig, optimizer, steps_per_epoch: int):
    total = max(1, config.n_epochs * steps_per_epoch)
    if config.schedule == "onecycle":
        peaks = [group["lr"] for group in optimizer.param_groups]
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peaks, total_steps=total, pct_start=0.2)
    warmup = min(steps_per_epoch, total // 10)  # a short linear warm-up keeps fine-tuning from wrecking the backbone
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_averaged(model: torch.nn.Module, decay: float):
    """An exponential moving average of `model`'s weights and batch-norm statistics (torch.optim.swa_utils)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


class BaseRun:
    """The epoch loop shared by both modes: early stopping on valid loss, checkpoints, history, progress.

    After the epochs, the best model's temperature is fitted on the valid split's per-view logits
    (`split_logits`, given by each mode) and both splits are scored with it.
    With several processes (`world`), every rank runs this loop in step; only rank 0 writes files.
    """

    frozen = False

    def __init__(self, config, model, meta, device, out, log, progress, should_stop, generator, world=None):
        self.config, self.model, self.meta, self.device = config, model, meta, device
        self.out, self.log, self.progress, self.should_stop, self.generator = out, log, progress, should_stop, generator
        self.world = world or World()
        self.best_state: dict | None = None
        self.skipped: dict[str, str] = {}
        self.history: list[dict] = []
        self.best_loss, self.best_epoch, self.bad_epochs = math.inf, 0, 0
        self.temperature = 1.0
        self.logits: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.averaged = None  # the weights' moving average (config.ema_decay), which is then what is validated and kept
        self.stop_after: int | None = None  # train only this many epochs of the schedule (a refit; None: all)

    def check_stop(self, step: str = ""):
        """Raise Cancelled when stopping was asked for. With several processes this is a collective (rank 0's
        request is broadcast), so every rank must call it at the same points, and all stop there together."""
        asked = bool(self.world.is_main and self.should_stop and self.should_stop())
        if self.world.main_says(asked):
            self.log(f"stopped on request{' at ' + step if step else ''}")
            raise Cancelled("training was stopped")

    def fit(self, train_split, valid_split, test_split, resume_state) -> dict:
        self.first_epoch = resume_state["epoch"] + 1 if resume_state else 1  # streamed shards reshuffle by epoch
        self.prepare(train_split, valid_split, test_split)
        n_classes = len(self.meta["classes"])
        labels = self.train_labels()
        weight = class_weights(labels, n_classes)
        self.criterion = CountLoss(self.config.loss, weight if self.config.balance == "weights" else None,
                                   self.config.label_smoothing).to(self.device)
        # Early stopping watches the class-balanced valid loss when balancing, matching what training optimises.
        self.eval_criterion = CountLoss(self.config.loss, weight if self.config.balance != "none" else None).to(self.device)
        self.optimizer = make_optimizer(self.config, self.model, self.frozen, self.world.size,
                                        self.backbone_parameters())
        self.scheduler = make_scheduler(self.config, self.optimizer, self.steps_per_epoch())
        if self.config.ema_decay and not self.frozen:
            self.averaged = make_averaged(self.model, self.config.ema_decay)
        first = 1
        epochs = self.stop_after or self.config.n_epochs
        if resume_state:
            first = self.restore(resume_state) + 1
            self.log(f"resumed after epoch {first - 1}")
            if self.config.patience and self.bad_epochs >= self.config.patience:
                first = epochs + 1  # it had stopped early: nothing more to train
        for epoch in range(first, epochs + 1):
            self.check_stop()
            self.progress(force=True, stage="train", epoch=epoch, epochs=epochs, message=f"Epoch {epoch}/{epochs}")
            record = self.train_epoch(epoch) | self.validate_epoch()
            record["epoch"] = epoch
            self.history.append(record)
            improved = record["valid_loss"] is None or record["valid_loss"] < self.best_loss - 1e-4
            if improved:
                self.best_loss = record["valid_loss"] if record["valid_loss"] is not None else math.inf
                self.best_epoch, self.bad_epochs = epoch, 0
                # Every rank keeps the best weights (they agree on the valid loss); rank 0 writes them.
                kept = self.kept_model()
                self.best_state = {k: v.detach().clone() for k, v in kept.state_dict().items()}
                if self.world.is_main:
                    models.save_model(self.out / "model.pt", kept, self.meta | {"epoch": epoch})
            else:
                self.bad_epochs += 1
            if self.world.is_main:
                self.save_checkpoint(epoch)
            self.log(_epoch_line(record, epochs) + ("  *" if improved else ""))
            self.progress(force=True, **{k: record[k] for k in ("train_loss", "valid_loss", "train_acc", "valid_acc",
                                                                  "images_per_s", "data_wait_fraction")},
                          message=f"Epoch {epoch}/{epochs} done")
            if self.config.patience and self.bad_epochs >= self.config.patience:
                self.log(f"early stop: valid loss has not improved for {self.bad_epochs} epochs")
                break
        distributed.dump_for_tests(self.world, self.kept_model(), getattr(self, "seen", []))
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
            best_meta = self.meta | {"epoch": self.best_epoch}
        else:  # resumed, and no epoch since beat the saved best
            best, best_meta = models.load_model(self.out / "model.pt")
            self.model.load_state_dict(best.state_dict())
        self.world.barrier()
        self.temperature = self.calibrate(valid_split, best_meta)
        self.progress(force=True, stage="evaluate", fraction=0.97, message="Scoring the test split")
        valid_metrics = self.score("valid", valid_split)
        test_metrics = self.score("test", test_split)
        skipped = [{"photo": Path(p).name, "reason": r} for p, r in sorted(self.skipped.items())]
        test_metrics["skipped"] = skipped
        return {"history": self.history, "best_epoch": self.best_epoch, "epochs_run": len(self.history),
                "temperature": self.temperature, "valid": valid_metrics, "test": test_metrics, "skipped": skipped,
                **self.timings()}

    def validate_epoch(self) -> dict:
        """Valid loss and accuracy of the weights kept: the trained ones, or with weight averaging the average, the
        trained weights' figures beside them (the history shows what averaging adds). `_validate(model)` scores one."""
        record = self._validate(self.model)
        if self.averaged is None or record["valid_loss"] is None:
            return record
        return self._validate(self.averaged.module) | {"valid_loss_trained": record["valid_loss"],
                                                       "valid_acc_trained": record["valid_acc"]}

    def backbone_parameters(self):
        """The backbone's parameters that train (None: all of them)."""
        return None

    def kept_model(self) -> torch.nn.Module:
        """The weights that are validated and kept: the moving average when there is one."""
        return self.averaged.module if self.averaged is not None else self.model

    def split_logits(self, name: str, split) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits n × views × classes on the CPU, class indices n) of a split's readable photos, computed once."""
        if name not in self.logits:
            self.logits[name] = self.compute_logits(name, split)
        return self.logits[name]

    def calibrate(self, valid_split, best_meta: dict) -> float:
        """Fit the temperature on the valid split and store it in model.pt's meta; 1 without valid photos."""
        self.progress(force=True, stage="evaluate", fraction=0.96, message="Calibrating confidence on the valid split")
        logits, labels = self.split_logits("valid", valid_split)
        if len(labels):
            temperature = fit_temperature(logits.numpy(), labels.numpy())
            self.log(f"calibration: temperature {temperature:.3f} fitted on {len(labels)} valid photos")
        else:
            temperature = 1.0
            self.log("calibration: no valid photos, so temperature 1 (confidence left uncalibrated)")
        flags = {}
        if len(labels):  # the low-confidence flag's default: the least certain fifth of the valid photos
            confidence = tempered_probabilities(logits, temperature).max(-1).values.numpy()
            flags = {"low_confidence_threshold": flag_threshold(confidence),
                     "valid_confidence_quantiles": confidence_quantiles(confidence)}
            self.log(f"low-confidence flag: below {flags['low_confidence_threshold']:.3f} "
                     f"({FLAG_SHARE:.0%} of the valid photos)")
        if self.world.is_main:
            models.save_model(self.out / "model.pt", self.model, best_meta | {"temperature": temperature} | flags)
        return temperature

    def score(self, name: str, split) -> dict:
        """Metrics of the best model on a split, with calibrated probabilities; ECE before calibration too."""
        logits, labels = self.split_logits(name, split)
        classes = self.meta["classes"]
        if not len(labels):
            return compute_metrics([], [], classes) | {"ece": None, "ece_uncalibrated": None}
        probs = tempered_probabilities(logits, self.temperature).numpy()
        truth = [classes[i] for i in labels.tolist()]
        predicted = [classes[i] for i in probs.argmax(1).tolist()]
        metrics = compute_metrics(truth, predicted, classes, probs)
        metrics["ece_uncalibrated"] = expected_calibration_error(tempered_probabilities(logits).numpy(), labels.numpy())
        return metrics

    def save_checkpoint(self, epoch: int):
        state = self.model.head.state_dict() if self.frozen else self.model.state_dict()
        checkpoint = {"epoch": epoch, "model": state, "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(), "history": self.history, "best_loss": self.best_loss,
                      "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "meta": self.meta,
                      "config": self.config.to_dict(), "torch_rng": torch.get_rng_state(),
                      "averaged": self.averaged.state_dict() if self.averaged is not None else None,
                      "generator": self.generator.get_state()}
        self.write_checkpoint(checkpoint)

    def write_checkpoint(self, checkpoint: dict) -> None:
        """checkpoint.pt in the run folder, written whole or not at all (what --resume and a requeued job read)."""
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(self.out / "checkpoint.pt", buffer.getvalue())

    def restore(self, state) -> int:
        (self.model.head if self.frozen else self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.averaged is not None and state.get("averaged"):
            self.averaged.load_state_dict(state["averaged"])
        self.history, self.best_loss = state["history"], state["best_loss"]
        self.best_epoch, self.bad_epochs = state["best_epoch"], state["bad_epochs"]
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        return state["epoch"]

    def fraction(self, epoch: int, within: float) -> float:
        return (epoch - 1 + within) / (self.stop_after or self.config.n_epochs)

    def timings(self) -> dict:
        return {}


class TensorRun(BaseRun):
    """A run whose splits are tensors in memory (`self.tensors[split] = (inputs, labels)`): cached features or stage
    maps, shuffled (or balanced-sampled) per epoch."""

    def train_labels(self):
        return self.tensors["train"][1].numpy()

    def steps_per_epoch(self):
        return max(1, math.ceil(len(self.tensors["train"][1]) / self.config.batch_size))

    def epoch_order(self) -> torch.Tensor:
        """This epoch's order of the training rows."""
        labels = self.tensors["train"][1]
        if self.config.balance == "sampler":
            return torch.as_tensor(list(balanced_sampler(labels.numpy(), self.generator)))
        return torch.randperm(len(labels), generator=self.generator)


def _epoch_line(record: dict, epochs: int) -> str:
    def fmt(value, pattern):
        return "—" if value is None else format(value, pattern)

    return (f"epoch {record['epoch']}/{epochs}  train loss {fmt(record['train_loss'], '.4f')} acc {fmt(record['train_acc'], '.3f')}"
            f"  valid loss {fmt(record['valid_loss'], '.4f')} acc {fmt(record['valid_acc'], '.3f')}"
            f"  {fmt(record['images_per_s'], '.1f')} img/s"
            + (f"  (averaged weights; the trained ones: valid loss {fmt(record['valid_loss_trained'], '.4f')} "
               f"acc {fmt(record['valid_acc_trained'], '.3f')})" if "valid_loss_trained" in record else ""))


def batch_correct(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(1) == labels).sum())
