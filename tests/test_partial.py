"""Partial fine-tuning on stored stage maps: the store against the live network, the saved whole network against the
map path, invalidation, Storage, seed ensembles (load, predict, calibrate, export), and one pass shared by readers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageOps

from core import storage
from core.jobs.describe import ensemble_summary
from core.models import stage_store
from core.models.networks import build_backbone, load_model
from core.models.preprocess import photo_tensor, preprocessing, view_of
from core.models.stages import Trunk
from core.training.config import TrainConfig, TrainingError
from core.training.loop import train
from tests.conftest import make_abid_subset

SMALL = dict(mode="partial", image_size=96, batch_size=8, epochs=2, num_workers=0)


@pytest.fixture
def data(tmp_path) -> Path:
    return make_abid_subset(tmp_path / "data", per_class=6)


def lite0(size: int = 96):
    backbone, info = build_backbone("efficientnet_lite0")
    return backbone.eval(), info | preprocessing(info, size, 1.37)


def test_a_stored_map_equals_the_live_forward_at_the_cut(data):
    backbone, meta = lite0()
    paths = sorted(str(p) for p in (data / "bin-images").glob("*.jpg"))[:6]
    stored = stage_store.stage_maps(backbone, meta, paths, num_workers=0)
    assert stored.computed == len(paths) and not stored.errors
    photos = torch.stack([photo_tensor(p, meta) for p in paths])
    with torch.no_grad():
        for view in stage_store.STORE_VIEWS:
            live = Trunk(backbone)(view_of(photos, view))
            kept = stored.maps[view].float()
            assert kept.shape == live.shape
            assert (kept - live).abs().max() <= 1e-3 * max(1.0, float(live.abs().max()))
    again = stage_store.stage_maps(backbone, meta, paths, num_workers=0)
    assert (again.hits, again.computed) == (len(paths), 0)
    assert torch.equal(again.maps["hflip"], stored.maps["hflip"])


def test_a_changed_photo_is_computed_again_and_a_relabel_is_not(data):
    backbone, meta = lite0()
    paths = sorted(str(p) for p in (data / "bin-images").glob("*.jpg"))[:4]
    stage_store.stage_maps(backbone, meta, paths, num_workers=0)
    labels = pd.read_csv(data / "labels.csv")
    labels.loc[0, "count"] = 5 if labels.loc[0, "count"] != 5 else 1
    labels.to_csv(data / "labels.csv", index=False)  # a relabel: the photos' bytes are the same
    assert stage_store.stage_maps(backbone, meta, paths, num_workers=0).computed == 0
    before = stage_store.stage_maps(backbone, meta, paths, num_workers=0).maps["plain"][0]
    with Image.open(paths[0]) as photo:  # the same bin, its photo edited: other bytes
        ImageOps.mirror(photo.convert("RGB")).save(paths[0], quality=90)
    changed = stage_store.stage_maps(backbone, meta, paths, num_workers=0)
    assert (changed.hits, changed.computed) == (3, 1)
    assert not torch.equal(changed.maps["plain"][0], before)


def test_the_store_shows_in_storage_and_pruning_removes_it(data, monkeypatch):
    backbone, meta = lite0()
    paths = sorted(str(p) for p in (data / "bin-images").glob("*.jpg"))[:4]
    stage_store.stage_maps(backbone, meta, paths, num_workers=0)
    size = storage.cache_sizes()["stage_maps"]
    assert size >= 4 * 2 * int(np.prod(stage_store.map_shape(backbone, meta))) * 2  # fp16, two views
    pruned = storage.prune("stage_maps", 1, grace_s=0, keep_newest=0)
    assert pruned.deleted and storage.cache_sizes()["stage_maps"] < size


def test_a_partial_run_saves_a_whole_network_that_predicts_as_the_map_path(data, tmp_path):
    from core.models.inference import predict_probabilities
    from core.training.partial import PartialRun

    result = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), **SMALL))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["mode"] == "partial" and saved["cut"] == "blocks.5" and saved["tta"] == "hflip"
    assert result["test"]["n"] > 0 and len(result["history"]) == 2
    model, meta = load_model(tmp_path / "run")
    assert meta["mode"] == "partial" and meta["tta"] == "hflip"
    # The whole network on the photos gives what the training's map path gave (fp16 maps: within rounding).
    from core.data.layouts.registry import load_dataset
    from core.training.loop import _split_rows

    test = _split_rows(load_dataset(data), "test")
    live, errors = predict_probabilities(model, meta, test.paths, num_workers=0)
    assert not errors
    run = PartialRun(TrainConfig(data=str(data), out=str(tmp_path / "again"), **SMALL), model, meta,
                     torch.device("cpu"), tmp_path, print, lambda **_: None, None, torch.Generator())
    run.prepare(*[_split_rows(load_dataset(data), s) for s in ("train", "valid", "test")])
    from core.models.inference import tempered_probabilities

    mapped = tempered_probabilities(run.map_logits(model, "test"), meta["temperature"]).numpy()
    assert np.abs(mapped - live).max() < 2e-3
    # The training kept its test and valid scores as the model's predictions: Evaluate opens on them without
    # predicting.
    from core.evaluation.predictions import PredictionStore

    store = PredictionStore(tmp_path / "run" / "model.pt")
    for name in ("test", "valid"):
        rows = load_dataset(data).rows(name)
        assert store.missing(rows).empty, name
        kept = store.stored(rows)
        assert list(kept["name"]) == list(rows["name"])
        live, errors = predict_probabilities(model, meta, list(rows["path"]), num_workers=0)
        assert not errors and np.abs(kept[[f"prob_{c}" for c in meta["classes"]]].to_numpy() - live).max() < 2e-3


def test_only_the_stages_after_the_cut_learn(data, tmp_path):
    before, _ = lite0()
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), cut="blocks.5", **SMALL))
    after, meta = load_model(tmp_path / "run")
    old = before.state_dict()
    changed = {name.split(".")[1] + "." + name.split(".")[2] if name.startswith("backbone.blocks") else
               name.split(".")[1] for name, value in after.state_dict().items()
               if name.startswith("backbone.") and "num_batches" not in name
               and not torch.equal(value, old[name.removeprefix("backbone.")])}
    assert changed and all(part in {"blocks.6", "conv_head", "bn2"} for part in changed), changed


def test_an_ensemble_loads_predicts_calibrates_and_exports(data, tmp_path):
    import onnxruntime

    from core.models import export
    from core.models.inference import predict_probabilities

    result = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), ensemble=3, cut="blocks.5", **SMALL))
    assert [m["seed"] for m in result["members"]] == [0, 1, 2]
    assert all((tmp_path / "run" / "members" / str(k) / "model.pt").is_file() for k in (1, 2, 3))
    model, meta = load_model(tmp_path / "run")
    assert meta["ensemble"]["members"] == 3 and meta["temperature"] > 0
    paths = sorted(str(p) for p in (data / "bin-images").glob("*.jpg"))[:4]
    probs, errors = predict_probabilities(model, meta, paths, num_workers=0)
    assert not errors and np.allclose(probs.sum(1), 1, atol=1e-5)
    # The ensemble is the mean of its members' probabilities (at temperature 1).
    photos = torch.stack([photo_tensor(p, meta) for p in paths])
    with torch.no_grad():
        members = [load_model(tmp_path / "run" / "members" / str(k))[0] for k in (1, 2, 3)]
        mean = torch.stack([m(photos).softmax(1) for m in members]).mean(0)
        assert torch.allclose(model(photos).softmax(1), mean, atol=1e-5)
    session = onnxruntime.InferenceSession(str(export.ensure_onnx(tmp_path / "run" / "model.pt")))
    exported = session.run(None, {session.get_inputs()[0].name: photos.numpy()})[0]
    with torch.no_grad():
        reference = export.ViewAveragedModel.of(model, meta)(photos).numpy()
    assert np.abs(exported - reference).max() < 1e-4


def test_a_stopped_ensemble_resumes_keeping_the_members_it_trained(data, tmp_path):
    from core.errors import Cancelled

    out = tmp_path / "run"
    seen = []

    def stop_in_the_second_member():  # as a worker killed during member 2's second epoch
        return any("Model 2 of 2: Epoch 1/2 done" in message for message in seen)

    with pytest.raises(Cancelled):
        train(TrainConfig(data=str(data), out=str(out), ensemble=2, **SMALL),
              on_progress=lambda update: seen.append(str(update.get("message", ""))),
              should_stop=stop_in_the_second_member)
    before = (out / "log.txt").read_text()
    result = train(TrainConfig(data=str(data), out=str(out), resume=True, **SMALL))
    resumed = (out / "log.txt").read_text()[len(before):]
    assert "[model 1/2] resumed after epoch 2" in resumed and "[model 1/2] epoch 1/2" not in resumed
    assert "[model 2/2] resumed after epoch 1" in resumed and "[model 2/2] epoch 2/2" in resumed
    assert len(result["members"]) == 2 and result["test"]["n"] > 0
    model, meta = load_model(out)
    assert meta["ensemble"]["members"] == 2


def test_partial_settings_are_checked():
    problems = TrainConfig(data="d", out="o", mode="partial", backbone="resnet18", tta="flips", ensemble=0).validate()
    assert any("EfficientNet-Lite" in p for p in problems)
    assert any("none or hflip" in p for p in problems)
    assert any("ensemble size" in p for p in problems)
    assert any("--mode partial" in p for p in TrainConfig(data="d", out="o", mode="finetune", ensemble=2).validate())
    with pytest.raises(TrainingError, match="EfficientNet-Lite"):
        train(TrainConfig(data="d", out="o", mode="partial", backbone="resnet18"))


def test_readers_of_features_reuse_the_stored_pass(data, tmp_path):
    """Data health fills the store; the map, a frozen run at the same input and a partial run add no trunk pass."""
    from core.data.layouts.registry import load_dataset
    from core.evaluation import label_issues

    ds = load_dataset(data)
    recipe = label_issues.RECIPE
    rows = label_issues._labelled_rows(ds)
    before = stage_store.trunk_photos
    whole, _ = label_issues.photo_features(ds, rows)
    filled = stage_store.trunk_photos - before
    assert filled == len(rows) * len(recipe["views"])
    columns = label_issues.head_columns()
    kept, _ = label_issues.photo_features(ds, rows, columns=columns)  # the feature cache answers, in those columns
    assert kept.shape == whole[..., columns].shape and np.array_equal(kept, whole[..., columns])
    train(TrainConfig(data=str(data), out=str(tmp_path / "frozen"), mode="frozen", image_size=recipe["image_size"],
                      aspect=recipe["aspect"], epochs=2, batch_size=8, num_workers=0))
    train(TrainConfig(data=str(data), out=str(tmp_path / "partial"), mode="partial", epochs=1, batch_size=8,
                      num_workers=0))
    assert stage_store.trunk_photos - before == filled


def test_a_dataset_over_the_store_budget_trains_with_the_frozen_stages_run_live(data, tmp_path, monkeypatch):
    monkeypatch.setenv(storage.CAPS_ENV, "stage_maps=0.01")  # 10 KB: no photo's maps fit
    before = storage.cache_sizes()["stage_maps"]
    result = train(TrainConfig(data=str(data), out=str(tmp_path / "run"), **SMALL | {"epochs": 1}))
    assert result["test"]["n"] > 0 and storage.cache_sizes()["stage_maps"] == before
    assert "do not fit the store's budget" in (tmp_path / "run" / "log.txt").read_text()
    trained, _ = load_model(tmp_path / "run")
    fresh, _ = lite0()
    assert torch.equal(trained.backbone.blocks[2][0].conv_dw.weight, fresh.blocks[2][0].conv_dw.weight)
    assert not torch.equal(trained.backbone.conv_head.weight, fresh.conv_head.weight)
    with pytest.raises(TrainingError, match="ensemble trains on stored stage maps"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "ens"), ensemble=2, **SMALL))


def test_the_store_budget_counts_each_backbone_of_a_two_backbone_ensemble_at_its_own_size(data, tmp_path,
                                                                                            monkeypatch):
    sizes = {}
    for name in ("efficientnet_lite0", "efficientnet_lite2"):
        backbone, info = build_backbone(name)
        meta = info | preprocessing(info, 96, 1.37)
        sizes[name] = stage_store.store_bytes(backbone.eval(), meta, 10)
        assert stage_store.planned_bytes(name, None, 96, 1.37, 10) == sizes[name]  # the catalog, no network built
    assert sizes["efficientnet_lite2"] > sizes["efficientnet_lite0"]
    photos = len(list((data / "bin-images").glob("*.jpg")))  # every one labelled, in the classes
    lite0_each, lite2_each = (size // 10 for size in sizes.values())
    # Room for two Lite0 backbones' maps, not for Lite0's and Lite2's: the ensemble is refused, not over-filled.
    cap_mb = (3 * lite0_each + lite2_each) * photos / 2 / storage.MB
    monkeypatch.setenv(storage.CAPS_ENV, f"stage_maps={cap_mb}")
    with pytest.raises(TrainingError, match="ensemble trains on stored stage maps"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "ens"), also_backbone="efficientnet_lite2", **SMALL))


def test_a_refit_ensemble_of_two_backbones_learns_from_valid_and_is_one_network(data, tmp_path):
    import onnxruntime

    from core.models import export

    out = tmp_path / "run"
    updates = []
    result = train(TrainConfig(data=str(data), out=str(out), ensemble=2, also_backbone="efficientnet_lite2",
                               refit=True, cut="blocks.5", **SMALL), on_progress=updates.append)
    kinds = ["efficientnet_lite0"] * 2 + ["efficientnet_lite2"] * 2
    assert [m["backbone"] for m in result["members"]] == kinds and [m["seed"] for m in result["members"]] == [0, 1] * 2
    chosen = result["refit_epochs"]
    assert set(chosen) == set(kinds) and all(1 <= epoch <= SMALL["epochs"] for epoch in chosen.values())
    # Each member trained on train and valid for the epochs its backbone's choosing run picked, and no longer.
    assert all(len(m["history"]) == chosen[m["backbone"]] and m["valid"] is None for m in result["members"])
    assert ensemble_summary(result).startswith("an ensemble of 4 models (2 on lite0, 2 on lite2), refit on train "
                                               "and valid for the epochs valid chose")
    # The bar only moves forward and fills as the last member trains; a member's tiles count the epochs it trains.
    fractions = [u["fraction"] for u in updates]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    training = [u for u in updates if u["stage"] == "train" and u["message"].startswith("Model ")]
    assert max(u["fraction"] for u in training) > 0.9
    assert all(u["epochs"] == chosen[kinds[int(u["message"].split(" of ")[0].split()[1]) - 1]] for u in training)
    log = (out / "log.txt").read_text()
    from core.data.layouts.registry import load_dataset

    dataset = load_dataset(str(data))
    n_train, n_valid = (len(dataset.rows(split)) for split in ("train", "valid"))
    assert log.count(f"refit: trains on {n_train + n_valid} photos (train {n_train} + valid {n_valid})") == 4
    assert all((out / "choosing" / kind / "model.pt").is_file() for kind in set(kinds))
    # Evaluate gets the ensemble's test scores; valid's came from the choosing runs, not from the saved network.
    from core.evaluation.predictions import PredictionStore

    store = PredictionStore(out / "model.pt")
    assert store.missing(dataset.rows("test")).empty and len(store.missing(dataset.rows("valid"))) == n_valid
    # One network: each backbone's frozen stages once, the mean of the four members' probabilities.
    model, meta = load_model(out)
    assert meta["ensemble"]["backbones"] == kinds and meta["temperature"] > 0
    paths = sorted(str(p) for p in (data / "bin-images").glob("*.jpg"))[:4]
    photos = torch.stack([photo_tensor(p, meta) for p in paths])
    with torch.no_grad():
        members = [load_model(out / "members" / str(k))[0] for k in (1, 2, 3, 4)]
        mean = torch.stack([m(photos).softmax(1) for m in members]).mean(0)
        assert torch.allclose(model(photos).softmax(1), mean, atol=1e-5)
    session = onnxruntime.InferenceSession(str(export.ensure_onnx(out / "model.pt")))
    exported = session.run(None, {session.get_inputs()[0].name: photos.numpy()})[0]
    with torch.no_grad():
        reference = export.ViewAveragedModel.of(model, meta)(photos).numpy()
    assert np.abs(exported - reference).max() < 1e-4
