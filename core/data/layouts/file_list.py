"""A file_list.json on its own (the Udacity format): count → photo names; photos held in the bin-images/ beside it."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from core.data.dataset import finish_index
from core.data.labels import abid
from core.data.layouts.base import Layout, local_path


class FileList(Layout):
    name = "file_list"

    def detect(self, source) -> bool:
        path = local_path(source)
        return path is not None and path.is_file() and path.suffix == ".json"  # after counting lists, also .json

    def pool_photos(self, source: Path) -> pd.DataFrame:
        labels = abid.read_file_list(source)
        return pd.DataFrame({"name": list(labels), "count": pd.array(list(labels.values()), dtype="Int64")})

    def index(self, source: Path, on_progress=None) -> pd.DataFrame:
        frame = self.pool_photos(source)
        frame["label_source"] = "file_list"
        folder = source.parent / "bin-images"
        frame["path"] = [str(folder / n) if (folder / n).is_file() else None for n in frame["name"]]
        return finish_index(frame)


FILE_LIST = FileList()
