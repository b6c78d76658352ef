"""Benchmark: Data health, Browse (its map) and Spot-check (the likely-wrong queue) opened through Streamlit on a
536 K-photo dataset with every cache warm; wall and CPU seconds per page (first open, then a rerun), peak memory.

    BINSIGHT_HOME=/tmp/app-open-bench/home python bench/app_open_scale.py --photos 536000 \\
        [--work /tmp/bucket-bench] [--folder /tmp/app-open-bench] [--parts setup,open]

It reads the synthetic set bench/bucket_scale.py makes under --work/<photos> (table.parquet, issues.parquet,
map.parquet, pairs.parquet: run that first) and
  setup: makes a folder in the ABID layout the app opens (bin-images/ of hard links to 60 real photos of
         ../shared/abid, copied once beside it; labels.csv of the synthetic names and counts), indexes it as the app
         does (the index and the saved split under BINSIGHT_HOME), then fills the app's caches with the synthetic
         results, keyed by the app's own digest functions: the photo checks (the synthetic hashes; every photo
         readable), the near-duplicate pairs, the label issues (split as the app assigned it) and the map; then opens
         the three pages once (AppTest) so that the Spot-check queue's table is built (once per pool);
  open:  in a fresh process (empty st.cache_*), starts the app (the Overview page: the dataset read from the index
         cache), then opens each page (AppTest.switch_page) and reruns it, printing one JSON line per page.
Then three decisions on the Spot-check page, and Data health and Browse opened again after them.
Server side only: AppTest runs each script in this process; what the browser does with the page is not timed here
(the map's drawing is bench/bucket_scale.py's `draw` part). CPU seconds are the process's (all its threads); on a
shared machine the wall seconds are upper bounds. No model is trained: Browse's map has no predictions to colour by.
"""
import argparse
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.bucket_scale import Clock, report  # noqa: E402 (after the path above)

ABID = (ROOT / ".." / "shared" / "abid").resolve()
REAL_PHOTOS = 60
GOAL_S = 2.0


# ---------------------------------------------------------------------------------------------- setup

def make_folder(work: Path, folder: Path) -> pd.DataFrame:
    """The ABID-layout folder: bin-images/<name> hard links to real photos, labels.csv of name,count."""
    table = pd.read_parquet(work / "table.parquet", columns=["name", "count"])
    images = folder / "bin-images"
    if (folder / "labels.csv").is_file():
        return table
    real = folder.parent / "real-photos"
    real.mkdir(parents=True, exist_ok=True)
    sources = sorted(p for p in (ABID / "bin-images").iterdir() if p.suffix == ".jpg")[:REAL_PHOTOS]
    copies = []
    for source in sources:
        copy = real / source.name
        if not copy.is_file():
            shutil.copyfile(source, copy)
        copies.append(str(copy))
    images.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(table["name"]):
        target = images / name
        if not target.exists():
            os.link(copies[i % len(copies)], target)
    # written last: its presence says the folder is complete
    table.rename(columns={"name": "image"}).to_csv(folder / "labels.csv", index=False)
    return table


