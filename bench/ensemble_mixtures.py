"""Benchmark: mixtures of trained partial models (seed ensembles' members, other cuts, other backbones) scored on the
valid and test splits from the stored stage maps, without training anything: does mixing kinds of member help?

    BINSIGHT_HOME=<the store's home> python bench/ensemble_mixtures.py --data ../shared/abid \\
        --models RUN/members/1/model.pt … --mix ens-a+l2-0 …

Each model's probabilities (its photo and mirror averaged, as it predicts) are computed once from the stage-map store
(maps after blocks.4, one pass per backbone and input size) and kept in --out as NPZ; a mixture averages its models'
probabilities with equal weight. A model is named by its run folder (RUN-members-N for an ensemble's member); a
mixture names models or groups (a run folder's members), joined by "+". Prints balanced accuracy per model, per group
and per mixture. Choose on valid; test is for the record."""
import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import balanced_accuracy_score

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def model_name(path: str) -> str:
    parts = Path(path).resolve().parent.parts
    return f"{parts[-3]}-members-{parts[-1]}" if parts[-2] == "members" else parts[-1]


def score_models(data: str, models: list[str], out: Path) -> None:
    from core.data.layouts.registry import load_dataset
    from core.models import stage_store
    from core.models.inference import tempered_probabilities
    from core.models.networks import load_model
    from core.training.partial import stage_map_logits

    dataset = load_dataset(data)
    splits = {name: dataset.rows(name) for name in ("valid", "test")}
    maps_of = {}
    for path in models:
        target = out / f"{model_name(path)}.npz"
        if target.is_file():
            continue
        model, meta = load_model(path)
        classes = [int(c) for c in meta["classes"]]
        if not (out / "labels.npz").is_file():
            np.savez(out / "labels.npz", **{name: np.array([classes.index(int(c)) for c in rows["cls"]])
                                            for name, rows in splits.items()})
        kind = (meta["backbone"], tuple(meta["input_size"]))  # the store keeps one set of maps per backbone and size
        if kind not in maps_of:
            found = {name: stage_store.stage_maps(model.backbone, meta, list(rows["path"]))
                     for name, rows in splits.items()}
            maps_of[kind] = {name: torch.stack([f.maps[v] for v in stage_store.STORE_VIEWS], 1)
                             for name, f in found.items()}
        logits = {name: stage_map_logits(model, maps, stage_store.STORE_CUT) for name, maps in maps_of[kind].items()}
        np.savez(target, **{name: tempered_probabilities(z).numpy() for name, z in logits.items()})
        print(f"scored {model_name(path)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT / ".." / "shared" / "abid"))
    parser.add_argument("--models", nargs="*", default=[], help="model.pt files to score (once; kept in --out)")
    parser.add_argument("--mix", nargs="*", default=[], help="mixtures to score, e.g. ens-a+ens-b+l2-0")
    parser.add_argument("--out", default="/tmp/ensemble-mixtures")
    args = parser.parse_args()
    if not os.environ.get("BINSIGHT_HOME"):
        parser.error("set BINSIGHT_HOME to the home whose stage-map store holds the photos' maps")
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    score_models(args.data, args.models, out)
    labels = np.load(out / "labels.npz")
    probs = {p.stem: np.load(p) for p in sorted(out.glob("*.npz")) if p.stem != "labels"}
    groups = {}
    for name in probs:
        groups.setdefault(name.split("-members-")[0], []).append(name)

    def line(label, names):
        scores = [balanced_accuracy_score(labels[s], np.mean([probs[n][s] for n in names], 0).argmax(1))
                  for s in ("valid", "test")]
        print(f"{label:44s} {len(names):3d} models   valid {scores[0]:.1%}   test {scores[1]:.1%}")

    for group, names in groups.items():
        line(group, names)
    for mixture in args.mix:
        line(mixture, [n for part in mixture.split("+") for n in groups.get(part, [part])])


if __name__ == "__main__":
    main()
