"""What models can be built, without importing torch: backbones with their weights' normalisation, heads, views."""
from __future__ import annotations

from dataclasses import dataclass

CHECKPOINT_FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The EfficientNet-Lite weights are a port of Google's TensorFlow checkpoints: they expect inputs scaled to
# [-1, 1], TF "same" padding and BatchNorm eps 1e-3, which is what timm's tf_ variants build.
TF_MEAN = (0.5, 0.5, 0.5)
TF_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    family: str          # "timm", "torchvision" or "scratch"
    arch: str            # timm model name or torchvision constructor name
    feature_dim: int
    mean: tuple
    std: tuple
    pretrained: bool     # whether the backbone comes with ImageNet weights


BACKBONES = {
    "efficientnet_lite0": BackboneSpec("efficientnet_lite0", "timm", "tf_efficientnet_lite0", 1280, TF_MEAN, TF_STD, True),
    "efficientnet_lite1": BackboneSpec("efficientnet_lite1", "timm", "tf_efficientnet_lite1", 1280, TF_MEAN, TF_STD, True),
    "efficientnet_lite2": BackboneSpec("efficientnet_lite2", "timm", "tf_efficientnet_lite2", 1280, TF_MEAN, TF_STD, True),
    "resnet50": BackboneSpec("resnet50", "torchvision", "resnet50", 2048, IMAGENET_MEAN, IMAGENET_STD, True),
    "resnet18": BackboneSpec("resnet18", "torchvision", "resnet18", 512, IMAGENET_MEAN, IMAGENET_STD, True),
    "simple_cnn": BackboneSpec("simple_cnn", "scratch", "simple_cnn", 1024, IMAGENET_MEAN, IMAGENET_STD, False),
}
HEADS = ("linear", "normlinear", "mlp")


@dataclass(frozen=True)
class FeatureSet:
    """Which of the backbone's stages a model reads, and how each is pooled into the feature vector."""

    name: str
    description: str
    taps: tuple  # ((stage, (pooling, ...)), ...); empty: the backbone's own pooled last layer

    def dim(self, channels: dict) -> int:
        """The feature vector's length, given each stage's channels."""
        return sum(channels[stage] * POOLING_SIZES[pool] for stage, pools in self.taps for pool in pools)

    def columns(self, channels: dict, parts) -> list[int]:
        """The positions in the feature vector of some of its (stage, pooling) parts, in vector order."""
        wanted, found, start = {tuple(part) for part in parts}, [], 0
        for stage, pools in self.taps:
            for pool in pools:
                width = channels[stage] * POOLING_SIZES[pool]
                if (stage, pool) in wanted:
                    found.extend(range(start, start + width))
                start += width
        return found

    def taps_list(self) -> list:
        """The taps as JSON (stored in model.pt and in feature cache keys, so a later change of a named set never
        reads old vectors or weights as new ones)."""
        return [[stage, list(pools)] for stage, pools in self.taps]

    @classmethod
    def from_taps(cls, name: str, taps: list) -> FeatureSet:
        return cls(name, "as saved", tuple((stage, tuple(pools)) for stage, pools in taps))


# A pooling's output size per channel: the mean over the photo, or over each cell of a 2×2 grid.
POOLING_SIZES = {"mean": 1, "grid2": 4}
# Counting lives in the middle of the backbone more than at its end: the stride-16 stage keeps where things are
# (a probe on ABID: 40 % balanced accuracy on valid from it against 32 % from the last layer).
FEATURE_SETS = {
    "pooled": FeatureSet("pooled", "the last layer, averaged over the photo (the classic transfer-learning features)",
                         ()),
    "multilevel": FeatureSet("multilevel", "the middle (stride-16) and last (stride-32) stages, each averaged over "
                             "the photo and over a 2×2 grid, so the head sees where things are",
                             (("stride16", ("mean", "grid2")), ("stride32", ("mean", "grid2")))),
}
# The channels of each stage the feature sets can tap, per backbone family's architectures.
STAGE_CHANNELS = {
    "tf_efficientnet_lite0": {"stride8": 40, "stride16": 112, "stride32": 320},
    "tf_efficientnet_lite1": {"stride8": 40, "stride16": 112, "stride32": 320},
    "tf_efficientnet_lite2": {"stride8": 48, "stride16": 120, "stride32": 352},
    "resnet18": {"stride8": 128, "stride16": 256, "stride32": 512},
    "resnet50": {"stride8": 512, "stride16": 1024, "stride32": 2048},
}

# A bin's count does not change when its photo is mirrored either way: these views feed test-time augmentation.
VIEW_DIMS = {"plain": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}
TTA_VIEWS = {"none": ("plain",), "hflip": ("plain", "hflip"), "flips": ("plain", "hflip", "vflip", "hvflip")}
