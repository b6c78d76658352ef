"""95 % intervals of the counting metrics by a seeded bootstrap over photos (all resamples at once, from confusions)."""
from __future__ import annotations

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
OVERALL = ("accuracy", "balanced_accuracy", "macro_f1", "mae", "off_by_one", "ece")
PER_CLASS = ("precision", "recall", "f1")
ECE_BINS = 15  # as core.evaluation.calibration
PERCENT_METRICS = {"accuracy", "balanced_accuracy", "off_by_one", "precision", "recall"}  # shares of photos


def _ratio(top: np.ndarray, bottom: np.ndarray) -> np.ndarray:
    return np.divide(top, bottom, out=np.zeros(np.broadcast(top, bottom).shape), where=bottom > 0)


def _from_confusions(confusions: np.ndarray, classes: list[int]) -> dict[str, np.ndarray]:
    """Each metric of compute_metrics for every confusion matrix of a stack (resamples × true × predicted)."""
    total = confusions.sum((1, 2))
    diagonal = np.diagonal(confusions, axis1=1, axis2=2)
    support = confusions.sum(2)
    predicted = confusions.sum(1)
    recall = _ratio(diagonal, support)
    precision = _ratio(diagonal, predicted)
    f1 = _ratio(2 * precision * recall, precision + recall)
    present = support > 0
    seen = present | (predicted > 0)
    distance = np.abs(np.subtract.outer(classes, classes)).astype(float)
    return {
        "accuracy": _ratio(diagonal.sum(1), total),
        "balanced_accuracy": _ratio((recall * present).sum(1), present.sum(1)),
        "macro_f1": _ratio((f1 * seen).sum(1), seen.sum(1)),
        "mae": _ratio((confusions * distance).sum((1, 2)), total),
        "off_by_one": _ratio((confusions * (distance <= 1)).sum((1, 2)), total),
        "precision": precision, "recall": recall, "f1": f1,
    }


def _ece(weights: np.ndarray, probabilities: np.ndarray, truth_index: np.ndarray) -> np.ndarray:
    """ECE (15 equal-width confidence bins) of each resample given as photo weights (resamples × photos)."""
    confidence = probabilities.max(1)
    correct = (probabilities.argmax(1) == truth_index).astype(float)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, ECE_BINS - 1)
    in_bin = np.eye(ECE_BINS)[which]  # photos × bins
    gap = weights @ (in_bin * correct[:, None]) - weights @ (in_bin * confidence[:, None])
    return np.abs(gap).sum(1) / weights.sum(1)


def bootstrap_intervals(truth, predicted, classes, probabilities=None, resamples: int = DEFAULT_RESAMPLES,
                        seed: int = 0, level: float = DEFAULT_LEVEL) -> dict:
    """Percentile intervals of the metrics of compute_metrics when the photos are drawn again with replacement.

    truth and predicted are counts (values of `classes`); probabilities (n × classes) add the ECE.
    {"level", "resamples", "seed", "n", "overall": {metric: [low, high]}, "per_class": {count: {metric: [low, high]}}}
    """
    classes = [int(c) for c in classes]
    index = {c: i for i, c in enumerate(classes)}
    truth_index = np.array([index.get(int(t), -1) for t in truth], dtype=int)
    predicted_index = np.array([index.get(int(p), -1) for p in predicted], dtype=int)
    known = (truth_index >= 0) & (predicted_index >= 0)
    n, k = len(truth_index), len(classes)
    found = {"level": level, "resamples": resamples, "seed": seed, "n": int(n), "overall": {}, "per_class": {}}
    if n == 0:
        return found
    # Each resample is a multinomial draw of how many times each photo is picked: the confusion of every resample
    # is then one matrix product, instead of `resamples` calls of scikit-learn.
    weights = np.random.default_rng(seed).multinomial(n, np.full(n, 1.0 / n), size=resamples).astype(float)
    cell = np.eye(k * k)[truth_index[known] * k + predicted_index[known]]
    confusions = (weights[:, known] @ cell).reshape(resamples, k, k)
    values = _from_confusions(confusions, classes)
    if probabilities is not None:
        values["ece"] = _ece(weights, np.asarray(probabilities, dtype=float), truth_index)
    tails = 100 * (1 - level) / 2
    low_high = {name: np.percentile(v, [tails, 100 - tails], axis=0) for name, v in values.items()}
    for name in OVERALL:
        if name in low_high:
            found["overall"][name] = [float(low_high[name][0]), float(low_high[name][1])]
    for i, c in enumerate(classes):
        found["per_class"][str(c)] = {name: [float(low_high[name][0][i]), float(low_high[name][1][i])]
                                      for name in PER_CLASS}
    return found


def interval_text(interval, percent: bool = True) -> str:
    """"41.2–47.9 %" (or "0.512–0.604"), the way pages and the CLI write an interval; "—" when there is none."""
    if not interval:
        return "—"
    low, high = interval
    return f"{low:.1%}–{high:.1%}".replace("%–", "–") if percent else f"{low:.3f}–{high:.3f}"
