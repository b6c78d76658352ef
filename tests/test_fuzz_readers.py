"""Generated label files, dataset indexes, shard sets, versions and settings: each gives a dataset or one
BinsightError naming the file, never another exception and never a half-written file (hypothesis, fixed seed)."""
from __future__ import annotations

import csv
import io
import itertools
import json
import os
import tarfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from core import config
from core.data.labels import abid
from core.data.layouts.registry import load_dataset
from core.errors import BinsightError
from tests.test_fuzz_service import images

# The suite's budget; bench/fuzz_readers.py multiplies it (BINSIGHT_FUZZ_SCALE) for a longer hunt.
SCALE = max(1, int(os.environ.get("BINSIGHT_FUZZ_SCALE", "1")))
FUZZ = settings(max_examples=25 * SCALE, derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
_numbered = itertools.count()


def tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (200, 120, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG = tiny_jpeg()
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
# counts as people and other systems write them: fine, negative, huge, fractional, words, blank
counts = (st.integers(0, 9) | st.integers(-5, 2**70) | st.floats() | st.sampled_from(["3", " 4 ", "", "three", "1e3", "٣"])
          | st.text(max_size=6))


def folder(tmp_path: Path, files: dict[str, bytes | str]) -> Path:
    """A fresh folder of these files (one per example: the index cache is keyed by the folder)."""
    root = tmp_path / f"case{next(_numbered)}"
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8", "surrogatepass"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def dataset_or_error(load, names: str):
    """load()'s dataset, or the BinsightError it raised, which must name `names`; any other exception fails."""
    try:
        return load()
    except BinsightError as exc:
        assert names in str(exc), f"the message does not name {names}: {exc}"
        return exc
    finally:
        no_half_written_files()


def no_half_written_files() -> None:
    """Nothing staged is left behind under BINSIGHT_HOME, and every index it cached reads back."""
    home = config.home()
    assert not [p for p in home.rglob("*.tmp")], "a temporary file was left behind"
    for cached in (home / "index").glob("*.parquet"):
        pq.read_table(cached)


def problems_of(result) -> dict:
    assert not isinstance(result, BinsightError), result
    return dict(result.problems)


# -- metadata JSON -----------------------------------------------------------------------------------------

metadata_documents = st.one_of(
    json_values.map(json.dumps),
    st.fixed_dictionaries({"EXPECTED_QUANTITY": counts | json_values},
                          optional={"BIN_FCSKU_DATA": json_values | st.dictionaries(st.text(max_size=6), st.fixed_dictionaries(
                              {}, optional={"name": json_values, "normalizedName": json_values, "asin": json_values,
                                            "quantity": json_values,
                                            "length": st.fixed_dictionaries({"value": json_values, "unit": json_values})}),
                              max_size=3)}).map(json.dumps),
    st.binary(max_size=64),
    st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth),
)


@FUZZ
@given(document=metadata_documents)
def test_any_metadata_json_gives_a_count_or_a_problem_naming_the_file(tmp_path, document):
    source = folder(tmp_path, {"bin-images/523.jpg": JPEG, "metadata/523.json": document})
    dataset = dataset_or_error(lambda: load_dataset(source), "523.json")
    row = dataset.frame.set_index("name").loc["523.jpg"]
    problem = problems_of(dataset).get("523.jpg")
    try:
        expected = abid.parse_count(json.loads(document)["EXPECTED_QUANTITY"])
    except Exception:  # noqa: BLE001 — no usable count in this document: the photo is unlabelled or a problem
        expected = None
    if problem is not None:
        assert problem.startswith("metadata/523.json: ")
    elif expected is not None:
        assert row["count"] == expected and row["label_source"] == "metadata"
    else:
        assert pd.isna(row["count"])


# -- labels.csv --------------------------------------------------------------------------------------------

csv_rows = st.lists(st.tuples(st.text(max_size=12), counts.map(str)), max_size=6)


def write_csv(header: list[str], rows: list[tuple[str, str]], bom: bool) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows(rows)
    return ("\ufeff" if bom else "") + out.getvalue()


labels_files = st.one_of(
    st.builds(write_csv, st.sampled_from([["image", "count"], ["count", "image"], ["image"], ["name", "count"],
                                          ["image", "count", "note"]]), csv_rows, st.booleans()),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.sampled_from(["image,count\n" + "x" * 140_000 + ",3\n", 'image,count\n"523.jpg,3\n', "image,count\n523.jpg,3\0\n"]),
)


@FUZZ
@given(labels=labels_files)
def test_any_labels_csv_gives_labels_or_one_error_naming_it(tmp_path, labels):
    source = folder(tmp_path, {"bin-images/523.jpg": JPEG, "labels.csv": labels})
    dataset = dataset_or_error(lambda: load_dataset(source), "labels.csv")
    if isinstance(dataset, BinsightError):
        return
    for name, problem in problems_of(dataset).items():
        assert "labels.csv" in problem or name == "523.jpg", (name, problem)
    counted = dataset.frame[dataset.frame["count"].notna()]
    assert ((counted["count"] >= 0) & (counted["count"] <= abid.MAX_COUNT)).all()


# -- file_list.json and counting lists ----------------------------------------------------------------------

file_lists = st.one_of(
    json_values,
    st.dictionaries(counts.map(str), json_values | st.lists(st.text(max_size=20), max_size=4), max_size=4),
    st.dictionaries(st.integers(0, 7).map(str), st.lists(st.from_regex(r"metadata/[0-9]{1,5}\.json", fullmatch=True),
                                                         max_size=4), max_size=4),
)


@FUZZ
@given(listing=file_lists, as_folder=st.booleans())
def test_any_file_list_gives_labels_or_one_error_naming_it(tmp_path, listing, as_folder):
    source = folder(tmp_path, {"file_list.json": json.dumps(listing), "bin-images/523.jpg": JPEG})
    given_path = source if as_folder else source / "file_list.json"
    dataset = dataset_or_error(lambda: load_dataset(given_path), "file_list.json")
    if not isinstance(dataset, BinsightError) and isinstance(listing, dict):
        assert len(dataset.frame[dataset.frame["count"].notna()]) <= sum(len(v) for v in listing.values())


counting_lists = st.one_of(
    st.lists(st.lists(counts | json_values, min_size=0, max_size=3), max_size=6),
    st.lists(st.tuples(st.integers(0, 99_999), st.integers(0, 9)).map(list), max_size=6),
    st.binary(max_size=40).map(lambda junk: b"[" + junk),
)


@FUZZ
@given(pairs=counting_lists)
def test_any_counting_list_gives_photos_or_one_error_naming_it(tmp_path, pairs):
    data = pairs if isinstance(pairs, bytes) else json.dumps(pairs)
    source = folder(tmp_path, {"lists/counting_train.json": data, "bin-images/00001.jpg": JPEG})
    dataset = dataset_or_error(lambda: load_dataset(source / "lists" / "counting_train.json"), "counting_train.json")
    if not isinstance(dataset, BinsightError):
        assert len(dataset.frame) == len(pairs) and dataset.frame["count"].notna().all()
        assert dataset.frame["name"].str.fullmatch(r"[0-9]{5,}\.jpg").all()


# -- ImageFolder names ----------------------------------------------------------------------------------------

file_names = st.text(st.characters(blacklist_characters="/\0", blacklist_categories=["Cs"]), min_size=1,
                     max_size=20).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)
