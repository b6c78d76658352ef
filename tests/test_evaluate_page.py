"""The Evaluate page through AppTest on two real small runs: metrics, confusion cells, comparison, other folders."""
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix
from streamlit.testing.v1 import AppTest

from core.data.layouts.registry import load_dataset
from core.evaluation.metrics import compute_metrics
from core.evaluation.results import evaluate
from core.models.inference import predict_photos
from core.models.networks import load_model
from tests.conftest import make_abid_subset

PAGE = str(Path(__file__).resolve().parents[1] / "app_pages" / "evaluate.py")
CLASSES = [1, 2, 3, 4, 5]


def run_page() -> AppTest:
    return AppTest.from_file(PAGE, default_timeout=120).run()


def shown_metrics(at: AppTest) -> dict:
    return {m.label: m.value for m in at.metric}


def reference_predictions(run: Path, data: Path, split: str):
    """The model's predictions on a split made directly, without the prediction store: name, truth, predicted."""
    import pandas as pd

    rows = load_dataset(data).rows(split)
    model, meta = load_model(run / "model.pt")
    frame = predict_photos(model, meta, list(rows["path"]))
    return pd.DataFrame({"name": list(rows["name"]), "truth": rows["cls"].astype(int).to_numpy(),
                         "predicted": frame["predicted"].astype(int).to_numpy()})


def table_with(at: AppTest, column: str):
    return next(d.value for d in at.dataframe if column in d.value.columns)


def test_without_a_run_the_page_says_how_to_get_one():
    at = run_page()
    assert not at.exception
    assert "No trained model yet" in at.info[0].value


def test_metrics_per_class_table_and_weakest_class(shared):
    at = run_page()
    assert not at.exception and not at.error
    run_id = at.selectbox(key="eval_run").value
    metrics = evaluate(shared["runs"][run_id] / "model.pt", shared["data"], split="test").metrics()
    shown = shown_metrics(at)
    assert shown["Accuracy"] == f"{metrics['accuracy']:.1%}"
    assert shown["Balanced accuracy"] == f"{metrics['balanced_accuracy']:.1%}"
    assert shown["MAE (objects)"] == f"{metrics['mae']:.3f}"
    assert shown["Off-by-one accuracy"] == f"{metrics['off_by_one']:.1%}"
    assert shown["Photos scored"] == str(metrics["n"])
    table = table_with(at, "precision")
    assert np.allclose(table["f1"], [metrics["per_class"][str(c)]["f1"] for c in CLASSES])
    weakest = min(CLASSES, key=lambda c: (metrics["per_class"][str(c)]["f1"], metrics["per_class"][str(c)]["recall"], c))
    assert any(f"Weakest class: **{weakest}**" in c.value for c in at.caption)
    assert len(at.get("plotly_chart")) == 4  # the intervals, per-class bars, the reliability diagram, the confusion matrix
    labels = [b.label for b in at.get("download_button")]
    assert labels == ["Report (CSV)", "Report (JSON)", "Confusion matrix (PNG)", "Predictions (CSV)",
                      "Model card (Markdown)"]


def test_predictions_are_not_recomputed_on_a_rerun(shared, monkeypatch):
    import core.models.inference

    calls = []
    real = core.models.inference.predict_photos
    monkeypatch.setattr(core.models.inference, "predict_photos", lambda *a, **k: calls.append(1) or real(*a, **k))
    at = run_page()
    assert len(calls) == 1  # the test split, predicted once (this test's copy of the runs has nothing stored)
    at.selectbox(key="eval_split").set_value("valid").run()
    assert len(calls) == 2  # the valid split, predicted once
    at.radio(key="cm_view").set_value("Row-normalised (recall)").run()
    at.run()
    assert len(calls) == 2  # reruns read the stored predictions
    fresh = run_page()  # a new session reads the stored predictions too
    fresh.selectbox(key="eval_split").set_value("valid").run()
    assert len(calls) == 2 and not fresh.exception


def test_a_selected_cell_shows_exactly_the_photos_sklearn_counts(shared):
    at = run_page()
    at.selectbox(key="eval_split").set_value("all").run()
    run_id = at.selectbox(key="eval_run").value
    reference = reference_predictions(shared["runs"][run_id], shared["data"], "all")
    matrix = confusion_matrix(reference["truth"], reference["predicted"], labels=CLASSES)
    off_diagonal = [(i, j) for i in range(5) for j in range(5) if i != j and matrix[i, j] > 0]
    assert off_diagonal, "the small run makes no mistake: nothing to open"
    for i, j in [max(off_diagonal, key=lambda ij: matrix[ij]), (int(np.argmax(np.diag(matrix))),) * 2]:
        true, predicted = CLASSES[i], CLASSES[j]
        at.selectbox(key="cm_true").set_value(true)
        at.selectbox(key="cm_pred").set_value(predicted).run()
        assert not at.exception
        assert any(m.value.startswith(f"**{matrix[i, j]} photos** with true count **{true}** predicted as "
                                      f"**{predicted}**") for m in at.markdown)
        cell = table_with(at, "item_names")
        expected = reference[(reference["truth"] == true) & (reference["predicted"] == predicted)]
        assert sorted(cell["name"]) == sorted(expected["name"])
        assert list(cell["confidence"]) == sorted(cell["confidence"], reverse=True)
        assert cell["item_names"].str.len().gt(0).any()  # metadata items are shown with the photos
        assert len(at.image) == min(len(cell), 12)  # the photos themselves, one page of them


