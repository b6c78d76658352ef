"""Benchmark: the new views at bucket scale (536 K photos) on a synthetic, real-shaped set; time and peak memory.

    BINSIGHT_HOME=/tmp/bench-home python bench/bucket_scale.py --photos 50000 [--work /tmp/bucket-bench]
                                                               [--parts make,duplicates,map,issues,open]

The set (made once per size under --work): names and counts of the bucket from the counting lists of ../shared/abid
(324,735 + 36,032 bins of counts 0–5; the other ~175 K bins of the bucket get counts of 6 and more drawn from its
labels.csv), splits 80/10/10 for counts 1–5; perceptual hashes resampled from the real photos' (each a real photo's
hashes, each bit flipped with probability 0.3: pairs then differ like ABID's, 90+ of 256 bits) with 1 % planted twins, at
distances drawn from the real look-alike pairs of ../shared/abid (a tenth byte-identical); frozen features (the
label-issue recipe's 880 columns, two views) of 300 real photos, 60 per count (computed once, ~9 minutes on 2 cores,
then cached), each row one of its count's with noise (0.5 σ per column, 0.1 σ more per view), on disk (memory-mapped).
Each part runs in its own process and prints its time and peak resident memory; a `nice`d run on a shared machine
gives upper bounds.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ABID = (ROOT / ".." / "shared" / "abid").resolve()
BUCKET = 536_000
REAL_PER_COUNT = 60
TWINS = 0.01


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Clock:
    """Wall and CPU seconds since it started: on a machine whose cores are taken by others, the CPU seconds of these
    one-thread parts are what they take on a free core; the wall seconds are upper bounds."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def seconds(self) -> dict:
        return {"wall_s": round(time.perf_counter() - self.wall, 2), "cpu_s": round(time.process_time() - self.cpu, 2)}


def report(part: str, photos: int, **figures) -> None:
    print(json.dumps({"part": part, "photos": photos, "peak_mb": round(peak_mb()), **figures}), flush=True)


# ---------------------------------------------------------------------------------------------- the set

def real_inputs(work: Path):
    """(checks of ../shared/abid's photos, their look-alike pairs, 300 real feature rows, their counts), kept in
    work's parent folder for the other sizes."""
    kept = work.parent / "real-inputs"
    if (kept / "features.npz").is_file():
        stored = np.load(kept / "features.npz")
        return (pd.read_parquet(kept / "checks.parquet"), pd.read_parquet(kept / "pairs.parquet"),
                stored["features"], stored["counts"])
    from core.data.layouts.registry import load_dataset
    from core.data.photos.photo_checks import check_photos, near_duplicate_pairs
    from core.evaluation.label_issues import head_columns, photo_features

    dataset = load_dataset(str(ABID))
    checks = check_photos(dataset.key, dataset.frame).frame
    checks = checks[checks["phash"].notna()].reset_index(drop=True)
    rows = dataset.rows("all").groupby("cls").sample(REAL_PER_COUNT, random_state=0)
    features, _ = photo_features(dataset, rows)
    kept.mkdir(parents=True, exist_ok=True)
    found = (checks, near_duplicate_pairs(checks), features[..., head_columns()], rows["cls"].to_numpy())
    found[0].to_parquet(kept / "checks.parquet", index=False)
    found[1].to_parquet(kept / "pairs.parquet", index=False)
    np.savez(kept / "features.npz", features=found[2], counts=found[3])
    return found


def bucket_counts(rng) -> pd.DataFrame:
    """name and count of every bin of the bucket: the counting lists, then counts of 6+ for the others."""
    listed = json.loads((ABID / "lists" / "counting_train.json").read_text())
    listed += json.loads((ABID / "lists" / "counting_val.json").read_text())
    index = np.array([i for i, _ in listed])
    counts = np.array([c for _, c in listed])
    labels = pd.read_csv(ABID / "labels.csv")
    others = np.setdiff1d(np.arange(BUCKET), index)[:BUCKET - len(index)]
    big = labels.loc[labels["count"] > 5, "count"].to_numpy()
    frame = pd.DataFrame({"index": np.r_[index, others], "count": np.r_[counts, rng.choice(big, len(others))]})
    frame["name"] = [f"{i + 1:05d}.jpg" for i in frame["index"]]
    return frame.drop(columns="index")


