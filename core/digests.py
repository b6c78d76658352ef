"""Content keys of data frames from their Arrow buffers: a cache's key over 536 K rows in a few hundredths of a
second, where pandas' row-by-row hashing takes a second."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd


def frame_digest(*parts) -> str:
    """A key of frames (by their content) and plain values."""
    hasher = hashlib.sha1()
    for part in parts:
        if isinstance(part, pd.DataFrame):
            hasher.update(",".join(map(str, part.columns)).encode())
            for _, column in part.items():
                hash_column(column, hasher)
        else:
            hasher.update(repr(part).encode())
    return hasher.hexdigest()[:20]


def hash_column(column: pd.Series, hasher) -> None:
    """Feed a column's values to `hasher` through Arrow (536 K names in a few hundredths of a second, where pandas'
    row-by-row hashing takes ~0.4 s). The same values give the same bytes however they are held: numpy or nullable
    integers, one chunk or several (as parquet reads them), a slice or a whole array, with or without a validity map."""
    import pyarrow as pa

    try:
        array = pa.array(column.to_numpy() if isinstance(column.dtype, np.dtype) and column.dtype.kind in "biufmM"
                         else column, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        hasher.update(pd.util.hash_pandas_object(column, index=False).to_numpy().tobytes())
        return
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_string(array.type):
        array = array.cast(pa.large_string())
    array = pa.concat_arrays([array])  # its own buffers from offset 0 (a slice's buffers are its parent's)
    hasher.update(f"{array.type}:{len(array)}:{array.null_count}".encode())
    buffers = array.buffers()
    for buffer in buffers[1:] if array.null_count == 0 else buffers:  # no gaps: the validity map says nothing
        if buffer is not None:
            hasher.update(memoryview(buffer))


def same_values(left: pd.Series, right: pd.Series) -> bool:
    """Whether two columns hold the same values in the same order (however they are held): lets a view take a
    column of an aligned table by position instead of joining 536 K rows by name."""
    return len(left) == len(right) and np.array_equal(left.to_numpy(dtype=object), right.to_numpy(dtype=object))


def remembered_digest(memo_file: Path, alias: str, compute, kept: int = 50) -> str:
    """compute() (a slow digest: every photo's stamp, or a JSON of every row) remembered in `memo_file` under a quick
    `alias` of the same inputs (frame_digest of the columns it reads), so a page opening after a restart looks it up
    instead of computing it again. The value is the same either way: nothing saved under it is lost."""
    from core.files import atomic_write_json

    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    if not isinstance(memo, dict):
        memo = {}
    if isinstance(memo.get(alias), str):
        return memo[alias]
    digest = compute()
    atomic_write_json(memo_file, dict(list(memo.items())[-(kept - 1):]) | {alias: digest})
    return digest
