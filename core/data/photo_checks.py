"""Photo-level health checks: exact and near-duplicate photos (perceptual hashes), duplicates across splits and with
conflicting counts, unreadable, very dark or blurred photos; per-photo results cached by file size and time."""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import ImageFilter

from core import config
from core.data.images import ImageError, load_image
from core.errors import Cancelled
from core.files import atomic_write_bytes

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


def _stamp(path: str) -> str:
    try:
        stat = os.stat(path)
    except OSError:
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def check_photos(dataset_key: str, rows: pd.DataFrame, on_progress=None, should_stop=None,
                 threads: int | None = None) -> PhotoChecks:
    """Per-photo checks of `rows` (name, path): photos unchanged since the last call are read from the cache,
    the others decoded (on a few threads) and the cache rewritten atomically every few hundred photos."""
    import time

    started = time.perf_counter()
    rows = rows[rows["path"].notna()][["name", "path"]]
    stamps = [_stamp(p) for p in rows["path"]]
    cache_file = _cache_path(dataset_key)
    try:
        cached = pd.read_parquet(cache_file)
    except (OSError, ValueError):
        cached = pd.DataFrame(columns=COLUMNS + ["stamp"])
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


def _hash_bytes(hex_values) -> np.ndarray:
    return np.stack([np.frombuffer(bytes.fromhex(value), np.uint8) for value in hex_values])


def near_duplicate_pairs(checks: pd.DataFrame) -> pd.DataFrame:
    """Pairs of photos (photo before other_photo in the table) that are byte-identical ('exact') or show the same
    scene ('near', see NEAR_BITS_64), with both hash distances. Every pair is compared, in blocks: fine to ~50 K
    photos; a bucket-scale set would need hashing into buckets first."""
    usable = checks[checks["phash"].notna() & checks["phash256"].notna()].reset_index(drop=True)
    if usable.empty:
        return pd.DataFrame(columns=["photo", "other_photo", "kind", "bits_64", "bits_256"])
    names, sha = usable["name"].to_numpy(), usable["sha1"].to_numpy()
    small = usable["phash"].astype("int64").to_numpy().view(np.uint64)
    small = small[:, None].view(np.uint8).reshape(len(small), 8)
    large = _hash_bytes(usable["phash256"])
    found = []
    block = 256
    for start in range(0, len(names), block):
        bits_64 = np.unpackbits(small[start:start + block, None] ^ small[None], axis=-1).sum(-1)
        bits_256 = np.unpackbits(large[start:start + block, None] ^ large[None], axis=-1).sum(-1)
        close = (bits_64 <= NEAR_BITS_64) | (bits_256 <= NEAR_BITS_256)
        for i, j in zip(*np.nonzero(close)):
            a = start + i
            if j > a:
                kind = "exact" if sha[a] == sha[j] else "near"
                found.append((names[a], names[j], kind, int(bits_64[i, j]), int(bits_256[i, j])))
    pairs = pd.DataFrame(found, columns=["photo", "other_photo", "kind", "bits_64", "bits_256"])
    return pairs.sort_values(["bits_256", "photo"], kind="stable", ignore_index=True)


def duplicate_findings(pairs: pd.DataFrame, frame: pd.DataFrame) -> pd.DataFrame:
    """The duplicate pairs with each photo's count and split, and what is wrong with the pair: 'leakage' (the two
    in different splits), 'conflicting counts', or just 'duplicate'."""
    info = frame.set_index("name")[["count", "split"]]
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
    rows = []
    for record in checks.itertuples(index=False):
        if isinstance(record.error, str):  # a column of None and strings comes back from parquet with NaN for None
            rows.append((record.name, "unreadable", np.nan, record.error))
        elif record.brightness < DARK_BELOW:
            rows.append((record.name, "very dark", record.brightness,
                         f"mean brightness {record.brightness:.0f} of 255 (under {DARK_BELOW:.0f})"))
        elif record.sharpness < BLURRED_BELOW:
            rows.append((record.name, "blurred", record.sharpness,
                         f"edge strength {record.sharpness:.1f} (under {BLURRED_BELOW:.0f})"))
    return pd.DataFrame(rows, columns=["photo", "problem", "value", "detail"])
