"""WebDataset shard sets: packing (local and s3://), resuming, reading back, damaged shards, workers, as a dataset."""
from __future__ import annotations

import json
import os
import tarfile
from collections import defaultdict
from pathlib import Path

import boto3
import pytest

from core.data.layouts.registry import load_dataset
from core.data.remote.shards import INDEX_NAME, ShardError, pack_shards
from core.data.remote.streaming import photo_stream
from tests.moto_s3 import shared_world

SHARD_SIZE = "120k"  # a few real photos a shard, so every split spans several shards


def read_split(source, split, **options) -> dict[str, dict]:
    """name → sample for every photo streamed from the split; a name read twice fails the test."""
    samples = {}
    for sample in photo_stream(source, split, **options):
        assert sample["name"] not in samples, f"{sample['name']} read twice"
        samples[sample["name"]] = sample
    return samples


def assert_packed_exactly(dataset, source):
    """Every labelled photo of every split comes back once, byte-identical, with its count and metadata."""
    for split in ("train", "valid", "test"):
        rows = dataset.rows(split)
        samples = read_split(source, split)
        assert set(samples) == set(rows["name"]), split
        for row in rows.itertuples():
            sample = samples[row.name]
            assert sample["image"] == Path(row.path).read_bytes()
            assert sample["count"] == row.count
            meta = Path(row.path).parent.parent / "metadata" / f"{Path(row.name).stem}.json"
            assert sample["metadata"] == (meta.read_bytes() if meta.is_file() else None)


@pytest.fixture
def packed(small_abid, tmp_path):
    dataset = load_dataset(small_abid)
    out = tmp_path / "shards"
    index = pack_shards(dataset, out, shard_size=SHARD_SIZE, seed=3)
    return dataset, out, index


def test_every_photo_lands_in_one_shard_of_its_split_byte_identical(packed):
    dataset, out, index = packed
    assert index["complete"]
    assert_packed_exactly(dataset, out)
    assert set(read_split(out, "all")) == set(dataset.rows()["name"])
    train_shards = [s for s in index["shards"] if s["split"] == "train"]
    assert len(train_shards) > 1
    names = [photo[1] for shard in index["shards"] for photo in shard["photos"]]
    assert len(names) == len(set(names)) == len(dataset.rows())
    for shard in index["shards"]:
        assert shard["name"].startswith(shard["split"] + "-") and (out / shard["name"]).is_file()
        assert sum(shard["classes"].values()) == shard["samples"] == len(shard["photos"])
        with tarfile.open(out / shard["name"]) as tar:
            members = tar.getnames()
        key = shard["photos"][0][0]
        assert {f"{key}.jpg", f"{key}.cls"} <= set(members)
    assert index["classes"] == dataset.classes and index["fingerprint"]
    assert not list(out.glob(".*partial"))


def test_split_order_is_shuffled_with_the_seed(small_abid, tmp_path):
    dataset = load_dataset(small_abid)
    orders = {}
    for seed in (0, 0, 1):
        index = pack_shards(dataset, tmp_path / f"seed{seed}-{len(orders)}", shard_size=SHARD_SIZE, seed=seed)
        orders.setdefault(seed, []).append([p[1] for s in index["shards"] if s["split"] == "train" for p in s["photos"]])
    assert orders[0][0] == orders[0][1] != orders[1][0]
    assert orders[0][0] != sorted(orders[0][0])


def test_a_shard_set_is_a_dataset(packed):
    dataset, out, index = packed
    for source in (out, out / INDEX_NAME, str(out)):
        shards = load_dataset(source)
        assert shards.layout == "shards"
        assert shards.frame["path"].isna().all()
        got = dict(zip(shards.frame["name"], shards.frame["split"]))
        assert got == dict(zip(dataset.rows()["name"], dataset.rows()["split"]))
        assert set(shards.frame["shard"]) == {s["name"] for s in index["shards"]}
        assert shards.summary()["in_range"] == len(dataset.rows())
        assert shards.classes == dataset.classes


