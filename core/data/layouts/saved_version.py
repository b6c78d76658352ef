"""A saved dataset version (core.data.labels.versions): its manifest parquet, read with its frozen split and classes."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.data.classes import ClassRange
from core.data.dataset import Dataset, DatasetError
from core.data.labels import versions
from core.data.labels.annotations import apply_overrides
from core.data.layouts.base import Layout, local_path


def load_version(path: str | Path, class_range: ClassRange | None = None) -> Dataset:
    """A version manifest → Dataset (layout "version") with its frozen split; usable wherever a dataset is."""
    path = Path(path).expanduser()
    info = versions.read_info(path)
    try:
        frame = pq.read_table(path).to_pandas()
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"{path.name}: cannot be read ({exc})") from None
    problem = versions.frame_problem(frame)
    if problem:
        raise DatasetError(f"{path.name}: a damaged dataset version ({problem})")
    stored = ClassRange.from_dict(info.get("class_range"))
    notes = []
    if class_range is not None and class_range != stored:
        notes.append(f"This version was made for classes {stored.describe()} and keeps them "
                     f"(the chosen range {class_range.describe()} does not apply to a saved version).")
    # Counts corrected by annotators since the version was made still apply.
    frame = apply_overrides(frame, info["base_key"])
    frame["cls"] = stored.assign(frame["count"])
    frame["split"] = frame["split"].where(frame["cls"].notna(), None)
    gone = frame["path"].map(lambda p: bool(p) and not Path(p).is_file()) & frame["problem"].isna()
    if gone.any():
        notes.append(f"{int(gone.sum()):,} photos of this version are no longer on disk (moved or deleted) "
                     "and are skipped.")
        frame.loc[gone, "problem"] = "photo missing on disk"
    split_info = {**info.get("split_info", {}), "source": "version", "version": info["name"],
                  "base_key": info["base_key"], "base_source": info.get("base_source"),
                  "weight_use": info.get("weight_use"), "strategy": info.get("strategy"),
                  "dropped": info.get("dropped", []), "parent": info.get("parent")}
    return Dataset(path, "version", info["base_key"], frame, stored, notes, split_info, version=info["name"])


class SavedVersion(Layout):
    name = "version"

    def detect(self, source) -> bool:
        path = local_path(source)
        return path is not None and path.exists() and path.suffix == versions.MANIFEST_SUFFIX

    def index(self, source: Path, on_progress=None):
        return load_version(source).frame

    def open(self, source: Path, class_range: ClassRange, on_progress=None) -> Dataset:
        return load_version(source, class_range)


SAVED_VERSION = SavedVersion()
