"""Evaluation results: one row per photo (truth, prediction, probabilities); metrics, cells and exports are views of it."""
from __future__ import annotations

import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from core.errors import BinsightError
from core.evaluation.calibration import expected_calibration_error, flag_summary, reliability_table
from core.evaluation.intervals import DEFAULT_RESAMPLES, bootstrap_intervals
from core.evaluation.predictions import PredictionStore, probability_columns
from core.evaluation.reports import (
    OVERALL_METRICS,
    confusion_matrix,
    per_class_entry,
    per_class_table,
    row_normalised,
    weakest_class,
)

SPLITS = ("test", "valid", "train", "all")
METADATA_COLUMNS = ["item_names", "n_items", "items_json"]


@dataclass
class EvaluationResult:
    """A model's predictions on labelled photos, one row per photo.

    `frame`: name, path, truth, predicted, correct, confidence, prob_<count>…, error, and the items'
    metadata when known. `problems`: photos the dataset index could not use, [{photo, reason}].
    """

    frame: pd.DataFrame
    classes: list[int]
    run: str = ""
    split: str = ""
    source: str = ""
    problems: list[dict] = field(default_factory=list)
    temperature: float = 1.0  # the model's fitted calibration temperature (1: none)

    def scored(self) -> pd.DataFrame:
        """The rows that count in the metrics: readable photos whose truth is one of the model's classes."""
        frame = self.frame
        return frame[frame["predicted"].notna() & frame["truth"].isin(self.classes) & frame["error"].isna()]

    def metrics(self) -> dict:
        """compute_metrics on the scored rows, plus how many photos were left out and why (`left_out`)."""
        from core.evaluation.metrics import compute_metrics

        rows = self.scored()
        probs = probability_columns(rows)
        probabilities = rows[probs].to_numpy(dtype=float) if len(probs) == len(self.classes) and len(rows) else None
        metrics = compute_metrics(rows["truth"].astype(int).to_numpy(), rows["predicted"].astype(int).to_numpy(),
                                  self.classes, probabilities=probabilities)
        raw = [f"raw_{c}" for c in self.classes]
        if len(rows) and all(c in rows for c in raw):  # the same photos' probabilities at temperature 1
            truth_index = [self.classes.index(int(t)) for t in rows["truth"]]
            metrics["ece_uncalibrated"] = expected_calibration_error(rows[raw].to_numpy(dtype=float), truth_index)
        metrics["temperature"] = self.temperature
        unreadable = int(self.frame["error"].notna().sum())
        metrics["left_out"] = {"unreadable": unreadable,
                               "outside_classes": int(len(self.frame) - len(rows) - unreadable)}
        return metrics

    def intervals(self, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict:
        """95 % intervals of metrics() by a seeded bootstrap over the scored photos (core.evaluation.intervals);
        computed once per result (the page, the export and the model card show the same)."""
        memo = self.__dict__.setdefault("_intervals", {})
        if (resamples, seed) in memo:
            return memo[(resamples, seed)]
        rows = self.scored()
        probs = probability_columns(rows)
        probabilities = rows[probs].to_numpy(dtype=float) if len(probs) == len(self.classes) and len(rows) else None
        memo[(resamples, seed)] = bootstrap_intervals(
            rows["truth"].astype(int).to_numpy(), rows["predicted"].astype(int).to_numpy(), self.classes,
            probabilities, resamples=resamples, seed=seed)
        return memo[(resamples, seed)]

    def calibration(self, threshold: float) -> dict:
        """Reliability over 15 confidence bins, the ECE, and what `threshold` flags as low confidence."""
        rows = self.scored()
        probs = rows[probability_columns(rows)].to_numpy(dtype=float)
        truth = [self.classes.index(int(t)) for t in rows["truth"]]
        confidence = probs.max(axis=1) if len(probs) else probs.reshape(0)
        return {"table": reliability_table(probs, truth), "ece": expected_calibration_error(probs, truth),
                "flags": flag_summary(confidence, rows["correct"].to_numpy(), threshold)}

    @property
    def skipped(self) -> list[dict]:
        """Photos left out because they cannot be read: the index's problems, then the photos failing to decode."""
        failed = self.frame[self.frame["error"].notna()]
        return list(self.problems) + [{"photo": name, "reason": error}
                                      for name, error in zip(failed["name"], failed["error"])]

    def cell(self, true: int, predicted: int) -> pd.DataFrame:
        """The photos of one confusion-matrix cell, the most confident first (likely label noise or hard bins)."""
        frame = self.frame
        cell = frame[(frame["truth"] == true) & (frame["predicted"] == predicted) & frame["error"].isna()]
        return cell.sort_values(["confidence", "name"], ascending=[False, True])

    def per_class(self) -> pd.DataFrame:
        """One row per class: precision, recall, F1 and support."""
        return per_class_table(self.metrics())

    def weakest_class(self) -> int | None:
        """The class with the lowest F1 among those with photos (ties: the lower recall)."""
        return weakest_class(self.per_class())

    def compare(self, others: dict[str, "EvaluationResult"]) -> pd.DataFrame:
        """This result's metrics (the baseline) next to others', with each other's delta to it.

        Columns: metric, better ('higher'/'lower'), one per result, then 'Δ <name>' for every other.
        """
        if not others:
            raise ValueError("comparing needs at least two runs")
        return _comparison_frame([(self.run or "baseline", self.metrics())]
                                + [(name, other.metrics()) for name, other in others.items()])

    # ------------------------------------------------------------ export

    def report(self) -> dict:
        metrics = self.metrics()
        table = per_class_table(metrics)
        return {
            "run": self.run, "split": self.split, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "n": metrics.get("n"), **{key: metrics.get(key) for key, _, _ in OVERALL_METRICS},
            "weakest_class": weakest_class(table),
            "per_class": table.to_dict(orient="records"),
            "classes": [int(c) for c in metrics["classes"]],
            "confusion_matrix": confusion_matrix(metrics).tolist(),
            "ece": metrics.get("ece"), "intervals": self.intervals(),
            "left_out": metrics.get("left_out", {}),
            "skipped": self.skipped,
        }

    def report_json(self) -> bytes:
        return json.dumps(self.report(), indent=2, default=_json_default).encode()

    def report_csv(self) -> bytes:
        """A tidy table: run, split, scope ('overall' or 'class N'), metric, value."""
        metrics = self.metrics()
        rows = [{"scope": "overall", "metric": key, "value": metrics.get(key)} for key, _, _ in OVERALL_METRICS]
        rows.append({"scope": "overall", "metric": "n", "value": metrics.get("n")})
        for record in per_class_table(metrics).to_dict(orient="records"):
            for metric in ("precision", "recall", "f1", "support"):
                rows.append({"scope": f"class {record['class']}", "metric": metric, "value": record[metric]})
        frame = pd.DataFrame(rows)
        frame.insert(0, "split", self.split)
        frame.insert(0, "run", self.run)
        return frame.to_csv(index=False).encode()

    def predictions_csv(self) -> bytes:
        frame = self.frame
        columns = [c for c in ["name", "truth", "predicted", "correct", "confidence"] if c in frame]
        columns += probability_columns(frame) + [c for c in ["item_names", "error", "path"] if c in frame]
        return frame[columns].to_csv(index=False).encode()

    def confusion_png(self, normalised: bool = False, title: str = "") -> bytes:
        """The confusion matrix as a PNG (matplotlib, no display needed)."""
        from matplotlib.figure import Figure

        classes = self.classes
        matrix = confusion_matrix(self.metrics())
        values = row_normalised(matrix) if normalised else matrix
        figure = Figure(figsize=(1.2 + 0.8 * len(classes), 1.0 + 0.8 * len(classes)), dpi=120)
        axes = figure.add_subplot()
        top = 1 if normalised else max(1, values.max())
        image = axes.imshow(values, cmap="Blues", vmin=0, vmax=top)
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
        labels = [str(c) for c in classes]
        axes.set_xticks(range(len(classes)), labels)
        axes.set_yticks(range(len(classes)), labels)
        axes.set_xlabel("predicted count")
        axes.set_ylabel("true count")
        axes.set_title(title or ("Confusion matrix (row-normalised)" if normalised else "Confusion matrix"))
        for i in range(len(classes)):
            for j in range(len(classes)):
                text = f"{values[i, j]:.2f}" if normalised else f"{int(values[i, j])}"
                axes.text(j, i, text, ha="center", va="center", fontsize=9,
                          color="white" if values[i, j] > top / 2 else "black")
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()


def _comparison_frame(named_metrics: list[tuple[str, dict]]) -> pd.DataFrame:
    # a run named like a fixed column, or like an earlier run, gets a suffix, so no column is overwritten
    reports: dict[str, dict] = {}
    for name, metrics in named_metrics:
        if name in ("metric", "better") or name.startswith("Δ "):
            name = f"{name} (run)"
        while name in reports:
            name = f"{name} (again)"
        reports[name] = metrics
    names = list(reports)
    classes = sorted({int(c) for metrics in reports.values() for c in metrics["classes"]})
    rows = [{"metric": label, "better": better, **{n: _number(reports[n].get(key)) for n in names}}
            for key, label, better in OVERALL_METRICS]
    for cls in classes:
        values = {}
        for name in names:
            known = cls in [int(c) for c in reports[name]["classes"]]
            values[name] = float(per_class_entry(reports[name], cls).get("f1", 0.0)) if known else np.nan
        rows.append({"metric": f"F1 class {cls}", "better": "higher", **values})
    frame = pd.DataFrame(rows)
    for name in names[1:]:
        frame[f"Δ {name}"] = frame[name] - frame[names[0]]
    return frame


def _number(value) -> float:
    return float(value) if value is not None else np.nan


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def with_truth(outputs: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The model's outputs with each photo's current label (and item metadata): joined at read time, so a
    corrected label shows at once without predicting again."""
    extra = rows[["name"] + [c for c in ["cls"] + METADATA_COLUMNS if c in rows]].rename(columns={"cls": "truth"})
    frame = outputs.merge(extra, on="name", how="inner")
    frame["truth"] = frame["truth"].astype("Int64")
    frame["predicted"] = frame["predicted"].astype("Int64")
    frame["correct"] = (frame["truth"] == frame["predicted"]).fillna(False).astype(bool)
    return frame


def score(model_path: str | Path, rows: pd.DataFrame, load_model: Callable[[], tuple], run: str = "",
          split: str = "", source: str = "", problems=(), on_progress=None) -> EvaluationResult:
    """The model's result on labelled `rows` (name, path, cls, metadata), predicting only what the prediction
    store does not hold yet. `load_model` gives (model, meta); `problems` are the index's [(photo, reason)]."""
    loaded = []

    def load() -> tuple:
        if not loaded:
            loaded.append(load_model())
        return loaded[0]

    _, meta = load()
    outputs = PredictionStore(model_path).predict(rows, load, on_progress)
    return EvaluationResult(with_truth(outputs, rows), [int(c) for c in meta["classes"]], run=run, split=split,
                            source=str(source), problems=[{"photo": p, "reason": r} for p, r in problems],
                            temperature=float(meta.get("temperature", 1.0)))


def evaluate(model_path, data, split: str = "test", on_progress=None) -> EvaluationResult:
    """The model's result on a labelled folder's split (the split training used).

    Photos are those of `split` whose count is one of the model's classes; photos that cannot be read
    (found by the index, or failing to decode now) are in `skipped` and left out of the metrics.
    """
    from core.data.classes import model_class_range
    from core.data.layouts.registry import load_dataset
    from core.models.networks import load_model

    if split not in SPLITS:
        raise BinsightError(f"unknown split {split!r}: choose one of {', '.join(SPLITS)}")
    model, meta = load_model(model_path)
    ds = load_dataset(data, class_range=model_class_range(meta))
    return score(model_path, ds.rows(split), lambda: (model, meta), run=Path(model_path).resolve().parent.name,
                 split=split, source=ds.source, problems=ds.problems, on_progress=on_progress)


def skipped_summary(skipped: list[dict]) -> str:
    """One line on the photos left out for being unreadable (empty when none): the CLI and the page say the same."""
    if not skipped:
        return ""
    reasons = "; ".join(f"{s['photo']}: {s['reason']}" for s in skipped[:3])
    return f"skipped {len(skipped)} photos that could not be read: {reasons}" + (" …" if len(skipped) > 3 else "")
