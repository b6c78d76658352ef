"""Pure tables of evaluation reports: the headline metrics, per-class table, confusion views, comparison deltas."""
from __future__ import annotations

import numpy as np
import pandas as pd

OVERALL_METRICS = [
    ("accuracy", "Accuracy", "higher"),
    ("balanced_accuracy", "Balanced accuracy", "higher"),
    ("macro_f1", "Macro F1", "higher"),
    ("mae", "MAE (objects)", "lower"),
    ("off_by_one", "Off-by-one accuracy", "higher"),
]


def per_class_entry(metrics: dict, cls: int) -> dict:
    """One class's entry of metrics['per_class'] (keyed by int or str), {} when absent."""
    per_class = metrics.get("per_class", {})
    return per_class.get(cls) or per_class.get(str(cls)) or {}


def per_class_table(metrics: dict) -> pd.DataFrame:
    """One row per class: precision, recall, F1 and support."""
    rows = []
    for cls in metrics["classes"]:
        entry = per_class_entry(metrics, cls)
        rows.append({"class": int(cls), "precision": float(entry.get("precision", 0.0)),
                     "recall": float(entry.get("recall", 0.0)), "f1": float(entry.get("f1", 0.0)),
                     "support": int(entry.get("support", 0))})
    return pd.DataFrame(rows, columns=["class", "precision", "recall", "f1", "support"])


def weakest_class(table: pd.DataFrame) -> int | None:
    """The class with the lowest F1 among those with photos (ties: the lower recall)."""
    present = table[table["support"] > 0]
    if present.empty:
        return None
    return int(present.sort_values(["f1", "recall", "class"]).iloc[0]["class"])


def confusion_matrix(metrics: dict) -> np.ndarray:
    """Rows are the true classes, columns the predicted ones, in `metrics['classes']` order."""
    return np.asarray(metrics["confusion_matrix"], dtype=int)


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Each row divided by its total (the recall view); an empty row stays zero."""
    totals = matrix.sum(axis=1, keepdims=True)
    return np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=float), where=totals > 0)


def cell_from_selection(event) -> tuple[int, int] | None:
    """(true, predicted) of the cell clicked in the confusion chart's selection event, or None.

    The chart's clickable markers carry [true, predicted] as customdata; x is the predicted and y the true count.
    """
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return None
    for point in points or []:
        custom = point.get("customdata")
        try:
            if custom is not None and len(custom) == 2:
                return int(custom[0]), int(custom[1])
            return int(point["y"]), int(point["x"])
        except (KeyError, TypeError, ValueError):
            continue
    return None


def delta_direction(delta: float, better: str) -> int:
    """+1 when the delta is an improvement, -1 a regression, 0 no change (or unknown)."""
    if delta is None or pd.isna(delta) or abs(delta) < 1e-12:
        return 0
    return 1 if (delta > 0) == (better == "higher") else -1
