"""Where the model looked: Grad-CAM heatmaps (the grad-cam package) of a photo for chosen counts, photo-sized."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from core.data.photos.images import load_image
from core.models.networks import CountingModel, ModelError, MultiLevelBackbone, SimpleCNN
from core.models.preprocess import eval_transform


def target_layers(model: CountingModel) -> list[torch.nn.Module]:
    """The layers whose activations the heatmap weighs: the deepest stage a multi-level backbone taps, else the last
    convolutional stage before the backbone's pooling; each member's, for an ensemble (Grad-CAM averages them)."""
    backbone = model.backbone
    if hasattr(backbone, "members"):  # a seed ensemble (core.models.ensemble)
        return [layer for member in backbone.members
                for layer in target_layers(CountingModel(member, model.head))]
    if isinstance(backbone, MultiLevelBackbone):
        return [backbone.net.get_submodule(backbone.steps[-1][0])]
    if isinstance(backbone, SimpleCNN):
        return [backbone.convs]
    if hasattr(backbone, "layer4"):  # torchvision ResNets
        return [backbone.layer4]
    if hasattr(backbone, "bn2"):  # timm EfficientNets: conv_head then bn2 (with its activation), then the pooling
        return [backbone.bn2]
    raise ModelError(f"no heatmap layer known for a {backbone.__class__.__name__} backbone")


def heatmaps(model: CountingModel, meta: dict, photo: str | Path | Image.Image,
             counts: list[int]) -> dict[int, np.ndarray]:
    """{count: heatmap} for each count asked: where the photo's evidence for that count lies, 0–1, of the photo's
    height × width (upright, as shown). One forward and backward pass for all the counts together."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    classes = [int(c) for c in meta["classes"]]
    unknown = [c for c in counts if int(c) not in classes]
    if unknown:
        raise ModelError(f"the model predicts the counts {classes}: no heatmap for {unknown}")
    image = photo if isinstance(photo, Image.Image) else load_image(photo)
    image = image.convert("RGB")
    tensor = eval_transform(meta)(image).unsqueeze(0).repeat(len(counts), 1, 1, 1)
    targets = [ClassifierOutputTarget(classes.index(int(c))) for c in counts]
    model = model.eval()
    layers = target_layers(model)
    # Gradients are needed from the counts back to the layers only: the layers before them get none, which makes the
    # backward pass a fraction of a training step's.
    wanted = {id(p) for layer in layers for p in layer.parameters()} | {id(p) for p in model.head.parameters()}
    was = {p: p.requires_grad for p in model.parameters()}
    try:
        for parameter in model.parameters():
            parameter.requires_grad_(id(parameter) in wanted)
        with GradCAM(model=model, target_layers=layers) as cam:
            maps = cam(input_tensor=tensor, targets=targets)  # counts × input height × input width, each 0–1
    finally:
        for parameter, before in was.items():
            parameter.requires_grad_(before)
    found = {}
    for count, heat in zip(counts, maps):
        # The network saw the photo squashed to its input size: stretch the map back over the photo.
        resized = Image.fromarray(np.float32(heat), mode="F").resize(image.size, Image.BILINEAR)
        found[int(count)] = np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)
    return found


def overlay(photo: str | Path | Image.Image, heat: np.ndarray, strength: float = 0.5,
            box: tuple[int, int] = (480, 360)) -> bytes:
    """The photo with the heatmap laid over it (jet colours, `strength` opaque), letterboxed into `box` as the
    pages' thumbnails are, as JPEG bytes."""
    from matplotlib import colormaps
    from PIL import ImageOps

    image = (photo if isinstance(photo, Image.Image) else load_image(photo)).convert("RGB")
    colours = (colormaps["jet"](heat)[..., :3] * 255).astype(np.uint8)
    blended = Image.blend(image, Image.fromarray(colours).resize(image.size), strength)
    buffer = io.BytesIO()
    ImageOps.pad(blended, box, color=(240, 240, 240)).save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()
