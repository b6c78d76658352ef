"""Spot-check page through AppTest on real photos: confirm, correct, unclear, next/previous, identity, vanished."""
import io
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core.data.labels import annotations
from core.data.layouts.registry import load_dataset
from core.jobs.runs import register_run
from tests.conftest import make_abid_subset

PAGE = str(Path(__file__).resolve().parents[1] / "app_pages" / "spot_check.py")


@pytest.fixture
def spot_source(tmp_path, monkeypatch) -> Path:
    source = make_abid_subset(tmp_path / "spot", per_class=3)
    monkeypatch.setenv("BINSIGHT_DATA", str(source))
    return source


def open_page(user: dict | None = None, roles: dict | None = None) -> AppTest:
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.user = user if user is not None else {}
    if roles:
        at.secrets["roles"] = roles
    return at.run()


def sign_in(at: AppTest, name: str = "alice") -> AppTest:
    at.text_input(key="annotator_input").input(name)
    return at.button[0].click().run()


def shown_bin(at: AppTest) -> str:
    return at.session_state["spot_queue"][at.session_state["spot_pos"]]


def counts_by_name(source: Path) -> dict:
    frame = load_dataset(source).frame
    return dict(zip(frame["name"], frame["count"]))


def test_confirm_correct_and_unclear_are_saved_and_move_on(spot_source):
    at = open_page()
    assert not at.exception and at.text_input(key="annotator_input")  # the name is asked first
    at = sign_in(at)
    assert not at.exception and at.get("plotly_chart")  # the photo, zoomable
    recorded = counts_by_name(spot_source)
    key = load_dataset(spot_source).key

    first = shown_bin(at)
    at.button(key="decide_confirm").click().run()
    assert shown_bin(at) != first and "confirmed" in at.success[0].value

    second = shown_bin(at)
    other = (int(recorded[second]) % 5) + 1
    at.text_input(key=f"spot_note_{second}").input("two items hidden under the flap")
    at.button(key=f"decide_{other}").click().run()

    third = shown_bin(at)
    at.button(key="decide_unclear").click().run()
    assert not at.exception

    trail = annotations.history(key)
    assert trail[["photo", "annotator", "status"]].values.tolist() == [
        [first, "alice", "confirmed"], [second, "alice", "corrected"], [third, "alice", "unclear"]]
    assert trail["old_count"].tolist() == [recorded[first], recorded[second], recorded[third]]
    assert trail["new_count"].tolist()[:2] == [recorded[first], other] and trail["new_count"].isna().tolist()[2]
    assert trail["note"].tolist()[1] == "two items hidden under the flap"
    after = counts_by_name(spot_source)
    assert after[second] == other and pd.isna(after[third])
    metric = next(m for m in at.metric if m.label == "Bins checked")
    assert metric.value == f"3 of {len(recorded)}"


def test_next_and_previous_walk_the_queue_without_saving(spot_source):
    at = sign_in(open_page())
    queue = at.session_state["spot_queue"]
    assert len(queue) == len(counts_by_name(spot_source)) and at.button(key="spot_prev").disabled
    at.button(key="spot_next").click().run()
    at.button(key="spot_next").click().run()
    assert shown_bin(at) == queue[2] and f"#### {queue[2]}" in [m.value for m in at.markdown]
    at.button(key="spot_prev").click().run()
    assert shown_bin(at) == queue[1] and "Bin 2 of" in at.get("progress")[0].proto.text
    assert annotations.history(load_dataset(spot_source).key).empty


def test_signed_in_user_is_the_annotator_and_login_is_offered_when_configured(spot_source):
    at = open_page({"is_logged_in": True, "email": "ops@example.com", "name": "Ops"}, {"annotator": ["*@example.com"]})
    assert "annotator_input" not in [t.key for t in at.text_input]
    photo = shown_bin(at)
    at.button(key="decide_confirm").click().run()
    trail = annotations.history(load_dataset(spot_source).key)
    assert trail[["photo", "annotator"]].values.tolist() == [[photo, "ops@example.com"]]

    logged_out = open_page({"is_logged_in": False})
    assert [b.label for b in logged_out.button] == ["Log in"] and "spot_queue" not in logged_out.session_state


def test_a_vanished_photo_gets_a_clear_message_and_nothing_is_saved(spot_source):
    at = sign_in(open_page())
    photo = shown_bin(at)
    (spot_source / "bin-images" / photo).unlink()
    at.button(key="decide_confirm").click().run()
    assert not at.exception
    assert any("vanished" in e.value and photo in e.value for e in at.error)
    assert shown_bin(at) == photo  # stays put: the message explains, Next goes on
    assert annotations.history(load_dataset(spot_source).key).empty
    at.run()  # shown again later: the page says so instead of the photo
    assert any("vanished" in e.value for e in at.error) and "decide_confirm" not in [b.key for b in at.button]


