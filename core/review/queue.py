"""Which bins to spot-check next: random, unchecked, least confident or disputed by the model (scores from the store),
likely wrong, outside the model's classes, or photos sent from another page."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from core.data.labels.annotations import MORE_THAN_FIVE
from core.data.classes import ClassRange
from core.digests import frame_digest
from core.errors import BinsightError
from core.evaluation.predictions import PredictionStore
from core.review import queue_store

QUEUES = {
    "unchecked": "Not yet checked",
    "random": "Random sample",
    "low_confidence": "Lowest model confidence",
    "disagreement": "Model disagrees with the label",
    "likely_wrong": "Likely wrong count",
    "outside": "Outside the classes",
    "sent": "Sent from Evaluate",
}
# Model queues hold only bins whose count is one of the model's classes: a 1–5 model can never agree with a 0 or a 7.
MODEL_QUEUES = ("low_confidence", "disagreement")
# Ordered by the label-issue score (core.evaluation.label_issues): heads that never saw the photo, not the model.
ISSUE_QUEUES = ("likely_wrong",)
SCORE_COLUMNS = ["name", "predicted", "confidence", "error"]


class QueueError(BinsightError, ValueError):
    """The queue cannot be built as asked (e.g. it needs model scores); the message says what to do."""


def candidates(frame: pd.DataFrame, counts=(), splits=()) -> pd.DataFrame:
    """Photos that can be looked at (on disk, readable), filtered by current count and split.

    `counts` holds 0–5 and MORE_THAN_FIVE (any count above 5); `splits` holds train/valid/test and "none".
    """
    rows = frame[frame["path"].notna() & frame["problem"].isna()]
    if counts:
        count = rows["count"]
        wanted = [c for c in counts if c != MORE_THAN_FIVE]
        mask = count.isin(wanted).fillna(False).astype(bool)
        if MORE_THAN_FIVE in counts:
            mask |= (count > 5).fillna(False).astype(bool)
        rows = rows[mask]
    if splits:
        rows = rows[rows["split"].fillna("none").isin(splits)]
    return rows


def inside_classes(rows: pd.DataFrame, classes: ClassRange | None = None) -> pd.Series:
    """Per photo: whether its count is one of the classes (the model's range; the dataset's `cls` without one)."""
    if classes is None:
        return rows["cls"].notna() if "cls" in rows else rows["count"].notna()
    return classes.assign(rows["count"]).notna().astype(bool)


def build_queue(frame: pd.DataFrame, kind: str, checked: set[str] | None = None, scores: pd.DataFrame | None = None,
                counts=(), splits=(), size: int = 50, seed: int = 0, issues: pd.DataFrame | None = None,
                classes: ClassRange | None = None, sent: list[str] | None = None) -> list[str]:
    """Up to `size` photo names to check, in order. Model queues need `scores` (name, predicted, confidence) and
    hold only bins whose count is one of `classes` (the model's); "outside" holds the others. The likely-wrong
    queue needs `issues` (name, flagged, score: LabelIssues.frame) and holds the unchecked flagged photos, the most
    likely wrong first; "sent" holds the `sent` names (e.g. a confusion cell's photos) in their order."""
    if kind not in QUEUES:
        raise QueueError(f"unknown queue {kind!r}: choose one of {', '.join(QUEUES)}")
    if len(frame) >= queue_store.LARGE_POOL and kind != "sent":
        return paged_queue(frame, kind, checked, scores, counts, splits, size, seed, issues, classes)
    rows = candidates(frame, counts, splits)
    if kind == "sent":
        if not sent:
            raise QueueError("No photos were sent here yet: on the Evaluate page, open a cell of the confusion "
                             "matrix and send its photos to Spot-check.")
        return [name for name in sent if name in set(rows["name"])][:size]
    if kind == "outside":
        counted = rows[rows["count"].notna()]
        outside = counted[~inside_classes(counted, classes)]
        return outside.sample(frac=1.0, random_state=np.random.RandomState(seed))["name"].head(size).tolist() \
            if len(outside) else []
    if kind in MODEL_QUEUES:
        rows = rows[inside_classes(rows, classes)]
    if kind in ISSUE_QUEUES:
        if issues is None:
            raise QueueError(f"“{QUEUES[kind]}” needs the data health check: run it on the Data health page (or "
                             "`python -m core health`) first.")
        flagged = issues[issues["flagged"] & ~issues["name"].isin(checked or set())]
        ranked = flagged[flagged["name"].isin(rows["name"])].sort_values(["score", "name"], ascending=[False, True],
                                                                         kind="stable")
        return ranked["name"].head(size).tolist()
    shuffled = rows.sample(frac=1.0, random_state=np.random.RandomState(seed)) if len(rows) else rows
    if kind == "random":
        return shuffled["name"].head(size).tolist()
    if kind == "unchecked":
        checked = checked or set()
        return shuffled[~shuffled["name"].isin(checked)]["name"].head(size).tolist()
    if scores is None or scores.empty:
        raise QueueError(f"“{QUEUES[kind]}” needs the current model's predictions: score the photos first.")
    scored = shuffled.merge(scores[scores["error"].isna()][["name", "predicted", "confidence"]], on="name")
    if kind == "low_confidence":
        return scored.sort_values("confidence", kind="stable")["name"].head(size).tolist()
    disputed = scored[~agreement(scored).fillna(True)]
    return disputed.sort_values("confidence", ascending=False, kind="stable")["name"].head(size).tolist()


def paged_queue(frame: pd.DataFrame, kind: str, checked: set[str] | None = None, scores: pd.DataFrame | None = None,
                counts=(), splits=(), size: int = 50, seed: int = 0, issues: pd.DataFrame | None = None,
                classes: ClassRange | None = None, offset: int = 0) -> list[str]:
    """build_queue's queue `kind` from `offset` on, paged from an indexed table of the pool (made once per pool,
    model scores and label issues): what a bucket-scale pool needs, where sorting it on each page would not do.
    Random orders are the pool's own seeded shuffle, so they differ from build_queue's in-memory ones."""
    if kind in ISSUE_QUEUES and issues is None:
        raise QueueError(f"“{QUEUES[kind]}” needs the data health check: run it on the Data health page (or "
                         "`python -m core health`) first.")
    if kind in MODEL_QUEUES and (scores is None or scores.empty):
        raise QueueError(f"“{QUEUES[kind]}” needs the current model's predictions: score the photos first.")
    used = ["name", "path", "problem", "count"] + [c for c in ("cls", "split") if c in frame]
    parts = [frame[used], seed, classes.describe() if classes else None]
    parts += [scores[SCORE_COLUMNS[:3] + ["error"]] if scores is not None else None]
    parts += [issues[["name", "flagged", "score"]] if issues is not None else None]

    def make_pool() -> pd.DataFrame:
        pool = candidates(frame).reset_index(drop=True)
        pool["inside"] = inside_classes(pool, classes).to_numpy()
        pool["shuffled"] = queue_store.shuffled_ranks(len(pool), seed)
        if scores is not None and len(scores):
            kept = scores[scores["error"].isna()][["name", "predicted", "confidence"]].drop_duplicates("name")
            pool = pool.merge(kept, on="name", how="left")
            pool["disputed"] = (~agreement(pool).fillna(True)).to_numpy()
        if issues is not None:
            pool = pool.merge(issues[["name", "flagged", "score"]].drop_duplicates("name"), on="name", how="left")
        return pool.assign(flagged=pool.get("flagged", False), disputed=pool.get("disputed", False)).fillna(
            {"flagged": False, "disputed": False})

    return queue_store.paged_queue(frame_digest(*parts), make_pool, kind, checked or set(), counts, splits,
                                   offset, size, more_than=MORE_THAN_FIVE)


def agreement(scored: pd.DataFrame) -> pd.Series:
    """Per photo (cls, count, predicted): True when the model predicts its label, False when it predicts another
    count, NA when the photo has no count. The label is the class when the count is one, else the count."""
    label = (scored["cls"].fillna(scored["count"]) if "cls" in scored else scored["count"]).astype("Float64")
    return (label == scored["predicted"].astype("Float64")).astype("boolean")


def agrees(row: pd.Series, predicted) -> bool:
    """Whether the model's prediction for this bin is its label."""
    one = row.to_frame().T.assign(predicted=predicted)
    return bool(agreement(one).fillna(False).iloc[0])


def _scores(outputs: pd.DataFrame) -> pd.DataFrame:
    return outputs[SCORE_COLUMNS].reset_index(drop=True)


def model_scores(model_path: str | Path, rows: pd.DataFrame) -> pd.DataFrame:
    """The model's stored predictions for the photos of `rows` (name, predicted, confidence, error); none are made."""
    return _scores(PredictionStore(model_path).stored(rows))


def unscored(model_path: str | Path, rows: pd.DataFrame) -> pd.DataFrame:
    """name and path of the photos of `rows` the model has not predicted yet."""
    return PredictionStore(model_path).missing(rows)


def score_photos(model_path: str | Path, rows: pd.DataFrame, load_model: Callable[[], tuple],
                 on_progress: Callable[[dict], None] | None = None, chunk: int = 256) -> pd.DataFrame:
    """The model's predictions for the photos of `rows` (name, path), predicting those not in the store yet.

    They go to the same prediction store the Evaluate page and `python -m core evaluate` read, saved after
    each chunk, so an interrupted scoring resumes where it stopped.
    """
    return _scores(PredictionStore(model_path).predict(rows, load_model, on_progress, chunk=chunk))
