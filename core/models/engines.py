"""The engines that run a counting model for prediction (OpenVINO, ONNX Runtime, PyTorch), checked on real photos."""
from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import threading
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core import config
from core.files import atomic_write_bytes
from core.gpu import cpu_cores
from core.models.export import ExportError, ViewAveragedModel, cache_key, ensure_onnx
from core.models.networks import load_model, model_file, resolve_device
from core.models.preprocess import photo_tensor, tta_views

log = logging.getLogger(__name__)
ENGINES = ("auto", "openvino", "onnx", "torch")  # "onnx" is ONNX Runtime
PRECISIONS = ("fp32", "bf16")
ENGINE_NAMES = {"openvino": "OpenVINO", "onnxruntime": "ONNX Runtime", "torch": "PyTorch"}
# Largest probability difference from PyTorch accepted. In float32 every check photo must also keep its count;
# bfloat16 keeps about 8 bits of mantissa, so a photo whose two likeliest counts are that close may swap them
# (measured on 500 real test photos: differences up to 0.02, 9 counts changed, the same balanced accuracy).
TOLERANCE = {"fp32": 1e-4, "bf16": 0.05}
SAME_COUNTS = {"fp32": True, "bf16": False}
CHECK_PHOTOS = 8
# One forward pass sees at most this many pixels (four 288×395 views): on a CPU, larger batches spill the
# caches and run slower per photo (measured with bench/predict_speed.py), so big batches are cut up.
PIXELS_PER_PASS = 4 * 288 * 395


