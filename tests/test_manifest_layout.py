"""The manifest layout (uri,count rows of s3:// photos), against moto's real S3 server: one reader, one registry line."""
from __future__ import annotations

import pytest
from PIL import Image

from core.data.dataset import DatasetError
from core.data.layouts.manifest import MANIFEST
from core.data.layouts.registry import READERS, load_dataset, reader_for
from tests.moto_s3 import PUBLIC_BUCKET, public_world


@pytest.fixture
def world(tmp_path_factory, monkeypatch):
    return public_world(tmp_path_factory, monkeypatch)


def test_a_manifest_of_bucket_photos_is_a_dataset(world, tmp_path):
    chosen = list(world.labels.items())[:4]
    rows = [f"s3://{PUBLIC_BUCKET}/bin-images/{name},{count}" for name, count in chosen]
    rows += [f"s3://{PUBLIC_BUCKET}/bin-images/absent.jpg,2", "https://example.com/a.jpg,1",
             f"s3://{PUBLIC_BUCKET}/bin-images/other.jpg,many"]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("uri,count\n" + "\n".join(rows) + "\n")
    assert reader_for(manifest) is MANIFEST and MANIFEST in READERS

    dataset = load_dataset(manifest)
    assert dataset.layout == "manifest" and len(dataset.frame) == len(rows)
    good = dataset.frame[dataset.frame["problem"].isna()]
    assert dict(zip(good["name"], good["count"])) == {f"s3://{PUBLIC_BUCKET}/bin-images/{n}": c for n, c in chosen}
    for row in good.itertuples():
        with Image.open(row.path) as image:  # fetched into the S3 cache, its size read like any photo's
            assert (row.width, row.height) == image.size
        assert (world.source / "bin-images" / row.name.rsplit("/", 1)[1]).read_bytes() == open(row.path, "rb").read()
    problems = dict(dataset.problems)
    assert problems[f"s3://{PUBLIC_BUCKET}/bin-images/absent.jpg"].endswith("is not in the bucket")
    assert "is not an s3://bucket/key URI" in problems["https://example.com/a.jpg"]
    assert any("'many' is not a whole number" in p for p in problems.values())
    assert dataset.notes == ["3 photos or labels could not be used and are skipped (see the list of problems)."]
    again = load_dataset(manifest).frame  # read back from the index cache
    assert again[["name", "count", "path", "problem"]].astype(object).equals(
        dataset.frame[["name", "count", "path", "problem"]].astype(object))


def test_a_csv_without_uri_and_count_keeps_the_old_message(tmp_path):
    other = tmp_path / "labels.csv"
    other.write_text("image,count\n00001.jpg,3\n")
    with pytest.raises(DatasetError, match=r"^labels.csv: a dataset is a folder, a file_list.json or a counting list"):
        load_dataset(other)