def test_a_killed_packing_resumes_without_duplicates_or_gaps(small_abid, tmp_path):
    dataset = load_dataset(small_abid)
    clean = pack_shards(dataset, tmp_path / "clean", shard_size=SHARD_SIZE)

    class Killed(Exception):
        pass

    seen = []

    def kill_midway(fraction, text):
        seen.append(fraction)
        if len(seen) == 23:  # mid-shard: a few photos into the train split's third shard
            raise Killed

    out = tmp_path / "resumed"
    with pytest.raises(Killed):
        pack_shards(dataset, out, shard_size=SHARD_SIZE, on_progress=kill_midway)
    partial = json.loads((out / INDEX_NAME).read_text())
    assert not partial["complete"] and 0 < len(partial["shards"]) < len(clean["shards"])
    assert list(out.glob(".*.partial"))  # the unfinished shard was never published
    with pytest.raises(ShardError, match="not finished"):
        load_dataset(out)

    resumed = pack_shards(dataset, out, shard_size=SHARD_SIZE)
    assert resumed["complete"]
    assert [s["photos"] for s in resumed["shards"]] == [s["photos"] for s in clean["shards"]]
    for shard in clean["shards"]:  # the same photos in the same order: the same bytes
        assert (out / shard["name"]).read_bytes() == (tmp_path / "clean" / shard["name"]).read_bytes()
    assert not list(out.glob(".*.partial"))
    assert_packed_exactly(dataset, out)


def test_packing_elsewhere_data_into_a_used_destination_is_refused(packed, small_abid):
    dataset, out, index = packed
    with pytest.raises(ShardError, match="already holds shards"):
        pack_shards(dataset, out, shard_size=SHARD_SIZE, seed=4)


def test_unreadable_photos_are_skipped_and_listed(small_abid, tmp_path):
    dataset = load_dataset(small_abid)
    broken = dataset.rows("train").iloc[0]
    Path(broken["path"]).write_bytes(b"not a jpeg at all")  # damaged after indexing, found while packing
    index = pack_shards(dataset, tmp_path / "out", shard_size=SHARD_SIZE)
    packed_names = {p[1] for s in index["shards"] for p in s["photos"]}
    assert broken["name"] not in packed_names
    assert len(packed_names) == len(dataset.rows()) - 1
    [skipped] = [entry for entry in index["skipped"] if entry["split"]]
    assert skipped["name"] == broken["name"] and skipped["split"] == "train" and "readable" in skipped["reason"]


def test_a_truncated_shard_is_named_or_skipped(packed):
    dataset, out, index = packed
    victim = [s for s in index["shards"] if s["split"] == "train"][1]
    path = out / victim["name"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ShardError, match=victim["name"]) as caught:
        read_split(out, "train")
    assert "truncated" in str(caught.value)
    with pytest.warns(RuntimeWarning, match=victim["name"]):
        samples = read_split(out, "train", on_bad_shard="skip")
    others = {p[1] for s in index["shards"] if s["split"] == "train" and s is not victim for p in s["photos"]}
    assert others <= set(samples) and len(samples) < len(dataset.rows("train"))


def test_a_shard_cut_at_a_file_boundary_is_caught_by_its_count(packed):
    dataset, out, index = packed
    victim = [s for s in index["shards"] if s["split"] == "valid"][0]
    path = out / victim["name"]
    with tarfile.open(path) as tar:
        members = tar.getmembers()
    path.write_bytes(path.read_bytes()[: members[3].offset])  # whole samples gone, no tar error
    with pytest.raises(ShardError, match=f"{victim['name']}.*ends after 1 of"):
        read_split(out, "valid")


def test_two_dataloader_workers_read_disjoint_shards(packed):
    import torch
    import webdataset as wds

    dataset, out, index = packed

    def tag(sample):
        return sample["name"], sample["shard"], torch.utils.data.get_worker_info().id

    stream = wds.DataPipeline(photo_stream(out, "train"), wds.map(tag))
    loader = torch.utils.data.DataLoader(stream, num_workers=2, batch_size=None)
    shards_by_worker = defaultdict(set)
    names = []
    for name, shard, worker in loader:
        shards_by_worker[worker].add(shard)
        names.append(name)
    assert len(shards_by_worker) == 2
    assert not shards_by_worker[0] & shards_by_worker[1]
    assert sorted(names) == sorted(dataset.rows("train")["name"])