def _passes(images: np.ndarray, meta: dict):
    """Consecutive slices of a batch, each within PIXELS_PER_PASS over all its views (at least one photo)."""
    per_photo = images.shape[2] * images.shape[3] * len(tta_views(meta))
    step = max(1, PIXELS_PER_PASS // max(1, per_photo))
    for start in range(0, len(images), step):
        yield images[start:start + step]


class OnnxRuntimeModel:
    """An ONNX Runtime session standing in for the PyTorch model: batch of photos → averaged probabilities."""

    engine, precision = "onnxruntime", "fp32"

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
        parts = _passes(images, self.meta)
        return np.concatenate([self.session.run(["probabilities"], {"images": part})[0] for part in parts])


class OpenVinoModel:
    """The exported model compiled by OpenVINO for this CPU (float32, or bfloat16 where the CPU has it natively)."""

    engine = "openvino"

    def __init__(self, source: str | Path, meta: dict, precision: str = "fp32", threads: int | None = None):
        import openvino as ov

        core = ov.Core()
        if precision == "bf16" and not bf16_supported():
            raise ExportError("this CPU has no native bfloat16 (AVX512-BF16 or AMX): use --precision fp32")
        self.compiled = core.compile_model(str(source), "CPU", {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads or cpu_cores()})
        self.request = self.compiled.create_infer_request()
        self.lock = threading.Lock()  # one infer request; Streamlit sessions may share a cached model
        self.output = self.compiled.output(0)
        self.meta, self.precision = meta, precision

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        images = np.ascontiguousarray(images, dtype=np.float32)
        with self.lock:
            parts = _passes(images, self.meta)
            return np.concatenate([self.request.infer({0: part})[self.output].copy() for part in parts])


class TorchModel:
    """The PyTorch model behind the same interface (the fallback, and the GPU path)."""

    engine, precision = "torch", "fp32"

    def __init__(self, model: nn.Module, meta: dict, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = ViewAveragedModel.of(model.to(self.device), meta)
        self.meta = meta

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
            return self.model(batch).cpu().numpy()


def engine_available(engine: str) -> bool:
    module = {"openvino": "openvino", "onnx": "onnxruntime"}.get(engine)
    if module is None:
        return engine == "torch"
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@functools.cache
def bf16_supported() -> bool:
    """Whether OpenVINO is installed and this CPU computes in bfloat16 natively (AVX512-BF16 or AMX)."""
    if not engine_available("openvino"):
        return False
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def check_photos(model_path: Path, n: int = CHECK_PHOTOS) -> list[Path]:
    """Real photos to check an engine with (twice as many as needed, in case some are damaged): the model's own
    dataset's first photos, else the demo set's."""
    try:
        data = json.loads((model_path.parent / "config.json").read_text()).get("data")
    except (OSError, ValueError):
        data = None
    for folder in ([Path(data) / "bin-images", Path(data)] if data and not str(data).startswith("s3://") else []):
        if folder.is_dir():
            found = list(itertools.islice((Path(e.path) for e in os.scandir(folder)
                                           if e.name.lower().endswith((".jpg", ".jpeg", ".png"))), 2 * n))
            if found:
                return sorted(found)
    return demo_photos(n)


def demo_photos(n: int) -> list[Path]:
    from core.data.layouts.demo import ensure_demo

    return sorted((ensure_demo() / "bin-images").glob("*.jpg"))[:2 * n]


def readable_tensors(photos: list[Path], meta: dict, n: int = CHECK_PHOTOS) -> list[torch.Tensor]:
    """The model inputs of the first n photos that can be read (a damaged photo in the dataset is passed over)."""
    tensors = []
    for photo in photos:
        try:
            tensors.append(photo_tensor(photo, meta))
        except Exception:  # noqa: BLE001 — any photo that will not decode is simply not used for the check
            continue
        if len(tensors) == n:
            break
    return tensors


def compare_with_torch(model: nn.Module, meta: dict, runtime, photos: list[Path]) -> dict:
    """How far `runtime`'s probabilities are from PyTorch's on these photos, and whether every count agrees."""
    tensors = readable_tensors(photos, meta)
    if not tensors:
        photos = demo_photos(CHECK_PHOTOS)
        tensors = readable_tensors(photos, meta)
    images = torch.stack(tensors)
    expected = TorchModel(model, meta).probabilities(images.numpy())
    got = runtime.probabilities(images.numpy())
    demo = Path(photos[0]).resolve().is_relative_to(config.demo_dir().resolve())
    return {"max_difference": float(np.abs(got - expected).max()), "photos": len(tensors),
            "photos_from": "the demo set" if demo else str(Path(photos[0]).parent),
            "same_counts": bool((got.argmax(1) == expected.argmax(1)).all())}


def _checks_path(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".onnx.checks.json")


def checked(model_path: Path, model: nn.Module, onnx_path: Path, name: str, runtime) -> dict:
    """The comparison of this engine with PyTorch for this exact model file (cached beside model.onnx);
    `model` is that file loaded."""
    from importlib.metadata import version

    key = f"{cache_key(model_path)}:{name}:{version('openvino' if runtime.engine == 'openvino' else 'onnxruntime')}"
    path = _checks_path(onnx_path)
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if key not in cached:
        cached[key] = compare_with_torch(model, runtime.meta, runtime, check_photos(model_path))
        try:
            atomic_write_bytes(path, json.dumps(cached, indent=1).encode())
        except OSError:
            pass  # a read-only folder only costs checking again next time
    return cached[key]


def _runtime(engine: str, onnx_path: Path, meta: dict, precision: str):
    if engine == "openvino":
        return OpenVinoModel(onnx_path, meta, precision)
    if precision != "fp32":
        raise ExportError(f"{precision} runs on OpenVINO only: use --engine openvino (or auto)")
    return OnnxRuntimeModel(onnx_path, meta)


def load_fast_model(model_path: str | Path, engine: str = "auto", device: str | None = None,
                    precision: str = "fp32"):
    """(runtime, meta): on a CPU the first of OpenVINO and ONNX Runtime that is installed and agrees with PyTorch
    on real photos (within TOLERANCE[precision]; in fp32 every count the same), else PyTorch; on a GPU, PyTorch."""
    if engine not in ENGINES or precision not in PRECISIONS:
        raise ExportError(f"engine must be one of {ENGINES} and precision one of {PRECISIONS}")
    model_path = model_file(model_path)
    model, meta = load_model(model_path)
    target = resolve_device(device or "auto")
    candidates = [engine] if engine != "auto" else [e for e in ("openvino", "onnx") if engine_available(e)]
    if target.type == "cpu" or engine in ("openvino", "onnx"):
        for name in (c for c in candidates if c != "torch"):
            try:
                onnx_path = ensure_onnx(model_path)
                runtime = _runtime(name, onnx_path, meta, precision)
                check = checked(model_path, model, onnx_path, f"{name}/{precision}", runtime)
                changed = SAME_COUNTS[precision] and not check["same_counts"]
                if check["max_difference"] > TOLERANCE[precision] or changed:
                    raise ExportError(f"differs from PyTorch by {check['max_difference']:.2g} on {check['photos']} "
                                      f"photos (at most {TOLERANCE[precision]:g} accepted"
                                      f"{'' if check['same_counts'] else ', and a count changed'})")
                runtime.check = check
                return runtime, meta
            except Exception as exc:  # noqa: BLE001 — any engine failure falls back, unless that engine was asked for
                if engine != "auto":
                    raise ExportError(f"{model_path.name}: cannot run with {name} ({exc})") from exc
                log.warning("%s cannot run %s (%s); trying the next engine", name, model_path, exc)
    if precision != "fp32":
        raise ExportError(f"{model_path.name}: {precision} needs OpenVINO on a CPU")
    return TorchModel(model, meta, target), meta


def load_predictor(model_path: str | Path, device: str | None = None, engine: str = "auto", precision: str = "fp32"):
    """(model, meta) for core.models.inference: an exported runtime on a CPU when one can be had, else the
    PyTorch module itself (so a GPU keeps its mixed-precision path)."""
    fast, meta = load_fast_model(model_path, engine, device, precision)
    if isinstance(fast, TorchModel):
        return fast.model.model, meta
    return fast, meta
