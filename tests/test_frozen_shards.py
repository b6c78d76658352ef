"""Frozen mode from a shard set: features cached by photo content (shared with folder runs), damaged shards, S3."""
from __future__ import annotations

import io
import json
import tarfile

import pytest
import torch

from core.data.layouts.registry import load_dataset
from core.data.remote.shards import ShardError, pack_shards
from core.models.networks import load_model
from core.training import distributed
from core.training.config import TrainConfig
from core.training.loop import train
from tests.test_shards import s3_world  # noqa: F401 — the moto S3 server with a bucket for shard sets

SHARD_SIZE = "100kB"  # a few real photos a shard, so every split spans several shards


def frozen_settings(dataset, **changes) -> dict:
    """Small frozen runs whose head does not depend on the order photos arrive in: one full batch a step, no
    augmentation (which picks a random view per row), no sampler; four test-time views to score."""
    return {"mode": "frozen", "image_size": 64, "epochs": 3, "batch_size": len(dataset.rows("train")),
            "num_workers": 1, "device": "cpu", "augment": False, "balance": "none", "tta": "flips",
            "seed": 5} | changes


@pytest.fixture
def packed(small_abid, tmp_path):
    dataset = load_dataset(small_abid)
    index = pack_shards(dataset, tmp_path / "shards", shard_size=SHARD_SIZE, seed=2)
    return dataset, tmp_path / "shards", index


