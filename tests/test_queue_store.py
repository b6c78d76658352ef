"""Spot-check queues of a large pool paged from an indexed table: the right photos in the right order, page after
page, with filters and checked photos left out; the table built once per pool and again when the pool changes."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core import config
from core.data.labels.annotations import MORE_THAN_FIVE
from core.review import queue_store
from core.review.queue import build_queue, paged_queue

PHOTOS = 100_000


@pytest.fixture(scope="module")
def pool() -> dict:
    """100 K photos (a few unreadable), counts 0–8 with splits for 1–5, model scores and label issues."""
    rng = np.random.default_rng(0)
    names = [f"{n:06d}.jpg" for n in range(PHOTOS)]
    count = rng.choice([0, 1, 2, 3, 4, 5, 6, 8], PHOTOS, p=[0.04, 0.2, 0.2, 0.2, 0.15, 0.15, 0.04, 0.02])
    inside = (count >= 1) & (count <= 5)
    frame = pd.DataFrame({
        "name": names, "path": [f"/bucket/{n}" for n in names], "count": count.astype(float),
        "problem": np.where(rng.random(PHOTOS) < 0.01, "unreadable", None),
        "cls": np.where(inside, count, np.nan), "split": np.where(inside, rng.choice(["train", "valid", "test"],
                                                                                      PHOTOS), None)})
    predicted = rng.integers(1, 6, PHOTOS)
    scores = pd.DataFrame({"name": names, "predicted": predicted, "confidence": rng.random(PHOTOS).round(3),
                           "error": None})
    issues = pd.DataFrame({"name": names, "flagged": rng.random(PHOTOS) < 0.05,
                           "score": rng.random(PHOTOS).round(2) * 4})
    return {"frame": frame, "scores": scores, "issues": issues}


def pages(pool, kind, pages_of=700, **filters) -> list[str]:
    """The whole queue, page after page."""
    names, offset = [], 0
    while True:
        page = paged_queue(pool["frame"], kind, scores=pool["scores"], issues=pool["issues"], size=pages_of,
                           offset=offset, **filters)
        names += page
        offset += pages_of
        if len(page) < pages_of:
            return names


def test_the_likely_wrong_queue_pages_through_the_flagged_photos_most_likely_first(pool):
    frame, issues = pool["frame"], pool["issues"]
    checked = set(issues.loc[issues["flagged"], "name"].iloc[::7])
    readable = frame[frame["problem"].isna() & frame["count"].isin([2, 3])]
    expected = issues[issues["flagged"] & issues["name"].isin(readable["name"]) & ~issues["name"].isin(checked)]
    expected = expected.sort_values(["score", "name"], ascending=[False, True])["name"].tolist()
    assert len(expected) > 1000
    assert pages(pool, "likely_wrong", checked=checked, counts=(2, 3)) == expected
    first = build_queue(frame, "likely_wrong", checked, counts=(2, 3), size=50, issues=issues)
    assert first == expected[:50]


def test_the_model_queues_follow_confidence_and_the_filters(pool):
    frame, scores = pool["frame"], pool["scores"]
    merged = frame[frame["problem"].isna()].merge(scores, on="name")
    merged = merged[merged["split"].isin(["test"]) & (merged["count"] >= 4)]  # 4 and 5: counts above 5 have no split
    low = pages(pool, "low_confidence", 2_000, counts=(4, 5, MORE_THAN_FIVE), splits=("test",))
    assert sorted(low) == sorted(merged["name"])
    assert np.all(np.diff(merged.set_index("name").loc[low, "confidence"].to_numpy()) >= 0)
    disputed = pages(pool, "disagreement", pages_of=10_000)
    looked = frame.set_index("name").loc[disputed]
    predicted = scores.set_index("name").loc[disputed]
    assert (looked["cls"] != predicted["predicted"]).all() and looked["problem"].isna().all()
    assert np.all(np.diff(predicted["confidence"].to_numpy()) <= 0)


def test_random_queues_are_a_seeded_shuffle_of_the_filtered_pool(pool):
    frame = pool["frame"]
    outside = pages(pool, "outside")
    readable = frame[frame["problem"].isna()]
    assert sorted(outside) == sorted(readable.loc[readable["cls"].isna(), "name"])
    first = paged_queue(frame, "unchecked", checked={outside[0]}, size=30, counts=(0, 6, 8))
    assert outside[0] not in first and len(set(first)) == 30
    assert paged_queue(frame, "unchecked", checked={outside[0]}, size=30, counts=(0, 6, 8)) == first
    assert paged_queue(frame, "random", size=30, seed=1) != paged_queue(frame, "random", size=30, seed=0)


def test_the_table_is_built_once_per_pool_and_again_when_the_pool_changes(pool):
    frame, issues = pool["frame"], pool["issues"]
    build_queue(frame, "likely_wrong", issues=issues)
    tables = sorted((config.home() / "queues").glob("*.sqlite"))
    stamp = tables[0].stat().st_mtime_ns
    build_queue(frame, "likely_wrong", issues=issues)
    assert sorted((config.home() / "queues").glob("*.sqlite")) == tables and tables[0].stat().st_mtime_ns == stamp
    corrected = issues.copy()
    top = build_queue(frame, "likely_wrong", issues=issues, size=1)[0]
    corrected.loc[corrected["name"] == top, "flagged"] = False
    assert top not in build_queue(frame, "likely_wrong", issues=corrected, size=5)
    assert len(list((config.home() / "queues").glob("*.sqlite"))) == 2


def test_a_small_pool_is_still_sorted_in_memory(pool):
    small = pool["frame"].head(queue_store.LARGE_POOL - 1)
    build_queue(small, "random", size=5)
    assert not (config.home() / "queues").exists()
