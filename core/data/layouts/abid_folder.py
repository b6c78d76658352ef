"""The ABID bucket layout in a folder: bin-images/ with metadata/*.json, a labels.csv and/or a file_list.json."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from core.data.dataset import finish_index
from core.data.labels import abid
from core.data.layouts.base import Layout, local_path, read_sizes
from core.data.photos.images import SUPPORTED_SUFFIXES, shown_name, unreadable_name


class AbidFolder(Layout):
    """Labels come from metadata (EXPECTED_QUANTITY) first, then labels.csv, then file_list.json."""

    name = "abid"

    def detect(self, source) -> bool:
        path = local_path(source)
        return path is not None and ((path / "bin-images").is_dir() or (path / "file_list.json").is_file())

    def index(self, source: Path, on_progress=None) -> pd.DataFrame:
        images = source / "bin-images"
        names = sorted(p.name for p in images.iterdir() if p.suffix.lower() in SUPPORTED_SUFFIXES) if images.is_dir() else []
        listed = {}
        if (source / "file_list.json").is_file():
            listed = abid.read_file_list(source / "file_list.json")
        csv_labels, csv_problems = ({}, [])
        if (source / "labels.csv").is_file():
            csv_labels, csv_problems = abid.read_labels_csv(source / "labels.csv")
        names = sorted(set(names) | set(listed) | set(csv_labels))
        problems = dict(csv_problems)
        rows = []
        for name in names:
            row = {"name": name, "path": str(images / name) if (images / name).is_file() else None,
                   "count": None, "label_source": None, "n_items": 0, "item_names": "", "items_json": None}
            if unreadable_name(name):
                row.update(name=shown_name(name), path=None, problem=unreadable_name(name))
                rows.append(row)
                continue
            meta_path = source / abid.metadata_key(name)
            if meta_path.is_file():
                try:
                    meta = abid.parse_metadata(meta_path.read_bytes())
                    row.update(n_items=len(meta.items), item_names=" | ".join(meta.item_names),
                               items_json=json.dumps(meta.items))
                    if meta.expected_quantity is not None:
                        row.update(count=meta.expected_quantity, label_source="metadata")
                except ValueError as exc:
                    problems.setdefault(name, f"metadata/{meta_path.name}: {exc}")
            if row["count"] is None and name in csv_labels:
                row.update(count=csv_labels[name], label_source="labels.csv")
            if row["count"] is None and name in listed:
                row.update(count=listed[name], label_source="file_list")
            if row["count"] is not None:
                problems.pop(name, None)  # another source labelled it
            row["problem"] = problems.get(name)
            rows.append(row)
        frame = finish_index(pd.DataFrame(rows))
        orphans = [n for n in problems if n not in set(frame["name"])]
        if orphans:
            extra = pd.DataFrame({"name": orphans, "problem": [problems[n] for n in orphans]})
            frame = finish_index(pd.concat([frame, extra], ignore_index=True))
        return read_sizes(frame, on_progress)


ABID_FOLDER = AbidFolder()
