"""CLI for models: `train`, `evaluate` and `predict`."""
from __future__ import annotations

import sys
import time
from pathlib import Path

from core.data.images import SUPPORTED_SUFFIXES
from core.errors import UsageError

# Literal copies of core.models / core.training choices, so building the parser does not import torch.
BACKBONES = ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet50", "resnet18", "simple_cnn"]
HEADS, MODES, BALANCE = ["linear", "mlp"], ["frozen", "finetune"], ["none", "weights", "sampler"]
TTA = ["none", "hflip", "flips"]
LOSSES, SCHEDULES = ["ce", "emd"], ["cosine", "onecycle"]


def _train(args) -> int:
    from core.training.config import TrainConfig
    from core.training.loop import train

    config = TrainConfig(
        data=args.data, out=args.out, backbone=args.backbone, mode=args.mode, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, image_size=args.image_size, aspect=args.aspect,
        balance=args.balance, device=args.device, head=args.head, loss=args.loss,
        label_smoothing=args.label_smoothing, weights=args.weights, resume=args.resume, patience=args.patience,
        num_workers=args.workers, seed=args.seed, tta=args.tta, augment=not args.no_augment,
        schedule=args.schedule, weight_decay=args.weight_decay, backbone_lr_factor=args.backbone_lr_factor,
    )
    if not Path(args.data).expanduser().exists():
        raise UsageError(f"{args.data}: no such dataset folder")
    printer = _ProgressPrinter()
    result = train(config, on_progress=printer)
    from core.evaluation.metrics import format_table

    print(f"test split ({result['mode']} {result['backbone']}, best epoch {result['best_epoch']}):")
    print(format_table(result["test"]))
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} unreadable photos (listed in metrics.json)")
    print(f"run saved in {Path(args.out).expanduser()}")
    return 0


class _ProgressPrinter:
    """Prints one line per epoch, and feature-extraction progress every few seconds."""

    def __init__(self):
        self.last_line = 0.0
        self.last_message = ""

    def __call__(self, state: dict):
        message = state.get("message") or ""
        now = time.monotonic()
        if message.endswith("done") and message != self.last_message:
            def fmt(key, pattern):
                value = state.get(key)
                return "—" if value is None else format(value, pattern)

            print(f"epoch {state['epoch']}/{state['epochs']}  train loss {fmt('train_loss', '.4f')} "
                  f"acc {fmt('train_acc', '.3f')}  valid loss {fmt('valid_loss', '.4f')} acc {fmt('valid_acc', '.3f')}"
                  f"  {fmt('images_per_s', '.1f')} img/s", flush=True)
        elif state.get("stage") == "features" and message.startswith("Computing") and now - self.last_line > 5:
            print(f"{message}  ({state.get('images_per_s') or 0:.1f} img/s)", file=sys.stderr, flush=True)
            self.last_line = now
        self.last_message = message


def _evaluate(args) -> int:
    from core.evaluation.metrics import format_table
    from core.evaluation.results import evaluate
    from core.files import atomic_write_json

    for path, what in ((args.model, "model file"), (args.data, "dataset folder")):
        if not Path(path).expanduser().exists():
            raise UsageError(f"{path}: no such {what}")
    metrics, _ = evaluate(args.model, args.data, split=args.split)
    if not metrics["n"]:
        raise UsageError(f"{args.data}: no readable labelled photos of counts {metrics['classes']} in the {args.split} split")
    print(f"{args.split} split of {metrics['data']}")
    print(format_table(metrics))
    print("confusion matrix (rows true, columns predicted): " + "  ".join(str(c) for c in metrics["classes"]))
    for count, row in zip(metrics["classes"], metrics["confusion_matrix"]):
        print(f"{count:>5}  " + " ".join(f"{v:>5}" for v in row))
    if metrics["skipped"]:
        print(f"skipped {len(metrics['skipped'])} photos that could not be read: "
              + "; ".join(s["reason"] for s in metrics["skipped"][:3]) + (" …" if len(metrics["skipped"]) > 3 else ""))
    if args.json:
        atomic_write_json(args.json, metrics)
    return 0


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


