"""Likely wrong counts: out-of-fold probabilities for every labelled photo (heads cross-fitted on cached frozen-backbone
features), ranked count-aware, flagged with cleanlab's confident learning, and the estimated noise matrix."""
from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from core import config
from core.errors import BinsightError, Cancelled
from core.digests import frame_digest, remembered_digest, same_values
from core.files import atomic_write_bytes, atomic_write_json

ISSUES_VERSION = 1
DEFAULT_FOLDS = 5
# Frozen Lite0 read at its stride-16 and stride-32 stages (where counting lives), at the bins' shape, photo and mirror:
# a frozen training with these settings (--features multilevel --image-size 288 --aspect 1.37 --tta hflip) reuses them.
# The heads read three of its four parts: with the stride-32 grid left out they find injected far flips as well or
# better (bench/label_noise.py, 2 seeds) and cross-fit 4–20× faster.
RECIPE = {"backbone": "efficientnet_lite0", "features": "multilevel", "image_size": 288, "aspect": 1.37,
          "views": ["plain", "hflip"], "C": 0.003,
          "parts": [["stride16", "mean"], ["stride16", "grid2"], ["stride32", "mean"]]}
# A photo is flagged when cleanlab finds its label unlikely AND the probabilities put the count at least this far from
# its label on average (in objects). On ABID, where heads on frozen features reach ~38 % balanced accuracy, cleanlab
# alone doubts half the labels (the heads' own errors) and an expected error of one object 40 %; of two, 7 %: a
# spot-check list, not a verdict.
MIN_FLAGGED_SCORE = 2.0
# Bounds that keep cross-fitting's memory flat at bucket scale (536 K photos): each head trains on a stratified sample
# of at most FIT_SAMPLE photos of its folds (every photo below that, as on ABID's few thousand), and photos are read
# and predicted CHUNK_PHOTOS at a time. bench/bucket_scale.py measures both.
FIT_SAMPLE = 40_000
CHUNK_PHOTOS = 8_192


class LabelIssuesError(BinsightError):
    """Label issues cannot be found for this dataset (too few photos, no photo files); the message says why."""


@dataclass
class LabelIssues:
    """One row per labelled photo: name, split, label, suggested, score, quality, flagged, prob_<count>…

    score: the expected distance in objects between the label and the count, under out-of-fold probabilities (0: sure
    the label is right; 2: it is likely two off). quality: cleanlab's label quality (self-confidence, 0–1). noise:
    given label × true count, the estimated share of photos with that label whose true count is that (rows sum to 1).
    """

    frame: pd.DataFrame
    classes: list[int]
    noise: np.ndarray
    info: dict = field(default_factory=dict)

    def ranked(self) -> pd.DataFrame:
        """Every photo, flagged ones first, each group by score (most likely wrong first)."""
        return self.frame.sort_values(["flagged", "score", "name"], ascending=[False, False, True], kind="stable")

    def flagged(self) -> pd.DataFrame:
        """ranked()'s flagged rows, in its order: only they are sorted (not every photo)."""
        flagged = self.frame[self.frame["flagged"]]
        return flagged.sort_values(["score", "name"], ascending=[False, True], kind="stable")

    def per_class(self) -> pd.DataFrame:
        """Per recorded count: photos, flagged photos and their share."""
        table = self.frame.groupby("label").agg(photos=("name", "size"), flagged=("flagged", "sum")).reset_index()
        table["share flagged"] = table["flagged"] / table["photos"]
        return table

    def noise_frame(self) -> pd.DataFrame:
        labels = [str(c) for c in self.classes]
        return pd.DataFrame(self.noise, index=pd.Index(labels, name="recorded count"),
                            columns=pd.Index(labels, name="likely true count"))

    def probabilities(self) -> np.ndarray:
        return self.frame[[f"prob_{c}" for c in self.classes]].to_numpy(float)


# ---------------------------------------------------------------------------------------------- the pieces

def count_scores(probs: np.ndarray, labels: np.ndarray, classes: list[int]) -> np.ndarray:
    """Expected absolute count error of each photo's label: Σ_k p_k |count_k − label| (labels are class indices).
    Ranks "labelled 2, surely 4" above a ±1 doubt, which a class-agnostic score cannot."""
    counts = np.asarray(classes, dtype=float)
    return (probs * np.abs(counts[None, :] - counts[labels][:, None])).sum(1)


