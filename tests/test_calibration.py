"""Calibrated confidence: ECE and reliability bins, temperature fitting, the temperature a training stores and uses."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.cli import main
from core.data.layouts.registry import load_dataset
from core.evaluation.calibration import (
    FLAG_SHARE,
    LEGACY_THRESHOLD,
    calibrated_nll,
    calibrated_threshold,
    expected_calibration_error,
    fit_temperature,
    flag_summary,
    reliability_table,
    share_below,
)
from core.evaluation.results import evaluate
from core.models.inference import predict_probabilities, view_logits
from core.models.networks import load_model
from core.models.preprocess import PhotoDataset, eval_transform, tta_views
from core.training.config import TrainConfig
from core.training.loop import train
from tests.conftest import make_abid_subset

PAGE = str(Path(__file__).resolve().parents[1] / "app_pages" / "evaluate.py")


def softmax(logits, axis=-1):
    shifted = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return shifted / shifted.sum(axis=axis, keepdims=True)


def test_ece_of_a_hand_made_example():
    probabilities = [[0.9, 0.1], [0.9, 0.1], [0.3, 0.7], [0.25, 0.75]]
    truth = [0, 1, 1, 1]
    # 15 bins: 0.9 (accuracy ½) → gap 0.4 for half the photos; 0.7 and 0.75 (correct) alone in their bins.
    assert expected_calibration_error(probabilities, truth) == pytest.approx(0.5 * 0.4 + 0.25 * 0.3 + 0.25 * 0.25)
    # 5 bins: 0.7 and 0.75 share (0.6, 0.8] with mean confidence 0.725 and accuracy 1.
    assert expected_calibration_error(probabilities, truth, bins=5) == pytest.approx(0.5 * 0.4 + 0.5 * 0.275)
    assert expected_calibration_error([[0.5, 0.5], [0.5, 0.5]], [0, 1]) == pytest.approx(0.0)
    assert expected_calibration_error([[0.8, 0.2]], [-1]) == pytest.approx(0.8)  # an unknown truth is never right


def test_reliability_table_counts_add_up_and_give_the_ece():
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(5) * 0.5, size=1000)
    truth = rng.integers(0, 5, size=1000)
    table = reliability_table(probabilities, truth, bins=15)
    assert list(table.columns) == ["bin_low", "bin_high", "confidence", "accuracy", "count"]
    assert len(table) == 15 and table["count"].sum() == 1000
    assert table["bin_low"].iloc[0] == 0 and table["bin_high"].iloc[-1] == 1
    filled = table[table["count"] > 0]
    assert ((filled["confidence"] > filled["bin_low"]) & (filled["confidence"] <= filled["bin_high"])).all()
    confidence = probabilities.max(axis=1)
    top = table.iloc[-1]
    inside = confidence > top["bin_low"]
    assert top["count"] == inside.sum()
    assert top["accuracy"] == pytest.approx((probabilities.argmax(1) == truth)[inside].mean())
    weighted = (filled["count"] * (filled["accuracy"] - filled["confidence"]).abs()).sum() / 1000
    assert expected_calibration_error(probabilities, truth) == pytest.approx(weighted)
    edges = reliability_table([[1.0, 0.0], [0.6, 0.4]], [0, 0], bins=5)
    assert list(edges["count"]) == [0, 0, 1, 0, 1]  # bins are (low, high]: 0.6 in (0.4, 0.6], 1.0 in the last


@pytest.mark.parametrize("views", [1, 3])
def test_fit_temperature_recovers_a_known_temperature(views):
    rng = np.random.default_rng(1)
    n, classes, true_temperature = 6000, 5, 2.5
    base = rng.normal(0, 4, size=(n, 1, classes))
    logits = base + rng.normal(0, 1, size=(n, views, classes))
    truth_probs = softmax(logits / true_temperature).mean(axis=1)
    labels = np.array([rng.choice(classes, p=p) for p in truth_probs])
    fitted = fit_temperature(logits if views > 1 else logits[:, 0], labels)
    assert fitted == pytest.approx(true_temperature, rel=0.08)
    assert calibrated_nll(logits, labels, fitted) <= calibrated_nll(logits, labels, 1.0)
    assert fit_temperature(np.zeros((0, views, classes)), np.zeros(0, dtype=int)) == 1.0


def test_flag_summary():
    summary = flag_summary([0.3, 0.5, 0.6, 0.9, 0.95], [False, True, True, True, True], threshold=0.6)
    assert summary == {"share_flagged": pytest.approx(0.4), "accuracy_flagged": pytest.approx(0.5),
                       "accuracy_rest": pytest.approx(1.0)}
    assert flag_summary([0.9], [True], 0.5)["accuracy_flagged"] is None


def split_view_logits(model, meta, paths) -> np.ndarray:
    """The model's per-view logits of these photos, computed here directly on the photos."""
    images = torch.stack([PhotoDataset(paths, transform=eval_transform(meta))[i][0] for i in range(len(paths))])
    with torch.inference_mode():
        return view_logits(model.eval(), images, tta_views(meta)).numpy()


