"""Label issues and the map at bucket scale: cross-fitting reads a memory-mapped feature table in chunks (memory bounded
on 100 K photos, the same probabilities as in one piece); a map fitted on a sample places the other photos by their
neighbours; a lasso or box on a map that draws only some photos returns every photo inside."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest

from core.evaluation import embedding_map as maps
from core.evaluation.label_issues import cross_fit


def synthetic_features(path, photos: int, dim: int = 48, seed: int = 0):
    """photos × 2 views × dim float32 on disk, each count around its own centre; (memory map, labels)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, photos)
    centres = rng.normal(size=(5, dim)).astype(np.float32)
    table = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(photos, 2, dim))
    for start in range(0, photos, 20_000):
        part = labels[start:start + 20_000]
        table[start:start + 20_000] = centres[part][:, None] + rng.normal(size=(len(part), 2, dim)).astype(np.float32)
    table.flush()
    return np.load(path, mmap_mode="r"), labels


def test_cross_fitting_100k_photos_reads_them_in_chunks_with_bounded_memory(tmp_path):
    features, labels = synthetic_features(tmp_path / "features.npy", 100_000)
    fit_on = np.arange(len(labels)) % 10 != 0  # a tenth held out, like a test split
    cross_fit(features[:300], labels[:300], fit_on[:300], folds=3)  # scikit-learn's imports are not the heads' memory
    tracemalloc.start()
    probs = cross_fit(features, labels, fit_on, folds=3, fit_sample=4_000, chunk=5_000)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < features.nbytes / 2, f"{peak / 1e6:.0f} MB at the peak for a {features.nbytes / 1e6:.0f} MB table"
    assert np.allclose(probs.sum(1), 1.0)
    assert (probs.argmax(1) == labels).mean() > 0.9  # the counts are well apart: heads that saw others get them


def test_chunks_and_a_sample_as_large_as_the_folds_give_the_same_probabilities(tmp_path):
    features, labels = synthetic_features(tmp_path / "features.npy", 3_000, dim=16)
    fit_on = np.arange(len(labels)) % 5 != 0
    whole = cross_fit(np.asarray(features), labels, fit_on, folds=3)
    assert np.allclose(cross_fit(features, labels, fit_on, folds=3, chunk=97), whole)
    sampled = cross_fit(features, labels, fit_on, folds=3, fit_sample=600)
    assert not np.allclose(sampled, whole) and (sampled.argmax(1) == whole.argmax(1)).mean() > 0.9


def clusters(photos: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 6, photos)
    centres = rng.normal(scale=6.0, size=(6, 24))
    return (centres[group] + rng.normal(size=(photos, 24))).astype(np.float32), group


def test_a_map_fitted_on_a_sample_places_the_other_photos_beside_their_neighbours(monkeypatch):
    monkeypatch.setattr(maps, "SAMPLE_FIT", 600)
    monkeypatch.setattr(maps, "PLACE_CHUNK", 250)
    features, group = clusters(1_500)
    coordinates, method = maps.project(features, strata=group)
    assert "sample" in method
    fitted = maps.fit_sample(len(features), group)
    held = np.setdiff1d(np.arange(len(features)), fitted)
    assert len(fitted) == 600 and np.bincount(group[fitted]).min() > 60
    centres = np.stack([coordinates[fitted][group[fitted] == g].mean(0) for g in range(6)])
    nearest = np.linalg.norm(coordinates[held][:, None] - centres[None], axis=2).argmin(1)
    assert (nearest == group[held]).mean() > 0.95


def test_a_region_selection_returns_photos_not_drawn():
    rng = np.random.default_rng(0)
    points = pd.DataFrame({"name": [f"{n:06d}.jpg" for n in range(40_000)], "x": rng.uniform(0, 10, 40_000),
                           "y": rng.uniform(0, 10, 40_000), "count": rng.integers(1, 6, 40_000)})
    drawn, density = maps.map_view(points, "count", limit=2_000, bins=50)
    assert len(drawn) == 2_000 and np.nansum(density["z"]) == len(points)
    box = {"selection": {"points": [], "box": [{"x": [2.0, 4.0], "y": [5.0, 1.0]}], "lasso": []}}
    inside = points[points["x"].between(2, 4) & points["y"].between(1, 5)]["name"]
    chosen = maps.names_in_region(points, box)
    assert chosen == inside.tolist() and len(set(chosen) - set(drawn["name"])) > 2_000
    square = {"selection": {"points": [], "box": [], "lasso": [{"x": [2, 4, 4, 2], "y": [1, 1, 5, 5]}]}}
    assert set(maps.names_in_region(points, square)) == set(chosen)


def test_a_map_small_enough_is_drawn_whole():
    points = pd.DataFrame({"name": ["a.jpg", "b.jpg"], "x": [0.0, 1.0], "y": [0.0, 1.0], "count": [1, 2]})
    drawn, density = maps.map_view(points, "count")
    assert density is None and len(drawn) == 2


@pytest.mark.parametrize("colour", ["issue_score"])
def test_the_photos_most_likely_wrong_are_always_drawn(colour):
    rng = np.random.default_rng(1)
    points = pd.DataFrame({"name": [f"{n}.jpg" for n in range(30_000)], "x": rng.normal(size=30_000),
                           "y": rng.normal(size=30_000), colour: rng.random(30_000)})
    drawn, _ = maps.map_view(points, colour, limit=1_000)
    assert set(points.nlargest(200, colour)["name"]) <= set(drawn["name"])


def test_cached_features_are_read_shard_by_shard_into_the_rows_and_columns_asked(tmp_path):
    import torch

    from core.models.caches import FeatureCache

    cache = FeatureCache("lite0-test", root=tmp_path)
    shards = [torch.randn(50, 16) for _ in range(3)]
    for n, vectors in enumerate(shards):
        cache.add([f"photo-{n}-{k}" for k in range(50)], vectors)
    (cache.folder / "0-damaged.pt").write_bytes(b"not a shard")  # skipped: its photos count as missing
    wanted = ["photo-2-7", None, "photo-0-3", "never-stored", "photo-2-7"]
    columns = [5, 1, 12]
    out = torch.zeros(len(wanted), len(columns))
    assert cache.read_into(wanted, out, columns) == {0, 2, 4}
    assert torch.equal(out[0], shards[2][7, columns]) and torch.equal(out[4], shards[2][7, columns])
    assert torch.equal(out[2], shards[0][3, columns]) and not out[[1, 3]].any()
