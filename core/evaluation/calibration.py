"""Confidence calibration: temperature scaling fitted on the valid split, expected calibration error, reliability."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, logsumexp

# Temperatures searched (log-uniformly); far outside this range a model's confidence carries no information.
TEMPERATURE_RANGE = (0.05, 20.0)
# The low-confidence flag's default: the least certain fifth of the valid split, so it picks out photos to look at.
FLAG_SHARE = 0.2
# Models trained before the calibrated threshold was stored in model.pt fall back to this one.
LEGACY_THRESHOLD = 0.6


def _per_view(logits_per_view) -> np.ndarray:
    """Logits as n × views × classes float64 (a plain n × classes array is one view)."""
    logits = np.asarray(logits_per_view, dtype=np.float64)
    return logits[:, None, :] if logits.ndim == 2 else logits


def calibrated_nll(logits_per_view, labels, temperature: float) -> float:
    """Mean negative log-likelihood of the labels under mean_v softmax(z_v / T), the model's final probabilities."""
    logits = _per_view(logits_per_view)
    labels = np.asarray(labels, dtype=np.int64)
    # log mean_v softmax(z_v / T), computed in log space so confident wrong answers do not overflow.
    log_probs = logsumexp(log_softmax(logits / temperature, axis=2), axis=1) - math.log(logits.shape[1])
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits_per_view, labels) -> float:
    """The temperature T > 0 minimising the NLL of mean_v softmax(z_v / T) on these labels (1 without photos).

    `logits_per_view` is n × views × classes (or n × classes for one view); `labels` are class indices.
    """
    logits = _per_view(logits_per_view)
    if len(logits) == 0:
        return 1.0
    low, high = (math.log(t) for t in TEMPERATURE_RANGE)
    found = minimize_scalar(lambda log_t: calibrated_nll(logits, labels, math.exp(log_t)),
                            bounds=(low, high), method="bounded", options={"xatol": 1e-6})
    return float(math.exp(found.x))


def _confidence_and_correct(probabilities, truth_index) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probabilities, dtype=np.float64).reshape(len(truth_index), -1)
    truth = np.asarray(truth_index, dtype=np.int64)
    return probs.max(axis=1), probs.argmax(axis=1) == truth


def reliability_table(probabilities, truth_index, bins: int = 15) -> pd.DataFrame:
    """Per equal-width confidence bin (low, high]: mean confidence, accuracy and photo count (NaN when empty).

    Confidence is the top class probability; a photo is correct when that class is its truth
    (a truth index outside the columns, e.g. -1, is never correct).
    """
    confidence, correct = _confidence_and_correct(probabilities, truth_index)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        inside = which == b
        count = int(inside.sum())
        rows.append({"bin_low": edges[b], "bin_high": edges[b + 1],
                     "confidence": float(confidence[inside].mean()) if count else np.nan,
                     "accuracy": float(correct[inside].mean()) if count else np.nan,
                     "count": count})
    return pd.DataFrame(rows, columns=["bin_low", "bin_high", "confidence", "accuracy", "count"])


def expected_calibration_error(probabilities, truth_index, bins: int = 15) -> float:
    """ECE: over equal-width confidence bins, the photo-weighted mean of |accuracy − mean confidence|."""
    table = reliability_table(probabilities, truth_index, bins)
    total = table["count"].sum()
    if total == 0:
        return float("nan")
    filled = table[table["count"] > 0]
    return float((filled["count"] * (filled["accuracy"] - filled["confidence"]).abs()).sum() / total)


def flag_summary(confidence, correct, threshold: float) -> dict:
    """What a low-confidence threshold flags: the share of photos below it, their accuracy and the others'.

    An accuracy is None when its group is empty.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    flagged = confidence < threshold

    def accuracy(group):
        return float(correct[group].mean()) if group.any() else None

    return {"share_flagged": float(flagged.mean()) if len(flagged) else 0.0,
            "accuracy_flagged": accuracy(flagged), "accuracy_rest": accuracy(~flagged)}


def flag_threshold(confidence, share: float = FLAG_SHARE) -> float:
    """The confidence below which `share` of these photos fall (the LEGACY_THRESHOLD without photos)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    return float(np.quantile(confidence, share)) if len(confidence) else LEGACY_THRESHOLD


def confidence_quantiles(confidence, points: int = 101) -> list[float]:
    """`points` evenly spaced quantiles of these confidences: enough to tell the share below any threshold."""
    confidence = np.asarray(confidence, dtype=np.float64)
    return [round(float(q), 5) for q in np.quantile(confidence, np.linspace(0, 1, points))] if len(confidence) else []


def share_below(quantiles: list[float], threshold: float) -> float | None:
    """The share of the photos summarised by `quantiles` (confidence_quantiles) below `threshold`; None without."""
    if not quantiles:
        return None
    levels = np.linspace(0, 1, len(quantiles))
    values = np.asarray(quantiles, dtype=np.float64)
    if threshold <= values[0]:
        return 0.0
    if threshold > values[-1]:
        return 1.0
    return float(np.interp(threshold, values, levels))


def calibrated_threshold(meta: dict) -> float:
    """The model's default low-confidence threshold: stored at training end, LEGACY_THRESHOLD for older models."""
    value = meta.get("low_confidence_threshold")
    return float(value) if isinstance(value, (int, float)) else LEGACY_THRESHOLD


def chosen_threshold(meta: dict, model_name: str) -> float:
    """The low-confidence threshold in use for a model: the one a user set for it (Predict page), else its own."""
    from core import config

    chosen = (config.load_settings().get("low_confidence_thresholds") or {}).get(model_name)
    return float(chosen) if isinstance(chosen, (int, float)) else calibrated_threshold(meta)


def save_chosen_threshold(model_name: str, threshold: float | None) -> None:
    """Remember the threshold a user chose for a model (None: back to the model's own)."""
    from core import config

    chosen = dict(config.load_settings().get("low_confidence_thresholds") or {})
    if threshold is None:
        chosen.pop(model_name, None)
    else:
        chosen[model_name] = float(threshold)
    config.save_settings(low_confidence_thresholds=chosen)
