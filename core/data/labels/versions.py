"""Dataset versions: a manifest parquet of the dataset's rows (+ weight, repeat) that loads like a dataset."""
from __future__ import annotations

import io
import json
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core import config
from core.data.classes import ClassRange
from core.data.dataset import Dataset, DatasetError
from core.files import atomic_write_bytes

MANIFEST_SUFFIX = ".parquet"
INFO_KEY = b"binsight.version"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
WEIGHT_USES = (None, "sampler", "loss")


@dataclass
class Version:
    """A saved version: its manifest file, and what made it (strategy, params, parent, per-split counts)."""

    name: str
    path: Path
    info: dict

    @property
    def created(self) -> str:
        return self.info.get("created", "")

    @property
    def strategy(self) -> str:
        return self.info.get("strategy", "")

    @property
    def user(self) -> str:
        """Who made it ("" for versions saved before this was recorded)."""
        return self.info.get("user") or ""


def versions_dir(base_key: str) -> Path:
    return config.home() / "datasets" / base_key / "versions"


def photos_dir(base_key: str, name: str) -> Path:
    """Where a version keeps the photos it added (ABID layout), next to its manifest."""
    return versions_dir(base_key) / name


def is_manifest(path: str | Path) -> bool:
    return Path(path).suffix == MANIFEST_SUFFIX


def root_key(dataset: Dataset) -> str:
    """The key of the original dataset a version descends from (the dataset's own key for a folder)."""
    return dataset.split_info.get("base_key") or dataset.key


def check_name(base_key: str, name: str) -> str | None:
    """Why `name` cannot be a new version's name, or None when it can."""
    if not NAME_PATTERN.match(name or ""):
        return "a version name is 1–64 letters, digits, dots, dashes or underscores, starting with a letter or digit"
    if (versions_dir(base_key) / f"{name}{MANIFEST_SUFFIX}").exists() or photos_dir(base_key, name).exists():
        return f"a version called {name!r} already exists (versions are never overwritten)"
    return None


def default_name(strategy: str) -> str:
    return f"{strategy}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def version_frame(dataset: Dataset) -> pd.DataFrame:
    """The dataset's frame with `weight` (1.0) and `repeat` (1) columns, as a version stores it."""
    frame = dataset.frame.copy()
    if "weight" not in frame:
        frame["weight"] = 1.0
    if "repeat" not in frame:
        frame["repeat"] = 1
    frame["weight"] = frame["weight"].astype("float64")
    frame["repeat"] = frame["repeat"].astype("int64")
    return frame


def create_version(dataset: Dataset, frame: pd.DataFrame, name: str, strategy: str, params: dict,
                   weight_use: str | None = None, dropped: list[str] | None = None,
                   user: str | None = None) -> Version:
    """Save `frame` (the dataset's rows after balancing) as a new version of the dataset's original, made by `user`."""
    base_key = root_key(dataset)
    path = versions_dir(base_key) / f"{name}{MANIFEST_SUFFIX}"
    if not NAME_PATTERN.match(name or "") or path.exists():
        # the photos folder may exist already: balancing fetches into it before saving the manifest
        raise DatasetError(check_name(base_key, name) or f"{name!r} cannot be a version name")
    if weight_use not in WEIGHT_USES:
        raise DatasetError(f"weight_use must be one of {WEIGHT_USES}")
    parent_info = dataset.split_info if dataset.version else {}
    usable = frame[frame["cls"].notna() & frame["problem"].isna() & frame["split"].notna()]
    info = {
        "name": name,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "strategy": strategy,
        "user": (user or "").strip() or None,
        "params": params,
        "parent": parent_info.get("version"),
        "base_key": base_key,
        "base_source": parent_info.get("base_source") or str(dataset.source),
        "class_range": dataset.class_range.to_dict(),
        "split_info": {k: v for k, v in dataset.split_info.items() if k not in _VERSION_KEYS},
        "weight_use": weight_use,
        "dropped": sorted(set(parent_info.get("dropped") or []) | set(dropped or [])),
        "photos": {split: int(n) for split, n in usable.groupby("split").size().items()},
    }
    frame = _like(frame.reset_index(drop=True), dataset.frame)
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[INFO_KEY] = json.dumps(info, default=str).encode()
    buffer = io.BytesIO()
    pq.write_table(table.replace_schema_metadata(metadata), buffer)
    atomic_write_bytes(path, buffer.getvalue())
    return Version(name, path, info)


def _like(frame: pd.DataFrame, model: pd.DataFrame) -> pd.DataFrame:
    """Give `frame` the column types of the dataset it came from (concatenating rows can widen them)."""
    for column, dtype in model.dtypes.items():
        if column in frame and frame[column].dtype != dtype:
            try:
                frame[column] = frame[column].astype(dtype)
            except (TypeError, ValueError):
                pass
    return frame


