"""The one prediction store of a model: each photo's class probabilities (or error), predicted once and kept."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from core import config, storage
from core.files import atomic_write_bytes, file_stamps

STORE_VERSION = 2  # 2: raw_<count> columns, the probabilities at temperature 1
KEY_COLUMNS = ["name", "path", "size", "mtime_ns"]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._")[:60] or "x"


def model_fingerprint(model_path: str | Path) -> str:
    """Changes when the model file is replaced (retrained into the same folder)."""
    model_path = Path(model_path).resolve()
    stat = model_path.stat()
    return hashlib.sha1(f"{model_path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


def photo_stamps(paths) -> tuple[list[int], list[int]]:
    """(sizes, modification times in ns) of the photo files; -1 for a file that cannot be read."""
    parts = [stamp.split(":") if stamp else ("-1", "-1") for stamp in file_stamps(paths)]
    return [int(size) for size, _ in parts], [int(mtime) for _, mtime in parts]


def photos_fingerprint(rows: pd.DataFrame, known_stamps: pd.Series | None = None) -> str:
    """The version of a set of photos: their names, paths, sizes and modification times. known_stamps: the files'
    stamps as the dataset's loading read them (Dataset.stamps), else each file is stat'ed."""
    import pyarrow as pa
    import pyarrow.compute as pc

    stamps = [f"{stamp or '-1:-1'}\n".encode() for stamp in file_stamps(rows["path"], known_stamps)]
    # each row "name\0path\0size:mtime\n", joined by Arrow: the bytes are its binary array's data buffer
    lines = pc.binary_join_element_wise(_as_bytes(rows["name"]), _as_bytes(rows["path"]),
                                        pa.array(stamps, pa.large_binary()), pa.scalar(b"\0", pa.large_binary()))
    digest = hashlib.sha1(f"v{STORE_VERSION}".encode())
    if len(lines):
        offsets = np.frombuffer(lines.buffers()[1], np.int64)[lines.offset:lines.offset + len(lines) + 1]
        digest.update(memoryview(lines.buffers()[2])[offsets[0]:offsets[-1]])
    return digest.hexdigest()[:16]


def _as_bytes(column: pd.Series):
    """A column as an Arrow large_binary array of the UTF-8 of str(value) of each value (a text column without gaps
    as it is; a file name that is not valid UTF-8 keeps its own bytes)."""
    import pyarrow as pa

    if column.dtype != object and pd.api.types.is_string_dtype(column.dtype) and not column.isna().any():
        array = pa.array(column)
        array = array.combine_chunks() if isinstance(array, pa.ChunkedArray) else array
        return array.cast(pa.large_string()).cast(pa.large_binary())
    return pa.array([str(value).encode("utf-8", "surrogateescape") for value in column], pa.large_binary())


def probability_columns(frame: pd.DataFrame) -> list[str]:
    """The prob_<count> columns of a predictions frame, in count order."""
    return sorted((c for c in frame.columns if c.startswith("prob_")), key=lambda c: int(c.split("_", 1)[1]))


def _keyed(rows: pd.DataFrame) -> pd.DataFrame:
    """name and path of `rows` (those with a file) with the size and time that identify the photo's version."""
    keyed = rows.loc[rows["path"].notna(), ["name", "path"]].astype({"name": str, "path": str}).reset_index(drop=True)
    keyed["size"], keyed["mtime_ns"] = photo_stamps(keyed["path"])
    return keyed.astype({"size": "int64", "mtime_ns": "int64"})


