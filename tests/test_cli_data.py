"""`python -m core index | split | demo`: summaries read from the folder, a re-split and what it leaves alone."""
from __future__ import annotations

import json

import pandas as pd

from core import config
from core.cli import main as cli_main
from core.data.labels import annotations
from core.data.curation import balancing
from core.data.classes import ClassRange
from core.data.layouts.registry import load_dataset
from core.data.labels.splits import make_split


def splits_of(dataset) -> dict:
    return dataset.frame.dropna(subset=["split"]).set_index("name")["split"].to_dict()


def test_index_prints_the_summary_of_the_folder_in_the_chosen_range(small_abid, capsys):
    labels = pd.read_csv(small_abid / "labels.csv")
    assert cli_main(["index", "--data", str(small_abid), "--classes", "1-3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    in_range = labels[labels["count"].between(1, 3)]
    assert summary["photos"] == summary["labelled"] == len(labels)
    assert summary["in_range"] == len(in_range) and summary["excluded"] == len(labels) - len(in_range)
    assert summary["classes"] == [1, 2, 3] and summary["problems"] == 0
    per_class = {c: sum(row.get(str(c), row.get(c, 0)) for row in summary["per_split"].values()) for c in (1, 2, 3)}
    assert per_class == in_range.groupby("count").size().to_dict()


def test_split_replaces_the_saved_split_but_not_versions_or_annotations(small_abid, capsys):
    before = load_dataset(small_abid)
    version = balancing.apply(before, "undersample", {"target": 6, "splits": ["train"]}, name="under6")
    version_splits = splits_of(load_dataset(version.path))
    corrected = before.frame[before.frame["count"] == 2]["name"].iloc[0]
    annotations.save_decision(before.key, corrected, "ann", 3, recorded_count=2)

    assert cli_main(["split", "--data", str(small_abid), "--seed", "7", "--test-per-class", "2",
                     "--valid-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    assert "test" in printed and "train" in printed and "valid" in printed

    after = load_dataset(small_abid)
    assert (after.split_info["seed"], after.split_info["test_per_class"], after.split_info["valid_fraction"]) == \
        (7, 2, 0.25)
    usable = after.frame[after.frame["cls"].notna() & after.frame["problem"].isna()]
    expected, _ = make_split(usable, 2, 0.25, 7)
    assert splits_of(after) == dict(zip(usable["name"], expected[usable.index]))
    assert splits_of(after) != splits_of(before)
    # the corrected label survives the re-split; the version keeps the split it was made with
    assert after.frame.set_index("name").loc[corrected, "count"] == 3
    assert splits_of(load_dataset(version.path)) == version_splits


def test_split_with_a_class_range_splits_only_those_classes(small_abid, capsys):
    assert cli_main(["split", "--data", str(small_abid), "--classes", "1-3", "--seed", "1",
                     "--test-per-class", "2"]) == 0
    capsys.readouterr()
    three = load_dataset(small_abid, ClassRange(1, 3))
    assert set(three.frame.dropna(subset=["split"])["count"]) == {1, 2, 3}
    assert three.labelled().groupby("cls")["split"].apply(lambda s: (s == "test").sum()).to_dict() == \
        {1: 2, 2: 2, 3: 2}


def test_demo_is_generated_once_into_the_home(capsys):
    from core.data.layouts.demo import DEMO_COUNTS

    assert cli_main(["demo"]) == 0
    folder = capsys.readouterr().out.strip()
    assert folder == str(config.demo_dir()) and (config.demo_dir() / ".complete").is_file()
    photos = sorted((config.demo_dir() / "bin-images").glob("*.jpg"))
    assert len(photos) == sum(DEMO_COUNTS.values())
    stamps = [p.stat().st_mtime_ns for p in photos]
    assert cli_main(["demo"]) == 0 and capsys.readouterr().out.strip() == folder
    assert [p.stat().st_mtime_ns for p in photos] == stamps  # the second call generates nothing
