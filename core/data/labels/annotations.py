"""Annotators' count decisions in SQLite: an append-only history whose latest entry per photo is the label."""
from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from core import db
from core.access import User
from core.errors import BinsightError
from core.files import atomic_write_text

# "More than 5" is stored as the count 6 ("at least 6"): a 1–5 class range excludes it, a "5+" bucket counts it
# as class 5. Confirming a recorded count above 5 keeps that exact count instead.
MORE_THAN_FIVE = 6
UNCLEAR = None
STATUSES = ("confirmed", "corrected", "unclear", "hidden", "model_wrong")
# What a reviewer may say of a flagged bin besides a count. Both keep the count as it is: "hidden" (the record is
# right but the items cannot be counted from the photo: a big box hides the rest, flat items under the bands, blur)
# and "model_wrong" (the record is right and countable; the flag or the model was wrong).
OUTCOMES = ("hidden", "model_wrong")
STATUS_WORDS = {"confirmed": "confirmed", "corrected": "corrected", "unclear": "unclear",
                "hidden": "items hidden", "model_wrong": "model wrong"}
MAX_NOTE = 2000
COLUMNS = ["id", "dataset_key", "photo", "annotator", "created_at", "old_count", "new_count", "status", "note",
           "queue", "undone_at", "undone_by"]
EXPORT_COLUMNS = ["id", "dataset_key", "photo", "annotator", "created_at", "old_count", "new_count", "new_label",
                  "status", "note", "queue", "undone_at", "undone_by", "is_latest"]
LIVE = "undone_at IS NULL"  # an undone decision stays in the trail but no longer counts

class AnnotationError(BinsightError, ValueError):
    """A decision that cannot be saved (no annotator, impossible count); the message says why."""


class PhotoMissing(AnnotationError):
    """The photo was moved or deleted after it was shown: nothing is saved."""


@dataclass(frozen=True)
class Decision:
    id: int
    dataset_key: str
    photo: str
    annotator: str
    created_at: str
    old_count: int | None
    new_count: int | None
    status: str
    note: str
    queue: str = ""
    undone_at: str | None = None
    undone_by: str | None = None


@dataclass(frozen=True)
class SaveResult:
    """The saved decision, and the other annotator's decision it followed when the photo changed meanwhile."""

    decision: Decision
    overtaken: Decision | None = None


def count_label(count: int | None) -> str:
    if count is None or pd.isna(count):
        return "unclear"
    return "more than 5" if int(count) > 5 else str(int(count))


def _decision(row) -> Decision:
    return Decision(**{key: row[key] for key in row.keys()})


def _status(old: int | None, new: int | None) -> str:
    if new is None:
        return "unclear"
    return "confirmed" if old == new else "corrected"


def save_decision(dataset_key: str, photo: str, annotator: str, count: int | None, *, recorded_count: int | None,
                  note: str = "", path: str | Path | None = None, seen_id: int | None = None,
                  outcome: str | None = None, queue: str = "") -> SaveResult:
    """Append one decision in its own transaction; `count` is 0–5, MORE_THAN_FIVE, a confirmed count, or UNCLEAR;
    with an `outcome` (one of OUTCOMES) the count stays the label and the decision says why the bin looked wrong.
    `queue`: where the decision was made (a spot-check queue, "evaluate", "map"), for the flags' precision.

    The old count is the label just before this decision (the previous decision's count, else `recorded_count`),
    read inside the same write transaction, so concurrent annotators form one unbroken history.
    `seen_id` is the latest decision id the annotator was shown; when another annotator saved after it, the
    result names that decision in `overtaken`. With `path`, a photo that is no longer on disk raises PhotoMissing.
    """
    annotator = (annotator or "").strip()
    if not annotator:
        raise AnnotationError("Say who you are before saving: the annotator name is empty.")
    _check_count(count)
    if outcome is not None and outcome not in OUTCOMES:
        raise AnnotationError(f"{outcome!r} is not an outcome: use one of {', '.join(OUTCOMES)}.")
    note = (note or "").strip()[:MAX_NOTE]
    if path is not None and not Path(path).is_file():
        raise PhotoMissing(f"{photo} is no longer at {path}: it was moved or deleted after it was shown. "
                           "Nothing was saved; go on with the next bin.")
    recorded = None if recorded_count is None or pd.isna(recorded_count) else int(recorded_count)
    with db.transaction() as conn:
        previous, saved = _append(conn, dataset_key, photo, annotator, count, recorded, note, outcome, queue)
    overtaken = None
    if previous is not None and previous["id"] != seen_id and previous["annotator"] != annotator:
        overtaken = _decision(previous)
    return SaveResult(_decision(saved), overtaken)


