"""The training parameter contract (TrainConfig): each field with its help, choices, CLI flag, place on the Train page
and search space, which the CLI, the page, job params and the search derive from; importing it does not import torch."""
from __future__ import annotations

import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, replace

from core import gpu
from core.errors import BinsightError
from core.models.catalog import BACKBONES, FEATURE_SETS, HEADS, TTA_VIEWS

MODES = ("frozen", "finetune", "partial")
BALANCE = ("none", "weights", "sampler")
LOSSES = ("ce", "emd")
SCHEDULES = ("cosine", "onecycle")
OPTIMIZERS = ("adamw", "adam")
DEVICES = ("auto", "cpu", "cuda")  # cuda:N is accepted too
DEFAULT_EPOCHS = {"frozen": 40, "finetune": 6, "partial": 8}
DEFAULT_LR = {"frozen": 1e-4, "finetune": 1e-3, "partial": 1e-3}
# (height px, width / height). Fine-tuning gains from the bins' own shape at a higher resolution (bench/RESULTS.md);
# frozen features did not, so frozen stays at the backbone's native, cheaper 224².
DEFAULT_INPUT = {"frozen": (224, 1.0), "finetune": (288, 1.37), "partial": (288, 1.37)}
# Test-time views: the four mirror images help fine-tuned models; for frozen features they cost 4× the extraction.
# Partial fine-tuning reads the stage maps stored for the photo and its left-right mirror: those are its views.
DEFAULT_TTA = {"frozen": "none", "finetune": "flips", "partial": "hflip"}
# Which stages of the backbone the head reads (core.models.catalog.FEATURE_SETS).
# Measured on ../shared/abid (224 px, 2 seeds): multilevel 35.6 % valid / 37.1 % test against pooled 35.6 % / 38.0 %,
# no gain for a larger input, so the frozen default stays pooled (docs/training.md).
DEFAULT_FEATURES = {"frozen": "pooled", "finetune": "pooled", "partial": "pooled"}
# Weight averaging: partial fine-tunes fit in 2-4 epochs and then over-fit; the average of the weights along the way
# validated best (bench/RESULTS.md). Full fine-tunes keep it off.
DEFAULT_EMA = {"frozen": 0.0, "finetune": 0.0, "partial": 0.99}
# Partial fine-tuning: where the backbone is cut (the blocks after it train), chosen on valid (bench/RESULTS.md).
CUTS = ("blocks.4", "blocks.5")
DEFAULT_CUT = "blocks.5"
PARTIAL_VIEWS = ("none", "hflip")
PARTIAL_BACKBONES = tuple(name for name in BACKBONES if name.startswith("efficientnet_lite"))
# Without a dataset version's own recommendation, the loss is weighted by inverse class frequency.
FALLBACK_BALANCE = "weights"

# Where a setting shows on the Train page: in the main form, in its "Advanced" expander, or not at all.
MAIN, ADVANCED, HIDDEN = "main", "advanced", None


def setting(default, help: str, *, choices=None, open_choices: bool = False, flag: str | None = None,
            label: str | None = None, page: str | None = ADVANCED, search: dict | None = None,
            required: bool = False, in_job: bool = True, step: float | None = None, what: str | None = None):
    """A TrainConfig field with the metadata every interface derives from.

    choices: the allowed values (open_choices: others pass too, validate() judges them); flag: the CLI option
    (default --field-name; a bool that defaults to True gets --no-field-name); page: MAIN, ADVANCED or HIDDEN;
    search: {"log_uniform": (low, high)} or {"choice": (values...)}; required: a CLI `train` must give it;
    in_job: whether job params carry it; what: the setting's name in problem messages.
    """
    metadata = {"help": help, "choices": tuple(choices) if choices is not None else None, "open_choices": open_choices,
                "flag": flag, "label": label, "page": page, "search": search, "required": required,
                "in_job": in_job, "step": step, "what": what}
    return field(default=default, metadata=metadata)


class TrainingError(BinsightError):
    """The configuration or the data cannot be used; the message says why."""


def _modes(defaults: dict) -> str:
    return ", ".join(f"{value} {mode}" for mode, value in defaults.items())


