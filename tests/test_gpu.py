"""The CUDA path (marked gpu, skipped without a GPU): device choice, training and prediction on the GPU.

Run them alone with `python -m pytest -m gpu`.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from core import gpu
from core.models.inference import predict_photos
from core.models.networks import load_model, resolve_device
from core.training.config import TrainConfig
from core.training.loop import train
from tests.conftest import make_abid_subset

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")]


def test_auto_resolves_to_the_gpu_and_the_gpu_is_described():
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    facts = gpu.describe()
    assert facts["cuda"] is True and len(facts["gpus"]) == torch.cuda.device_count()
    assert gpu.training_slots()[0].startswith("cuda") and "cpu" in gpu.training_slots()


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_training_and_prediction_on_the_gpu_match_the_cpu(mode, tmp_path):
    data = make_abid_subset(tmp_path / "data", per_class=8)
    out = tmp_path / "run"
    result = train(TrainConfig(data=str(data), out=str(out), mode=mode, epochs=2, image_size=96, batch_size=8,
                               num_workers=0, device="auto"))
    assert result["device"].startswith("cuda")
    assert "device cuda" in (out / "log.txt").read_text()
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert json.loads((out / "metrics.json").read_text())["test"]["n"] == result["test"]["n"]

    photos = sorted((data / "bin-images").glob("*.jpg"))[:6]
    model, meta = load_model(out / "model.pt", device="cuda")
    assert next(model.parameters()).is_cuda
    on_gpu = predict_photos(model, meta, photos, num_workers=0, device="cuda")
    on_cpu = predict_photos(*load_model(out / "model.pt"), photos, num_workers=0, device="cpu")
    probs = [f"prob_{c}" for c in meta["classes"]]
    assert np.allclose(on_gpu[probs].to_numpy(), on_cpu[probs].to_numpy(), atol=1e-3)
    assert list(on_gpu["photo"]) == [p.name for p in photos]
