"""Choosing which bins to show: filters by count, split and item text, paging, and n-per-class samples."""
from __future__ import annotations

import math

import pandas as pd


def filter_photos(frame: pd.DataFrame, counts: list[int] | None = None, splits: list[str] | None = None,
                  text: str = "") -> pd.DataFrame:
    """Rows whose count is in `counts`, split in `splits` ("none" = no split) and item names contain `text`."""
    mask = pd.Series(True, index=frame.index)
    if counts:
        mask &= frame["count"].isin(counts)
    if splits:
        split = frame["split"].fillna("none")
        mask &= split.isin(splits)
    if text.strip():
        mask &= frame["item_names"].str.contains(text.strip(), case=False, regex=False, na=False)
    return frame[mask]


def sample_per_class(frame: pd.DataFrame, per_class: int, seed: int = 0) -> pd.DataFrame:
    """Up to `per_class` random photos of each count, ordered by count."""
    groups = [g.sample(min(per_class, len(g)), random_state=seed) for _, g in frame.groupby("count", sort=True)]
    return pd.concat(groups) if groups else frame.iloc[:0]


def page_of(frame: pd.DataFrame, page: int, page_size: int) -> tuple[pd.DataFrame, int]:
    """The rows of 1-based `page` and the number of pages (at least 1)."""
    pages = max(1, math.ceil(len(frame) / page_size))
    page = min(max(1, page), pages)
    return frame.iloc[(page - 1) * page_size: page * page_size], pages
