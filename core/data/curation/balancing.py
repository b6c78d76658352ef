"""Balancing strategies: preview the per-split class distribution they give, then apply one as a new version."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core.data.labels import splits, versions
from core.data.classes import ClassRange
from core.data.dataset import Dataset
from core.data.layouts.abid_folder import ABID_FOLDER
from core.data.overview import SPLIT_ORDER
from core.data.curation.pools import Pool, pick
from core.errors import BinsightError

STRATEGIES = {
    "fetch": "Fetch more photos (bucket or local pool)",
    "undersample": "Undersample the larger classes",
    "oversample": "Oversample the smaller classes (repeat photos)",
    "sampler": "Weighted sampler (draw classes equally often)",
    "loss_weights": "Class-weighted loss",
}
PROTECTED_SPLIT = "test"  # balancing never adds, drops, repeats or weights a test photo: no leakage


class BalanceError(BinsightError, ValueError):
    """A strategy or parameter that cannot be used, with a message for the user."""


@dataclass
class Plan:
    """What a strategy would do: the new rows and the distribution before and after."""

    dataset: Dataset
    strategy: str
    params: dict
    frame: pd.DataFrame
    before: pd.DataFrame
    after: pd.DataFrame
    weight_use: str | None = None
    picks: pd.DataFrame | None = None
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _usable(frame: pd.DataFrame) -> pd.Series:
    return frame["cls"].notna() & frame["problem"].isna() & frame["split"].notna()


def distribution(frame: pd.DataFrame, class_range: ClassRange, weight_use: str | None = None) -> pd.DataFrame:
    """Per (split, class): `photos` (distinct) and `effective` (what an epoch sees: repeats, sampler, loss weight)."""
    rows = frame[_usable(frame)].copy()
    repeat = rows["repeat"] if "repeat" in rows else pd.Series(1, index=rows.index)
    weight = rows["weight"] if "weight" in rows else pd.Series(1.0, index=rows.index)
    rows["_photos"] = 1
    rows["_effective"] = repeat.astype(float)
    train = rows["split"] == "train"
    if weight_use == "loss":
        rows.loc[train, "_effective"] = (weight * repeat)[train]
    elif weight_use == "sampler" and train.any():
        mass = (weight * repeat)[train]
        rows.loc[train, "_effective"] = mass / mass.sum() * repeat[train].sum()
    table = rows.groupby(["split", "cls"])[["_photos", "_effective"]].sum()
    index = pd.MultiIndex.from_product([SPLIT_ORDER, class_range.classes], names=["split", "cls"])
    table = table.reindex(index, fill_value=0).reset_index()
    table.columns = ["split", "cls", "photos", "effective"]
    table["cls"] = table["cls"].astype(int)
    table["photos"] = table["photos"].astype(int)
    table["effective"] = table["effective"].astype(float).round(1)
    table["class_name"] = table["cls"].map(class_range.name)
    return table[["split", "cls", "class_name", "photos", "effective"]]


def current_distribution(dataset: Dataset) -> pd.DataFrame:
    return distribution(versions.version_frame(dataset), dataset.class_range, dataset.split_info.get("weight_use"))


def reweight(frame: pd.DataFrame, weight_use: str | None) -> pd.DataFrame:
    """Train rows get weight N / (k · n_class) (n counting repeats) when weighting is on; every other row 1."""
    frame = frame.copy()
    frame["weight"] = 1.0
    if weight_use is None:
        return frame
    train = _usable(frame) & (frame["split"] == "train")
    sizes = frame[train].groupby("cls")["repeat"].sum()
    sizes = sizes[sizes > 0]
    if sizes.empty:
        return frame
    per_class = sizes.sum() / (len(sizes) * sizes)
    frame.loc[train, "weight"] = frame.loc[train, "cls"].map(per_class).astype(float).to_numpy()
    return frame


def _balanced_splits(params: dict) -> list[str]:
    chosen = list(params.get("splits") or ["train"])
    if PROTECTED_SPLIT in chosen:
        raise BalanceError("the test split is never balanced: it must stay as it is so results stay comparable "
                           "and no photo leaks between training and testing")
    unknown = [s for s in chosen if s not in SPLIT_ORDER]
    if unknown:
        raise BalanceError(f"unknown split(s) {unknown}: choose among train and valid")
    return chosen


def _target(params: dict, sizes: pd.Series, default) -> int:
    target = params.get("target")
    if target is None:
        return int(default(sizes))
    if int(target) < 1:
        raise BalanceError("the target must be at least 1 photo per class")
    return int(target)


def _split_targets(frame, params, default):
    """(split, its usable rows, photos per class, the target per class) of each split to balance that has photos."""
    for split in _balanced_splits(params):
        rows = frame[_usable(frame) & (frame["split"] == split)]
        sizes = rows["cls"].value_counts()
        if not sizes.empty:
            yield split, rows, sizes, _target(params, sizes, default)


def _undersample(frame, dataset, params, rng, notes):
    dropped = []
    for split, rows, sizes, target in _split_targets(frame, params, lambda s: s.min()):
        missing = [c for c in dataset.classes if c not in sizes.index]
        if missing:
            notes.append(f"{split}: classes {missing} have no photo; undersampling cannot fix that — fetch more.")
        for cls, group in rows.groupby("cls"):
            if len(group) > target:
                drop = rng.choice(group.index.to_numpy(), size=len(group) - target, replace=False)
                dropped += frame.loc[drop, "name"].tolist()
                frame = frame.drop(index=drop)
        kept = len(frame[_usable(frame) & (frame["split"] == split)])
        notes.append(f"{split}: at most {target:,} photos per class; {len(rows) - kept:,} photos left out.")
    return frame, dropped


def _oversample(frame, dataset, params, rng, notes):
    for split, rows, sizes, target in _split_targets(frame, params, lambda s: s.max()):
        for cls, group in rows.groupby("cls"):
            n = len(group)
            repeat = np.ones(n, dtype=int)
            if n < target:
                repeat[:] = target // n
                repeat[rng.choice(n, size=target % n, replace=False)] += 1
            frame.loc[group.index, "repeat"] = repeat
        missing = [c for c in dataset.classes if c not in sizes.index]
        if missing:
            notes.append(f"{split}: classes {missing} have no photo to repeat — fetch more.")
        notes.append(f"{split}: every class repeated up to {target:,} photos per epoch (the same photos, "
                     "seen several times: augmentation matters).")
    return frame


def _fetch_plan(frame, dataset, params, notes):
    pool: Pool | None = params.get("pool")
    if pool is None:
        raise BalanceError("fetching more needs a candidate pool: a bucket list (file_list.json / counting list) "
                           "or a local folder")
    more = {int(c): int(n) for c, n in (params.get("more") or {}).items() if int(n) > 0}
    unknown = [c for c in more if c not in dataset.classes]
    if unknown:
        raise BalanceError(f"classes {unknown} are outside the class range {dataset.class_range.describe()}")
    if not more:
        raise BalanceError("say how many more photos to fetch for at least one class")
    picks, short = pick(pool, dataset, more, seed=int(params.get("seed", 0)))
    for cls, missing in short.items():
        notes.append(f"class {dataset.class_range.name(cls)}: the pool has only {more[cls] - missing:,} new photos "
                     f"of the {more[cls]:,} asked.")
    valid_fraction = float(params.get("valid_fraction", dataset.split_info.get("valid_fraction", 0.2)))
    if not 0 <= valid_fraction < 1:
        raise BalanceError("the validation fraction must be between 0 and 1")
    picks = picks.copy()
    if len(picks):
        # New photos join train/valid only (test_per_class=0), like photos added to a folder after its split.
        assigned, _ = splits.make_split(picks, test_per_class=0, valid_fraction=valid_fraction,
                                        seed=int(params.get("seed", 0)))
        picks["split"] = assigned
    else:
        picks["split"] = pd.Series(dtype=object)
    placeholder = picks.assign(path=None, problem=None, label_source="pending", weight=1.0, repeat=1)
    planned = pd.concat([frame, placeholder[[c for c in placeholder.columns if c in frame.columns]]],
                        ignore_index=True)
    planned["cls"] = planned["cls"].astype("Int64")
    return planned, picks


def preview(dataset: Dataset, strategy: str, params: dict | None = None) -> Plan:
    """The distribution `strategy` would give (deterministic for a given seed); changes nothing on disk."""
    if strategy not in STRATEGIES:
        raise BalanceError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    params = dict(params or {})
    rng = np.random.default_rng(int(params.get("seed", 0)))
    base = versions.version_frame(dataset)
    weight_use = dataset.split_info.get("weight_use")
    notes: list[str] = []
    picks, dropped = None, []
    frame = base.copy()
    if strategy == "undersample":
        frame, dropped = _undersample(frame, dataset, params, rng, notes)
    elif strategy == "oversample":
        frame = _oversample(frame, dataset, params, rng, notes)
    elif strategy == "sampler":
        weight_use = "sampler"
        notes.append("Training draws train photos with replacement, each class equally often; photos are unchanged.")
    elif strategy == "loss_weights":
        weight_use = "loss"
        notes.append("Each train photo's loss is weighted by N / (classes × photos of its class); "
                     "photos are unchanged.")
    elif strategy == "fetch":
        frame, picks = _fetch_plan(frame, dataset, params, notes)
    frame = reweight(frame, weight_use)
    _check_test_untouched(base, frame)
    return Plan(dataset, strategy, params, frame, current_distribution(dataset),
                distribution(frame, dataset.class_range, weight_use), weight_use, picks, dropped, notes)


def _check_test_untouched(base: pd.DataFrame, frame: pd.DataFrame) -> None:
    """Guard: the test rows of the new frame are exactly the old ones, unweighted and unrepeated."""
    def test_rows(table):
        rows = table[table["split"] == PROTECTED_SPLIT]
        return rows[["name", "weight", "repeat"]].sort_values("name").reset_index(drop=True)

    before, after = test_rows(base), test_rows(frame)
    if not before["name"].equals(after["name"]) or (after["repeat"] != 1).any() or (after["weight"] != 1.0).any():
        raise AssertionError("balancing changed the test split")


def apply(dataset: Dataset, strategy: str, params: dict | None = None, name: str | None = None,
          on_progress=None, user: str | None = None) -> versions.Version:
    """Make the planned change a new version (the dataset itself is kept), recording `user` as who made it;
    fetching downloads or copies photos."""
    plan = preview(dataset, strategy, params)
    name = name or versions.default_name(strategy)
    base_key = versions.root_key(dataset)
    problem = versions.check_name(base_key, name)
    if problem:
        raise BalanceError(problem)
    frame = plan.frame
    fetched = strategy == "fetch" and plan.picks is not None and len(plan.picks) > 0
    if fetched:
        frame = _fetched_frame(plan, base_key, name, on_progress)
    try:
        return versions.create_version(dataset, frame, name, strategy, _json_params(plan.params), plan.weight_use,
                                       plan.dropped, user=user)
    except BaseException:
        if fetched:
            shutil.rmtree(versions.photos_dir(base_key, name), ignore_errors=True)
        raise


def _fetched_frame(plan: Plan, base_key: str, name: str, on_progress) -> pd.DataFrame:
    """Download/copy the picked photos into the version's own folder and index them into real rows."""
    final = versions.photos_dir(base_key, name)
    staging = final.with_name(f".{name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        plan.params["pool"].materialise(plan.picks[["name", "count"]], staging, on_progress=on_progress)
        staging.rename(final)
        added = ABID_FOLDER.index(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
        raise
    dataset = plan.dataset
    added = added[added["name"].isin(set(plan.picks["name"]))].copy()
    added["cls"] = dataset.class_range.assign(added["count"])
    added["split"] = added["name"].map(dict(zip(plan.picks["name"], plan.picks["split"])))
    added["split"] = added["split"].where(added["cls"].notna() & added["problem"].isna(), None)
    added["weight"], added["repeat"] = 1.0, 1
    base = plan.frame[plan.frame["label_source"] != "pending"]
    frame = pd.concat([base, added[[c for c in base.columns if c in added.columns]]], ignore_index=True)
    frame["cls"] = frame["cls"].astype("Int64")
    frame = reweight(frame, plan.weight_use)
    _check_test_untouched(base, frame)
    return frame


def _json_params(params: dict) -> dict:
    clean = {}
    for key, value in params.items():
        if isinstance(value, Pool):
            clean[key] = value.description
        elif isinstance(value, dict):
            clean[key] = {str(k): v for k, v in value.items()}
        else:
            clean[key] = value
    return clean
