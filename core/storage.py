"""Caches under BINSIGHT_HOME: their sizes, their caps, and least-recently-used pruning that spares files in use."""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from core import config
from core.errors import BinsightError

MB = 1024 * 1024
# Each cache (a folder under BINSIGHT_HOME) and its default cap in MB.
# stage_maps: the stage-map store partial fine-tuning reads (~200 KB a photo at 288×395 in two views: 4 GB holds
# ~20 K photos; a dataset that does not fit trains from the photos instead).
DEFAULT_CAPS_MB = {"predictions": 512, "features": 2048, "stage_maps": 4096, "s3-cache": 10240, "uploads": 1024}
CACHES = tuple(DEFAULT_CAPS_MB)
CAPS_ENV = "BINSIGHT_CACHE_CAP_MB"
CAPS_SETTING = "cache_caps_mb"
GRACE_S = 600.0  # a file used (read or written) this recently may be in use: never pruned
KEEP_NEWEST = 2  # nor are the most recently used files of a cache
PRUNE_EVERY_S = 300.0  # prune_after_write prunes a cache at most this often
LOCK_SUFFIX = ".lock"
TMP_SUFFIX = ".tmp"


class StorageError(BinsightError):
    """A cache cap that cannot be read; the message says which and why."""


# --- caps ---------------------------------------------------------------------------------------------------------

def _megabytes(text, where: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise StorageError(f"{where}: {text!r} is not a size in MB") from None
    if value < 0:
        raise StorageError(f"{where}: a cap cannot be negative ({text})")
    return value


def cache_caps() -> dict[str, int | None]:
    """Each cache's cap in bytes (None: no cap), from the defaults, then settings.json ("cache_caps_mb":
    {"features": 4096}), then $BINSIGHT_CACHE_CAP_MB: "4096" for every cache, or "features=4096,uploads=256",
    or both ("4096,uploads=256"). A cap of 0 means no cap."""
    caps_mb: dict[str, float] = dict(DEFAULT_CAPS_MB)
    stored = config.load_settings().get(CAPS_SETTING) or {}
    if isinstance(stored, dict):
        caps_mb.update({name: _megabytes(value, f"settings {CAPS_SETTING}.{name}")
                        for name, value in stored.items() if name in caps_mb})
    for item in filter(None, (part.strip() for part in os.environ.get(CAPS_ENV, "").split(","))):
        name, _, value = item.rpartition("=")
        name = name.strip()
        if name and name not in caps_mb:
            raise StorageError(f"{CAPS_ENV}: no cache named {name!r} (one of {', '.join(CACHES)})")
        size = _megabytes(value.strip(), CAPS_ENV)
        caps_mb.update({name: size} if name else dict.fromkeys(caps_mb, size))
    return {name: int(mb * MB) if mb else None for name, mb in caps_mb.items()}


# --- use ----------------------------------------------------------------------------------------------------------

def cache_dir(cache: str) -> Path:
    if cache not in DEFAULT_CAPS_MB:
        raise StorageError(f"no cache named {cache!r} (one of {', '.join(CACHES)})")
    return config.home() / cache


def touch(path: str | Path) -> None:
    """Record that a cached file was just read. The access time is set explicitly (file systems mounted noatime
    or relatime do not keep it), and the modification time is left alone: cached photos are hard-linked into
    datasets, whose fingerprints read it."""
    try:
        os.utime(path, ns=(time.time_ns(), os.stat(path).st_mtime_ns))
    except OSError:
        pass  # gone or read-only: pruning then only sees it as older than it is


def last_used(stat: os.stat_result) -> float:
    return max(stat.st_atime, stat.st_mtime)


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + LOCK_SUFFIX)


def _lock_held(lock: Path) -> bool:
    """A lock file whose writer is alive (it holds the writer's pid; a dead writer's lock is ignored)."""
    try:
        pid = int(lock.read_text().strip() or 0)
    except (OSError, ValueError):
        return lock.exists()
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def in_use(path: str | Path):
    """`with storage.in_use(path):` pruning leaves `path` (a file, or a folder and all under it) alone meanwhile,
    however old it looks: for a writer or reader that keeps a cached file open for long."""
    lock = _lock_path(Path(path))
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getpid()))
    try:
        yield Path(path)
    finally:
        lock.unlink(missing_ok=True)


