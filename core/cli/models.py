"""CLI for models: `train`, `evaluate` and `predict`."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from core.data.photos.images import SUPPORTED_SUFFIXES
from core.errors import UsageError
from core.training import config as training_config


def add_train_options(parser, job: bool = False) -> None:
    """One option per TrainConfig setting, from its metadata (flag, type, choices, default, help); job: the options
    of `submit train|hpo` (no run folder, no resume, nothing required)."""
    for item in training_config.settings():
        if job and not item.in_job:
            continue
        options = {"dest": item.name, "default": item.default, "help": item.help or None}
        if item.type is bool:
            options["action"] = "store_false" if item.default is True else "store_true"
            if item.default is True:
                options["help"] = f"turn off: {item.help}"
        else:
            options["type"] = item.type
            if item.choices and not item.open_choices:
                options["choices"] = list(item.choices)
            else:
                options["metavar"] = ("{" + ",".join(map(str, item.choices)) + ",…}" if item.choices
                                      else item.flag.lstrip("-").upper().replace("-", "_"))
            if item.default is not None and "default" not in item.help:
                options["help"] = f"{item.help} (default: {item.default})"
            options["required"] = item.required and not job
        parser.add_argument(item.flag, **options)


def config_from_args(args, job: bool = False):
    """The TrainConfig the options added by add_train_options stand for."""
    return training_config.TrainConfig(**{item.name: getattr(args, item.name) for item in training_config.settings()
                                          if not job or item.in_job})


def _train(args) -> int:
    from core.training.loop import train

    config = config_from_args(args)
    if not str(args.data).startswith("s3://") and not Path(args.data).expanduser().exists():
        raise UsageError(f"{args.data}: no such dataset folder")
    # With --processes/--nnodes, train() re-executes this command under torchrun and follows rank 0's progress;
    # inside torchrun (RANK set) only rank 0 prints.
    rank = int(os.environ.get("RANK", "0"))
    printer = _ProgressPrinter() if rank == 0 else None
    try:
        result = train(config, on_progress=printer)
    finally:
        if printer:
            printer.close()
    if rank != 0 or not result:
        if not result:
            print(f"this machine's processes finished; rank 0 writes the run in {config.out}")
        return 0
    from core.evaluation.metrics import format_table

    print(f"test split ({result['mode']} {result['backbone']}, best epoch {result['best_epoch']}):")
    print(format_table(result["test"]))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable photos (listed in metrics.json)")
    print(f"run saved in {Path(args.out).expanduser()}")
    return 0


class _ProgressPrinter:
    """One line per epoch on stdout, and the training's progress (feature extraction included) as a tqdm bar on
    stderr; `close()` takes the bar away."""

    def __init__(self):
        self.bar = None
        self.last_message = ""

    def __call__(self, state: dict):
        from tqdm import tqdm

        message = state.get("message") or ""
        if message.endswith("done") and message != self.last_message:
            def fmt(key, pattern):
                value = state.get(key)
                return "—" if value is None else format(value, pattern)

            tqdm.write(f"epoch {state['epoch']}/{state['epochs']}  train loss {fmt('train_loss', '.4f')} "
                       f"acc {fmt('train_acc', '.3f')}  valid loss {fmt('valid_loss', '.4f')} "
                       f"acc {fmt('valid_acc', '.3f')}  {fmt('images_per_s', '.1f')} img/s", file=sys.stdout)
            sys.stdout.flush()
        if state.get("fraction") is not None:
            if self.bar is None:
                self.bar = tqdm(total=1.0, file=sys.stderr, leave=False, mininterval=1.0,
                                bar_format="{percentage:3.0f}%|{bar:20}| {elapsed}<{remaining} {desc}")
            if state.get("stage") == "features" and state.get("images_per_s"):
                message += f" ({state['images_per_s']:.1f} img/s)"
            self.bar.set_description_str(message, refresh=False)
            self.bar.update(float(state["fraction"]) - self.bar.n)
        self.last_message = state.get("message") or ""

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _evaluate(args) -> int:
    from core.evaluation.metrics import format_table
    from core.evaluation.results import evaluate, skipped_summary
    from core.models.networks import load_model
    from core.files import atomic_write_json

    for path, what in ((args.model, "model file"), (args.data, "dataset folder")):
        if not Path(path).expanduser().exists():
            raise UsageError(f"{path}: no such {what}")
    result = evaluate(args.model, args.data, split=args.split)
    metrics = result.metrics()
    if not metrics["n"]:
        raise UsageError(f"{args.data}: no readable labelled photos of counts {metrics['classes']} in the {args.split} split")
    print(f"{args.split} split of {result.source}")
    print(format_table(metrics))
    print("confusion matrix (rows true, columns predicted): " + "  ".join(str(c) for c in metrics["classes"]))
    for count, row in zip(metrics["classes"], metrics["confusion_matrix"]):
        print(f"{count:>5}  " + " ".join(f"{v:>5}" for v in row))
    if metrics.get("ece_uncalibrated") is not None and metrics.get("ece") is not None:
        print(f"calibration (temperature {metrics['temperature']:.3f}): ECE {metrics['ece_uncalibrated']:.3f} before, "
              f"{metrics['ece']:.3f} after")
    intervals = result.intervals()
    print(interval_lines(metrics, intervals))
    if result.skipped:
        print(skipped_summary(result.skipped))
    if args.json:
        atomic_write_json(args.json, metrics | {"split": args.split, "skipped": result.skipped, "intervals": intervals,
                                                "model": str(args.model), "data": result.source})
    if args.card:
        from core.evaluation.model_card import card_for_result
        from core.files import atomic_write_text
        from core.models.networks import model_file

        _, meta = load_model(args.model)
        atomic_write_text(args.card, card_for_result(result, meta, model_file(args.model).parent))
        print(f"model card written to {args.card}")
    return 0


def interval_lines(metrics: dict, intervals: dict) -> str:
    """The metrics' bootstrap intervals as plain text, one line overall and one per count."""
    from core.evaluation.intervals import PERCENT_METRICS, interval_text

    overall = intervals["overall"]
    lines = [f"{intervals['level']:.0%} intervals (bootstrap over the {intervals['n']:,} photos, "
             f"{intervals['resamples']:,} resamples, seed {intervals['seed']}):",
             "  " + "   ".join(f"{name.replace('_', ' ')} "
                             f"{interval_text(overall[name], percent=name in PERCENT_METRICS)}" for name in overall)]
    for count, found in intervals["per_class"].items():
        lines.append(f"  count {count}: " + "   ".join(f"{name} {interval_text(found[name], percent=False)}"
                                                    for name in found))
    return "\n".join(lines)