_VERSION_KEYS = {"source", "version", "base_key", "base_source", "weight_use", "strategy", "dropped", "parent"}


def read_info(path: str | Path) -> dict:
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowException) as exc:
        raise DatasetError(f"{Path(path).name}: not a readable dataset version ({exc})") from None
    if INFO_KEY not in metadata:
        raise DatasetError(f"{Path(path).name}: a parquet file, but not a Binsight dataset version")
    try:
        info = json.loads(metadata[INFO_KEY])
    except (ValueError, RecursionError):
        info = None
    problem = _info_problem(info)
    if problem:
        raise DatasetError(f"{Path(path).name}: a damaged dataset version ({problem})")
    return info


_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
FRAME_COLUMNS = ("name", "path", "count", "problem", "split")


def _info_problem(info) -> str | None:
    """What makes a version's description unusable, or None."""
    if not isinstance(info, dict):
        return "its description is not a JSON object"
    if not isinstance(info.get("name"), str) or not _KEY_PATTERN.match(str(info.get("base_key") or "")):
        return "no name or dataset key"
    if not isinstance(info.get("created", ""), str) or not isinstance(info.get("strategy", ""), str):
        return "its date or strategy is not text"
    if not isinstance(info.get("split_info", {}), dict) or not isinstance(info.get("dropped", []), list):
        return "its split or dropped photos are not readable"
    if info.get("weight_use") not in WEIGHT_USES:
        return f"weight use {info.get('weight_use')!r} is not one of {WEIGHT_USES}"
    try:
        if ClassRange.from_dict(info.get("class_range")).hi > 1000:
            raise ValueError
    except (TypeError, ValueError, AttributeError, OverflowError):
        return f"class range {str(info.get('class_range'))[:60]} is not a range of counts"
    return None


def frame_problem(frame: pd.DataFrame) -> str | None:
    """What makes a version's rows unusable, or None; `count` is made Int64 on the way."""
    missing = [c for c in FRAME_COLUMNS if c not in frame]
    if missing:
        return f"no column {', '.join(missing)}"
    try:
        frame["count"] = frame["count"].astype("Int64")
    except (TypeError, ValueError, OverflowError):
        return "its counts are not whole numbers"
    for column in ("name", "path", "problem", "split"):
        if not frame[column].map(lambda v: v is None or isinstance(v, str) or v != v).all():
            return f"its {column} column is not text"
    for column in ("weight", "repeat"):
        if column in frame and not pd.api.types.is_numeric_dtype(frame[column]):
            return f"its {column} column is not numbers"
    return None


def list_versions(dataset_or_key: Dataset | str) -> list[Version]:
    """The versions made from a dataset (or from its original, when it is a version), oldest first."""
    key = dataset_or_key if isinstance(dataset_or_key, str) else root_key(dataset_or_key)
    found = []
    for path in sorted(versions_dir(key).glob(f"*{MANIFEST_SUFFIX}")):
        try:
            info = read_info(path)
        except DatasetError:
            continue
        found.append(Version(path.stem, path, info))
    return sorted(found, key=lambda v: (v.created, v.path.stat().st_mtime_ns))


def delete_version(version: Version) -> None:
    """Remove a version's manifest and the photos it added (other versions are untouched)."""
    version.path.unlink(missing_ok=True)
    shutil.rmtree(version.path.with_suffix(""), ignore_errors=True)


# -- for training: how a version's weight and repeat columns are meant to be used ---------------------

def training_rows(dataset: Dataset, split: str = "train") -> pd.DataFrame:
    """The split's rows, each repeated `repeat` times (oversampling); plain rows for a folder dataset."""
    rows = dataset.rows(split)
    if "repeat" not in rows:
        return rows
    return rows.loc[rows.index.repeat(rows["repeat"].clip(lower=0).astype(int))]


def recommended_balance(dataset: Dataset) -> str:
    """The TrainConfig.balance a version asks for: 'sampler', 'weights' (class-weighted loss) or 'none'."""
    return {"sampler": "sampler", "loss": "weights"}.get(dataset.split_info.get("weight_use"), "none")


def class_weights(dataset: Dataset) -> dict[int, float] | None:
    """Per-class weights a version stores for its train split (sampler or loss), or None."""
    if not dataset.split_info.get("weight_use") or "weight" not in dataset.frame:
        return None
    rows = dataset.rows("train")
    return {int(c): float(w) for c, w in rows.groupby("cls")["weight"].first().items()}