def _predict(args) -> int:
    from core.models.export import load_predictor

    model_path = _model_path(args.model)
    remote = [p for p in args.photos if p.startswith("s3://")]
    if remote and len(remote) < len(args.photos):
        raise UsageError("give either local photos and folders or one s3:// prefix, not both")
    if len(remote) > 1:
        raise UsageError("give one s3:// prefix (or photo) at a time")
    paths = None if remote else photo_paths(args.photos)
    model, meta = load_predictor(model_path)
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

        atomic_write_text(args.csv, frame.to_csv(index=False))
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

    from core.data.s3 import S3Error, S3Source, s3_settings
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
    train.add_argument("--data", required=True, help="dataset folder (ABID layout, ImageFolder or file_list.json)")
    train.add_argument("--out", required=True, help="run folder for model.pt, metrics.json, config.json, log.txt")
    train.add_argument("--backbone", choices=BACKBONES, default="efficientnet_lite0")
    train.add_argument("--mode", choices=MODES, default="frozen")
    train.add_argument("--epochs", type=int, default=None, help="default: 40 frozen, 6 finetune")
    train.add_argument("--batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=None, help="head learning rate (default 1e-4 frozen, 1e-3 finetune)")
    train.add_argument("--backbone-lr-factor", type=float, default=0.3, help="finetune: backbone lr = lr × this")
    train.add_argument("--weight-decay", type=float, default=0.01)
    train.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    train.add_argument("--image-size", type=int, default=None, help="input height in pixels (default: 224 frozen, 288 finetune)")
    train.add_argument("--aspect", type=float, default=None, help="input width / height (default: 1.0 frozen, 1.37 finetune)")
    train.add_argument("--balance", choices=BALANCE, default="weights")
    train.add_argument("--loss", choices=LOSSES, default="emd", help="emd: cross-entropy + a count-aware (ordinal) term; ce: plain")
    train.add_argument("--label-smoothing", type=float, default=0.0)
    train.add_argument("--head", choices=HEADS, default="mlp")
    train.add_argument("--tta", choices=TTA, default=None,
                       help="test-time augmentation: average each photo's prediction over its mirror images "
                            "(flips: left-right, top-bottom and both; hflip: left-right only; "
                            "default: flips for finetune, none for frozen)")
    train.add_argument("--no-augment", action="store_true")
    train.add_argument("--weights", default=None, help="backbone weights file (.pth), e.g. for resnet50/resnet18")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--patience", type=int, default=8, help="early stopping patience in epochs (0: off)")
    train.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores − 1)")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    train.set_defaults(handler=_train)

    evaluate = subparsers.add_parser("evaluate", help="score a model on a labelled folder's split")
    evaluate.add_argument("--model", required=True, help="RUN_DIR/model.pt")
    evaluate.add_argument("--data", required=True, help="labelled folder (ABID layout or ImageFolder)")
    evaluate.add_argument("--split", choices=["test", "valid", "train", "all"], default="test")
    evaluate.add_argument("--json", default=None, help="write the metrics as JSON to this file")
    evaluate.set_defaults(handler=_evaluate)

    predict = subparsers.add_parser("predict", help="predict the count of photos (local, or under an s3:// prefix)")
    predict.add_argument("--model", default=None, help="RUN_DIR/model.pt (default: the current model)")
    predict.add_argument("photos", nargs="+", metavar="PHOTO_DIR_OR_S3_URI")
    predict.add_argument("--limit", type=int, default=None, help="at most this many photos under an s3:// prefix")
    predict.add_argument("--csv", default=None, help="write the predictions to this CSV file")
    predict.add_argument("--batch-size", type=int, default=32)
    predict.set_defaults(handler=_predict)