def test_training_stores_a_temperature_fitted_on_valid_and_inference_uses_it(small_abid, tmp_path, capsys):
    out = tmp_path / "run"
    result = train(TrainConfig(data=str(small_abid), out=str(out), mode="frozen", epochs=2, image_size=96,
                               batch_size=16, num_workers=0, device="cpu", tta="hflip"))
    model, meta = load_model(out / "model.pt")
    temperature = meta["temperature"]
    assert temperature == result["temperature"] and temperature != pytest.approx(1.0, abs=1e-3)
    assert "calibration: temperature" in (out / "log.txt").read_text()

    ds = load_dataset(small_abid)
    valid = ds.rows("valid")
    index = {c: i for i, c in enumerate(meta["classes"])}
    labels = np.array([index[int(c)] for c in valid["cls"]])
    logits = split_view_logits(model, meta, list(valid["path"]))
    assert logits.shape[1] == 2  # hflip: two views
    assert fit_temperature(logits, labels) == pytest.approx(temperature, rel=1e-3)

    probs, errors, uncalibrated = predict_probabilities(model, meta, list(valid["path"]), device="cpu",
                                                        num_workers=0, with_uncalibrated=True)
    assert not errors
    assert np.allclose(probs, softmax(logits / temperature).mean(axis=1), atol=1e-5)
    assert np.allclose(uncalibrated, softmax(logits).mean(axis=1), atol=1e-5)
    assert not np.allclose(probs, uncalibrated, atol=1e-3)
    older, _ = predict_probabilities(model, {k: v for k, v in meta.items() if k != "temperature"},
                                     list(valid["path"]), device="cpu", num_workers=0)
    assert np.allclose(older, uncalibrated, atol=1e-6)  # models saved before calibration: temperature 1

    # the low-confidence flag's default: the least certain fifth of the valid photos, stored in model.pt
    confidence = probs.max(axis=1)
    threshold = calibrated_threshold(meta)
    assert threshold == pytest.approx(np.quantile(confidence, FLAG_SHARE), abs=1e-5)
    assert share_below(meta["valid_confidence_quantiles"], threshold) == pytest.approx(FLAG_SHARE, abs=0.01)
    assert share_below(meta["valid_confidence_quantiles"], 1.01) == 1.0
    assert calibrated_threshold({k: v for k, v in meta.items() if k != "low_confidence_threshold"}) == \
        LEGACY_THRESHOLD  # older model files still load, with the old default

    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("valid", "test"):
        assert 0 <= metrics[split]["ece"] <= 1 and 0 <= metrics[split]["ece_uncalibrated"] <= 1
    assert metrics["valid"]["ece"] == pytest.approx(expected_calibration_error(probs, labels), abs=1e-5)
    assert metrics["valid"]["ece_uncalibrated"] == pytest.approx(expected_calibration_error(uncalibrated, labels),
                                                                 abs=1e-5)

    assert main(["evaluate", "--model", str(out / "model.pt"), "--data", str(small_abid), "--split", "valid",
                 "--json", str(tmp_path / "eval.json")]) == 0
    printed = capsys.readouterr().out
    assert f"calibration (temperature {temperature:.3f}): ECE {metrics['valid']['ece_uncalibrated']:.3f} before, " \
           f"{metrics['valid']['ece']:.3f} after" in printed
    scores = json.loads((tmp_path / "eval.json").read_text())
    assert scores["ece"] == pytest.approx(metrics["valid"]["ece"], abs=1e-5)
    assert scores["ece_uncalibrated"] == pytest.approx(metrics["valid"]["ece_uncalibrated"], abs=1e-5)


def test_without_valid_photos_the_temperature_is_one(tmp_path):
    data = make_abid_subset(tmp_path / "tiny", per_class=2)  # two photos a class: all of them train
    out = tmp_path / "run"
    result = train(TrainConfig(data=str(data), out=str(out), mode="frozen", epochs=1, image_size=96, batch_size=4,
                               num_workers=0, device="cpu"))
    assert result["temperature"] == 1.0 and load_model(out / "model.pt")[1]["temperature"] == 1.0
    assert "no valid photos" in (out / "log.txt").read_text()


def test_evaluate_page_shows_the_reliability_diagram(shared, monkeypatch):
    from core import config

    at = AppTest.from_file(PAGE, default_timeout=120).run()
    run_id = at.selectbox(key="eval_run").value
    config.save_settings(low_confidence_thresholds={run_id: 0.9})  # as chosen for this model on the Predict page
    at.run()
    assert not at.exception and not at.error
    result = evaluate(shared["runs"][run_id] / "model.pt", shared["data"], split="test")
    metrics, predictions = result.metrics(), result.scored()
    charts = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    reliability = next(c for c in charts if any(t.get("name") == "perfectly calibrated" for t in c["data"]))
    bars = next(t for t in reliability["data"] if t["type"] == "bar")
    assert sum(row[3] for row in bars["customdata"]) == metrics["n"]
    shown = {m.label: m.value for m in at.metric}
    assert shown["Expected calibration error"] == f"{metrics['ece']:.3f}"
    share = float((predictions["confidence"] < 0.9).mean())
    assert shown["Flagged below 90% confidence"] == f"{share:.1%}"


def test_two_counts_within_a_few_points_are_a_toss_up():
    from core.models.inference import likely_counts

    assert likely_counts({1: 0.1, 2: 0.1, 3: 0.314, 4: 0.314, 5: 0.172}) == [3, 4]
    assert likely_counts({1: 0.05, 2: 0.05, 3: 0.2, 4: 0.62, 5: 0.08}) == [4]
