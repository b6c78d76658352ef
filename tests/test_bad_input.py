"""Bad datasets: each gets a clear message, and everything usable still loads."""
import pandas as pd
import pytest

from core.data.dataset import DatasetError
from core.data.layouts.registry import load_dataset


def test_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="is empty"):
        load_dataset(tmp_path / "empty")


def test_folder_without_bin_photos(tmp_path):
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "notes.txt").write_text("hello")
    with pytest.raises(DatasetError, match="no bin photos in a known layout"):
        load_dataset(tmp_path / "odd")


def test_folder_without_labels(small_abid):
    (small_abid / "labels.csv").unlink()
    for meta in (small_abid / "metadata").glob("*.json"):
        meta.unlink()
    ds = load_dataset(small_abid)
    assert len(ds.frame) == 60 and ds.labelled().empty
    assert any("No labels found" in note for note in ds.notes)


def test_corrupt_jpeg_is_skipped_and_listed(small_abid):
    (small_abid / "bin-images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    labels = pd.read_csv(small_abid / "labels.csv")
    pd.concat([labels, pd.DataFrame([{"image": "broken.jpg", "count": 3}])]).to_csv(small_abid / "labels.csv", index=False)
    ds = load_dataset(small_abid)
    assert ("broken.jpg", "not a readable image (corrupt or not a JPEG/PNG)") in ds.problems
    assert "broken.jpg" not in set(ds.labelled()["name"])
    assert len(ds.labelled()) == 60


def test_malformed_metadata_json(tmp_path, small_abid):
    (small_abid / "labels.csv").unlink()
    victim = sorted((small_abid / "metadata").glob("*.json"))[0]
    victim.write_text("{ not json")
    ds = load_dataset(small_abid)
    problems = dict(ds.problems)
    photo = victim.stem + ".jpg"
    assert "malformed JSON" in problems[photo]
    assert photo not in set(ds.labelled()["name"])
    assert len(ds.labelled()) == len(list((small_abid / "metadata").glob("*.json"))) - 1


def test_labels_csv_with_a_non_integer_count(small_abid):
    for meta in (small_abid / "metadata").glob("*.json"):
        meta.unlink()
    labels = pd.read_csv(small_abid / "labels.csv").astype({"count": object})
    victim = labels.loc[0, "image"]
    labels.loc[0, "count"] = "three"
    labels.to_csv(small_abid / "labels.csv", index=False)
    ds = load_dataset(small_abid)
    assert "'three' is not a whole number" in dict(ds.problems)[victim]
    assert len(ds.labelled()) == 59