def photo_paths(items: list[str]) -> list[Path]:
    """Photos named on the command line; a folder stands for the photos inside it (recursively)."""
    found = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUPPORTED_SUFFIXES and p.is_file())
            if not inside:
                raise UsageError(f"{item}: the folder holds no photos (JPEG, PNG, WebP or BMP)")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{item}: no such photo or folder")
    return found


def add_engine_arguments(parser) -> None:
    """--engine and --precision, shared by `predict` and `serve`."""
    from core.models.engines import ENGINES, PRECISIONS

    parser.add_argument("--engine", choices=ENGINES, default="auto",
                        help="auto: OpenVINO, else ONNX Runtime on a CPU (each checked against PyTorch), else PyTorch")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32",
                        help="bf16: about twice as fast on CPUs with native bfloat16 (OpenVINO), probabilities "
                             "within 0.05 of float32 (measured: 0.02) instead of 1e-4")


def _predict(args) -> int:
    from core.models.engines import load_predictor

    model_path = _model_path(args.model)
    remote = [p for p in args.photos if p.startswith("s3://")]
    if remote and len(remote) < len(args.photos):
        raise UsageError("give either local photos and folders or one s3:// prefix, not both")
    if len(remote) > 1:
        raise UsageError("give one s3:// prefix (or photo) at a time")
    paths = None if remote else photo_paths(args.photos)
    model, meta = load_predictor(model_path, engine=args.engine, precision=args.precision)
    if remote:
        frame = _predict_s3(model, meta, remote[0], args.batch_size, args.limit)
    else:
        from core.models.inference import predict_photos

        frame = predict_photos(model, meta, paths, batch_size=args.batch_size)
    classes = meta["classes"]
    width = max(12, *(len(p) for p in frame["photo"]))
    print(f"{'photo':<{width}}  predicted  " + "  ".join(f"{'p(' + str(c) + ')':>6}" for c in classes))
    for row in frame.itertuples(index=False):
        if row.error:
            print(f"{row.photo:<{width}}  error: {row.error}")
            continue
        probs = "  ".join(f"{getattr(row, f'prob_{c}'):>6.3f}" for c in classes)
        print(f"{row.photo:<{width}}  {int(row.predicted):>9}  {probs}")
    if args.csv:
        from core.files import atomic_write_text
        from core.models.inference import with_ties

        atomic_write_text(args.csv, with_ties(frame).to_csv(index=False))
    if frame["error"].notna().all():
        raise UsageError("none of the photos could be read")
    return 0


