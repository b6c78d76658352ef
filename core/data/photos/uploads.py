"""Photos handed to Predict (uploads, a local folder): safe names, staging under BINSIGHT_HOME, a clear message per bad file."""
from __future__ import annotations

import re
import shutil
import time
import unicodedata
import uuid
from dataclasses import dataclass
from pathlib import Path

from core import config
from core.data.photos.images import SUPPORTED_SUFFIXES, ImageError, load_image, shown_name, unreadable_name
from core.errors import BinsightError
from core.files import atomic_write_bytes

MAX_NAME_LENGTH = 120
MAX_FOLDER_PHOTOS = 5000
KEEP_BATCHES_S = 24 * 3600
# What a non-image file starts with, so the message can say what it is rather than just "not an image".
_TEXT_SIGNATURES = [
    ((b"<!doctype html", b"<html", b"<head", b"<body"), "an HTML page (a saved web page or an error page?), not a photo"),
    ((b"<?xml", b"<svg"), "an XML/SVG document, not a photo (JPEG, PNG, WebP or BMP expected)"),
    ((b"{", b"["), "a JSON/text file, not a photo (JPEG, PNG, WebP or BMP expected)"),
]


class InputError(BinsightError):
    """The whole input (a folder, a URI) cannot be used; the message says why."""


@dataclass
class PhotoInput:
    """One photo to predict: a safe display name, where to read it, or why it cannot be used."""

    name: str
    path: str | None = None
    error: str | None = None
    source: str = "upload"


def safe_name(name: str | None) -> str:
    """A file name that cannot leave its folder: no directories, no `..`, no control characters."""
    base = re.split(r"[\\/]+", name or "")[-1]
    base = unicodedata.normalize("NFC", base)
    base = "".join(ch if ch.isprintable() else "_" for ch in base)
    base = re.sub(r'[<>:"|?*]', "_", base)
    while ".." in base:
        base = base.replace("..", ".")
    base = base.strip(" .")
    if len(base) > MAX_NAME_LENGTH:
        stem, dot, suffix = base.rpartition(".")
        suffix = suffix[:10] if dot else ""
        base = (stem if dot else base)[: MAX_NAME_LENGTH - len(suffix) - 1].rstrip(" .") + (f".{suffix}" if suffix else "")
    return base or "photo"


def _looks_like_text(head: bytes) -> str | None:
    start = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    for prefixes, message in _TEXT_SIGNATURES:
        if start.startswith(prefixes):
            return message
    if start and all(32 <= b < 127 or b in (9, 10, 13) for b in start[:512]):
        return "a text file, not a photo (JPEG, PNG, WebP or BMP expected)"
    return None


def photo_problem(data: bytes, name: str) -> str | None:
    """Why these bytes are not a usable bin photo, or None when they are."""
    if not data:
        return f"{name}: the file is empty (0 bytes)"
    kind = _looks_like_text(data[:1024])
    if kind:
        return f"{name}: {kind}"
    try:
        load_image(data, name)
    except ImageError as exc:
        return str(exc)
    return None


def uploads_dir() -> Path:
    return config.home() / "uploads"


def _inside(path: Path, folder: Path) -> bool:
    return path.resolve().is_relative_to(folder.resolve())


def _unique(name: str, taken: set[str]) -> str:
    if name not in taken:
        return name
    stem, dot, suffix = name.rpartition(".")
    stem, suffix = (stem, f".{suffix}") if dot else (name, "")
    n = 2
    while f"{stem} ({n}){suffix}" in taken:
        n += 1
    return f"{stem} ({n}){suffix}"


def stage_uploads(files: list[tuple[str, bytes]], batch: str | None = None) -> list[PhotoInput]:
    """Check each uploaded (name, bytes); write the good ones under BINSIGHT_HOME/uploads/<batch>/, in order."""
    remove_old_batches()
    folder = uploads_dir() / safe_name(batch or uuid.uuid4().hex)
    taken: set[str] = set()
    staged = []
    for original, data in files:
        name = _unique(safe_name(original), taken)
        taken.add(name)
        problem = photo_problem(data, name)
        if problem:
            staged.append(PhotoInput(name, error=problem))
            continue
        target = folder / name
        if not _inside(target, folder):  # safe_name makes this impossible; kept as the last line of defence
            staged.append(PhotoInput(name, error=f"{name}: refused, the name points outside the upload folder"))
            continue
        atomic_write_bytes(target, data)
        staged.append(PhotoInput(name, path=str(target)))
    return staged


def remove_old_batches(older_than_s: float = KEEP_BATCHES_S) -> None:
    """Uploaded photos are only needed while they are on screen; drop batches older than a day."""
    folder = uploads_dir()
    if not folder.is_dir():
        return
    cutoff = time.time() - older_than_s
    for batch in folder.iterdir():
        try:
            if batch.is_dir() and batch.stat().st_mtime < cutoff:
                shutil.rmtree(batch, ignore_errors=True)
        except OSError:
            pass


def folder_inputs(folder: str | Path, recursive: bool = False,
                  limit: int = MAX_FOLDER_PHOTOS) -> tuple[list[PhotoInput], list[str]]:
    """The photos of a local folder (read in place, never copied) and notes on what was left out."""
    folder = Path(str(folder).strip()).expanduser()
    if not str(folder).strip() or str(folder) == ".":
        raise InputError("Give the path of a folder of photos.")
    if not folder.exists():
        raise InputError(f"{folder} does not exist.")
    if not folder.is_dir():
        raise InputError(f"{folder} is a file, not a folder: upload it instead, or give its folder.")
    try:
        files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file())
    except OSError as exc:
        raise InputError(f"{folder} cannot be read ({exc}).") from None
    photos = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES]
    others = len(files) - len(photos)
    notes = []
    if others:
        notes.append(f"{others:,} files without a photo extension ({', '.join(sorted(SUPPORTED_SUFFIXES))}) were left out.")
    if len(photos) > limit:
        notes.append(f"The folder holds {len(photos):,} photos; only the first {limit:,} are predicted.")
        photos = photos[:limit]
    if not photos:
        raise InputError(f"{folder} holds no photos (JPEG, PNG, WebP or BMP).")
    inputs = []
    for path in photos:
        name = str(path.relative_to(folder)) if recursive else path.name
        if unreadable_name(name):  # shown and stored as text, which such a name cannot be
            inputs.append(PhotoInput(shown_name(name), error=unreadable_name(name), source="folder"))
            continue
        problem = file_problem(path, name)
        inputs.append(PhotoInput(name, path=None if problem else str(path), error=problem, source="folder"))
    return inputs, notes


def file_problem(path: Path, name: str) -> str | None:
    """The problems visible without decoding the photo; decoding errors come from prediction."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(1024)
    except OSError as exc:
        return f"{name}: cannot be read ({exc.strerror or exc})"
    if size == 0:
        return f"{name}: the file is empty (0 bytes)"
    kind = _looks_like_text(head)
    return f"{name}: {kind}" if kind else None
