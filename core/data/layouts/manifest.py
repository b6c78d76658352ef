"""A manifest.csv of photos in buckets (columns uri, count; uri s3://bucket/key.jpg), fetched into the S3 cache."""
from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd

from core.data.dataset import DatasetError, finish_index
from core.data.labels import abid
from core.data.layouts.base import Layout, local_path, read_sizes
from core.data.remote.s3 import S3Error, S3Source, s3_settings

COLUMNS = {"uri", "count"}


def _header(path: Path) -> set[str]:
    try:
        with open(path, newline="", errors="replace") as handle:
            return {column.strip().lower() for column in next(csv.reader(handle), [])}
    except OSError as exc:
        raise DatasetError(f"{path}: cannot be read ({exc})") from None


class Manifest(Layout):
    name = "manifest"
    fetched_on_demand = False  # indexing fetched every photo it could

    def detect(self, source) -> bool:
        path = local_path(source)
        return path is not None and path.is_file() and path.suffix.lower() == ".csv" and COLUMNS <= _header(path)

    def index(self, source: Path, on_progress=None) -> pd.DataFrame:
        rows, wanted = [], {}
        with open(source, newline="", errors="replace") as handle:
            reader = csv.DictReader(handle)
            reader.fieldnames = [column.strip().lower() for column in reader.fieldnames or []]
            for line, record in enumerate(reader, start=2):
                uri = (record.get("uri") or "").strip()
                row = {"name": uri, "count": None, "label_source": "manifest", "problem": None}
                bucket, _, key = uri[len("s3://"):].partition("/")
                if not uri.startswith("s3://") or not bucket or not key:
                    row["problem"] = f"{source.name} line {line}: {uri!r} is not an s3://bucket/key URI"
                else:
                    try:
                        row["count"] = abid.parse_count(record.get("count") or "")
                    except ValueError as exc:
                        row["problem"] = f"{source.name} line {line}: {exc}"
                    wanted.setdefault(bucket, []).append(key)
                rows.append(row)
        fetched = {}
        for bucket, keys in wanted.items():
            try:
                paths = S3Source(s3_settings(bucket=bucket)).fetch(keys, on_progress=on_progress, missing_ok=True)
            except S3Error as exc:
                raise DatasetError(f"{source.name}: s3://{bucket}: {exc}") from None
            fetched |= {f"s3://{bucket}/{key}": path for key, path in paths.items()}
        for row in rows:
            row["path"] = str(fetched[row["name"]]) if fetched.get(row["name"]) else None
            if row["problem"] is None and row["path"] is None:
                row["problem"] = f"{row['name']} is not in the bucket"
        return read_sizes(finish_index(pd.DataFrame(rows)), on_progress)


MANIFEST = Manifest()
