"""Content keys of frames (core/digests.py): the same values give the same key however pandas and Arrow hold them,
and any changed value, row or order another key. Caches at bucket scale are keyed this way (the near-duplicate
pairs, the Spot-check pool): a key that moved with the memory layout would redo a minute's work for nothing."""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.digests import frame_digest


def checks(n: int = 2000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"name": [f"{i:06d}.jpg" for i in range(n)], "sha1": [f"{v:040x}" for v in rng.integers(0, 2**62, n)],
                         "phash": rng.integers(-2**62, 2**62, n), "phash256": [f"{v:064x}" for v in rng.integers(0, 2**62, n)]})


def test_the_same_values_give_the_same_key_however_they_are_held():
    frame = checks()
    from_parquet = io.BytesIO()
    pq.write_table(pa.Table.from_pandas(frame), from_parquet, row_group_size=300)  # read back in several chunks
    sliced = pd.concat([checks(50).assign(name=lambda f: "x" + f["name"]), frame]).iloc[50:].reset_index(drop=True)
    holdings = [frame, frame.astype({"phash": "Int64"}), frame.astype({"name": object, "sha1": object}),
                pd.read_parquet(io.BytesIO(from_parquet.getvalue())), sliced]
    assert len({frame_digest(held) for held in holdings}) == 1


def test_a_changed_value_row_or_order_changes_the_key():
    frame = checks()
    changed = frame.copy()
    changed.loc[1234, "phash256"] = "0" * 64
    missing = frame.astype({"phash": "Int64"})
    missing.loc[7, "phash"] = pd.NA
    keys = {frame_digest(f) for f in (frame, changed, missing, frame.iloc[1:], frame.iloc[::-1].reset_index(drop=True))}
    assert len(keys) == 5
