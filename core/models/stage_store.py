"""The stage-map store: each photo's backbone map after the store's cut (fp16, per count-preserving view), computed in
one pass and read by partial fine-tuning, frozen features, label issues and the embeddings map."""
from __future__ import annotations

import functools
import hashlib
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from core import storage
from core.errors import Cancelled
from core.models.caches import SHARD_EVERY_S, FeatureCache, photo_hash
from core.models.preprocess import PhotoDataset, default_workers, eval_transform, input_size, preprocessing_key, view_of
from core.models.stages import STORE_CUT, CutError, Trunk

CACHE = "stage_maps"
# The views every photo's map is stored in: the count does not change when a bin is mirrored left-right.
STORE_VIEWS = ("plain", "hflip")
# Photos run through the trunk in this process (tests count them to prove a pass is not repeated).
trunk_photos = 0


def store_key(meta: dict, view: str) -> str:
    """Everything that changes a photo's map, except the photo: backbone, weights, preprocessing, cut and view."""
    parts = {"backbone": meta["backbone"], "arch": meta.get("arch"), "weights": meta["weights"],
             "preprocessing": preprocessing_key(meta), "cut": STORE_CUT, "view": view}
    return hashlib.sha1(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


@contextmanager
def evaluating(module: torch.nn.Module):
    """`module` in eval mode, each of its parts put back in the mode it was in afterwards."""
    modes = {part: part.training for part in module.modules()}
    try:
        yield module.eval()
    finally:
        for part, mode in modes.items():
            part.training = mode


def map_shape(backbone: torch.nn.Module, meta: dict) -> tuple[int, int, int]:
    """(channels, height, width) of the map after the store's cut at this preprocessing."""
    with evaluating(Trunk(backbone)) as trunk, torch.inference_mode():
        return tuple(trunk(torch.zeros(1, 3, *input_size(meta), device=_device_of(backbone))).shape[1:])


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def store_bytes(backbone: torch.nn.Module, meta: dict, photos: int, views: int = len(STORE_VIEWS)) -> int:
    channels, height, width = map_shape(backbone, meta)
    return photos * views * channels * height * width * 2


def _planned(backbone: str, weights: str | None, height: int, aspect: float) -> tuple[dict, int] | None:
    """The meta a backbone named would have at this input, and its map's channels at the cut, from the catalog
    (without building the network); None for an architecture the catalog does not know."""
    from core.models.catalog import STAGE_CHANNELS
    from core.models.networks import backbone_spec, weights_file
    from core.models.preprocess import preprocessing

    spec = backbone_spec(backbone)
    if spec.arch not in STAGE_CHANNELS:
        return None
    path = weights_file(backbone, weights)
    info = {"backbone": backbone, "arch": spec.arch, "weights": f"{path.name}:{_digest(path)}", "mean": list(spec.mean),
            "std": list(spec.std)}
    return info | preprocessing(info, height, aspect), STAGE_CHANNELS[spec.arch]["stride16"]


def planned_bytes(backbone: str, weights: str | None, height: int, aspect: float, photos: int,
                  views: int = len(STORE_VIEWS)) -> int:
    """What `photos` photos' maps take in the store for a backbone named, from the catalog (0 when it is unknown)."""
    planned = _planned(backbone, weights, height, aspect)
    return 0 if planned is None else _map_bytes(*planned, photos, views)


def _map_bytes(meta: dict, channels: int, photos: int, views: int) -> int:
    """The fp16 stride-16 maps of `photos` photos in `views` views, at the input `meta` describes."""
    map_height, map_width = (-(-side // 16) for side in input_size(meta))
    return photos * views * channels * map_height * map_width * 2


def stored_share(backbone: str, weights: str | None, height: int, aspect: float, photos: int) -> float:
    """About what share of `photos` photos' maps the store already holds for this backbone and input (from the size
    of its folders, without reading them or building the network): for estimates."""
    planned = _planned(backbone, weights, height, aspect) if photos else None
    if planned is None:
        return 0.0
    meta, channels = planned
    expected = _map_bytes(meta, channels, photos, views=1)
    held = [storage.folder_size(storage.cache_dir(CACHE) / store_key(meta, view)) / expected for view in STORE_VIEWS]
    return min(1.0, min(held))


@functools.lru_cache(maxsize=8)
def _digest(path: Path) -> str:
    from core.models.networks import file_digest

    return file_digest(path)


def cuttable(backbone: torch.nn.Module) -> bool:
    try:
        Trunk(backbone)
    except CutError:
        return False
    return True


def fits(backbone: torch.nn.Module, meta: dict, photos: int, views: int = len(STORE_VIEWS), also: int = 0) -> bool:
    """Whether `photos` photos' maps, and `also` bytes of other maps stored beside them (another backbone's), fit
    under the store's disk budget (its cache cap; no cap: always)."""
    cap = storage.cache_caps().get(CACHE)
    return cap is None or store_bytes(backbone, meta, photos, views) + also <= cap


@dataclass
class StageMaps:
    """Per view, the maps of a list of photos (n × C × H × W, fp16), in order; rows of photos in `errors` are
    zeros."""

    maps: dict[str, torch.Tensor]
    errors: dict[int, str] = field(default_factory=dict)
    hits: int = 0
    computed: int = 0
    seconds: float = 0.0


def stage_maps(backbone: torch.nn.Module, meta: dict, paths: list, views=STORE_VIEWS, device="cpu",
               batch_size: int = 32, num_workers: int | None = None, on_progress=None,
               should_stop=None) -> StageMaps:
    """The maps of `paths` in each of `views`: stored ones read back, the others computed (each photo decoded once,
    every missing view of it run through the trunk) and stored.

    on_progress(dict(done, total, images_per_s, data_wait_fraction)) after each batch; should_stop() returning True
    raises Cancelled, keeping what was computed stored.
    """
    started = time.perf_counter()
    stores = {view: FeatureCache(store_key(meta, view), cache=CACHE, dtype=torch.float16) for view in views}
    known = {view: store.load() for view, store in stores.items()}
    hashes = [photo_hash(p) for p in paths]
    result = StageMaps({})
    missing = []
    for i, digest in enumerate(hashes):
        if digest is None:
            result.errors[i] = f"{Path(paths[i]).name}: no such file or not readable"
        elif any(digest not in known[view] for view in views):
            missing.append(i)
    result.hits = len(paths) - len(missing) - len(result.errors)
    if missing:
        with evaluating(Trunk(backbone)) as trunk:
            _compute(trunk, meta, paths, hashes, missing, views, stores, known, result, device, batch_size,
                     num_workers, on_progress, should_stop)
    shape = map_shape(backbone, meta)
    for view in views:
        rows = [known[view].get(digest) if i not in result.errors else None for i, digest in enumerate(hashes)]
        zero = torch.zeros(shape, dtype=torch.float16)
        result.maps[view] = torch.stack([row if row is not None else zero for row in rows]) if rows else \
            torch.zeros(0, *shape, dtype=torch.float16)
    result.seconds = time.perf_counter() - started
    return result


def _compute(trunk, meta, paths, hashes, missing, views, stores, known, result, device, batch_size, num_workers,
             on_progress, should_stop):
    global trunk_photos
    dataset = PhotoDataset([paths[i] for i in missing], transform=eval_transform(meta))
    workers = default_workers() if num_workers is None else num_workers
    workers = min(workers, max(0, len(missing) // batch_size))
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                         pin_memory=str(device).startswith("cuda"))
    trunk = trunk.to(device)
    pending = {view: ([], []) for view in views}

    def save():
        for view, (digests, maps) in pending.items():
            if digests:
                stores[view].add(digests, torch.stack(maps))
        pending.update({view: ([], []) for view in views})

    done, wait, begin, last_write = 0, 0.0, time.perf_counter(), time.perf_counter()
    tick = begin
    with torch.inference_mode():
        for images, _, index, errors in loader:
            wait += time.perf_counter() - tick
            if should_stop and should_stop():
                save()
                raise Cancelled("stopped while computing stage maps (what was computed is kept)")
            good = [j for j, error in enumerate(errors) if not error]
            for j, error in enumerate(errors):
                if error:
                    result.errors[missing[int(index[j])]] = error
            if good:
                images = images[good].to(device, non_blocking=True)
                for view in views:
                    need = [k for k, j in enumerate(good) if hashes[missing[int(index[j])]] not in known[view]]
                    if not need:
                        continue
                    with torch.autocast("cuda", enabled=str(device).startswith("cuda")):
                        maps = trunk(view_of(images[need], view)).to(torch.float16).cpu()
                    trunk_photos += len(need)
                    for k, tensor in zip(need, maps):
                        digest = hashes[missing[int(index[good[k]])]]
                        known[view][digest] = tensor
                        pending[view][0].append(digest)
                        pending[view][1].append(tensor)
            done += len(index)
            if time.perf_counter() - last_write > SHARD_EVERY_S:
                save()
                last_write = time.perf_counter()
            if on_progress:
                elapsed = max(time.perf_counter() - begin, 1e-9)
                on_progress({"done": done, "total": len(missing), "images_per_s": done / elapsed,
                             "data_wait_fraction": wait / elapsed})
            tick = time.perf_counter()
    save()
    result.computed = sum(1 for i in missing if i not in result.errors)
