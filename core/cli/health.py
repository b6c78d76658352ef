"""CLI for the data health report: `health` (likely wrong counts, duplicates, leakage, unreadable/dark/blurred photos)."""
from __future__ import annotations

import sys

from core.cli.data import add_class_range, parse_class_range


def _health(args) -> int:
    from tqdm import tqdm

    from core.data.layouts.registry import load_dataset
    from core.files import atomic_write_bytes
    from core.review.health import health_report

    dataset = load_dataset(args.data, parse_class_range(args.classes))
    with tqdm(total=100, unit="%", file=sys.stderr, bar_format="{l_bar}{bar}| {desc}") as bar:
        def progress(fraction: float, text: str) -> None:
            bar.set_description_str(text, refresh=False)
            bar.update(round(100 * fraction) - bar.n)

        report = health_report(dataset, label_issues=not args.no_label_issues, on_progress=progress)
    print(f"Data health of {dataset.location} ({report.photos:,} photos)")
    for what, n in report.summary().items():
        if what != "photos":
            print(f"  {what:<32} {'not checked' if n is None else f'{n:,}'}")
    if report.label_issues_problem:
        print(f"  likely wrong counts were not looked for: {report.label_issues_problem}")
    issues = report.label_issues
    if issues is not None:
        print("\nOf the photos recorded with a count, the share whose true count looks like another (rows: recorded):")
        print((issues.noise_frame() * 100).round(0).astype(int).astype(str).add(" %").to_string())
        top = issues.flagged().head(args.top)
        if len(top):
            print(f"\nThe {len(top)} most likely wrong counts:")
            print(top[["name", "split", "label", "suggested", "score"]].rename(
                columns={"label": "recorded", "suggested": "looks like", "score": "expected error"}).to_string(
                index=False, float_format=lambda v: f"{v:.2f}"))
    if args.sheet and issues is not None:
        from core.review.health import contact_sheet

        paths = dict(zip(dataset.frame["name"], dataset.frame["path"]))
        atomic_write_bytes(args.sheet, contact_sheet(issues, paths, photos=args.sheet_photos))
        print(f"\nContact sheet of the {min(args.sheet_photos, len(issues.frame))} most likely wrong counts written to "
              f"{args.sheet}")
    if args.csv:
        atomic_write_bytes(args.csv, report.csv())
        print(f"\nEvery finding ({len(report.findings()):,} rows) written to {args.csv}")
    return 0


def register(subparsers) -> None:
    health = subparsers.add_parser("health", help="the data health report: likely wrong counts, duplicate and "
                                                  "look-alike photos (across splits, with other counts), unreadable, "
                                                  "very dark or blurred photos")
    health.add_argument("--data", default=None, help="dataset folder (default: configured, else the demo)")
    health.add_argument("--csv", default=None, help="write every finding to this CSV file")
    health.add_argument("--sheet", default=None, help="write a contact sheet (PNG) of the most likely wrong counts")
    health.add_argument("--sheet-photos", type=int, default=24, help="photos on the contact sheet")
    health.add_argument("--top", type=int, default=15, help="how many likely wrong counts to print")
    health.add_argument("--no-label-issues", action="store_true",
                        help="only the photo checks (no features, so seconds instead of minutes)")
    add_class_range(health)
    health.set_defaults(handler=_health)
