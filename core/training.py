"""Training a counting model: frozen backbone on cached features, or fine-tuning; checkpoints, metrics, resume."""
from __future__ import annotations

import io
import math
import random
import time
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core import models
from core.versions import training_rows
from core.files import atomic_write_bytes, atomic_write_json
from core.metrics import compute_metrics, format_table
from core.preprocess import TTA_VIEWS, PhotoDataset, default_workers, eval_transform, preprocessing, train_transform

MODES = ("frozen", "finetune")
BALANCE = ("none", "weights", "sampler")
LOSSES = ("ce", "emd")
SCHEDULES = ("cosine", "onecycle")
DEFAULT_EPOCHS = {"frozen": 40, "finetune": 6}
DEFAULT_LR = {"frozen": 1e-4, "finetune": 1e-3}
# (height px, width / height). Fine-tuning gains from the bins' own shape at a higher resolution (bench/RESULTS.md);
# frozen features did not, so frozen stays at the backbone's native, cheaper 224².
DEFAULT_INPUT = {"frozen": (224, 1.0), "finetune": (288, 1.37)}
# Test-time views: the four mirror images help fine-tuned models; for frozen features they cost 4× the extraction.
DEFAULT_TTA = {"frozen": "none", "finetune": "flips"}
PROGRESS_EVERY_S = 0.5


class Cancelled(Exception):
    """should_stop() asked training (or feature extraction) to stop; what was saved so far is kept."""


class TrainingError(Exception):
    """The configuration or the data cannot be used; the message says why."""


@dataclass
class TrainConfig:
    data: str | None = None
    out: str | None = None
    backbone: str = "efficientnet_lite0"
    mode: str = "frozen"
    epochs: int | None = None          # None: DEFAULT_EPOCHS[mode]
    batch_size: int = 32
    lr: float | None = None            # None: DEFAULT_LR[mode]; the head's rate in finetune mode
    backbone_lr_factor: float = 0.3    # finetune: the backbone learns at lr × this
    weight_decay: float = 0.01
    optimizer: str = "adamw"
    schedule: str = "cosine"
    image_size: int | None = None      # input height; None: DEFAULT_INPUT[mode]
    aspect: float | None = None        # input width / height; None: DEFAULT_INPUT[mode]
    balance: str = "weights"
    loss: str = "emd"                  # cross-entropy + squared earth mover's distance (count-aware); "ce": plain
    label_smoothing: float = 0.0
    head: str = "mlp"
    augment: bool = True
    tta: str | None = None             # views averaged at prediction: none, hflip or flips; None: DEFAULT_TTA[mode]
    device: str = "auto"
    seed: int = 0
    weights: str | None = None
    resume: bool = False
    patience: int = 8                  # epochs without a better valid loss before stopping; 0: never
    num_workers: int | None = None

    @property
    def n_epochs(self) -> int:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS.get(self.mode, 10)

    @property
    def test_views(self) -> str:
        return self.tta if self.tta is not None else DEFAULT_TTA.get(self.mode, "none")

    @property
    def input_height(self) -> int:
        default_height, _ = DEFAULT_INPUT.get(self.mode, DEFAULT_INPUT["frozen"])
        return self.image_size if self.image_size is not None else default_height

    @property
    def input_aspect(self) -> float:
        _, default_aspect = DEFAULT_INPUT.get(self.mode, DEFAULT_INPUT["frozen"])
        return self.aspect if self.aspect is not None else default_aspect

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.mode, 1e-3)

    def validate(self, n_train: int | None = None) -> list[str]:
        """Human-readable problems with this configuration (empty when it can be trained)."""
        problems = []

        def check(ok, message):
            if not ok:
                problems.append(message)

        check(self.backbone in models.BACKBONES, f"unknown backbone {self.backbone!r} (choose {', '.join(models.BACKBONES)})")
        check(self.mode in MODES, f"unknown mode {self.mode!r} (choose frozen or finetune)")
        check(not (self.mode == "frozen" and self.backbone == "simple_cnn"),
              "simple_cnn has no pretrained weights to freeze: train it with --mode finetune")
        check(self.n_epochs >= 1, f"epochs must be at least 1 (got {self.n_epochs})")
        check(self.learning_rate > 0, f"the learning rate must be positive (got {self.learning_rate})")
        check(0 < self.backbone_lr_factor <= 1, "the backbone learning-rate factor must be in (0, 1]")
        check(self.weight_decay >= 0, "weight decay cannot be negative")
        check(self.batch_size >= 1, f"the batch size must be at least 1 (got {self.batch_size})")
        check(32 <= self.input_height <= 1024, f"the image size must be between 32 and 1024 pixels (got {self.input_height})")
        check(0.25 <= self.input_aspect <= 4, f"the aspect ratio must be between 0.25 and 4 (got {self.input_aspect})")
        check(self.balance in BALANCE, f"unknown balance {self.balance!r} (choose none, weights or sampler)")
        check(self.test_views in TTA_VIEWS, f"unknown test-time augmentation {self.tta!r} (choose none, hflip or flips)")
        check(self.loss in LOSSES, f"unknown loss {self.loss!r} (choose ce or emd)")
        check(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r} (choose cosine or onecycle)")
        check(self.optimizer in ("adamw", "adam"), f"unknown optimizer {self.optimizer!r} (choose adamw or adam)")
        check(self.head in models.HEADS, f"unknown head {self.head!r} (choose linear or mlp)")
        check(0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1) (got {self.label_smoothing})")
        check(self.patience >= 0, "patience cannot be negative")
        check(self.num_workers is None or self.num_workers >= 0, "num_workers cannot be negative")
        check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), f"unknown device {self.device!r} (choose auto, cpu or cuda)")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            problems.append("--device cuda was asked for but no CUDA GPU is available (use auto or cpu)")
        check(bool(self.out), "an output folder for the run is needed")
        if n_train is not None:
            check(n_train > 0, "the training split holds no labelled photos")
            check(n_train == 0 or self.batch_size <= n_train,
                  f"the batch size ({self.batch_size}) is larger than the training set ({n_train} photos)")
        return problems

    def to_dict(self) -> dict:
        return asdict(self) | {"epochs": self.n_epochs, "lr": self.learning_rate,
                                "image_size": self.input_height, "aspect": self.input_aspect, "tta": self.test_views}

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


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


