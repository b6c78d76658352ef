"""Photo-level health checks: exact and near-duplicate photos (perceptual hashes), duplicates across splits and with
conflicting counts, unreadable, very dark or blurred photos; per-photo results cached by file size and time."""
from __future__ import annotations

import hashlib
import io
import itertools
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ImageFilter

from core import config
from core.data.photos.images import ImageError, load_image
from core.errors import Cancelled
from core.digests import frame_digest
from core.files import atomic_write_bytes, file_stamps

CHECKS_VERSION = 3
# Two photos look alike (the same bin from the same angle: re-shot, shifted, or before and after a pick) when their
# 64-bit perceptual hashes differ in at most 4 bits or their 256-bit ones in at most 50. ABID's bins all look much
# alike (the same elastic bands and labels): on its photos, random pairs differ by 18+ and 96+ bits, and a bin shot
# twice can miss one limit but rarely both. Near pairs still need a look: the same bin with other items passes too.
NEAR_BITS_64 = 4
NEAR_BITS_256 = 50
# Mean brightness (0–255) under which a bin cannot be counted by eye; ABID's photos are mostly 60–170.
DARK_BELOW = 35.0
# Variance of the Laplacian of the 256-px grey photo under which edges are smeared (motion blur, out of focus).
BLURRED_BELOW = 10.0
# Near-duplicate search by locality-sensitive hashing (see near_duplicate_pairs): bit-sampling tables of the 256-bit
# hashes, bits per table; a bucket larger than BUCKET_BLOCK is compared block by block, PAIRS_PER_CHUNK pairs at once.
# Tuned on ABID's hashes: random pairs of its photos differ by 90+ of 256 bits in 99.9 % of cases, near pairs within
# only the 256-bit limit by 32–50: 280 tables of 18 bits find a pair 50 bits apart 99.7 % of the time (44 bits: 99.98 %)
# and compare ~2 × 10⁸ candidates at 536 K photos (bench/bucket_scale.py), not 1.4 × 10¹¹ pairs.
LSH_TABLES = 280
LSH_BITS = 18
BUCKET_BLOCK = 64
PAIRS_PER_CHUNK = 1_000_000
ANALYSIS_SIDE = 256
COLUMNS = ["name", "sha1", "phash", "phash256", "brightness", "sharpness", "error"]


@dataclass
class PhotoChecks:
    """One row per photo: name, sha1, phash (64 bits as int64), phash256 (hex), brightness, sharpness, error."""

    frame: pd.DataFrame
    seconds: float = 0.0
    computed: int = 0
    notes: list[str] = field(default_factory=list)


def analyse_photo(path: str) -> dict:
    """sha1 of the bytes, the 64-bit perceptual hash, mean brightness and sharpness of one photo (or its error)."""
    import imagehash

    row = {"sha1": None, "phash": None, "phash256": None, "brightness": np.nan, "sharpness": np.nan, "error": None}
    try:
        data = Path(path).read_bytes()
        row["sha1"] = hashlib.sha1(data).hexdigest()
        image = load_image(data, os.path.basename(path))
    except OSError as exc:
        row["error"] = f"{os.path.basename(path)}: cannot be read ({exc.strerror or exc})"
        return row
    except ImageError as exc:
        row["error"] = str(exc)
        return row
    grey = image.convert("L")
    grey.thumbnail((ANALYSIS_SIDE, ANALYSIS_SIDE))
    # imagehash gives an unsigned 64-bit value; stored as int64 (same bits) so that it fits a parquet column.
    row["phash"] = int(np.uint64(int(str(imagehash.phash(grey)), 16)).astype(np.int64))
    row["phash256"] = str(imagehash.phash(grey, hash_size=16))
    pixels = np.asarray(grey, dtype=np.float32)
    row["brightness"] = float(pixels.mean())
    edges = np.asarray(grey.filter(ImageFilter.Kernel((3, 3), (0, 1, 0, 1, -4, 1, 0, 1, 0), 1, 128)), np.float32)
    row["sharpness"] = float((edges[1:-1, 1:-1] - 128.0).var())  # PIL copies the border pixels unfiltered
    return row


