"""Prediction and evaluation with a small trained model: reload is identical, broken photos are reported."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.evaluation.results import evaluate
from core.models.inference import predict_photos
from core.models.networks import load_model, save_model
from core.models.preprocess import photo_tensor, tta_views
from core.training.config import TrainConfig
from core.training.loop import train
from tests.conftest import make_abid_subset
from tests.test_training import SMALL, add_broken_photos


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """One small frozen run shared by this module's tests (trained in its own BINSIGHT_HOME)."""
    folder = tmp_path_factory.mktemp("inference")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BINSIGHT_HOME", str(folder / "home"))
        data = make_abid_subset(folder / "data", per_class=8)
        add_broken_photos(data)
        result = train(TrainConfig(data=str(data), out=str(folder / "run"), tta="flips", **SMALL))
    return folder / "run", data, result


def test_reloaded_checkpoint_predicts_identically(run, tmp_path):
    folder, data, result = run
    photos = sorted((data / "bin-images").glob("*.jpg"))[:6]
    model, meta = load_model(folder / "model.pt")
    first = predict_photos(model, meta, photos, num_workers=0)
    save_model(tmp_path / "again.pt", model, meta)
    again = predict_photos(*load_model(tmp_path / "again.pt"), photos, num_workers=0)
    reloaded = predict_photos(*load_model(folder / "model.pt"), photos, num_workers=0)
    prob_columns = [f"prob_{c}" for c in meta["classes"]]
    assert np.array_equal(first[prob_columns].to_numpy(), again[prob_columns].to_numpy())
    assert np.array_equal(first[prob_columns].to_numpy(), reloaded[prob_columns].to_numpy())
    assert list(first["predicted"]) == list(reloaded["predicted"])
    # evaluating the saved model reproduces the test metrics training reported (same split, same preprocessing)
    metrics = evaluate(folder / "model.pt", data, split="test").metrics()
    assert metrics["n"] == result["test"]["n"]
    assert metrics["confusion_matrix"] == result["test"]["confusion_matrix"]


def test_prediction_averages_the_four_mirror_views(run):
    folder, data, _ = run
    model, meta = load_model(folder / "model.pt")
    assert tta_views(meta) == ("plain", "hflip", "vflip", "hvflip")
    photos = sorted((data / "bin-images").glob("*.jpg"))[:4]
    images = torch.stack([photo_tensor(p, meta) for p in photos])
    with torch.no_grad():
        views = [(model.eval()(v) / meta["temperature"]).softmax(1)  # softmax at the calibrated temperature
                 for v in (images, images.flip(-1), images.flip(-2), images.flip((-2, -1)))]
    frame = predict_photos(model, meta, photos, num_workers=0)
    probs = frame[[f"prob_{c}" for c in meta["classes"]]].to_numpy()
    assert np.allclose(probs, (sum(views) / 4).numpy(), atol=1e-5)
    assert not np.allclose(probs, views[0].numpy(), atol=1e-4)  # the views disagree, so averaging them matters
    # models saved with the older left-right flag keep their single mirror
    assert tta_views({"tta_flip": True}) == ("plain", "hflip") and tta_views({}) == ("plain",)


def test_predictions_have_one_row_per_photo_and_broken_photos_get_an_error(run):
    folder, data, _ = run
    model, meta = load_model(folder / "model.pt")
    photos = sorted((data / "bin-images").glob("*.jpg"))[:4] + [data / "bin-images" / "truncated.jpg",
                                                                data / "bin-images" / "garbage.jpg"]
    frame = predict_photos(model, meta, photos, batch_size=4, num_workers=0)
    assert list(frame.columns) == ["photo", "path", "predicted", "confidence", "prob_1", "prob_2", "prob_3",
                                   "prob_4", "prob_5", "error"]
    good = frame[frame["error"].isna()]
    assert len(good) == 4 and good["predicted"].isin([1, 2, 3, 4, 5]).all()
    assert np.allclose(good[[f"prob_{c}" for c in range(1, 6)]].sum(axis=1), 1.0, atol=1e-5)
    assert (good["confidence"] == good[[f"prob_{c}" for c in range(1, 6)]].max(axis=1)).all()
    bad = frame.set_index("photo").loc[["truncated.jpg", "garbage.jpg"]]
    assert bad["predicted"].isna().all() and bad["error"].str.len().gt(0).all()


def test_evaluate_all_scores_every_readable_photo_and_lists_the_skipped(run):
    folder, data, _ = run
    result = evaluate(folder / "model.pt", data, split="all")
    metrics = result.metrics()
    assert metrics["n"] == 40  # 8 real photos of each count 1–5
    assert {s["photo"] for s in result.skipped} == {"truncated.jpg", "garbage.jpg"}
    assert {"name", "path", "truth", "predicted", "confidence", "prob_1"} <= set(result.frame.columns)
    from sklearn.metrics import balanced_accuracy_score, confusion_matrix

    scored = result.scored()
    truth, predicted = scored["truth"].astype(int), scored["predicted"].astype(int)
    assert len(scored) == 40
    assert metrics["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(truth, predicted))
    assert metrics["confusion_matrix"] == confusion_matrix(truth, predicted, labels=[1, 2, 3, 4, 5]).tolist()


def test_one_model_shared_by_threads_predicts_as_it_does_alone(run):
    """Pages share one cached model between sessions: predicting from several threads at once, starting with a
    model not yet prepared for inference, gives every thread the same numbers as a lone call."""
    from concurrent.futures import ThreadPoolExecutor

    out, data, _ = run
    paths = sorted(str(p) for p in (data / "bin-images").glob("*.jpg"))[:12]
    model, meta = load_model(out / "model.pt")
    alone = predict_photos(load_model(out / "model.pt")[0], meta, paths, batch_size=4, device="cpu", num_workers=0)
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda _: predict_photos(model, meta, paths, batch_size=4, device="cpu",
                                                          num_workers=0), range(4)))
    columns = [f"prob_{c}" for c in meta["classes"]]
    for frame in together:
        assert frame["predicted"].equals(alone["predicted"])
        np.testing.assert_allclose(frame[columns].to_numpy(float), alone[columns].to_numpy(float), atol=1e-5)


def test_photos_the_model_gives_no_number_for_are_not_stored_as_predicted(run, monkeypatch, tmp_path):
    from core.evaluation.predictions import PredictionStore

    out, data, _ = run
    monkeypatch.setenv("BINSIGHT_HOME", str(tmp_path / "home"))
    model, meta = load_model(out / "model.pt")
    rows = __import__("core.data.layouts.registry", fromlist=["load_dataset"]).load_dataset(str(data)).rows("test")

    class Broken(torch.nn.Module):  # what a model in a broken state gives: not a number
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * float("nan")

    store = PredictionStore(out / "model.pt")
    with pytest.raises(RuntimeError, match="no probabilities"):
        store.predict(rows, lambda: (Broken(model), meta))
    assert len(store.missing(rows)) == len(rows[rows["path"].notna()])  # nothing stored: predicted again next time
    assert store.predict(rows, lambda: (model, meta))["predicted"].notna().any()
