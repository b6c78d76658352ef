"""The data health report of a dataset: likely wrong counts, look-alike and duplicate photos (across splits, with
conflicting counts), unreadable, very dark or blurred photos; one tidy CSV of every finding."""
from __future__ import annotations

import io
from dataclasses import dataclass

import pandas as pd

from core.data.photos.photo_checks import duplicate_findings, photo_findings
from core.evaluation.label_issues import LabelIssues, LabelIssuesError, find_label_issues

CSV_COLUMNS = ["photo", "finding", "detail", "count", "suggested_count", "score", "split", "other_photo"]


@dataclass
class HealthReport:
    """What is wrong with a dataset's photos and labels; each part is a table a page can show or filter."""

    dataset_key: str
    photos: int
    label_issues: LabelIssues | None
    label_issues_problem: str
    duplicates: pd.DataFrame
    quality: pd.DataFrame

    def summary(self) -> dict:
        """Counts of each finding, for tiles and the command line."""
        dup = self.duplicates
        return {
            "photos": self.photos,
            "likely wrong counts": int(self.label_issues.frame["flagged"].sum()) if self.label_issues else None,
            "exact duplicates": int((dup["kind"] == "exact").sum()),
            "look-alike pairs": int((dup["kind"] == "near").sum()),
            "pairs across splits (leakage)": int(dup["leakage"].sum()),
            "look-alikes with other counts": int(dup["conflicting_counts"].sum()),
            "unreadable": int((self.quality["problem"] == "unreadable").sum()),
            "very dark": int((self.quality["problem"] == "very dark").sum()),
            "blurred": int((self.quality["problem"] == "blurred").sum()),
        }

    def findings(self) -> pd.DataFrame:
        """Every finding, one row each (photo, finding, detail, count, suggested_count, score, split, other_photo)."""
        parts = []
        if self.label_issues is not None:
            flagged = self.label_issues.flagged()
            parts.append(pd.DataFrame({
                "photo": flagged["name"], "finding": "likely wrong count",
                "detail": [f"recorded {int(a)}, looks like {int(b)} (expected error {s:.1f} objects)"
                           for a, b, s in zip(flagged["label"], flagged["suggested"], flagged["score"])],
                "count": flagged["label"], "suggested_count": flagged["suggested"], "score": flagged["score"],
                "split": flagged["split"]}))
        dup = self.duplicates
        if not dup.empty:
            kinds = []
            for row in dup.itertuples(index=False):
                what = "exact duplicate" if row.kind == "exact" else "look-alike"
                if row.leakage:
                    what += f" across splits ({row.split} / {row.other_split})"
                elif row.conflicting_counts:
                    what += " with another count"
                kinds.append(what)
            parts.append(pd.DataFrame({
                "photo": dup["photo"], "finding": kinds,
                "detail": [f"counts {_count(a)} / {_count(b)}; hash distance {d} of 256 bits"
                           for a, b, d in zip(dup["count"], dup["other_count"], dup["bits_256"])],
                "count": dup["count"], "split": dup["split"], "other_photo": dup["other_photo"]}))
        if not self.quality.empty:
            parts.append(pd.DataFrame({"photo": self.quality["photo"], "finding": self.quality["problem"],
                                       "detail": self.quality["detail"]}))
        if not parts:
            return pd.DataFrame(columns=CSV_COLUMNS)
        return pd.concat(parts, ignore_index=True).reindex(columns=CSV_COLUMNS)

    def csv(self) -> bytes:
        buffer = io.StringIO()
        self.findings().to_csv(buffer, index=False)
        return buffer.getvalue().encode()


def contact_sheet(issues: LabelIssues, paths: dict, photos: int = 24, columns: int = 6, tile: int = 220) -> bytes:
    """A PNG of the `photos` most likely wrong counts, most likely first, each captioned with its name, recorded
    count, suggested count and score; a photo that cannot be read shows as a grey tile saying so."""
    from PIL import Image, ImageDraw, ImageOps

    from core.data.photos.images import ImageError, load_image

    shown = issues.flagged().head(photos)
    if shown.empty:
        shown = issues.ranked().head(photos)
    rows = max(1, -(-len(shown) // columns))
    photo_height, caption = round(tile * 0.73), 34
    sheet = Image.new("RGB", (columns * tile, rows * (photo_height + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, row in enumerate(shown.itertuples(index=False)):
        x, y = (i % columns) * tile, (i // columns) * (photo_height + caption)
        try:
            picture = ImageOps.pad(load_image(paths[row.name]), (tile - 4, photo_height - 4), color="white")
            sheet.paste(picture, (x + 2, y + 2))
        except (KeyError, TypeError, OSError, ImageError):
            draw.rectangle((x + 2, y + 2, x + tile - 2, y + photo_height - 2), fill="#dddddd")
            draw.text((x + 10, y + photo_height // 2), "photo not readable", fill="black")
        draw.text((x + 4, y + photo_height + 2), f"#{i + 1} {row.name}", fill="#444444")
        draw.text((x + 4, y + photo_height + 17), f"recorded {row.label} -> looks like {row.suggested}  "
                                                  f"(off by {row.score:.1f})", fill="#b00020")
    buffer = io.BytesIO()
    # 256 colours are plenty to judge a count and make the sheet a third of the size
    sheet.quantize(256, method=Image.Quantize.MEDIANCUT).save(buffer, "PNG", optimize=True)
    return buffer.getvalue()


def _count(value) -> str:
    return "—" if pd.isna(value) else str(int(value))


def health_report(dataset, label_issues: bool = True, on_progress=None, should_stop=None,
                  found_issues=None) -> HealthReport:
    """The report of `dataset` (every photo on disk for the photo checks; the labelled ones in the class range for
    label issues). on_progress(fraction, text) covers both parts; label issues are skipped with a reason when they
    cannot be found (too few photos of a count), the rest of the report is still made. found_issues: the label
    issues when the caller already has them (read from the cache), so they are not looked up again."""
    def part(start, share):
        return (lambda f, text: on_progress(start + share * f, text)) if on_progress else None

    frame = dataset.frame
    photos = photo_findings(dataset.key, frame, dataset.files_fingerprint, dataset.stamps,
                            on_progress=part(0.0, 0.3), should_stop=should_stop)
    duplicates = duplicate_findings(photos.pairs, frame)
    issues, problem = None, ""
    if found_issues is not None:
        issues = found_issues
    elif label_issues:
        try:
            issues = find_label_issues(dataset, on_progress=part(0.3, 0.7), should_stop=should_stop)
        except LabelIssuesError as exc:
            problem = str(exc)
    quality = photos.quality
    listed = frame[frame["path"].isna() & frame["problem"].notna()]  # unusable labels or photos the index found
    if len(listed):
        quality = pd.concat([quality, pd.DataFrame({"photo": listed["name"], "problem": "unreadable",
                                                    "detail": listed["problem"]})], ignore_index=True)
    if on_progress:
        on_progress(1.0, "Report ready")
    return HealthReport(dataset.key, len(frame), issues, problem, duplicates, quality)
