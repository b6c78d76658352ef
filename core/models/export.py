"""ONNX export of a counting model (test-time views folded in) and fast CPU inference with ONNX Runtime."""
from __future__ import annotations

import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core import config
from core.files import atomic_write_bytes
from core.models.catalog import VIEW_DIMS
from core.models.networks import ModelError, file_digest, load_model
from core.models.preprocess import input_size, tta_views

log = logging.getLogger(__name__)
OPSET = 17
EXPORT_VERSION = 1  # bump when the exported graph changes, so cached files are rebuilt
MAX_DIFFERENCE = 1e-4  # largest probability difference from PyTorch accepted for an exported model


class ExportError(ModelError):
    """A model that cannot be exported to ONNX, or whose export disagrees with PyTorch."""


class ViewAveragedModel(nn.Module):
    """photos (N×C×H×W) → class probabilities averaged over the model's test-time views, in one forward pass."""

    def __init__(self, model: nn.Module, views: tuple[str, ...], temperature: float = 1.0):
        super().__init__()
        self.model = model
        self.views = tuple(views)
        self.temperature = float(temperature)  # the calibration fitted after training (core.evaluation.calibration)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        seen = [images.flip(VIEW_DIMS[v]) if VIEW_DIMS[v] else images for v in self.views]
        batch = torch.cat(seen, 0) if len(seen) > 1 else seen[0]  # every view in one pass: fewer, larger kernels
        probs = (self.model(batch).float() / self.temperature).softmax(1)
        return probs.reshape(len(self.views), -1, probs.shape[1]).mean(0)


def onnx_bytes(model: nn.Module, meta: dict) -> bytes:
    """The model with its views as ONNX: input `images` (batch × 3 × H × W), output `probabilities`."""
    height, width = input_size(meta)
    wrapped = ViewAveragedModel(model.cpu().eval(), tta_views(meta), float(meta.get("temperature", 1.0))).eval()
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
    """The ONNX file of a model.pt, exported (and checked against PyTorch) unless a matching one is cached."""
    model_path = Path(model_path).expanduser()
    if model_path.is_dir():
        model_path = model_path / "model.pt"
    target = onnx_cache_path(model_path)
    key = cache_key(model_path)
    try:
        if target.is_file() and _key_path(target).read_text().strip() == key:
            return target
    except OSError:
        pass
    model, meta = load_model(model_path)
    data = onnx_bytes(model, meta)
    difference = max_difference(model, meta, OnnxModel(data, meta))
    if difference > MAX_DIFFERENCE:
        raise ExportError(f"{model_path.name}: the ONNX export differs from PyTorch by {difference:.2g} "
                          f"(at most {MAX_DIFFERENCE:g} accepted)")
    atomic_write_bytes(target, data)
    atomic_write_bytes(_key_path(target), key.encode())
    log.info("exported %s to %s (max probability difference %.2g)", model_path, target, difference)
    return target


def max_difference(model: nn.Module, meta: dict, onnx_model: "OnnxModel", images: torch.Tensor | None = None) -> float:
    """Largest |p_onnx − p_torch| over a batch (by default three seeded random photos' worth of input)."""
    if images is None:
        height, width = input_size(meta)
        images = torch.randn(3, 3, height, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = ViewAveragedModel(model.cpu().eval(), tta_views(meta), float(meta.get("temperature", 1.0)))(images).numpy()
    return float(np.abs(onnx_model.probabilities(images.numpy()) - expected).max())


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class OnnxModel:
    """An ONNX Runtime session standing in for the PyTorch model: batch of photos → averaged probabilities."""

    engine = "onnxruntime"

    def __init__(self, source: str | Path | bytes, meta: dict, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or cpu_cores()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle threads sleep instead of spinning: on cores shared with other work, spinning threads steal
        # the time the busy ones need (the same effect as OMP_WAIT_POLICY=PASSIVE for PyTorch).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # Batches vary in size; an arena would keep the largest one's activations for the life of the process.
        options.enable_cpu_mem_arena = False
        self.session = ort.InferenceSession(source if isinstance(source, bytes) else str(source), options,
                                            providers=["CPUExecutionProvider"])
        self.meta = meta

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        return self.session.run(["probabilities"], {"images": images})[0]


class TorchModel:
    """The PyTorch model behind the same interface as OnnxModel (the fallback, and the GPU path)."""

    engine = "torch"

    def __init__(self, model: nn.Module, meta: dict, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = ViewAveragedModel(model.to(self.device).eval(), tta_views(meta), float(meta.get("temperature", 1.0))).eval()
        self.meta = meta

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
            return self.model(batch).cpu().numpy()


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def load_fast_model(model_path: str | Path, engine: str = "auto", device: str | None = None):
    """(OnnxModel or TorchModel, meta): ONNX Runtime on a CPU when it is installed and the export agrees
    with PyTorch, else PyTorch itself (always PyTorch on a GPU, which is faster there)."""
    from core.models.networks import resolve_device

    model_path = Path(model_path).expanduser()
    if model_path.is_dir():
        model_path = model_path / "model.pt"
    target = resolve_device(device or "auto")
    if engine == "onnx" or (engine == "auto" and target.type == "cpu" and onnx_available()):
        try:
            onnx_path = ensure_onnx(model_path)
            _, meta = load_model(model_path)
            return OnnxModel(onnx_path, meta), meta
        except Exception as exc:  # noqa: BLE001 — any export failure falls back to PyTorch, unless ONNX was asked for
            if engine == "onnx":
                raise ExportError(f"{model_path.name}: cannot run with ONNX Runtime ({exc})") from exc
            log.warning("ONNX export of %s failed (%s); using PyTorch", model_path, exc)
    model, meta = load_model(model_path)
    return TorchModel(model, meta, target), meta


def load_predictor(model_path: str | Path, device: str | None = None):
    """(model, meta) for core.models.inference: the ONNX Runtime model on a CPU when it can be had, else the
    PyTorch module itself (so a GPU keeps its mixed-precision path)."""
    fast, meta = load_fast_model(model_path, device=device)
    if isinstance(fast, TorchModel):
        return fast.model.model, meta
    return fast, meta
