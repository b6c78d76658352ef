"""Scoring a saved model on a labelled folder's split (the same split training used)."""
from __future__ import annotations

import pandas as pd

from core.data.classes import model_class_range
from core.errors import BinsightError
from core.evaluation.calibration import expected_calibration_error
from core.evaluation.metrics import compute_metrics
from core.models.inference import predict_probabilities, predictions_frame
from core.models.networks import load_model

SPLITS = ("test", "valid", "train", "all")


def evaluate(model_path, data_dir, split: str = "test", on_progress=None, batch_size: int = 32,
             device=None) -> tuple[dict, pd.DataFrame]:
    """(metrics incl. n and skipped [{photo, reason}], predictions: photo, path, truth, predicted, confidence, prob_*).

    Photos are those of `split` whose count is one of the model's classes; photos that cannot be read
    (found by the index, or failing to decode now) are listed in skipped and left out of the metrics.
    """
    from core.data.loading import load_dataset

    if split not in SPLITS:
        raise BinsightError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    model, meta = load_model(model_path)
    ds = load_dataset(data_dir, class_range=model_class_range(meta))
    rows = ds.rows(split)
    paths = [str(p) for p in rows["path"]]
    probs, errors, uncalibrated = predict_probabilities(model, meta, paths, batch_size, device,
                                                        on_progress=on_progress, with_uncalibrated=True)
    predictions = predictions_frame(paths, probs, errors, meta["classes"])
    predictions.insert(2, "truth", pd.array(rows["cls"].astype(int).to_list(), dtype="Int64"))
    predictions["photo"] = list(rows["name"])
    skipped = [{"photo": name, "reason": reason} for name, reason in ds.problems]
    failed = predictions["error"].notna()
    skipped += [{"photo": p, "reason": e} for p, e in zip(predictions.loc[failed, "photo"], predictions.loc[failed, "error"])]
    scored = predictions[~failed]
    prob_columns = [f"prob_{c}" for c in meta["classes"]]
    metrics = compute_metrics(scored["truth"].astype(int), scored["predicted"].astype(int), meta["classes"],
                              scored[prob_columns].to_numpy() if len(scored) else None)
    if len(scored):
        index = {c: i for i, c in enumerate(meta["classes"])}
        truth_index = [index.get(int(t), -1) for t in scored["truth"]]
        metrics["ece_uncalibrated"] = expected_calibration_error(uncalibrated[scored.index], truth_index)
    metrics |= {"split": split, "skipped": skipped, "model": str(model_path), "data": str(ds.source),
                "temperature": float(meta.get("temperature", 1.0))}
    return metrics, predictions