class PredictionStore:
    """A model's outputs per photo (keyed by name, path, size and modification time) as parquet in
    BINSIGHT_HOME/predictions/<run>-<model fingerprint>/.

    A photo is predicted once per version of the photo and of the model file; every page and command that
    needs this model's predictions (Evaluate, spot-check, `python -m core evaluate`) reads them here.
    """

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        run = self.model_path.resolve().parent.name
        self.folder = config.home() / "predictions" / f"{_slug(run)}-{model_fingerprint(self.model_path)}"
        self.file = self.folder / f"outputs-v{STORE_VERSION}.parquet"

    def _read(self) -> pd.DataFrame:
        try:
            frame = pd.read_parquet(self.file)
            storage.touch(self.file)  # used: the least recently used predictions go first when over the cap
            return frame
        except (OSError, ValueError):
            return pd.DataFrame(columns=KEY_COLUMNS + ["predicted", "confidence", "error"])

    def _joined(self, rows: pd.DataFrame) -> pd.DataFrame:
        """`rows`' keys (in order) with the stored outputs of each photo's current version (NaN when none)."""
        stored = self._read().drop_duplicates(KEY_COLUMNS, keep="last")
        return _keyed(rows).merge(stored.astype({"size": "int64", "mtime_ns": "int64"}), on=KEY_COLUMNS, how="left",
                                  indicator="_stored")

    def missing(self, rows: pd.DataFrame) -> pd.DataFrame:
        """name and path of the photos of `rows` this model has not predicted yet (in their current version)."""
        joined = self._joined(rows)
        return joined.loc[joined["_stored"] == "left_only", ["name", "path"]].reset_index(drop=True)

    def stored(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The stored outputs of the photos of `rows` already predicted: name, path, predicted, confidence,
        prob_<count>…, error; photos not predicted yet are left out."""
        joined = self._joined(rows)
        return _outputs(joined[joined["_stored"] == "both"])

    def predict(self, rows: pd.DataFrame, load_model: Callable[[], tuple],
                on_progress: Callable[[dict], None] | None = None, chunk: int = 256) -> pd.DataFrame:
        """The outputs for the photos of `rows` (in order; those without a file are left out).

        Only photos not stored yet are predicted, `chunk` at a time; each chunk is saved as soon as it is
        done, so an interrupted prediction resumes where it stopped. `load_model` is called only when
        something is left to predict. Progress: {done, total, fraction, message} over the photos to predict.
        """
        from core.models.inference import predict_photos

        todo = self.missing(rows)
        loaded = None
        for start in range(0, len(todo), chunk):
            part = todo.iloc[start:start + chunk]
            if loaded is None:
                loaded = load_model()
            model, meta = loaded

            def report(info: dict, start=start) -> None:
                done = start + int(info.get("done", 0))
                on_progress({"done": done, "total": len(todo), "fraction": done / len(todo),
                             "message": f"Predicting photo {done:,}/{len(todo):,}"})

            predicted = predict_photos(model, meta, part["path"].tolist(), on_progress=report if on_progress else None,
                                       with_uncalibrated=True)
            if len(predicted) != len(part):
                raise RuntimeError(f"predict_photos returned {len(predicted)} rows for {len(part)} photos")
            batch = predicted.reset_index(drop=True).drop(columns=["photo", "path"])  # same order as the paths
            # A photo with neither probabilities nor an error was not predicted (a broken model state): it is not
            # stored as if it had been, so the next call predicts it again.
            unscored = batch["predicted"].isna() & batch["error"].isna()
            if unscored.any():
                raise RuntimeError(f"the model gave no probabilities for {int(unscored.sum())} of {len(part)} photos "
                                   "(not a number); nothing of this batch was stored")
            batch.insert(0, "name", part["name"].to_numpy())
            batch.insert(1, "path", part["path"].to_numpy())
            self._save(batch)
        return self.stored(rows)

    def keep(self, rows: pd.DataFrame, probs: np.ndarray, raw: np.ndarray, classes: list[int]) -> None:
        """Store this model's outputs computed elsewhere for `rows`' photos (name, path; in order): `probs`
        calibrated, `raw` at temperature 1, as predict() stores them. A training keeps its test split's this way."""
        from core.models.inference import predictions_frame

        frame = predictions_frame(rows["path"].tolist(), probs, {}, classes).drop(columns=["photo", "path"])
        for column, count in enumerate(classes):
            frame[f"raw_{int(count)}"] = raw[:, column]
        frame.insert(0, "name", rows["name"].astype(str).to_numpy())
        frame.insert(1, "path", rows["path"].astype(str).to_numpy())
        self._save(frame)

    def _save(self, batch: pd.DataFrame) -> None:
        """Add a chunk's outputs; an older version of the same photo (name and path) is dropped."""
        batch = _keyed(batch).merge(batch, on=["name", "path"])
        stored = self._read()
        stored = stored[~stored.set_index(["name", "path"]).index.isin(batch.set_index(["name", "path"]).index)]
        frame = pd.concat([stored, batch], ignore_index=True) if len(stored) else batch
        atomic_write_bytes(self.file, _outputs(frame, keys=True).to_parquet(index=False))
        storage.prune_after_write("predictions")


def _outputs(frame: pd.DataFrame, keys: bool = False) -> pd.DataFrame:
    columns = (KEY_COLUMNS if keys else ["name", "path"]) + ["predicted", "confidence"]
    raw = sorted((c for c in frame.columns if c.startswith("raw_")), key=lambda c: int(c.split("_", 1)[1]))
    frame = frame[columns + probability_columns(frame) + raw + ["error"]].reset_index(drop=True)
    return frame.astype({"predicted": "Int64", "confidence": float}).assign(
        error=frame["error"].astype(object).where(frame["error"].notna(), None))