def _cache_path(dataset_key: str):
    return config.home() / "photo_checks" / f"{dataset_key}-v{CHECKS_VERSION}.parquet"


def has_cached_checks(dataset_key: str) -> bool:
    """Whether the photos of this dataset were checked before (a later call only checks new or changed photos)."""
    return _cache_path(dataset_key).is_file()


def _same_rows(cached: pd.DataFrame, wanted: pd.DataFrame) -> bool:
    """Whether the two frames have the same names and stamps, row by row."""
    return all(np.array_equal(cached[column].to_numpy(dtype=object), wanted[column].to_numpy(dtype=object))
               for column in ("stamp", "name"))


def check_photos(dataset_key: str, rows: pd.DataFrame, on_progress=None, should_stop=None,
                 threads: int | None = None, known_stamps: pd.Series | None = None) -> PhotoChecks:
    """Per-photo checks of `rows` (name, path): photos unchanged since the last call are read from the cache,
    the others decoded (on a few threads) and the cache rewritten atomically every few hundred photos.
    known_stamps: the files' stamps as the dataset's loading read them (Dataset.stamps), else each file is stat'ed."""
    import time

    started = time.perf_counter()
    rows = rows[rows["path"].notna()][["name", "path"]]
    stamps = file_stamps(rows["path"], known_stamps)
    cache_file = _cache_path(dataset_key)
    try:
        cached = pd.read_parquet(cache_file)
    except (OSError, ValueError):
        cached = pd.DataFrame(columns=COLUMNS + ["stamp"])
    # Every photo unchanged since its check (a page opening from the cache): its rows picked by a join, not a
    # dictionary of every cached row (~20 s at 536 K photos, bench/app_open_scale.py)
    wanted = pd.DataFrame({"name": rows["name"].to_numpy(), "stamp": stamps})
    if len(cached) == len(wanted) and all(stamps) and _same_rows(cached, wanted):
        # the cache holds exactly these photos in this order (it is written in the rows' order): no join
        frame = cached[COLUMNS].reset_index(drop=True)
        frame["phash"] = frame["phash"].astype("Int64")
        return PhotoChecks(frame, time.perf_counter() - started, 0)
    if len(cached) and wanted["name"].is_unique and all(stamps):
        hit = wanted.merge(cached.drop_duplicates(["name", "stamp"], keep="last"), on=["name", "stamp"], how="left",
                           indicator=True)
        if (hit["_merge"] == "both").all():
            frame = hit[COLUMNS].copy()
            frame["phash"] = frame["phash"].astype("Int64")
            return PhotoChecks(frame, time.perf_counter() - started, 0)
    known = {(n, s): r for n, s, r in zip(cached["name"], cached["stamp"], cached.to_dict("records"))}
    results, todo = {}, []
    for name, path, stamp in zip(rows["name"], rows["path"], stamps):
        if stamp and (name, stamp) in known:
            results[name] = known[(name, stamp)]
        else:
            todo.append((name, path, stamp))

    def save():
        frame = pd.DataFrame(list(results.values()), columns=COLUMNS + ["stamp"])
        atomic_write_bytes(cache_file, frame.to_parquet(index=False))

    workers = threads or max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for done, ((name, path, stamp), row) in enumerate(zip(todo, pool.map(lambda t: analyse_photo(t[1]), todo)), 1):
            results[name] = {"name": name, **row, "stamp": stamp}
            if done % 300 == 0 or done == len(todo):
                if should_stop and should_stop():
                    save()
                    raise Cancelled("photo checks stopped (the photos checked so far are kept)")
                if on_progress:
                    on_progress(done / len(todo), f"Checking photos {done:,}/{len(todo):,}")
                if done % 900 == 0:
                    save()
    if todo:
        save()
    frame = pd.DataFrame([results[n] for n in rows["name"]], columns=COLUMNS + ["stamp"]).drop(columns="stamp")
    frame["phash"] = frame["phash"].astype("Int64")
    return PhotoChecks(frame, time.perf_counter() - started, len(todo))


