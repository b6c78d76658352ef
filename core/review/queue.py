"""Which bins to spot-check next: random, unchecked, least confident or disputed by the model; model scores cached."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from core import config
from core.data.annotations import MORE_THAN_FIVE
from core.errors import BinsightError
from core.files import atomic_write_bytes

QUEUES = {
    "unchecked": "Not yet checked",
    "random": "Random sample",
    "low_confidence": "Lowest model confidence",
    "disagreement": "Model disagrees with the label",
}
MODEL_QUEUES = ("low_confidence", "disagreement")
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


def build_queue(frame: pd.DataFrame, kind: str, checked: set[str] | None = None, scores: pd.DataFrame | None = None,
                counts=(), splits=(), size: int = 50, seed: int = 0) -> list[str]:
    """Up to `size` photo names to check, in order. Model queues need `scores` (name, predicted, confidence)."""
    if kind not in QUEUES:
        raise QueueError(f"unknown queue {kind!r}: choose one of {', '.join(QUEUES)}")
    rows = candidates(frame, counts, splits)
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
    truth = scored["cls"].fillna(scored["count"]) if "cls" in scored else scored["count"]
    disputed = scored[truth.notna() & (truth != scored["predicted"])]
    return disputed.sort_values("confidence", ascending=False, kind="stable")["name"].head(size).tolist()


def _scores_file(model_path: Path, dataset_key: str) -> Path:
    stat = Path(model_path).stat()
    stamp = hashlib.sha1(f"{Path(model_path).resolve()}:{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:12]
    return config.home() / "annotations" / f"scores_{dataset_key}_{stamp}.parquet"


def load_scores(model_path: str | Path, dataset_key: str) -> pd.DataFrame:
    """The model's saved predictions for this dataset (name, predicted, confidence, error); empty when none."""
    try:
        return pd.read_parquet(_scores_file(Path(model_path), dataset_key))
    except (OSError, ValueError):
        return pd.DataFrame(columns=SCORE_COLUMNS)


def score_photos(model, meta: dict, model_path: str | Path, dataset_key: str, rows: pd.DataFrame,
                 on_progress=None, chunk: int = 256) -> pd.DataFrame:
    """Predict the photos of `rows` (name, path) not yet scored by this model, save them, and return all scores.

    Scores are saved after each chunk, so an interrupted scoring resumes where it stopped.
    """
    from core.models.inference import predict_photos

    scores = load_scores(model_path, dataset_key)
    todo = rows[~rows["name"].isin(scores["name"])][["name", "path"]]
    target = _scores_file(Path(model_path), dataset_key)
    for start in range(0, len(todo), chunk):
        part = todo.iloc[start:start + chunk]

        def report(info: dict, start=start) -> None:
            done = start + int(info.get("done", 0))
            on_progress(done / len(todo), f"Scoring bins with the current model {done:,}/{len(todo):,}")

        predicted = predict_photos(model, meta, part["path"].tolist(), on_progress=report if on_progress else None)
        batch = pd.DataFrame({  # predict_photos keeps the order of the paths it is given
            "name": part["name"].to_numpy(),
            "predicted": pd.array(predicted["predicted"], dtype="Int64"),
            "confidence": predicted["confidence"].astype(float).to_numpy(),
            "error": predicted["error"].astype(object).where(predicted["error"].notna(), None).to_numpy(),
        })
        scores = pd.concat([scores, batch], ignore_index=True) if len(scores) else batch
        atomic_write_bytes(target, scores.to_parquet(index=False))
    return scores
