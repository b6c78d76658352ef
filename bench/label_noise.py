"""Label-error detection on injected noise: flip a share of the train split's counts (seeded; half by one count, half by
two or more), find label issues as the app does, and print how well the flips are found.

For each noise rate and seed: AUROC of the ranking score for far flips (±2 or more) against unflipped train photos and
for ±1 flips against them (0.5 is chance), and the precision and recall of the flagged photos. Scores compared: the
app's count-aware score (expected absolute count error), cleanlab's self-confidence (1 − label quality) and the
probability the model gives the label (1 − p[label]); and the issue's baseline: 1 − p[label] from heads on the
stride-16 2×2 grid and stride-32 mean alone (the probe that found far flips with AUROC ≈ 0.81, ±1 flips ≈ 0.54). Example:

    python bench/label_noise.py --data ../shared/abid --rates 0.05,0.1 --seeds 0,1
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.data.layouts.registry import load_dataset  # noqa: E402
from core.evaluation.label_issues import RECIPE, cross_fit, head_columns, photo_features, rank_issues  # noqa: E402
from core.models.catalog import FEATURE_SETS, STAGE_CHANNELS  # noqa: E402
from core.models.networks import backbone_spec  # noqa: E402

BASELINE_PARTS = [["stride16", "grid2"], ["stride32", "mean"]]


def baseline_columns() -> list[int]:
    """The columns of the recipe's multi-level vector that the issue's baseline probe used."""
    channels = STAGE_CHANNELS[backbone_spec(RECIPE["backbone"]).arch]
    return FEATURE_SETS[RECIPE["features"]].columns(channels, BASELINE_PARTS)


def inject(labels: np.ndarray, candidates: np.ndarray, rate: float, n_classes: int, seed: int):
    """Noisy labels and the flipped rows' distance (0 unflipped): half of the flips by one count, half by 2+."""
    rng = np.random.default_rng(seed)
    flipped = rng.choice(candidates, int(round(rate * len(candidates))), replace=False)
    noisy, distance = labels.copy(), np.zeros(len(labels), dtype=int)
    for k, row in enumerate(flipped):
        near = k % 2 == 0
        options = [c for c in range(n_classes) if (abs(c - labels[row]) == 1) == near and c != labels[row]]
        if not near:
            options = [c for c in options if abs(c - labels[row]) >= 2]
        noisy[row] = rng.choice(options)
        distance[row] = abs(noisy[row] - labels[row])
    return noisy, distance


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(positive, scores))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "abid"),
                        help="dataset (default ../shared/abid; 'demo' for the embedded demo set)")
    parser.add_argument("--rates", default="0.05,0.1")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    dataset = load_dataset(None if args.data == "demo" else args.data)
    rows = dataset.rows("all")
    started = time.perf_counter()
    features, errors = photo_features(dataset, rows, on_progress=lambda f, t: print(f"\r{t}", end="", flush=True))
    print(f"\nfeatures of {len(rows):,} photos in {time.perf_counter() - started:.0f} s ({len(errors)} unreadable)")
    keep = np.array([i not in errors for i in range(len(rows))])
    rows, features = rows[keep], features[keep]
    classes = [int(c) for c in dataset.classes]
    labels = np.array([classes.index(int(c)) for c in rows["cls"]])
    split = rows["split"].to_numpy()
    train = np.flatnonzero(split == "train")
    fit_on = split != "test"
    print(f"{'rate':>5} {'seed':>4} | {'score':<28} {'AUROC far':>9} {'AUROC ±1':>8} | {'flagged':>7} "
          f"{'precision':>9} {'recall far':>10} {'recall ±1':>9} {'s':>5}")
    for rate in (float(r) for r in args.rates.split(",")):
        for seed in (int(s) for s in args.seeds.split(",")):
            tick = time.perf_counter()
            noisy, distance = inject(labels, train, rate, len(classes), seed)
            probs = cross_fit(features[..., head_columns()], noisy, fit_on, args.folds, seed, n_classes=len(classes))
            per_photo, _ = rank_issues(probs, noisy, classes)
            seconds = time.perf_counter() - tick
            baseline = cross_fit(features[..., baseline_columns()], noisy, fit_on, args.folds, seed,
                                 n_classes=len(classes))
            scores = {"count-aware (the app's)": per_photo["score"].to_numpy(),
                      "cleanlab self-confidence": 1 - per_photo["quality"].to_numpy(),
                      "1 − p(label)": 1 - probs[np.arange(len(noisy)), noisy],
                      "baseline probe 1 − p(label)": 1 - baseline[np.arange(len(noisy)), noisy]}
            flagged = per_photo["flagged"].to_numpy()[train]
            far, near, clean = distance[train] >= 2, distance[train] == 1, distance[train] == 0
            for name, score in scores.items():
                s = score[train]
                far_auc = auroc(s[far | clean], far[far | clean])
                near_auc = auroc(s[near | clean], near[near | clean])
                tail = ""
                if name.startswith("count-aware"):
                    precision = (flagged & ~clean).sum() / max(flagged.sum(), 1)
                    tail = (f"{int(flagged.sum()):>7} {precision:>9.1%} {(flagged & far).sum() / max(far.sum(), 1):>10.1%} "
                            f"{(flagged & near).sum() / max(near.sum(), 1):>9.1%} {seconds:>5.0f}")
                print(f"{rate:>5.0%} {seed:>4} | {name:<28} {far_auc:>9.3f} {near_auc:>8.3f} | {tail}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
