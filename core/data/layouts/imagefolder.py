"""The ImageFolder layout: <count>/*.jpg or <split>/<count>/*.jpg, the folder's name being the count."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from core.data.dataset import finish_index
from core.data.layouts.base import Layout, local_path, read_sizes
from core.data.photos.images import SUPPORTED_SUFFIXES, shown_name, unreadable_name

COUNT_FOLDER = re.compile(r"[0-9]{1,6}")  # an ImageFolder class folder: its name is the count
SPLIT_FOLDERS = {
    "train": "train", "train_data": "train", "training": "train",
    "valid": "valid", "val": "valid", "valid_data": "valid", "validation": "valid", "val_data": "valid",
    "test": "test", "test_data": "test", "testing": "test",
}


def photos(source: Path) -> list[tuple[Path, int, str | None]]:
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
        if sub.is_dir() and sub.name.lower() in SPLIT_FOLDERS:
            scan(sub, SPLIT_FOLDERS[sub.name.lower()])
    return found


class ImageFolder(Layout):
    name = "imagefolder"

    def detect(self, source) -> bool:
        path = local_path(source)
        return path is not None and path.is_dir() and bool(photos(path))

    def index(self, source: Path, on_progress=None) -> pd.DataFrame:
        rows = [
            {"name": str(p.relative_to(source)), "path": str(p), "count": c, "label_source": "folder", "folder_split": s}
            for p, c, s in photos(source)
        ]
        for row in rows:
            if unreadable_name(row["name"]):
                row.update(name=shown_name(row["name"]), path=None, problem=unreadable_name(row["name"]))
        return read_sizes(finish_index(pd.DataFrame(rows)), on_progress)


IMAGEFOLDER = ImageFolder()
