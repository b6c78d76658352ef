"""Two runs compared photo by photo: the photos run B fixed and broke against run A, recall per count, McNemar."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from core.errors import BinsightError

SIGNIFICANCE = 0.05


class ComparisonError(BinsightError):
    """Two results that cannot be compared photo by photo (no photo in common); the message says why."""


def mcnemar(only_a_right: int, only_b_right: int) -> float:
    """Two-sided p-value of McNemar's exact test: under "the runs are as good as each other", each photo one run
    got right and the other wrong is a fair coin toss (photos both got right or both wrong say nothing)."""
    from scipy.stats import binomtest

    discordant = int(only_a_right) + int(only_b_right)
    if discordant == 0:
        return 1.0
    return float(binomtest(int(only_b_right), discordant, 0.5).pvalue)


@dataclass
class PairedComparison:
    """Run B against run A on the photos both scored, one row per photo: name, path, truth, predicted_a,
    predicted_b, correct_a, correct_b, change ('fixed', 'broken', 'both right', 'both wrong')."""

    frame: pd.DataFrame
    classes: list[int]
    run_a: str
    run_b: str

    def table(self) -> pd.DataFrame:
        """The 2×2 table in photos: run A right or wrong (rows, e.g. "<run A> right") × run B right or wrong."""
        rows, columns = ([f"{run} right", f"{run} wrong"] for run in (self.run_a, self.run_b))
        a = self.frame["correct_a"].map({True: rows[0], False: rows[1]})
        b = self.frame["correct_b"].map({True: columns[0], False: columns[1]})
        table = pd.crosstab(a, b).reindex(index=rows, columns=columns, fill_value=0)
        return table.rename_axis(index=None, columns=None)

    def photos(self, change: str) -> pd.DataFrame:
        """The photos of one change ('fixed': B right where A was wrong; 'broken': the other way round)."""
        return self.frame[self.frame["change"] == change]

    @property
    def fixed(self) -> int:
        return int((self.frame["change"] == "fixed").sum())

    @property
    def broken(self) -> int:
        return int((self.frame["change"] == "broken").sum())

    def p_value(self) -> float:
        return mcnemar(self.broken, self.fixed)

    def recall_change(self) -> pd.DataFrame:
        """Per true count: photos, recall of A, recall of B, and B's change."""
        grouped = self.frame.groupby("truth").agg(photos=("name", "size"), recall_a=("correct_a", "mean"),
                                                  recall_b=("correct_b", "mean"))
        grouped = grouped.reindex(self.classes).dropna(subset=["photos"])
        grouped["change"] = grouped["recall_b"] - grouped["recall_a"]
        return grouped.rename_axis("count").reset_index().astype({"photos": int})

    def verdict(self) -> str:
        """In words: how many photos changed each way and whether that is beyond chance."""
        fixed, broken, n = self.fixed, self.broken, len(self.frame)
        accuracy_a, accuracy_b = self.frame["correct_a"].mean(), self.frame["correct_b"].mean()
        p = self.p_value()
        moved = (f"On the {n:,} photos both runs scored, {self.run_b} got {fixed:,} right that {self.run_a} got "
                 f"wrong and {broken:,} wrong that it got right (accuracy {accuracy_a:.1%} → {accuracy_b:.1%}).")
        if fixed == broken:
            return moved + f" McNemar's test: p = {p:.2f}; no difference between the runs."
        better = self.run_b if fixed > broken else self.run_a
        if p < SIGNIFICANCE:
            return moved + (f" McNemar's test: p = {p:.3f}, so {better} is better beyond chance "
                            f"(below {SIGNIFICANCE}).")
        return moved + (f" McNemar's test: p = {p:.2f}, so the difference could be chance: a difference this size "
                        f"happens often between two equally good runs.")

    def summary(self) -> dict:
        return {"run_a": self.run_a, "run_b": self.run_b, "photos": len(self.frame), "fixed": self.fixed,
                "broken": self.broken, "p_value": self.p_value(), "verdict": self.verdict(),
                "recall_change": self.recall_change().to_dict(orient="records")}


def compare_paired(a, b) -> PairedComparison:
    """Run B's EvaluationResult against run A's, on the photos both scored (matched by name)."""
    columns = ["name", "path", "truth", "predicted"]
    left = a.scored()[columns]
    right = b.scored()[["name", "predicted"]]
    joined = left.merge(right, on="name", suffixes=("_a", "_b"))
    if joined.empty:
        raise ComparisonError(f"{a.run or 'run A'} and {b.run or 'run B'} scored no photo in common: "
                              "compare them on the same split of the same dataset")
    joined["truth"] = joined["truth"].astype(int)
    joined["correct_a"] = (joined["predicted_a"].astype(int) == joined["truth"]).to_numpy(bool)
    joined["correct_b"] = (joined["predicted_b"].astype(int) == joined["truth"]).to_numpy(bool)
    joined["change"] = np.select(
        [joined["correct_b"] & ~joined["correct_a"], joined["correct_a"] & ~joined["correct_b"], joined["correct_a"]],
        ["fixed", "broken", "both right"], "both wrong")
    classes = sorted(set(a.classes) | set(b.classes))
    return PairedComparison(joined.reset_index(drop=True), classes, a.run or "run A", b.run or "run B")