def _latest_live(conn, dataset_key: str, photo: str):
    return conn.execute(f"SELECT * FROM annotations WHERE dataset_key = ? AND photo = ? AND {LIVE} "
                        "ORDER BY id DESC LIMIT 1", (dataset_key, photo)).fetchone()


def _append(conn, dataset_key: str, photo: str, annotator: str, count: int | None, recorded: int | None,
            note: str, outcome: str | None = None, queue: str = "") -> tuple:
    """(the photo's previous decision row or None, the new one) after appending a decision inside `conn`'s
    transaction; the old count is the label just before it (an outcome keeps it)."""
    previous = _latest_live(conn, dataset_key, photo)
    old = previous["new_count"] if previous else recorded
    new = None if count is None else int(count)
    if new == MORE_THAN_FIVE and old is not None and old > 5:
        new = old  # "more than 5" on a bin recorded above 5 confirms its recorded count
    if outcome is not None:
        new = old
    created = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    cursor = conn.execute(
        "INSERT INTO annotations (dataset_key, photo, annotator, created_at, old_count, new_count, status, note, queue)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (dataset_key, photo, annotator, created, old, new, outcome or _status(old, new), note, queue or ""),
    )
    return previous, conn.execute("SELECT * FROM annotations WHERE id = ?", (cursor.lastrowid,)).fetchone()


def _check_count(count) -> None:
    if count is not None and (isinstance(count, bool) or int(count) != count or count < 0):
        raise AnnotationError(f"{count!r} is not a count: use 0–5, 'more than 5' or 'unclear'.")


def save_bulk_decision(dataset_key: str, recorded: dict[str, int | None], count: int | None, *, user: User,
                       annotator: str = "", note: str = "") -> list[Decision]:
    """One decision per photo of `recorded` (name → its recorded count) setting `count`, all in one transaction:
    every photo is relabelled or none is. Refused (AccessDenied) to a user whose role may not relabel; the
    annotator is the signed-in user, else the name given. Each decision is audited as a spot-check's is."""
    user.require("relabel")
    annotator = (user.name if user.signed_in else annotator or "").strip()
    if not annotator:
        raise AnnotationError("Say who you are before relabelling: the annotator name is empty.")
    _check_count(count)
    if not recorded:
        raise AnnotationError("No photo is selected: nothing to relabel.")
    note = (note.strip() + " " if note and note.strip() else "") + f"(bulk relabel of {len(recorded)} photos)"
    saved = []
    with db.transaction() as conn:
        for photo, was in recorded.items():
            was = None if was is None or pd.isna(was) else int(was)
            saved.append(_decision(_append(conn, dataset_key, photo, annotator, count, was, note[:MAX_NOTE],
                                           queue="map")[1]))
    return saved


def undo_decisions(dataset_key: str, decisions: list[Decision], *, user: User,
                   annotator: str = "") -> tuple[list[Decision], list[str]]:
    """Take the decisions back: each is marked undone (the trail keeps it, with who undid it and when) and the
    photo's previous decision, or its recorded count, is its label again; nothing new is counted as a decision.
    A photo decided again since is left as it is: (the decisions undone, the photos left)."""
    user.require("relabel")
    annotator = (user.name if user.signed_in else annotator or "").strip() or "unknown"
    undone, left = [], []
    when = datetime.now(timezone.utc).isoformat(timespec="microseconds")
    with db.transaction() as conn:
        for decision in decisions:
            latest = _latest_live(conn, dataset_key, decision.photo)
            if latest is None or latest["id"] != decision.id:
                left.append(decision.photo)
                continue
            conn.execute("UPDATE annotations SET undone_at = ?, undone_by = ? WHERE id = ?",
                         (when, annotator, decision.id))
            undone.append(_decision(conn.execute("SELECT * FROM annotations WHERE id = ?",
                                                 (decision.id,)).fetchone()))
    return undone, left


def _frame(sql: str, params: tuple) -> pd.DataFrame:
    with db.connection() as conn:
        rows = conn.execute(sql, params).fetchall()
    frame = pd.DataFrame([dict(r) for r in rows], columns=COLUMNS)
    for column in ("old_count", "new_count"):
        frame[column] = frame[column].astype("Int64")
    return frame


