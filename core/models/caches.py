"""The stores of per-photo tensors under BINSIGHT_HOME, keyed by the photo's content: append-only shards of
(photo hash → tensor), for feature vectors and for stage maps."""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from pathlib import Path

import torch

from core import config, storage
from core.files import atomic_write_bytes
from core.models.preprocess import preprocessing_key

SHARD_EVERY_S = 30.0
_hash_memo: dict[tuple, str] = {}


def content_hash(data: bytes) -> str:
    """The key of a photo in the feature cache: sha1 of its bytes, wherever they were read from (file or shard)."""
    return hashlib.sha1(data).hexdigest()


def photo_hash(path: str | Path) -> str | None:
    """sha1 of the photo's bytes (remembered per path, size and mtime), or None when it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _hash_memo:
        try:
            _hash_memo[memo_key] = content_hash(Path(path).read_bytes())
        except OSError:
            return None
    return _hash_memo[memo_key]


def cache_key(meta: dict, variant: str = "plain") -> str:
    """Everything that changes a photo's feature vector, except the photo itself."""
    parts = {"backbone": meta["backbone"], "arch": meta.get("arch"), "weights": meta["weights"],
             "preprocessing": preprocessing_key(meta), "variant": variant}
    if meta.get("features"):  # the pooled last layer (no entry) keeps the keys caches were written under
        parts["features"] = meta.get("feature_taps") or meta["features"]
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class FeatureCache:
    """Tensors of one backbone/preprocessing (feature vectors, or stage maps in the "stage_maps" cache), stored as
    append-only shards of (photo hash → tensor) in `dtype`."""

    def __init__(self, key: str, root: Path | None = None, cache: str = "features", dtype=torch.float32):
        self.key, self.cache, self.dtype = key, cache, dtype
        self.folder = (root or config.home() / cache) / key

    def load(self) -> dict[str, torch.Tensor]:
        vectors = {}
        for shard in sorted(self.folder.glob("*.pt")):
            try:
                data = torch.load(shard, map_location="cpu", weights_only=True)
            except Exception:
                continue  # a damaged shard only costs recomputing its photos
            storage.touch(shard)  # used: the least recently used shards go first when the cache is over its cap
            vectors.update(zip(data["hashes"], data["features"]))
        return vectors

    def read_into(self, hashes: list, out: torch.Tensor, columns=None) -> set[int]:
        """Copy the stored tensor of each photo hash (its `columns` only, when given) into its row of `out`, reading
        one shard at a time, so memory holds `out` and one shard whatever the cache's size; the rows found."""
        rows: dict[str, list[int]] = {}
        for i, digest in enumerate(hashes):
            if digest is not None:
                rows.setdefault(digest, []).append(i)
        found: set[int] = set()
        for shard in sorted(self.folder.glob("*.pt")):
            try:
                data = torch.load(shard, map_location="cpu", weights_only=True)
            except Exception:
                continue  # a damaged shard only costs recomputing its photos
            storage.touch(shard)
            stored = data["features"] if columns is None else data["features"][:, columns]
            for k, digest in enumerate(data["hashes"]):
                for i in rows.get(digest, ()):
                    out[i] = stored[k]
                    found.add(i)
        return found

    def add(self, hashes: list[str], features: torch.Tensor) -> None:
        if not hashes:
            return
        buffer = io.BytesIO()
        torch.save({"hashes": list(hashes), "features": features.detach().to(self.dtype).cpu().contiguous()}, buffer)
        atomic_write_bytes(self.folder / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.pt", buffer.getvalue())
        storage.prune_after_write(self.cache)
