"""WebDataset shard sets: packing a dataset into per-split tar shards (resumable); core.data.layouts.shard_set reads them."""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from core.data.labels import abid
from core.data.dataset import Dataset
from core.data.remote.shard_store import (  # noqa: F401 — ShardError, INDEX_NAME are part of this module's interface
    INDEX_FORMAT,
    INDEX_NAME,
    ShardError,
    ShardStore,
    open_store,
)

SPLITS = ("train", "valid", "test")
DEFAULT_SHARD_BYTES = 200_000_000
FETCH_BATCH = 64  # bucket photos downloaded together while packing
TAR_MTIME = 0  # fixed member times: the same photos make byte-identical shards


def parse_size(text: str | int) -> int:
    """'200MB', '1.5GB', '500k' or a number of bytes → bytes."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not match:
        raise ShardError(f"shard size {text!r} is not a size like 200MB or 1GB")
    value = float(match.group(1)) * 1000 ** " kmgt".index(match.group(2) or " ")
    if value < 1:
        raise ShardError(f"shard size {text!r} is too small")
    return int(value)


# -- packing --------------------------------------------------------------------------------------------

@dataclass
class Photo:
    """One photo to pack: its name, local path (None: in the bucket), count, class and sample key."""

    name: str
    path: str | None
    count: int
    cls: int
    key: str


def plan(dataset: Dataset, seed: int = 0) -> dict[str, list[Photo]]:
    """Per split, the labelled photos in a seeded random order, each with a unique sample key."""
    frame = dataset.labelled()
    frame = frame[frame["split"].notna()]
    used: set[str] = set()
    planned = {}
    for i, split in enumerate(SPLITS):
        rows = frame[frame["split"] == split].sort_values("name")
        order = np.random.default_rng([seed, i]).permutation(len(rows))
        photos = []
        for row in rows.iloc[order].itertuples():
            key = base = re.sub(r"[^A-Za-z0-9_-]", "_", str(PurePosixPath(row.name).with_suffix("")))
            n = 1
            while key in used:  # webdataset keys end at the first dot and must be unique
                n += 1
                key = f"{base}_{n}"
            used.add(key)
            photos.append(Photo(row.name, row.path, int(row.count), int(row.cls), key))
        planned[split] = photos
    return planned


def fingerprint(planned: dict[str, list[Photo]], seed: int, shard_bytes: int, classes: dict) -> str:
    digest = hashlib.sha1(json.dumps([seed, shard_bytes, classes]).encode())
    for split, photos in planned.items():
        for photo in photos:
            digest.update(f"{split}\0{photo.name}\0{photo.count}\n".encode())
    return digest.hexdigest()


def photo_problem(data: bytes) -> str | None:
    """Why these bytes are not a usable photo, or None."""
    from PIL import Image

    from core.data.photos.images import SUPPORTED_FORMATS

    if not data:
        return "the file is empty (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            kind = image.format
            image.verify()
    except Exception as exc:  # noqa: BLE001 — any decoder failure means the photo is unusable
        return f"not a readable image ({type(exc).__name__}: {exc})"
    return None if kind in SUPPORTED_FORMATS else f"{kind} is not a supported photo format"


def _local_files(photo: Photo) -> tuple[bytes, bytes | None]:
    path = Path(photo.path)
    data = path.read_bytes()
    meta = path.parent.parent / "metadata" / f"{path.stem}.json"  # ABID layout: bin-images/ beside metadata/
    return data, (meta.read_bytes() if meta.is_file() else None)


class _Files:
    """The bytes of the photos to pack, read from disk or fetched from the bucket a batch at a time."""

    def __init__(self, bucket=None):
        self.bucket = bucket
        self.fetched: dict[str, Path | None] = {}

    def prefetch(self, photos: list[Photo]) -> None:
        remote = [p for p in photos if not p.path]
        if not remote:
            return
        if self.bucket is None:
            from core.data.remote.s3 import S3Source

            self.bucket = S3Source()
        keys = [abid.image_key(p.name) for p in remote] + [abid.metadata_key(p.name) for p in remote]
        already = {k for k in keys if self.bucket.cached(k)}
        self.fetched = self.bucket.fetch(keys, missing_ok=True)
        self.fresh = [path for key, path in self.fetched.items() if path and key not in already]

    def release(self) -> None:
        """Forget the batch; files downloaded only for packing leave the cache (the bucket may be huge)."""
        for path in getattr(self, "fresh", []):
            path.unlink(missing_ok=True)
        self.fetched, self.fresh = {}, []

    def read(self, photo: Photo) -> tuple[bytes, bytes | None]:
        if photo.path:
            return _local_files(photo)
        image = self.fetched.get(abid.image_key(photo.name))
        if image is None:
            raise FileNotFoundError(f"{abid.image_key(photo.name)} is not in the bucket")
        meta = self.fetched.get(abid.metadata_key(photo.name))
        return image.read_bytes(), (meta.read_bytes() if meta else None)


class _ShardWriter:
    """One shard being written to a staging file; published only once closed."""

    def __init__(self, store: ShardStore, split: str, number: int):
        import webdataset as wds

        self.store, self.split = store, split
        self.name = f"{split}-{number:06d}.tar"
        self.staged = store.staging_dir() / f".{self.name}.partial"
        self.handle = open(self.staged, "wb")
        self.tar = wds.TarWriter(self.handle, encoder=False, mtime=TAR_MTIME)
        self.photos: list[list] = []
        self.classes: dict[str, int] = {}

    def add(self, photo: Photo, image: bytes, metadata: bytes | None) -> None:
        ext = PurePosixPath(photo.name).suffix.lower().lstrip(".").replace("jpeg", "jpg") or "jpg"
        sample = {"__key__": photo.key, ext: image, "cls": str(photo.count).encode()}
        if metadata is not None:
            sample["json"] = metadata
        self.tar.write(sample)
        self.photos.append([photo.key, photo.name, photo.count])
        self.classes[str(photo.cls)] = self.classes.get(str(photo.cls), 0) + 1

    @property
    def size(self) -> int:
        return self.handle.tell()

    def finish(self) -> dict:
        self.tar.close()  # closes the file too
        size = self.staged.stat().st_size
        self.store.publish(self.staged, self.name)
        return {"name": self.name, "split": self.split, "samples": len(self.photos), "bytes": size,
                "classes": self.classes, "photos": self.photos}


def pack_shards(dataset: Dataset, dest: str | Path, shard_size: str | int = DEFAULT_SHARD_BYTES, seed: int = 0,
                on_progress=None, bucket=None) -> dict:
    """Pack the dataset's labelled photos into per-split shards at `dest`; resumes an unfinished packing.

    `on_progress(fraction, text)` follows every photo. `bucket` (an S3Source) serves photos not on disk.
    Returns the index written to dest/shards.json.
    """
    shard_bytes = parse_size(shard_size)
    store = open_store(dest)
    planned = plan(dataset, seed)
    stamp = fingerprint(planned, seed, shard_bytes, dataset.class_range.to_dict())
    index = store.read_index()
    if index is not None and index.get("fingerprint") != stamp:
        raise ShardError(f"{store.location} already holds shards of another dataset, split, seed or shard size; "
                         "pack into an empty destination (or delete those shards first)")
    if index is None:
        index = {"format": INDEX_FORMAT, "complete": False, "fingerprint": stamp, "seed": seed,
                 "shard_bytes": shard_bytes, "source": str(dataset.source), "layout": dataset.layout,
                 "classes": dataset.classes, "class_range": dataset.class_range.to_dict(),
                 "planned": {split: len(photos) for split, photos in planned.items()},
                 "shards": [], "skipped": [{"name": n, "split": None, "reason": r} for n, r in dataset.problems]}
        store.write_index(index)
    if index["complete"]:
        return index
    for leftover in store.staging_dir().glob(".*.tar.partial"):  # an interrupted shard starts over
        leftover.unlink(missing_ok=True)
    done = {photo[1] for shard in index["shards"] for photo in shard["photos"]}
    done |= {entry["name"] for entry in index["skipped"] if entry["split"]}
    total = sum(len(photos) for photos in planned.values())
    progress = [len(done)]

    def report(text: str):
        if on_progress:
            on_progress(progress[0] / total if total else 1.0, text)

    files = _Files(bucket)
    for split, photos in planned.items():
        todo = [photo for photo in photos if photo.name not in done]
        number = sum(1 for shard in index["shards"] if shard["split"] == split)
        writer = None
        for start in range(0, len(todo), FETCH_BATCH):
            batch = todo[start:start + FETCH_BATCH]
            files.prefetch(batch)
            try:
                for photo in batch:
                    try:
                        image, metadata = files.read(photo)
                        problem = photo_problem(image)
                    except OSError as exc:
                        problem = f"cannot be read ({exc})"
                    if problem:
                        index["skipped"].append({"name": photo.name, "split": split, "reason": problem})
                    else:
                        writer = writer or _ShardWriter(store, split, number)
                        writer.add(photo, image, metadata)
                    progress[0] += 1
                    report(f"{split}: {photo.name}")
                    if writer and writer.size >= shard_bytes:
                        index["shards"].append(writer.finish())
                        store.write_index(index)
                        number, writer = number + 1, None
            finally:
                files.release()
        if writer:
            index["shards"].append(writer.finish())
        store.write_index(index)
    index["complete"] = True
    store.write_index(index)
    report("done")
    return index
