"""The dataset index of a folder or list: one row per photo (name, path, count, items, size, split), cached on disk."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from core import config
from core.data import abid
from core.data.classes import ClassRange
from core.data.images import SUPPORTED_SUFFIXES, image_size, shown_name, unreadable_name
from core.errors import BinsightError
from core.files import atomic_write_bytes, atomic_write_json

INDEX_VERSION = 4
COLUMNS = ["name", "path", "count", "label_source", "width", "height", "n_items", "item_names", "problem", "folder_split"]
COUNT_FOLDER = re.compile(r"[0-9]{1,6}")  # an ImageFolder class folder: its name is the count
IMAGEFOLDER_SPLITS = {
    "train": "train", "train_data": "train", "training": "train",
    "valid": "valid", "val": "valid", "valid_data": "valid", "validation": "valid", "val_data": "valid",
    "test": "test", "test_data": "test", "testing": "test",
}


class DatasetError(BinsightError):
    """The dataset cannot be used at all; the message says why and what to do."""


@dataclass
class Dataset:
    """An indexed dataset: `frame` has one row per photo, `cls` and `split` included."""

    source: Path
    layout: str
    key: str
    frame: pd.DataFrame
    class_range: ClassRange
    notes: list[str] = field(default_factory=list)
    split_info: dict = field(default_factory=dict)

    @property
    def classes(self) -> list[int]:
        return self.class_range.classes

    @property
    def location(self) -> str:
        """Where the dataset is, as the user wrote it: a shard set on S3 stays an s3:// URI (a Path would not)."""
        for layout in ("shards", "bucket"):
            if self.layout == layout and self.split_info.get(layout):
                return str(self.split_info[layout])
        return str(self.source)

    @property
    def problems(self) -> list[tuple[str, str]]:
        bad = self.frame[self.frame["problem"].notna()]
        return list(zip(bad["name"], bad["problem"]))

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


def detect_layout(source: Path) -> str:
    if source.is_file():
        if source.suffix != ".json":
            raise DatasetError(f"{source.name}: a dataset is a folder, a file_list.json or a counting list (.json)")
        try:
            head = source.read_text(errors="replace").lstrip()[:1]
        except OSError as exc:
            raise DatasetError(f"{source}: cannot be read ({exc})") from None
        return "counting_list" if head == "[" else "file_list"
    if (source / "bin-images").is_dir():
        return "abid"
    if (source / "file_list.json").is_file():
        return "abid"
    if _imagefolder_files(source):
        return "imagefolder"
    try:
        empty = not any(source.iterdir())
    except OSError as exc:
        raise DatasetError(f"{source}: cannot be read ({exc})") from None
    if empty:
        raise DatasetError(f"{source} is empty: expected bin-images/ + metadata/ (ABID layout), labels.csv, or <split>/<count>/*.jpg folders")
    raise DatasetError(
        f"{source} holds no bin photos in a known layout: expected bin-images/*.jpg with metadata/*.json or labels.csv "
        "(ABID layout), <split>/<count>/*.jpg folders (ImageFolder), or a file_list.json"
    )


def _imagefolder_files(source: Path) -> list[tuple[Path, int, str | None]]:
    """(photo, count, split) for <count>/*.jpg or <split>/<count>/*.jpg under source."""
    found = []

    def scan(folder: Path, split: str | None):
        for sub in sorted(folder.iterdir()):
            # ASCII digits only: "²" and "١" pass str.isdigit(), and a 20-digit name is no count either
            if sub.is_dir() and COUNT_FOLDER.fullmatch(sub.name):
                for photo in sorted(sub.iterdir()):
                    if photo.suffix.lower() in SUPPORTED_SUFFIXES:
                        found.append((photo, int(sub.name), split))

    scan(source, None)
    for sub in sorted(source.iterdir()):
        if sub.is_dir() and sub.name.lower() in IMAGEFOLDER_SPLITS:
            scan(sub, IMAGEFOLDER_SPLITS[sub.name.lower()])
    return found


def _list_mirror(source: Path) -> Path:
    """Where a counting list's photos are held locally: <list folder>/../bin-images/."""
    return source.parent.parent / "bin-images"


def _fingerprint(source: Path, layout: str) -> str:
    digest = hashlib.sha1(f"{INDEX_VERSION}:{layout}".encode())
    if source.is_file():
        stat = source.stat()
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
        if layout == "counting_list" and _list_mirror(source).is_dir():
            digest.update(f":{_list_mirror(source).stat().st_mtime_ns}".encode())
        return digest.hexdigest()
    for root, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            try:
                stat = os.stat(os.path.join(root, name))
            except OSError:
                continue
            digest.update(os.fsencode(f"{root}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n"))
    return digest.hexdigest()


def cached_index(source: Path, layout: str, key: str, on_progress=None) -> pd.DataFrame:
    folder = config.home() / "index"
    cache, stamp_file = folder / f"{key}.parquet", folder / f"{key}.json"
    stamp = _fingerprint(source, layout)
    try:
        if json.loads(stamp_file.read_text()).get("fingerprint") == stamp:
            return finish_index(pd.read_parquet(cache))
    except (OSError, ValueError):
        pass
    frame = build_index(source, layout, on_progress)
    atomic_write_bytes(cache, frame.to_parquet(index=False))
    atomic_write_json(stamp_file, {"fingerprint": stamp, "source": str(source), "layout": layout})
    return frame


