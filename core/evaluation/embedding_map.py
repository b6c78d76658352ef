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
from core.evaluation.label_issues import RECIPE, head_columns, photo_features
from core.evaluation.predictions import photos_fingerprint
from core.digests import frame_digest, remembered_digest, same_values
from core.files import atomic_write_bytes

MAP_VERSION = 1
PCA_DIMS = 50  # the features (thousands of numbers) are reduced to this many first: the map looks the same, faster
# Seeded, so the same photos give the same map (UMAP then runs on one thread).
UMAP_PARAMS = {"n_neighbors": 15, "min_dist": 0.1, "metric": "euclidean", "random_state": 0, "n_jobs": 1}
MIN_PHOTOS = 5
# Above SAMPLE_FIT photos the layout is fitted on a stratified sample; the rest go beside their nearest fitted photos.
SAMPLE_FIT = 50_000
PLACE_CHUNK = 25_000
# The browser is sent at most DRAWN_POINTS points (WebGL); the others show as a density layer of DENSITY_BINS² cells.
DRAWN_POINTS = 15_000
DENSITY_BINS = 150
COLOURINGS = {"count": "Recorded count", "predicted": "Predicted count", "error": "Error size (objects)",
              "issue_score": "Label-issue score"}


class MapError(BinsightError):
    """The map cannot be drawn for these photos (too few, none readable); the message says why."""


def project(features, seed: int = 0, strata=None, on_progress=None) -> tuple[np.ndarray, str]:
    """(n × 2 coordinates, method) of feature vectors (n × dim, or n × views × dim: each photo the mean of its views;
    in memory or memory-mapped): UMAP when the package is there, else t-SNE (scikit-learn). Above SAMPLE_FIT photos
    the layout is fitted on a sample stratified by `strata` (e.g. the counts) and the other photos are placed beside
    their nearest fitted photos, PLACE_CHUNK at a time: minutes at bucket scale, memory bounded by the sample (UMAP
    needs the package)."""
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    n = len(features)
    if n < MIN_PHOTOS:
        raise MapError(f"a map needs at least {MIN_PHOTOS} readable photos ({n} here)")
    if n > SAMPLE_FIT:
        return _project_sampled(features, seed, strata, on_progress)
    vectors = _vectors(features, np.arange(n))
    scaled = StandardScaler().fit_transform(vectors)
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


def _vectors(features, rows: np.ndarray) -> np.ndarray:
    """The feature vectors of `rows` (sorted positions), each photo the mean of its views."""
    part = np.asarray(features[rows], dtype=np.float32)
    return part.mean(1) if part.ndim == 3 else part


def fit_sample(n: int, strata=None, size: int | None = None, seed: int = 0) -> np.ndarray:
    """Sorted positions of `size` (default SAMPLE_FIT) of n photos, drawn at random (seeded) within each stratum in
    proportion to its size, so that rare counts are on the fitted map too."""
    from sklearn.model_selection import train_test_split

    size = size or SAMPLE_FIT
    if size >= n:
        return np.arange(n)
    labels = None if strata is None else pd.Series(np.asarray(strata)).fillna(-1).astype(str).to_numpy()
    if labels is not None and pd.Series(labels).value_counts().min() < 2:
        labels = None  # a stratum of one photo cannot be split
    chosen, _ = train_test_split(np.arange(n), train_size=size, stratify=labels, random_state=seed)
    return np.sort(chosen)


def _neighbour_search(fitted: np.ndarray, seed: int):
    """query(vectors) → (indices, distances) of each vector's nearest fitted photos. pynndescent's index (the kind UMAP
    builds itself from 4,096 photos up, compiled by then) answers ~10× faster than exact search, which at bucket scale
    is minutes; below that, exact search is instant and compiles nothing."""
    k = UMAP_PARAMS["n_neighbors"]
    if len(fitted) >= 4096:
        import pynndescent

        index = pynndescent.NNDescent(fitted, n_neighbors=k, random_state=seed, n_jobs=1)
        return lambda vectors: index.query(vectors.astype(np.float32), k=k)
    from sklearn.neighbors import NearestNeighbors

    exact = NearestNeighbors(n_neighbors=k).fit(fitted)
    return lambda vectors: exact.kneighbors(vectors)[::-1]


