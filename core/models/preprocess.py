"""The one photo preprocessing shared by training, evaluation and prediction, described by a model's meta."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2

from core.data.photos.images import ImageError, load_image
from core.gpu import cpu_cores
from core.models.catalog import TTA_VIEWS, VIEW_DIMS

PREPROCESS_VERSION = 1
DEFAULT_IMAGE_SIZE = 224
DEFAULT_ASPECT = 1.0


def input_size(meta: dict) -> tuple[int, int]:
    """(height, width) the network sees: image_size high, image_size × aspect wide (whole photo, no crop)."""
    if meta.get("input_size"):
        height, width = meta["input_size"]
        return int(height), int(width)
    height = int(meta.get("image_size", DEFAULT_IMAGE_SIZE))
    return height, int(round(height * float(meta.get("aspect", DEFAULT_ASPECT))))


def preprocessing(backbone_info: dict, image_size: int, aspect: float = DEFAULT_ASPECT) -> dict:
    """The preprocessing entries of a model's meta."""
    height = int(image_size)
    return {"image_size": height, "aspect": float(aspect), "input_size": [height, int(round(height * aspect))],
            "mean": list(backbone_info["mean"]), "std": list(backbone_info["std"]), "resize": "squash",
            "interpolation": "bilinear", "preprocess_version": PREPROCESS_VERSION}


def tta_views(meta: dict) -> tuple[str, ...]:
    """The views a model's prediction averages over (older models saved a tta_flip flag instead)."""
    if meta.get("tta") in TTA_VIEWS:
        return TTA_VIEWS[meta["tta"]]
    return TTA_VIEWS["hflip" if meta.get("tta_flip") else "none"]


def view_of(images: torch.Tensor, view: str) -> torch.Tensor:
    """A batch (or one photo) as seen in `view`: itself or mirrored left-right, top-bottom or both."""
    dims = VIEW_DIMS[view]
    return images.flip(dims) if dims else images


def preprocessing_key(meta: dict) -> str:
    """A stable string for everything that changes the tensor a photo becomes (for feature caches)."""
    keys = ("input_size", "mean", "std", "resize", "interpolation", "preprocess_version")
    return json.dumps({k: meta.get(k) for k in keys} | {"input_size": list(input_size(meta))}, sort_keys=True)


def _to_tensor(meta: dict) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(meta["mean"], meta["std"])]


def eval_transform(meta: dict) -> v2.Compose:
    """Resize the whole photo to the input size (counting needs every item in view), then normalise."""
    return v2.Compose([v2.Resize(input_size(meta), antialias=True), *_to_tensor(meta)])


def train_transform(meta: dict) -> v2.Compose:
    """Mild augmentation: a crop keeping ≥ 85 % of the photo, left-right and top-bottom flips, colour jitter."""
    height, width = input_size(meta)
    ratio = width / height
    # Squash first, as at evaluation, so the random crop's aspect ratio is relative to the squashed photo.
    return v2.Compose([
        v2.Resize((height, width), antialias=True),
        v2.RandomResizedCrop((height, width), scale=(0.85, 1.0), ratio=(ratio * 0.9, ratio * 1.1), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02),
        *_to_tensor(meta),
    ])


def photo_tensor(photo: str | Path | Image.Image, meta: dict) -> torch.Tensor:
    """One photo (path or PIL image) as the normalised C×H×W tensor the model expects."""
    image = photo if isinstance(photo, Image.Image) else load_image(photo)
    return eval_transform(meta)(image.convert("RGB"))


def default_workers() -> int:
    """DataLoader workers for this machine: one core is left to the main process (which runs the model)."""
    return max(0, min(8, cpu_cores() - 1))


class PhotoDataset(torch.utils.data.Dataset):
    """Photos as (tensor, label, index, error): an unreadable photo yields a zero tensor and its error message."""

    def __init__(self, paths, labels=None, transform=None, view: str = "plain"):
        self.paths = [str(p) for p in paths]
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.transform = transform
        self.view = view
        self.shape = None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            tensor = self.transform(load_image(self.paths[index]))
            error = ""
        except ImageError as exc:
            tensor, error = None, str(exc)
        except Exception as exc:  # a decoder failure on a damaged file must not stop the other photos
            tensor, error = None, f"{Path(self.paths[index]).name}: cannot be read ({exc})"
        if tensor is None:
            tensor = torch.zeros(self._shape())
        else:
            tensor = view_of(tensor, self.view)
        return tensor, self.labels[index], index, error

    def _shape(self):
        if self.shape is None:
            size = (64, 64)
            for step in self.transform.transforms:
                if isinstance(step, (v2.Resize, v2.RandomResizedCrop)):
                    size = tuple(step.size) if len(step.size) == 2 else (step.size[0], step.size[0])
            self.shape = (3, *size)
        return self.shape
