"""Balancing on real photos: pools, preview = result, new versions, and a test split that never changes."""
from pathlib import Path

import pandas as pd
import pytest

from core.cli import main as cli_main
from core.data.curation import balancing, pools
from core.data.labels import versions
from core.data.layouts.registry import load_dataset
from core.data.layouts.saved_version import load_version
from core.data.remote.s3 import S3Error, S3Source, s3_settings
from tests.moto_s3 import held_subset, shared_world

HELD = {1: 10, 2: 10, 3: 3, 4: 10, 5: 10}  # class 3 is scarce, as in ../shared/abid


@pytest.fixture
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture
def imbalanced(world, tmp_path) -> Path:
    return held_subset(world, tmp_path / "imbalanced", HELD)


def bucket_pool(world, tmp_path, url=None, attempts=3) -> pools.Pool:
    source = S3Source(s3_settings(endpoint_url=url or world.url), attempts=attempts)
    return pools.list_pool(world.file_list(tmp_path / "file_list.json"), source)


def rows_of_test_split(dataset) -> pd.DataFrame:
    frame = versions.version_frame(dataset)
    rows = frame[frame["split"] == "test"][["name", "path", "count", "cls", "weight", "repeat"]]
    return rows.sort_values("name").reset_index(drop=True).astype(object).to_dict("records")


def table(distribution: pd.DataFrame, column="photos") -> dict:
    return distribution.set_index(["split", "cls"])[column].to_dict()


def test_fetch_more_from_the_bucket_adds_new_photos_to_train_and_valid(world, imbalanced, tmp_path):
    dataset = load_dataset(imbalanced)
    files_before = sorted(p.relative_to(imbalanced) for p in imbalanced.rglob("*"))
    pool = bucket_pool(world, tmp_path)
    available = pools.availability(pool, dataset)
    held_per_class = pd.Series(HELD)
    per_count = pd.Series(world.labels).value_counts()
    assert available.to_dict() == (per_count.reindex(held_per_class.index) - held_per_class).to_dict()

    plan = balancing.preview(dataset, "fetch", {"pool": pool, "more": {3: 8, 1: 2}, "seed": 1})
    version = balancing.apply(dataset, "fetch", {"pool": pool, "more": {3: 8, 1: 2}, "seed": 1}, name="more3")
    made = load_version(version.path)

    added = made.frame[~made.frame["name"].isin(dataset.frame["name"])]
    assert sorted(added["count"].tolist()) == [1, 1] + [3] * 8
    assert set(added["split"]) <= {"train", "valid"} and set(added["name"]) <= set(world.labels)
    for name, path in zip(added["name"], added["path"]):
        assert Path(path).read_bytes() == (world.source / "bin-images" / name).read_bytes()
        assert versions.photos_dir(dataset.key, "more3") in Path(path).parents
    assert table(balancing.current_distribution(made)) == table(plan.after)  # the preview was the truth
    assert rows_of_test_split(made) == rows_of_test_split(dataset)

    # The original is kept as it was, and picks never repeat photos the version already holds.
    assert sorted(p.relative_to(imbalanced) for p in imbalanced.rglob("*")) == files_before
    assert table(balancing.current_distribution(load_dataset(imbalanced))) == table(plan.before)
    assert [v.name for v in versions.list_versions(dataset)] == ["more3"]
    assert pools.availability(pool, made)[3] == available[3] - 8


def test_counting_lists_and_file_lists_name_the_same_pool(world, imbalanced, tmp_path):
    import json

    numbered = {n: c for n, c in world.labels.items() if Path(n).stem.isdigit() and len(Path(n).stem) == 5}
    counting = tmp_path / "counting_val.json"
    counting.write_text(json.dumps([[int(Path(n).stem) - 1, c] for n, c in numbered.items()]))
    source = S3Source(s3_settings(endpoint_url=world.url))
    from_counting = pools.list_pool(counting, source)
    assert dict(zip(from_counting.photos["name"], from_counting.photos["count"])) == numbered
    both = pools.list_pool([world.file_list(tmp_path / "file_list.json"), counting], source)
    assert sorted(both.photos["name"]) == sorted(world.labels)  # a photo in both lists counts once
    dataset = load_dataset(imbalanced)
    picked, short = pools.pick(both, dataset, {3: 100, 1: 2}, seed=3)
    new_threes = sum(c == 3 for c in world.labels.values()) - HELD[3]
    assert short == {3: 100 - new_threes}
    assert picked["count"].value_counts().to_dict() == {3: new_threes, 1: 2}
    assert not set(picked["name"]) & set(dataset.frame["name"])
    assert picked.equals(pools.pick(both, dataset, {3: 100, 1: 2}, seed=3)[0])  # seeded


