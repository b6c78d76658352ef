"""Partial fine-tuning recipes on stored stage maps: each recipe trained (per seed) on the same maps, loaded once;
prints valid and test balanced accuracy, the best epoch and the training time, and appends a JSON line per run.

    python bench/partial_recipes.py --data ../shared/abid --seeds 0,1 --recipes base,cut5 --out bench-partial.jsonl

A recipe is a name from RECIPES (changes to the partial defaults). The store is filled first when it lacks photos
(`python -m core health --data D` fills it too). Choose on valid; read test once.

`--refit-epochs K` trains on the train and valid photos together and keeps the weights after epoch K of the recipe's
schedule (K chosen on valid beforehand: the best valid epoch of the recipe's runs), so its valid figure is in-sample;
`--keep DIR` keeps each run's model as DIR/DIR-RECIPE/members/SEED/model.pt, for bench/ensemble_mixtures.py.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

RECIPES = {
    "base": {},
    "cut5": {"cut": "blocks.5"},
    "cut5-bnfrozen": {"cut": "blocks.5", "batchnorm": "frozen"},
    "cut5-crop": {"cut": "blocks.5", "map_augment": "vflip+crop"},
    "cut5-noaug": {"cut": "blocks.5", "map_augment": "none"},
    "cut5-ema": {"cut": "blocks.5", "ema": 0.99},
    "cut5-lr3": {"cut": "blocks.5", "lr": 3e-4},
    "cut5-e12": {"cut": "blocks.5", "epochs": 12},
    "cut5-f1": {"cut": "blocks.5", "backbone_lr_factor": 1.0},
    "cut5-wd": {"cut": "blocks.5", "weight_decay": 0.1},
    "cut5-linear": {"cut": "blocks.5", "head": "linear"},
    "cut5-ce": {"cut": "blocks.5", "loss": "ce"},
    "bnfrozen": {"batchnorm": "frozen"},
    "crop": {"map_augment": "vflip+crop"},
    "ema": {"ema": 0.99},
    "lr3": {"lr": 3e-4},
    "multilevel": {"features": "multilevel", "head": "normlinear"},
    "c5-reg": {"cut": "blocks.5", "batchnorm": "frozen", "lr": 3e-4, "map_augment": "vflip+crop", "ema": 0.99},
    "c5-reg-noema": {"cut": "blocks.5", "batchnorm": "frozen", "lr": 3e-4, "map_augment": "vflip+crop"},
    "c5-reg-linear": {"cut": "blocks.5", "batchnorm": "frozen", "lr": 3e-4, "map_augment": "vflip+crop", "ema": 0.99,
                      "head": "linear"},
    "c5-ema-crop": {"cut": "blocks.5", "map_augment": "vflip+crop", "ema": 0.99},
    "c5-lr1": {"cut": "blocks.5", "lr": 1e-4},
    "c5-bnf-lr3": {"cut": "blocks.5", "batchnorm": "frozen", "lr": 3e-4},
    "c5-bnf-lr3-e5": {"cut": "blocks.5", "batchnorm": "frozen", "lr": 3e-4, "epochs": 5},
    "c4-reg": {"batchnorm": "frozen", "lr": 3e-4, "map_augment": "vflip+crop", "ema": 0.99},
    "c4-bnf-lr3": {"batchnorm": "frozen", "lr": 3e-4},
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--recipes", default="base,cut5")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--set", action="append", default=[], help="extra setting for every recipe, KEY=VALUE")
    parser.add_argument("--out", default="bench-partial.jsonl")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--refit-epochs", type=int, default=0,
                        help="train on train + valid and keep the weights after this epoch (0: train only, best valid)")
    parser.add_argument("--keep", default="", help="keep each run's model under this folder")
    args = parser.parse_args()

    import torch

    from core.data.layouts.registry import load_dataset
    from core.models import networks as models
    from core.training.config import TrainConfig
    from core.training.epochs import Progress, seed_everything
    from core.training.loop import _build_meta, _split_rows, training_split
    from core.training.partial import PartialRun, RefitRun

    if args.threads:
        torch.set_num_threads(args.threads)
    ds = load_dataset(args.data)
    splits = [_split_rows(ds, s) for s in ("train", "valid", "test")]
    extra = {}
    for item in args.set:
        key, _, value = item.partition("=")
        extra[key] = json.loads(value) if value[:1] in "0123456789-[{tf" else value
    maps_by_key: dict = {}
    train_by_choice: dict = {}  # the training split per choice of photos left out (likely wrong, uncountable)
    for recipe in args.recipes.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            settings = {"mode": "partial", "num_workers": 1} | RECIPES[recipe] | extra | {"seed": seed}
            if args.keep:
                out = Path(args.keep) / f"{Path(args.keep).name}-{recipe}" / "members" / str(seed)
                out.mkdir(parents=True, exist_ok=True)
            else:
                out = Path(tempfile.mkdtemp(prefix=f"partial-{recipe}-{seed}-"))
            config = TrainConfig(data=args.data, out=str(out), **settings).for_dataset(ds)
            choice = (config.exclude_suspects, config.exclude_uncountable)
            if choice not in train_by_choice:
                train_by_choice[choice], suspects, uncountable = training_split(config, ds, splits[0])
                if suspects or uncountable:
                    print(f"  left out of the training split: {suspects} likely wrong counts, {uncountable} "
                          f"uncountable", flush=True)
            backbone, info = models.build_backbone(config.backbone, config.weights, config.feature_set)
            meta = _build_meta(config, ds, info)
            model = models.CountingModel(backbone, models.make_head(config.head, info["feature_dim"],
                                                                    len(ds.classes), config.backbone))
            log = lambda line: print(f"  [{recipe} seed {seed}] {line}", flush=True)
            run_class = RefitRun if args.refit_epochs else PartialRun
            run = run_class(config, model, meta, models.resolve_device("auto"), out, log,
                            Progress(None, "cpu", config.n_epochs), None, seed_everything(seed))
            run.stop_after = args.refit_epochs or None
            key = (config.cut, config.input_height, config.input_aspect, config.backbone, choice)
            run.shared_maps = maps_by_key.get(key)
            started = time.perf_counter()
            result = run.fit(train_by_choice[choice], *splits[1:], None)
            seconds = time.perf_counter() - started
            maps_by_key[key] = run.tensors
            row = {"recipe": recipe, "seed": seed, "refit_epochs": args.refit_epochs,
                   "settings": replace(config, data=None, out=None).to_dict(),
                   "valid": result["valid"]["balanced_accuracy"], "test": result["test"]["balanced_accuracy"],
                   "test_off_by_one": result["test"].get("off_by_one"), "test_mae": result["test"].get("mae"),
                   "best_epoch": result["best_epoch"], "seconds": round(seconds, 1),
                   "epoch_seconds": [round(h["seconds"], 1) for h in result["history"]],
                   "valid_history": [None if h["valid_acc"] is None else round(h["valid_acc"], 3)
                                     for h in result["history"]]}
            print(f"{recipe:16s} seed {seed}: valid {row['valid']:.3f}  test {row['test']:.3f}  best epoch "
                  f"{row['best_epoch']}  {seconds / 60:.1f} min", flush=True)
            with open(args.out, "a") as handle:
                handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