def build_index(source: Path, layout: str, on_progress=None) -> pd.DataFrame:
    if layout == "counting_list":
        frame = abid.read_counting_list(source)
        frame["label_source"] = "counting_list"
        mirror = _list_mirror(source)  # photos held locally need no download; one listing, not a stat per name
        held = set(os.listdir(mirror)) if mirror.is_dir() else set()
        frame["path"] = [os.path.join(mirror, n) if n in held else None for n in frame["name"]]
        return _read_sizes(finish_index(frame), on_progress)
    if layout == "file_list":
        labels = abid.read_file_list(source)
        frame = pd.DataFrame({"name": list(labels), "count": pd.array(list(labels.values()), dtype="Int64")})
        frame["label_source"] = "file_list"
        folder = source.parent / "bin-images"
        frame["path"] = [str(folder / n) if (folder / n).is_file() else None for n in frame["name"]]
        return finish_index(frame)
    if layout == "imagefolder":
        rows = [
            {"name": str(p.relative_to(source)), "path": str(p), "count": c, "label_source": "folder", "folder_split": s}
            for p, c, s in _imagefolder_files(source)
        ]
        for row in rows:
            if unreadable_name(row["name"]):
                row.update(name=shown_name(row["name"]), path=None, problem=unreadable_name(row["name"]))
        frame = finish_index(pd.DataFrame(rows))
        return _read_sizes(frame, on_progress)
    return _index_abid(source, on_progress)


def _index_abid(source: Path, on_progress=None) -> pd.DataFrame:
    images = source / "bin-images"
    names = sorted(p.name for p in images.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES) if images.is_dir() else []
    listed = {}
    if (source / "file_list.json").is_file():
        listed = abid.read_file_list(source / "file_list.json")
    csv_labels, csv_problems = ({}, [])
    if (source / "labels.csv").is_file():
        csv_labels, csv_problems = abid.read_labels_csv(source / "labels.csv")
    names = sorted(set(names) | set(listed) | set(csv_labels))
    problems = dict(csv_problems)
    rows = []
    for name in names:
        row = {"name": name, "path": str(images / name) if (images / name).is_file() else None,
               "count": None, "label_source": None, "n_items": 0, "item_names": "", "items_json": None}
        if unreadable_name(name):
            row.update(name=shown_name(name), path=None, problem=unreadable_name(name))
            rows.append(row)
            continue
        meta_path = source / abid.metadata_key(name)
        if meta_path.is_file():
            try:
                meta = abid.parse_metadata(meta_path.read_bytes())
                row.update(n_items=len(meta.items), item_names=" | ".join(meta.item_names),
                           items_json=json.dumps(meta.items))
                if meta.expected_quantity is not None:
                    row.update(count=meta.expected_quantity, label_source="metadata")
            except ValueError as exc:
                problems.setdefault(name, f"metadata/{meta_path.name}: {exc}")
        if row["count"] is None and name in csv_labels:
            row.update(count=csv_labels[name], label_source="labels.csv")
        if row["count"] is None and name in listed:
            row.update(count=listed[name], label_source="file_list")
        if row["count"] is not None:
            problems.pop(name, None)  # another source labelled it
        row["problem"] = problems.get(name)
        rows.append(row)
    frame = finish_index(pd.DataFrame(rows))
    orphans = [n for n in problems if n not in set(frame["name"])]
    if orphans:
        extra = pd.DataFrame({"name": orphans, "problem": [problems[n] for n in orphans]})
        frame = finish_index(pd.concat([frame, extra], ignore_index=True))
    return _read_sizes(frame, on_progress)


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


def _read_sizes(frame: pd.DataFrame, on_progress=None) -> pd.DataFrame:
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


def index_notes(frame: pd.DataFrame, layout: str) -> list[str]:
    notes = []
    if frame.empty:
        notes.append("No photos found.")
    elif frame["count"].isna().all():
        notes.append("No labels found: add metadata/*.json (EXPECTED_QUANTITY) or a labels.csv of image,count.")
    remote = int(frame["path"].isna().sum())
    if remote:
        notes.append(f"{remote:,} photos are listed but not on disk; they can be fetched from the ABID bucket.")
    bad = int(frame["problem"].notna().sum())
    if bad:
        notes.append(f"{bad:,} photos or labels could not be used and are skipped (see the list of problems).")
    return notes


def apply_overrides(frame: pd.DataFrame, key: str) -> pd.DataFrame:
    """Counts corrected by annotators replace the recorded ones (the latest decision wins)."""
    try:
        from core.data.annotations import label_overrides
    except ImportError:
        return frame
    overrides = label_overrides(key)
    if not overrides:
        return frame
    frame = frame.copy()
    corrected = frame["name"].map(overrides)
    hit = corrected.notna() | frame["name"].isin([n for n, c in overrides.items() if c is None])
    frame.loc[hit, "count"] = pd.array(corrected[hit], dtype="Int64")
    frame.loc[hit, "label_source"] = "annotation"
    return frame


def photo_items(dataset: Dataset, name: str) -> list[dict]:
    """The metadata items of one photo (name, ASIN, quantity, dimensions, weight)."""
    row = dataset.frame.loc[dataset.frame["name"] == name]
    if row.empty or not row.iloc[0]["items_json"]:
        return []
    return json.loads(row.iloc[0]["items_json"])
