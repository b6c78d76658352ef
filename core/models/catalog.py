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
HEADS = ("linear", "mlp")

# A bin's count does not change when its photo is mirrored either way: these views feed test-time augmentation.
VIEW_DIMS = {"plain": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}
TTA_VIEWS = {"none": ("plain",), "hflip": ("plain", "hflip"), "flips": ("plain", "hflip", "vflip", "hvflip")}
