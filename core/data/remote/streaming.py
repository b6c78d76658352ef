"""Reading a shard set as a stream of photos with webdataset: shards split across ranks and DataLoader workers."""
from __future__ import annotations

import random
import warnings
from itertools import chain, islice

from core.data.remote.shard_store import ShardError, ShardStore, open_store, read_complete_index

IMAGE_EXTS = ("jpg", "png", "webp", "bmp")
BAD_SHARD_CHOICES = ("stop", "skip")
# Photos (encoded, ~50 KB each) a training reader mixes before yielding: shards hold photos in packing order.
SHUFFLE_BUFFER = 500


def tar_samples(stream):
    """The samples of a tar stream read once, as {"__key__": key, extension: bytes, ...}.

    The files of one sample lie next to each other (as webdataset's TarWriter writes them). This is webdataset's
    tar_file_expander + group_by_keys without their per-file regular expressions and wrapping dicts, which cost
    as much per photo as reading it; a name given twice in one sample is a damaged shard, as there.
    """
    import tarfile

    sample: dict = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, _, ext = member.name.partition(".")
            if key != sample.get("__key__"):
                if sample:
                    yield sample
                sample = {"__key__": key}
            if ext.lower() in sample:
                raise ValueError(f"{member.name} appears twice in one sample")
            sample[ext.lower()] = tar.extractfile(member).read()
            tar.members = []  # read once: keep no list of the members passed
    if sample:
        yield sample


def shard_samples(store: ShardStore, shard: dict, on_bad_shard: str = "stop"):
    """The photos of one shard as dicts (key, name, count, image bytes, metadata bytes or None, shard).

    A shard that breaks off or holds fewer samples than its index entry raises ShardError naming it
    ("stop"), or is left with a warning after the photos read before the damage ("skip").
    """
    if on_bad_shard not in BAD_SHARD_CHOICES:
        raise ShardError(f"on_bad_shard must be one of {BAD_SHARD_CHOICES}, not {on_bad_shard!r}")
    names = {key: (name, count) for key, name, count in shard["photos"]}
    read = 0
    problem = None
    stream = store.open(shard["name"])
    try:
        for sample in tar_samples(stream):
            image_ext = next((ext for ext in IMAGE_EXTS if ext in sample), None)
            if sample["__key__"] not in names or image_ext is None:
                problem = f"holds an unexpected sample {sample['__key__']!r}"
                break
            name, count = names[sample["__key__"]]
            read += 1
            yield {"key": sample["__key__"], "name": name, "count": count, "image": sample[image_ext],
                   "metadata": sample.get("json"), "shard": shard["name"]}
    except Exception as exc:  # noqa: BLE001 — tarfile and the stream raise many kinds; all mean a damaged shard
        problem = f"breaks off after {read} of {shard['samples']} photos ({type(exc).__name__}: {exc.args[0]})"
    finally:
        getattr(stream, "close", lambda: None)()
    if problem is None and read != shard["samples"]:
        problem = f"ends after {read} of {shard['samples']} photos"
    if problem is not None:
        message = f"shard {shard['name']} in {store.location} is truncated or damaged: it {problem}"
        if on_bad_shard == "stop":
            raise ShardError(message + "; pack it again, or read with on_bad_shard='skip'")
        warnings.warn(message + "; skipping the rest of it", RuntimeWarning, stacklevel=2)


def split_shards(index: dict, split: str) -> list[dict]:
    """The shards of one split ('train', 'valid', 'test'), or every shard ('all')."""
    return [shard for shard in index["shards"] if split in ("all", shard["split"])]


def photo_stream(source, split: str = "train", on_bad_shard: str = "stop", by_worker: bool = True,
                 by_rank: bool = True, index: dict | None = None):
    """A webdataset pipeline (a torch IterableDataset) of the split's photos, each shard read by one worker.

    Shards are dealt to distributed ranks (by_rank) and then to DataLoader workers (by_worker) with
    webdataset's split_by_node / split_by_worker, so no photo is read twice in one pass.
    """
    import webdataset as wds

    store = source if isinstance(source, ShardStore) else open_store(source)
    index = index or read_complete_index(store)
    shards = {shard["name"]: shard for shard in split_shards(index, split)}

    def expand(urls):
        for item in urls:
            yield from shard_samples(store, shards[item["url"]], on_bad_shard)

    stages = [wds.SimpleShardList(list(shards))]
    stages += [wds.split_by_node] if by_rank else []
    stages += [wds.split_by_worker] if by_worker else []
    return wds.DataPipeline(*stages, expand)


def _tensor_shape(transform) -> tuple[int, int, int]:
    """The (C, H, W) a transform makes, for the zero tensor standing in for an unreadable photo."""
    for step in getattr(transform, "transforms", []):
        size = getattr(step, "size", None)
        if size:
            return (3, *(tuple(size) if len(size) == 2 else (size[0], size[0])))
    return (3, 64, 64)


