"""A bucket (or prefix) of ABID photos and metadata JSONs, not a shard set: indexed from its metadata, resumably."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.data.classes import ClassRange
from core.data.dataset import Dataset
from core.data.layouts.base import Layout, labelled_dataset
from core.data.remote.bucket_index import bucket_frame, index_key


class Bucket(Layout):
    name = "bucket"

    def detect(self, source) -> bool:
        return source is not None and str(source).startswith("s3://")

    def fingerprint(self, source, stamps: dict | None = None) -> str:
        return index_key(str(source))  # the index resumes by its saved parts (bucket_index), not by a fingerprint

    def index(self, source, on_progress=None) -> pd.DataFrame:
        return bucket_frame(str(source), on_progress)

    def notes(self, frame: pd.DataFrame) -> list[str]:
        return [f"{len(frame):,} photos listed by the bucket's metadata; each photo is fetched on demand "
                "(pack them into shards to train at bucket scale: python -m core shards)."]

    def open(self, source, class_range: ClassRange, on_progress=None) -> Dataset:
        uri = str(source)
        frame = self.index(uri, on_progress)
        return labelled_dataset(Path(uri), self.name, index_key(uri), frame, class_range, self.notes(frame),
                                {"bucket": uri}, uri=uri)


BUCKET = Bucket()
