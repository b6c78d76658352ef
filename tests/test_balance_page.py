"""The Balance page through AppTest: fetch more from a local S3 server, unreachable servers, undersample + use it."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import config
from core.data.labels import versions
from core.data.layouts.registry import load_dataset
from core.data.layouts.saved_version import load_version
from tests.moto_s3 import closed_port_url, held_subset, shared_world

PAGE = str(Path(__file__).resolve().parents[1] / "app_pages" / "balance.py")
HELD = {1: 8, 2: 8, 3: 2, 4: 8, 5: 8}


@pytest.fixture
def world(tmp_path_factory):
    return shared_world(tmp_path_factory)


@pytest.fixture
def dataset_folder(world, tmp_path) -> Path:
    folder = held_subset(world, tmp_path / "data", HELD)
    config.save_settings(data_dir=str(folder))
    return folder


def open_page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=60).run()


def test_page_fetches_more_from_the_bucket_into_a_new_version(world, dataset_folder, tmp_path):
    config.save_settings(s3={"endpoint_url": world.url})
    at = open_page()
    assert not at.exception
    assert any("Give a candidate pool" in i.value for i in at.info)
    at.text_input(key="balance_lists").set_value(str(world.file_list(tmp_path / "file_list.json"))).run()
    assert not at.exception and not at.error
    assert len(at.get("plotly_chart")) == 3  # now, candidates per class, preview
    for cls in (1, 2, 4, 5):
        at.number_input(key=f"balance_more_{cls}").set_value(0)
    at.number_input(key="balance_more_3").set_value(6).run()
    assert at.metric[-1].value == "+6"
    at.text_input(key="balance_name_fetch").set_value("more-threes")
    at.button(key="balance_apply").click().run()
    assert not at.exception and not at.error
    assert "Saved version **more-threes**" in at.success[0].value

    base = load_dataset(dataset_folder)
    [version] = versions.list_versions(base)
    made = load_version(version.path)
    added = made.frame[~made.frame["name"].isin(base.frame["name"])]
    assert len(added) == 6 and set(added["count"]) == {3} and set(added["split"]) <= {"train", "valid"}
    test_before = base.frame[base.frame["split"] == "test"]["name"].tolist()
    assert made.frame[made.frame["split"] == "test"]["name"].tolist() == test_before


def test_page_explains_an_unreachable_s3_server_and_makes_nothing(world, dataset_folder, tmp_path):
    config.save_settings(s3={"endpoint_url": world.url})
    at = open_page()
    at.text_input(key="balance_lists").set_value(str(world.file_list(tmp_path / "file_list.json"))).run()
    at.text_input(key="balance_s3_endpoint").set_value("localhost:9000")
    at.button(key="balance_s3_save").click().run()
    assert any("must look like http://host:port" in e.value for e in at.error)
    assert config.load_settings()["s3"]["endpoint_url"] == world.url  # nothing saved
    down = closed_port_url()
    at.text_input(key="balance_s3_endpoint").set_value(down)
    at.button(key="balance_s3_save").click().run()
    assert config.load_settings()["s3"]["endpoint_url"] == down
    at.button(key="balance_s3_check").click().run()
    assert any("cannot reach the S3 server" in e.value for e in at.error)
    at.button(key="balance_apply").click().run()
    assert not at.exception
    assert any("no version was made" in e.value and "cannot reach the S3 server" in e.value for e in at.error)
    assert versions.list_versions(load_dataset(dataset_folder)) == []


def test_page_undersamples_and_switches_to_the_new_version(dataset_folder):
    at = open_page()
    at.radio(key="balance_strategy").set_value("undersample").run()
    assert not at.exception and not at.error
    smallest = load_dataset(dataset_folder).rows("train")["cls"].value_counts().min()
    assert at.number_input(key="balance_target").value == smallest
    at.text_input(key="balance_name_undersample").set_value("even").run()
    at.button(key="balance_apply").click().run()
    assert "Saved version **even**" in at.success[0].value
    at.selectbox(key="balance_use_version").set_value("even").run()
    at.button(key="balance_use").click().run()
    assert not at.exception
    assert config.load_settings()["data_dir"].endswith("even.parquet")
    assert any("This is version **even**" in i.value for i in at.info)


def test_page_fetches_from_a_local_pool_folder(world, dataset_folder):
    at = open_page()
    at.radio(key="balance_pool_kind").set_value("folder").run()
    at.text_input(key="balance_pool_folder").set_value(str(world.source)).run()
    assert not at.exception and not at.error
    more = {cls: at.number_input(key=f"balance_more_{cls}").value for cls in range(1, 6)}
    assert more[3] > 0 and more[1] == 0  # the suggestion fills the scarce class up to the largest one
    at.button(key="balance_apply").click().run()
    assert not at.exception and "Saved version" in at.success[0].value
    [version] = versions.list_versions(load_dataset(dataset_folder))
    made = load_version(version.path)
    base = load_dataset(dataset_folder)
    assert made.rows("train")["cls"].value_counts()[3] > base.rows("train")["cls"].value_counts()[3]
