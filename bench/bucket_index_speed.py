"""Metadata objects/s of the bucket-scale index (python -m core index s3://…) against a local S3 server.

Seeds N copies of the real metadata JSONs into moto's server on 127.0.0.1 (in a process of its own), then indexes
them with 1, 8 and 32 requests in flight. Loopback requests cost far less than AWS's tens of milliseconds, so the
gain from keeping many requests in flight is larger against the real bucket than here.

    python bench/bucket_index_speed.py --objects 2000
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=2000)
    parser.add_argument("--abid", default=str(ROOT.parent / "shared" / "abid"))
    args = parser.parse_args()
    import boto3

    from bench.moto_process import moto_server

    metadata = sorted(Path(args.abid, "metadata").glob("*.json"))
    if not metadata:
        raise SystemExit(f"no metadata JSONs in {args.abid}/metadata")
    with moto_server() as url:  # in a process of its own: the index's threads share no GIL with it
        os.environ.update(BINSIGHT_S3_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                          BINSIGHT_S3_ACCESS_KEY_ID="bench", BINSIGHT_S3_SECRET_ACCESS_KEY="bench")
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        s3.create_bucket(Bucket="bench-bucket")
        for i in range(args.objects):
            body = metadata[i % len(metadata)].read_bytes()
            s3.put_object(Bucket="bench-bucket", Key=f"metadata/{i:06d}.json", Body=body)
        print(f"{'requests in flight':>18}  {'objects/s':>10}  {'seconds':>8}")
        from core.data.remote.bucket_index import build_bucket_index

        for in_flight in (1, 8, 32):
            os.environ["BINSIGHT_HOME"] = tempfile.mkdtemp(prefix="bench-index-")
            started = time.perf_counter()
            frame = build_bucket_index("s3://bench-bucket", in_flight=in_flight)
            seconds = time.perf_counter() - started
            assert len(frame) == args.objects
            print(f"{in_flight:>18}  {args.objects / seconds:>10.0f}  {seconds:>8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
