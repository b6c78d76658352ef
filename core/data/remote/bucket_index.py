"""The dataset index of a whole bucket, read from its metadata JSONs: many requests in flight, resumable, with progress."""
from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import PurePosixPath

import pandas as pd

from core import config
from core.data.labels import abid
from core.data.dataset import DatasetError, finish_index
from core.data.remote.s3 import S3Error, S3Source, s3_settings
from core.errors import Cancelled
from core.files import atomic_write_bytes, atomic_write_json

CHUNK = 2000          # metadata objects per saved part: a killed indexing loses at most this much work
IN_FLIGHT = 32        # requests at once (bounded: the pool never holds more)


def parse_uri(uri: str) -> tuple[str, str]:
    """(bucket, prefix) of s3://bucket/prefix; the prefix is where bin-images/ and metadata/ are."""
    bucket, _, prefix = str(uri)[len("s3://"):].partition("/")
    if not str(uri).startswith("s3://") or not bucket:
        raise DatasetError(f"{uri!r}: expected s3://bucket or s3://bucket/prefix")
    return bucket, prefix.strip("/")


def index_key(uri: str) -> str:
    return "bucket-" + hashlib.sha1(str(uri).rstrip("/").encode()).hexdigest()[:12]


def _row(key: str, body: bytes | None, problem: str | None) -> dict:
    name = PurePosixPath(key).stem + ".jpg"
    row = {"name": name, "path": None, "count": None, "label_source": None, "n_items": 0, "item_names": "",
           "items_json": None, "problem": problem}
    if body is not None:
        try:
            meta = abid.parse_metadata(body)
            row.update(n_items=len(meta.items), item_names=" | ".join(meta.item_names), items_json=json.dumps(meta.items))
            if meta.expected_quantity is not None:
                row.update(count=meta.expected_quantity, label_source="metadata")
        except ValueError as exc:
            row["problem"] = f"metadata/{PurePosixPath(key).name}: {exc}"
    return row


def build_bucket_index(uri: str, source: S3Source | None = None, in_flight: int = IN_FLIGHT, chunk: int = CHUNK,
                       on_progress=None, should_stop=None) -> pd.DataFrame:
    """One row per metadata JSON under s3://bucket/prefix/metadata/, fetched `in_flight` at a time.

    Parts of `chunk` rows are saved under BINSIGHT_HOME/index/<key>/ as they complete, so a killed or stopped
    indexing resumes with the keys not yet read. `on_progress(done, total, text)`; `should_stop()` → Cancelled.
    """
    bucket, prefix = parse_uri(uri)
    source = source or S3Source(s3_settings(bucket=bucket), workers=in_flight)
    folder = config.home() / "index" / index_key(uri)
    metadata_prefix = f"{prefix}/{abid.METADATA_PREFIX}" if prefix else abid.METADATA_PREFIX
    keys = [k for k in source.list_keys(metadata_prefix) if k.endswith(".json")]
    parts = sorted(folder.glob("part-*.parquet"))
    done_frames = [pd.read_parquet(p) for p in parts]
    done = set().union(*(set(f["key"]) for f in done_frames)) if done_frames else set()
    todo = [k for k in keys if k not in done]
    total = len(keys)
    if on_progress:
        on_progress(len(done), total, f"{len(done):,} of {total:,} metadata objects already indexed")
    def read(key: str) -> dict:
        try:
            body = source.client.get_object(Bucket=bucket, Key=key)["Body"].read()
            row = _row(key, body, None)
        except Exception as exc:  # one unreadable object is listed as a problem, never stops the index
            row = _row(key, None, f"{key}: cannot be read ({type(exc).__name__})")
        row["key"] = key
        return row

    with ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix="bucket-index") as pool:
        for start in range(0, len(todo), chunk):
            if should_stop and should_stop():
                raise Cancelled(f"indexing stopped; {len(done):,} of {total:,} are saved and the next run resumes")
            rows = list(pool.map(read, todo[start:start + chunk]))  # map keeps at most `in_flight` requests going
            frame = pd.DataFrame(rows)
            atomic_write_bytes(folder / f"part-{len(done_frames):06d}.parquet", frame.to_parquet(index=False))
            done_frames.append(frame)
            done |= set(frame["key"])
            if on_progress:
                on_progress(len(done), total, f"indexed {len(done):,} of {total:,} metadata objects")
    frame = pd.concat(done_frames, ignore_index=True) if done_frames else pd.DataFrame(columns=["key", "name"])
    frame = frame[frame["key"].isin(set(keys))].drop_duplicates("key").drop(columns=["key"])
    frame = finish_index(frame).sort_values("name", kind="stable").reset_index(drop=True)
    atomic_write_json(folder / "done.json", {"uri": uri, "objects": len(frame)})
    return frame


def bucket_frame(uri: str, on_progress=None) -> pd.DataFrame:
    """The bucket's index: read back when complete, else built (resuming); `on_progress(fraction, text)`."""
    folder = config.home() / "index" / index_key(uri)
    try:
        if (folder / "done.json").is_file():
            return finish_index(pd.concat([pd.read_parquet(p) for p in sorted(folder.glob("part-*.parquet"))],
                                          ignore_index=True).drop(columns=["key"]))
        return build_bucket_index(uri, on_progress=(lambda d, t, text: on_progress(d / max(t, 1), text))
                                  if on_progress else None)
    except S3Error as exc:
        raise DatasetError(f"{uri}: {exc}") from None