@pytest.fixture
def s3_world(tmp_path_factory, monkeypatch):
    world = shared_world(tmp_path_factory)
    monkeypatch.setenv("BINSIGHT_S3_ENDPOINT_URL", world.url)
    monkeypatch.setenv("BINSIGHT_S3_ACCESS_KEY_ID", "test-user")
    monkeypatch.setenv("BINSIGHT_S3_SECRET_ACCESS_KEY", "test-secret")
    admin = boto3.client("s3", endpoint_url=world.url, region_name="us-east-1",
                         aws_access_key_id="test-admin", aws_secret_access_key="test-admin-secret")
    if "my-shards" not in {b["Name"] for b in admin.list_buckets()["Buckets"]}:
        admin.create_bucket(Bucket="my-shards")
    return world, admin


def test_pack_to_s3_and_read_back(s3_world, small_abid, tmp_path):
    world, admin = s3_world
    dataset = load_dataset(small_abid)
    url = f"s3://my-shards/sets/{tmp_path.name}"
    index = pack_shards(dataset, url, shard_size=SHARD_SIZE)
    stored = {item["Key"] for item in admin.list_objects_v2(Bucket="my-shards", Prefix=f"sets/{tmp_path.name}/")["Contents"]}
    assert stored == {f"sets/{tmp_path.name}/{name}" for name in [INDEX_NAME] + [s["name"] for s in index["shards"]]}
    assert_packed_exactly(dataset, url)
    shards = load_dataset(url)
    assert shards.layout == "shards" and len(shards.frame) == len(dataset.rows())
    assert not list((Path(os.environ["BINSIGHT_HOME"]) / "shards-staging").rglob("*.tar*"))



def test_a_shard_download_cut_off_midway_is_named(s3_world, small_abid, tmp_path, relay, monkeypatch):
    world, _admin = s3_world
    url = f"s3://my-shards/sets/{tmp_path.name}"
    index = pack_shards(load_dataset(small_abid), url, shard_size=SHARD_SIZE)
    # the first connection (the first train shard: the index is given) breaks off after 60 kB of its ~140 kB
    cutting = relay(world.port, delay_s=0, cut_after=60_000, cuts=1)
    monkeypatch.setenv("BINSIGHT_S3_ENDPOINT_URL", cutting.url)
    with pytest.raises(ShardError, match=r"shard train-000000\.tar in s3://.* breaks off after \d+ of"):
        read_split(url, "train", index=index)

def test_a_counting_list_packs_its_mirror_and_the_bucket(s3_world, tmp_path):
    world, admin = s3_world
    names = sorted(world.labels)[:12]
    (tmp_path / "lists").mkdir()
    (tmp_path / "bin-images").mkdir()
    for name in names[:5]:  # the local mirror holds some; the rest come from the bucket
        (tmp_path / "bin-images" / name).write_bytes((world.source / "bin-images" / name).read_bytes())
    pairs = [[int(Path(n).stem) - 1, world.labels[n]] for n in names]
    (tmp_path / "lists" / "counting.json").write_text(json.dumps(pairs))
    dataset = load_dataset(tmp_path / "lists" / "counting.json")
    on_disk = dict(zip(dataset.frame["name"], dataset.frame["path"]))
    assert {n for n, p in on_disk.items() if p} == set(names[:5])

    index = pack_shards(dataset, tmp_path / "out", shard_size=SHARD_SIZE)
    from core.data.remote.s3 import S3Source

    assert not any(S3Source().cached(f"bin-images/{name}") for name in names)  # fetched for packing only
    labelled = dataset.labelled()
    assert sum(s["samples"] for s in index["shards"]) == len(labelled[labelled["split"].notna()])
    for split in ("train", "valid", "test"):
        for name, sample in read_split(tmp_path / "out", split).items():
            assert sample["image"] == (world.source / "bin-images" / name).read_bytes()
            assert sample["count"] == world.labels[name]


