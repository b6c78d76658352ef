"""Photos/s delivered to a DataLoader from a folder, local shards, shards on a local S3 server, and per-photo S3 GETs.

    python bench/shards_speed.py [--photos 2500] [--passes 3] [--shard-size 16MB] [--decode]

Everything runs on 127.0.0.1 inside a temporary BINSIGHT_HOME; nothing is left behind. moto's S3 server runs in a
process of its own (bench/moto_process.py), so the loader's main process, which collects the photos, does not share
a GIL with the server.

The figure is the steady state, measured the same way for every source: each loader keeps its workers between
passes (persistent_workers=True), one untimed pass warms it up (worker processes started and their imports done,
S3 clients made and connected, files in the page cache), and the median photos/s of `--passes` timed passes is
reported. 2,500 photos (500 of each count 1–5; ABID's smallest count, 3, has 508) are ~145 MB, so even the fastest
source takes about a second a pass; with a few hundred photos a pass lasts a fraction of a second and the figures
mostly measured worker start-up. Shards are 16 MB (~10 of them; the project's default is 200 MB, too few here to
deal to two workers): moto spends ~5 ms of its own CPU on every GET before the first byte, so 4 MB shards make
that per-request cost a quarter of a pass, which a 200 MB shard would pay 50 times less often.

Without --decode a photo is delivered as its bytes (the I/O, and the hand-over from worker to training loop);
with it, decoded and resized to a 224 px tensor.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET, SHARD_BUCKET = "aft-vbi-pds", "bench-shards"


class FolderPhotos(torch.utils.data.Dataset):
    def __init__(self, paths, deliver):
        self.paths, self.deliver = paths, deliver

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return self.deliver(Path(self.paths[i]).read_bytes())


class BucketPhotos(torch.utils.data.Dataset):
    """One GET per photo, as training from the bucket without shards would do, with the shard reader's S3 client."""

    def __init__(self, names, deliver):
        from core.data.remote.shard_store import S3Store

        self.names, self.deliver = names, deliver
        self.store = S3Store(f"s3://{BUCKET}/bin-images")

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        return self.deliver(self.store.read_bytes(self.names[i]))


def make_deliver(decode: bool):
    if not decode:
        return bytes
    from torchvision.transforms import v2

    from core.data.photos.images import load_image

    transform = v2.Compose([v2.ToImage(), v2.Resize((224, 224), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    return lambda data: transform(load_image(data))


def timed(dataset, workers: int, expected: int, passes: int) -> float:
    """Median photos/s of `passes` passes after an untimed warm-up pass, the workers kept between passes."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True)
    speeds = []
    for i in range(passes + 1):
        started = time.perf_counter()
        n = sum(1 for _ in loader)
        seconds = time.perf_counter() - started
        assert n == expected, f"delivered {n} of {expected} photos"
        if i:
            speeds.append(n / seconds)
    return statistics.median(speeds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=2500, help="a fifth of each count 1–5 (at most 508 each)")
    parser.add_argument("--passes", type=int, default=3, help="timed passes after the warm-up; the median is shown")
    parser.add_argument("--shard-size", default="16MB")
    parser.add_argument("--decode", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="shards-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["BINSIGHT_HOME"] = str(tmp / "home")
        import boto3
        import webdataset as wds

        from bench.moto_process import moto_server
        from core.data.layouts.registry import load_dataset
        from core.data.remote.shards import pack_shards
        from core.data.remote.streaming import photo_stream
        from tests.conftest import make_abid_subset

        folder = make_abid_subset(tmp / "photos", per_class=max(1, args.photos // 5))
        dataset = load_dataset(folder)
        rows = dataset.rows()
        names, paths = list(rows["name"]), list(rows["path"])
        pack_shards(dataset, tmp / "shards", args.shard_size)

        with moto_server() as endpoint:
            os.environ.update(BINSIGHT_S3_ENDPOINT_URL=endpoint, BINSIGHT_S3_ACCESS_KEY_ID="bench",
                              BINSIGHT_S3_SECRET_ACCESS_KEY="bench")
            admin = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                                 aws_access_key_id="bench", aws_secret_access_key="bench")
            for bucket in (BUCKET, SHARD_BUCKET):
                admin.create_bucket(Bucket=bucket)
            for name, path in zip(names, paths):
                admin.put_object(Bucket=BUCKET, Key=f"bin-images/{name}", Body=Path(path).read_bytes())
            pack_shards(dataset, f"s3://{SHARD_BUCKET}/set", args.shard_size)

            deliver = make_deliver(args.decode)

            def from_shards(source):
                return wds.DataPipeline(photo_stream(source, "all", by_rank=False),
                                        wds.map(lambda sample: deliver(sample["image"])))

            sources = {
                "(a) local folder": lambda: FolderPhotos(paths, deliver),
                "(b) local shards": lambda: from_shards(tmp / "shards"),
                "(c) shards on S3 (moto, 127.0.0.1)": lambda: from_shards(f"s3://{SHARD_BUCKET}/set"),
                "(d) per-photo S3 GETs (moto)": lambda: BucketPhotos(names, deliver),
            }
            speeds = {label: [timed(make(), workers, len(names), args.passes) for workers in (1, 2)]
                      for label, make in sources.items()}

    what = "decoded to 224 px tensors" if args.decode else "as bytes"
    print(f"\n{len(names)} photos delivered {what}, shards of {args.shard_size}; median photos/s of "
          f"{args.passes} passes after a warm-up (higher is better)\n")
    print("| source | 1 worker | 2 workers |\n| --- | ---: | ---: |")
    for label, (one, two) in speeds.items():
        print(f"| {label} | {one:,.0f} | {two:,.0f} |")
    local, s3, gets = (speeds[label] for label in list(sources)[1:])
    print("\nshards on S3 vs per-photo GETs (target ≥ 5×): "
          + ", ".join(f"{s / g:.1f}× ({w} worker{'s' * (w > 1)})" for w, s, g in zip((1, 2), s3, gets)))
    print("shards on S3 vs local shards (target within 20 %): "
          + ", ".join(f"{s / b - 1:+.0%} ({w} worker{'s' * (w > 1)})" for w, s, b in zip((1, 2), s3, local)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
