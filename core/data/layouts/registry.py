"""Opening a dataset: the ordered registry of layout readers that load_dataset walks; the first that knows the source reads it."""
from __future__ import annotations

from pathlib import Path

from core import config
from core.data.classes import ClassRange
from core.data.dataset import Dataset, DatasetError
from core.data.layouts.abid_folder import ABID_FOLDER
from core.data.layouts.base import Layout, local_path
from core.data.layouts.bucket import BUCKET
from core.data.layouts.counting_list import COUNTING_LIST
from core.data.layouts.demo import DEMO
from core.data.layouts.file_list import FILE_LIST
from core.data.layouts.imagefolder import IMAGEFOLDER
from core.data.layouts.manifest import MANIFEST
from core.data.layouts.saved_version import SAVED_VERSION
from core.data.layouts.shard_set import SHARD_SET

# The order matters: a bucket prefix holding a shard index is a shard set; a .json starting "[" is a counting list.
READERS: list[Layout] = [
    DEMO,
    SHARD_SET,
    BUCKET,
    SAVED_VERSION,
    MANIFEST,
    COUNTING_LIST,
    FILE_LIST,
    ABID_FOLDER,
    IMAGEFOLDER,
]


def reader_for(source) -> Layout:
    """The reader of `source`'s layout, or a DatasetError that says what was expected."""
    for reader in READERS:
        if reader.detect(source):
            return reader
    raise DatasetError(_unknown(local_path(source)))


def _unknown(source: Path) -> str:
    if not source.exists():
        return f"{source} does not exist: check the path, or leave it empty to use the demo set"
    if source.is_file():
        return f"{source.name}: a dataset is a folder, a file_list.json or a counting list (.json)"
    try:
        empty = not any(source.iterdir())
    except OSError as exc:
        return f"{source}: cannot be read ({exc})"
    if empty:
        return f"{source} is empty: expected bin-images/ + metadata/ (ABID layout), labels.csv, or <split>/<count>/*.jpg folders"
    return (f"{source} holds no bin photos in a known layout: expected bin-images/*.jpg with metadata/*.json or labels.csv "
            "(ABID layout), <split>/<count>/*.jpg folders (ImageFolder), or a file_list.json")


def load_dataset(source: str | Path | None = None, class_range: ClassRange | None = None,
                 on_progress=None) -> Dataset:
    """Read `source` (default: the configured dataset, else the demo set) with its layout's reader: classes, split."""
    if source is None:
        source = config.data_dir()
    if class_range is None:
        class_range = ClassRange.from_dict(config.load_settings().get("class_range"))
    reader = reader_for(source)
    return reader.open(local_path(source) or source, class_range, on_progress)
