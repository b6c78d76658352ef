"""The class range: which object counts are classes (1–5 by default) and what happens to the rest."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import pandas as pd

from core.errors import BinsightError


class ClassRangeError(BinsightError, ValueError):
    """A class range that holds no class."""


@dataclass(frozen=True)
class ClassRange:
    """Counts lo..hi are classes; with top_bucket, counts above hi join class hi (shown as "5+")."""

    lo: int = 1
    hi: int = 5
    top_bucket: bool = False

    def __post_init__(self):
        if self.lo < 0 or self.hi < self.lo:
            raise ClassRangeError(f"class range {self.lo}–{self.hi} is empty or negative")

    @property
    def classes(self) -> list[int]:
        return list(range(self.lo, self.hi + 1))

    def name(self, cls: int) -> str:
        return f"{cls}+" if self.top_bucket and cls == self.hi else str(cls)

    def describe(self) -> str:
        return f"{self.lo}–{self.hi}" + (f" ({self.hi}+ bucket)" if self.top_bucket else "")

    def assign(self, counts: pd.Series) -> pd.Series:
        """The class of each count, <NA> where the count is missing or outside the range."""
        counts = counts.astype("Int64")
        if self.top_bucket:
            counts = counts.where(counts <= self.hi, self.hi)
        return counts.where((counts >= self.lo) & (counts <= self.hi)).astype("Int64")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "ClassRange":
        data = data or {}
        return cls(int(data.get("lo", 1)), int(data.get("hi", 5)), bool(data.get("top_bucket", False)))


def model_class_range(meta: dict) -> ClassRange:
    """The class range a model was trained with (from its checkpoint's meta)."""
    if meta.get("class_range"):
        return ClassRange.from_dict(meta["class_range"])
    return ClassRange(min(meta["classes"]), max(meta["classes"]))


DEFAULT_RANGE = ClassRange()