def cross_fit(features: np.ndarray, labels: np.ndarray, fit_on: np.ndarray, folds: int = DEFAULT_FOLDS, seed: int = 0,
              c: float = RECIPE["C"], n_classes: int | None = None, on_fold=None, fit_sample: int = FIT_SAMPLE,
              chunk: int = CHUNK_PHOTOS) -> np.ndarray:
    """Out-of-fold class probabilities (n × classes) from standardised logistic-regression heads.

    `features` is n × views × dim (each photo seen in each of its views; a head trains on every view and its
    prediction averages them), in memory or memory-mapped (np.load(..., mmap_mode="r")). Photos in `fit_on` are split
    into stratified, seeded folds, each predicted by the head fitted on the other folds; the others (e.g. the test
    split) get the mean of the fold heads, none of which saw them. Memory stays bounded at any size: a head trains on
    at most `fit_sample` photos of its folds (a stratified, seeded sample; all of them below that) and photos are
    read and predicted `chunk` at a time.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n, views, dim = features.shape
    n_classes = n_classes or int(labels.max()) + 1
    fit_index = np.flatnonzero(fit_on)
    rest = np.flatnonzero(~fit_on)
    smallest = np.bincount(labels[fit_index], minlength=n_classes).min()
    if len(fit_index) < 2 * folds or smallest < folds:
        raise LabelIssuesError(f"cross-fitting {folds} folds needs at least {folds} photos of every count outside the "
                               f"test split (the smallest count has {smallest})")
    probs = np.zeros((n, n_classes))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for fold, (train, held) in enumerate(splitter.split(fit_index, labels[fit_index])):
        train, held = fit_index[train], fit_index[held]
        if len(train) > fit_sample:
            train, _ = train_test_split(train, train_size=fit_sample, stratify=labels[train], random_state=seed + fold)
            train = np.sort(train)  # in file order: a memory map reads it front to back
        head = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=3000, class_weight="balanced"))
        head.fit(np.asarray(features[train]).reshape(-1, dim), np.repeat(labels[train], views))
        for rows, weight in ((held, 1.0), (rest, 1.0 / folds)):
            for start in range(0, len(rows), chunk):
                part = rows[start:start + chunk]
                seen = head.predict_proba(np.asarray(features[part]).reshape(-1, dim))
                full = np.zeros((len(seen), n_classes))
                full[:, head.classes_] = seen
                probs[part] += weight * full.reshape(len(part), views, n_classes).mean(1)
        if on_fold:
            on_fold(fold + 1, folds)
    return probs


def rank_issues(probs: np.ndarray, labels: np.ndarray, classes: list[int]) -> tuple[pd.DataFrame, np.ndarray]:
    """Per photo (score, quality, suggested, flagged) and the noise matrix (given × true), by cleanlab."""
    from cleanlab.count import compute_confident_joint, estimate_latent
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    score = count_scores(probs, labels, classes)
    # n_jobs=1: cleanlab's default forks a pool, which can deadlock in a process with threads (the app's server,
    # where the check also re-runs in the background); one process is quick at this size.
    doubted = find_label_issues(labels, probs, filter_by="prune_by_noise_rate", n_jobs=1)
    _, _, inverse_noise = estimate_latent(compute_confident_joint(labels, probs), labels)
    per_photo = pd.DataFrame({
        "label": np.asarray(classes)[labels], "suggested": np.asarray(classes)[probs.argmax(1)], "score": score,
        "quality": get_label_quality_scores(labels, probs), "flagged": doubted & (score >= MIN_FLAGGED_SCORE),
    })
    return per_photo, inverse_noise.T  # cleanlab's is P(true | given) as [true, given]


# ---------------------------------------------------------------------------------------------- on a dataset

def _labelled_rows(dataset) -> pd.DataFrame:
    rows = dataset.rows("all")
    if rows.empty:
        raise LabelIssuesError("no labelled photo on disk in the class range: nothing to check")
    return rows


def _cache_digest(dataset, rows: pd.DataFrame, folds: int, seed: int) -> str:
    """The key of the label issues of `rows` (their names, counts and splits), remembered by a quick hash of the same
    columns (the JSON of 351 K rows takes ~0.4 s, the hash ~0.05 s)."""
    alias = frame_digest(ISSUES_VERSION, dataset.key, RECIPE, folds, seed, MIN_FLAGGED_SCORE, dataset.classes,
                         rows[["name", "cls", "split"]])
    return remembered_digest(config.home() / "label_issues" / f"{dataset.key}.digests", alias,
                             lambda: _json_digest(dataset, rows, folds, seed))


def _json_digest(dataset, rows: pd.DataFrame, folds: int, seed: int) -> str:
    described = {"version": ISSUES_VERSION, "dataset": dataset.key, "recipe": RECIPE, "folds": folds, "seed": seed,
                 "min_flagged_score": MIN_FLAGGED_SCORE,
                 "classes": [int(c) for c in dataset.classes],
                 # whole columns to Python lists first: iterating 536 K rows of Arrow-backed columns took ~3 s per
                 # page open (bench/app_open_scale.py); JSON writes the tuples as the lists they were: same digest
                 "photos": list(zip(rows["name"].astype(object).tolist(), rows["cls"].astype(int).tolist(),
                                    rows["split"].fillna("").astype(object).tolist()))}
    return hashlib.sha1(json.dumps(described).encode()).hexdigest()[:16]


def _cache_paths(dataset, digest: str):
    folder = config.home() / "label_issues" / dataset.key
    return folder / f"{digest}.parquet", folder / f"{digest}.json"


def cached_label_issues(dataset, folds: int = DEFAULT_FOLDS, seed: int = 0) -> LabelIssues | None:
    """The label issues of the dataset as its labels are now, when computed before; None otherwise (a corrected
    count, a new photo or another split changes the key, so stale results are never shown as current)."""
    try:
        rows = _labelled_rows(dataset)
    except LabelIssuesError:
        return None
    _, info_file = _cache_paths(dataset, _cache_digest(dataset, rows, folds, seed))
    return _read_cached(info_file)


def _read_cached(info_file) -> LabelIssues | None:
    """The label issues saved beside `info_file` (its .json and .parquet), or None when they cannot be read."""
    try:
        info = json.loads(info_file.read_text())
        frame = pd.read_parquet(info_file.with_suffix(".parquet"))
    except (OSError, ValueError):
        return None
    return LabelIssues(frame, info["classes"], np.asarray(info["noise"]), info)


def latest_label_issues(dataset) -> LabelIssues | None:
    """The most recent label issues computed for this dataset, even if labels changed since (info['stale'] says so),
    for views that can show slightly old scores (a map's colours); None when never computed."""
    current = cached_label_issues(dataset)
    if current is not None:
        return current
    folder = config.home() / "label_issues" / dataset.key
    infos = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True) if folder.is_dir() else []
    for info_file in infos:
        found = _read_cached(info_file)
        if found is not None:
            found.info["stale"] = True
            return found
    return None