def _hash_words(hex_values) -> np.ndarray:
    """Hex hashes as rows of uint64 words (n × bits/64), for XOR and popcount."""
    joined = bytes.fromhex("".join(hex_values))
    return np.frombuffer(joined, ">u8").astype(np.uint64).reshape(len(hex_values), -1)


def _band_keys(small: np.ndarray) -> list[np.ndarray]:
    """The 64-bit hashes cut into NEAR_BITS_64 + 1 bands, each band one table's key."""
    edges = np.linspace(0, 64, NEAR_BITS_64 + 2).astype(int)
    keys = []
    for low, high in zip(edges[:-1], edges[1:]):
        mask = np.uint64((1 << int(high - low)) - 1)
        keys.append((small >> np.uint64(low)) & mask)
    return keys


def _sampled_keys(large: np.ndarray, seed: int = 0):
    """LSH_TABLES keys of the 256-bit hashes, one table at a time, each LSH_BITS bits picked at random (seeded): two
    hashes d bits apart share a key with probability (1 − d/256)^LSH_BITS in each table."""
    bits = np.unpackbits(large.view(">u8").view(np.uint8), axis=1).T.copy()  # one row per bit: its photos
    rng = np.random.default_rng(seed)
    for _ in range(LSH_TABLES):
        packed = np.packbits(bits[rng.choice(len(bits), LSH_BITS, replace=False)], axis=0).astype(np.uint64)
        yield sum(row << np.uint64(8 * (len(packed) - 1 - n)) for n, row in enumerate(packed))