def flip(bits: np.ndarray, how_many: np.ndarray, rng) -> np.ndarray:
    """Each row of bits with how_many[row] of its bits flipped (at random places), 50 K rows at a time."""
    out = bits.copy()
    for start in range(0, len(bits), 50_000):
        ranks = rng.random(bits[start:start + 50_000].shape).argsort(1).argsort(1)
        out[start:start + 50_000] ^= (ranks < how_many[start:start + 50_000, None]).astype(np.uint8)
    return out


def make_set(photos: int, work: Path) -> None:
    from core.evaluation.label_issues import RECIPE

    rng = np.random.default_rng(0)
    checks, pairs, real_features, real_counts = real_inputs(work)
    table = bucket_counts(rng).sample(photos, random_state=0).reset_index(drop=True)
    inside = table["count"].between(1, 5)
    table["cls"] = table["count"].where(inside)
    table["split"] = np.where(inside, rng.choice(["train", "valid", "test"], photos, p=[0.8, 0.1, 0.1]), None)
    table["path"] = "/bucket/bin-images/" + table["name"]
    table["problem"] = None
    # hashes: a real photo's, each bit flipped with probability 0.3; then 1 % of rows made twins of others
    source = rng.integers(0, len(checks), photos)
    small = np.unpackbits(checks["phash"].astype("int64").to_numpy().view(np.uint64).astype(">u8")
                          .view(np.uint8).reshape(-1, 8), axis=1)[source]
    large = np.unpackbits(np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) for h in checks["phash256"]]),
                          axis=1)[source]
    small = small ^ (rng.random(small.shape, np.float32) < 0.3).astype(np.uint8)  # no sort: cheap at 536 K
    large = large ^ (rng.random(large.shape, np.float32) < 0.3).astype(np.uint8)
    sha = np.array([f"{n:040x}" for n in range(photos)], dtype=object)
    twins = int(photos * TWINS)
    chosen = rng.permutation(photos)[:2 * twins].reshape(2, twins)
    real = pairs[pairs["kind"] == "near"][["bits_64", "bits_256"]].to_numpy()
    distances = real[rng.integers(0, len(real), twins)]
    exact = rng.random(twins) < 0.1
    distances[exact] = 0
    small[chosen[1]] = flip(small[chosen[0]], distances[:, 0], rng)
    large[chosen[1]] = flip(large[chosen[0]], distances[:, 1], rng)
    sha[chosen[1][exact]] = sha[chosen[0][exact]]
    table["sha1"] = sha
    table["phash"] = np.packbits(small, axis=1).view(">u8").astype(np.uint64).view(np.int64).ravel()
    table["phash256"] = [bytes(row).hex() for row in np.packbits(large, axis=1)]
    table["twin_of"] = None
    table.loc[chosen[1], "twin_of"] = table.loc[chosen[0], "name"].to_numpy()
    work.mkdir(parents=True, exist_ok=True)
    table.to_parquet(work / "table.parquet", index=False)
    # features: a real photo of the same count (any for counts outside 1–5) with noise, in chunks, on disk
    spread = real_features.reshape(-1, real_features.shape[-1]).std(0)
    by_count = {c: np.flatnonzero(real_counts == c) for c in np.unique(real_counts)}
    out = np.lib.format.open_memmap(work / "features.npy", mode="w+", dtype=np.float32,
                                    shape=(photos, len(RECIPE["views"]), real_features.shape[-1]))
    for start in range(0, photos, 20_000):
        counts = table["count"].to_numpy()[start:start + 20_000]
        picks = np.array([rng.choice(by_count.get(c, np.arange(len(real_counts)))) for c in counts])
        noise = rng.standard_normal((len(picks), 1, out.shape[2]), np.float32) * 0.5
        noise = noise + rng.standard_normal((len(picks), out.shape[1], out.shape[2]), np.float32) * 0.1
        out[start:start + len(picks)] = real_features[picks] + noise * spread
    out.flush()
    report("make", photos, twins=twins, features_gb=round(out.nbytes / 1e9, 2))


