"""Roles in the app through AppTest with a signed-in user per role (st.user via AppTest.user, the [roles] table via
AppTest.secrets): each page hides or disables what a role may not do and says why; paths typed in the browser
outside the data roots are refused; jobs and versions record who made them."""
import os
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import config
from core.access import LOCAL_USER
from core.data.labels import annotations, versions
from core.data.layouts.registry import load_dataset
from core.jobs import queue as jobs
from core.jobs import worker

ROOT = Path(__file__).resolve().parents[1]
ROLES = {"trainer": ["lead@example.com"], "annotator": ["*@ops.example.com"]}
TRAINER, ANNOTATOR, VIEWER = "lead@example.com", "ann@ops.example.com", "guest@example.com"


@pytest.fixture(autouse=True)
def no_workers(monkeypatch):
    """Jobs stay queued: the pages ask for workers, none is spawned."""
    monkeypatch.setattr(worker, "ensure_workers", lambda *a, **k: [])


@pytest.fixture
def dataset(small_abid, monkeypatch) -> Path:
    monkeypatch.setenv("BINSIGHT_DATA", str(small_abid))
    return small_abid


def open_page(page: str, email: str | None = None, signed_out: bool = False) -> AppTest:
    """Run app.py or app_pages/<page>.py as `email` (signed in with the ROLES table), signed out, or with no sign-in."""
    at = AppTest.from_file(str(ROOT / (page if page.endswith(".py") else f"app_pages/{page}.py")), default_timeout=120)
    if signed_out:
        at.user = {"is_logged_in": False}
    elif email:
        at.user = {"is_logged_in": True, "email": email, "name": email.split("@")[0]}
    else:
        at.user = {}
    at.secrets["roles"] = ROLES
    return at.run()


def texts(at: AppTest, *kinds) -> str:
    return "\n".join(str(e.value) for kind in kinds or ("markdown", "caption", "info", "error") for e in at.get(kind))


def refused_with_reason(widget, role_needed: str) -> bool:
    return widget.disabled and f"{role_needed} may" in (widget.help or "")


# ------------------------------------------------------------------------------------------- sign-in, sidebar

def test_without_sign_in_one_local_user_may_do_everything_and_the_sidebar_says_so(dataset):
    at = open_page("app.py")
    assert not at.exception
    assert "Single local user: sign-in is not configured" in texts(at.sidebar, "caption")
    assert not at.sidebar.slider(key="sidebar_range").disabled


def test_a_signed_out_visitor_is_asked_to_log_in_and_sees_nothing_else(dataset):
    at = open_page("app.py", signed_out=True)
    assert not at.exception
    assert [b.label for b in at.button] == ["Log in"] and "Log in to use Binsight" in at.info[0].value
    assert not at.sidebar.text_input and not at.dataframe


def test_the_sidebar_shows_who_and_the_role_and_only_a_trainer_may_change_the_dataset(small_abid):
    config.save_settings(data_dir=str(small_abid))
    viewer = open_page("app.py", VIEWER)
    assert not viewer.exception
    assert f"**{VIEWER}** · role **viewer**" in texts(viewer.sidebar, "caption")
    for widget in (viewer.sidebar.text_input(key="sidebar_data_path"), viewer.sidebar.button(key="sidebar_apply"),
                   viewer.sidebar.slider(key="sidebar_range"), viewer.sidebar.checkbox(key="sidebar_bucket")):
        assert refused_with_reason(widget, "trainer")
    trainer = open_page("app.py", TRAINER)
    assert f"**{TRAINER}** · role **trainer**" in texts(trainer.sidebar, "caption")
    assert not trainer.sidebar.text_input(key="sidebar_data_path").disabled
    assert not trainer.sidebar.slider(key="sidebar_range").disabled


def test_viewers_do_not_get_the_spot_check_page_in_the_navigation(dataset):
    viewer = open_page("app.py", VIEWER)
    with pytest.raises(ValueError):  # AppTest only switches to pages that st.navigation offers
        viewer.switch_page("app_pages/spot_check.py")
    annotator = open_page("app.py", ANNOTATOR)
    annotator.switch_page("app_pages/spot_check.py").run()
    assert not annotator.exception and "Checking as" in texts(annotator, "caption")


# ------------------------------------------------------------------------------------------- pages and actions

def test_train_page_viewer_sees_every_trainer_control_disabled_with_the_reason(dataset):
    queued = jobs.submit("train", {"data": str(dataset)}, user=TRAINER)
    at = open_page("train", VIEWER)
    assert not at.exception
    assert refused_with_reason(at.button(key="train_launch"), "trainer")
    assert refused_with_reason(at.button(key=f"train_cancel_{queued.id}"), "trainer")
    assert refused_with_reason(at.button(key="hpo_launch"), "trainer")
    assert f"by {TRAINER}" in texts(at, "markdown")  # the job card says who launched it
    annotator = open_page("train", ANNOTATOR)
    assert refused_with_reason(annotator.button(key="train_launch"), "trainer")


def test_a_job_launched_from_the_train_page_records_the_signed_in_trainer(dataset):
    at = open_page("train", TRAINER)
    assert not at.button(key="train_launch").disabled
    at.button(key="train_launch").click().run()
    assert not at.exception
    [job] = jobs.list_jobs()
    assert job.user == TRAINER and job.kind == "train"
    at.button(key=f"train_cancel_{job.id}").click().run()
    assert jobs.get(job.id).status == "cancelled"


def test_without_sign_in_the_job_records_the_local_user(dataset):
    at = open_page("train")
    at.button(key="train_launch").click().run()
    assert [job.user for job in jobs.list_jobs()] == [LOCAL_USER]


