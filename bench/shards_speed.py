"""Photos/s delivered to a DataLoader from a folder, local shards, shards on a local S3 server, and per-photo S3 GETs.

    python bench/shards_speed.py [--photos 300] [--shard-size 4MB] [--decode]

Everything runs on 127.0.0.1 (moto's S3 server) inside a temporary BINSIGHT_HOME; nothing is left behind.
Without --decode a photo is delivered as its bytes (the I/O alone); with it, decoded and resized to 224 px.
"""
from __future__ import annotations

import argparse
import logging
import os
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
    """One GET per photo, as training from the bucket without shards would do."""

    def __init__(self, names, deliver, endpoint):
        self.names, self.deliver, self.endpoint = names, deliver, endpoint
        self.client, self.pid = None, None

    def __len__(self):
        return len(self.names)

    def __getitem__(self, i):
        import boto3

        if self.pid != os.getpid():  # a client per worker process
            self.client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                                       aws_access_key_id="bench", aws_secret_access_key="bench")
            self.pid = os.getpid()
        body = self.client.get_object(Bucket=BUCKET, Key=f"bin-images/{self.names[i]}")["Body"].read()
        return self.deliver(body)


def make_deliver(decode: bool):
    if not decode:
        return len
    from torchvision.transforms import v2

    from core.data.images import load_image

    transform = v2.Compose([v2.ToImage(), v2.Resize((224, 224), antialias=True), v2.ToDtype(torch.float32, scale=True)])
    return lambda data: transform(load_image(data))


def timed(dataset, workers: int, expected: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    started = time.perf_counter()
    n = sum(1 for _ in loader)
    seconds = time.perf_counter() - started
    assert n == expected, f"delivered {n} of {expected} photos"
    return n / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=300)
    parser.add_argument("--shard-size", default="4MB")
    parser.add_argument("--decode", action="store_true")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="shards-bench-") as tmp:
        tmp = Path(tmp)
        os.environ["BINSIGHT_HOME"] = str(tmp / "home")
        import boto3
        import webdataset as wds
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)

        from core.data.loading import load_dataset
        from core.data.shards import pack_shards
        from core.data.streaming import photo_stream
        from tests.conftest import make_abid_subset

        folder = make_abid_subset(tmp / "photos", per_class=max(1, args.photos // 5))
        dataset = load_dataset(folder)
        rows = dataset.rows()
        names, paths = list(rows["name"]), list(rows["path"])
        pack_shards(dataset, tmp / "shards", args.shard_size)

        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
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

            def from_shards(source, split):
                return wds.DataPipeline(photo_stream(source, split, by_rank=False),
                                        wds.map(lambda sample: deliver(sample["image"])))

            sources = {
                "(a) local folder": lambda: FolderPhotos(paths, deliver),
                "(b) local shards": None,
                "(c) shards on S3 (moto, 127.0.0.1)": None,
                "(d) per-photo S3 GETs (moto)": lambda: BucketPhotos(names, deliver, endpoint),
            }
            table = []
            for label, make in sources.items():
                speeds = []
                for workers in (1, 2):
                    if make is None:
                        where = tmp / "shards" if label.startswith("(b)") else f"s3://{SHARD_BUCKET}/set"
                        speeds.append(timed(from_shards(where, "all"), workers, len(names)))
                    else:
                        speeds.append(timed(make(), workers, len(names)))
                table.append((label, *speeds))
        finally:
            server.stop()

    what = "decoded to 224 px tensors" if args.decode else "as bytes"
    print(f"\n{len(names)} photos delivered {what}, shards of {args.shard_size}; photos/s (higher is better)\n")
    print("| source | 1 worker | 2 workers |\n| --- | ---: | ---: |")
    for label, one, two in table:
        print(f"| {label} | {one:,.0f} | {two:,.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
