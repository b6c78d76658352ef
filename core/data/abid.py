"""Parsing the ABID formats: metadata JSON, labels.csv, file_list.json and the counting lists."""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd

from core.errors import BinsightError

BUCKET = "aft-vbi-pds"
IMAGE_PREFIX = "bin-images/"
METADATA_PREFIX = "metadata/"


class LabelError(BinsightError):
    """A label file that cannot be used at all, with a message for the user."""


@dataclass
class Metadata:
    """One bin's metadata: its expected quantity and its items."""

    expected_quantity: int | None
    items: list[dict] = field(default_factory=list)

    @property
    def item_names(self) -> list[str]:
        return [item["name"] for item in self.items]


def parse_metadata(text: str | bytes) -> Metadata:
    """A bucket metadata JSON → Metadata; ValueError with the reason when it is malformed."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"malformed JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError("metadata is not a JSON object")
    quantity = data.get("EXPECTED_QUANTITY")
    if quantity is not None:
        try:
            quantity = int(quantity)
        except (TypeError, ValueError):
            raise ValueError(f"EXPECTED_QUANTITY {quantity!r} is not an integer") from None
        if quantity < 0:
            raise ValueError(f"EXPECTED_QUANTITY {quantity} is negative")
    items = []
    for asin, entry in (data.get("BIN_FCSKU_DATA") or {}).items():
        if not isinstance(entry, dict):
            continue
        items.append(
            {
                "asin": entry.get("asin", asin),
                "name": entry.get("normalizedName") or entry.get("name") or asin,
                "quantity": entry.get("quantity"),
                "length": _measure(entry.get("length")),
                "width": _measure(entry.get("width")),
                "height": _measure(entry.get("height")),
                "weight": _measure(entry.get("weight")),
            }
        )
    return Metadata(quantity, items)


def _measure(value) -> str | None:
    if isinstance(value, dict) and value.get("value") is not None:
        return f"{float(value['value']):.2f} {value.get('unit', '')}".strip()
    return None


def read_labels_csv(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """labels.csv (image,count) → ({image: count}, problems); rows with a bad count become problems."""
    labels: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"image", "count"} <= set(reader.fieldnames):
                raise LabelError(f"{path.name}: expected the columns image,count, found {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                image, count = (row.get("image") or "").strip(), (row.get("count") or "").strip()
                try:
                    value = int(count)
                    if value < 0:
                        raise ValueError
                except ValueError:
                    problems.append((image or f"line {line}", f"labels.csv line {line}: count {count!r} is not a whole number ≥ 0"))
                    continue
                labels[image] = value
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"{path.name}: cannot be read ({exc})") from None
    return labels, problems


def read_file_list(path: Path) -> dict[str, int]:
    """file_list.json ({"1": ["metadata/x.json", ...]}) → {image name: count}."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise LabelError(f"{Path(path).name}: cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise LabelError(f"{Path(path).name}: expected an object of count → list of metadata paths")
    labels = {}
    for count, entries in data.items():
        try:
            value = int(count)
        except ValueError:
            raise LabelError(f"{Path(path).name}: key {count!r} is not a count") from None
        for entry in entries:
            labels[PurePosixPath(entry).stem + ".jpg"] = value
    return labels


def counting_list_name(index: int) -> str:
    """The image name of a counting-list index (index 0 is 00001.jpg)."""
    return "%05d.jpg" % (index + 1)


def read_counting_list(path: Path) -> pd.DataFrame:
    """A counting list of [index, count] pairs → DataFrame(name, count)."""
    try:
        pairs = json.loads(Path(path).read_text())
        frame = pd.DataFrame(pairs, columns=["index", "count"])
    except (OSError, ValueError) as exc:
        raise LabelError(f"{Path(path).name}: not a list of [index, count] pairs ({exc})") from None
    names = [counting_list_name(i) for i in frame["index"].tolist()]
    return pd.DataFrame({"name": names, "count": frame["count"].astype("Int64")})


def image_key(name: str) -> str:
    return IMAGE_PREFIX + name


def metadata_key(name: str) -> str:
    return METADATA_PREFIX + PurePosixPath(name).stem + ".json"
