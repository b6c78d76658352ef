"""The embeddings map: photos placed in 2-D by their frozen features (UMAP, t-SNE as fallback) so that photos that
look alike lie together; computed once per dataset, photos and recipe, kept under BINSIGHT_HOME."""
from __future__ import annotations

import hashlib
import io
import json
import time

import numpy as np
import pandas as pd

from core import config
from core.errors import BinsightError
from core.evaluation.label_issues import RECIPE, photo_features
from core.evaluation.predictions import photos_fingerprint
from core.files import atomic_write_bytes

MAP_VERSION = 1
PCA_DIMS = 50  # the features (thousands of numbers) are reduced to this many first: the map looks the same, faster
# Seeded, so the same photos give the same map (UMAP then runs on one thread).
UMAP_PARAMS = {"n_neighbors": 15, "min_dist": 0.1, "metric": "euclidean", "random_state": 0, "n_jobs": 1}
MIN_PHOTOS = 5
COLOURINGS = {"count": "Recorded count", "predicted": "Predicted count", "error": "Error size (objects)",
              "issue_score": "Label-issue score"}


class MapError(BinsightError):
    """The map cannot be drawn for these photos (too few, none readable); the message says why."""


def project(features: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """(n × 2 coordinates, method) of feature vectors: UMAP when the package is there, else t-SNE (scikit-learn)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    n = len(features)
    if n < MIN_PHOTOS:
        raise MapError(f"a map needs at least {MIN_PHOTOS} readable photos ({n} here)")
    scaled = StandardScaler().fit_transform(features)
    reduced = PCA(min(PCA_DIMS, n - 1, scaled.shape[1]), random_state=seed).fit_transform(scaled)
    try:
        import umap
    except ImportError:
        umap = None
    if umap is not None:
        params = UMAP_PARAMS | {"n_neighbors": min(UMAP_PARAMS["n_neighbors"], n - 1), "random_state": seed}
        # a small set has a disconnected neighbour graph, which spectral initialisation cannot place
        init = "spectral" if n > 4 * params["n_neighbors"] else "random"
        return umap.UMAP(n_components=2, init=init, **params).fit_transform(reduced), "UMAP"
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (n - 1) // 3)))
    return TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(reduced), "t-SNE"


def _digest(dataset_key: str, rows: pd.DataFrame, seed: int) -> str:
    described = {"version": MAP_VERSION, "dataset": dataset_key, "recipe": RECIPE, "umap": UMAP_PARAMS,
                 "pca": PCA_DIMS, "seed": seed,
                 "photos": photos_fingerprint(rows.loc[rows["path"].notna(), ["name", "path"]])}
    return hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _paths(dataset_key: str, digest: str):
    folder = config.home() / "embedding_maps" / dataset_key
    return folder / f"{digest}.parquet", folder / f"{digest}.json"


def cached_map(dataset_key: str, rows: pd.DataFrame, seed: int = 0) -> tuple[pd.DataFrame, dict] | None:
    """(name, x, y of each readable photo; info) when the map of exactly these photos (same files) was computed."""
    table, info_file = _paths(dataset_key, _digest(dataset_key, rows, seed))
    try:
        return pd.read_parquet(table), json.loads(info_file.read_text())
    except (OSError, ValueError):
        return None


def embedding_map(dataset_key: str, rows: pd.DataFrame, seed: int = 0, on_progress=None,
                  should_stop=None) -> tuple[pd.DataFrame, dict]:
    """(name, x, y; info) of `rows`' photos (name, path): cached, else from their frozen features (the label-issue
    recipe's, from the feature cache; each photo the mean of its views) projected to 2-D, then cached.
    Unreadable photos are left out (info['unreadable']). on_progress(fraction, text)."""
    found = cached_map(dataset_key, rows, seed)
    if found is not None:
        return found
    started = time.perf_counter()
    rows = rows[rows["path"].notna()].reset_index(drop=True)
    features, errors = photo_features(None, rows, on_progress, should_stop)
    readable = np.array([i not in errors for i in range(len(rows))], dtype=bool)
    feature_seconds = time.perf_counter() - started
    if on_progress:
        on_progress(0.9, f"Placing {int(readable.sum()):,} photos on the map")
    coordinates, method = project(features[readable].mean(1), seed)
    frame = pd.DataFrame({"name": rows.loc[readable, "name"].to_numpy(), "x": coordinates[:, 0].astype(float),
                          "y": coordinates[:, 1].astype(float)})
    info = {"method": method, "photos": len(frame), "unreadable": len(errors), "recipe": RECIPE, "seed": seed,
            "feature_seconds": round(feature_seconds, 1),
            "map_seconds": round(time.perf_counter() - started - feature_seconds, 1),
            "computed_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    table, info_file = _paths(dataset_key, _digest(dataset_key, rows, seed))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(table, buffer.getvalue())
    atomic_write_bytes(info_file, json.dumps(info).encode())
    if on_progress:
        on_progress(1.0, "Map ready")
    return frame, info


def coloured(points: pd.DataFrame, rows: pd.DataFrame, predictions: pd.DataFrame | None = None,
             issues: pd.DataFrame | None = None) -> pd.DataFrame:
    """The map's points with what they can be coloured by: count (the current label), split, predicted and
    error (from a predictions frame with name and predicted), issue_score (from a label-issues frame: name, score)."""
    label = "truth" if "truth" in rows and "cls" not in rows else "cls"
    keep = rows[["name", "path", label] + [c for c in ["split"] if c in rows]].rename(columns={label: "count"})
    frame = points.merge(keep, on="name", how="inner")
    frame["count"] = pd.to_numeric(frame["count"], errors="coerce")
    if predictions is not None and len(predictions):
        frame = frame.merge(predictions[["name", "predicted"]].drop_duplicates("name"), on="name", how="left")
        frame["predicted"] = pd.to_numeric(frame["predicted"], errors="coerce")
        frame["error"] = (frame["predicted"] - frame["count"]).abs()
    if issues is not None and len(issues):
        frame = frame.merge(issues[["name", "score"]].rename(columns={"score": "issue_score"}), on="name", how="left")
    return frame


def names_in_selection(event) -> list[str]:
    """The photo names (each point's customdata) selected on the map's chart event, in selection order."""
    try:
        points = event["selection"]["points"]
    except (KeyError, TypeError):
        return []
    names = []
    for point in points or []:
        custom = point.get("customdata")
        name = custom[0] if isinstance(custom, (list, tuple)) and custom else custom
        if isinstance(name, str) and name not in names:
            names.append(name)
    return names