def test_comparing_two_runs_shows_the_right_deltas(shared):
    at = run_page()
    at.selectbox(key="compare_baseline").set_value("baseline").run()
    at.multiselect(key="compare_runs").set_value(["better"]).run()
    assert not at.exception
    frame = table_with(at, "Δ better (run)").set_index("metric")
    # each run's difference sits next to its figures, the key metrics first
    assert list(frame.columns[:3]) == ["baseline", "better (run)", "Δ better (run)"]
    assert list(frame.index[:2]) == ["Accuracy", "Balanced accuracy"]
    scored = {}
    for name in ("baseline", "better"):
        predictions = reference_predictions(shared["runs"][name], shared["data"], "test")
        scored[name] = compute_metrics(predictions["truth"], predictions["predicted"], CLASSES)
    assert frame.loc["Accuracy", "Δ better (run)"] == pytest.approx(scored["better"]["accuracy"] - scored["baseline"]["accuracy"])
    assert frame.loc["MAE (objects)", "Δ better (run)"] == pytest.approx(scored["better"]["mae"] - scored["baseline"]["mae"])
    for c in CLASSES:
        delta = scored["better"]["per_class"][str(c)]["f1"] - scored["baseline"]["per_class"][str(c)]["f1"]
        assert frame.loc[f"F1 class {c}", "Δ better (run)"] == pytest.approx(delta)
    assert any("Baseline: **baseline**" in c.value and "green better" in c.value for c in at.caption)


def test_any_labelled_folder_and_a_bad_one(shared, tmp_path):
    other = make_abid_subset(tmp_path / "holdout", per_class=2)
    at = run_page()
    at.selectbox(key="eval_split").set_value("Another labelled folder…").run()
    assert "Give the path" in at.info[0].value
    at.text_input(key="eval_folder").input(str(other)).run()
    assert not at.exception and not at.error
    assert shown_metrics(at)["Photos scored"] == "10"
    at.text_input(key="eval_folder").input(str(tmp_path / "missing")).run()
    assert "does not exist" in at.error[0].value


def test_a_damaged_model_file_is_explained(binsight_home):
    from core import config

    broken = config.runs_dir() / "broken"
    broken.mkdir()
    (broken / "model.pt").write_bytes(b"not a checkpoint")
    at = run_page()
    assert not at.exception
    assert "cannot be loaded" in at.error[0].value and "not a Binsight model file" in at.error[0].value


def test_skipped_photos_are_reported_as_the_cli_reports_them(shared, tmp_path, capsys):
    from core.cli import main

    other = make_abid_subset(tmp_path / "holdout", per_class=2)
    broken = sorted((other / "bin-images").glob("*.jpg"))[0]
    broken.write_bytes(broken.read_bytes()[:300])
    at = run_page()
    at.selectbox(key="eval_split").set_value("Another labelled folder…").run()
    at.text_input(key="eval_folder").input(str(other)).run()
    assert not at.exception
    assert any("1 photos could not be read" in w.value for w in at.warning)
    run_id = at.selectbox(key="eval_run").value
    assert main(["evaluate", "--model", str(shared["runs"][run_id] / "model.pt"), "--data", str(other),
                 "--split", "all"]) == 0
    cli_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("skipped "))
    assert broken.name in cli_line
    assert cli_line in [c.value for c in at.caption]


def test_a_click_on_the_confusion_chart_opens_that_cell(shared):
    at = run_page()
    at.selectbox(key="eval_split").set_value("all").run()
    # What the browser sends when a cell's marker is clicked: its customdata is [true, predicted].
    at.session_state["cm_chart"] = {"selection": {"points": [{"x": "2", "y": "4", "customdata": [4, 2]}],
                                                  "point_indices": [17], "box": [], "lasso": []}}
    at.run()
    assert not at.exception
    assert at.selectbox(key="cm_true").value == 4 and at.selectbox(key="cm_pred").value == 2
    assert any("with true count **4** predicted as **2**" in m.value for m in at.markdown)


def test_a_finished_jobs_button_opens_evaluate_on_its_run_not_the_current_one(shared):
    at = run_page()
    shown = at.selectbox(key="eval_run").value  # the current model, else the newest run
    other = next(run_id for run_id in shared["runs"] if run_id != shown)
    at.session_state["evaluate_open_run"] = other  # what the Train page's "See it on Evaluate" sets
    at.run()
    assert at.selectbox(key="eval_run").value == other and not at.exception
    at.run()  # the choice stays: later reruns keep the run the user looks at
    assert at.selectbox(key="eval_run").value == other


def test_the_chosen_run_is_kept_across_pages_until_a_new_model_is_current(shared):
    from core import config
    from core.jobs.runs import set_current_run

    def back_on_the_page(before: AppTest) -> AppTest:
        """The page shown again after another one: Streamlit has dropped its widgets' values, nothing else."""
        again = AppTest.from_file(PAGE, default_timeout=120)
        again.session_state["eval_run_chosen"] = before.session_state["eval_run_chosen"]
        return again.run()

    config.save_settings(current_run=None)  # no current model: the newest run shows first
    at = run_page()
    shown = at.selectbox(key="eval_run").value
    other = next(run_id for run_id in shared["runs"] if run_id != shown)
    at.selectbox(key="eval_run").set_value(other).run()
    at = back_on_the_page(at)
    assert at.selectbox(key="eval_run").value == other and not at.exception
    set_current_run(shown)  # a training finished, or Predict chose a model: the current model shows first again
    at = back_on_the_page(at)
    assert at.selectbox(key="eval_run").value == shown