# ---------------------------------------------------------------------------------------------- the parts

def bench_duplicates(photos: int, work: Path) -> None:
    from core.data.photos.photo_checks import near_duplicate_pairs

    table = pd.read_parquet(work / "table.parquet", columns=["name", "sha1", "phash", "phash256", "twin_of"])
    clock = Clock()
    pairs = near_duplicate_pairs(table)
    seconds = clock.seconds()
    found = set(zip(pairs["photo"], pairs["other_photo"])) | set(zip(pairs["other_photo"], pairs["photo"]))
    planted = table[table["twin_of"].notna()]
    recall = np.mean([(a, b) in found for a, b in zip(planted["twin_of"], planted["name"])])
    report("duplicates", photos, **seconds, pairs=len(pairs), planted=len(planted),
           recall=round(float(recall), 4))


def bench_map(photos: int, work: Path) -> None:
    from core.evaluation.embedding_map import project

    table = pd.read_parquet(work / "table.parquet", columns=["name", "count"])
    features = np.load(work / "features.npy", mmap_mode="r")
    clock = Clock()
    coordinates, method = project(features, strata=table["count"].to_numpy())
    seconds = clock.seconds()
    pd.DataFrame({"name": table["name"], "x": coordinates[:, 0].astype(float),
                  "y": coordinates[:, 1].astype(float)}).to_parquet(work / "map.parquet", index=False)
    report("map", photos, **seconds, method=method)


def bench_issues(photos: int, work: Path) -> None:
    from core.evaluation.label_issues import cross_fit, rank_issues

    table = pd.read_parquet(work / "table.parquet", columns=["name", "cls", "split"])
    features = np.load(work / "features.npy", mmap_mode="r")
    labelled = np.flatnonzero(table["cls"].notna().to_numpy())
    classes = [1, 2, 3, 4, 5]
    labels = table["cls"].to_numpy()[labelled].astype(int) - 1
    clock = Clock()
    # the labelled rows, read through the memory map in the order cross_fit asks for them
    probs = cross_fit(_Rows(features, labelled), labels, (table["split"].to_numpy()[labelled] != "test"),
                      n_classes=len(classes))
    fitted = clock.seconds()
    per_photo, _ = rank_issues(probs, labels, classes)
    seconds = clock.seconds()
    frame = pd.concat([table.iloc[labelled][["name", "split"]].reset_index(drop=True), per_photo], axis=1)
    for k, c in enumerate(classes):
        frame[f"prob_{c}"] = probs[:, k]
    frame.to_parquet(work / "issues.parquet", index=False)
    report("issues", photos, **seconds, cross_fit_cpu_s=fitted["cpu_s"], labelled=len(labels),
           flagged=int(frame["flagged"].sum()))


class _Rows:
    """A view of some rows of a memory-mapped table that reads only the rows asked for."""

    def __init__(self, table, rows):
        self.table, self.rows = table, rows
        self.shape = (len(rows),) + table.shape[1:]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return self.table[self.rows[index]]


