"""CLI for shard sets: `shards` packs a dataset into WebDataset tar shards in a folder or s3://bucket/prefix."""
from __future__ import annotations

import json

from core.cli.data import add_class_range, parse_class_range


def _shards(args) -> int:
    from tqdm import tqdm

    from core.data.layouts.registry import load_dataset
    from core.data.remote.shards import DEFAULT_SHARD_BYTES, pack_shards

    dataset = load_dataset(args.data, parse_class_range(args.classes))
    with tqdm(total=1000, unit="‰", desc="packing", bar_format="{l_bar}{bar}| {postfix}") as bar:
        def progress(fraction: float, text: str) -> None:
            bar.update(round(fraction * 1000) - bar.n)
            bar.set_postfix_str(text, refresh=False)

        index = pack_shards(dataset, args.out, args.shard_size or DEFAULT_SHARD_BYTES, args.seed, progress)
    summary = {
        "shards": len(index["shards"]),
        "photos": {split: sum(s["samples"] for s in index["shards"] if s["split"] == split)
                   for split in index["planned"]},
        "skipped": [entry for entry in index["skipped"] if entry["split"]],
        "index": f"{args.out.rstrip('/')}/shards.json",
    }
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers) -> None:
    shards = subparsers.add_parser("shards", help="pack a dataset into WebDataset shards (a folder or s3://bucket/prefix)")
    shards.add_argument("--data", default=None, help="any dataset --data accepts (default: configured, else the demo)")
    shards.add_argument("--out", required=True, help="destination folder or s3://bucket/prefix (your own bucket)")
    shards.add_argument("--shard-size", default=None, help="bytes per shard, like 200MB (the default) or 1GB")
    shards.add_argument("--seed", type=int, default=0, help="seed of the shuffle within each split")
    add_class_range(shards)
    shards.set_defaults(handler=_shards)
