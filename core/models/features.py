"""On-disk cache of backbone features, keyed by backbone + weights + photo content + preprocessing."""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core import config, storage
from core.files import atomic_write_bytes
from core.models.preprocess import PhotoDataset, default_workers, eval_transform, preprocessing_key

SHARD_EVERY_S = 30.0
_hash_memo: dict[tuple, str] = {}


def photo_hash(path: str | Path) -> str | None:
    """sha1 of the photo's bytes (remembered per path, size and mtime), or None when it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    memo_key = (str(path), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _hash_memo:
        try:
            _hash_memo[memo_key] = hashlib.sha1(Path(path).read_bytes()).hexdigest()
        except OSError:
            return None
    return _hash_memo[memo_key]


def cache_key(meta: dict, variant: str = "plain") -> str:
    """Everything that changes a photo's feature vector, except the photo itself."""
    parts = {"backbone": meta["backbone"], "arch": meta.get("arch"), "weights": meta["weights"],
             "preprocessing": preprocessing_key(meta), "variant": variant}
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


class FeatureCache:
    """Feature vectors of one backbone/preprocessing, stored as append-only shards of (photo hash → vector)."""

    def __init__(self, key: str, root: Path | None = None):
        self.key = key
        self.folder = (root or config.home() / "features") / key

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

    def add(self, hashes: list[str], features: torch.Tensor) -> None:
        if not hashes:
            return
        buffer = io.BytesIO()
        torch.save({"hashes": list(hashes), "features": features.detach().float().cpu().contiguous()}, buffer)
        atomic_write_bytes(self.folder / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.pt", buffer.getvalue())
        storage.prune_after_write("features")


@dataclass
class Features:
    """Features of a list of photos, in order; rows of photos in `errors` are zeros."""

    features: torch.Tensor
    errors: dict[int, str] = field(default_factory=dict)
    hits: int = 0
    computed: int = 0
    seconds: float = 0.0


def extract_features(backbone: torch.nn.Module, meta: dict, paths: list, device: str = "cpu",
                     batch_size: int = 64, num_workers: int | None = None, view: str = "plain",
                     on_progress=None, should_stop=None) -> Features:
    """Backbone features of `paths`: cached ones are read back, the others computed (one pass) and cached.

    on_progress(dict(done, total, images_per_s, data_wait_fraction)) is called after each batch;
    should_stop() returning True raises core.errors.Cancelled (what was computed so far stays cached).
    """
    started = time.perf_counter()
    cache = FeatureCache(cache_key(meta, view))
    known = cache.load()
    hashes = [photo_hash(p) for p in paths]
    dim = meta["feature_dim"]
    out = torch.zeros(len(paths), dim)
    result = Features(out)
    missing = []
    for i, digest in enumerate(hashes):
        if digest is None:
            result.errors[i] = f"{Path(paths[i]).name}: no such file or not readable"
        elif digest in known:
            out[i] = known[digest]
        else:
            missing.append(i)
    result.hits = len(paths) - len(missing) - len(result.errors)
    if missing:
        _compute(backbone, meta, paths, hashes, missing, result, cache, device, batch_size, num_workers, view,
                 on_progress, should_stop)
    result.seconds = time.perf_counter() - started
    return result


def _compute(backbone, meta, paths, hashes, missing, result, cache, device, batch_size, num_workers, view,
             on_progress, should_stop):
    from core.errors import Cancelled

    dataset = PhotoDataset([paths[i] for i in missing], transform=eval_transform(meta), view=view)
    workers = default_workers() if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=str(device).startswith("cuda"))
    backbone = backbone.to(device).eval()
    channels_last = torch.channels_last
    backbone = backbone.to(memory_format=channels_last)
    pending_hashes, pending = [], []
    last_write = time.perf_counter()
    done, wait, begin = 0, 0.0, time.perf_counter()
    tick = time.perf_counter()
    with torch.inference_mode():
        for images, _, index, errors in loader:
            wait += time.perf_counter() - tick
            if should_stop and should_stop():
                cache.add(pending_hashes, torch.stack(pending) if pending else torch.zeros(0))
                raise Cancelled("stopped during feature extraction")
            images = images.to(device, non_blocking=True).to(memory_format=channels_last)
            with torch.autocast("cuda", enabled=str(device).startswith("cuda")):
                vectors = backbone(images).float().cpu()
            for row, i, error in zip(vectors, index.tolist(), errors):
                original = missing[i]
                if error:
                    result.errors[original] = error
                    continue
                result.features[original] = row
                pending_hashes.append(hashes[original])
                pending.append(row)
            done += len(index)
            result.computed = done - sum(1 for e in errors if e)
            if time.perf_counter() - last_write > SHARD_EVERY_S:
                cache.add(pending_hashes, torch.stack(pending))
                pending_hashes, pending, last_write = [], [], time.perf_counter()
            elapsed = time.perf_counter() - begin
            if on_progress:
                on_progress({"done": done, "total": len(missing), "images_per_s": done / max(elapsed, 1e-9),
                             "data_wait_fraction": wait / max(elapsed, 1e-9)})
            tick = time.perf_counter()
    if pending:
        cache.add(pending_hashes, torch.stack(pending))
    result.computed = sum(1 for i in missing if i not in result.errors)