def _same_key_pairs(keys: np.ndarray):
    """Index pairs (i, j) of rows that share a key, in chunks of bounded size: neighbours in key order for the
    usual small buckets, block by block inside a bucket larger than BUCKET_BLOCK."""
    order = np.argsort(keys)
    ordered = keys[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    sizes = np.diff(np.r_[starts, len(keys)])
    shared = np.repeat(sizes > 1, sizes)  # most photos are alone in their bucket: left out before the pairing
    order, ordered, sizes = order[shared], ordered[shared], sizes[sizes > 1]
    if not len(sizes):
        return
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    large = np.repeat(sizes > BUCKET_BLOCK, sizes)
    for offset in range(1, min(BUCKET_BLOCK, int(sizes.max()))):
        same = np.flatnonzero((ordered[offset:] == ordered[:-offset]) & ~large[offset:])
        for first in range(0, len(same), PAIRS_PER_CHUNK):
            part = same[first:first + PAIRS_PER_CHUNK]
            yield order[part], order[part + offset]
    for start, size in zip(starts[sizes > BUCKET_BLOCK], sizes[sizes > BUCKET_BLOCK]):
        members = order[start:start + size]
        step = max(1, PAIRS_PER_CHUNK // size)
        for first in range(0, size, step):
            left = np.repeat(np.arange(first, min(first + step, size)), size)
            right = np.tile(np.arange(size), min(step, size - first))
            keep = right > left
            yield members[left[keep]], members[right[keep]]


def _within_64(small, large, left, right) -> np.ndarray:
    return np.bitwise_count(small[left] ^ small[right]) <= NEAR_BITS_64


def _within_256(small, large, left, right) -> np.ndarray:
    bits = np.bitwise_count(large[left, 0] ^ large[right, 0]) + np.bitwise_count(large[left, 1] ^ large[right, 1])
    maybe = np.flatnonzero(bits <= NEAR_BITS_256)
    rest = np.bitwise_count(large[left[maybe], 2:] ^ large[right[maybe], 2:]).sum(1, dtype=np.int64)
    close = np.zeros(len(left), dtype=bool)
    close[maybe] = bits[maybe] + rest <= NEAR_BITS_256
    return close


def near_duplicate_pairs(checks: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """Pairs of photos (photo before other_photo in the table) that are byte-identical ('exact') or show the same
    scene ('near', see NEAR_BITS_64), with both hash distances. Candidates come from hash tables (locality-sensitive
    hashing), then only they are compared: the work grows with the photos, not with their pairs. Every pair within
    the 64-bit limit is found (its hash agrees with the other's on one of NEAR_BITS_64 + 1 bands); a pair within only
    the 256-bit limit is found with the probability of LSH_TABLES bit-sampling tables (all of them on ABID's photos;
    bench/bucket_scale.py measures the recall at bucket scale)."""
    usable = checks[checks["phash"].notna() & checks["phash256"].notna()].reset_index(drop=True)
    columns = ["photo", "other_photo", "kind", "bits_64", "bits_256"]
    if usable.empty:
        return pd.DataFrame(columns=columns)
    names, sha = usable["name"].to_numpy(), usable["sha1"].to_numpy()
    small = usable["phash"].astype("int64").to_numpy().view(np.uint64)
    large = _hash_words(usable["phash256"])
    found = []
    # A band table only looks for pairs within the 64-bit limit (it holds them all), a sampled table for pairs within
    # the 256-bit one, its distance summed word by word: most candidates are out after two of the four words.
    tables = itertools.chain(((keys, _within_64) for keys in _band_keys(small)),
                             ((keys, _within_256) for keys in _sampled_keys(large, seed)))
    for keys, within in tables:
        for left, right in _same_key_pairs(keys):
            close = within(small, large, left, right)
            if close.any():
                a, b = left[close], right[close]
                found.append(np.stack([np.minimum(a, b), np.maximum(a, b)], 1))
    if not found:
        return pd.DataFrame(columns=columns)
    pairs = np.unique(np.concatenate(found), axis=0)  # a pair found by several tables once; sorted by (photo, other)
    first, second = pairs[:, 0], pairs[:, 1]
    bits_64 = np.bitwise_count(small[first] ^ small[second]).astype(int)
    bits_256 = np.bitwise_count(large[first] ^ large[second]).sum(1).astype(int)
    kind = np.where(sha[first] == sha[second], "exact", "near")
    table = pd.DataFrame({"photo": names[first], "other_photo": names[second], "kind": kind, "bits_64": bits_64,
                          "bits_256": bits_256})
    return table.sort_values(["bits_256", "photo"], kind="stable", ignore_index=True)


def cached_pairs(dataset_key: str, checks: pd.DataFrame) -> pd.DataFrame:
    """near_duplicate_pairs of the checks, computed once per set of hashes (a minute or two at bucket scale) and
    then read back, so that Data health opens from its caches."""
    digest = frame_digest(checks[["name", "sha1", "phash", "phash256"]])[:16]
    path = config.home() / "photo_checks" / f"{dataset_key}-pairs-v{CHECKS_VERSION}-{digest}.parquet"
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError):
        pass
    pairs = near_duplicate_pairs(checks)
    for old in path.parent.glob(f"{dataset_key}-pairs-*.parquet"):
        old.unlink(missing_ok=True)
    atomic_write_bytes(path, pairs.to_parquet(index=False))
    return pairs


@dataclass
class PhotoFindings:
    """What the photo checks found, label-independent and small: the look-alike and duplicate pairs, and the
    unreadable, very dark or blurred photos (quality_findings)."""

    pairs: pd.DataFrame
    quality: pd.DataFrame
    from_saved: bool = False


def _findings_paths(dataset_key: str, files_fingerprint: str) -> tuple[Path, Path]:
    stem = config.home() / "photo_checks" / f"{dataset_key}-findings-v{CHECKS_VERSION}-{files_fingerprint[:20]}"
    return stem.with_name(stem.name + "-pairs.parquet"), stem.with_name(stem.name + "-quality.parquet")


def photo_findings(dataset_key: str, rows: pd.DataFrame, files_fingerprint: str | None = None,
                   known_stamps: pd.Series | None = None, on_progress=None, should_stop=None) -> PhotoFindings:
    """The pairs and quality findings of `rows`' photos (name, path). With `files_fingerprint` (Dataset's: the
    version of every photo file as loaded) they are saved when found and read back while it holds: a page opening
    from the caches reads two small tables, not each photo's check (~2 s at 536 K photos). Without it, or the
    first time, the photos are checked (check_photos, from its cache) and the pairs found (cached_pairs)."""
    if files_fingerprint:
        pairs_file, quality_file = _findings_paths(dataset_key, files_fingerprint)
        try:
            return PhotoFindings(pd.read_parquet(pairs_file), pd.read_parquet(quality_file), from_saved=True)
        except (OSError, ValueError):
            pass
    checks = check_photos(dataset_key, rows, on_progress=on_progress, should_stop=should_stop,
                          known_stamps=known_stamps)
    found = PhotoFindings(cached_pairs(dataset_key, checks.frame), quality_findings(checks.frame))
    if not files_fingerprint:
        return found
    for old in pairs_file.parent.glob(f"{dataset_key}-findings-*.parquet"):
        old.unlink(missing_ok=True)
    saved = []
    for path, table in ((quality_file, found.quality), (pairs_file, found.pairs)):
        data = table.to_parquet(index=False)
        atomic_write_bytes(path, data)
        saved.append(pd.read_parquet(io.BytesIO(data)))  # as a later read gives them (the same column types)
    return PhotoFindings(saved[1], saved[0])


def duplicate_findings(pairs: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """The duplicate pairs with each photo's count and split, and what is wrong with the pair: 'leakage' (the two
    in different splits), 'conflicting counts', or just 'duplicate'."""
    named = set(pairs["photo"]) | set(pairs["other_photo"])
    info = frame.loc[frame["name"].isin(named), ["name", "count", "split"]].drop_duplicates("name").set_index("name")
    out = pairs.copy()
    for side, column in (("", "photo"), ("other_", "other_photo")):
        out[f"{side}count"] = out[column].map(info["count"]).astype("Int64")
        out[f"{side}split"] = out[column].map(info["split"])
    in_splits = out["split"].notna() & out["other_split"].notna()
    out["leakage"] = in_splits & (out["split"] != out["other_split"])
    out["conflicting_counts"] = (out["count"] != out["other_count"]).fillna(False).astype(bool)
    return out


def quality_findings(checks: pd.DataFrame) -> pd.DataFrame:
    """Photos that cannot be read, are very dark or blurred: name, problem, value."""
    # a column of None and strings comes back from parquet with NaN for None
    unreadable = checks["error"].notna()
    dark = ~unreadable & (checks["brightness"] < DARK_BELOW)
    blurred = ~unreadable & ~dark & (checks["sharpness"] < BLURRED_BELOW)
    parts = [pd.DataFrame({"photo": checks.loc[unreadable, "name"], "problem": "unreadable", "value": np.nan,
                           "detail": checks.loc[unreadable, "error"]}),
             pd.DataFrame({"photo": checks.loc[dark, "name"], "problem": "very dark",
                           "value": checks.loc[dark, "brightness"],
                           "detail": [f"mean brightness {v:.0f} of 255 (under {DARK_BELOW:.0f})"
                                      for v in checks.loc[dark, "brightness"]]}),
             pd.DataFrame({"photo": checks.loc[blurred, "name"], "problem": "blurred",
                           "value": checks.loc[blurred, "sharpness"],
                           "detail": [f"edge strength {v:.1f} (under {BLURRED_BELOW:.0f})"
                                      for v in checks.loc[blurred, "sharpness"]]})]
    found = pd.concat(parts).sort_index(kind="stable")  # in the checks' order, as photos are listed
    return found.reset_index(drop=True)[["photo", "problem", "value", "detail"]]
