"""The training parameter contract (TrainConfig) and its choice lists; importing it does not import torch."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from core import gpu
from core.errors import BinsightError
from core.models.catalog import BACKBONES, HEADS, TTA_VIEWS

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


class TrainingError(BinsightError):
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

        check(self.backbone in BACKBONES, f"unknown backbone {self.backbone!r} (choose {', '.join(BACKBONES)})")
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
        check(self.head in HEADS, f"unknown head {self.head!r} (choose linear or mlp)")
        check(0 <= self.label_smoothing < 1, f"label smoothing must be in [0, 1) (got {self.label_smoothing})")
        check(self.patience >= 0, "patience cannot be negative")
        check(self.num_workers is None or self.num_workers >= 0, "num_workers cannot be negative")
        check(self.device in ("auto", "cpu") or self.device.startswith("cuda"), f"unknown device {self.device!r} (choose auto, cpu or cuda)")
        if self.device.startswith("cuda") and not gpu.cuda_available():
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
