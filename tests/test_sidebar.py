"""The shared sidebar (app_pages/common.py) through the whole app: switching dataset and class range reloads the
page's data, and a model keeps its own class range on Evaluate."""
from __future__ import annotations

from pathlib import Path

from streamlit.testing.v1 import AppTest

from core import config
from core.data.classes import ClassRange
from core.evaluation.results import evaluate
from tests.conftest import make_abid_subset

ROOT = Path(__file__).resolve().parents[1]


def app() -> AppTest:
    return AppTest.from_file(str(ROOT / "app.py"), default_timeout=120).run()


def metrics(at: AppTest) -> dict:
    return {m.label: m.value for m in at.metric}


def test_switching_the_dataset_reloads_the_page_with_it(tmp_path):
    first = make_abid_subset(tmp_path / "first", per_class=4)
    second = make_abid_subset(tmp_path / "second", per_class=2, counts=(1, 2, 3))
    config.save_settings(data_dir=str(first))
    at = app()  # the Overview page
    assert not at.exception and metrics(at)["Photos"] == "20"

    at.sidebar.text_input(key="sidebar_data_path").input(str(second))
    at.sidebar.button(key="sidebar_apply").click().run()
    assert not at.exception
    assert config.load_settings()["data_dir"] == str(second)
    assert metrics(at)["Photos"] == "6" and any(f"`{second}`" in c.value for c in at.sidebar.caption)

    at.sidebar.text_input(key="sidebar_data_path").input(str(tmp_path / "missing"))
    at.sidebar.button(key="sidebar_apply").click().run()
    assert f"{tmp_path / 'missing'} does not exist." in [e.value for e in at.sidebar.error]
    assert config.load_settings()["data_dir"] == str(second) and metrics(at)["Photos"] == "6"


def test_changing_the_class_range_reloads_the_page_with_it(tmp_path):
    config.save_settings(data_dir=str(make_abid_subset(tmp_path / "data", per_class=2)))
    at = app()
    assert metrics(at)["In classes 1–5"] == "10"
    assert "sidebar_range_apply" not in [b.key for b in at.sidebar.button]  # nothing to apply yet

    at.sidebar.slider(key="sidebar_range").set_value((1, 3)).run()
    at.sidebar.button(key="sidebar_range_apply").click().run()
    assert not at.exception
    assert ClassRange.from_dict(config.load_settings()["class_range"]) == ClassRange(1, 3)
    shown = metrics(at)
    assert (shown["In classes 1–3"], shown["Outside the classes"]) == ("6", "4")


def test_evaluate_keeps_the_models_class_range_when_the_sidebar_has_another(shared):
    at = app()
    at.sidebar.slider(key="sidebar_range").set_value((1, 3)).run()
    at.sidebar.button(key="sidebar_range_apply").click().run()
    assert "In classes 1–3" in metrics(at)

    at.switch_page("app_pages/evaluate.py").run()
    assert not at.exception and not at.error
    run_id = at.selectbox(key="eval_run").value
    assert f"Evaluated with the model's class range {ClassRange(1, 5).describe()} " \
           f"(the sidebar's is {ClassRange(1, 3).describe()})." in [i.value for i in at.info]
    expected = evaluate(shared["runs"][run_id] / "model.pt", shared["data"], split="test").metrics()
    assert metrics(at)["Photos scored"] == str(expected["n"])  # all five classes' test photos, as trained
    assert metrics(at)["Accuracy"] == f"{expected['accuracy']:.1%}"
