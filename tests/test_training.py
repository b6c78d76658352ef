"""Training on a few dozen real photos: run folder, progress, feature cache, broken photos, resume, cancel."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from core.errors import Cancelled
from core.models import features as feature_module
from core.training.config import TrainConfig, TrainingError
from core.training.loop import train
from tests.conftest import make_abid_subset

SMALL = dict(image_size=96, batch_size=8, epochs=2, num_workers=0)


def add_broken_photos(folder: Path) -> None:
    """A truncated JPEG (its header reads fine, decoding fails) and a file that is not an image at all."""
    images = folder / "bin-images"
    real = sorted(images.glob("*.jpg"))[0].read_bytes()
    (images / "truncated.jpg").write_bytes(real[: len(real) // 3])
    (images / "garbage.jpg").write_bytes(b"this is not a jpeg" * 50)
    labels = pd.read_csv(folder / "labels.csv")
    extra = pd.DataFrame({"image": ["truncated.jpg", "garbage.jpg"], "count": [1, 2]})
    pd.concat([labels, extra]).to_csv(folder / "labels.csv", index=False)


@pytest.fixture
def data(tmp_path) -> Path:
    folder = make_abid_subset(tmp_path / "data", per_class=8)
    add_broken_photos(folder)
    return folder


def test_frozen_run_writes_a_complete_run_folder_and_reports_progress(data, tmp_path):
    states = []
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), tta="flips", **SMALL)
    result = train(config, on_progress=states.append)
    run = tmp_path / "run"
    assert {p.name for p in run.iterdir()} >= {"model.pt", "metrics.json", "config.json", "log.txt", "checkpoint.pt"}
    saved = json.loads((run / "metrics.json").read_text())
    assert len(saved["history"]) == 2 and saved["history"][0]["train_loss"] > 0
    assert set(saved["history"][0]) >= {"train_loss", "valid_loss", "train_acc", "valid_acc", "images_per_s"}
    test = saved["test"]
    assert set(test) >= {"classes", "accuracy", "balanced_accuracy", "macro_f1", "mae", "off_by_one", "per_class",
                         "confusion_matrix", "n", "skipped"}
    assert test["n"] == sum(sum(row) for row in test["confusion_matrix"]) > 0
    assert json.loads((run / "config.json").read_text())["image_size"] == 96
    log = (run / "log.txt").read_text()
    assert "epoch 2/2" in log
    # test-time augmentation scores each photo in its four mirror views, each from its own cached features
    assert all(f"features ({view}):" in log for view in ("hflip", "vflip", "hvflip"))
    # progress: every key, all stages, ending at 1.0
    keys = {"stage", "epoch", "epochs", "fraction", "train_loss", "valid_loss", "train_acc", "valid_acc",
            "images_per_s", "data_wait_fraction", "device", "eta_s", "message"}
    assert all(keys <= set(s) for s in states)
    assert {"features", "train", "evaluate", "done"} <= {s["stage"] for s in states}
    assert states[-1]["fraction"] == 1.0 and states[-1]["stage"] == "done"
    # both broken photos are skipped and reported, by name and reason
    reported = {s["photo"]: s["reason"] for s in result["skipped"] + result["dataset_problems"]}
    assert "truncated" in reported["truncated.jpg"] or "damaged" in reported["truncated.jpg"]
    assert "garbage.jpg" in reported


def test_a_cache_hit_skips_the_backbone(data):
    from core.data.layouts.registry import load_dataset
    from core.models.networks import build_backbone
    from core.models.preprocess import photo_tensor, preprocessing

    backbone, info = build_backbone("efficientnet_lite0")
    meta = info | preprocessing(info, 96)
    paths = list(load_dataset(data).rows("all")["path"])[:12]
    first = feature_module.extract_features(backbone, meta, paths, num_workers=0)
    assert (first.hits, first.computed) == (0, 12)

    def refuse(*_):
        raise AssertionError("the backbone ran although every feature was cached")

    handle = backbone.register_forward_pre_hook(refuse)
    second = feature_module.extract_features(backbone, meta, paths, num_workers=0)
    handle.remove()
    assert (second.hits, second.computed) == (12, 0)
    assert torch.equal(first.features, second.features)
    # Another preprocessing is another cache: the backbone has to run again.
    other = feature_module.extract_features(backbone, meta | preprocessing(info, 64), paths[:2], num_workers=0)
    assert other.computed == 2
    # So is a mirrored view: its features are the backbone's on the flipped photo.
    mirrored = feature_module.extract_features(backbone, meta, paths[:2], num_workers=0, view="vflip")
    assert (mirrored.hits, mirrored.computed) == (0, 2)
    with torch.no_grad():
        flipped = backbone.eval()(torch.stack([photo_tensor(p, meta) for p in paths[:2]]).flip(-2))
    assert torch.allclose(mirrored.features, flipped, rtol=1e-3, atol=1e-3)  # via the fp16 stage-map store
    assert not torch.allclose(mirrored.features, first.features[:2], atol=1e-3)


def test_resume_continues_from_the_last_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=str(data), out=str(out), **SMALL | {"epochs": 1}))
    result = train(TrainConfig(data=str(data), out=str(out), resume=True, epochs=3, num_workers=0))
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert "resumed after epoch 1" in (out / "log.txt").read_text()
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "empty"), resume=True, **SMALL))


def assert_nothing_partial(run: Path) -> None:
    """No temporary or half-written file; no metrics.json (the run did not finish); every file there is whole."""
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]
    assert not (run / "metrics.json").exists()
    json.loads((run / "config.json").read_text())
    if (run / "model.pt").exists():
        from core.models.networks import load_model

        load_model(run / "model.pt")


def test_should_stop_before_the_first_epoch_leaves_no_model(data, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(Cancelled):
        train(TrainConfig(data=str(data), out=str(run), **SMALL), should_stop=lambda: True)
    assert_nothing_partial(run)
    assert not (run / "model.pt").exists() and not (run / "checkpoint.pt").exists()


def test_cancel_after_an_epoch_keeps_whole_files_and_the_run_resumes(data, tmp_path):
    run, finished_epochs = tmp_path / "run", []

    def count_epochs(state):
        if state["message"].endswith(" done"):
            finished_epochs.append(state["epoch"])

    config = TrainConfig(data=str(data), out=str(run), **SMALL | {"epochs": 3})
    with pytest.raises(Cancelled):
        train(config, on_progress=count_epochs, should_stop=lambda: bool(finished_epochs))
    assert finished_epochs == [1]
    assert_nothing_partial(run)
    assert torch.load(run / "checkpoint.pt", weights_only=False)["epoch"] == 1
    result = train(TrainConfig(data=str(data), out=str(run), resume=True, **SMALL | {"epochs": 3}))
    assert [h["epoch"] for h in result["history"]] == [1, 2, 3]
    assert json.loads((run / "metrics.json").read_text())["history"] == result["history"]


def test_finetune_one_epoch_with_count_aware_loss(data, tmp_path):
    config = TrainConfig(data=str(data), out=str(tmp_path / "run"), mode="finetune", balance="weights",
                         loss="emd", label_smoothing=0.1, **SMALL | {"epochs": 1})
    result = train(config)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (saved["image_size"], saved["aspect"]) == (96, 1.37)  # fine-tuning keeps the bins' shape by default
    from core.data.layouts.registry import load_dataset
    from core.models.networks import load_model
    from core.models.preprocess import input_size, photo_tensor

    assert len(result["history"]) == 1 and result["history"][0]["epoch"] == 1
    assert result["history"][0]["images_per_s"] > 0
    assert 0 <= result["history"][0]["data_wait_fraction"] <= 1
    readable_test = [n for n in load_dataset(data).rows("test")["name"] if n not in {"truncated.jpg", "garbage.jpg"}]
    assert result["test"]["n"] == len(readable_test)
    assert sum(map(sum, result["test"]["confusion_matrix"])) == len(readable_test)
    assert len(result["test"]["confusion_matrix"]) == 5
    model, meta = load_model(tmp_path / "run" / "model.pt")
    assert meta["classes"] == [1, 2, 3, 4, 5]
    assert input_size(meta) == (96, round(96 * 1.37))
    photo = photo_tensor(sorted((data / "bin-images").glob("*.jpg"))[0], meta)
    assert photo.shape == (3, 96, round(96 * 1.37))
    with torch.no_grad():
        assert model.eval()(photo.unsqueeze(0)).shape == (1, 5)
    assert any(s["photo"] == "truncated.jpg" for s in result["skipped"] + result["dataset_problems"])


def test_simple_cnn_trains_from_scratch_and_cannot_be_frozen(data, tmp_path):
    result = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), backbone="simple_cnn", mode="finetune",
                               balance="sampler", **SMALL | {"epochs": 1}))
    assert result["backbone"] == "simple_cnn"
    with pytest.raises(TrainingError, match="simple_cnn"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "run2"), backbone="simple_cnn", mode="frozen", **SMALL))


def test_validate_lists_every_problem():
    problems = TrainConfig(out="x", epochs=0, lr=-1, batch_size=500).validate(n_train=40)
    assert any("epochs" in p for p in problems)
    assert any("learning rate" in p for p in problems)
    assert any("batch size (500) is larger than the training set (40" in p for p in problems)
    assert any("test-time augmentation" in p for p in TrainConfig(out="x", tta="rotate").validate())
    assert TrainConfig(out="x").validate(n_train=40) == []
    assert any("no labelled photos" in p for p in TrainConfig(out="x").validate(n_train=0))


def test_training_on_an_oversampled_version_reads_the_repeats(tmp_path):
    from core.data.curation import balancing
    from core.data.layouts.registry import load_dataset

    folder = make_abid_subset(tmp_path / "data", per_class=8)
    dataset = load_dataset(folder)
    n_train = len(dataset.rows("train"))
    version = balancing.apply(dataset, "oversample", {"target": 10, "splits": ["train"]}, name="over10")
    config = TrainConfig(data=str(version.path), out=str(tmp_path / "run"), **SMALL)
    train(config)
    log = (tmp_path / "run" / "log.txt").read_text()
    assert n_train < 50 and f"{10 * len(dataset.classes)} train," in log
    assert f"{len(dataset.rows('test'))} test photos" in log


def test_weight_averaging_keeps_the_average_and_resumes_it(data, tmp_path):
    run = tmp_path / "run"
    config = TrainConfig(data=str(data), out=str(run), mode="finetune", ema=0.5, **SMALL | {"epochs": 1})
    first = train(config)
    record = first["history"][0]
    assert {"valid_loss_trained", "valid_acc_trained"} <= set(record)
    assert record["valid_loss"] != record["valid_loss_trained"]  # the average is validated, not the trained weights
    assert "averaged weights; the trained ones" in (run / "log.txt").read_text()
    from core.models.networks import load_model

    kept, _ = load_model(run / "model.pt")
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=False)
    averaged = {k.removeprefix("module."): v for k, v in checkpoint["averaged"].items() if k.startswith("module.")}
    trained = checkpoint["model"]
    name = next(k for k, v in trained.items() if v.is_floating_point() and "head" in k)
    assert torch.allclose(kept.state_dict()[name], averaged[name])
    assert not torch.allclose(kept.state_dict()[name], trained[name])
    steps = int(checkpoint["averaged"]["n_averaged"])
    assert steps >= 2
    resumed = train(TrainConfig(data=str(data), out=str(run), resume=True, epochs=2, num_workers=0))
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert int(torch.load(run / "checkpoint.pt", weights_only=False)["averaged"]["n_averaged"]) == 2 * steps


def test_weight_averaging_is_checked():
    assert any("EMA decay" in p for p in TrainConfig(out="x", mode="finetune", ema=1.0).validate())
    assert any("for fine-tuning" in p for p in TrainConfig(out="x", mode="frozen", ema=0.99).validate())
    assert TrainConfig(out="x", mode="finetune", ema=0.99).validate() == []
