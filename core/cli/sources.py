"""CLI for photo sources and balancing: `fetch` (bucket photos into a folder) and `balance` (preview / apply)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from core.cli.data import add_class_range, parse_class_range
from core.errors import UsageError


def add_s3_options(parser) -> None:
    group = parser.add_argument_group(
        "S3 source (these options override the BINSIGHT_S3_* variables, which override settings.json)")
    group.add_argument("--bucket", default=None, help="bucket name (default aft-vbi-pds, the public ABID bucket)")
    group.add_argument("--endpoint-url", default=None, help="S3-compatible server, e.g. http://127.0.0.1:9000")
    group.add_argument("--region", default=None)
    group.add_argument("--unsigned", action="store_const", const=True, default=None,
                       help="send unsigned requests (public buckets)")
    group.add_argument("--workers", type=int, default=8, help="parallel downloads")


def _source(args):
    from core.data.remote.s3 import S3Error, S3Source, s3_settings

    try:
        settings = s3_settings(bucket=args.bucket, endpoint_url=args.endpoint_url, region=args.region,
                               unsigned=args.unsigned)
    except S3Error as exc:
        raise UsageError(str(exc)) from None
    return S3Source(settings, workers=args.workers)


@contextmanager
def _progress(quiet: bool):
    """An on_progress(fraction, text) callback drawing a tqdm bar on stderr, or None when quiet; closed at the end."""
    if quiet:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=1.0, file=sys.stderr, bar_format="{percentage:5.1f}%|{bar:20}| {elapsed}<{remaining} {desc}") \
            as bar:
        def update(fraction: float, text: str) -> None:
            bar.set_description_str(text, refresh=False)
            bar.update(fraction - bar.n)

        yield update


def _fetch(args) -> int:
    from core.data.labels import abid
    from core.data.curation.pools import list_pool
    from core.data.remote.s3 import S3Error

    source = _source(args)
    try:
        if args.ls is not None:
            for key in source.list_keys(args.ls, limit=args.limit):
                print(key)
            return 0
        if not args.to:
            raise UsageError("say where to put the photos: --to FOLDER")
        photos: dict[str, int | None] = {}
        for item in args.names:
            name = Path(item).name
            if item.startswith(abid.METADATA_PREFIX) or name.endswith(".json"):
                name = Path(name).stem + ".jpg"
            photos[name] = None
        if args.list:
            pool = list_pool(args.list, source)
            listed = pool.photos
            class_range = parse_class_range(args.classes)
            if class_range is not None:
                listed = listed[class_range.assign(listed["count"]).notna()]
            if args.per_class:
                rng = np.random.default_rng(args.seed)
                keep = []
                for _count, group in listed.groupby("count"):
                    keep += list(group.index[np.sort(rng.permutation(len(group))[:args.per_class])])
                listed = listed.loc[keep]
            photos.update({n: int(c) for n, c in zip(listed["name"], listed["count"])})
        if not photos:
            raise UsageError("nothing to fetch: give photo names or keys, or --list file_list.json/counting list")
        with _progress(args.quiet) as on_progress:
            folder = source.fetch_dataset(photos, Path(args.to).expanduser(), with_metadata=not args.no_metadata,
                                          on_progress=on_progress)
    except S3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{len(photos):,} photos from {source.settings.describe()} in {folder} (ABID layout)")
    return 0


def _parse_more(items: list[str]) -> dict[int, int]:
    more = {}
    for item in items or []:
        cls, sep, n = item.partition("=")
        if not sep or not cls.strip().isdigit() or not n.strip().isdigit():
            raise UsageError(f"--more {item!r}: expected CLASS=N, e.g. --more 3=50")
        more[int(cls)] = int(n)
    return more


def _balance(args) -> int:
    from core.data.curation import balancing
    from core.data.labels import versions
    from core.data.curation.pools import folder_pool, list_pool
    from core.data.layouts.registry import load_dataset
    from core.data.layouts.saved_version import load_version
    from core.data.remote.s3 import S3Error

    dataset = load_dataset(args.data, parse_class_range(args.classes))
    if args.list_versions:
        for version in versions.list_versions(dataset):
            counts = ", ".join(f"{s} {n:,}" for s, n in version.info.get("photos", {}).items())
            print(f"{version.name}\t{version.created}\t{version.strategy}\t{counts}\t{version.path}")
        return 0
    if not args.strategy:
        raise UsageError("choose --strategy " + "|".join(balancing.STRATEGIES) + " (or --list-versions)")
    params: dict = {"seed": args.seed}
    if args.target is not None:
        params["target"] = args.target
    if args.splits:
        params["splits"] = [s.strip() for s in args.splits.split(",") if s.strip()]
    if args.strategy == "fetch":
        if not args.pool:
            raise UsageError("--strategy fetch needs --pool: a file_list.json / counting list (bucket) or a folder")
        pool_paths = [Path(p).expanduser() for p in args.pool]
        if len(pool_paths) == 1 and pool_paths[0].is_dir():
            params["pool"] = folder_pool(pool_paths[0])
        else:
            params["pool"] = list_pool(pool_paths, _source(args))
        params["more"] = _parse_more(args.more)
        if args.valid_fraction is not None:
            params["valid_fraction"] = args.valid_fraction
    try:
        plan = balancing.preview(dataset, args.strategy, params)
        table = plan.before.merge(plan.after, on=["split", "cls", "class_name"], suffixes=("_before", "_after"))
        table["change"] = [f"{b:g} → {a:g}" for b, a in zip(table["effective_before"], table["effective_after"])]
        print(f"photos per class and split (per epoch), {balancing.STRATEGIES[args.strategy].lower()}:")
        print(table.pivot(index="class_name", columns="split", values="change")
              .reindex(columns=balancing.SPLIT_ORDER).to_string())
        for note in plan.notes:
            print("note:", note)
        if not args.apply:
            print("(preview only: add --apply to save it as a new version)")
            return 0
        with _progress(args.quiet) as on_progress:
            version = balancing.apply(dataset, args.strategy, params, name=args.name, on_progress=on_progress)
    except balancing.BalanceError as exc:
        raise UsageError(str(exc)) from None
    except S3Error as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"version {version.name}: {version.path}")
    print(f"train on it with: python -m core train --data {version.path} --out RUN_DIR "
          f"--balance {versions.recommended_balance(load_version(version.path))}")
    return 0


def register(subparsers) -> None:
    fetch = subparsers.add_parser("fetch", help="download bucket photos (and metadata) into an ABID-layout folder")
    fetch.add_argument("names", nargs="*", help="image names or keys (00042.jpg, bin-images/00042.jpg)")
    fetch.add_argument("--to", default=None, help="target folder (created; photos already there are kept)")
    fetch.add_argument("--list", nargs="+", default=None, help="file_list.json and/or counting lists naming photos")
    fetch.add_argument("--per-class", type=int, default=None, help="at most N photos of each count from --list")
    fetch.add_argument("--seed", type=int, default=0)
    fetch.add_argument("--no-metadata", action="store_true", help="photos only (counts go to labels.csv)")
    fetch.add_argument("--ls", nargs="?", const="bin-images/", default=None, metavar="PREFIX",
                       help="list the bucket's keys under PREFIX instead of fetching")
    fetch.add_argument("--limit", type=int, default=100, help="with --ls: at most N keys")
    fetch.add_argument("--quiet", action="store_true")
    add_class_range(fetch)
    add_s3_options(fetch)
    fetch.set_defaults(handler=_fetch)

    balance = subparsers.add_parser("balance", help="preview a balancing strategy, or --apply it as a new version")
    balance.add_argument("--data", default=None, help="dataset folder or version manifest (default: configured)")
    balance.add_argument("--strategy", default=None,
                         help="fetch | undersample | oversample | sampler | loss_weights")
    balance.add_argument("--pool", nargs="+", default=None, help="fetch: bucket list(s) or a local pool folder")
    balance.add_argument("--more", action="append", default=None, metavar="CLASS=N", help="fetch: N more of a class")
    balance.add_argument("--target", type=int, default=None, help="under/oversample: photos per class")
    balance.add_argument("--splits", default=None, help="under/oversample: splits to balance (default train)")
    balance.add_argument("--valid-fraction", type=float, default=None, help="fetch: share of new photos for valid")
    balance.add_argument("--seed", type=int, default=0)
    balance.add_argument("--apply", action="store_true", help="save the result as a new version")
    balance.add_argument("--name", default=None, help="the new version's name (default strategy-date-time)")
    balance.add_argument("--list-versions", action="store_true", help="list this dataset's versions")
    balance.add_argument("--quiet", action="store_true")
    add_class_range(balance)
    add_s3_options(balance)
    balance.set_defaults(handler=_balance)