@pytest.mark.parametrize("strategy", ["undersample", "oversample", "sampler", "loss_weights", "fetch"])
def test_no_strategy_touches_the_test_split(world, imbalanced, strategy):
    dataset = load_dataset(imbalanced)
    params = {"splits": ["train", "valid"]} if strategy in ("undersample", "oversample") else {}
    if strategy == "fetch":
        params = {"pool": pools.folder_pool(world.source), "more": {c: 5 for c in dataset.classes}}
    plan = balancing.preview(dataset, strategy, params)
    version = balancing.apply(dataset, strategy, params, name=f"v-{strategy}")
    made = load_version(version.path)

    assert rows_of_test_split(made) == rows_of_test_split(dataset)
    before, after = plan.before, balancing.current_distribution(made)
    assert table(after) == table(plan.after)
    assert table(after[after["split"] == "test"]) == table(before[before["split"] == "test"])
    train = after[after["split"] == "train"]
    if strategy == "undersample":
        assert set(train["photos"]) == {before[before["split"] == "train"]["photos"].min()}
    elif strategy == "oversample":
        assert set(train["effective"]) == {before[before["split"] == "train"]["photos"].max()}
        assert len(versions.training_rows(made)) == train["effective"].sum()
    elif strategy in ("sampler", "loss_weights"):
        assert train["effective"].nunique() == 1 and table(train) == table(before[before["split"] == "train"])
        assert versions.recommended_balance(made) == ("sampler" if strategy == "sampler" else "weights")
    else:
        assert (train["photos"].to_numpy() > before[before["split"] == "train"]["photos"].to_numpy()).any()


def test_the_test_split_cannot_be_chosen_and_bad_parameters_are_explained(imbalanced):
    dataset = load_dataset(imbalanced)
    with pytest.raises(balancing.BalanceError, match="test split is never balanced"):
        balancing.preview(dataset, "undersample", {"splits": ["train", "test"]})
    with pytest.raises(balancing.BalanceError, match="unknown strategy"):
        balancing.preview(dataset, "smote", {})
    with pytest.raises(balancing.BalanceError, match="candidate pool"):
        balancing.preview(dataset, "fetch", {"more": {3: 5}})
    balancing.apply(dataset, "sampler", {}, name="same")
    with pytest.raises(balancing.BalanceError, match="already exists"):
        balancing.apply(dataset, "loss_weights", {}, name="same")
    assert load_version(versions.list_versions(dataset)[0].path).split_info["weight_use"] == "sampler"


def test_server_stopped_while_fetching_makes_no_version_and_no_partial_files(world, imbalanced, relay, tmp_path):
    dataset = load_dataset(imbalanced)
    relay = relay(world.port, chunk=2048, delay_s=0.003)
    pool = bucket_pool(world, tmp_path, url=relay.url, attempts=2)

    def stop_after_two(fraction, text):
        if text.startswith("Downloaded 2 "):
            relay.stop()

    with pytest.raises(S3Error, match="Download failed"):
        balancing.apply(dataset, "fetch", {"pool": pool, "more": {1: 6, 3: 10, 5: 6}}, name="broken",
                        on_progress=stop_after_two)
    folder = versions.versions_dir(dataset.key)
    assert not folder.exists() or list(folder.iterdir()) == []
    assert versions.list_versions(dataset) == []
    partial = [p for p in pool.source.cache_dir.rglob("*") if p.name.endswith(".tmp")]
    assert partial == []


def test_versions_chain_and_load_as_a_data_path(world, imbalanced):
    dataset = load_dataset(imbalanced)
    first = balancing.apply(dataset, "oversample", {"target": 12}, name="over12")
    over = load_dataset(first.path)  # a manifest is usable wherever a dataset folder is (e.g. train --data)
    assert over.layout == "version" and over.split_info["version"] == "over12"
    second = balancing.apply(over, "loss_weights", {}, name="over12-weighted")
    weighted = load_version(second.path)
    assert second.info["parent"] == "over12" and weighted.key == dataset.key
    assert [v.name for v in versions.list_versions(weighted)] == ["over12", "over12-weighted"]
    assert len(versions.training_rows(weighted)) == 12 * len(dataset.classes)
    assert set(versions.class_weights(weighted).values()) == {1.0}  # already balanced by repeats


def test_cli_balance_preview_apply_and_list(imbalanced, capsys):
    assert cli_main(["balance", "--data", str(imbalanced), "--strategy", "undersample"]) == 0
    out = capsys.readouterr().out
    assert "→" in out and "preview only" in out
    assert versions.list_versions(load_dataset(imbalanced)) == []
    assert cli_main(["balance", "--data", str(imbalanced), "--strategy", "undersample", "--apply",
                     "--name", "under", "--quiet"]) == 0
    assert "version under:" in capsys.readouterr().out
    assert cli_main(["balance", "--data", str(imbalanced), "--list-versions"]) == 0
    assert capsys.readouterr().out.startswith("under\t")
    assert cli_main(["balance", "--data", str(imbalanced), "--strategy", "undersample", "--splits", "test"]) == 2
    assert "never balanced" in capsys.readouterr().err
    assert cli_main(["balance", "--data", str(imbalanced), "--strategy", "fetch", "--pool", str(imbalanced),
                     "--more", "three=5"]) == 2