def current_label_issues(dataset) -> LabelIssues | None:
    """The latest label issues of the dataset with each photo's review since, for the queue and Data health: the
    last check's ranking (still valid for the photos not decided since) and, on each row, `outcome` (the status of
    its latest decision, "" when none) and `current` (its class now, NA when unclear or outside the classes).
    info['stale'] when labels changed since the check, info['changed'] how many photos' labels did; None when the
    dataset was never checked."""
    from core.data.labels.annotations import latest_decisions

    found = latest_label_issues(dataset)
    if found is None:
        return None
    frame = found.frame.drop(columns=["outcome", "current"], errors="ignore")
    decided = latest_decisions(dataset.key).drop_duplicates("photo").set_index("photo")["status"]
    outcome = np.full(len(frame), "", dtype=object)
    reviewed = frame["name"].isin(decided.index).to_numpy()
    outcome[reviewed] = frame.loc[reviewed, "name"].map(decided).fillna("").astype(str).to_numpy()
    frame["outcome"] = outcome
    rows = dataset.rows("all")
    if same_values(rows["name"], frame["name"]):  # the photos checked are the labelled ones in the same order
        frame["current"] = rows["cls"].astype("Float64").array
    else:
        now = dataset.frame.drop_duplicates("name").set_index("name")["cls"]
        frame["current"] = frame["name"].map(now).astype("Float64")
    changed = int((frame["current"] != frame["label"]).fillna(True).sum())
    return LabelIssues(frame, found.classes, found.noise, found.info | {"changed": changed})