def state() -> str:
    """Changes with every decision and every undo, of any dataset: what a loaded dataset's labels depend on (other
    writes to the database, such as a job's progress, leave it as it is)."""
    with db.connection() as conn:
        row = conn.execute("SELECT count(*), coalesce(max(id), 0), count(undone_at) FROM annotations").fetchone()
    return ":".join(str(value) for value in tuple(row))


def history(dataset_key: str, photo: str | None = None) -> pd.DataFrame:
    """Every decision of the dataset (or one photo), oldest first, undone ones included: the audit trail."""
    if photo is None:
        return _frame("SELECT * FROM annotations WHERE dataset_key = ? ORDER BY id", (dataset_key,))
    return _frame("SELECT * FROM annotations WHERE dataset_key = ? AND photo = ? ORDER BY id", (dataset_key, photo))


def latest_decision(dataset_key: str, photo: str) -> Decision | None:
    """The photo's latest decision not undone (its label's origin), or None when it was never decided."""
    with db.connection() as conn:
        row = _latest_live(conn, dataset_key, photo)
    return None if row is None else _decision(row)


def latest_decisions(dataset_key: str) -> pd.DataFrame:
    """One row per checked photo: its latest decision not undone (the highest id, i.e. the last committed)."""
    return _frame(
        "SELECT a.* FROM annotations a JOIN (SELECT photo, MAX(id) AS id FROM annotations WHERE dataset_key = ?"
        f" AND {LIVE} GROUP BY photo) latest ON a.id = latest.id ORDER BY a.photo",
        (dataset_key,),
    )


def label_overrides(dataset_key: str) -> dict[str, int | None]:
    """Photo name → its checked count, or None when marked unclear (left out of training and evaluation)."""
    latest = latest_decisions(dataset_key)
    counts = latest["new_count"]
    return {photo: (None if pd.isna(count) else int(count)) for photo, count in zip(latest["photo"], counts)}


def uncountable(dataset_key: str) -> set[str]:
    """The photos whose latest decision says their items cannot be counted from the photo ("hidden")."""
    latest = latest_decisions(dataset_key)
    return set(latest.loc[latest["status"] == "hidden", "photo"])


def progress(dataset_key: str) -> pd.DataFrame:
    """Per annotator: decisions, distinct photos, decisions per status and the time of the last one (undone
    decisions do not count)."""
    frame = history(dataset_key)
    frame = frame[frame["undone_at"].isna()]
    columns = ["annotator", "decisions", "photos", *STATUSES, "last_at"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    table = frame.groupby("annotator").agg(decisions=("id", "size"), photos=("photo", "nunique"),
                                           last_at=("created_at", "max"))
    statuses = frame.groupby(["annotator", "status"]).size().unstack(fill_value=0)
    statuses = statuses.reindex(columns=list(STATUSES), fill_value=0)
    table = table.join(statuses).reset_index()
    return table[columns].sort_values("decisions", ascending=False, ignore_index=True)


def export_frame(dataset_key: str) -> pd.DataFrame:
    """The full history with a readable count and a flag on each photo's current (latest, not undone) decision."""
    frame = history(dataset_key)
    frame["new_label"] = [count_label(None if pd.isna(c) else c) for c in frame["new_count"]]
    frame["is_latest"] = frame["id"].isin(latest_decisions(dataset_key)["id"]) if not frame.empty else []
    return frame[EXPORT_COLUMNS]


def export_csv(dataset_key: str, path: str | Path | None = None) -> str:
    """The history as CSV text; also written atomically to `path` when given."""
    buffer = io.StringIO()
    export_frame(dataset_key).to_csv(buffer, index=False)
    text = buffer.getvalue()
    if path is not None:
        atomic_write_text(path, text)
    return text


def apply_overrides(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """Counts corrected by annotators replace the recorded ones (the latest decision wins)."""
    overrides = label_overrides(key)
    if not overrides:
        return frame
    frame = frame.copy()
    hit = frame["name"].isin(list(overrides)).to_numpy()  # a few decisions among 536 K photos: look up only those
    corrected = frame.loc[hit, "name"].map(overrides)
    frame.loc[hit, "count"] = pd.array(corrected, dtype="Int64")
    frame.loc[hit, "label_source"] = "annotation"
    return frame
