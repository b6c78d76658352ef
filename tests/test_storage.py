"""Cache caps: sizes, least-recently-used pruning that never takes a file in use, the prune hooks after writes, the
caps' settings and the Overview page's Storage expander."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core import config, storage
from core.models.caches import FeatureCache

ROOT = Path(__file__).resolve().parents[1]
DAY = 86_400


def cached_file(path: Path, size: int, used_days_ago: float) -> Path:
    """A cache file of `size` bytes last used (read or written) that many days ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size))
    age(path, used_days_ago)
    return path


def age(path: Path, days: float) -> None:
    when = time.time() - days * DAY
    os.utime(path, (when, when))


def test_pruning_deletes_the_least_recently_used_first_until_under_the_cap():
    folder = config.home() / "predictions"
    files = [cached_file(folder / f"run{i}" / "test.parquet", 1000, used_days_ago=10 - i) for i in range(10)]
    assert storage.cache_sizes()["predictions"] == 10_000

    result = storage.prune("predictions", 4500)
    assert result.deleted == files[:6]  # the six used longest ago, oldest first
    assert result.size_after == 4000 <= 4500 and result.freed == 6000
    assert [f.exists() for f in files] == [False] * 6 + [True] * 4
    assert storage.cache_sizes()["predictions"] == 4000
    assert not (folder / "run0").exists()  # emptied folders go too
    assert storage.prune("predictions", 4500).deleted == []  # under the cap: nothing to do


def test_a_read_marks_a_file_used_even_without_access_times(monkeypatch):
    folder = config.home() / "uploads" / "batch"
    old, older = cached_file(folder / "a.jpg", 1000, 5), cached_file(folder / "b.jpg", 1000, 6)
    mtime = old.stat().st_mtime_ns
    storage.touch(older)  # read just now: the other one is now the least recently used
    assert older.stat().st_mtime_ns != mtime and older.stat().st_mtime < time.time() - 5 * DAY  # mtime kept
    result = storage.prune("uploads", 1000, grace_s=0, keep_newest=0)
    assert result.deleted == [old] and older.exists()


def test_pruning_never_deletes_a_file_in_use():
    folder = config.home() / "s3-cache" / "aws" / "bucket"
    recent = cached_file(folder / "recent.jpg", 1000, used_days_ago=0)  # within the grace period
    writing = cached_file(folder / ".new.jpg.x1.tmp", 1000, used_days_ago=3)  # a download being written
    locked = cached_file(folder / "locked.jpg", 1000, used_days_ago=9)
    in_locked_folder = cached_file(folder / "batch" / "photo.jpg", 1000, used_days_ago=9)
    stale = cached_file(folder / "stale.jpg", 1000, used_days_ago=8)
    (folder / "stale.jpg.lock").write_text(str(dead_pid()))  # its writer died: the lock no longer protects it
    free = cached_file(folder / "free.jpg", 1000, used_days_ago=7)

    with storage.in_use(locked), storage.in_use(folder / "batch"):
        result = storage.prune("s3-cache", 0, keep_newest=0)
    assert sorted(result.deleted) == sorted([stale, free])
    assert all(p.exists() for p in (recent, writing, locked, in_locked_folder))
    assert not (folder / "locked.jpg.lock").exists()  # in_use cleans up after itself

    # once unlocked and past the grace period they can go; a temporary file never does
    assert storage.prune("s3-cache", 0, grace_s=0, keep_newest=0).deleted == [locked, in_locked_folder, recent]
    assert writing.exists()


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_the_newest_files_are_kept_whatever_the_cap():
    folder = config.home() / "features" / "key"
    files = [cached_file(folder / f"{i}.pt", 1000, used_days_ago=9 - i) for i in range(5)]
    result = storage.prune("features", 0, keep_newest=2)
    assert result.deleted == files[:3] and result.spared_in_use == 2 and result.size_after == 2000


def test_caps_come_from_defaults_settings_and_the_environment(monkeypatch):
    defaults = storage.cache_caps()
    assert defaults == {name: mb * storage.MB for name, mb in storage.DEFAULT_CAPS_MB.items()}
    config.save_settings(cache_caps_mb={"features": 100})
    assert storage.cache_caps()["features"] == 100 * storage.MB
    monkeypatch.setenv("BINSIGHT_CACHE_CAP_MB", "300, uploads=2.5, predictions=0")
    caps = storage.cache_caps()
    assert caps == {"predictions": None, "features": 300 * storage.MB, "stage_maps": 300 * storage.MB,
                    "s3-cache": 300 * storage.MB, "uploads": int(2.5 * storage.MB)}
    for bad in ("lots", "thumbnails=3", "features=-1"):
        monkeypatch.setenv("BINSIGHT_CACHE_CAP_MB", bad)
        with pytest.raises(storage.StorageError, match="BINSIGHT_CACHE_CAP_MB"):
            storage.cache_caps()


def shard_count(cache: FeatureCache) -> int:
    return len(list(cache.folder.glob("*.pt")))


def test_the_features_cache_prunes_after_a_write_at_most_every_few_minutes(monkeypatch):
    cache = FeatureCache("somekey")
    cache.add(["photo0"], torch.ones(1, 512))
    shard = next(cache.folder.glob("*.pt")).stat().st_size
    cap = int(shard * 3.5)
    monkeypatch.setenv("BINSIGHT_CACHE_CAP_MB", f"features={cap / storage.MB}")
    for i in range(1, 4):
        cache.add([f"photo{i}"], torch.ones(1, 512))
    assert shard_count(cache) == 4  # over the cap, but no prune for a few minutes after the first write's
    for old in cache.folder.glob("*.pt"):
        age(old, 2)
    monkeypatch.setattr(storage, "PRUNE_EVERY_S", 0.0)
    used = sorted(cache.folder.glob("*.pt"))[1]
    assert set(cache.load()) == {"photo0", "photo1", "photo2", "photo3"}
    for old in cache.folder.glob("*.pt"):
        if old != used:
            age(old, 2)  # only photo1's shard was read since

    cache.add(["later"], torch.ones(1, 512))
    cache.add(["last"], torch.ones(1, 512))
    assert storage.cache_sizes()["features"] <= cap
    assert set(cache.load()) == {"photo1", "later", "last"}


def test_the_overview_page_shows_each_cache_and_prunes_on_request(demo_source, monkeypatch):
    monkeypatch.setenv("BINSIGHT_DATA", str(demo_source))
    monkeypatch.setenv("BINSIGHT_CACHE_CAP_MB", "uploads=0.002")  # about 2 KB
    folder = config.home() / "uploads" / "old-batch"
    photos = [cached_file(folder / f"{i}.jpg", 1000, used_days_ago=5 - i) for i in range(5)]
    at = AppTest.from_file(str(ROOT / "app_pages" / "overview.py"), default_timeout=120).run()
    assert not at.exception
    [expander] = [e for e in at.expander if "Storage" in e.label]
    caption = " ".join(c.value for c in expander.caption)
    assert "uploads: 0.0 MB of 0.0 MB" in caption and "features: 0.0 MB of 2,048.0 MB" in caption
    assert [child.type for child in expander.children.values()].count("plotly_chart") == 1  # the bar chart

    at.button(key="storage_prune").click().run()
    assert not at.exception
    assert "Deleted 3 cached files" in at.success[0].value
    assert [p.exists() for p in photos] == [False, False, False, True, True]
