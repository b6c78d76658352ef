"""Quality on ABID: train recipes on the train split, print test-split balanced accuracy, accuracy, macro-F1, off-by-one.

Each option takes a comma-separated list; every combination is trained (frozen runs share cached features,
so trying heads, losses and schedules costs one backbone pass per backbone/resolution). Example:

    python bench/quality.py --data ../shared/abid --mode frozen --image-size 224,288 --loss ce,emd
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.training.config import TrainConfig  # noqa: E402
from core.training.loop import train  # noqa: E402

GRID = {  # option → (type, default)
    "backbone": (str, "efficientnet_lite0"), "mode": (str, "frozen"), "image_size": (int, ""),
    "aspect": (float, ""), "head": (str, "mlp"), "loss": (str, "emd"), "balance": (str, "weights"),
    "epochs": (int, ""), "lr": (float, ""), "label_smoothing": (float, "0"), "tta": (str, ""),
    "weight_decay": (float, "0.01"), "patience": (int, "8"), "batch_size": (int, "32"), "seed": (int, "0"),
    "backbone_lr_factor": (float, "0.3"),
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "abid"))
    parser.add_argument("--runs", default="/tmp/binsight-quality", help="folder for the run folders")
    parser.add_argument("--jsonl", default=None, help="append one JSON line of results per recipe here")
    for name, (_, default) in GRID.items():
        parser.add_argument("--" + name.replace("_", "-"), default=default, help=f"comma-separated (default {default or 'mode default'})")
    return parser.parse_args()


def recipes(args) -> list[dict]:
    values = {}
    for name, (kind, _) in GRID.items():
        text = getattr(args, name)
        values[name] = [kind(v) for v in text.split(",")] if text else [None]
    return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]


def main() -> int:
    args = parse_args()
    print(f"{'recipe':<90} {'bal.acc':>7} {'acc':>6} {'F1':>6} {'±1':>6} {'MAE':>5} {'best':>4} {'s':>6}")
    for recipe in recipes(args):
        name = ",".join(f"{k}={v}" for k, v in recipe.items() if v is not None)
        out = Path(args.runs) / name.replace("=", "-").replace(",", "_")
        started = time.perf_counter()
        result = train(TrainConfig(data=args.data, out=str(out), **{k: v for k, v in recipe.items() if v is not None}))
        test = result["test"]
        seconds = time.perf_counter() - started
        print(f"{name:<90} {test['balanced_accuracy']:>7.1%} {test['accuracy']:>6.1%} {test['macro_f1']:>6.3f} "
              f"{test['off_by_one']:>6.1%} {test['mae']:>5.2f} {result['best_epoch']:>4} {seconds:>6.0f}", flush=True)
        if args.jsonl:
            with open(args.jsonl, "a") as handle:
                handle.write(json.dumps({"recipe": recipe, "test": {k: test[k] for k in (
                    "balanced_accuracy", "accuracy", "macro_f1", "off_by_one", "mae", "n")},
                    "valid_balanced_accuracy": result["valid"]["balanced_accuracy"],
                    "best_epoch": result["best_epoch"], "seconds": round(seconds, 1)}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
