"""ONNX export of a counting model, its test-time views and calibration folded into one graph, cached beside it."""
from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from core import config
from core.files import atomic_write_bytes
from core.models.catalog import VIEW_DIMS
from core.models.networks import ModelError, file_digest, load_model, model_file
from core.models.preprocess import input_size, tta_views

log = logging.getLogger(__name__)
OPSET = 17
EXPORT_VERSION = 1  # bump when the exported graph changes, so cached files are rebuilt


class ExportError(ModelError):
    """A model that cannot be exported to ONNX, or whose exported form disagrees with PyTorch."""


class ViewAveragedModel(nn.Module):
    """photos (N×C×H×W) → class probabilities averaged over the model's test-time views, in one forward pass."""

    def __init__(self, model: nn.Module, views: tuple[str, ...], temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.views = tuple(views)
        self.temperature = float(temperature)  # the calibration fitted after training (core.evaluation.calibration)

    @classmethod
    def of(cls, model: nn.Module, meta: dict) -> "ViewAveragedModel":
        """The model with the views and temperature its meta names, in eval mode."""
        return cls(model.eval(), tta_views(meta), float(meta.get("temperature", 1.0))).eval()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        seen = [images.flip(VIEW_DIMS[v]) if VIEW_DIMS[v] else images for v in self.views]
        batch = torch.cat(seen, 0) if len(seen) > 1 else seen[0]  # every view in one pass: fewer, larger kernels
        probs = (self.model(batch).float() / self.temperature).softmax(1)
        return probs.reshape(len(self.views), -1, probs.shape[1]).mean(0)


def onnx_bytes(model: nn.Module, meta: dict) -> bytes:
    """The model with its views as ONNX: input `images` (batch × 3 × H × W), output `probabilities`."""
    height, width = input_size(meta)
    wrapped = ViewAveragedModel.of(model.cpu(), meta)
    buffer = io.BytesIO()
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice; it needs no onnxscript
        torch.onnx.export(wrapped, (torch.zeros(1, 3, height, width),), buffer, input_names=["images"],
                          output_names=["probabilities"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "probabilities": {0: "batch"}})
    return buffer.getvalue()


def onnx_cache_path(model_path: str | Path) -> Path:
    """model.onnx next to model.pt, or under BINSIGHT_HOME/onnx/ when the run folder cannot be written."""
    model_path = Path(model_path)
    beside = model_path.with_suffix(".onnx")
    if os.access(model_path.parent, os.W_OK):
        return beside
    return config.home() / "onnx" / f"{file_digest(model_path)}.onnx"


def _key_path(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".onnx.key")


def cache_key(model_path: str | Path) -> str:
    """What the cached ONNX file must have been built from: this exact model file and export version."""
    return f"{file_digest(model_path)}:v{EXPORT_VERSION}:opset{OPSET}"


def ensure_onnx(model_path: str | Path) -> Path:
    """The ONNX file of a model.pt, exported unless a matching one is cached (core.models.engines checks it
    against PyTorch before it is used)."""
    model_path = model_file(model_path)
    target = onnx_cache_path(model_path)
    key = cache_key(model_path)
    try:
        if target.is_file() and _key_path(target).read_text().strip() == key:
            return target
    except OSError:
        pass
    model, meta = load_model(model_path)
    atomic_write_bytes(target, onnx_bytes(model, meta))
    atomic_write_bytes(_key_path(target), key.encode())
    log.info("exported %s to %s", model_path, target)
    return target
