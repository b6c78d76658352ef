"""The dataset index on real ABID files, the other layouts, the split recipe and the class range."""
import json
import os
import shutil
from pathlib import Path

import pandas as pd
from PIL import Image

from core.data.labels import abid
from core.data.classes import ClassRange
from core.data.layouts.registry import load_dataset
from core.data.labels.splits import make_split


def test_real_metadata_parses_items_and_quantity(abid_dir):
    parsed = 0
    for path in sorted((abid_dir / "metadata").glob("*.json"))[:50]:
        meta = abid.parse_metadata(path.read_bytes())
        raw = json.loads(path.read_text())
        assert meta.expected_quantity == raw["EXPECTED_QUANTITY"]
        assert len(meta.items) == len(raw["BIN_FCSKU_DATA"])
        assert sum(i["quantity"] for i in meta.items) == raw["EXPECTED_QUANTITY"]
        parsed += 1
    assert parsed == 50


def test_abid_index_matches_labels_csv(abid_dir):
    ds = load_dataset(abid_dir)
    labels = pd.read_csv(abid_dir / "labels.csv")
    assert len(ds.frame) == len(labels)
    merged = ds.frame.merge(labels, left_on="name", right_on="image")
    assert len(merged) == len(labels) and (merged["count_x"] == merged["count_y"]).all()
    with_quantity = {p.stem + ".jpg" for p in (abid_dir / "metadata").glob("*.json")
                     if json.loads(p.read_text()).get("EXPECTED_QUANTITY") is not None}
    from_metadata = len(with_quantity & set(labels["image"]))
    assert ds.summary()["label_sources"] == {"labels.csv": len(labels) - from_metadata, "metadata": from_metadata}
    with_meta = ds.frame[ds.frame["label_source"] == "metadata"]
    filled = with_meta[with_meta["count"] > 0]
    assert (filled["n_items"] > 0).all() and filled["item_names"].str.len().gt(0).all()
    assert ds.frame["width"].notna().all() and ds.frame["height"].notna().all()
    for _, row in ds.frame.iloc[::max(1, len(ds.frame) // 20)].iterrows():  # 20 photos spread over the set
        with Image.open(row["path"]) as image:
            assert (row["width"], row["height"]) == image.size
    outside = int((~labels["count"].between(1, 5)).sum())
    assert len(ds.excluded()) == outside  # class range 1–5 leaves out the empty bins and the fuller ones
    assert sorted(ds.labelled()["cls"].unique()) == [1, 2, 3, 4, 5]


def test_file_list_json_maps_to_counts(abid_dir):
    labels = abid.read_file_list(abid_dir / "lists" / "file_list.json")
    raw = json.loads((abid_dir / "lists" / "file_list.json").read_text())
    assert len(labels) == sum(len(v) for v in raw.values()) > 0
    first = raw["3"][0]
    assert labels[Path(first).stem + ".jpg"] == 3


def test_counting_list_indexes_all_pairs(abid_dir):
    ds = load_dataset(abid_dir / "lists" / "counting_train.json")
    pairs = json.loads((abid_dir / "lists" / "counting_train.json").read_text())
    assert len(ds.frame) == len(pairs) > 0
    index, count = pairs[0]
    row = ds.frame.iloc[0]
    assert row["name"] == "%05d.jpg" % (index + 1) and row["count"] == count
    # photos in the local mirror (<list folder>/../bin-images) are read from disk; the rest come from the bucket
    held = set(os.listdir(abid_dir / "bin-images"))
    assert set(ds.frame.loc[ds.frame["path"].notna(), "name"]) == held & set(ds.frame["name"])


def test_split_is_stratified_capped_and_reproducible(abid_dir):
    ds = load_dataset(abid_dir)
    rows = ds.labelled()
    per_class = rows.groupby("cls").size()
    test = rows[rows["split"] == "test"].groupby("cls").size()
    for cls, n in per_class.items():
        assert test[cls] == min(100, int(n * 0.2))  # never more than a fifth of a class
        train_valid = rows[(rows["cls"] == cls) & rows["split"].isin(["train", "valid"])]
        assert (train_valid["split"] == "valid").sum() == round(len(train_valid) * 0.2)
    assert set(ds.split_info["short_test"]) == {c for c, n in per_class.items() if n * 0.2 < 100}
    again, _ = make_split(rows, seed=0)
    assert (again == rows["split"]).all()
    other, _ = make_split(rows, seed=1)
    assert (other != rows["split"]).any()


def test_split_is_saved_and_reused(small_abid):
    first = load_dataset(small_abid).frame.set_index("name")["split"]
    second = load_dataset(small_abid).frame.set_index("name")["split"]
    assert list(first.index) == list(second.index) and (first == second).all()
    # a new photo joins train or valid and leaves the test set as it was
    shutil.copy(small_abid / "bin-images" / first.index[0], small_abid / "bin-images" / "new_photo.jpg")
    labels = pd.read_csv(small_abid / "labels.csv")
    pd.concat([labels, pd.DataFrame([{"image": "new_photo.jpg", "count": 2}])]).to_csv(small_abid / "labels.csv", index=False)
    third = load_dataset(small_abid).frame.set_index("name")["split"]
    assert third["new_photo.jpg"] in ("train", "valid")
    assert (third.drop("new_photo.jpg") == first).all()


def test_imagefolder_layout_keeps_its_splits(tmp_path, small_abid):
    labels = pd.read_csv(small_abid / "labels.csv")
    for i, row in labels.iterrows():
        split = ["train_data", "valid_data", "test_data"][i % 3]
        target = tmp_path / "folders" / split / str(row["count"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(small_abid / "bin-images" / row["image"], target / row["image"])
    ds = load_dataset(tmp_path / "folders")
    assert ds.layout == "imagefolder" and len(ds.frame) == len(labels)
    assert ds.split_info["source"] == "folders"
    assert set(ds.frame["split"]) == {"train", "valid", "test"}
    assert (ds.frame["label_source"] == "folder").all()


def test_class_range_bucket_and_zero():
    counts = pd.Series([0, 1, 5, 6, 30], dtype="Int64")
    assert ClassRange(1, 5).assign(counts).tolist()[1:3] == [1, 5]
    assert ClassRange(1, 5).assign(counts).isna().tolist() == [True, False, False, True, True]
    assert ClassRange(0, 5, top_bucket=True).assign(counts).tolist() == [0, 1, 5, 5, 5]
    assert ClassRange(1, 5, True).name(5) == "5+"


def test_demo_set_is_generated_once_in_abid_layout():
    from core.data.layouts.demo import ensure_demo

    folder = ensure_demo()
    ds = load_dataset(folder)
    assert ds.layout == "abid" and len(ds.frame) > 250
    assert (ds.frame["label_source"] == "metadata").all()
    assert set(ds.labelled()["cls"]) == {1, 2, 3, 4, 5}
    assert ds.frame["count"].min() == 0 and ds.frame["count"].max() > 5
    meta = json.loads((folder / "metadata" / "00001.json").read_text())
    assert sum(i["quantity"] for i in meta["BIN_FCSKU_DATA"].values()) == meta["EXPECTED_QUANTITY"]
    stamp = (folder / "bin-images" / "00001.jpg").stat().st_mtime_ns
    assert ensure_demo() == folder and (folder / "bin-images" / "00001.jpg").stat().st_mtime_ns == stamp


def test_index_is_rebuilt_when_the_folder_changes(small_abid):
    before = load_dataset(small_abid)
    victim = before.frame["name"].iloc[0]
    (small_abid / "bin-images" / victim).unlink()
    after = load_dataset(small_abid)
    assert len(after.frame) == len(before.frame)  # still labelled in labels.csv ...
    assert after.frame.set_index("name").loc[victim, "path"] is None  # ... but no longer on disk
    assert victim not in set(after.rows()["name"])


def test_a_loaded_dataset_relabelled_equals_a_reload(small_abid):
    from core.data.labels import annotations
    from core.data.layouts.base import relabelled

    loaded = load_dataset(small_abid)
    name = loaded.frame["name"].iloc[0]
    recorded = int(loaded.frame["count"].iloc[0])
    annotations.save_decision(loaded.key, name, "ana", recorded % 5 + 1, recorded_count=recorded)
    annotations.save_decision(loaded.key, loaded.frame["name"].iloc[1], "ana", None,
                              recorded_count=int(loaded.frame["count"].iloc[1]))  # unclear: out of the classes
    again = relabelled(loaded)
    reread = load_dataset(small_abid)
    pd.testing.assert_frame_equal(again.frame, reread.frame)
    assert again.split_info == reread.split_info and again.key == reread.key
    assert int(again.frame.set_index("name").loc[name, "count"]) == recorded % 5 + 1
    assert int(loaded.frame.set_index("name").loc[name, "count"]) == recorded  # the loaded one is left as it was


def test_the_views_read_the_file_stamps_taken_while_loading_and_a_reload_sees_a_changed_photo(small_abid, monkeypatch):
    from core import files
    from core.data.photos.photo_checks import check_photos
    from core.evaluation import embedding_map
    from core.review.health import health_report

    ds = load_dataset(small_abid)
    paths = ds.frame["path"].dropna().tolist()
    assert paths and [files.file_stamp(p) for p in paths] == ds.stamps[paths].tolist()
    first = health_report(ds, label_issues=False)
    stats = []
    real_stamp = files.file_stamp
    monkeypatch.setattr(files, "file_stamp", lambda path: stats.append(path) or real_stamp(path))
    rows = ds.frame[["name", "path", "cls"]]
    # Data health's photo checks and the map's key: not one stat per photo (at 536 K photos ~5 s each)
    again = health_report(ds, label_issues=False)
    assert again.quality.equals(first.quality) and again.duplicates.equals(first.duplicates)
    assert embedding_map.cached_map(ds.key, rows, known_stamps=ds.stamps) is None
    assert stats == []
    assert embedding_map._digest(ds.key, rows, 0, ds.stamps) == embedding_map._digest(ds.key, rows, 0)
    assert len(stats) == len(paths)  # without them each file is stat'ed, to the same key
    # A photo damaged on disk: the next load takes its new stamp, and the checks look at it again
    damaged = Path(paths[0])
    damaged.write_bytes(b"not a photo any more")
    os.utime(damaged, ns=(1, 1))
    reloaded = load_dataset(small_abid)
    assert reloaded.stamps[str(damaged)] != ds.stamps[str(damaged)]
    checks = check_photos(reloaded.key, reloaded.frame, known_stamps=reloaded.stamps).frame.set_index("name")
    assert isinstance(checks.loc[damaged.name, "error"], str)


def test_the_views_key_their_saved_results_by_the_loaded_files_and_look_at_no_photo_until_one_changes(
        small_abid, monkeypatch):
    from core.data.layouts.base import files_fingerprint
    from core.data.photos import photo_checks
    from core.evaluation import embedding_map, label_issues
    from core.review.health import health_report

    ds = load_dataset(small_abid)
    assert ds.files_fingerprint
    first = health_report(ds, label_issues=False)  # the photos checked, the findings saved by the files' version
    rows = ds.rows("all")
    map_key = embedding_map._map_digest(ds.key, rows, 0, ds.stamps, ds.files_fingerprint)
    issues_key = label_issues._cache_digest(ds, rows, 5, 0)
    assert map_key == embedding_map._digest(ds.key, rows, 0)  # the same keys as before: no saved result lost
    assert issues_key == label_issues._json_digest(ds, rows, 5, 0)

    def refused(*args, **kwargs):
        raise AssertionError("a page opening from its caches looked at each photo")

    # After a restart (the dataset loaded again, the files unchanged): two small tables read, two keys looked up
    reloaded = load_dataset(small_abid)
    assert reloaded.files_fingerprint == ds.files_fingerprint
    with monkeypatch.context() as patched:
        for module, name in ((photo_checks, "check_photos"), (embedding_map, "_digest"),
                             (label_issues, "_json_digest")):
            patched.setattr(module, name, refused)
        again = health_report(reloaded, label_issues=False)
        pd.testing.assert_frame_equal(again.duplicates, first.duplicates)
        pd.testing.assert_frame_equal(again.quality, first.quality)
        assert embedding_map._map_digest(ds.key, reloaded.rows("all"), 0, reloaded.stamps,
                                         reloaded.files_fingerprint) == map_key
        assert label_issues._cache_digest(reloaded, reloaded.rows("all"), 5, 0) == issues_key
    # A photo damaged on disk: another version of the files, so the photos are checked again and it is found
    damaged = Path(rows["path"].iloc[0])
    damaged.write_bytes(b"not a photo any more")
    changed = load_dataset(small_abid)
    assert changed.files_fingerprint not in (None, ds.files_fingerprint)
    report = health_report(changed, label_issues=False)
    assert damaged.name in set(report.quality.loc[report.quality["problem"] == "unreadable", "photo"])
    assert embedding_map._map_digest(ds.key, changed.rows("all"), 0, changed.stamps,
                                     changed.files_fingerprint) == embedding_map._digest(ds.key, changed.rows("all"), 0)
    # A photo the loading's walk did not stamp: the files' version is unknown, and each view looks at the files
    outside = changed.frame.copy()
    outside.loc[0, "path"] = "/elsewhere/photo.jpg"
    assert files_fingerprint(outside, "fingerprint", changed.stamps) is None
    assert files_fingerprint(changed.frame, "fingerprint", None) is None
