"""Evaluation results on real small runs: the prediction store, confusion cells, run comparison, exports."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, f1_score

from core.data.layouts.registry import load_dataset
from core.evaluation import reports
from core.evaluation.predictions import PredictionStore
from core.evaluation.results import EvaluationResult, score
from core.jobs.runs import available_runs, register_run
from core.models.inference import predict_photos
from core.models.networks import load_model
from tests.conftest import make_abid_subset


def result_of(run: Path, rows: pd.DataFrame, split: str, on_progress=None) -> EvaluationResult:
    return score(run / "model.pt", rows, lambda: load_model(run / "model.pt"), run=run.name, split=split,
                 on_progress=on_progress)


def reference_predictions(run: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """The model's predictions made directly, without the store: name, truth, predicted."""
    model, meta = load_model(run / "model.pt")
    frame = predict_photos(model, meta, list(rows["path"]))
    return pd.DataFrame({"name": list(rows["name"]), "truth": rows["cls"].astype(int).to_numpy(),
                         "predicted": frame["predicted"].astype(int).to_numpy()})


def test_predictions_are_computed_once_then_read_back(runs, monkeypatch, binsight_home):
    import core.models.inference

    rows = load_dataset(runs["data"]).rows("test")
    calls = []
    real = core.models.inference.predict_photos
    monkeypatch.setattr(core.models.inference, "predict_photos", lambda *a, **k: calls.append(1) or real(*a, **k))
    progress = []
    first = result_of(runs["runs"]["baseline"], rows, "test", on_progress=progress.append).frame
    assert calls == [1] and progress and progress[-1]["fraction"] == 1.0
    stored = PredictionStore(runs["runs"]["baseline"] / "model.pt").file
    assert stored.is_file() and stored.is_relative_to(binsight_home)
    second = result_of(runs["runs"]["baseline"], rows, "test").frame
    assert calls == [1]  # read back, not predicted again
    pd.testing.assert_frame_equal(first, second)
    assert len(first) == len(rows) and set(first["name"]) == set(rows["name"])
    assert (first.set_index("name")["truth"] == rows.set_index("name")["cls"]).all()
    # other photos, or another run, are predicted
    result_of(runs["runs"]["baseline"], load_dataset(runs["data"]).rows("valid"), "valid")
    result_of(runs["runs"]["better"], rows, "test")
    assert calls == [1, 1, 1]


def test_a_replaced_photo_or_model_is_predicted_again(runs, tmp_path):
    data = make_abid_subset(tmp_path / "copy", per_class=3)
    rows = load_dataset(data).rows("all")
    store = PredictionStore(runs["runs"]["baseline"] / "model.pt")
    result_of(runs["runs"]["baseline"], rows, "all")
    assert store.missing(rows).empty
    photo = Path(rows.iloc[0]["path"])
    photo.write_bytes(photo.read_bytes() + b"\0")  # same name, new content
    assert list(store.missing(rows)["name"]) == [rows.iloc[0]["name"]]
    assert PredictionStore(runs["runs"]["better"] / "model.pt").folder != store.folder
    assert len(PredictionStore(runs["runs"]["better"] / "model.pt").missing(rows)) == len(rows)


def test_truth_follows_corrected_labels_without_predicting_again(runs, monkeypatch):
    import core.models.inference

    rows = load_dataset(runs["data"]).rows("test")
    result_of(runs["runs"]["baseline"], rows, "test")
    monkeypatch.setattr(core.models.inference, "predict_photos", lambda *a, **k: pytest.fail("predicted again"))
    corrected = rows.copy()
    corrected.loc[corrected.index[0], "cls"] = 5 if corrected.iloc[0]["cls"] != 5 else 1
    frame = result_of(runs["runs"]["baseline"], corrected, "test").frame
    assert frame.set_index("name").loc[corrected.iloc[0]["name"], "truth"] == corrected.iloc[0]["cls"]


def test_metrics_match_the_training_run_and_preprocessing_is_shared(shared):
    """Predicting the test photos from files gives the test metrics training computed from cached features."""
    rows = load_dataset(shared["data"]).rows("test")
    for run in shared["runs"].values():
        metrics = result_of(run, rows, "test").metrics()
        trained = json.loads((run / "metrics.json").read_text())["test"]
        assert metrics["n"] == trained["n"]
        assert metrics["confusion_matrix"] == trained["confusion_matrix"]
        assert metrics["accuracy"] == pytest.approx(trained["accuracy"])


def test_confusion_cells_hold_exactly_the_photos_sklearn_counts(shared):
    rows = load_dataset(shared["data"]).rows("all")
    result = result_of(shared["runs"]["baseline"], rows, "all")
    classes = [1, 2, 3, 4, 5]
    # the reference: the model's predictions made directly, and scikit-learn's matrix
    reference = reference_predictions(shared["runs"]["baseline"], rows)
    matrix = confusion_matrix(reference["truth"], reference["predicted"], labels=classes)
    assert matrix.sum() == len(rows) and np.trace(matrix) < matrix.sum()  # some mistakes to look at
    seen = []
    for i, true in enumerate(classes):
        for j, predicted in enumerate(classes):
            cell = result.cell(true, predicted)
            expected = reference[(reference["truth"] == true) & (reference["predicted"] == predicted)]["name"]
            assert len(cell) == matrix[i, j]
            assert sorted(cell["name"]) == sorted(expected)
            assert list(cell["confidence"]) == sorted(cell["confidence"], reverse=True)
            seen += list(cell["name"])
    assert sorted(seen) == sorted(rows["name"])  # every photo in exactly one cell


