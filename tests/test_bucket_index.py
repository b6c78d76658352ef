"""The index of a whole bucket from its metadata JSONs, against moto's real S3 server: counts, resume, CLI."""
from __future__ import annotations

import json

import pytest

from core.data.remote.bucket_index import build_bucket_index
from core.data.layouts.registry import load_dataset
from core.errors import Cancelled
from tests.moto_s3 import PUBLIC_BUCKET, public_world


@pytest.fixture
def world(tmp_path_factory, monkeypatch):
    return public_world(tmp_path_factory, monkeypatch)


def expected_counts(world) -> dict[str, int]:
    """The seeded photos that have a metadata JSON, with its EXPECTED_QUANTITY."""
    found = {}
    for name in world.labels:
        meta = world.source / "metadata" / (name.rsplit(".", 1)[0] + ".json")
        if meta.is_file():
            found[name] = json.loads(meta.read_text())["EXPECTED_QUANTITY"]
    return found


def test_every_metadata_object_becomes_a_row_with_its_count(world):
    expected = expected_counts(world)
    frame = build_bucket_index(f"s3://{PUBLIC_BUCKET}", in_flight=4, chunk=7)
    assert dict(zip(frame["name"], frame["count"].astype(int))) == expected
    assert frame["path"].isna().all() and (frame["label_source"] == "metadata").all()


def test_a_stopped_indexing_resumes_without_reading_again(world, monkeypatch):
    expected = expected_counts(world)
    if len(expected) < 10:
        pytest.skip("the seeded bucket holds too few metadata objects for two parts")
    seen: list[int] = []
    with pytest.raises(Cancelled):
        build_bucket_index(f"s3://{PUBLIC_BUCKET}", in_flight=2, chunk=5,
                           on_progress=lambda done, total, text: seen.append(done), should_stop=lambda: len(seen) > 1)
    assert seen[-1] == 5  # one part of five saved before the stop
    from core.data.remote import s3

    reads: list[str] = []
    real = s3.S3Source._make_client

    def counting_client(self):
        client = real(self)
        original = client.get_object
        client.get_object = lambda **kw: reads.append(kw["Key"]) or original(**kw)
        return client

    monkeypatch.setattr(s3.S3Source, "_make_client", counting_client)
    frame = build_bucket_index(f"s3://{PUBLIC_BUCKET}", in_flight=2, chunk=5)
    assert len(reads) == len(expected) - 5  # the saved part is not read again
    assert sorted(frame["name"]) == sorted(expected) and not frame["name"].duplicated().any()


def test_a_bucket_is_a_dataset_and_the_cli_indexes_it(world, capsys):
    from core.cli import main

    assert main(["index", f"s3://{PUBLIC_BUCKET}"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["photos"] == len(expected_counts(world))
    dataset = load_dataset(f"s3://{PUBLIC_BUCKET}")
    assert dataset.layout == "bucket" and dataset.location == f"s3://{PUBLIC_BUCKET}"
    assert set(dataset.labelled()["split"]) <= {"train", "valid", "test"}