def _model_path(given: str | None) -> Path:
    if given is None:
        from core.jobs.runs import current_model_path

        found = current_model_path()
        if found is None:
            raise UsageError("no current model yet: pass --model RUN_DIR/model.pt")
        return found
    if not Path(given).expanduser().exists():
        raise UsageError(f"{given}: no such model file")
    return Path(given).expanduser()


def _predict_s3(model, meta, uri: str, batch_size: int, limit: int | None):
    """Every photo under an s3:// prefix (or one photo): batches download on threads while the previous
    batches are predicted; a tqdm bar on stderr, and the photos/s at the end."""
    import re
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np
    import pandas as pd
    from tqdm import tqdm

    from core.data.remote.s3 import S3Error, S3Source, s3_settings
    from core.models.inference import predict_probabilities, predictions_frame

    match = re.match(r"^s3://([A-Za-z0-9.\-_]{3,63})(?:/(.*))?$", uri.strip())
    if not match:
        raise UsageError(f"{uri!r} is not an S3 URI: expected s3://bucket/prefix/ or s3://bucket/key.jpg")
    bucket, prefix = match.group(1), match.group(2) or ""
    source = S3Source(s3_settings(bucket=bucket))
    if Path(prefix).suffix.lower() in SUPPORTED_SUFFIXES:
        keys = [prefix]
    else:
        keys = [k for k in source.list_keys(prefix, limit=limit) if Path(k).suffix.lower() in SUPPORTED_SUFFIXES]
        if not keys:
            raise UsageError(f"s3://{bucket}/{prefix} holds no photos (JPEG, PNG, WebP or BMP)")
    chunks = [keys[i:i + batch_size] for i in range(0, len(keys), batch_size)]
    frames, started = [], time.perf_counter()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="s3-batches") as pool, \
            tqdm(total=len(keys), unit="photo", desc=f"s3://{bucket}/{prefix}", file=sys.stderr) as bar:
        pending = deque(pool.submit(source.fetch, chunk, None, True) for chunk in chunks[:2])
        for i, chunk in enumerate(chunks):
            try:
                paths = pending.popleft().result()
            except S3Error as exc:
                raise UsageError(str(exc)) from None
            if i + 2 < len(chunks):
                pending.append(pool.submit(source.fetch, chunks[i + 2], None, True))
            present = [k for k in chunk if paths.get(k) is not None]
            probs = np.full((len(chunk), len(meta["classes"])), np.nan, dtype=np.float32)
            errors = {j: f"{Path(k).name}: not in s3://{bucket}" for j, k in enumerate(chunk) if paths.get(k) is None}
            if present:
                found, found_errors = predict_probabilities(model, meta, [paths[k] for k in present], batch_size,
                                                            num_workers=0)
                rows = [chunk.index(k) for k in present]
                probs[rows] = found
                errors.update({rows[j]: message for j, message in found_errors.items()})
            frames.append(predictions_frame([f"s3://{bucket}/{k}" for k in chunk], probs, errors, meta["classes"]))
            bar.update(len(chunk))
    elapsed = time.perf_counter() - started
    print(f"{len(keys):,} photos in {elapsed:.1f} s: {len(keys) / max(elapsed, 1e-9):.1f} photos/s "
          f"({getattr(model, 'engine', 'torch')})", file=sys.stderr)
    return pd.concat(frames, ignore_index=True)


def register(subparsers) -> None:
    train = subparsers.add_parser("train", help="train a counting model on a labelled folder")
    add_train_options(train)
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser("evaluate", help="score a model on a labelled folder's split")
    evaluate.add_argument("--model", required=True, help="RUN_DIR/model.pt")
    evaluate.add_argument("--data", required=True, help="labelled folder (ABID layout or ImageFolder)")
    evaluate.add_argument("--split", choices=["test", "valid", "train", "all"], default="test")
    evaluate.add_argument("--json", default=None,
                          help="write the metrics (with their 95 %% intervals) as JSON to this file")
    evaluate.add_argument("--card", default=None, help="write the run's model card (Markdown) to this file")
    evaluate.set_defaults(handler=_evaluate)

    predict = subparsers.add_parser("predict", help="predict the count of photos (local, or under an s3:// prefix)")
    predict.add_argument("--model", default=None, help="RUN_DIR/model.pt (default: the current model)")
    predict.add_argument("photos", nargs="+", metavar="PHOTO_DIR_OR_S3_URI")
    predict.add_argument("--limit", type=int, default=None, help="at most this many photos under an s3:// prefix")
    predict.add_argument("--csv", default=None, help="write the predictions to this CSV file")
    predict.add_argument("--batch-size", type=int, default=32)
    add_engine_arguments(predict)
    predict.set_defaults(handler=_predict)
