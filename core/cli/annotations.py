"""CLI for spot-check decisions: `annotations export` (the history as CSV) and `annotate` (record one decision)."""
from __future__ import annotations

import getpass

from core.errors import UsageError

CHOICES = "0–5, 'more' (more than 5), 'unclear' or 'confirm'"


def parse_choice(text: str, current: int | None) -> int | None:
    """The count a command-line choice stands for (see CHOICES); UsageError when it is none of them."""
    from core.data.labels.annotations import MORE_THAN_FIVE, UNCLEAR

    value = text.strip().lower()
    if value in ("unclear", "?"):
        return UNCLEAR
    if value in ("more", ">5", "5+", "more than 5"):
        return MORE_THAN_FIVE
    if value in ("confirm", "ok", "yes"):
        if current is None:
            raise UsageError("this photo has no count to confirm: give a count instead")
        return current
    if value.isdigit() and int(value) <= 5:
        return int(value)
    raise UsageError(f"{text!r} is not a choice: use {CHOICES}")


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return ""


def _dataset(data):
    from core.data.layouts.registry import load_dataset

    return load_dataset(data)


def _export(args) -> int:
    from core.data.labels.annotations import export_csv, export_frame

    dataset = _dataset(args.data)
    export_csv(dataset.key, args.csv)
    print(f"{len(export_frame(dataset.key)):,} decisions written to {args.csv}")
    return 0


def _annotate(args) -> int:
    import pandas as pd

    from core.data.labels.annotations import AnnotationError, count_label, save_decision

    dataset = _dataset(args.data)
    row = dataset.frame[dataset.frame["name"] == args.photo]
    if row.empty:
        raise UsageError(f"{args.photo}: no such photo in {dataset.source}")
    row = row.iloc[0]
    if pd.isna(row["path"]):
        raise UsageError(f"{args.photo}: the photo is not on disk, so it cannot be checked")
    current = None if pd.isna(row["count"]) else int(row["count"])
    count = parse_choice(args.choice, current)
    try:
        result = save_decision(dataset.key, args.photo, args.annotator or _os_user(), count, recorded_count=current,
                               note=args.note, path=row["path"])
    except AnnotationError as exc:
        raise UsageError(str(exc)) from None
    saved = result.decision
    before = "no count" if saved.old_count is None else count_label(saved.old_count)
    print(f"{saved.photo}: {saved.status} ({before} → {count_label(saved.new_count)}) by {saved.annotator}")
    return 0


def register(subparsers) -> None:
    annotations = subparsers.add_parser("annotations", help="spot-check decisions (export)")
    actions = annotations.add_subparsers(dest="annotations_command", required=True)
    export = actions.add_parser("export", help="write every decision (the audit history) as CSV")
    export.add_argument("--data", default=None, help="dataset folder (default: configured, else the demo)")
    export.add_argument("--csv", required=True, help="output CSV file")
    export.set_defaults(handler=_export)
    annotate = subparsers.add_parser("annotate", help="record one spot-check decision for a photo")
    annotate.add_argument("photo", help="photo name as in the dataset, e.g. 00523.jpg")
    annotate.add_argument("choice", help=CHOICES)
    annotate.add_argument("--data", default=None, help="dataset folder (default: configured, else the demo)")
    annotate.add_argument("--annotator", default=None, help="who decides (default: the OS user)")
    annotate.add_argument("--note", default="")
    annotate.set_defaults(handler=_annotate)