def test_cli_packs_and_prints_a_summary(small_abid, tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "cli"
    assert main(["shards", "--data", str(small_abid), "--out", str(out), "--shard-size", SHARD_SIZE]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert sum(summary["photos"].values()) == len(load_dataset(small_abid).rows())
    assert summary["shards"] == len(json.loads((out / INDEX_NAME).read_text())["shards"])
    assert main(["shards", "--data", str(small_abid), "--out", str(out), "--shard-size", "1MB"]) == 2


@pytest.mark.parametrize("world", [1, 2])
def test_training_stream_gives_every_rank_equal_whole_batches(packed, monkeypatch, world):
    import torch
    from torchvision.transforms import v2

    from core.data.remote.streaming import training_stream

    dataset, out, index = packed
    transform = v2.Compose([v2.ToImage(), v2.Resize((32, 32), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    class_index = {c: i for i, c in enumerate(dataset.classes)}
    labels = {p[0]: class_index[p[2]] for s in index["shards"] for p in s["photos"]}
    train_keys = {p[0] for s in index["shards"] if s["split"] == "train" for p in s["photos"]}
    batches = {}
    for rank in range(world):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(world))
        stream = training_stream(out, transform, class_index, batch_size=4, workers=2)
        loader = torch.utils.data.DataLoader(stream, batch_size=4, num_workers=2)
        batches[rank] = list(loader)
        assert len(batches[rank]) == len(loader)
        for images, batch_labels, keys, errors in batches[rank]:
            assert images.shape == (4, 3, 32, 32) and not any(errors)
            assert set(keys) <= train_keys and batch_labels.tolist() == [labels[k] for k in keys]
    assert len({len(b) for b in batches.values()}) == 1 and len(batches[0]) > 0
    seen = {k for b in batches.values() for _, _, keys, _ in b for k in keys}
    assert seen == train_keys  # no gaps: readers with fewer photos go round their shards again to fill whole batches


def test_packing_from_the_balance_page_runs_as_a_background_job_with_progress(small_abid, tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from core.jobs import queue as jobs
    from core.jobs import worker
    from core.jobs.runners import run_job

    monkeypatch.setenv("BINSIGHT_DATA", str(small_abid))
    monkeypatch.setattr(worker, "ensure_workers", lambda *a, **k: [])  # the job is run below, in this process
    page = Path(__file__).resolve().parents[1] / "app_pages" / "balance.py"
    at = AppTest.from_file(str(page), default_timeout=120).run()
    dest = tmp_path / "packed"
    at.text_input(key="shards_dest").set_value(str(dest)).run()
    at.button(key="shards_pack").click().run()
    assert not at.exception
    job = jobs.list_jobs(limit=1)[0]
    assert job.kind == "shards" and job.params["dest"] == str(dest.resolve())
    claimed = jobs.claim_next("cpu", ["cpu", "auto"], "test-worker", os.getpid())
    assert run_job(claimed, "cpu") == "done", jobs.get(job.id).error
    done = jobs.get(job.id)
    assert done.progress["fraction"] == 1.0 and "shards at" in done.progress["message"]
    packed = load_dataset(dest)
    assert packed.layout == "shards" and len(packed.frame) == len(load_dataset(small_abid).rows())


@pytest.mark.parametrize("workers", [0, 2])
def test_the_training_stream_is_reshuffled_every_epoch_and_sees_every_photo_once(packed, workers):
    import torch
    from torchvision.transforms import v2

    from core.data.remote.streaming import training_stream

    dataset, out, index = packed
    transform = v2.Compose([v2.ToImage(), v2.Resize((8, 8), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    class_index = {c: i for i, c in enumerate(dataset.classes)}
    train_keys = sorted(p[0] for s in index["shards"] if s["split"] == "train" for p in s["photos"])

    def epochs(seed: int, n: int = 2) -> list[list[str]]:
        stream = training_stream(out, transform, class_index, batch_size=1, workers=workers, seed=seed)
        loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=workers,
                                             persistent_workers=workers > 0)
        return [[key for _, _, key, _ in loader] for _ in range(n)]

    first, second = epochs(seed=0)
    if workers == 0:  # one reader: exactly every photo once a pass (several readers pad to equal lengths)
        assert sorted(first) == sorted(second) == train_keys
    else:
        assert set(first) == set(second) == set(train_keys)
    assert first != second, "the second epoch repeated the first one's order"
    assert epochs(seed=0) == [first, second], "the same seed must give the same orders"
    assert epochs(seed=1)[0] != first