class CountLoss(nn.Module):
    """Cross-entropy (class weights, label smoothing), plus for 'emd' the squared earth mover's distance.

    EMD compares cumulative distributions over the ordered counts, so predicting 4 for a 5 costs less than
    predicting 1: the loss knows that counts are ordinal while the output stays a softmax over classes.
    """

    def __init__(self, kind: str = "ce", weight=None, label_smoothing: float = 0.0, emd_weight: float = 1.0):
        super().__init__()
        self.kind = kind
        self.emd_weight = emd_weight
        self.ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.register_buffer("weight", weight if weight is not None else torch.ones(0))

    def forward(self, logits, target):
        loss = self.ce(logits, target)
        if self.kind == "emd":
            probs = logits.float().softmax(1)
            truth = nn.functional.one_hot(target, logits.shape[1]).float()
            emd = ((probs.cumsum(1) - truth.cumsum(1)) ** 2).sum(1)
            if self.weight.numel():
                w = self.weight[target]
                emd = (emd * w).sum() / w.sum()
            else:
                emd = emd.mean()
            loss = loss + self.emd_weight * emd
        return loss


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """n / (classes × count): every class weighs the same in the loss; absent classes get weight 0."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sampler(labels: np.ndarray, generator: torch.Generator) -> torch.utils.data.Sampler:
    counts = np.bincount(labels)
    per_photo = 1.0 / counts[labels]
    return torch.utils.data.WeightedRandomSampler(torch.as_tensor(per_photo, dtype=torch.double), len(labels),
                                                  replacement=True, generator=generator)


def make_optimizer(config: TrainConfig, model: models.CountingModel, frozen: bool) -> torch.optim.Optimizer:
    lr = config.learning_rate
    if frozen:
        groups = [{"params": model.head.parameters(), "lr": lr}]
    else:
        groups = [{"params": model.backbone.parameters(), "lr": lr * config.backbone_lr_factor},
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


@dataclass
class Split:
    paths: list
    labels: np.ndarray


def _split_rows(ds, split: str) -> Split:
    # A balanced dataset version repeats oversampled training photos; other splits are read once.
    rows = training_rows(ds, split) if split == "train" else ds.rows(split)
    index = {c: i for i, c in enumerate(ds.classes)}
    return Split(list(rows["path"]), np.array([index[int(c)] for c in rows["cls"]], dtype=np.int64))


def _build_meta(config: TrainConfig, ds, backbone_info: dict) -> dict:
    return backbone_info | preprocessing(backbone_info, config.input_height, config.input_aspect) | {
        "format": models.CHECKPOINT_FORMAT,
        "classes": [int(c) for c in ds.classes],
        "class_range": ds.class_range.to_dict(),
        "head": config.head,
        "mode": config.mode,
        "loss": config.loss,
        "tta": config.test_views,
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


def train(config: TrainConfig, on_progress=None, should_stop=None) -> dict:
    """Train per `config`, writing model.pt, metrics.json, config.json and log.txt into config.out.

    Returns the metrics (as in metrics.json). Raises TrainingError for unusable settings or data,
    core.dataset.DatasetError for an unusable dataset, models.WeightsError for missing weights and
    Cancelled when should_stop() returns True.
    """
    from core.dataset import load_dataset

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
    train_split, valid_split, test_split = (_split_rows(ds, s) for s in ("train", "valid", "test"))
    problems = config.validate(len(train_split.paths))
    if problems:
        raise TrainingError("; ".join(problems))
    out.mkdir(parents=True, exist_ok=True)
    if resume_state is None:
        for stale in ("checkpoint.pt", "log.txt", "metrics.json"):
            (out / stale).unlink(missing_ok=True)
    device = models.resolve_device(config.device)
    log = RunLog(out)
    progress = Progress(on_progress, str(device), config.n_epochs)
    generator = seed_everything(config.seed)
    backbone, info = models.build_backbone(config.backbone, config.weights)
    meta = resume_state["meta"] if resume_state else _build_meta(config, ds, info)
    atomic_write_json(out / "config.json", config.to_dict() | {"dataset": str(ds.source), "dataset_key": ds.key})
    log(f"{'resuming' if resume_state else 'training'} {config.backbone} ({config.mode}) on {ds.source}: "
        f"{len(train_split.paths)} train, {len(valid_split.paths)} valid, {len(test_split.paths)} test photos, "
        f"classes {ds.classes}, device {device}")
    started = time.perf_counter()
    model = models.CountingModel(backbone, models.make_head(config.head, info["feature_dim"], len(ds.classes), config.backbone))
    runner = FrozenRun if config.mode == "frozen" else FinetuneRun
    run = runner(config, model, meta, device, out, log, progress, should_stop, generator)
    result = run.fit(train_split, valid_split, test_split, resume_state)
    result |= {"backbone": config.backbone, "mode": config.mode, "device": str(device), "classes": meta["classes"],
               "dataset": str(ds.source), "seconds": round(time.perf_counter() - started, 2),
               "config": config.to_dict(), "dataset_problems": [{"photo": n, "reason": r} for n, r in ds.problems]}
    atomic_write_json(out / "metrics.json", result)
    test = result.get("test") or {}
    log("test: " + format_table(test).replace("\n", "\n    ") if test.get("n") else "test: no test photos")
    progress(force=True, stage="done", fraction=1.0, message="Training finished")
    return result


class BaseRun:
    """The epoch loop shared by both modes: early stopping on valid loss, checkpoints, history, progress."""

    frozen = False

    def __init__(self, config, model, meta, device, out, log, progress, should_stop, generator):
        self.config, self.model, self.meta, self.device = config, model, meta, device
        self.out, self.log, self.progress, self.should_stop, self.generator = out, log, progress, should_stop, generator
        self.skipped: dict[str, str] = {}
        self.history: list[dict] = []
        self.best_loss, self.best_epoch, self.bad_epochs = math.inf, 0, 0

    def check_stop(self):
        if self.should_stop and self.should_stop():
            self.log("stopped on request")
            raise Cancelled("training was stopped")

    def fit(self, train_split, valid_split, test_split, resume_state) -> dict:
        self.prepare(train_split, valid_split, test_split)
        n_classes = len(self.meta["classes"])
        labels = self.train_labels()
        weight = class_weights(labels, n_classes)
        self.criterion = CountLoss(self.config.loss, weight if self.config.balance == "weights" else None,
                                   self.config.label_smoothing).to(self.device)
        # Early stopping watches the class-balanced valid loss when balancing, matching what training optimises.
        self.eval_criterion = CountLoss(self.config.loss, weight if self.config.balance != "none" else None).to(self.device)
        self.optimizer = make_optimizer(self.config, self.model, self.frozen)
        self.scheduler = make_scheduler(self.config, self.optimizer, self.steps_per_epoch())
        first = 1
        if resume_state:
            first = self.restore(resume_state) + 1
            self.log(f"resumed after epoch {first - 1}")
        epochs = self.config.n_epochs
        for epoch in range(first, epochs + 1):
            self.check_stop()
            self.progress(force=True, stage="train", epoch=epoch, message=f"Epoch {epoch}/{epochs}")
            record = self.train_epoch(epoch) | self.validate_epoch()
            record["epoch"] = epoch
            self.history.append(record)
            improved = record["valid_loss"] is None or record["valid_loss"] < self.best_loss - 1e-4
            if improved:
                self.best_loss = record["valid_loss"] if record["valid_loss"] is not None else math.inf
                self.best_epoch, self.bad_epochs = epoch, 0
                models.save_model(self.out / "model.pt", self.model, self.meta | {"epoch": epoch})
            else:
                self.bad_epochs += 1
            self.save_checkpoint(epoch)
            self.log(_epoch_line(record, epochs) + ("  *" if improved else ""))
            self.progress(force=True, **{k: record[k] for k in ("train_loss", "valid_loss", "train_acc", "valid_acc",
                                                                  "images_per_s", "data_wait_fraction")},
                          message=f"Epoch {epoch}/{epochs} done")
            if self.config.patience and self.bad_epochs >= self.config.patience:
                self.log(f"early stop: valid loss has not improved for {self.bad_epochs} epochs")
                break
        self.progress(force=True, stage="evaluate", fraction=0.97, message="Scoring the test split")
        best, _ = models.load_model(self.out / "model.pt")
        self.model.load_state_dict(best.state_dict())
        valid_metrics = self.score("valid", valid_split)
        test_metrics = self.score("test", test_split)
        skipped = [{"photo": Path(p).name, "reason": r} for p, r in sorted(self.skipped.items())]
        test_metrics["skipped"] = skipped
        return {"history": self.history, "best_epoch": self.best_epoch, "epochs_run": len(self.history),
                "valid": valid_metrics, "test": test_metrics, "skipped": skipped, **self.timings()}

    def save_checkpoint(self, epoch: int):
        state = self.model.head.state_dict() if self.frozen else self.model.state_dict()
        checkpoint = {"epoch": epoch, "model": state, "optimizer": self.optimizer.state_dict(),
                      "scheduler": self.scheduler.state_dict(), "history": self.history, "best_loss": self.best_loss,
                      "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs, "meta": self.meta,
                      "config": self.config.to_dict(), "torch_rng": torch.get_rng_state(),
                      "generator": self.generator.get_state()}
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(self.out / "checkpoint.pt", buffer.getvalue())

    def restore(self, state) -> int:
        (self.model.head if self.frozen else self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.history, self.best_loss = state["history"], state["best_loss"]
        self.best_epoch, self.bad_epochs = state["best_epoch"], state["bad_epochs"]
        torch.set_rng_state(state["torch_rng"])
        self.generator.set_state(state["generator"])
        return state["epoch"]

    def fraction(self, epoch: int, within: float) -> float:
        return (epoch - 1 + within) / self.config.n_epochs

    def timings(self) -> dict:
        return {}


def _epoch_line(record: dict, epochs: int) -> str:
    def fmt(value, pattern):
        return "—" if value is None else format(value, pattern)

    return (f"epoch {record['epoch']}/{epochs}  train loss {fmt(record['train_loss'], '.4f')} acc {fmt(record['train_acc'], '.3f')}"
            f"  valid loss {fmt(record['valid_loss'], '.4f')} acc {fmt(record['valid_acc'], '.3f')}"
            f"  {fmt(record['images_per_s'], '.1f')} img/s")


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> int:
    return int((logits.argmax(1) == labels).sum())


class FrozenRun(BaseRun):
    """Backbone frozen: features computed once (or read from the cache), then only the head trains."""

    frozen = True
    FEATURES_SHARE = 0.85  # of the progress bar, when features must be computed

    def prepare(self, train_split, valid_split, test_split):
        from core.features import extract_features

        self.splits = {"train": train_split, "valid": valid_split, "test": test_split}
        paths = train_split.paths + valid_split.paths + test_split.paths
        views = TTA_VIEWS[self.config.test_views]
        self.features = {}
        started = time.perf_counter()
        for n, view in enumerate(views):
            named = "" if view == "plain" else f" ({view})"

            def report(state, n=n, named=named):
                within = (n + state["done"] / state["total"]) / len(views)
                self.progress(stage="features", fraction=self.FEATURES_SHARE * within,
                              images_per_s=state["images_per_s"], data_wait_fraction=state["data_wait_fraction"],
                              message=f"Computing features {state['done']}/{state['total']}{named}")

            self.progress(force=True, stage="features", message="Reading cached features")
            result = extract_features(self.model.backbone, self.meta, paths, device=self.device,
                                      batch_size=128 if self.device.type == "cuda" else 32,
                                      num_workers=self.config.num_workers, view=view,
                                      on_progress=report, should_stop=self.should_stop)
            if result.computed:
                # Throttled reports can all fall inside one interval on a small set: always report the final speed.
                self.progress(force=True, stage="features", fraction=self.FEATURES_SHARE * (n + 1) / len(views),
                              images_per_s=result.computed / max(result.seconds, 1e-9),
                              message=f"Computed features of {result.computed} photos")
            self.log(f"features{named}: {result.hits} from the cache, {result.computed} computed "
                     f"in {result.seconds:.1f} s" + (f" ({result.computed / result.seconds:.1f} img/s)" if result.computed else ""))
            for i, reason in result.errors.items():
                self.skipped[paths[i]] = reason
            self.features[view] = result.features
            self.feature_seconds = time.perf_counter() - started
            self.cache_hits, self.computed = result.hits, result.computed
        self.model.backbone.to(self.device).eval()
        self.model.head.to(self.device)
        # Split the feature rows back per split, dropping unreadable photos.
        self.tensors = {}
        offset = 0
        for name, split in self.splits.items():
            rows = range(offset, offset + len(split.paths))
            keep = [i for i in rows if paths[i] not in self.skipped]
            self.tensors[name] = (torch.stack([self.features[v][keep] for v in views], 1) if keep
                                  else torch.zeros(0, len(views), self.meta["feature_dim"]),
                                  torch.as_tensor(split.labels[[i - offset for i in keep]], dtype=torch.long))
            offset += len(split.paths)

    def train_labels(self):
        return self.tensors["train"][1].numpy()

    def steps_per_epoch(self):
        return max(1, math.ceil(len(self.tensors["train"][1]) / self.config.batch_size))

    def train_epoch(self, epoch):
        features, labels = self.tensors["train"]
        n = len(labels)
        if self.config.balance == "sampler":
            order = torch.as_tensor(list(balanced_sampler(labels.numpy(), self.generator)))
        else:
            order = torch.randperm(n, generator=self.generator)
        self.model.head.train()
        total_loss, correct, started = 0.0, 0, time.perf_counter()
        for start in range(0, n, self.config.batch_size):
            batch = order[start:start + self.config.batch_size]
            x = features[batch]
            # With mirrored views cached, each photo is seen in one of its views at random.
            pick = torch.randint(0, x.shape[1], (len(batch),), generator=self.generator) if self.config.augment else torch.zeros(len(batch), dtype=torch.long)
            x = x[torch.arange(len(batch)), pick].to(self.device)
            y = labels[batch].to(self.device)
            logits = self.model.head(x)
            loss = self.criterion(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.scheduler.step()
            total_loss += loss.item() * len(batch)
            correct += _accuracy(logits, y)
        seconds = time.perf_counter() - started
        self.progress(fraction=self.FEATURES_SHARE + (1 - self.FEATURES_SHARE - 0.03) * epoch / self.config.n_epochs)
        return {"train_loss": total_loss / max(n, 1), "train_acc": correct / max(n, 1),
                "images_per_s": n / max(seconds, 1e-9), "data_wait_fraction": 0.0, "seconds": seconds}

    def probabilities(self, name: str) -> torch.Tensor:
        features, _ = self.tensors[name]
        self.model.head.eval()
        with torch.no_grad():
            views = [self.model.head(features[:, v].to(self.device)).float().softmax(1) for v in range(features.shape[1])]
        return (sum(views) / len(views)).cpu()

    def validate_epoch(self):
        _, labels = self.tensors["valid"]
        if not len(labels):
            return {"valid_loss": None, "valid_acc": None}
        self.model.head.eval()
        with torch.no_grad():
            logits = self.model.head(self.tensors["valid"][0][:, 0].to(self.device))
            loss = float(self.eval_criterion(logits, labels.to(self.device)))
        probs = self.probabilities("valid")
        return {"valid_loss": loss, "valid_acc": float((probs.argmax(1) == labels).float().mean())}

    def score(self, name, split) -> dict:
        _, labels = self.tensors[name]
        probs = self.probabilities(name).numpy()
        classes = self.meta["classes"]
        truth = [classes[i] for i in labels.tolist()]
        predicted = [classes[i] for i in probs.argmax(1).tolist()] if len(probs) else []
        return compute_metrics(truth, predicted, classes, probs if len(probs) else None)

    def timings(self):
        return {"feature_seconds": round(self.feature_seconds, 2), "feature_cache_hits": self.cache_hits,
                "features_computed": self.computed}


class FinetuneRun(BaseRun):
    """The whole network trains on augmented photos; the backbone at a lower learning rate."""

    def prepare(self, train_split, valid_split, test_split):
        cuda = self.device.type == "cuda"
        # channels_last speeds up GPU training; on CPU its backward pass measured slower, so only there.
        self.memory_format = torch.channels_last if cuda else torch.contiguous_format
        self.model.to(self.device).to(memory_format=self.memory_format)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda)
        workers = default_workers() if self.config.num_workers is None else self.config.num_workers
        transform = train_transform(self.meta) if self.config.augment else eval_transform(self.meta)
        train_set = PhotoDataset(train_split.paths, train_split.labels, transform)
        sampler = balanced_sampler(train_split.labels, self.generator) if self.config.balance == "sampler" else None
        self.train_loader = torch.utils.data.DataLoader(
            train_set, batch_size=self.config.batch_size, shuffle=sampler is None, sampler=sampler,
            num_workers=workers, persistent_workers=workers > 0, pin_memory=cuda, generator=self.generator,
            drop_last=len(train_set) % self.config.batch_size == 1)  # BatchNorm cannot train on a batch of one
        self.train_split, self.valid_split = train_split, valid_split
        self.valid_loader = self._eval_loader(valid_split, workers)

    def _eval_loader(self, split, workers):
        if not split.paths:
            return None
        return torch.utils.data.DataLoader(PhotoDataset(split.paths, split.labels, eval_transform(self.meta)),
                                           batch_size=self.config.batch_size, num_workers=workers,
                                           pin_memory=self.device.type == "cuda")

    def train_labels(self):
        return self.train_split.labels

    def steps_per_epoch(self):
        return max(1, len(self.train_loader))

    def _batch(self, images, labels, errors, paths):
        """Move a batch to the device, dropping (and recording) photos that could not be read."""
        ok = torch.tensor([not e for e in errors], dtype=torch.bool)
        for index, error in zip(range(len(errors)), errors):
            if error:
                self.skipped[paths[index]] = error
        images, labels = images[ok], labels[ok]
        images = images.to(self.device, non_blocking=True).to(memory_format=self.memory_format)
        return images, labels.to(self.device, non_blocking=True)

    def train_epoch(self, epoch):
        self.model.train()
        total_loss, correct, seen, wait = 0.0, 0, 0, 0.0
        started = tick = time.perf_counter()
        steps = len(self.train_loader)
        cuda = self.device.type == "cuda"
        for step, (images, labels, index, errors) in enumerate(self.train_loader, 1):
            wait += time.perf_counter() - tick
            self.check_stop()
            images, labels = self._batch(images, labels, errors, [self.train_split.paths[i] for i in index.tolist()])
            if len(labels) > 1:
                with torch.autocast("cuda", enabled=cuda):
                    logits = self.model(images)
                    loss = self.criterion(logits, labels)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                total_loss += loss.item() * len(labels)
                correct += _accuracy(logits, labels)
                seen += len(labels)
            self.scheduler.step()
            elapsed = time.perf_counter() - started
            self.progress(fraction=0.95 * self.fraction(epoch, step / steps), train_loss=total_loss / max(seen, 1),
                          train_acc=correct / max(seen, 1), images_per_s=seen / max(elapsed, 1e-9),
                          data_wait_fraction=wait / max(elapsed, 1e-9),
                          message=f"Epoch {epoch}/{self.config.n_epochs}, batch {step}/{steps}")
            tick = time.perf_counter()
        elapsed = time.perf_counter() - started
        return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
                "images_per_s": seen / max(elapsed, 1e-9), "data_wait_fraction": wait / max(elapsed, 1e-9),
                "seconds": elapsed}

    def validate_epoch(self):
        if self.valid_loader is None:
            return {"valid_loss": None, "valid_acc": None}
        self.model.eval()
        total_loss, correct, seen = 0.0, 0, 0
        with torch.inference_mode():
            for images, labels, index, errors in self.valid_loader:
                self.check_stop()
                images, labels = self._batch(images, labels, errors, [self.valid_split.paths[i] for i in index.tolist()])
                if not len(labels):
                    continue
                with torch.autocast("cuda", enabled=self.device.type == "cuda"):
                    logits = self.model(images)
                total_loss += float(self.eval_criterion(logits.float(), labels)) * len(labels)
                correct += _accuracy(logits, labels)
                seen += len(labels)
        return {"valid_loss": total_loss / max(seen, 1), "valid_acc": correct / max(seen, 1)}

    def score(self, name, split) -> dict:
        from core.inference import predict_probabilities

        def report(state):
            self.progress(message=f"Scoring the {name} split {state['done']}/{state['total']}")

        probs, errors = predict_probabilities(self.model, self.meta, split.paths, self.config.batch_size,
                                              self.device, self.config.num_workers, report, self.should_stop)
        for i, reason in errors.items():
            self.skipped[split.paths[i]] = reason
        keep = [i for i in range(len(split.paths)) if i not in errors]
        classes = self.meta["classes"]
        truth = [classes[split.labels[i]] for i in keep]
        predicted = [classes[int(probs[i].argmax())] for i in keep]
        return compute_metrics(truth, predicted, classes, probs[keep] if keep else None)
