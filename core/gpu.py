"""Device facts: the CPU cores this process may use, whether CUDA is usable, and each GPU's utilisation and memory."""
from __future__ import annotations

import functools
import os


def cpu_cores() -> int:
    """CPU cores this process may run on (its affinity, which containers and taskset narrow), at least 1."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def cuda_device_count() -> int:
    """GPUs torch can use (0 without CUDA); cached because asking CUDA is slow and the answer is fixed."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # a broken CUDA install counts as no GPU, not as a crash
        return 0


def cuda_available() -> bool:
    return cuda_device_count() > 0


def training_slots() -> list[str]:
    """Where one training job at a time may run: each GPU, the CPU, and 'remote' (jobs running elsewhere, polled)."""
    return [f"cuda:{i}" for i in range(cuda_device_count())] + ["cpu", "remote"]


@functools.lru_cache(maxsize=1)
def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def gpu_stats(index: int = 0) -> dict | None:
    """{name, utilisation % , memory_used_mb, memory_total_mb} of GPU `index`, or None without CUDA/NVML."""
    if not cuda_available():
        return None
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        handle = nvml.nvmlDeviceGetHandleByIndex(_physical_index(index))
        util = nvml.nvmlDeviceGetUtilizationRates(handle)
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        name = nvml.nvmlDeviceGetName(handle)
    except Exception:
        return None
    return {
        "name": name.decode() if isinstance(name, bytes) else str(name),
        "utilisation": float(util.gpu),
        "memory_used_mb": memory.used / 2**20,
        "memory_total_mb": memory.total / 2**20,
    }


def _physical_index(index: int) -> int:
    """NVML numbers GPUs physically; CUDA_VISIBLE_DEVICES may renumber them for torch."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
    try:
        return int(visible[index])
    except (IndexError, ValueError):
        return index


def stats_for_device(device: str | None) -> dict | None:
    """gpu_stats for a torch device string like 'cuda' or 'cuda:1'; None for the CPU."""
    if not device or not str(device).startswith("cuda"):
        return None
    _, _, number = str(device).partition(":")
    return gpu_stats(int(number) if number.isdigit() else 0)


def describe() -> dict:
    """A summary for the page: CUDA or not, and each GPU's stats."""
    count = cuda_device_count()
    return {
        "cuda": count > 0,
        "gpus": [gpu_stats(i) for i in range(count)],
        "cpu_cores": os.cpu_count() or 1,
    }