@dataclass
class TrainConfig:
    data: str | None = setting(None, "dataset folder (ABID layout, ImageFolder or file_list.json)",
                               required=True, page=HIDDEN)
    out: str | None = setting(None, "run folder for model.pt, metrics.json, config.json, log.txt",
                              required=True, page=HIDDEN, in_job=False)
    backbone: str = setting("efficientnet_lite0", "the ImageNet-pretrained network under the counting head",
                            choices=BACKBONES, label="Backbone", page=MAIN)
    mode: str = setting("frozen", "frozen: backbone frozen, features computed once (minutes on a CPU); "
                        "finetune: the whole network learns (slow on a CPU, for GPUs); partial: the backbone's last "
                        "stages and the head learn on stage maps computed once per photo (fast on a CPU)",
                        choices=MODES, label="Mode", page=MAIN)
    epochs: int | None = setting(None, f"passes over the training set (default: {_modes(DEFAULT_EPOCHS)})",
                                 label="Epochs", page=MAIN)
    batch_size: int = setting(32, "photos per training step", label="Batch size", page=MAIN,
                              search={"choice": (16, 32, 64, 128, 256)})
    lr: float | None = setting(None, f"learning rate, the head's in finetune mode (default: {_modes(DEFAULT_LR)})",
                               label="Learning rate", page=MAIN, search={"log_uniform": (0.001, 0.1)},
                               what="the learning rate")
    backbone_lr_factor: float = setting(0.3, "finetune: the backbone learns at lr × this",
                                        label="Backbone learning-rate factor", step=0.05)
    weight_decay: float = setting(0.01, "AdamW/Adam weight decay", label="Weight decay", step=0.005)
    optimizer: str = setting("adamw", "the optimizer", choices=OPTIMIZERS, label="Optimizer")
    schedule: str = setting("cosine", "learning-rate schedule over the epochs", choices=SCHEDULES,
                            label="Schedule")
    image_size: int | None = setting(None, "input height in pixels (default: "
                                     + ", ".join(f"{h} {m}" for m, (h, _) in DEFAULT_INPUT.items()) + ")",
                                     label="Image height (px)", page=MAIN, what="the image size")
    aspect: float | None = setting(None, "input width / height; bin photos are about 1.37 times wider than high, "
                                   "keeping that shape helps fine-tuning (default: "
                                   + ", ".join(f"{a:g} {m}" for m, (_, a) in DEFAULT_INPUT.items()) + ")",
                                   label="Shape (width ÷ height)", page=MAIN, what="the aspect ratio")
    balance: str | None = setting(None, "weights: loss weighted by inverse class frequency; sampler: rare classes "
                                  "drawn more often (default: the dataset version's recommendation, else weights)",
                                  choices=BALANCE, label="Balancing", page=MAIN)
    loss: str = setting("emd", "emd (earth mover's distance): cross-entropy + a count-aware term, costlier the "
                               "further the predicted count is from the truth; ce: plain cross-entropy",
                        choices=LOSSES, label="Loss")
    label_smoothing: float = setting(0.0, "label smoothing of the cross-entropy, in [0, 1)",
                                     label="Label smoothing", step=0.05)
    head: str = setting("mlp", "the classifier on the backbone's features", choices=HEADS, label="Head")
    features: str | None = setting(None, "what the head reads: multilevel (the backbone's middle and last stages, "
                                   "averaged over the photo and over a 2×2 grid, so it sees where things are) or pooled "
                                   "(the last layer averaged over the photo; default: " + _modes(DEFAULT_FEATURES) + ")",
                                   choices=FEATURE_SETS, label="Features", what="the feature set")
    ema: float | None = setting(None, "fine-tuning: the weights validated, kept and used are an exponential moving "
                                "average of the trained ones, with this decay per step (e.g. 0.99: about the last 100 "
                                "steps; 0: off; default: " + _modes(DEFAULT_EMA) + ")",
                                label="Weight averaging (EMA decay)", step=0.001, what="the EMA decay")
    cut: str = setting(DEFAULT_CUT, "partial: the blocks after this one train, the ones up to it stay frozen",
                       choices=CUTS, label="Cut point (partial)", what="the cut point")
    batchnorm: str = setting("train", "partial: the trained blocks' batch-norm statistics are updated from each batch "
                             "(train) or kept as ImageNet left them (frozen)", choices=("train", "frozen"),
                             label="Batch-norm statistics (partial)", what="the batch-norm choice")
    map_augment: str = setting("vflip", "partial: count-preserving changes of the stage maps in training, on top of "
                               "the photo's left-right mirror: vflip (top-bottom mirror), vflip+crop (and a random crop "
                               "of up to two cells a side), none", choices=("none", "vflip", "vflip+crop"),
                               label="Stage-map augmentation (partial)", what="the stage-map augmentation")
    ensemble: int = setting(1, "partial: train this many models with seeds seed, seed+1, … on the same stage maps and "
                            "average their probabilities (one model file, one calibration)",
                            label="Ensemble size (partial)", what="the ensemble size")
    also_backbone: str | None = setting(None, "partial ensembles: train as many members again on this second "
                                        "EfficientNet-Lite (e.g. efficientnet_lite2) and average all of them; each "
                                        "backbone's frozen stages run once", choices=PARTIAL_BACKBONES,
                                        label="Second backbone (partial ensemble)", what="the second backbone")
    refit: bool = setting(False, "partial ensembles: one run per backbone chooses the epoch on valid, then every "
                          "member trains on train and valid together for that many epochs; the choosing runs' valid "
                          "predictions calibrate the ensemble and give its valid figures",
                          label="Refit on train and valid (partial ensemble)")
    exclude_suspects: bool = setting(False, "leave the photos flagged as likely wrong counts (Data health page, "
                                     "`python -m core health`) out of the training split; valid and test keep them",
                                     label="Leave out likely wrong counts")
    exclude_uncountable: bool = setting(False, "leave the photos a reviewer marked “items hidden” (the record is right "
                                        "but the items cannot be counted from the photo; Spot-check) out of the "
                                        "training split; valid and test keep them", label="Leave out uncountable photos")
    augment: bool = setting(True, "augment training photos (crop, left-right and top-bottom flips, colour jitter)",
                            label="Augment training photos")
    tta: str | None = setting(None, "test-time augmentation: average each photo's prediction over its mirror images "
                              "(flips: left-right, top-bottom and both; hflip: left-right only; default: "
                              + ", ".join(f"{v} {m}" for m, v in DEFAULT_TTA.items()) + ")",
                              choices=TTA_VIEWS, label="Test-time views", page=MAIN, what="test-time augmentation")
    device: str = setting("auto", "where to train: auto picks a CUDA GPU when there is one (cuda:N also accepted)",
                          choices=DEVICES, open_choices=True, label="Device", page=MAIN)
    seed: int = setting(0, "random seed", label="Seed")
    weights: str | None = setting(None, "backbone weights file (.pth), e.g. for resnet50/resnet18", page=HIDDEN)
    resume: bool = setting(False, "continue the run in --out from its last checkpoint", page=HIDDEN, in_job=False)
    patience: int = setting(8, "early stopping: epochs without a better valid loss before stopping (0: off)",
                            label="Early-stopping patience (epochs)")
    num_workers: int | None = setting(None, "DataLoader workers (default: cores − 1)", flag="--workers", page=HIDDEN)
    processes: int = setting(1, "training processes per machine (DistributedDataParallel under torchrun; one per GPU "
                             "on GPUs); the batch size is per process and the learning rate scales with the total",
                             label="Processes", what="the number of processes")
    nnodes: int = setting(1, "machines taking part (each starts the same command; needs --rendezvous)", page=HIDDEN,
                          what="the number of machines")
    # --rendezvous, not --rdzv: torchrun reads the command after it too, and would take --rdzv for its --rdzv-…
    rdzv: str | None = setting(None, "HOST:PORT where the machines of a several-machine run meet (c10d rendezvous)",
                               flag="--rendezvous", page=HIDDEN, what="the rendezvous address")
    on_bad_shard: str = setting("stop", "training from shards: stop at a damaged shard, or skip the rest of it",
                                choices=("stop", "skip"), label="On a damaged shard", what="the bad-shard choice")

    @property
    def member_backbones(self) -> list[str]:
        """The backbones an ensemble's members train on, `ensemble` members each."""
        return [self.backbone] + ([self.also_backbone] if self.also_backbone else [])

    @property
    def n_epochs(self) -> int:
        return self.epochs if self.epochs is not None else DEFAULT_EPOCHS.get(self.mode, 10)

    @property
    def expected_refit_epochs(self) -> int:
        """How long a refit member is expected to train before valid has chosen: half the schedule, where valid chose
        in every measured partial run (epoch 4 of 8, bench/RESULTS.md)."""
        return max(1, self.n_epochs // 2)

    @property
    def test_views(self) -> str:
        return self.tta if self.tta is not None else DEFAULT_TTA.get(self.mode, "none")

    @property
    def feature_set(self) -> str:
        if self.features is not None:
            return self.features
        return "pooled" if self.backbone == "simple_cnn" else DEFAULT_FEATURES.get(self.mode, "pooled")

    @property
    def input_height(self) -> int:
        default_height, _ = DEFAULT_INPUT.get(self.mode, DEFAULT_INPUT["frozen"])
        return self.image_size if self.image_size is not None else default_height

    @property
    def input_aspect(self) -> float:
        _, default_aspect = DEFAULT_INPUT.get(self.mode, DEFAULT_INPUT["frozen"])
        return self.aspect if self.aspect is not None else default_aspect

    @property
    def ema_decay(self) -> float:
        return self.ema if self.ema is not None else DEFAULT_EMA.get(self.mode, 0.0)

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR.get(self.mode, 1e-3)

    def validate(self, n_train: int | None = None, cuda_available: bool | None = None) -> list[str]:
        """Human-readable problems with this configuration (empty when it can be trained): the one place they are
        found. cuda_available: whether a GPU can be used (None: ask this machine)."""
        problems = []

        def check(ok, message):
            if not ok:
                problems.append(message)

        for item in settings(type(self)):
            value = getattr(self, item.name)
            if item.choices and not item.open_choices and not (value is None and item.default is None):
                check(value in item.choices, f"unknown {item.what} {value!r} (choose {_one_of(item.choices)})")
        check(not (self.mode == "frozen" and self.backbone == "simple_cnn"),
              "simple_cnn has no pretrained weights to freeze: train it with --mode finetune")
        check(not (self.backbone == "simple_cnn" and self.feature_set != "pooled"),
              "simple_cnn has no stages to read: use --features pooled with it")
        check(self.n_epochs >= 1, f"epochs must be at least 1 (got {self.n_epochs})")
        check(self.learning_rate > 0, f"the learning rate must be positive (got {self.learning_rate})")
        check(0 < self.backbone_lr_factor <= 1, "the backbone learning-rate factor must be in (0, 1]")
        check(self.weight_decay >= 0, "weight decay cannot be negative")
        check(self.batch_size >= 1, f"the batch size must be at least 1 (got {self.batch_size})")
        check(32 <= self.input_height <= 1024, f"the image size must be between 32 and 1024 pixels (got {self.input_height})")
        check(0.25 <= self.input_aspect <= 4, f"the aspect ratio must be between 0.25 and 4 (got {self.input_aspect})")
        check(0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1) (got {self.label_smoothing})")
        check(0 <= self.ema_decay < 1, f"the EMA decay must be in [0, 1) (got {self.ema_decay})")
        check(self.ema_decay == 0 or self.mode != "frozen", "weight averaging (--ema) is for fine-tuning: a frozen run's "
              "head trains in seconds and is chosen by its valid loss")
        check(self.ensemble >= 1, f"the ensemble size must be at least 1 (got {self.ensemble})")
        check(self.ensemble == 1 or self.mode == "partial", "ensembles (--ensemble) are of partial fine-tunes: use "
              "--mode partial")
        if self.mode == "partial":
            check(self.backbone.startswith("efficientnet_lite"), "partial fine-tuning reads the EfficientNet-Lite "
                  "stages: choose efficientnet_lite0, efficientnet_lite1 or efficientnet_lite2")
            check(self.test_views in PARTIAL_VIEWS, "partial fine-tuning stores each photo's maps plain and mirrored "
                  f"left-right: choose the test-time views none or hflip (got {self.test_views})")
            check(not (self.feature_set == "multilevel" and self.cut == "blocks.5"),
                  "the multilevel features read the stride-16 stage (blocks.4): cut at blocks.4 for them")
        check(self.also_backbone is None or (self.mode == "partial" and self.also_backbone != self.backbone),
              "a second backbone (--also-backbone) is for partial ensembles, and another than --backbone")
        check(self.also_backbone is None or self.weights is None,
              "a second backbone reads its packaged ImageNet weights: leave out --weights")
        check(not self.refit or self.mode == "partial", "refitting (--refit) is for partial fine-tunes: use "
              "--mode partial")
        check(self.patience >= 0, "patience cannot be negative")
        check(self.num_workers is None or self.num_workers >= 0, "num_workers cannot be negative")
        device = str(self.device)
        check(device in DEVICES or device.startswith("cuda:"), f"unknown device {self.device!r} (choose {_one_of(DEVICES)})")
        if device.startswith("cuda") and not (gpu.cuda_available() if cuda_available is None else cuda_available):
            problems.append("CUDA was asked for but this machine has no usable GPU: choose auto or cpu")
        check(bool(self.out), "an output folder for the run is needed")
        check(self.processes >= 1, f"processes must be at least 1 (got {self.processes})")
        check(self.nnodes >= 1, f"nnodes must be at least 1 (got {self.nnodes})")
        check(self.nnodes == 1 or bool(self.rdzv and ":" in str(self.rdzv)),
              "several machines meet at a rendezvous address: give --rendezvous HOST:PORT")
        if self.processes * self.nnodes > 1:
            check(self.mode == "finetune", "frozen mode computes the features once and trains a small head in seconds: "
                  "train it with processes 1 (several processes help fine-tuning only)")
            check(self.balance != "sampler", "the balanced sampler is not supported with several processes: "
                  "use --balance weights")
        if n_train is not None:
            check(n_train > 0, "the training split holds no labelled photos")
            check(n_train == 0 or self.batch_size <= n_train,
                  f"the batch size ({self.batch_size}) is larger than the training set ({n_train} photos)")
        return problems

    def for_dataset(self, dataset) -> TrainConfig:
        """This configuration with the defaults that depend on the dataset resolved (balance: its recommendation)."""
        if self.balance is not None:
            return self
        return replace(self, balance=default_balance(dataset))

    def to_dict(self) -> dict:
        return asdict(self) | {"epochs": self.n_epochs, "lr": self.learning_rate, "ema": self.ema_decay,
                                "image_size": self.input_height, "aspect": self.input_aspect, "tta": self.test_views,
                                "features": self.feature_set}

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})

    def to_params(self) -> dict:
        """Job params: the settings a job carries, mode defaults resolved; a setting left to the dataset (balance None)
        is left out, so the training resolves it."""
        resolved = self.to_dict()
        return {item.name: resolved[item.name] for item in settings(type(self))
                if item.in_job and resolved[item.name] is not None}

    @classmethod
    def from_params(cls, params: dict, out, device: str | None = None) -> TrainConfig:
        """The configuration job params stand for (keys that are not settings, such as the dataset facts, are
        ignored), writing into `out`, on `device` when given (the worker's slot)."""
        config = cls.from_dict(params)
        config.out = str(out)
        if device:
            config.device = device
        return config