def bench_open(photos: int, work: Path) -> None:
    """What each view does when it opens from caches: the map's render (server side, and the JSON the browser
    gets), the likely-wrong and random queues (first build of the table, then from it, then a deep page), and Data
    health's tables from the cached pairs and issues."""
    import plotly.io

    from app_pages.insight_views import _map_figure
    from core.data.photos.photo_checks import duplicate_findings, quality_findings
    from core.evaluation.embedding_map import coloured
    from core.review.queue import build_queue, paged_queue

    table = pd.read_parquet(work / "table.parquet")
    figures = {}
    for attempt in ("first", "again"):
        clock = Clock()
        points = pd.read_parquet(work / "map.parquet")
        issues = pd.read_parquet(work / "issues.parquet")
        frame = coloured(points, table, None, issues)
        figure = _map_figure(frame, "issue_score")
        payload = plotly.io.to_json(figure)
        figures[f"map_render_{attempt}"] = clock.seconds()
    figures["map_json_mb"] = round(len(payload) / 1e6, 2)
    (work / "map-figure.json").write_text(payload)
    probs = issues[[f"prob_{c}" for c in range(1, 6)]].to_numpy()
    scores = pd.DataFrame({"name": issues["name"], "predicted": probs.argmax(1) + 1, "confidence": probs.max(1),
                           "error": None})
    checked = set(issues["name"].iloc[::50])
    for kind in ("likely_wrong", "low_confidence", "random"):
        for attempt in ("build", "cached"):
            clock = Clock()
            queue = build_queue(table, kind, checked, scores, size=50, issues=issues)
            figures[f"queue_{kind}_{attempt}"] = clock.seconds()
    clock = Clock()
    deep = paged_queue(table, "low_confidence", checked, scores, size=50, issues=issues, offset=photos // 4)
    figures["queue_deep_page"] = clock.seconds()
    assert len(queue) == 50 and len(deep) == 50
    clock = Clock()
    pairs = pd.read_parquet(work / "pairs.parquet") if (work / "pairs.parquet").is_file() else None
    if pairs is not None:
        duplicate_findings(pairs, table)
    checks = table[["name"]].assign(error=None, brightness=100.0, sharpness=50.0)
    quality_findings(checks)
    issues = pd.read_parquet(work / "issues.parquet")
    int(issues["flagged"].sum())
    issues.groupby("label").agg(photos=("name", "size"), flagged=("flagged", "sum"))
    figures["health_tables"] = clock.seconds()
    report("open", photos, **figures)


def bench_draw(work: Path) -> None:
    """The map's figure drawn by Chromium (Playwright): from the page's start to Plotly's first afterplot."""
    from playwright.sync_api import sync_playwright

    payload = (work / "map-figure.json").read_text()
    page_file = work / "map.html"
    page_file.write_text(f"""<html><head><script src="file://{plotly_js()}"></script></head><body>
<div id="map" style="width:1200px;height:520px"></div><script>
const figure = {payload}; const started = performance.now();
Plotly.newPlot('map', figure.data, figure.layout).then(() => {{ window.drawn = performance.now() - started; }});
</script></body></html>""")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--use-gl=swiftshader"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        times = []
        for _ in range(3):
            page.goto(f"file://{page_file}")
            page.wait_for_function("window.drawn !== undefined", timeout=60_000)
            times.append(page.evaluate("window.drawn") / 1000)
        page.screenshot(path=str(work / "map.png"))
        browser.close()
    report("draw", 0, chromium_draw_s=[round(t, 2) for t in times])


def plotly_js() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


def cache_pairs(photos: int, work: Path) -> None:
    from core.data.photos.photo_checks import near_duplicate_pairs

    near_duplicate_pairs(pd.read_parquet(work / "table.parquet")).to_parquet(work / "pairs.parquet", index=False)


PARTS = {"make": make_set, "duplicates": bench_duplicates, "map": bench_map, "issues": bench_issues,
         "pairs": cache_pairs, "open": bench_open}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=50_000)
    parser.add_argument("--work", default="/tmp/bucket-bench")
    parser.add_argument("--parts", default="make,duplicates,map,issues,pairs,open,draw")
    parser.add_argument("--part", help=argparse.SUPPRESS)  # one part, in this process (the others start it)
    args = parser.parse_args()
    work = Path(args.work) / str(args.photos)
    if args.part:
        if args.part == "draw":
            bench_draw(work)
        else:
            PARTS[args.part](args.photos, work)
        return
    # BLAS on one thread per process: on the shared 2-core machine, two BLAS threads fighting the other jobs ran the
    # heads' fitting 7× slower (36 s against 5 s for one 10 K-photo head)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.photos:,} photos in {work}; "
          f"BLAS threads {os.environ['OMP_NUM_THREADS']}", flush=True)
    for part in args.parts.split(","):
        if part == "make" and (work / "features.npy").is_file():
            continue
        started = time.perf_counter()
        subprocess.run([sys.executable, __file__, "--photos", str(args.photos), "--work", args.work, "--part", part],
                       check=True)
        print(f"  ({part}: {time.perf_counter() - started:.0f} s with the process's start)", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
