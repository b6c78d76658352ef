"""A packed shard set (core.data.remote.shards), local or s3://: its shards.json lists the photos; training streams them."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd

from core.data.classes import ClassRange
from core.data.dataset import Dataset, finish_index
from core.data.layouts.base import Layout
from core.data.remote.shard_store import INDEX_NAME, is_shard_source, open_store, read_complete_index


def shard_frame(index: dict) -> pd.DataFrame:
    """One row per packed photo: path None, its split, shard and sample key kept."""
    rows = [{"name": name, "count": count, "split": shard["split"], "shard": shard["name"], "key": key,
             "label_source": "shards"} for shard in index["shards"] for key, name, count in shard["photos"]]
    return finish_index(pd.DataFrame(rows, columns=["name", "count", "split", "shard", "key", "label_source"]))


class ShardSet(Layout):
    name = "shards"

    def detect(self, source) -> bool:
        if source is None:
            return False
        if str(source).startswith("s3://"):  # a bucket prefix is a shard set when it holds a shard index
            return open_store(str(source)).read_index() is not None
        return is_shard_source(source)

    def fingerprint(self, source, stamps: dict | None = None) -> str:
        return read_complete_index(open_store(source))["fingerprint"]

    def index(self, source, on_progress=None) -> pd.DataFrame:
        return shard_frame(read_complete_index(open_store(source)))

    def open(self, source, class_range: ClassRange | None, on_progress=None) -> Dataset:
        """The packed classes are kept (a note says so when another range was chosen), and so is the packed split."""
        store = open_store(source)
        index = read_complete_index(store)
        frame = shard_frame(index)
        stored = ClassRange.from_dict(index.get("class_range"))
        frame["cls"] = stored.assign(frame["count"])
        frame["split"] = frame["split"].astype(object).where(frame["cls"].notna(), None)
        notes = [f"{len(frame):,} photos packed in {len(index['shards'])} shards at {store.location}: "
                 "training streams them; they are not separate files."]
        if class_range is not None and class_range != stored:
            notes.append(f"These shards were packed for classes {stored.describe()} and keep them.")
        skipped = [entry for entry in index["skipped"] if entry["split"]]
        if skipped:
            notes.append(f"{len(skipped):,} unreadable photos were left out when packing (listed in {INDEX_NAME}).")
        key = hashlib.sha1(store.location.encode()).hexdigest()[:12]
        split_info = {"source": "shards", "shards": store.location, "seed": index["seed"],
                      "fingerprint": index["fingerprint"]}
        return Dataset(Path(store.location), self.name, key, frame, stored, notes, split_info,
                       uri=store.location, streams=True)


SHARD_SET = ShardSet()
