"""Counting metrics: accuracy, balanced accuracy, macro-F1, per-class table, confusion matrix, MAE, off-by-one."""
from __future__ import annotations

import numpy as np
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from core.evaluation.calibration import expected_calibration_error


def compute_metrics(y_true, y_pred, classes, probabilities=None) -> dict:
    """Metrics of predicted counts against true counts (both given as counts, i.e. values of `classes`).

    Balanced accuracy is the mean recall over the classes present in y_true, macro-F1 the mean F1 over the
    classes in y_true or y_pred; MAE and off-by-one are in
    objects. With `probabilities` (n × len(classes)), the mean log loss, mean confidence and expected calibration
    error (ECE, 15 bins; a truth outside `classes` counts as wrong) are added.
    """
    classes = [int(c) for c in classes]
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    n = int(len(y_true))
    result = {"classes": classes, "n": n}
    if n == 0:
        empty = {str(c): {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0} for c in classes}
        return result | {"accuracy": None, "balanced_accuracy": None, "macro_f1": None, "mae": None,
                         "off_by_one": None, "per_class": empty,
                         "confusion_matrix": [[0] * len(classes) for _ in classes]}
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=classes, zero_division=0)
    present = support > 0
    seen = present | np.isin(classes, y_pred)  # macro-F1 over the classes that occur, as scikit-learn does by default
    error = np.abs(y_true - y_pred)
    result.update({
        "accuracy": float((y_true == y_pred).mean()),
        "balanced_accuracy": float(recall[present].mean()),
        "macro_f1": float(f1[seen].mean()),
        "mae": float(error.mean()),
        "off_by_one": float((error <= 1).mean()),
        "per_class": {str(c): {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for c, p, r, f, s in zip(classes, precision, recall, f1, support)},
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=classes).tolist(),
    })
    if probabilities is not None:
        probs = np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)
        index = {c: i for i, c in enumerate(classes)}
        columns = np.array([index.get(int(t), -1) for t in y_true])
        known = columns >= 0
        if known.any():
            result["log_loss"] = float(-np.log(probs[np.flatnonzero(known), columns[known]]).mean())
        result["mean_confidence"] = float(probs.max(axis=1).mean())
        result["ece"] = expected_calibration_error(probs, columns)
    return result


def format_table(metrics: dict) -> str:
    """The headline figures and the per-class table as plain text (for the CLI and logs)."""
    if not metrics.get("n"):
        return "no photos scored"
    lines = [
        f"photos {metrics['n']}   accuracy {metrics['accuracy']:.1%}   balanced accuracy "
        f"{metrics['balanced_accuracy']:.1%}   macro-F1 {metrics['macro_f1']:.3f}   MAE {metrics['mae']:.3f}   "
        f"off-by-one {metrics['off_by_one']:.1%}",
        f"{'count':>5}  {'precision':>9}  {'recall':>6}  {'f1':>5}  {'support':>7}",
    ]
    for count, row in metrics["per_class"].items():
        lines.append(f"{count:>5}  {row['precision']:>9.3f}  {row['recall']:>6.3f}  {row['f1']:>5.3f}  {row['support']:>7}")
    return "\n".join(lines)