raw_names = st.binary(min_size=1, max_size=12).filter(lambda b: b"/" not in b and b"\0" not in b
                                                      and b not in (b".", b".."))


@FUZZ
@given(classes=st.lists(st.one_of(file_names, st.integers(0, 12).map(str), raw_names), min_size=1, max_size=4,
                        unique_by=lambda n: os.fsencode(n) if isinstance(n, str) else n),
       photo=st.one_of(file_names.map(lambda n: n + ".jpg"), raw_names.map(lambda b: b + b".jpg")),
       split=st.sampled_from([None, "train", "Validation", "test_data", "other"]))
def test_any_imagefolder_names_give_counts_from_digit_folders_only(tmp_path, classes, photo, split):
    root = folder(tmp_path, {})
    base = root / split if split else root
    for name in classes:
        where = os.path.join(os.fsencode(base), os.fsencode(name))
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, os.fsencode(photo)), "wb") as handle:
            handle.write(JPEG)
    dataset = dataset_or_error(lambda: load_dataset(root), root.name)
    named = [os.fsdecode(n) for n in classes]
    digit_folders = [n for n in named if n.isascii() and n.isdigit() and len(n) <= 6]
    if isinstance(dataset, BinsightError):
        assert not digit_folders or split == "other", dataset
        return
    assert sorted(set(dataset.frame["count"].dropna().astype(int))) == sorted({int(n) for n in digit_folders})


# -- shards.json and tar shards --------------------------------------------------------------------------------