def test_predict_quick_training_is_for_trainers_and_records_them(dataset):
    viewer = open_page("predict", VIEWER)
    assert refused_with_reason(viewer.button(key="quick_train"), "trainer")
    trainer = open_page("predict", TRAINER)
    trainer.button(key="quick_train").click().run()
    assert [job.user for job in jobs.list_jobs(kind="train")] == [TRAINER]


def test_balance_apply_and_pool_folder_are_for_trainers_and_a_version_records_who_made_it(dataset):
    viewer = open_page("balance", VIEWER)
    assert not viewer.exception
    viewer.radio(key="balance_strategy").set_value("fetch").run()
    viewer.radio(key="balance_pool_kind").set_value("folder").run()
    assert refused_with_reason(viewer.text_input(key="balance_pool_folder"), "trainer")
    viewer.radio(key="balance_strategy").set_value("undersample").run()
    assert refused_with_reason(viewer.button(key="balance_apply"), "trainer")

    trainer = open_page("balance", TRAINER)
    trainer.radio(key="balance_strategy").set_value("undersample").run()
    trainer.text_input(key="balance_name_undersample").set_value("even").run()
    trainer.button(key="balance_apply").click().run()
    assert not trainer.exception and "Saved version **even**" in trainer.success[0].value
    [version] = versions.list_versions(load_dataset(dataset))
    assert version.user == TRAINER
    table = next(d.value for d in open_page("balance", VIEWER).dataframe if "made by" in d.value.columns)
    assert table["made by"].tolist() == [TRAINER]


def test_spot_check_shows_viewers_the_reason_and_saves_annotators_decisions_under_their_name(dataset):
    viewer = open_page("spot_check", VIEWER)
    assert not viewer.exception
    assert "Only an annotator may spot-check bins" in texts(viewer, "info") and "spot_queue" not in viewer.session_state
    annotator = open_page("spot_check", ANNOTATOR)
    assert not annotator.exception and "annotator_input" not in [t.key for t in annotator.text_input]
    annotator.button(key="decide_confirm").click().run()
    trail = annotations.history(load_dataset(dataset).key)
    assert trail["annotator"].tolist() == [ANNOTATOR]


# ------------------------------------------------------------------------------------------- typed paths

@pytest.fixture
def roots(tmp_path, dataset, monkeypatch) -> dict:
    """One data root holding the dataset; next to it a folder outside every root, and a symlink from in to out."""
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    (root / "pool").mkdir(parents=True)
    (outside / "bin-images").mkdir(parents=True)
    (root / "link_out").symlink_to(outside, target_is_directory=True)
    monkeypatch.setenv("BINSIGHT_DATA_ROOTS", os.pathsep.join([str(root), str(dataset)]))
    return {
        "..": f"{root}/pool/../../outside", "absolute outside": str(outside), "symlink out": str(root / "link_out"),
        "~": "~",
    }


REFUSED = "is outside the folders this app may open"


def test_the_sidebar_refuses_a_dataset_outside_the_roots_and_keeps_the_setting(roots, monkeypatch):
    monkeypatch.delenv("BINSIGHT_DATA")
    config.save_settings(data_dir=None)
    at = open_page("app.py")
    for case, typed in roots.items():
        at.sidebar.text_input(key="sidebar_data_path").input(typed)
        at.sidebar.button(key="sidebar_apply").click().run()
        assert not at.exception, case
        assert REFUSED in at.sidebar.error[0].value, case
        assert config.load_settings().get("data_dir") is None, case


def test_the_balance_page_refuses_pool_folders_and_lists_outside_the_roots(roots):
    at = open_page("balance")
    at.radio(key="balance_strategy").set_value("fetch").run()
    at.radio(key="balance_pool_kind").set_value("folder").run()
    for case, typed in roots.items():
        at.text_input(key="balance_pool_folder").set_value(typed).run()
        assert not at.exception and REFUSED in at.error[0].value, case
        assert not config.load_settings().get("balance_pool_folder"), case  # nothing else happened
    at.radio(key="balance_pool_kind").set_value("bucket").run()
    at.text_input(key="balance_lists").set_value(roots["absolute outside"] + "/file_list.json").run()
    assert REFUSED in at.error[0].value and not config.load_settings().get("balance_pool_lists")


def test_the_predict_page_refuses_a_local_folder_outside_the_roots(roots, shared, monkeypatch):
    at = AppTest.from_file(str(ROOT / "app_pages/predict.py"), default_timeout=120).run()
    at.radio(key="predict_origin").set_value("Local folder").run()
    for case, typed in roots.items():
        at.text_input(key="predict_folder").input(typed).run()
        assert not at.exception and REFUSED in at.error[0].value, case
        assert not at.get("metric"), case  # nothing was predicted


def test_the_evaluate_page_refuses_another_folder_outside_the_roots(roots, shared):
    at = AppTest.from_file(str(ROOT / "app_pages/evaluate.py"), default_timeout=120).run()
    at.selectbox(key="eval_split").set_value(at.selectbox(key="eval_split").options[-1]).run()
    for case, typed in roots.items():
        at.text_input(key="eval_folder").input(typed).run()
        assert not at.exception and REFUSED in at.error[0].value, case
        assert not at.get("metric"), case


def test_viewers_cannot_type_server_paths_in_predict_or_evaluate(shared):
    for page, key, origin in (("predict", "predict_folder", "predict_origin"), ("evaluate", "eval_folder", None)):
        at = open_page(page, VIEWER)
        if origin:
            at.radio(key=origin).set_value("Local folder").run()
        else:
            at.selectbox(key="eval_split").set_value(at.selectbox(key="eval_split").options[-1]).run()
        assert refused_with_reason(at.text_input(key=key), "trainer"), page
