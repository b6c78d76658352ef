"""Candidate pools: photos of known count that a dataset does not hold yet, in a bucket list or a local folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from core.data.labels import abid
from core.data.dataset import Dataset, DatasetError
from core.data.layouts.registry import reader_for
from core.data.remote.s3 import S3Source, place_file, write_labels


@dataclass
class Pool:
    """Photos with a count (`photos`: name, count[, path]) that can be copied into an ABID-layout folder."""

    description: str
    photos: pd.DataFrame
    source: S3Source | None = None
    folder: Path | None = None

    @property
    def kind(self) -> str:
        return "s3" if self.source is not None else "folder"

    def materialise(self, photos: pd.DataFrame, target: Path, on_progress=None) -> Path:
        """Put these pool photos (name, count) into `target` as bin-images/, metadata/ and labels.csv."""
        counts = {name: int(count) for name, count in zip(photos["name"], photos["count"])}
        if self.source is not None:
            return self.source.fetch_dataset(counts, target, on_progress=on_progress)
        paths = self.photos.set_index("name")["path"]
        total = len(counts)
        for i, name in enumerate(counts):
            original = Path(paths[name])
            place_file(original, target / abid.image_key(name))
            metadata = original.parent.parent / abid.metadata_key(original.name)
            if metadata.is_file():
                place_file(metadata, target / abid.metadata_key(name))
            if on_progress and (i % 50 == 0 or i == total - 1):
                on_progress((i + 1) / total, f"Copied {i + 1:,} of {total:,} photos from {self.folder}")
        write_labels(target, counts)
        return target


def list_pool(lists: str | Path | list, source: S3Source | None = None) -> Pool:
    """The bucket photos named by file_list.json and/or counting lists (the first list wins on a repeat)."""
    paths = [Path(p).expanduser() for p in (lists if isinstance(lists, (list, tuple)) else [lists])]
    frames = []
    for path in paths:
        if not path.is_file():
            raise DatasetError(f"{path} does not exist: give a file_list.json or a counting list (.json)")
        frames.append(reader_for(path).pool_photos(path))
    photos = pd.concat(frames, ignore_index=True).drop_duplicates("name").reset_index(drop=True)
    source = source or S3Source()
    names = " + ".join(p.name for p in paths)
    return Pool(f"{names} in {source.settings.describe()}", photos, source=source)


def folder_pool(folder: str | Path) -> Pool:
    """The labelled, readable photos of a local folder (ABID layout or ImageFolder), named by file name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder: a local pool is a folder of photos with labels")
    frame = reader_for(folder).index(folder)
    usable = frame[frame["count"].notna() & frame["problem"].isna() & frame["path"].notna()]
    photos = pd.DataFrame({"name": usable["path"].map(lambda p: Path(p).name), "count": usable["count"],
                           "path": usable["path"]}).drop_duplicates("name").reset_index(drop=True)
    return Pool(f"local folder {folder}", photos, folder=folder)


def candidates(pool: Pool, dataset: Dataset) -> pd.DataFrame:
    """Pool photos the dataset does not hold (nor dropped while balancing), in its class range: name, count, cls."""
    held = set(dataset.frame["name"].map(lambda n: Path(str(n)).name))
    held |= set(dataset.split_info.get("dropped") or [])
    photos = pool.photos[~pool.photos["name"].isin(held)].copy()
    photos["cls"] = dataset.class_range.assign(photos["count"])
    return photos[photos["cls"].notna()].reset_index(drop=True)


def availability(pool: Pool, dataset: Dataset) -> pd.Series:
    """How many new photos the pool offers for each class (every class listed)."""
    return candidates(pool, dataset)["cls"].value_counts().reindex(dataset.classes, fill_value=0).astype(int)


def pick(pool: Pool, dataset: Dataset, more: dict[int, int], seed: int = 0) -> tuple[pd.DataFrame, dict[int, int]]:
    """N new photos per class, drawn at random (seeded); returns (name, count, cls rows, {class: shortfall})."""
    available = candidates(pool, dataset)
    rng = np.random.default_rng(seed)
    chosen, short = [], {}
    for cls, wanted in sorted(more.items()):
        wanted = int(wanted)
        if wanted <= 0:
            continue
        group = available[available["cls"] == int(cls)]
        if len(group) < wanted:
            short[int(cls)] = wanted - len(group)
        order = rng.permutation(len(group))[:wanted]
        chosen.append(group.iloc[np.sort(order)])
    if not chosen:
        return available.iloc[0:0][["name", "count", "cls"]], short
    picked = pd.concat(chosen, ignore_index=True)[["name", "count", "cls"]]
    return picked, short