def _project_sampled(features, seed: int, strata, on_progress) -> tuple[np.ndarray, str]:
    import umap
    from sklearn.decomposition import PCA
    from sklearn.preprocessing import StandardScaler

    n = len(features)
    sample = fit_sample(n, strata, seed=seed)
    fitted = _vectors(features, sample)
    scaler = StandardScaler().fit(fitted)
    pca = PCA(min(PCA_DIMS, fitted.shape[1]), random_state=seed).fit(scaler.transform(fitted))
    if on_progress:
        on_progress(0.0, f"Fitting the map on {len(sample):,} of {n:,} photos")
    model = umap.UMAP(n_components=2, init="spectral", **(UMAP_PARAMS | {"random_state": seed}))
    fitted = pca.transform(scaler.transform(fitted)).astype(np.float32)
    coordinates = np.zeros((n, 2), dtype=np.float32)
    coordinates[sample] = model.fit_transform(fitted)
    # The other photos go where their nearest fitted neighbours are (weighted by closeness): UMAP's transform starts
    # from this very point, then optimises for ~2 minutes per 25 K photos, which at bucket scale would take an hour.
    nearest_of = _neighbour_search(fitted, seed)
    rest = np.setdiff1d(np.arange(n), sample)
    for start in range(0, len(rest), PLACE_CHUNK):
        part = rest[start:start + PLACE_CHUNK]
        if on_progress:
            on_progress(start / len(rest), f"Placing photos {len(sample) + start:,}/{n:,}")
        nearest, distances = nearest_of(pca.transform(scaler.transform(_vectors(features, part))))
        weights = 1.0 / (distances + 1e-6)
        coordinates[part] = (coordinates[sample][nearest] * weights[..., None]).sum(1) / weights.sum(1, keepdims=True)
    return coordinates, f"UMAP of a {len(sample):,}-photo sample, the others placed beside their nearest neighbours"


