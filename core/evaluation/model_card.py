"""A run's model card in Markdown: data and version, recipe, per-count metrics with 95 % intervals, calibration,
confusion and known limits, from the run's files and (when given) an evaluation on labelled photos."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from core.evaluation.intervals import PERCENT_METRICS, bootstrap_intervals, interval_text
from core.evaluation.reports import OVERALL_METRICS, confusion_matrix, per_class_table, weakest_class

RECIPE_KEYS = ("mode", "epochs", "batch_size", "lr", "optimizer", "schedule", "weight_decay", "loss", "balance",
               "label_smoothing", "augment", "image_size", "aspect", "tta", "patience", "seed", "exclude_suspects")
PERCENT = PERCENT_METRICS - {"precision", "recall"}  # shares of all photos; F1, MAE and ECE are written 0.xxx


def read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def pairs_from_confusion(matrix, classes) -> tuple[np.ndarray, np.ndarray]:
    """(truth, predicted) of the photos a confusion matrix counts: enough to bootstrap every metric but the ECE."""
    matrix = np.asarray(matrix, dtype=int)
    classes = np.asarray(classes, dtype=int)
    truth = np.repeat(np.repeat(classes, len(classes)), matrix.ravel())
    predicted = np.repeat(np.tile(classes, len(classes)), matrix.ravel())
    return truth, predicted


def _value(name: str, value) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    return f"{value:.1%}" if name in PERCENT else f"{value:.3f}"


def _interval(name: str, intervals: dict | None, scope: str = "overall", count: str | None = None) -> str:
    if not intervals:
        return "—"
    found = intervals.get(scope, {})
    found = found.get(count, {}) if count is not None else found
    return interval_text(found.get(name), percent=name in PERCENT)


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]


def model_card(meta: dict, metrics: dict, *, run: str = "", recipe: dict | None = None, scope: str = "the test split",
               intervals: dict | None = None, model_id: str = "") -> str:
    """The card as Markdown. `metrics` is compute_metrics' dict (with ece / ece_uncalibrated when known), `recipe`
    the run's config.json, `intervals` bootstrap_intervals' dict."""
    recipe = recipe or {}
    classes = [int(c) for c in metrics.get("classes") or meta.get("classes", [])]
    level = f"{(intervals or {}).get('level', 0.95):.0%}"
    lines = [f"# Model card: {run or 'Binsight model'}", "",
             f"*Written {time.strftime('%Y-%m-%d %H:%M')} by Binsight from the run's files and its results on {scope} "
             f"({metrics.get('n') or 0:,} photos).*", "", "## Model", ""]
    features = meta.get("features") or "pooled"
    weights = "ImageNet weights" if str(meta.get("weights", "")) not in ("", "scratch") else "trained from scratch"
    lines += _table(["", ""], [
        ["backbone", f"{meta.get('backbone', '?')} ({weights}), {features} features, "
                     f"{meta.get('head', 'linear')} head"],
        ["input", f"{' × '.join(map(str, meta.get('input_size') or [meta.get('image_size', '?')]))} px, the whole "
                  f"photo resized ({meta.get('resize', 'squash')}); test-time views: {meta.get('tta') or 'none'}"],
        ["counts it predicts", ", ".join(map(str, classes))],
        ["calibration", f"temperature {float(meta.get('temperature', 1.0)):.3f} (fitted on the validation split)"],
        ["model file", model_id or "—"]])
    lines += ["", "## Data", ""]
    lines += _table(["", ""], [
        ["dataset", f"`{recipe.get('dataset') or recipe.get('data') or '?'}` (key {recipe.get('dataset_key', '?')})"],
        ["labels", "the recorded count of each bin (ABID's EXPECTED_QUANTITY), with annotators' corrections"],
        ["likely wrong counts left out of training", str(recipe.get("suspects_excluded", 0))],
        ["scored on", f"{scope}: {metrics.get('n') or 0:,} photos"]])
    lines += ["", "## Training recipe", ""]
    lines += _table(["setting", "value"], [[key, recipe[key]] for key in RECIPE_KEYS if recipe.get(key) is not None])
    lines += ["", f"## Results ({level} intervals: bootstrap over photos)", ""]
    lines += _table(["metric", "value", f"{level} interval"],
                    [[label, _value(key, metrics.get(key)), _interval(key, intervals)]
                     for key, label, _ in OVERALL_METRICS])
    lines += ["", "### Per count", ""]
    table = per_class_table(metrics) if classes else None
    rows = []
    for record in (table.to_dict(orient="records") if table is not None else []):
        count = str(record["class"])
        rows.append([count, record["support"]] + [f"{record[m]:.3f} ({_interval(m, intervals, 'per_class', count)})"
                                                  for m in ("precision", "recall", "f1")])
    lines += _table(["count", "photos", "precision", "recall", "F1"], rows)
    lines += ["", "## Calibration", ""]
    ece = metrics.get("ece")
    before = metrics.get("ece_uncalibrated")
    lines.append(f"Expected calibration error (15 bins): **{_value('ece', ece)}**"
                 + (f" ({level} interval {_interval('ece', intervals)})" if intervals and "ece" in
                    intervals.get("overall", {}) else "")
                 + (f"; {before:.3f} before temperature scaling." if before is not None else "."))
    lines += ["", "## Confusion (rows: true count, columns: predicted)", ""]
    if classes and metrics.get("confusion_matrix"):
        matrix = confusion_matrix(metrics)
        lines += _table(["true \\ predicted"] + [str(c) for c in classes],
                        [[str(c)] + [int(v) for v in row] for c, row in zip(classes, matrix)])
    lines += ["", "## Known limits", ""] + [f"- {limit}" for limit in known_limits(metrics, classes, intervals)]
    return "\n".join(lines) + "\n"


def known_limits(metrics: dict, classes: list[int], intervals: dict | None) -> list[str]:
    limits = [f"It predicts only the counts {', '.join(map(str, classes))}: a bin with another count gets the nearest "
              "one it knows, silently.",
              "Its labels are inventory records, not counts made from the photos: some are wrong, so the figures "
              "mix the model's errors with the labels'.",
              "It saw only top-down photos of Amazon fulfilment-centre bins; other cameras, bins or lighting are "
              "untested."]
    if not metrics.get("n"):
        return limits
    table = per_class_table(metrics)
    weakest = weakest_class(table)
    if weakest is not None:
        row = table[table["class"] == weakest].iloc[0]
        limits.append(f"Its weakest count is {weakest}: recall {row['recall']:.1%}, F1 {row['f1']:.3f}.")
    matrix = confusion_matrix(metrics).astype(float)
    np.fill_diagonal(matrix, 0)
    if matrix.sum():
        i, j = np.unravel_index(matrix.argmax(), matrix.shape)
        limits.append(f"Its most frequent mistake: count {classes[i]} read as {classes[j]} "
                      f"({int(matrix[i, j])} photos).")
    accuracy = (intervals or {}).get("overall", {}).get("accuracy")
    if accuracy:
        limits.append(f"Accuracy is known to within {interval_text(accuracy)} on these {metrics['n']:,} photos: "
                      "another run within that range is not shown better by these figures alone (compare the two "
                      "photo by photo on Evaluate).")
    ece = metrics.get("ece")
    if ece is not None and ece > 0.05:
        limits.append(f"Its confidence is off by {ece:.1%} on average (ECE): read it as a ranking, not a probability.")
    return limits


def card_for_result(result, meta: dict, run_dir: str | Path, model_id: str = "") -> str:
    """The card of the run in `run_dir` from an EvaluationResult (intervals over its photos, ECE included)."""
    if not model_id:
        from core.models.networks import file_digest, model_file

        model_id = f"{Path(run_dir).name}@{file_digest(model_file(run_dir))}"
    scope = {"test": "the test split", "valid": "the validation split", "train": "the training split",
             "all": "all labelled photos"}.get(result.split, result.split or "labelled photos")
    return model_card(meta, result.metrics(), run=result.run or Path(run_dir).name,
                      recipe=read_json(Path(run_dir) / "config.json"), scope=scope, intervals=result.intervals(),
                      model_id=model_id)


def card_for_run(run_dir: str | Path, meta: dict, model_id: str = "") -> str:
    """The card from the run's own files (metrics.json's test metrics): intervals bootstrapped from its confusion
    matrix (every metric but the ECE, which needs each photo's probabilities)."""
    run_dir = Path(run_dir)
    written = read_json(run_dir / "metrics.json")
    metrics = written["test"] if isinstance(written.get("test"), dict) else {}
    intervals = None
    if metrics.get("n") and metrics.get("confusion_matrix"):
        truth, predicted = pairs_from_confusion(metrics["confusion_matrix"], metrics["classes"])
        intervals = bootstrap_intervals(truth, predicted, metrics["classes"])
    return model_card(meta, metrics | {"classes": metrics.get("classes") or meta.get("classes", [])},
                      run=run_dir.name, recipe=read_json(run_dir / "config.json"), scope="the test split",
                      intervals=intervals, model_id=model_id)