def is_in_use(path: Path, root: Path) -> bool:
    """A temporary file being written, or a file (or a folder above it, up to `root`) with a live lock."""
    if path.name.endswith(TMP_SUFFIX) or path.name.endswith(LOCK_SUFFIX):
        return True
    current = path
    while True:
        if _lock_path(current).exists() and _lock_held(_lock_path(current)):
            return True
        if current == root or current.parent == current:
            return False
        current = current.parent


# --- sizes and pruning --------------------------------------------------------------------------------------------

def _files(folder: Path) -> list[tuple[Path, os.stat_result]]:
    found = []
    for dirpath, _dirnames, filenames in os.walk(folder):
        for name in filenames:
            path = Path(dirpath) / name
            try:
                stat = path.stat()
            except OSError:
                continue  # removed meanwhile
            found.append((path, stat))
    return found


def folder_size(folder: Path) -> int:
    return sum(stat.st_size for _path, stat in _files(folder))


def cache_sizes() -> dict[str, int]:
    """Bytes each cache takes (0 for one not made yet)."""
    return {name: folder_size(config.home() / name) for name in CACHES}


@dataclass
class Pruned:
    """What prune() did to one cache."""

    cache: str
    cap: int | None
    size_before: int
    size_after: int
    deleted: list[Path] = field(default_factory=list)
    spared_in_use: int = 0  # files that were old enough to go but in use, recent or among the newest

    @property
    def freed(self) -> int:
        return self.size_before - self.size_after


def prune(cache: str | Path, cap_bytes: int | None, grace_s: float = GRACE_S,
          keep_newest: int = KEEP_NEWEST) -> Pruned:
    """Delete a cache's least recently used files until it takes at most `cap_bytes` (None: no cap).

    Never deleted: files used within `grace_s`, the `keep_newest` most recently used, temporary files being
    written and anything under a live `.lock` (see in_use). The cache may stay above its cap when only such
    files are left. `cache` is a cache name (CACHES) or a folder.
    """
    folder = cache_dir(cache) if isinstance(cache, str) else Path(cache)
    files = _files(folder) if folder.is_dir() else []
    size = sum(stat.st_size for _path, stat in files)
    result = Pruned(str(cache), cap_bytes, size, size)
    if cap_bytes is None or size <= cap_bytes:
        return result
    by_use = sorted(files, key=lambda item: last_used(item[1]))
    protected = {path for path, _stat in by_use[-keep_newest:]} if keep_newest > 0 else set()
    now = time.time()
    for path, stat in by_use:
        if size <= cap_bytes:
            break
        if path in protected or now - last_used(stat) < grace_s or is_in_use(path, folder):
            result.spared_in_use += 1
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            continue
        size -= stat.st_size
        result.deleted.append(path)
    _remove_empty_folders(folder, {path.parent for path in result.deleted})
    result.size_after = size
    return result


def _remove_empty_folders(root: Path, folders: set[Path]) -> None:
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        while folder != root and root in folder.parents:
            try:
                folder.rmdir()  # only when empty
            except OSError:
                break
            folder = folder.parent


def prune_all() -> dict[str, Pruned]:
    """Bring every cache under its cap (what the Overview page's "Prune now" does)."""
    caps = cache_caps()
    return {name: prune(name, caps[name]) for name in CACHES}


def prune_after_write(cache: str) -> Pruned | None:
    """Called by cache code after it writes: prunes `cache` to its cap, at most every PRUNE_EVERY_S across
    processes (a stamp file's time says when it last ran). Never raises: a full cache must not fail a write."""
    stamp = config.home() / f".pruned-{cache}"
    try:
        if time.time() - stamp.stat().st_mtime < PRUNE_EVERY_S:
            return None
    except FileNotFoundError:
        pass
    except OSError:
        return None
    try:
        stamp.touch()
        return prune(cache, cache_caps()[cache])
    except (OSError, BinsightError):
        return None