def _one_of(choices) -> str:
    names = [str(c) for c in choices]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def default_balance(dataset) -> str:
    """The balance a training on this dataset gets by default: its version's recommendation, else FALLBACK_BALANCE."""
    from core.data.labels.versions import recommended_balance

    recommended = recommended_balance(dataset)
    return recommended if recommended != "none" else FALLBACK_BALANCE


@dataclass(frozen=True)
class Setting:
    """One TrainConfig field as the interfaces see it (see `setting` for what each piece means)."""

    name: str
    type: type
    default: object
    help: str
    choices: tuple | None
    open_choices: bool
    flag: str
    label: str
    page: str | None
    search: dict | None
    required: bool
    in_job: bool
    step: float | None
    what: str


def _base_type(hint) -> type:
    """int for `int | None`, str for `str`."""
    options = [t for t in typing.get_args(hint) if t is not type(None)] or [hint]
    return options[0]


def settings(cls=None) -> list[Setting]:
    """Every field of TrainConfig (or of a subclass) with its metadata, in declaration order."""
    cls = cls or TrainConfig
    hints = typing.get_type_hints(cls)
    found = []
    for f in fields(cls):
        meta = dict(f.metadata)
        kind = _base_type(hints[f.name])
        default = f.default if f.default is not MISSING else None
        dashed = f.name.replace("_", "-")
        flag = meta.get("flag") or (f"--no-{dashed}" if kind is bool and default is True else f"--{dashed}")
        found.append(Setting(
            name=f.name, type=kind, default=default, help=meta.get("help") or "", choices=meta.get("choices"),
            open_choices=bool(meta.get("open_choices")), flag=flag,
            label=meta.get("label") or f.name.replace("_", " ").capitalize(), page=meta.get("page", ADVANCED),
            search=meta.get("search"), required=bool(meta.get("required")), in_job=meta.get("in_job", True),
            step=meta.get("step"), what=meta.get("what") or f.name.replace("_", " ")))
    return found


def search_space(cls=None) -> dict[str, dict]:
    """The hyperparameter search's space: {field name: {"log_uniform": (low, high)} or {"choice": values}}."""
    return {item.name: item.search for item in settings(cls) if item.search}