def head_columns() -> list[int]:
    """The positions of the recipe's parts in its feature vector."""
    from core.models.catalog import FEATURE_SETS, STAGE_CHANNELS
    from core.models.networks import backbone_spec

    channels = STAGE_CHANNELS[backbone_spec(RECIPE["backbone"]).arch]
    return FEATURE_SETS[RECIPE["features"]].columns(channels, RECIPE["parts"])


def photo_features(dataset, rows: pd.DataFrame, on_progress=None, should_stop=None,
                   columns: list[int] | None = None) -> tuple[np.ndarray, dict]:
    """The recipe's frozen features of `rows`' photos (n × views × dim, float32; unreadable rows are zeros) from the
    feature cache, computing the missing ones; and {row: error} of the photos that cannot be read. `columns` keeps
    only those (e.g. head_columns()): memory then holds the result and one cache shard, at any dataset size."""
    import torch

    from core.models.features import extract_features
    from core.models.networks import build_backbone
    from core.models.preprocess import preprocessing

    backbone, info = build_backbone(RECIPE["backbone"], features=RECIPE["features"])
    meta = info | preprocessing(info, RECIPE["image_size"], RECIPE["aspect"])
    paths = list(rows["path"])
    width = meta["feature_dim"] if columns is None else len(columns)
    features = np.zeros((len(paths), len(RECIPE["views"]), width), np.float32)
    errors = {}
    for n, view in enumerate(RECIPE["views"]):
        def report(state, n=n):
            fraction = (n + state["done"] / max(state["total"], 1)) / len(RECIPE["views"])
            if on_progress:
                on_progress(0.9 * fraction, f"Computing features {state['done']:,}/{state['total']:,} ({view})")

        if on_progress:
            on_progress(0.9 * n / len(RECIPE["views"]), f"Reading cached features ({view})")
        result = extract_features(backbone, meta, paths, view=view, on_progress=report, should_stop=should_stop,
                                  columns=columns, out=torch.from_numpy(features)[:, n])
        errors.update(result.errors)
    return features, errors


def find_label_issues(dataset, folds: int = DEFAULT_FOLDS, seed: int = 0, on_progress=None,
                      should_stop=None) -> LabelIssues:
    """Label issues of every labelled photo of the dataset: cached, else computed (features from the feature cache,
    then `folds` heads) and cached. on_progress(fraction, text); should_stop() → Cancelled (features kept)."""
    found = cached_label_issues(dataset, folds, seed)
    if found is not None:
        return found
    started = time.perf_counter()
    rows = _labelled_rows(dataset)
    digest = _cache_digest(dataset, rows, folds, seed)  # of every labelled photo, as cached_label_issues computes it
    features, errors = photo_features(dataset, rows, on_progress, should_stop, columns=head_columns())
    if errors:  # (a copy: only when some photos cannot be read)
        readable = np.array([i not in errors for i in range(len(rows))])
        rows, features = rows[readable], features[readable]
    classes = [int(c) for c in dataset.classes]
    labels = np.array([classes.index(int(c)) for c in rows["cls"]])
    fit_on = (rows["split"] != "test").to_numpy()

    def fold_done(fold, total):
        if should_stop and should_stop():
            raise Cancelled("finding label issues was stopped (the features computed are kept)")
        if on_progress:
            on_progress(0.9 + 0.1 * fold / total, f"Cross-fitting heads (fold {fold} of {total})")

    probs = cross_fit(features, labels, fit_on, folds, seed, n_classes=len(classes),
                      on_fold=fold_done)
    per_photo, noise = rank_issues(probs, labels, classes)
    frame = pd.concat([rows[["name", "split"]].reset_index(drop=True), per_photo], axis=1)
    for k, c in enumerate(classes):
        frame[f"prob_{c}"] = probs[:, k]
    info = {"classes": classes, "noise": noise.tolist(), "folds": folds, "seed": seed, "recipe": RECIPE,
            "photos": len(frame), "flagged": int(frame["flagged"].sum()), "unreadable": len(errors),
            "seconds": round(time.perf_counter() - started, 1), "computed_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    table, info_file = _cache_paths(dataset, digest)
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(table, buffer.getvalue())
    atomic_write_json(info_file, info)
    return LabelIssues(frame, classes, noise, info)