def good_index(photos: list[list]) -> dict:
    from core.data.remote.shard_store import INDEX_FORMAT

    return {"format": INDEX_FORMAT, "complete": True, "fingerprint": "f", "seed": 0, "shard_bytes": 1000,
            "classes": [1, 2, 3, 4, 5], "class_range": {"lo": 1, "hi": 5, "top_bucket": False},
            "shards": [{"name": "train-000000.tar", "split": "train", "samples": len(photos), "bytes": 1,
                        "classes": {}, "photos": photos}], "skipped": []}


def mangled_index(index: dict, path: list, value) -> dict:
    """The index with the value at `path` (keys and list positions, as far as they reach) replaced."""
    index = json.loads(json.dumps(index))
    holder = index
    for step in path[:-1]:
        if isinstance(holder, dict) and step in holder:
            holder = holder[step]
        elif isinstance(holder, list) and isinstance(step, int) and step < len(holder):
            holder = holder[step]
        else:
            break
    last = path[-1]
    if isinstance(holder, dict):
        holder[last if isinstance(last, str) else "shards"] = value
    elif isinstance(holder, list) and holder:
        holder[last % len(holder) if isinstance(last, int) else 0] = value
    return index


index_paths = st.lists(st.sampled_from(["shards", 0, "photos", "split", "name", "samples", 1, 2, "skipped",
                                        "class_range", "seed", "complete", "lo"]), min_size=1, max_size=4)
shard_indexes = st.one_of(
    json_values.map(json.dumps),
    st.builds(lambda path, value: json.dumps(mangled_index(good_index([["a", "a.jpg", 2], ["b", "b.jpg", 3]]),
                                                            path, value)), index_paths, json_values),
    st.binary(max_size=60),
)


@FUZZ
@given(document=shard_indexes)
def test_any_shards_json_gives_a_shard_dataset_or_one_error_naming_it(tmp_path, document):
    source = folder(tmp_path, {"shards.json": document})
    dataset = dataset_or_error(lambda: load_dataset(source), "shards.json")
    if not isinstance(dataset, BinsightError):
        assert dataset.layout == "shards"
        assert dataset.frame["name"].map(lambda n: isinstance(n, str)).all()


