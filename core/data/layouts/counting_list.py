"""A counting list (.json of [index, count] pairs); photos held locally in <list folder>/../bin-images/."""
from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from core.data.dataset import DatasetError, finish_index
from core.data.labels import abid
from core.data.layouts.base import Layout, local_path, read_sizes


def mirror(source: Path) -> Path:
    """Where a counting list's photos are held locally: <list folder>/../bin-images/."""
    return source.parent.parent / "bin-images"


class CountingList(Layout):
    name = "counting_list"

    def detect(self, source) -> bool:
        path = local_path(source)
        if path is None or not path.is_file() or path.suffix != ".json":
            return False
        try:
            return path.read_text(errors="replace").lstrip()[:1] == "["
        except OSError as exc:
            raise DatasetError(f"{path}: cannot be read ({exc})") from None

    def digest(self, source: Path, stamps: dict | None = None):
        digest = super().digest(source, stamps)
        if mirror(source).is_dir():
            digest.update(f":{mirror(source).stat().st_mtime_ns}".encode())
        return digest

    def pool_photos(self, source: Path) -> pd.DataFrame:
        return abid.read_counting_list(source)

    def index(self, source: Path, on_progress=None) -> pd.DataFrame:
        frame = abid.read_counting_list(source)
        frame["label_source"] = "counting_list"
        held_in = mirror(source)  # photos held locally need no download; one listing, not a stat per name
        held = set(os.listdir(held_in)) if held_in.is_dir() else set()
        frame["path"] = [os.path.join(held_in, n) if n in held else None for n in frame["name"]]
        return read_sizes(finish_index(frame), on_progress)


COUNTING_LIST = CountingList()
