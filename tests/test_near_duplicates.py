"""Near-duplicate search by locality-sensitive hashing: the same pairs as comparing every pair, on hashes with planted
look-alikes (within either limit, at the limits, and just past them) and on the real ABID photos."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.data.photos import photo_checks
from core.data.photos.photo_checks import NEAR_BITS_64, NEAR_BITS_256, near_duplicate_pairs

from tests.conftest import ABID


def all_pairs(checks: pd.DataFrame) -> set[tuple[str, str, int, int]]:
    """Every pair within either limit, by comparing all of them (what the search did before it hashed)."""
    usable = checks[checks["phash"].notna() & checks["phash256"].notna()].reset_index(drop=True)
    small = usable["phash"].astype("int64").to_numpy().view(np.uint64)
    large = np.stack([np.frombuffer(bytes.fromhex(h), np.uint8) for h in usable["phash256"]])
    names, found = usable["name"].to_numpy(), set()
    for i in range(len(usable)):
        bits_64 = np.unpackbits((small[i] ^ small[i + 1:]).view(np.uint8).reshape(-1, 8), axis=1).sum(1)
        bits_256 = np.unpackbits(large[i] ^ large[i + 1:], axis=1).sum(1)
        for j in np.flatnonzero((bits_64 <= NEAR_BITS_64) | (bits_256 <= NEAR_BITS_256)):
            found.add((names[i], names[i + 1 + j], int(bits_64[j]), int(bits_256[j])))
    return found


def found_pairs(pairs: pd.DataFrame) -> set[tuple[str, str, int, int]]:
    return set(zip(pairs["photo"], pairs["other_photo"], pairs["bits_64"], pairs["bits_256"]))


def flipped(bits: np.ndarray, how_many: int, rng) -> np.ndarray:
    out = bits.copy()
    out[rng.choice(len(bits), how_many, replace=False)] ^= 1
    return out


def planted_checks(photos: int = 3000, seed: int = 0) -> tuple[pd.DataFrame, int]:
    """Hashes shaped like ABID's (photos sharing one of a few bin looks, each ~30 % of its bits changed), and 150
    twins at distances around both limits; (checks, twins within a limit)."""
    rng = np.random.default_rng(seed)
    looks_64, looks_256 = rng.integers(0, 2, (40, 64)), rng.integers(0, 2, (40, 256))
    look = rng.integers(0, 40, photos)
    small = np.array([flipped(looks_64[k], 19, rng) for k in look])
    large = np.array([flipped(looks_256[k], 77, rng) for k in look])
    twins_64, twins_256, close = [], [], 0
    for n in range(150):
        source = rng.integers(photos)
        d64, d256 = (rng.integers(0, 8), rng.integers(60, 90)) if n % 2 else (rng.integers(8, 24), rng.integers(20, 60))
        twins_64.append(flipped(small[source], d64, rng))
        twins_256.append(flipped(large[source], d256, rng))
        close += d64 <= NEAR_BITS_64 or d256 <= NEAR_BITS_256
    small, large = np.r_[small, twins_64], np.r_[large, twins_256]
    names = [f"{n:06d}.jpg" for n in rng.permutation(len(small))]
    return pd.DataFrame({
        "name": names, "sha1": [f"sha{n}" for n in range(len(small))],
        "phash": np.packbits(small, axis=1).view(">u8").astype(np.uint64).view(np.int64).ravel(),
        "phash256": [bytes(row).hex() for row in np.packbits(large, axis=1)]}), close


def test_hashed_search_finds_the_pairs_that_comparing_all_pairs_finds():
    checks, close = planted_checks()
    expected = all_pairs(checks)
    assert len(expected) >= close > 50, "the planted twins within a limit are there to be found"
    assert found_pairs(near_duplicate_pairs(checks)) == expected


def test_hashed_search_compares_far_fewer_pairs_than_all(monkeypatch):
    checks, _ = planted_checks()
    compared = []
    original = photo_checks._same_key_pairs

    def counting(keys):
        for left, right in original(keys):
            compared.append(len(left))
            yield left, right

    monkeypatch.setattr(photo_checks, "_same_key_pairs", counting)
    near_duplicate_pairs(checks)
    every_pair = len(checks) * (len(checks) - 1) // 2
    assert sum(compared) < every_pair / 4


@pytest.mark.skipif(not (ABID / "labels.csv").is_file(), reason="needs the real ABID photos in ../shared/abid")
def test_hashed_search_finds_the_same_pairs_as_all_pairs_on_real_photos():
    """Every photo of ../shared/abid analysed (about 20 s on 2 cores), then both searches on their hashes."""
    from core.data.layouts.registry import load_dataset

    dataset = load_dataset(str(ABID))
    checks = photo_checks.check_photos(dataset.key, dataset.frame).frame
    assert found_pairs(near_duplicate_pairs(checks)) == all_pairs(checks)
