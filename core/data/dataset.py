"""What a dataset is: its index (one row per photo: name, path, count, items, size, split), the index's one shape, the errors."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from core.data.classes import ClassRange
from core.errors import BinsightError
from core.files import file_stamps

COLUMNS = ["name", "path", "count", "label_source", "width", "height", "n_items", "item_names", "problem", "folder_split"]


class DatasetError(BinsightError):
    """The dataset cannot be used at all; the message says why and what to do."""


@dataclass
class Dataset:
    """An indexed dataset: `frame` has one row per photo, `cls` and `split` included.

    `uri` is where it is when that is no local path (a bucket, a shard set); `streams` says its photos are packed in
    shards and read as a stream, not as files; `version` names the saved version it is, if it is one.
    """

    source: Path
    layout: str
    key: str
    frame: pd.DataFrame
    class_range: ClassRange
    notes: list[str] = field(default_factory=list)
    split_info: dict = field(default_factory=dict)
    uri: str | None = None
    streams: bool = False
    version: str | None = None
    # the index as read (before annotators' corrections and the split) and what its reader added to split_info:
    # core.data.layouts.base.relabelled applies the labels again from them
    indexed: pd.DataFrame | None = field(default=None, repr=False)
    reader_info: dict = field(default_factory=dict)
    # each photo file's stamp (core.files.file_stamp) as the reader's index check found it while loading: the views
    # that key their caches by the files (photo checks, the map) read them here instead of one stat per photo
    stamps: pd.Series | None = field(default=None, repr=False)
    # the version of every photo file the index has on disk, as loaded (the reader's fingerprint, when its walk stamped
    # them all): the views key their saved results by it instead of by each photo's file; None when unknown
    files_fingerprint: str | None = None

    @property
    def classes(self) -> list[int]:
        return self.class_range.classes

    @property
    def location(self) -> str:
        """Where the dataset is, as the user wrote it: a shard set on S3 stays an s3:// URI (a Path would not)."""
        return self.uri or str(self.source)

    @property
    def problems(self) -> list[tuple[str, str]]:
        bad = self.frame[self.frame["problem"].notna()]
        return list(zip(bad["name"], bad["problem"]))

    def file_stamps(self, paths) -> list[str]:
        """The stamps of these photo files: as loaded where the reader found them, else read now."""
        return file_stamps(paths, self.stamps)

    def paths_of(self, names) -> dict:
        """{name: path (None when not on disk)} of these photos (the first row of a name listed twice): a look-up
        of a few names, not an index of every photo (~0.3 s at 536 K)."""
        names = set(names)
        found = self.frame.loc[self.frame["name"].isin(names), ["name", "path"]].drop_duplicates("name")
        return dict(zip(found["name"], found["path"]))

    def labelled(self) -> pd.DataFrame:
        """Usable photos whose count is inside the class range: what training and evaluation see."""
        return self.frame[self.frame["cls"].notna() & self.frame["problem"].isna()]

    def rows(self, split: str = "all") -> pd.DataFrame:
        """Labelled photos on disk of one split ('train', 'valid', 'test' or 'all'): what a model reads."""
        rows = self.labelled()
        rows = rows[rows["path"].notna()]
        return rows if split == "all" else rows[rows["split"] == split]

    def excluded(self) -> pd.DataFrame:
        """Usable, labelled photos outside the class range."""
        frame = self.frame
        return frame[frame["cls"].isna() & frame["count"].notna() & frame["problem"].isna()]

    def summary(self) -> dict:
        frame = self.frame
        return {
            "photos": len(frame),
            "labelled": int(frame["count"].notna().sum()),
            "in_range": len(self.labelled()),
            "excluded": len(self.excluded()),
            "problems": int(frame["problem"].notna().sum()),
            "classes": self.classes,
            "label_sources": frame["label_source"].value_counts().to_dict(),
        }


def dataset_key(source: Path) -> str:
    return hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]


def finish_index(frame: pd.DataFrame) -> pd.DataFrame:
    """Every index column present, with its type: the one shape every layout's index has."""
    for column in COLUMNS + ["items_json"]:
        if column not in frame:
            frame[column] = None
    frame["count"] = frame["count"].astype("Int64")
    frame["n_items"] = frame["n_items"].fillna(0).astype("int32")
    frame["item_names"] = frame["item_names"].fillna("").astype(str)
    for column in ("path", "label_source", "problem", "folder_split", "items_json"):
        frame[column] = frame[column].astype(object).where(frame[column].notna(), None)
    frame["width"] = frame["width"].astype("Int32")
    frame["height"] = frame["height"].astype("Int32")
    return frame.reset_index(drop=True)


def photo_items(dataset: Dataset, name: str) -> list[dict]:
    """The metadata items of one photo (name, ASIN, quantity, dimensions, weight)."""
    row = dataset.frame.loc[dataset.frame["name"] == name]
    if row.empty or not row.iloc[0]["items_json"]:
        return []
    return json.loads(row.iloc[0]["items_json"])