def decode_sample(sample: dict, transform, class_index: dict[int, int]):
    """A streamed photo → (tensor, label, key, error); an unreadable photo is a zero tensor with its error."""
    import torch

    from core.data.photos.images import load_image

    try:
        return transform(load_image(sample["image"], sample["name"])), class_index[sample["count"]], sample["key"], ""
    except Exception as exc:  # noqa: BLE001 — one damaged photo must not stop the stream
        return torch.zeros(_tensor_shape(transform)), class_index[sample["count"]], sample["key"], str(exc)


def eval_stream(source, transform, class_index: dict[int, int], split: str, on_bad_shard: str = "stop",
                index: dict | None = None):
    """(tensor, label, key, error) of a split's photos read once: its shards dealt to ranks and DataLoader workers,
    photos whose count is outside `class_index` left out."""
    import webdataset as wds

    stream = photo_stream(source, split, on_bad_shard, index=index)
    return wds.DataPipeline(stream, wds.select(lambda s: s["count"] in class_index),
                            wds.map(lambda s: decode_sample(s, transform, class_index)))


class EpochShardList:
    """A pipeline's first stage: the shard names, each tagged with the pass it belongs to; every call is the next epoch.

    DataLoader workers (persistent or not) and ranks each iterate their own copy once per epoch, so they all agree
    on the epoch number without being told; `first_epoch` is where a resumed run starts counting.
    """

    def __init__(self, names: list[str], first_epoch: int = 0):
        self.names, self.epoch = list(names), first_epoch - 1

    def __call__(self):
        self.epoch += 1
        for name in self.names:
            yield {"url": name, "epoch": self.epoch}


def training_stream(source, transform, class_index: dict[int, int], batch_size: int, workers: int,
                    split: str = "train", on_bad_shard: str = "stop", index: dict | None = None, seed: int = 0,
                    first_epoch: int = 0, shuffle_buffer: int = SHUFFLE_BUFFER):
    """(tensor, label, key, error) of the train shards, dealt to ranks and DataLoader workers, reshuffled every pass.

    Every rank yields the same number of whole batches (as DDP needs) and every photo at least once a pass:
    each worker delivers as many photos as the fullest one, going round its shards again for the rest. Each pass
    (epoch) every reader takes its shards in another order and mixes their photos in a shuffle buffer, both seeded
    by (seed, epoch, reader): runs repeat, epochs differ. `class_index` maps a count to its label; `workers` is the
    DataLoader's num_workers.
    """
    import webdataset as wds
    from webdataset.utils import pytorch_worker_info

    store = source if isinstance(source, ShardStore) else open_store(source)
    index = index or read_complete_index(store)
    shards = {shard["name"]: shard for shard in split_shards(index, split)
              if any(count in class_index for _key, _name, count in shard["photos"])}
    _rank, world = pytorch_worker_info()[:2]
    readers = world * max(1, workers)
    if len(shards) < readers:
        raise ShardError(f"{store.location}: {len(shards)} {split} shards cannot feed {readers} readers "
                         f"({world} ranks × {max(1, workers)} workers); pack with a smaller --shard-size")
    # Deal shards as split_by_node and split_by_worker do, and let every reader deliver as many photos as the
    # fullest one (a whole number of batches): the others go round their shards again, like DDP's padding.
    names = list(shards)
    totals = [sum(sum(1 for p in shards[n]["photos"] if p[2] in class_index) for n in names[r::world][w::max(1, workers)])
              for r in range(world) for w in range(max(1, workers))]
    per_worker = -(-max(totals) // batch_size) * batch_size
    def reader_random(epoch: int, what: str) -> random.Random:
        rank, _world, worker, _workers = pytorch_worker_info()[:4]
        return random.Random(f"{seed}:{epoch}:{rank}:{worker}:{what}")  # a string seed is hashed the same everywhere

    def round_robin(urls):
        urls = list(urls)
        if urls:
            reader_random(urls[0]["epoch"], "shards").shuffle(urls)
        while urls:
            yield from urls

    def expand(urls):
        urls = iter(urls)
        first = next(urls, None)
        if first is None:
            return
        items = chain([first], urls)
        samples = (s for item in items for s in shard_samples(store, shards[item["url"]], on_bad_shard))
        known = (s for s in samples if s["count"] in class_index)
        # Cut the pass first (every photo of the reader, then the padding), then mix: nothing is cut out by mixing.
        yield from wds.filters.shuffle(shuffle_buffer, min(shuffle_buffer, 100),
                                       rng=reader_random(first["epoch"], "photos"))(islice(known, per_worker))

    pipeline = wds.DataPipeline(EpochShardList(list(shards), first_epoch), wds.split_by_node, wds.split_by_worker,
                                round_robin, expand, wds.map(lambda s: decode_sample(s, transform, class_index)))
    with warnings.catch_warnings():  # webdataset warns that a length does not bound the epoch; here it is exact
        warnings.simplefilter("ignore", UserWarning)
        return pipeline.with_length(per_worker * max(1, workers))
