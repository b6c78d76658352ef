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
# No bin holds anywhere near this many objects; a larger "count" is a typo or junk (and would overflow the index).
MAX_COUNT = 1_000_000


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


def parse_count(value) -> int:
    """A count given as an integer, an integral float or a string of digits; ValueError saying why it is not one."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{value!r} is not a whole number")
    try:
        count = int(value.strip()) if isinstance(value, str) else int(value)
    except (ValueError, OverflowError):
        raise ValueError(f"{value!r} is not a whole number") from None
    if count != value and not isinstance(value, str):
        raise ValueError(f"{value!r} is not a whole number")
    if count < 0:
        raise ValueError(f"{count} is negative")
    if count > MAX_COUNT:
        raise ValueError(f"{count} is not a plausible count (at most {MAX_COUNT:,})")
    return count


def parse_metadata(text: str | bytes) -> Metadata:
    """A bucket metadata JSON → Metadata; ValueError with the reason when it is malformed."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"malformed JSON ({exc})") from None
    except RecursionError:
        raise ValueError("malformed JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ValueError("metadata is not a JSON object")
    quantity = data.get("EXPECTED_QUANTITY")
    if quantity is not None:
        try:
            quantity = parse_count(quantity)
        except ValueError as exc:
            raise ValueError(f"EXPECTED_QUANTITY {exc}") from None
    skus = data.get("BIN_FCSKU_DATA") or {}
    if not isinstance(skus, dict):
        raise ValueError("BIN_FCSKU_DATA is not a JSON object of items")
    items = []
    for asin, entry in skus.items():
        if not isinstance(entry, dict):
            continue
        items.append(
            {
                "asin": str(entry.get("asin", asin)),
                "name": str(entry.get("normalizedName") or entry.get("name") or asin),
                "quantity": entry.get("quantity"),
                "length": _measure(entry.get("length")),
                "width": _measure(entry.get("width")),
                "height": _measure(entry.get("height")),
                "weight": _measure(entry.get("weight")),
            }
        )
    return Metadata(quantity, items)


def _measure(value) -> str | None:
    if not isinstance(value, dict) or isinstance(value.get("value"), bool):
        return None
    try:
        number = float(value.get("value"))
    except (TypeError, ValueError, OverflowError):
        return None
    return f"{number:.2f} {value.get('unit') or ''}".strip()


def read_labels_csv(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """labels.csv (image,count) → ({image: count}, problems); rows with a bad count become problems."""
    labels: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    line = 1
    try:
        # utf-8-sig: a labels.csv saved by Excel starts with a byte-order mark, which is not part of "image"
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"image", "count"} <= set(reader.fieldnames):
                raise LabelError(f"{path.name}: expected the columns image,count, found {reader.fieldnames}")
            for line, row in enumerate(reader, start=2):
                image, count = (row.get("image") or "").strip(), (row.get("count") or "").strip()
                try:
                    value = parse_count(count)
                except ValueError:
                    problems.append((image or f"line {line}", f"labels.csv line {line}: count {count!r} is not a whole number ≥ 0"))
                    continue
                labels[image] = value
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelError(f"{path.name}: cannot be read ({exc})") from None
    except csv.Error as exc:
        raise LabelError(f"{path.name}: not a readable CSV near line {line + 1} ({exc})") from None
    return labels, problems


def read_file_list(path: Path) -> dict[str, int]:
    """file_list.json ({"1": ["metadata/x.json", ...]}) → {image name: count}."""
    data = _read_json(path)
    if not isinstance(data, dict):
        raise LabelError(f"{Path(path).name}: expected an object of count → list of metadata paths")
    labels = {}
    for count, entries in data.items():
        try:
            value = parse_count(count)
        except ValueError:
            raise LabelError(f"{Path(path).name}: key {count!r} is not a count") from None
        if not isinstance(entries, list) or not all(isinstance(e, str) and e.strip() for e in entries):
            raise LabelError(f"{Path(path).name}: the entry of count {count} is not a list of metadata paths")
        for entry in entries:
            labels[PurePosixPath(entry).stem + ".jpg"] = value
    return labels


def _read_json(path: Path):
    """A label file's JSON value; LabelError naming the file when it cannot be read or parsed."""
    try:
        return json.loads(Path(path).read_bytes())
    except (OSError, ValueError) as exc:
        raise LabelError(f"{Path(path).name}: cannot be read ({exc})") from None
    except RecursionError:
        raise LabelError(f"{Path(path).name}: cannot be read (JSON nested too deeply)") from None


def counting_list_name(index: int) -> str:
    """The image name of a counting-list index (index 0 is 00001.jpg)."""
    return "%05d.jpg" % (index + 1)


def read_counting_list(path: Path) -> pd.DataFrame:
    """A counting list of [index, count] pairs → DataFrame(name, count)."""
    pairs = _read_json(path)
    if not isinstance(pairs, list):
        raise LabelError(f"{Path(path).name}: not a list of [index, count] pairs")
    names, counts = [], []
    for row, pair in enumerate(pairs):
        try:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"{pair!r} is not an [index, count] pair")
            index, count = parse_count(pair[0]), parse_count(pair[1])
        except ValueError as exc:
            raise LabelError(f"{Path(path).name}: entry {row + 1}: {exc}") from None
        names.append(counting_list_name(index))
        counts.append(count)
    return pd.DataFrame({"name": pd.Series(names, dtype=object), "count": pd.array(counts, dtype="Int64")})


def image_key(name: str) -> str:
    return IMAGE_PREFIX + name


def metadata_key(name: str) -> str:
    return METADATA_PREFIX + PurePosixPath(name).stem + ".json"
