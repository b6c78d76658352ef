"""Summaries the Overview page draws: class distribution per split, imbalance, counts, image sizes."""
from __future__ import annotations

import pandas as pd

from core.data.dataset import Dataset

SPLIT_ORDER = ["train", "valid", "test"]
SPLIT_COLOURS = {"train": "#1f77b4", "valid": "#9ecae1", "test": "#e07b00"}
IMBALANCE_WARNING = 3.0


def class_distribution(dataset: Dataset) -> pd.DataFrame:
    """Photos per (class, split), every class and split present, as long-form rows."""
    rows = dataset.labelled()
    table = rows.groupby(["cls", "split"]).size().unstack(fill_value=0)
    table = table.reindex(index=dataset.classes, columns=SPLIT_ORDER, fill_value=0)
    table.index.name, table.columns.name = "class", "split"
    long = table.stack().rename("photos").reset_index()
    long["class_name"] = long["class"].map(dataset.class_range.name)
    return long


def imbalance_ratio(dataset: Dataset) -> float | None:
    """Largest class over smallest class (in range); None when a class is empty or nothing is labelled."""
    sizes = dataset.labelled()["cls"].value_counts().reindex(dataset.classes, fill_value=0)
    if sizes.empty or sizes.min() == 0:
        return None
    return float(sizes.max() / sizes.min())


def empty_classes(dataset: Dataset) -> list[int]:
    sizes = dataset.labelled()["cls"].value_counts()
    return [c for c in dataset.classes if sizes.get(c, 0) == 0]


def count_histogram(dataset: Dataset) -> pd.DataFrame:
    """Photos per recorded count, all counts (above the range too), marked in or out of range."""
    frame = dataset.frame[dataset.frame["count"].notna() & dataset.frame["problem"].isna()]
    counts = frame["count"].value_counts().sort_index().rename("photos").reset_index()
    counts.columns = ["count", "photos"]
    in_range = dataset.class_range.assign(counts["count"]).notna()
    counts["range"] = in_range.map({True: "class", False: "excluded"})
    return counts


def image_sizes(dataset: Dataset, sample: int = 5000) -> pd.DataFrame:
    frame = dataset.frame[dataset.frame["width"].notna()][["name", "width", "height", "count"]]
    if len(frame) > sample:
        frame = frame.sample(sample, random_state=0)
    return frame.astype({"width": int, "height": int})
