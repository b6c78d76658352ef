"""The reader of a data layout (`Layout`): detect, fingerprint, index, notes; and the index cache every reader shares."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd

from core import config
from core.data.classes import ClassRange
from core.data.dataset import Dataset, DatasetError, dataset_key, finish_index
from core.data.labels import splits
from core.data.labels.annotations import apply_overrides
from core.data.photos.images import SUPPORTED_SUFFIXES, image_size
from core.files import atomic_write_bytes, atomic_write_json, stamp_of

INDEX_VERSION = 4


def local_path(source) -> Path | None:
    """`source` as a local path, or None when it is nothing local (no source, an s3:// URI)."""
    if source is None or str(source).startswith("s3://"):
        return None
    return Path(source).expanduser()


class Layout:
    """A reader of one data layout. `name` is the Dataset's layout; a new layout is a subclass and a registry line.

    `detect(source)` says whether the source is in this layout; `index(source, on_progress)` reads it into the one
    index shape (`finish_index`); `fingerprint(source)` changes whenever the index would; `notes(frame)` are what the
    user should know about it. `open` makes the Dataset: by default from the index cached under BINSIGHT_HOME.
    """

    name = ""
    fetched_on_demand = True  # a photo listed but not on disk comes from the ABID bucket when it is needed

    def detect(self, source) -> bool:
        raise NotImplementedError

    def index(self, source: Path, on_progress=None) -> pd.DataFrame:
        raise NotImplementedError

    def digest(self, source: Path, stamps: dict | None = None):
        """The fingerprint's hash: the layout, and the size and time of the source file or of every file below it.
        stamps: filled with the photos' stamps (path: "size:mtime") the walk read, for the views keyed by them."""
        digest = hashlib.sha1(f"{INDEX_VERSION}:{self.name}".encode())
        if source.is_file():
            stat = source.stat()
            digest.update(stamp_of(stat).encode())
            return digest
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(root, name)
                try:
                    stat = os.stat(path)
                except OSError:
                    continue
                stamp = stamp_of(stat)
                digest.update(os.fsencode(f"{root}/{name}:{stamp}\n"))
                if stamps is not None and os.path.splitext(name)[1].lower() in SUPPORTED_SUFFIXES:
                    stamps[path] = stamp
        return digest

    def fingerprint(self, source: Path, stamps: dict | None = None) -> str:
        """Changes whenever the index would; fills `stamps` (see digest) when it walks the photos."""
        return self.digest(source, stamps).hexdigest()

    def notes(self, frame: pd.DataFrame) -> list[str]:
        notes = []
        if frame.empty:
            notes.append("No photos found.")
        elif frame["count"].isna().all():
            notes.append("No labels found: add metadata/*.json (EXPECTED_QUANTITY) or a labels.csv of image,count.")
        remote = int(frame["path"].isna().sum())
        if remote and self.fetched_on_demand:
            notes.append(f"{remote:,} photos are listed but not on disk; they can be fetched from the ABID bucket.")
        bad = int(frame["problem"].notna().sum())
        if bad:
            notes.append(f"{bad:,} photos or labels could not be used and are skipped (see the list of problems).")
        return notes

    def open(self, source: Path, class_range: ClassRange, on_progress=None) -> Dataset:
        key = dataset_key(source)
        stamps: dict[str, str] = {}
        stamp = self.fingerprint(source, stamps)  # fills `stamps` with the photos' stamps it read
        frame = self.cached_index(source, key, stamp, on_progress)
        stamp_series = _stamp_series(stamps) if stamps else None
        return labelled_dataset(source, self.name, key, frame, class_range, self.notes(frame), stamps=stamp_series,
                                files_fingerprint=files_fingerprint(frame, stamp, stamp_series))

    def cached_index(self, source: Path, key: str, stamp: str, on_progress=None) -> pd.DataFrame:
        """The index saved under BINSIGHT_HOME/index/<key> while its fingerprint (`stamp`) holds, else indexed
        anew and saved."""
        folder = config.home() / "index"
        cache, stamp_file = folder / f"{key}.parquet", folder / f"{key}.json"
        try:
            if json.loads(stamp_file.read_text()).get("fingerprint") == stamp:
                return finish_index(pd.read_parquet(cache))
        except (OSError, ValueError):
            pass
        frame = self.index(source, on_progress)
        atomic_write_bytes(cache, frame.to_parquet(index=False))
        atomic_write_json(stamp_file, {"fingerprint": stamp, "source": str(source), "layout": self.name})
        return frame

    def pool_photos(self, source: Path) -> pd.DataFrame:
        """The bucket photos a list names (name, count): what a candidate pool offers. Only lists have them."""
        raise DatasetError(f"{source.name}: not a list of bucket photos: give a file_list.json or a counting list (.json)")


def files_fingerprint(frame: pd.DataFrame, fingerprint: str, stamps: pd.Series | None) -> str | None:
    """The fingerprint as a version of the photo files, when the walk that made it stamped every photo the index has
    on disk (then a view keyed by it needs no look at each file); None when some photo lies outside that walk."""
    if stamps is None:
        return None
    on_disk = frame["path"].dropna()
    if len(on_disk) > len(stamps) or not on_disk.isin(stamps.index).all():
        return None
    return fingerprint


def _stamp_series(stamps: dict) -> pd.Series:
    """The stamps by path, held as Python strings: a file name need not be valid UTF-8, which Arrow requires."""
    return pd.Series(list(stamps.values()), index=pd.Index(list(stamps), dtype=object), dtype=object)


def labelled_dataset(source: Path, layout: str, key: str, frame: pd.DataFrame, class_range: ClassRange,
                     notes: list[str], info: dict | None = None, uri: str | None = None,
                     stamps: pd.Series | None = None, files_fingerprint: str | None = None) -> Dataset:
    """An index made a dataset: counts corrected by annotators, the classes, and the saved split."""
    indexed = frame
    frame = apply_overrides(frame.copy(), key)  # (a copy: the index stays as read)
    frame["cls"] = class_range.assign(frame["count"])
    frame, split_info = splits.attach_split(frame, key, class_range)
    frame["split"] = frame["split"].astype(object).where(frame["split"].notna(), None)
    return Dataset(source, layout, key, frame, class_range, notes, split_info | (info or {}), uri=uri, indexed=indexed,
                   reader_info=dict(info or {}), stamps=stamps, files_fingerprint=files_fingerprint)


def relabelled(dataset: Dataset) -> Dataset | None:
    """The dataset with the labels as they are now (annotators' decisions since it was loaded), from the index it
    was read from, without reading the photos' folder again (at 536 K photos a reload is ~12 s, this ~2 s); None
    when it does not keep its index (reload it)."""
    if dataset.indexed is None:
        return None
    return labelled_dataset(dataset.source, dataset.layout, dataset.key, dataset.indexed, dataset.class_range,
                            dataset.notes, dataset.reader_info, uri=dataset.uri, stamps=dataset.stamps,
                            files_fingerprint=dataset.files_fingerprint)


def read_sizes(frame: pd.DataFrame, on_progress=None) -> pd.DataFrame:
    """Each photo's width and height read from its file; an unreadable file becomes the row's problem."""
    widths, heights, problems = [], [], list(frame["problem"])
    total = len(frame)
    for i, path in enumerate(frame["path"]):
        size = image_size(path) if path else None
        if path and size is None and problems[i] is None:
            problems[i] = "not a readable image (corrupt or not a JPEG/PNG)"
        widths.append(size[0] if size else None)
        heights.append(size[1] if size else None)
        if on_progress and (i % 200 == 0 or i == total - 1):
            on_progress((i + 1) / total, f"Indexing photos {i + 1}/{total}")
    frame["width"] = pd.array(widths, dtype="Int32")
    frame["height"] = pd.array(heights, dtype="Int32")
    frame["problem"] = problems
    return frame