def _digest(dataset_key: str, rows: pd.DataFrame, seed: int, known_stamps: pd.Series | None = None) -> str:
    described = {"version": MAP_VERSION, "dataset": dataset_key, "recipe": RECIPE, "umap": UMAP_PARAMS,
                 "pca": PCA_DIMS, "seed": seed,
                 "photos": photos_fingerprint(rows.loc[rows["path"].notna(), ["name", "path"]], known_stamps)}
    return hashlib.sha1(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _map_digest(dataset_key: str, rows: pd.DataFrame, seed: int, known_stamps: pd.Series | None = None,
                files_fingerprint: str | None = None) -> str:
    """_digest of `rows`, remembered by the dataset's files fingerprint and the rows' names and paths: at 536 K
    photos the digest reads every photo's stamp (~1 s), the look-up hashes two columns (~0.1 s)."""
    if not files_fingerprint:
        return _digest(dataset_key, rows, seed, known_stamps)
    alias = frame_digest(MAP_VERSION, RECIPE, UMAP_PARAMS, PCA_DIMS, seed, files_fingerprint,
                         rows.loc[rows["path"].notna(), ["name", "path"]])
    return remembered_digest(config.home() / "embedding_maps" / f"{dataset_key}.digests", alias,
                             lambda: _digest(dataset_key, rows, seed, known_stamps))


def _paths(dataset_key: str, digest: str):
    folder = config.home() / "embedding_maps" / dataset_key
    return folder / f"{digest}.parquet", folder / f"{digest}.json"


def cached_map(dataset_key: str, rows: pd.DataFrame, seed: int = 0, known_stamps: pd.Series | None = None,
               files_fingerprint: str | None = None) -> tuple[pd.DataFrame, dict] | None:
    """(name, x, y of each readable photo; info) when the map of exactly these photos (same files) was computed.
    known_stamps: the files' stamps as the dataset's loading read them (Dataset.stamps), else each is stat'ed;
    files_fingerprint: the dataset's (Dataset.files_fingerprint), when `rows` are its photos."""
    table, info_file = _paths(dataset_key, _map_digest(dataset_key, rows, seed, known_stamps, files_fingerprint))
    try:
        return pd.read_parquet(table), json.loads(info_file.read_text())
    except (OSError, ValueError):
        return None


def embedding_map(dataset_key: str, rows: pd.DataFrame, seed: int = 0, on_progress=None,
                  should_stop=None, known_stamps: pd.Series | None = None,
                  files_fingerprint: str | None = None) -> tuple[pd.DataFrame, dict]:
    """(name, x, y; info) of `rows`' photos (name, path): cached, else from their frozen features (the label-issue
    recipe's columns, from the feature cache; each photo the mean of its views) projected to 2-D, then cached.
    Unreadable photos are left out (info['unreadable']). on_progress(fraction, text)."""
    found = cached_map(dataset_key, rows, seed, known_stamps, files_fingerprint)
    if found is not None:
        return found
    started = time.perf_counter()
    rows = rows[rows["path"].notna()].reset_index(drop=True)
    features, errors = photo_features(None, rows, on_progress, should_stop, columns=head_columns())
    readable = np.array([i not in errors for i in range(len(rows))], dtype=bool)
    feature_seconds = time.perf_counter() - started
    if on_progress:
        on_progress(0.9, f"Placing {int(readable.sum()):,} photos on the map")
    label = "truth" if "truth" in rows and "cls" not in rows else "cls"
    strata = rows.loc[readable, label].to_numpy() if label in rows else None
    coordinates, method = project(features[readable].mean(1), seed, strata, on_progress=lambda f, text: (
        on_progress(0.9 + 0.1 * f, text) if on_progress else None))
    frame = pd.DataFrame({"name": rows.loc[readable, "name"].to_numpy(), "x": coordinates[:, 0].astype(float),
                          "y": coordinates[:, 1].astype(float)})
    info = {"method": method, "photos": len(frame), "unreadable": len(errors), "recipe": RECIPE, "seed": seed,
            "feature_seconds": round(feature_seconds, 1),
            "map_seconds": round(time.perf_counter() - started - feature_seconds, 1),
            "computed_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    table, info_file = _paths(dataset_key, _map_digest(dataset_key, rows, seed, known_stamps, files_fingerprint))
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
    frame = _joined(points, keep, how="inner")
    frame["count"] = pd.to_numeric(frame["count"], errors="coerce")
    if predictions is not None and len(predictions):
        frame = _joined(frame, predictions[["name", "predicted"]].drop_duplicates("name"), how="left")
        frame["predicted"] = pd.to_numeric(frame["predicted"], errors="coerce")
        frame["error"] = (frame["predicted"] - frame["count"]).abs()
    if issues is not None and len(issues):
        frame = _joined(frame, issues[["name", "score"]].rename(columns={"score": "issue_score"}), how="left")
    return frame


def _joined(left: pd.DataFrame, right: pd.DataFrame, how: str) -> pd.DataFrame:
    """left.merge(right, on="name", how=how); when both list the same photos in the same order (a map of every
    labelled photo and its rows), the columns are taken by position (a join of 351 K names takes ~0.4 s)."""
    if same_values(left["name"], right["name"]):
        added = right.drop(columns="name").reset_index(drop=True)
        return pd.concat([left.reset_index(drop=True), added], axis=1)
    return left.merge(right, on="name", how=how)


def map_view(frame: pd.DataFrame, colour: str, limit: int = DRAWN_POINTS,
             bins: int = DENSITY_BINS) -> tuple[pd.DataFrame, dict | None]:
    """What the browser is sent of a map: (points to draw, density layer). Up to `limit` points are all drawn and
    there is no density layer; above, the points drawn are the highest fifth by `colour` when it flags trouble (error,
    issue score) and the rest a seeded random sample (the same on every render), and the density layer ({x, y, z}:
    bin centres and photos per bin, None for empty bins) shows where all of them lie."""
    if len(frame) <= limit:
        return frame, None
    order = np.random.default_rng(0).permutation(len(frame))
    first = []
    if colour in ("error", "issue_score") and colour in frame:
        first = frame[colour].to_numpy(float)
        first = np.argsort(-np.nan_to_num(first, nan=-np.inf), kind="stable")[:limit // 5]
    picked = np.unique(np.r_[first, order[~np.isin(order, first)][:limit - len(first)]].astype(int))
    counts, x_edges, y_edges = np.histogram2d(frame["x"], frame["y"], bins=bins)
    density = {"x": (x_edges[:-1] + x_edges[1:]) / 2, "y": (y_edges[:-1] + y_edges[1:]) / 2,
               "z": np.where(counts.T > 0, counts.T, np.nan)}
    return frame.iloc[picked], density


def names_in_region(points: pd.DataFrame, event) -> list[str]:
    """Every photo inside the chart event's boxes and lassos, drawn or not (a bucket-scale map draws only some), then
    the photos clicked, in the map's order; the names of the selected points when the event has no region."""
    try:
        selection = event["selection"]
    except (KeyError, TypeError):
        return []
    xy = points[["x", "y"]].to_numpy(float)
    inside = np.zeros(len(points), dtype=bool)
    for box in selection.get("box") or []:
        (x0, x1), (y0, y1) = sorted(box["x"][:2]), sorted(box["y"][:2])
        inside |= (xy[:, 0] >= x0) & (xy[:, 0] <= x1) & (xy[:, 1] >= y0) & (xy[:, 1] <= y1)
    for lasso in selection.get("lasso") or []:
        from matplotlib.path import Path

        inside |= Path(np.c_[lasso["x"], lasso["y"]]).contains_points(xy)
    names = list(points["name"].to_numpy()[inside])
    seen = set(names)
    return names + [name for name in names_in_selection(event) if name not in seen]


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