def shard_tar(samples: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for key, image in samples:
            for ext, data in (("jpg", image), ("cls", b"2")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


GOOD_SHARD = shard_tar([("a", JPEG), ("b", JPEG)])


@FUZZ
@given(cut=st.integers(0, len(GOOD_SHARD)), flips=st.lists(st.tuples(st.integers(0, len(GOOD_SHARD) - 1),
                                                                     st.integers(1, 255)), max_size=4),
       junk=st.binary(max_size=80))
def test_a_damaged_tar_shard_gives_its_photos_or_one_error_naming_it(tmp_path, cut, flips, junk):
    from core.data.remote.shard_store import ShardError, open_store
    from core.data.remote.streaming import shard_samples

    data = bytearray(GOOD_SHARD)
    for where, mask in flips:
        data[where] ^= mask
    data = bytes(data[:cut]) + junk
    index = good_index([["a", "a.jpg", 2], ["b", "b.jpg", 2]])
    source = folder(tmp_path, {"shards.json": json.dumps(index), "train-000000.tar": data})
    store = open_store(source)
    try:
        read = [sample["name"] for sample in shard_samples(store, index["shards"][0])]
    except ShardError as exc:
        assert "train-000000.tar" in str(exc)
    else:
        assert read == ["a.jpg", "b.jpg"]


# -- dataset versions ----------------------------------------------------------------------------------------

def version_bytes(frame: pd.DataFrame, info) -> bytes:
    from core.data.labels.versions import INFO_KEY

    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    if info is not None:
        metadata[INFO_KEY] = info if isinstance(info, bytes) else json.dumps(info).encode()
    buffer = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(metadata), buffer)
    return buffer.getvalue()


GOOD_INFO = {"name": "v1", "created": "2026-01-01T00:00:00+00:00", "strategy": "none", "params": {},
             "base_key": "abc123", "class_range": {"lo": 1, "hi": 5, "top_bucket": False}, "split_info": {},
             "weight_use": None, "dropped": [], "photos": {}}
GOOD_FRAME = pd.DataFrame({"name": ["a.jpg", "b.jpg"], "path": [None, None], "count": pd.array([2, 7], dtype="Int64"),
                           "problem": [None, None], "split": ["train", "test"], "weight": [1.0, 1.0], "repeat": [1, 1]})
version_infos = st.one_of(st.none(), json_values, st.binary(max_size=20),
                          st.builds(lambda key, value: {**GOOD_INFO, key: value},
                                    st.sampled_from(sorted(GOOD_INFO)), json_values),
                          st.sampled_from(sorted(GOOD_INFO)).map(lambda key: {k: v for k, v in GOOD_INFO.items()
                                                                              if k != key}))
version_frames = st.one_of(st.just(GOOD_FRAME), st.sampled_from(list(GOOD_FRAME.columns)).map(
    lambda column: GOOD_FRAME.drop(columns=[column])),
    st.builds(lambda column, values: GOOD_FRAME.assign(**{column: values}), st.sampled_from(["count", "split", "path"]),
              st.sampled_from([["x", "y"], [1.5, None], [True, False], [-3, 10**12]])))


@FUZZ
@given(info=version_infos, frame=version_frames, cut=st.none() | st.integers(0, 2000))
def test_any_version_parquet_gives_a_dataset_or_one_error_naming_it(tmp_path, info, frame, cut):
    data = version_bytes(frame, info)
    source = folder(tmp_path, {"even.parquet": data if cut is None else data[:cut]})
    dataset = dataset_or_error(lambda: load_dataset(source / "even.parquet"), "even.parquet")
    if not isinstance(dataset, BinsightError):
        assert dataset.layout == "version" and len(dataset.frame) == 2


# -- settings ----------------------------------------------------------------------------------------------

settings_documents = st.one_of(
    json_values.map(json.dumps),
    st.dictionaries(st.sampled_from(sorted(config.SETTING_CHECKS)), json_values, max_size=4).map(json.dumps),
    st.builds(lambda lo, hi, top: json.dumps({"class_range": {"lo": lo, "hi": hi, "top_bucket": top}}),
              json_values | st.integers(-2, 8), json_values | st.integers(-2, 8), json_values),
    st.binary(max_size=40),
)


@FUZZ
@given(document=settings_documents)
def test_any_settings_json_leaves_the_app_usable_and_is_never_lost(tmp_path, document, monkeypatch):
    from core.data.remote.s3 import s3_settings
    from core.evaluation.calibration import chosen_threshold
    from core.jobs.runs import current_run
    from core.storage import cache_caps

    home = folder(tmp_path, {"settings.json": document})
    monkeypatch.setenv("BINSIGHT_HOME", str(home))
    monkeypatch.delenv("BINSIGHT_DATA", raising=False)
    source = folder(tmp_path, {"bin-images/523.jpg": JPEG, "labels.csv": "image,count\n523.jpg,2\n"})
    loaded = config.load_settings()
    assert isinstance(loaded, dict)
    monkeypatch.setenv("BINSIGHT_DATA", str(source))
    for use in (lambda: load_dataset(), s3_settings, cache_caps, current_run, config.data_dir,
                lambda: chosen_threshold({}, "run-1")):
        dataset_or_error(use, "settings")
    config.save_settings(low_confidence_thresholds={"run-1": 0.5})
    assert config.load_settings()["low_confidence_thresholds"] == {"run-1": 0.5}
    assert chosen_threshold({}, "run-1") == 0.5
    try:
        original = json.loads(document)
    except (ValueError, RecursionError):
        original = None
    if not isinstance(original, dict):  # an unusable file is kept aside, not overwritten
        assert (home / "settings.json.unreadable").read_bytes() == (
            document if isinstance(document, bytes) else document.encode())
    else:  # every other setting, usable or not, is still in the file
        rewritten = json.loads((home / "settings.json").read_text())
        assert json.dumps({k: v for k, v in rewritten.items() if k != "low_confidence_thresholds"}, sort_keys=True) \
            == json.dumps({k: v for k, v in original.items() if k != "low_confidence_thresholds"}, sort_keys=True)


# -- photo bytes ---------------------------------------------------------------------------------------------

@settings(FUZZ, max_examples=150 * SCALE)
@given(data=st.one_of(images, st.binary(max_size=400)))
def test_any_bytes_open_as_an_upright_rgb_photo_or_one_image_error_naming_it(data):
    from core.data.photos.images import MAX_PIXELS, MAX_SIDE, ImageError, load_image

    try:
        image = load_image(data, "bin 523.jpg")
    except ImageError as exc:
        assert str(exc).startswith("bin 523.jpg: ")
    else:  # what is opened stays within what a bin photo could be: no strip or bomb gets decoded
        assert image.mode == "RGB" and 0 < image.width * image.height <= MAX_PIXELS
        assert max(image.size) <= MAX_SIDE