def test_model_queues_say_there_is_no_model_yet(spot_source):
    at = sign_in(open_page())
    at.selectbox(key="spot_kind").set_value("low_confidence").run()
    assert not at.exception
    assert any("No model yet" in i.value for i in at.info)


def test_with_a_current_model_its_prediction_shows_and_the_confidence_queue_is_ordered(spot_source, tmp_path):
    import torch

    from core.jobs.runs import current_model_path
    from core.models.networks import backbone_spec, build_model, save_model
    from core.models.preprocess import preprocessing
    from core.review.queue import candidates, model_scores

    spec = backbone_spec("simple_cnn")
    meta = {"backbone": "simple_cnn", "head": "linear", "classes": [1, 2, 3, 4, 5],
            **preprocessing({"mean": spec.mean, "std": spec.std}, 64)}
    torch.manual_seed(0)
    save_model(tmp_path / "run" / "model.pt", build_model(meta, pretrained=False), meta)
    register_run(tmp_path / "run")  # the first run becomes the current model

    at = sign_in(open_page())
    assert not at.exception and any("Model predicts" in m.value for m in at.markdown)
    at.button(key="spot_next").click().run()
    at.button(key="spot_next").click().run()
    assert at.session_state["spot_pos"] == 2  # scoring each bin shown does not reshuffle the queue
    at.selectbox(key="spot_kind").set_value("low_confidence").run()
    at.button(key="spot_score").click().run()
    assert not at.exception
    frame = load_dataset(spot_source).frame
    in_classes = frame[frame["count"].between(1, 5)]
    scores = model_scores(current_model_path(), candidates(in_classes)).set_index("name")
    assert len(scores) == len(in_classes) and scores["error"].isna().all()
    queue = at.session_state["spot_queue"]
    assert sorted(queue) == sorted(scores.index)  # bins outside the model's classes 1–5 are not in its queues
    assert scores.loc[queue, "confidence"].is_monotonic_increasing


def test_queue_filters_and_the_exported_csv_are_exactly_the_decisions(spot_source, served_files):
    import pandas as pd

    from core.data.layouts.registry import load_dataset

    frame = load_dataset(spot_source).frame
    at = sign_in(open_page())
    at.multiselect(key="spot_counts").set_value([3]).run()
    queue = at.session_state["spot_queue"]
    assert sorted(queue) == sorted(frame[frame["count"] == 3]["name"])
    at.multiselect(key="spot_splits").set_value(["train"]).run()
    queue = at.session_state["spot_queue"]
    assert sorted(queue) == sorted(frame[(frame["count"] == 3) & (frame["split"] == "train")]["name"])
    at.multiselect(key="spot_counts").set_value([]).run()
    at.multiselect(key="spot_splits").set_value([]).run()
    at.button(key="decide_confirm").click().run()
    at.button(key="decide_2").click().run()
    export = next(b for b in at.get("download_button") if b.proto.id and "export_csv" in b.proto.id)
    served = pd.read_csv(io.BytesIO(served_files(export)))
    key = load_dataset(spot_source).key
    assert served_files(export) == annotations.export_csv(key).encode()
    assert len(served) == 2 and list(served["annotator"]) == ["alice", "alice"]



def test_the_queue_survives_another_page_and_a_reload(spot_source):
    at = AppTest.from_file(str(Path(PAGE).parents[1] / "app.py"), default_timeout=120)
    at.user = {}
    at.query_params["queue"] = "random"  # a reload: a new session with the queue in the address
    at = sign_in(at.switch_page("app_pages/spot_check.py").run())
    assert not at.exception and at.selectbox(key="spot_kind").value == "random"
    at.multiselect(key="spot_splits").set_value(["train"]).run()
    at.button(key="spot_next").click().run()
    queue, position = at.session_state["spot_queue"], at.session_state["spot_pos"]
    assert position == 1
    at.switch_page("app_pages/overview.py").run()  # Streamlit forgets the queue's widgets while another page shows
    at.switch_page("app_pages/spot_check.py").run()
    assert not at.exception and at.selectbox(key="spot_kind").value == "random"
    assert at.multiselect(key="spot_splits").value == ["train"]
    assert at.session_state["spot_queue"] == queue and at.session_state["spot_pos"] == position
