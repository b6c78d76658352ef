"""Opening a dataset by its source: a folder or list is indexed, a version or shard index is read, nothing means the demo."""
from __future__ import annotations

from pathlib import Path

from core import config
from core.data import splits
from core.data.bucket_index import bucket_frame, bucket_notes, index_key
from core.data.classes import ClassRange
from core.data.dataset import (
    Dataset,
    DatasetError,
    apply_overrides,
    cached_index,
    dataset_key,
    detect_layout,
    index_notes,
)
from core.data.demo import ensure_demo
from core.data.shard_store import is_shard_source, open_store
from core.data.shards import load_shards_dataset
from core.data.versions import load_version


def load_dataset(source: str | Path | None = None, class_range: ClassRange | None = None,
                 on_progress=None) -> Dataset:
    """Index `source` (default: the configured dataset, else the demo set) and attach classes and split."""
    if source is None:
        source = config.data_dir()
    if source is None:
        source = ensure_demo(on_progress=on_progress)
    if class_range is None:
        class_range = ClassRange.from_dict(config.load_settings().get("class_range"))
    if str(source).startswith("s3://") and open_store(str(source)).read_index() is None:
        # a bucket (or prefix) of photos and metadata JSONs, not a shard set: index it from its metadata
        uri = str(source)
        frame = bucket_frame(uri, on_progress)
        return labelled_dataset(Path(uri), "bucket", index_key(uri), frame, class_range, bucket_notes(frame),
                                {"bucket": uri})
    if is_shard_source(source):  # a packed shard set (core.data.shards): its index lists the photos
        return load_shards_dataset(source, class_range)
    source = Path(source).expanduser()
    if not source.exists():
        raise DatasetError(f"{source} does not exist: check the path, or leave it empty to use the demo set")
    if source.suffix == ".parquet":  # a dataset version (core.versions): a manifest of rows with a frozen split
        return load_version(source, class_range)
    layout = detect_layout(source)
    key = dataset_key(source)
    frame = cached_index(source, layout, key, on_progress)
    return labelled_dataset(source, layout, key, frame, class_range, index_notes(frame, layout))


def labelled_dataset(source: Path, layout: str, key: str, frame, class_range: ClassRange, notes: list[str],
                     info: dict | None = None) -> Dataset:
    """An index made a dataset: counts corrected by annotators, the classes, and the saved split."""
    frame = apply_overrides(frame, key)
    frame["cls"] = class_range.assign(frame["count"])
    frame, split_info = splits.attach_split(frame, key, class_range)
    frame["split"] = frame["split"].astype(object).where(frame["split"].notna(), None)
    return Dataset(source, layout, key, frame, class_range, notes, split_info | (info or {}))