def fill_caches(photos: int, work: Path, folder: Path) -> None:
    from core.data.layouts.registry import load_dataset
    from core.data.photos import photo_checks
    from core.evaluation import embedding_map, label_issues

    clock = Clock()
    make_folder(work, folder)
    made = clock.seconds()
    clock = Clock()
    dataset = load_dataset(str(folder))
    indexed = clock.seconds()
    key, frame = dataset.key, dataset.frame
    table = pd.read_parquet(work / "table.parquet").set_index("name")

    # photo checks: the synthetic hashes, each photo readable, stamped as check_photos stamps them (size:mtime)
    on_disk = frame[frame["path"].notna()][["name", "path"]]
    checks = pd.DataFrame({"name": on_disk["name"].to_numpy()})
    hashed = table.loc[checks["name"], ["sha1", "phash", "phash256"]].reset_index(drop=True)
    checks = pd.concat([checks, hashed], axis=1).assign(brightness=100.0, sharpness=50.0, error=None)
    checks["stamp"] = dataset.file_stamps(on_disk["path"])
    checks = checks[photo_checks.COLUMNS + ["stamp"]]
    cache_file = photo_checks._cache_path(key)
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    checks.to_parquet(cache_file, index=False)
    checked = photo_checks.check_photos(key, frame, known_stamps=dataset.stamps)
    assert checked.computed == 0, "every photo should come from the cache"
    # the near-duplicate pairs under the key cached_pairs gives these checks (its search replaced by the cached one)
    pairs = pd.read_parquet(work / "pairs.parquet")
    search = photo_checks.near_duplicate_pairs
    photo_checks.near_duplicate_pairs = lambda _checks, seed=0: pairs
    try:
        assert len(photo_checks.cached_pairs(key, checked.frame)) == len(pairs)
    finally:
        photo_checks.near_duplicate_pairs = search

    # label issues of the labelled photos, under the digest of the dataset as the app opened it (its split)
    rows = label_issues._labelled_rows(dataset)
    digest = label_issues._cache_digest(dataset, rows, label_issues.DEFAULT_FOLDS, 0)
    synthetic = pd.read_parquet(work / "issues.parquet").drop(columns="split")
    issues = rows[["name", "split"]].reset_index(drop=True).merge(synthetic, on="name", how="left")
    assert issues["label"].notna().all() and (issues["label"].to_numpy() == rows["cls"].to_numpy()).all()
    classes = [int(c) for c in dataset.classes]
    noise = pd.crosstab(issues["label"], issues["suggested"], normalize="index").reindex(
        index=classes, columns=classes, fill_value=0.0).to_numpy()
    info = {"classes": classes, "noise": noise.tolist(), "folds": label_issues.DEFAULT_FOLDS, "seed": 0,
            "recipe": label_issues.RECIPE, "photos": len(issues), "flagged": int(issues["flagged"].sum()),
            "unreadable": 0, "seconds": 0.0, "computed_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    table_file, info_file = label_issues._cache_paths(dataset, digest)
    table_file.parent.mkdir(parents=True, exist_ok=True)
    issues.to_parquet(table_file, index=False)
    info_file.write_text(json.dumps(info))
    assert label_issues.cached_label_issues(dataset) is not None

    # the map of every labelled photo (Browse's rows), under embedding_map's digest of those rows
    rows = dataset.rows("all")
    points = pd.read_parquet(work / "map.parquet")
    points = rows[["name"]].merge(points, on="name", how="inner")  # in the rows' order, as embedding_map saves it
    map_file, map_info = embedding_map._paths(key, embedding_map._digest(key, rows, 0))
    map_file.parent.mkdir(parents=True, exist_ok=True)
    points.to_parquet(map_file, index=False)
    map_info.write_text(json.dumps({
        "method": "UMAP of a 50,000-photo sample, the others placed beside their nearest neighbours (synthetic)",
        "photos": len(points), "unreadable": 0, "recipe": label_issues.RECIPE, "seed": 0, "feature_seconds": 0.0,
        "map_seconds": 0.0, "computed_at": time.strftime("%Y-%m-%d %H:%M:%S")}))
    assert embedding_map.cached_map(key, rows) is not None
    report("setup", photos, folder_made=made, indexed=indexed, dataset_key=key, labelled=len(issues),
           flagged=info["flagged"], pairs=len(pairs), map_points=len(points))


# ---------------------------------------------------------------------------------------------- open

PAGES = [("health", "app_pages/health.py"), ("browse", "app_pages/browse.py"),
         ("spot_check_likely_wrong", "app_pages/spot_check.py")]


def timed_run(at, label: str, photos: int, emit: bool, **extra) -> None:
    clock = Clock()
    at.run()
    seconds = clock.seconds()
    problems = [str(e.value)[:300] for e in at.exception] + [str(e.value)[:200] for e in at.error]
    if emit:
        report(label, photos, **seconds, **extra, under_goal=seconds["wall_s"] <= GOAL_S,
               **({"problems": problems} if problems else {}))
    elif problems:
        print(json.dumps({"part": label, "problems": problems}), flush=True)


def open_pages(photos: int, emit: bool = True, profile: str | None = None) -> None:
    """The app started (Overview), then each page opened and rerun in the same session, as a user would."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=900)
    at.session_state["annotator"] = "bench"  # Spot-check's reviewer (no sign-in configured)
    at.session_state["spot_kind"] = "likely_wrong"
    timed_run(at, "app_start_overview", photos, emit, note="first run: the dataset read from the index cache")
    for name, page in PAGES:
        at.switch_page(page)
        if name in (profile or "").split(","):
            import cProfile
            import pstats

            from streamlit import Page as StreamlitPage

            profiler, page_run = cProfile.Profile(), StreamlitPage.run

            def profiled(self):  # the script runs in AppTest's own thread: profile it there
                profiler.enable()
                try:
                    return page_run(self)
                finally:
                    profiler.disable()

            StreamlitPage.run = profiled
            try:
                timed_run(at, f"{name}_first_open_profiled", photos, emit)
            finally:
                StreamlitPage.run = page_run
            stats = pstats.Stats(profiler, stream=sys.stdout).sort_stats("cumulative")
            stats.print_stats(60)
            stats.sort_stats("tottime").print_stats(25)
            at.switch_page("app_pages/overview.py").run()
            at.switch_page(page)
        timed_run(at, f"{name}_first_open", photos, emit)
        timed_run(at, f"{name}_rerun", photos, emit)
    if emit:
        queue = at.session_state["spot_queue"] if "spot_queue" in at.session_state else []
        report("spot_check_queue", photos, bins=len(queue), first=queue[:3])
    # A reviewer's decisions on the Spot-check page (the bin shown counted as 3), then each page opened again: the
    # labels changed, so the dataset is relabelled and every view keyed by the labels is looked up anew. The
    # background re-check of the label issues that a decision starts is not run here (it is bench/bucket_scale.py's
    # label-issues part, minutes at this size, and would share the CPU with the pages timed).
    import app_pages.review_views as review_views

    review_views.recheck = lambda dataset, issues: review_views.recheck_state(dataset.key)
    for decision in range(1, 4):
        at.button(key="decide_3").click()
        timed_run(at, f"spot_check_decision_{decision}", photos, emit, note="the decision saved, the next bin shown")
    for name, page in PAGES[:2]:
        at.switch_page(page)
        timed_run(at, f"{name}_open_after_decisions", photos, emit)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=536_000)
    parser.add_argument("--work", default="/tmp/bucket-bench")
    parser.add_argument("--folder", default="/tmp/app-open-bench")
    parser.add_argument("--parts", default="setup,open")
    parser.add_argument("--profile", help="cProfile these pages' first opens (comma-separated: "
                        + ", ".join(name for name, _ in PAGES) + ")")
    parser.add_argument("--part", help=argparse.SUPPRESS)
    args = parser.parse_args()
    work, folder = Path(args.work) / str(args.photos), Path(args.folder) / str(args.photos)
    if not os.environ.get("BINSIGHT_HOME"):
        parser.error("set BINSIGHT_HOME to a folder of its own (the caches are written there)")
    os.environ["BINSIGHT_DATA"] = str(folder)
    if args.part == "setup":
        fill_caches(args.photos, work, folder)
        open_pages(args.photos, emit=False)  # builds the Spot-check queue's table, as the first visit would
        return
    if args.part == "open":
        open_pages(args.photos, profile=args.profile)
        return
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(name, "1")
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; {args.photos:,} photos in {folder}; "
          f"BINSIGHT_HOME {os.environ['BINSIGHT_HOME']}", flush=True)
    for part in args.parts.split(","):
        started = time.perf_counter()
        if part == "open":  # the decisions it makes are undone after it, so that every run opens the same state
            database = Path(os.environ["BINSIGHT_HOME"]) / "binsight.sqlite3"
            kept = database.with_name("binsight.before-open.sqlite3")
            with sqlite3.connect(database) as source, sqlite3.connect(kept) as copy:
                source.backup(copy)
        command = [sys.executable, __file__, "--photos", str(args.photos), "--work", args.work, "--folder",
                   args.folder, "--part", part] + (["--profile", args.profile] if args.profile else [])
        try:
            subprocess.run(command, check=True)
        finally:
            if part == "open":
                for extra in ("-wal", "-shm"):
                    database.with_name(database.name + extra).unlink(missing_ok=True)
                kept.replace(database)
        print(f"  ({part}: {time.perf_counter() - started:.0f} s with the process's start)", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
