"""EvaluationResult views are filters of its per-photo frame; one prediction store per model, resumable and shared."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.data.layouts.registry import load_dataset
from core.errors import Cancelled
from core.evaluation.predictions import PredictionStore
from core.evaluation.results import EvaluationResult, score
from core.review.queue import candidates, score_photos
from tests.conftest import make_abid_subset

CLASSES = [1, 2, 3, 4, 5]


def hand_made_result() -> EvaluationResult:
    """40 photos with known truth, prediction and confidence; two unreadable ones."""
    rng = np.random.default_rng(0)
    n = 40
    truth = rng.integers(1, 6, n)
    predicted = np.where(rng.random(n) < 0.6, truth, rng.integers(1, 6, n))
    probs = rng.dirichlet(np.ones(5), n)
    frame = pd.DataFrame({"name": [f"{i:03d}.jpg" for i in range(n)], "path": [f"/photos/{i:03d}.jpg" for i in range(n)],
                          "truth": pd.array(truth, dtype="Int64"), "predicted": pd.array(predicted, dtype="Int64"),
                          "confidence": probs.max(axis=1)})
    for column, count in enumerate(CLASSES):
        frame[f"prob_{count}"] = probs[:, column]
    frame["error"] = None
    frame.loc[[3, 17], ["predicted", "confidence", "error"]] = [pd.NA, np.nan, "damaged or truncated"]
    frame["correct"] = (frame["truth"] == frame["predicted"]).fillna(False).astype(bool)
    return EvaluationResult(frame, CLASSES, run="hand", split="test", problems=[{"photo": "x.jpg", "reason": "no label"}])


def test_a_cell_is_exactly_the_readable_rows_with_that_truth_and_prediction():
    result = hand_made_result()
    frame = result.frame
    matrix = np.asarray(result.metrics()["confusion_matrix"])
    seen = []
    for i, true in enumerate(CLASSES):
        for j, predicted in enumerate(CLASSES):
            cell = result.cell(true, predicted)
            expected = frame[(frame["truth"] == true) & (frame["predicted"] == predicted) & frame["error"].isna()]
            assert set(cell["name"]) == set(expected["name"]) and len(cell) == matrix[i, j]
            assert list(cell["confidence"]) == sorted(cell["confidence"], reverse=True)
            seen += list(cell["name"])
    assert sorted(seen) == sorted(frame.loc[frame["error"].isna(), "name"])
    assert [s["photo"] for s in result.skipped] == ["x.jpg", "003.jpg", "017.jpg"]
    assert result.metrics()["left_out"] == {"unreadable": 2, "outside_classes": 0}


def test_per_class_and_the_weakest_class_come_from_the_same_rows():
    result = hand_made_result()
    table = result.per_class().set_index("class")
    scored = result.frame[result.frame["error"].isna()]
    for count in CLASSES:
        assert table.loc[count, "support"] == (scored["truth"] == count).sum()
    present = table[table["support"] > 0]
    assert result.weakest_class() == present.sort_values(["f1", "recall"]).index[0]


def test_compare_with_itself_has_zero_deltas():
    result = hand_made_result()
    frame = result.compare({"again": result})
    assert list(frame.columns) == ["metric", "better", "hand", "again", "Δ again"]
    assert (frame["Δ again"].abs() < 1e-12).all() and len(frame) == 5 + len(CLASSES)
    same_name = result.compare({"hand": result})  # a name taken twice does not overwrite the baseline
    assert (same_name.filter(like="Δ ").abs() < 1e-12).all().all() and same_name.shape[1] == 5


@pytest.fixture
def tiny_model(tmp_path) -> Path:
    import torch

    from core.models.networks import backbone_spec, build_model, save_model
    from core.models.preprocess import preprocessing

    spec = backbone_spec("simple_cnn")
    meta = {"backbone": "simple_cnn", "head": "linear", "classes": CLASSES,
            **preprocessing({"mean": spec.mean, "std": spec.std}, 64)}
    torch.manual_seed(0)
    save_model(tmp_path / "run" / "model.pt", build_model(meta, pretrained=False), meta)
    return tmp_path / "run" / "model.pt"


@pytest.fixture
def predicted_paths(monkeypatch) -> list:
    """Every photo path handed to the model, in order."""
    import core.models.inference

    seen = []
    real = core.models.inference.predict_photos
    monkeypatch.setattr(core.models.inference, "predict_photos",
                        lambda model, meta, paths, **k: seen.extend(map(str, paths)) or real(model, meta, paths, **k))
    return seen


def loader(model_path: Path):
    from core.models.networks import load_model

    return lambda: load_model(model_path)


def test_an_interrupted_chunked_prediction_resumes_without_predicting_stored_photos(tiny_model, tmp_path,
                                                                                      predicted_paths):
    rows = load_dataset(make_abid_subset(tmp_path / "data", per_class=2)).rows("all")
    store = PredictionStore(tiny_model)

    def stop_in_second_chunk(info):
        if info["done"] > 4:
            raise Cancelled("stopped")

    with pytest.raises(Cancelled):
        store.predict(rows, loader(tiny_model), on_progress=stop_in_second_chunk, chunk=4)
    saved = set(store.stored(rows)["name"])
    assert len(saved) == 4 and len(store.missing(rows)) == len(rows) - 4  # the first chunk was kept
    interrupted = len(predicted_paths)
    outputs = store.predict(rows, loader(tiny_model), chunk=4)
    assert set(predicted_paths[interrupted:]) == set(rows.loc[~rows["name"].isin(saved), "path"])
    assert list(outputs["name"]) == list(rows["name"]) and outputs["error"].isna().all()
    assert np.allclose(outputs[[f"prob_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-4)


def test_spot_check_and_evaluate_share_one_store(tiny_model, tmp_path, predicted_paths):
    dataset = load_dataset(make_abid_subset(tmp_path / "data", per_class=2))
    test_rows = dataset.rows("all").head(4)
    first = score(tiny_model, test_rows, loader(tiny_model), run="run", split="some")  # Evaluate side
    assert len(predicted_paths) == len(test_rows)

    pool = candidates(dataset.frame)
    scores = score_photos(tiny_model, pool, loader(tiny_model))  # spot-check side: only the rest is predicted
    assert sorted(predicted_paths[len(test_rows):]) == sorted(set(pool["path"]) - set(test_rows["path"]))
    assert len(scores) == len(pool)
    evaluated = first.frame.set_index("name")[["predicted", "confidence"]]
    spotted = scores.set_index("name").loc[evaluated.index, ["predicted", "confidence"]]
    pd.testing.assert_frame_equal(evaluated, spotted)

    before = len(predicted_paths)
    again = score(tiny_model, dataset.rows("all"), loader(tiny_model), run="run", split="all")
    assert len(predicted_paths) == before  # everything the spot-check scored is read back
    assert again.metrics()["n"] == len(dataset.rows("all"))