@pytest.mark.parametrize("first", ["folder", "shards"])
def test_frozen_from_shards_matches_the_folder_and_shares_its_feature_cache(packed, small_abid, tmp_path, first,
                                                                            monkeypatch):
    monkeypatch.setenv(distributed.TEST_NO_DROPOUT_ENV, "1")  # dropout masks follow the order rows are in
    dataset, shards, _ = packed
    sources = {"folder": small_abid, "shards": shards}
    second = "shards" if first == "folder" else "folder"
    settings = frozen_settings(dataset)
    states = {"folder": [], "shards": []}
    results = {name: train(TrainConfig(data=str(sources[name]), out=str(tmp_path / name), **settings),
                           on_progress=states[name].append) for name in (first, second)}

    photos = len(dataset.rows())
    assert results[first]["features_computed"] == photos and results[first]["feature_cache_hits"] == 0
    # The second run finds every photo's features under its content hash, whichever way the first one read it.
    assert results[second]["feature_cache_hits"] == photos and results[second]["features_computed"] == 0
    assert "0 computed" in (tmp_path / second / "log.txt").read_text()
    if first == "shards":  # the streamed pass reports its speed like the folder's
        assert any(s["stage"] == "features" and s["images_per_s"] and "Computed features" in s["message"]
                   for s in states["shards"])

    folder, streamed = results["folder"], results["shards"]
    for split in ("valid", "test"):
        assert streamed[split]["n"] == folder[split]["n"] == len(dataset.rows(split)) > 0
        assert streamed[split]["confusion_matrix"] == folder[split]["confusion_matrix"]
    for a, b in zip(folder["history"], streamed["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["valid_loss"] == pytest.approx(b["valid_loss"], rel=1e-4)
    assert streamed["temperature"] == pytest.approx(folder["temperature"], rel=1e-3)
    heads = [load_model(tmp_path / name / "model.pt")[0].head.state_dict() for name in ("folder", "shards")]
    for (name, a), b in zip(heads[0].items(), heads[1].values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name
    assert streamed["skipped"] == [] and streamed["mode"] == "frozen"


def test_a_truncated_shard_stops_with_its_name_or_is_skipped(packed, tmp_path):
    dataset, shards, index = packed
    victim = [s for s in index["shards"] if s["split"] == "train"][1]
    path = shards / victim["name"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(ShardError, match=victim["name"]) as caught:
        train(TrainConfig(data=str(shards), out=str(tmp_path / "stop"), **frozen_settings(dataset)))
    message = str(caught.value)
    assert "truncated" in message and "Traceback" not in message  # the shard's own message, not a worker's dump

    with pytest.warns(RuntimeWarning, match=victim["name"]):  # read in this process (no workers): its warning here
        result = train(TrainConfig(data=str(shards), out=str(tmp_path / "skip"),
                                   **frozen_settings(dataset, on_bad_shard="skip", num_workers=0)))
    assert result["test"]["n"] == len(dataset.rows("test"))
    log = (tmp_path / "skip" / "log.txt").read_text()
    assert "photos not read (in damaged shards that were skipped)" in log
    # The photos read before the stop were cached: the second run computed only the rest.
    assert 0 < result["feature_cache_hits"] < len(dataset.rows())


def test_unreadable_packed_photos_are_skipped_by_name(small_abid, tmp_path):
    dataset = load_dataset(small_abid)
    index = pack_shards(dataset, tmp_path / "shards", shard_size=SHARD_SIZE)
    shard = next(s for s in index["shards"] if s["split"] == "train")
    key, name, _count = shard["photos"][0]
    # Rewrite the shard with the first photo's bytes replaced by something that is not an image.
    source = tmp_path / "shards" / shard["name"]
    members = []
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            data = tar.extractfile(member).read()
            if member.name.startswith(key + ".") and member.name.rsplit(".", 1)[1] in ("jpg", "png"):
                data = b"not a photo at all"
            members.append((member, data))
    with tarfile.open(source, "w") as tar:
        for member, data in members:
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))

    result = train(TrainConfig(data=str(tmp_path / "shards"), out=str(tmp_path / "run"),
                               **frozen_settings(dataset, num_workers=0)))
    [skipped] = result["skipped"]
    assert skipped["photo"] == name and "not an image" in skipped["reason"]
    assert result["test"]["n"] == len(dataset.rows("test"))


def test_frozen_from_shards_on_s3(s3_world, small_abid, tmp_path):  # noqa: F811 — the fixture imported above
    dataset = load_dataset(small_abid)
    url = f"s3://my-shards/frozen-{tmp_path.name}"
    pack_shards(dataset, url, shard_size="400kB")
    result = train(TrainConfig(data=url, out=str(tmp_path / "run"), **frozen_settings(dataset, tta="none")))
    assert result["features_computed"] == len(dataset.rows()) and result["dataset"] == url
    assert result["test"]["n"] == len(dataset.rows("test")) > 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dataset"] == url


def test_stream_features_decode_once_for_every_view_and_a_stop_keeps_what_was_computed(packed):
    from core.data.remote.streaming import photo_stream
    from core.errors import Cancelled
    from core.models.features import extract_stream_features
    from core.models.networks import build_backbone
    from core.models.preprocess import photo_tensor, preprocessing

    dataset, shards, _ = packed
    backbone, info = build_backbone("efficientnet_lite0")
    meta = info | preprocessing(info, 64)
    views = ("plain", "hflip", "vflip")
    checks = []

    def stop_at_the_second_check():
        checks.append(1)
        return len(checks) >= 2

    with pytest.raises(Cancelled):  # the first batch of 4 is computed before the second check stops the pass
        extract_stream_features(backbone, meta, photo_stream(shards, "train"), views, batch_size=4, num_workers=1,
                                should_stop=stop_at_the_second_check)

    samples = list(photo_stream(shards, "train"))  # a plain iterable is read in this thread
    result = extract_stream_features(backbone, meta, samples, views, batch_size=4, num_workers=0)
    assert (result.hits, result.computed) == (4, len(samples) - 4) and not result.errors
    assert result.names == [s["name"] for s in samples] and result.counts == [s["count"] for s in samples]
    paths = dict(zip(dataset.rows()["name"], dataset.rows()["path"]))
    photos = torch.stack([photo_tensor(paths[name], meta) for name in result.names[-2:]])
    with torch.no_grad():
        for view, dims in (("plain", ()), ("hflip", (-1,)), ("vflip", (-2,))):
            expected = backbone.eval()(photos.flip(dims) if dims else photos)
            assert torch.allclose(result.features[view][-2:], expected, atol=1e-4), view
