"""Backbone features of photos, read from the feature cache or computed (from the stage-map store when it holds the
photos), keyed by backbone + weights + photo content + preprocessing."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core.data.photos.images import ImageError, load_image
from core.errors import BinsightError, Cancelled
from core.models import stage_store
from core.models.caches import SHARD_EVERY_S, FeatureCache, cache_key, content_hash, photo_hash
from core.models.preprocess import PhotoDataset, default_workers, eval_transform, view_of
from core.models.stages import Tail


SHARD_ROWS = 8192  # vectors per cache shard written from stage maps (a few tens of MB)


@dataclass
class Features:
    """Features of a list of photos, in order; rows of photos in `errors` are zeros."""

    features: torch.Tensor
    errors: dict[int, str] = field(default_factory=dict)
    hits: int = 0
    computed: int = 0
    seconds: float = 0.0
    columns: list[int] | None = None  # the feature columns kept (None: all)

    def keep(self, rows: list[int], vectors: torch.Tensor) -> None:
        """Put freshly computed whole vectors into their rows (their kept columns)."""
        self.features[rows] = vectors if self.columns is None else vectors[:, self.columns]


def extract_features(backbone: torch.nn.Module, meta: dict, paths: list, device: str = "cpu",
                     batch_size: int = 64, num_workers: int | None = None, view: str = "plain",
                     on_progress=None, should_stop=None, columns=None, out: torch.Tensor | None = None) -> Features:
    """Backbone features of `paths`: cached ones are read back, the others computed (one pass) and cached.

    An EfficientNet-Lite's features are computed from the stage-map store (core.models.stage_store): maps stored by
    an earlier pass at this preprocessing are read back, and the maps computed now are stored for the next reader
    (partial fine-tuning, another feature set), unless they would not fit under the store's disk budget.

    `columns` keeps only those feature columns (the cache stores whole vectors); `out` (len(paths) × columns) is
    filled instead of a new tensor: with both, memory holds `out` and one cache shard at a time, at any dataset size.
    on_progress(dict(done, total, images_per_s, data_wait_fraction)) is called after each batch;
    should_stop() returning True raises core.errors.Cancelled (what was computed so far stays cached).
    """
    started = time.perf_counter()
    cache = FeatureCache(cache_key(meta, view))
    hashes = [photo_hash(p) for p in paths]
    width = meta["feature_dim"] if columns is None else len(columns)
    result = Features(torch.zeros(len(paths), width) if out is None else out, columns=columns)
    cached = cache.read_into(hashes, result.features, columns)
    missing = []
    for i, digest in enumerate(hashes):
        if digest is None:
            result.errors[i] = f"{Path(paths[i]).name}: no such file or not readable"
        elif i not in cached:
            missing.append(i)
    result.hits = len(paths) - len(missing) - len(result.errors)
    if missing:
        through_store = stage_store.cuttable(backbone) and stage_store.fits(backbone, meta, len(missing), 1)
        compute = _from_stage_maps if through_store else _compute
        compute(backbone, meta, paths, hashes, missing, result, cache, device, batch_size, num_workers, view,
                on_progress, should_stop)
    result.seconds = time.perf_counter() - started
    return result


def _from_stage_maps(backbone, meta, paths, hashes, missing, result, cache, device, batch_size, num_workers, view,
                     on_progress, should_stop):
    """The missing features as the backbone's tail run on the photos' stage maps (stored or computed now)."""
    found = stage_store.stage_maps(backbone, meta, [paths[i] for i in missing], views=(view,), device=device,
                                   batch_size=batch_size, num_workers=num_workers, on_progress=on_progress,
                                   should_stop=should_stop)
    tail = Tail(backbone).to(device).eval()
    good = [j for j in range(len(missing)) if j not in found.errors]
    result.errors.update({missing[j]: error for j, error in found.errors.items()})
    pending_hashes, pending = [], []
    with torch.inference_mode():
        for start in range(0, len(good), 256):
            rows = good[start:start + 256]
            with torch.autocast("cuda", enabled=str(device).startswith("cuda")):
                vectors = tail(found.maps[view][rows].to(device).float()).float().cpu()
            result.keep([missing[j] for j in rows], vectors)
            pending_hashes += [hashes[missing[j]] for j in rows]
            pending.append(vectors)
            if len(pending_hashes) >= SHARD_ROWS or start + 256 >= len(good):
                cache.add(pending_hashes, torch.cat(pending))
                pending_hashes, pending = [], []
    result.computed = len(good)


def _compute(backbone, meta, paths, hashes, missing, result, cache, device, batch_size, num_workers, view,
             on_progress, should_stop):
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
                result.keep([original], row[None])
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


@dataclass
class StreamFeatures:
    """Features of streamed photos, in the order they arrived: per view an n × dim tensor, with each row's sample key,
    photo name and count. Unreadable photos have no row; they are listed in `errors` (name → reason)."""

    features: dict[str, torch.Tensor]
    keys: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)
    hits: int = 0
    computed: int = 0
    seconds: float = 0.0


def extract_stream_features(backbone: torch.nn.Module, meta: dict, samples, views=("plain",), device: str = "cpu",
                            batch_size: int = 64, num_workers: int | None = None, total: int | None = None,
                            on_progress=None, should_stop=None) -> StreamFeatures:
    """Backbone features of streamed photos (dicts with key, name, count and image bytes, as core.data.remote.streaming
    yields them) in each of `views`, reading the stream once.

    A photo is keyed by content_hash of its bytes, as photo_hash keys a file, so photos packed into shards share
    the cache with the same photos read from their folder. Cached vectors are read back; the other photos are decoded
    once (by DataLoader workers when `samples` is a torch IterableDataset such as photo_stream's pipeline) and each
    missing view is computed from the mirrored tensor. on_progress(dict(done, total, images_per_s,
    data_wait_fraction)) is called after each batch (done counts photos read, `total` the photos expected);
    should_stop() returning True raises Cancelled, keeping what was computed cached. A damaged shard's ShardError
    (on_bad_shard='stop') is raised as itself, with its one-line message.
    """
    started = time.perf_counter()
    caches = {view: FeatureCache(cache_key(meta, view)) for view in views}
    known = {view: cache.load() for view, cache in caches.items()}
    fully_cached = set.intersection(*(set(vectors) for vectors in known.values()))
    result = StreamFeatures({})
    rows: dict[str, list] = {view: [] for view in views}
    new: dict[str, tuple[list, list]] = {view: ([], []) for view in views}
    batch: list[tuple[int, dict]] = []
    backbone = backbone.to(device).eval().to(memory_format=torch.channels_last)
    cuda = str(device).startswith("cuda")

    def save_new():
        for view, (hashes, vectors) in new.items():
            if hashes:
                caches[view].add(hashes, torch.stack(vectors))
            new[view] = ([], [])

    def compute():
        images = torch.stack([item["tensor"] for _, item in batch])
        images = images.to(device, non_blocking=True).to(memory_format=torch.channels_last)
        for view in views:
            need = [j for j, (_, item) in enumerate(batch) if item["digest"] not in known[view]]
            if not need:
                continue
            with torch.autocast("cuda", enabled=cuda):
                vectors = backbone(view_of(images[need], view)).float().cpu()
            for j, vector in zip(need, vectors):
                row, item = batch[j]
                rows[view][row] = known[view][item["digest"]] = vector
                new[view][0].append(item["digest"])
                new[view][1].append(vector)
        result.computed += len(batch)
        batch.clear()

    done, wait, last_write = 0, 0.0, time.perf_counter()
    tick = time.perf_counter()
    with torch.inference_mode():
        for item in _decoded(samples, eval_transform(meta), fully_cached, num_workers):
            wait += time.perf_counter() - tick
            if "failure" in item:  # a damaged shard: keep the photos read before it
                if batch:
                    compute()
                save_new()
                raise item["failure"]
            done += 1
            if item["error"]:
                result.errors[item["name"]] = item["error"]
            else:
                row = len(result.keys)
                result.keys.append(item["key"])
                result.names.append(item["name"])
                result.counts.append(int(item["count"]))
                if all(item["digest"] in known[view] for view in views):
                    for view in views:
                        rows[view].append(known[view][item["digest"]])
                    result.hits += 1
                else:
                    for view in views:
                        rows[view].append(None)  # filled in when its batch is computed
                    batch.append((row, item))
            if len(batch) == batch_size or done % batch_size == 0:
                if should_stop and should_stop():
                    save_new()
                    raise Cancelled("stopped during feature extraction")
                if len(batch) == batch_size:
                    compute()
                if time.perf_counter() - last_write > SHARD_EVERY_S:
                    save_new()
                    last_write = time.perf_counter()
                elapsed = max(time.perf_counter() - started, 1e-9)
                if on_progress:
                    on_progress({"done": done, "total": max(total or 0, done), "images_per_s": done / elapsed,
                                 "data_wait_fraction": wait / elapsed})
            tick = time.perf_counter()
        if batch:
            compute()
    save_new()
    dim = meta["feature_dim"]
    result.features = {view: torch.stack(rows[view]) if rows[view] else torch.zeros(0, dim) for view in views}
    result.seconds = time.perf_counter() - started
    return result


def _prepared(sample: dict, transform, fully_cached: set) -> dict:
    """A streamed photo hashed and, unless every view of it is cached, decoded; an unreadable photo has an error."""
    item = {"key": sample["key"], "name": sample["name"], "count": sample["count"],
            "digest": content_hash(sample["image"]), "tensor": None, "error": ""}
    if item["digest"] not in fully_cached:
        try:
            item["tensor"] = transform(load_image(sample["image"], sample["name"]))
        except ImageError as exc:
            item["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 — a decoder failure on a damaged photo must not stop the others
            item["error"] = f"{sample['name']}: cannot be read ({exc})"
    return item


def _prepare_all(samples, transform, fully_cached: set):
    # A worker's exception reaches the caller wrapped in DataLoader's traceback text: a user's error (a damaged
    # shard) is passed on as an item instead, and raised as itself by the caller.
    try:
        for sample in samples:
            yield _prepared(sample, transform, fully_cached)
    except BinsightError as exc:
        yield {"failure": exc}


def _decoded(samples, transform, fully_cached: set, num_workers: int | None):
    """The samples prepared by DataLoader workers when `samples` is a torch IterableDataset, else in this thread."""
    prepare = functools.partial(_prepare_all, transform=transform, fully_cached=fully_cached)
    workers = default_workers() if num_workers is None else num_workers
    if workers and isinstance(samples, torch.utils.data.IterableDataset):
        import webdataset as wds

        return torch.utils.data.DataLoader(wds.DataPipeline(samples, prepare), batch_size=None, num_workers=workers)
    return prepare(iter(samples))
