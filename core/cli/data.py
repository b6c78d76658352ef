"""CLI for datasets: `index` (summary of a folder), `split` (explicit re-split) and `demo`."""
from __future__ import annotations

import json

from core.data.classes import ClassRange


def add_class_range(parser) -> None:
    parser.add_argument("--classes", default=None, help="class range like 1-5, 0-5 or 1-5+ (5+ bucket)")


def parse_class_range(text: str | None) -> ClassRange | None:
    if not text:
        return None
    top = text.endswith("+")
    lo, _, hi = text.rstrip("+").partition("-")
    return ClassRange(int(lo), int(hi or lo), top)


def _index(args) -> int:
    from core.data.layouts.registry import load_dataset

    source = args.source or args.data
    if str(source or "").startswith("s3://"):
        _index_bucket(source, args.workers)
    ds = load_dataset(source, parse_class_range(args.classes))
    summary = ds.summary()
    summary["per_split"] = ds.labelled().groupby(["split", "cls"]).size().unstack(fill_value=0).to_dict("index")
    summary["notes"] = ds.notes
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _index_bucket(uri: str, in_flight: int) -> None:
    """Index a bucket's metadata JSONs (resumable) with a progress bar; a shard set needs nothing here."""
    import sys

    from tqdm import tqdm

    from core.data.remote.bucket_index import build_bucket_index
    from core.data.remote.shard_store import open_store

    if open_store(uri).read_index() is not None:
        return
    with tqdm(unit="object", desc=f"indexing {uri}", file=sys.stderr) as bar:
        def progress(done: int, total: int, text: str) -> None:
            bar.total = total
            bar.update(done - bar.n)

        frame = build_bucket_index(uri, in_flight=in_flight, on_progress=progress)
    print(f"{len(frame):,} metadata objects indexed from {uri}", file=sys.stderr)


def _split(args) -> int:
    from core.data.layouts.registry import load_dataset
    from core.data.labels.splits import resplit

    ds = load_dataset(args.data, parse_class_range(args.classes))
    frame, info = resplit(ds.frame, ds.key, args.test_per_class, args.valid_fraction, args.seed)
    print(frame.dropna(subset=["split"]).groupby(["split", "cls"]).size().unstack(fill_value=0).to_string())
    if info["short_test"]:
        print("classes with fewer test photos than asked (a fifth of the class at most):", info["short_test"])
    return 0


def _demo(args) -> int:
    from core.data.layouts.demo import ensure_demo

    print(ensure_demo())
    return 0


def register(subparsers) -> None:
    index = subparsers.add_parser("index", help="index a dataset (a folder, a list, a shard set, or a whole bucket "
                                                "s3://bucket/prefix from its metadata) and print its summary")
    index.add_argument("source", nargs="?", default=None, help="what to index (same as --data)")
    index.add_argument("--data", default=None, help="dataset folder (default: configured, else the demo)")
    index.add_argument("--workers", type=int, default=32, help="s3://: metadata requests in flight at once")
    add_class_range(index)
    index.set_defaults(handler=_index)
    split = subparsers.add_parser("split", help="make a new stratified split (replaces the saved one)")
    split.add_argument("--data", default=None)
    split.add_argument("--test-per-class", type=int, default=100)
    split.add_argument("--valid-fraction", type=float, default=0.2)
    split.add_argument("--seed", type=int, default=0)
    add_class_range(split)
    split.set_defaults(handler=_split)
    demo = subparsers.add_parser("demo", help="generate the embedded demo dataset (once) and print its folder")
    demo.set_defaults(handler=_demo)
