"""Evaluation reports: cached predictions per run and split, confusion cells, run comparisons, CSV/JSON/PNG export."""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from core import config, storage
from core.files import atomic_write_bytes

PREDICTIONS_VERSION = 1
OVERALL_METRICS = [
    ("accuracy", "Accuracy", "higher"),
    ("balanced_accuracy", "Balanced accuracy", "higher"),
    ("macro_f1", "Macro F1", "higher"),
    ("mae", "MAE (objects)", "lower"),
    ("off_by_one", "Off-by-one accuracy", "higher"),
]
METADATA_COLUMNS = ["item_names", "n_items", "items_json"]


# ---------------------------------------------------------------- predictions cache

def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:60] or "x"


def run_fingerprint(run_dir: str | Path) -> str:
    """Changes when the run's model file is replaced (retrained into the same folder)."""
    run_dir = Path(run_dir).resolve()
    stat = (run_dir / "model.pt").stat()
    return hashlib.sha1(f"{run_dir}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def photos_fingerprint(rows: pd.DataFrame) -> str:
    """The version of the photos a prediction saw: names, paths, sizes and modification times."""
    digest = hashlib.sha1(f"v{PREDICTIONS_VERSION}".encode())
    for name, path in zip(rows["name"], rows["path"]):
        try:
            stat = os.stat(path)
            stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
        except (OSError, TypeError):
            stamp = "-"
        digest.update(f"{name}\0{path}\0{stamp}\n".encode())
    return digest.hexdigest()[:16]


def predictions_path(run_dir: str | Path, split: str, rows: pd.DataFrame) -> Path:
    """Where the predictions of this run on these photos live: keyed by run, split and dataset version."""
    run_dir = Path(run_dir)
    folder = config.home() / "predictions" / f"{_slug(run_dir.name)}-{run_fingerprint(run_dir)}"
    return folder / f"{_slug(split)}-{photos_fingerprint(rows)}.parquet"


def _default_loader(run_dir: Path):
    from core.models.networks import load_model

    return lambda: load_model(run_dir / "model.pt")


def cached_predictions(run_dir: str | Path, rows: pd.DataFrame, split: str,
                       load: Callable[[], tuple] | None = None,
                       on_progress: Callable[[dict], None] | None = None,
                       batch_size: int = 32) -> pd.DataFrame:
    """One row per photo of `rows` (name, path, cls, metadata): the run's prediction next to the truth.

    The model's outputs are computed once and stored as parquet; later calls only read them. The truth is
    joined on every call, so a corrected label shows at once without predicting again.
    """
    run_dir = Path(run_dir)
    rows = rows[rows["path"].notna()].reset_index(drop=True)
    path = predictions_path(run_dir, split, rows)
    try:
        outputs = pd.read_parquet(path)
        storage.touch(path)  # used: the least recently used predictions go first when the cache is over its cap
    except (OSError, ValueError):
        outputs = None
    if outputs is None:
        outputs = _predict(run_dir, rows, load, on_progress, batch_size)
        atomic_write_bytes(path, outputs.to_parquet(index=False))
        storage.prune_after_write("predictions")
    return _with_truth(outputs, rows)


def _predict(run_dir: Path, rows: pd.DataFrame, load, on_progress, batch_size: int) -> pd.DataFrame:
    from core.models.inference import predict_photos

    model, meta = (load or _default_loader(run_dir))()
    if rows.empty:
        classes = [int(c) for c in meta["classes"]]
        return pd.DataFrame(columns=["name", "path", "predicted", "confidence", "error"] + [f"prob_{c}" for c in classes])
    frame = predict_photos(model, meta, list(rows["path"]), batch_size=batch_size, on_progress=on_progress)
    if len(frame) != len(rows):
        raise RuntimeError(f"predict_photos returned {len(frame)} rows for {len(rows)} photos")
    frame = frame.reset_index(drop=True).drop(columns=["photo"], errors="ignore")
    frame.insert(0, "name", rows["name"].to_numpy())
    frame["path"] = rows["path"].to_numpy()
    return frame


def _with_truth(outputs: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    extra = rows[["name"] + [c for c in ["cls"] + METADATA_COLUMNS if c in rows]].rename(columns={"cls": "truth"})
    frame = outputs.merge(extra, on="name", how="inner")
    frame["truth"] = frame["truth"].astype("Int64")
    frame["predicted"] = frame["predicted"].astype("Int64")
    frame["correct"] = (frame["truth"] == frame["predicted"]).fillna(False).astype(bool)
    return frame


def probability_columns(frame: pd.DataFrame) -> list[str]:
    return sorted((c for c in frame.columns if c.startswith("prob_")), key=lambda c: int(c.split("_", 1)[1]))


# ---------------------------------------------------------------- metrics and confusion cells

def scored(predictions: pd.DataFrame, classes: list[int]) -> pd.DataFrame:
    """The predictions that count in the metrics: readable photos whose truth is one of the model's classes."""
    ok = predictions["predicted"].notna() & predictions["truth"].isin(classes)
    if "error" in predictions:
        ok &= predictions["error"].isna()
    return predictions[ok]


def report_metrics(predictions: pd.DataFrame, classes: list[int]) -> dict:
    """compute_metrics on the scored predictions, plus how many photos were left out and why."""
    from core.evaluation.metrics import compute_metrics

    rows = scored(predictions, classes)
    probs = probability_columns(rows)
    probabilities = rows[probs].to_numpy(dtype=float) if len(probs) == len(classes) else None
    metrics = compute_metrics(rows["truth"].astype(int).to_numpy(), rows["predicted"].astype(int).to_numpy(),
                              classes, probabilities=probabilities)
    unreadable = int(predictions["error"].notna().sum()) if "error" in predictions else 0
    metrics["left_out"] = {"unreadable": unreadable,
                           "outside_classes": int(len(predictions) - len(rows) - unreadable)}
    return metrics


def _per_class_entry(metrics: dict, cls: int) -> dict:
    per_class = metrics.get("per_class", {})
    return per_class.get(cls) or per_class.get(str(cls)) or {}


def per_class_table(metrics: dict) -> pd.DataFrame:
    """One row per class: precision, recall, F1 and support."""
    rows = []
    for cls in metrics["classes"]:
        entry = _per_class_entry(metrics, cls)
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


def confusion_cell(predictions: pd.DataFrame, true: int, predicted: int) -> pd.DataFrame:
    """The photos of one confusion-matrix cell, the most confident first (likely label noise or hard bins)."""
    cell = predictions[(predictions["truth"] == true) & (predictions["predicted"] == predicted)]
    if "error" in cell:
        cell = cell[cell["error"].isna()]
    return cell.sort_values(["confidence", "name"], ascending=[False, True])


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


# ---------------------------------------------------------------- run comparison

def comparison_frame(reports: dict[str, dict]) -> pd.DataFrame:
    """Metrics of 2+ runs side by side (the first is the baseline) with each other run's delta to it.

    Columns: metric, better ('higher'/'lower'), one per run, then 'Δ <run>' for every run after the first.
    """
    if len(reports) < 2:
        raise ValueError("comparing needs at least two runs")
    # a run named like a fixed column gets a suffix, so no column is overwritten
    reports = {(f"{name} (run)" if name in ("metric", "better") or name.startswith("Δ ") else name): metrics
               for name, metrics in reports.items()}
    names = list(reports)
    classes = sorted({int(c) for metrics in reports.values() for c in metrics["classes"]})
    rows = []
    for key, label, better in OVERALL_METRICS:
        rows.append({"metric": label, "better": better, **{n: _number(reports[n].get(key)) for n in names}})
    for cls in classes:
        values = {}
        for name in names:
            known = cls in [int(c) for c in reports[name]["classes"]]
            values[name] = float(_per_class_entry(reports[name], cls).get("f1", 0.0)) if known else np.nan
        rows.append({"metric": f"F1 class {cls}", "better": "higher", **values})
    frame = pd.DataFrame(rows)
    for name in names[1:]:
        frame[f"Δ {name}"] = frame[name] - frame[names[0]]
    return frame


def _number(value) -> float:
    return float(value) if value is not None else np.nan


def delta_direction(delta: float, better: str) -> int:
    """+1 when the delta is an improvement, -1 a regression, 0 no change (or unknown)."""
    if delta is None or pd.isna(delta) or abs(delta) < 1e-12:
        return 0
    return 1 if (delta > 0) == (better == "higher") else -1


# ---------------------------------------------------------------- export

def report_dict(metrics: dict, run: str, split: str) -> dict:
    table = per_class_table(metrics)
    return {
        "run": run, "split": split, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "n": metrics.get("n"), **{key: metrics.get(key) for key, _, _ in OVERALL_METRICS},
        "weakest_class": weakest_class(table),
        "per_class": table.to_dict(orient="records"),
        "classes": [int(c) for c in metrics["classes"]],
        "confusion_matrix": confusion_matrix(metrics).tolist(),
        "left_out": metrics.get("left_out", {}),
    }


def report_json(metrics: dict, run: str, split: str) -> bytes:
    return json.dumps(report_dict(metrics, run, split), indent=2, default=_json_default).encode()


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def report_csv(metrics: dict, run: str, split: str) -> bytes:
    """A tidy table: run, split, scope ('overall' or 'class N'), metric, value."""
    rows = [{"scope": "overall", "metric": key, "value": metrics.get(key)} for key, _, _ in OVERALL_METRICS]
    rows.append({"scope": "overall", "metric": "n", "value": metrics.get("n")})
    for record in per_class_table(metrics).to_dict(orient="records"):
        for metric in ("precision", "recall", "f1", "support"):
            rows.append({"scope": f"class {record['class']}", "metric": metric, "value": record[metric]})
    frame = pd.DataFrame(rows)
    frame.insert(0, "split", split)
    frame.insert(0, "run", run)
    return frame.to_csv(index=False).encode()


def predictions_csv(predictions: pd.DataFrame) -> bytes:
    columns = [c for c in ["name", "truth", "predicted", "correct", "confidence"] if c in predictions]
    columns += probability_columns(predictions) + [c for c in ["item_names", "error", "path"] if c in predictions]
    return predictions[columns].to_csv(index=False).encode()


def confusion_png(matrix: np.ndarray, classes: list, normalised: bool = False, title: str = "") -> bytes:
    """The confusion matrix as a PNG (matplotlib, no display needed)."""
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix)
    values = row_normalised(matrix) if normalised else matrix
    figure = Figure(figsize=(1.2 + 0.8 * len(classes), 1.0 + 0.8 * len(classes)), dpi=120)
    axes = figure.add_subplot()
    image = axes.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalised else max(1, values.max()))
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    labels = [str(c) for c in classes]
    axes.set_xticks(range(len(classes)), labels)
    axes.set_yticks(range(len(classes)), labels)
    axes.set_xlabel("predicted count")
    axes.set_ylabel("true count")
    axes.set_title(title or ("Confusion matrix (row-normalised)" if normalised else "Confusion matrix"))
    threshold = (1 if normalised else max(1, values.max())) / 2
    for i in range(len(classes)):
        for j in range(len(classes)):
            text = f"{values[i, j]:.2f}" if normalised else f"{int(values[i, j])}"
            axes.text(j, i, text, ha="center", va="center", fontsize=9,
                      color="white" if values[i, j] > threshold else "black")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
