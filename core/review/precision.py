"""How often each queue's flags are right, measured by the reviewers' decisions: per queue, the share of reviewed bins
whose record was wrong, whose items were hidden, whose record was right, or unclear, each with its 95 % interval."""
from __future__ import annotations

import math
from statistics import NormalDist

import pandas as pd

from core.data.labels import annotations
from core.review.queue import QUEUES

# Where a decision can be made besides the spot-check queues.
SOURCES = QUEUES | {"evaluate": "Evaluate's photos", "map": "Relabelled on the map", "": "Elsewhere (command line)"}
# A reviewer's decision, grouped by what it says of the flag: right (record wrong), explained (the items are hidden),
# wrong (the record is right: confirmed, or the model is wrong), or no verdict.
VERDICTS = {"corrected": "record wrong", "hidden": "items hidden", "confirmed": "record right",
            "model_wrong": "record right", "unclear": "unclear"}
VERDICT_ORDER = ["record wrong", "items hidden", "record right", "unclear"]
LEVEL = 0.95


def wilson_interval(hits: int, total: int, level: float = LEVEL) -> tuple[float, float]:
    """The Wilson score interval of a share (hits of total): sound for small samples and shares near 0 or 1. Written
    out (scipy.stats.binomtest gives the same, tests/test_annotations.py): importing scipy.stats takes ~3 s, which
    the first decision of a session in Spot-check would wait for."""
    if total == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + level / 2)
    share, spread = hits / total, z * z / total
    centre = (share + spread / 2) / (1 + spread)
    half = z * math.sqrt(share * (1 - share) / total + spread / (4 * total)) / (1 + spread)
    return max(0.0, centre - half), min(1.0, centre + half)


def reviewed(dataset_key: str) -> pd.DataFrame:
    """One row per (queue, photo) reviewed from that queue: the latest decision not undone made there."""
    trail = annotations.history(dataset_key)
    trail = trail[trail["undone_at"].isna()]
    return trail.sort_values("id").drop_duplicates(["queue", "photo"], keep="last")


def queue_precision(dataset_key: str) -> pd.DataFrame:
    """Per queue with reviews and per verdict: bins (reviewed with that verdict), reviewed (in the queue), share,
    low and high (95 % Wilson interval). Queues in QUEUES order, then the other sources."""
    columns = ["queue", "queue_name", "verdict", "bins", "reviewed", "share", "low", "high"]
    decided = reviewed(dataset_key)
    if decided.empty:
        return pd.DataFrame(columns=columns)
    decided = decided.assign(verdict=decided["status"].map(VERDICTS))
    rows = []
    for queue in [q for q in SOURCES if q in set(decided["queue"])]:
        mine = decided[decided["queue"] == queue]
        for verdict in VERDICT_ORDER:
            hits = int((mine["verdict"] == verdict).sum())
            low, high = wilson_interval(hits, len(mine))
            rows.append((queue, SOURCES[queue], verdict, hits, len(mine), hits / len(mine), low, high))
    return pd.DataFrame(rows, columns=columns)


def precision_of(table: pd.DataFrame, queue: str) -> dict | None:
    """{verdict: (bins, share, low, high)} and 'reviewed' for one queue of a queue_precision table; None when no bin
    of it was reviewed."""
    mine = table[table["queue"] == queue]
    if mine.empty:
        return None
    found = {row.verdict: (int(row.bins), float(row.share), float(row.low), float(row.high))
             for row in mine.itertuples(index=False)}
    return found | {"reviewed": int(mine["reviewed"].iloc[0])}