def test_per_class_table_and_weakest_class(shared):
    rows = load_dataset(shared["data"]).rows("all")
    result = result_of(shared["runs"]["baseline"], rows, "all")
    table = result.per_class()
    truth, predicted = result.frame["truth"].astype(int), result.frame["predicted"].astype(int)
    expected_f1 = f1_score(truth, predicted, labels=[1, 2, 3, 4, 5], average=None, zero_division=0)
    assert np.allclose(table["f1"], expected_f1)
    assert list(table["support"]) == [12] * 5
    weakest = result.weakest_class()
    assert table.set_index("class").loc[weakest, "f1"] == expected_f1.min()


def test_weakest_class_ignores_empty_classes_and_breaks_ties_on_recall():
    table = pd.DataFrame({"class": [1, 2, 3], "precision": [0.5, 0.9, 0.0], "recall": [0.2, 0.4, 0.0],
                          "f1": [0.3, 0.3, 0.0], "support": [10, 10, 0]})
    assert reports.weakest_class(table) == 1


def test_unreadable_photos_and_unknown_counts_are_left_out_and_counted(runs, tmp_path):
    data = make_abid_subset(tmp_path / "mixed", per_class=2)
    rows = load_dataset(data).rows("all").copy()
    broken = Path(rows.iloc[0]["path"])
    broken.write_bytes(broken.read_bytes()[:300])  # damaged after indexing
    rows.loc[rows.index[1], "cls"] = 7  # a count the model does not know
    result = result_of(runs["runs"]["baseline"], rows, "all")
    assert "damaged or truncated" in result.frame.set_index("name").loc[rows.iloc[0]["name"], "error"]
    metrics = result.metrics()
    assert metrics["n"] == len(rows) - 2
    assert metrics["left_out"] == {"unreadable": 1, "outside_classes": 1}
    assert [s["photo"] for s in result.skipped] == [rows.iloc[0]["name"]]
    assert rows.iloc[0]["name"] not in set(result.cell(int(rows.iloc[0]["cls"]), int(rows.iloc[0]["cls"]))["name"])


def test_comparison_deltas(shared):
    rows = load_dataset(shared["data"]).rows("all")
    results = {name: result_of(run, rows, "all") for name, run in shared["runs"].items()}
    by_run = {name: result.metrics() for name, result in results.items()}
    frame = results["baseline"].compare({"better": results["better"]}).set_index("metric")
    assert list(frame.columns) == ["better", "baseline", "better (run)", "Δ better (run)"]
    for key, label, _ in reports.OVERALL_METRICS:
        assert frame.loc[label, "Δ better (run)"] == pytest.approx(by_run["better"][key] - by_run["baseline"][key])
    for cls in [1, 2, 3, 4, 5]:
        delta = by_run["better"]["per_class"][str(cls)]["f1"] - by_run["baseline"]["per_class"][str(cls)]["f1"]
        assert frame.loc[f"F1 class {cls}", "Δ better (run)"] == pytest.approx(delta)
    assert frame.loc["MAE (objects)", "better"] == "lower"
    with pytest.raises(ValueError):
        results["baseline"].compare({})


def test_delta_direction_knows_mae_is_better_lower():
    assert reports.delta_direction(0.1, "higher") == 1 and reports.delta_direction(-0.1, "higher") == -1
    assert reports.delta_direction(-0.1, "lower") == 1 and reports.delta_direction(0.1, "lower") == -1
    assert reports.delta_direction(0.0, "higher") == 0 and reports.delta_direction(float("nan"), "higher") == 0


def test_exports(shared):
    rows = load_dataset(shared["data"]).rows("test")
    result = result_of(shared["runs"]["better"], rows, "test")
    metrics = result.metrics()
    report = json.loads(result.report_json())
    assert report["accuracy"] == metrics["accuracy"] and report["confusion_matrix"] == metrics["confusion_matrix"]
    assert [r["class"] for r in report["per_class"]] == [1, 2, 3, 4, 5]
    assert report["run"] == "better" and report["split"] == "test"
    table = pd.read_csv(io.BytesIO(result.report_csv()))
    assert set(table["run"]) == {"better"}
    overall = table[table["scope"] == "overall"].set_index("metric")["value"]
    assert overall["accuracy"] == pytest.approx(metrics["accuracy"])
    assert len(table[table["scope"] == "class 3"]) == 4
    png = Image.open(io.BytesIO(result.confusion_png()))
    assert png.format == "PNG" and png.width > 200
    predictions = pd.read_csv(io.BytesIO(result.predictions_csv()))
    assert sorted(predictions["name"]) == sorted(rows["name"]) and "prob_5" in predictions
    normalised = reports.row_normalised(np.asarray(metrics["confusion_matrix"]))
    assert np.allclose(normalised.sum(axis=1)[np.asarray(metrics["confusion_matrix"]).sum(axis=1) > 0], 1.0)


def test_available_runs_lists_registered_and_unregistered_folders(shared):

    register_run(shared["runs"]["better"])
    found = {r["id"]: r for r in available_runs()}
    assert set(found) >= {"baseline", "better"}
    trained = json.loads((shared["runs"]["baseline"] / "metrics.json").read_text())["test"]["accuracy"]
    assert found["baseline"]["accuracy"] == pytest.approx(trained)
    assert found["better"]["backbone"] == "efficientnet_lite0" and found["better"]["mode"] == "frozen"


def test_cell_from_a_plotly_selection_event():
    event = {"selection": {"points": [{"curve_number": 1, "x": "2", "y": "4", "customdata": [4, 2]}],
                           "point_indices": [16], "box": [], "lasso": []}}
    assert reports.cell_from_selection(event) == (4, 2)
    assert reports.cell_from_selection({"selection": {"points": [{"x": "3", "y": "1"}]}}) == (1, 3)
    assert reports.cell_from_selection({"selection": {"points": []}}) is None
    assert reports.cell_from_selection(None) is None
