"""Golden dataset indexes: small fixtures of every layout, built alike each time, and what load_dataset made of them.

`python -m tests.golden_index` records tests/data/golden_index/ (run once, before a change to the readers);
tests/test_golden_index.py builds the fixtures again and asserts the same frames, fingerprints and messages.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pandas as pd

GOLDEN = Path(__file__).parent / "data" / "golden_index"
MTIME_NS = 1_700_000_000_000_000_000  # every fixture file and folder gets this time: fingerprints depend on it
SOURCES = {
    "abid": "abid",
    "labels_csv": "labels_csv",
    "imagefolder": "imagefolder",
    "file_list": "file_list/file_list.json",
    "abid_file_list": "file_list",
    "counting_list": "mirror/lists/counting.json",
    "shards": "shards",
}
BAD_SOURCES = {"missing": "nowhere", "empty": "empty", "unknown": "unknown", "text_file": "unknown/notes.txt"}


def build_fixtures(root: Path) -> None:
    """Every layout under `root` (the working directory, so sources are relative and frames hold no tmp path)."""
    from core.data.layouts.demo import generate_demo

    demo = generate_demo(root / "abid", counts={0: 1, 1: 3, 2: 3, 3: 3, 4: 2, 7: 1})
    (demo / "metadata" / "00002.json").write_text("{not json")
    photos = sorted((demo / "bin-images").iterdir())

    labels = root / "labels_csv" / "bin-images"
    labels.mkdir(parents=True)
    for photo in photos[:8]:
        shutil.copy(photo, labels / photo.name)
    (labels / "broken.jpg").write_bytes(b"not a photo")
    rows = [f"{p.name},{i % 4 + 1}" for i, p in enumerate(photos[:8])] + ["broken.jpg,2", "away.jpg,3", "bad.jpg,x"]
    (root / "labels_csv" / "labels.csv").write_text("image,count\n" + "\n".join(rows) + "\n")

    for i, photo in enumerate(photos[:9]):
        folder = root / "imagefolder" / ["train", "val", "."][i % 3] / str(i % 4)
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / photo.name)
    (root / "imagefolder" / "notes").mkdir()

    listed = root / "file_list" / "bin-images"
    listed.mkdir(parents=True)
    for photo in photos[:5]:
        shutil.copy(photo, listed / photo.name)
    (root / "file_list" / "file_list.json").write_text(json.dumps(
        {"1": [f"bin-images/{p.stem}.jpg" for p in photos[:3]], "2": [f"bin-images/{p.stem}.jpg" for p in photos[3:7]]}))

    mirror = root / "mirror" / "bin-images"
    mirror.mkdir(parents=True)
    for name in ("00001.jpg", "00003.jpg", "00010.jpg"):
        shutil.copy(demo / "bin-images" / name, mirror / name)
    (root / "mirror" / "lists").mkdir()
    (root / "mirror" / "lists" / "counting.json").write_text(json.dumps([[0, 1], [1, 2], [2, 0], [9, 3], [20, 4]]))

    (root / "empty").mkdir()
    (root / "unknown").mkdir()
    (root / "unknown" / "notes.txt").write_text("hello")
    stamp(root)


def stamp(root: Path) -> None:
    for folder, dirs, files in os.walk(root):
        for name in files + dirs:
            os.utime(os.path.join(folder, name), ns=(MTIME_NS, MTIME_NS))


def pack(root: Path):
    """The shard set and the version, made from the ABID fixture (after it is indexed)."""
    from core.data.layouts.registry import load_dataset
    from core.data.remote.shards import pack_shards
    from core.data.labels.versions import create_version, version_frame

    dataset = load_dataset(Path("abid"))
    pack_shards(dataset, root / "shards", shard_size="20k")
    version = create_version(dataset, version_frame(dataset), "golden", "none", {})
    return version.path


def loaded(home: Path, version: Path) -> dict:
    """What load_dataset makes of each fixture: {name: (frame, layout, notes, fingerprint or None)}."""
    from core.data.layouts.registry import load_dataset

    found = {}
    for name, source in SOURCES.items():
        dataset = load_dataset(Path(source))
        stamp_file = home / "index" / f"{dataset.key}.json"
        fingerprint = json.loads(stamp_file.read_text())["fingerprint"] if stamp_file.is_file() else None
        found[name] = (dataset.frame, dataset.layout, dataset.notes, fingerprint)
    dataset = load_dataset(version)
    found["version"] = (dataset.frame, dataset.layout, dataset.notes, None)
    dataset = load_dataset(None)
    found["demo"] = (dataset.frame, dataset.layout, dataset.notes, None)
    return found


def comparable(frame: pd.DataFrame, home: Path) -> pd.DataFrame:
    """The frame without the machine's folders: BINSIGHT_HOME in a path becomes $HOME."""
    frame = frame.copy()
    frame["path"] = frame["path"].map(lambda p: p.replace(str(home), "$HOME") if isinstance(p, str) else p)
    return frame


def messages() -> dict:
    from core.data.layouts.registry import load_dataset
    from core.errors import BinsightError

    found = {}
    for name, source in BAD_SOURCES.items():
        try:
            load_dataset(Path(source))
            found[name] = None
        except BinsightError as exc:
            found[name] = str(exc)
    return found


def build_all(root: Path, home: Path) -> tuple[dict, dict]:
    build_fixtures(root)
    version = pack(root)
    return loaded(home, version), messages()


def record() -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root, home = Path(tmp) / "fixtures", Path(tmp) / "home"
        root.mkdir()
        os.environ["BINSIGHT_HOME"] = str(home)
        os.chdir(root)
        found, errors = build_all(root, home)
        GOLDEN.mkdir(parents=True, exist_ok=True)
        summary = {"messages": errors, "layouts": {}}
        for name, (frame, layout, notes, fingerprint) in found.items():
            comparable(frame, home).to_parquet(GOLDEN / f"{name}.parquet", index=False)
            summary["layouts"][name] = {"layout": layout, "notes": notes, "fingerprint": fingerprint}
        (GOLDEN / "golden.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"recorded {len(found)} indexes in {GOLDEN}", file=sys.stderr)


if __name__ == "__main__":
    record()
