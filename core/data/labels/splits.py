"""Stratified, seeded train/valid/test split, saved with the dataset so every run uses the same one."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd

from core import config
from core.digests import same_values
from core.files import atomic_write_bytes, atomic_write_json

DEFAULT_RECIPE = {"test_per_class": 100, "valid_fraction": 0.2, "seed": 0}
MAX_TEST_FRACTION = 0.2


def _folder(key: str):
    return config.home() / "datasets" / key


def make_split(frame: pd.DataFrame, test_per_class: int = 100, valid_fraction: float = 0.2,
               seed: int = 0) -> tuple[pd.Series, dict]:
    """Per class: `test_per_class` test photos (at most a fifth of the class), the rest train/valid stratified."""
    rng = np.random.default_rng(seed)
    split = pd.Series(index=frame.index, dtype=object)
    short = {}
    for cls, group in frame.groupby("cls", sort=True):
        order = rng.permutation(group.index.to_numpy())
        n_test = min(test_per_class, int(len(order) * MAX_TEST_FRACTION))
        if n_test < test_per_class:
            short[int(cls)] = n_test
        rest = order[n_test:]
        n_valid = int(round(len(rest) * valid_fraction))
        split[order[:n_test]] = "test"
        split[rest[:n_valid]] = "valid"
        split[rest[n_valid:]] = "train"
    info = {"test_per_class": test_per_class, "valid_fraction": valid_fraction, "seed": seed, "short_test": short}
    return split, info


def save_split(key: str, names: pd.Series, split: pd.Series, info: dict) -> None:
    folder = _folder(key)
    table = pd.DataFrame({"name": names.to_numpy(), "split": split.to_numpy()})
    atomic_write_bytes(folder / "split.parquet", table.to_parquet(index=False))
    atomic_write_json(folder / "split.json", info)


def load_split(key: str) -> tuple[pd.Series, dict] | None:
    """The saved split (a Series of split by photo name) and its recipe, or None when there is none."""
    folder = _folder(key)
    try:
        table = pd.read_parquet(folder / "split.parquet")
        info = json.loads((folder / "split.json").read_text())
    except (OSError, ValueError):
        return None
    return table.set_index("name")["split"], info


def attach_split(frame: pd.DataFrame, key: str, class_range) -> tuple[pd.DataFrame, dict]:
    """Add the `split` column: folder splits when the layout has them, else the saved split (made once)."""
    frame = frame.copy()
    usable = frame["cls"].notna() & frame["problem"].isna()
    if frame["folder_split"].notna().any():
        frame["split"] = frame["folder_split"].where(usable, None)
        return frame, {"source": "folders"}
    saved = load_split(key)
    if saved is None:
        return resplit(frame, key)
    assigned, info = saved
    if same_values(frame.loc[usable, "name"], assigned.index.to_series()):
        # the saved split lists exactly the usable photos in their order (it is saved so): taken by position, where
        # matching 536 K names takes ~0.7 s on every relabel
        frame["split"] = None
        frame.loc[usable, "split"] = assigned.to_numpy(dtype=object)
    else:
        frame["split"] = frame["name"].map(assigned).where(usable, None)
    missing = usable & frame["split"].isna()
    if missing.any():
        # Photos new since the split (or newly in range) join train/valid only, so the test set never changes.
        extra, _ = make_split(frame[missing], test_per_class=0, valid_fraction=info.get("valid_fraction", 0.2),
                              seed=info.get("seed", 0))
        frame.loc[missing, "split"] = extra
        save_split(key, frame.loc[usable, "name"], frame.loc[usable, "split"], info)
    return frame, {**info, "source": "saved"}


def resplit(frame: pd.DataFrame, key: str, test_per_class: int = 100, valid_fraction: float = 0.2,
            seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Make a new split for the usable in-range photos and save it (the explicit re-split action)."""
    frame = frame.copy()
    usable = frame["cls"].notna() & frame["problem"].isna()
    split, info = make_split(frame[usable], test_per_class, valid_fraction, seed)
    frame["split"] = None
    frame.loc[usable, "split"] = split
    save_split(key, frame.loc[usable, "name"], frame.loc[usable, "split"], info)
    return frame, {**info, "source": "saved"}
