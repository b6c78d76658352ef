"""Every layout's index, fingerprint and bad-input message stay what they were when tests/data/golden_index was recorded."""
import io
import json

import pandas as pd
import pytest

from tests.golden_index import GOLDEN, build_all, comparable


@pytest.fixture(scope="module")
def rebuilt(tmp_path_factory):
    root, home = tmp_path_factory.mktemp("fixtures"), tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BINSIGHT_HOME", str(home))
        patch.chdir(root)
        found, errors = build_all(root, home)
    return found, errors, home


GOLDEN_SUMMARY = json.loads((GOLDEN / "golden.json").read_text())


@pytest.mark.parametrize("name", sorted(GOLDEN_SUMMARY["layouts"]))
def test_the_index_is_unchanged(rebuilt, name):
    found, _, home = rebuilt
    frame, layout, notes, fingerprint = found[name]
    expected = GOLDEN_SUMMARY["layouts"][name]
    stored = pd.read_parquet(io.BytesIO(comparable(frame, home).to_parquet(index=False)))  # the same dtypes on both sides
    pd.testing.assert_frame_equal(stored, pd.read_parquet(GOLDEN / f"{name}.parquet"))
    assert (layout, notes, fingerprint) == (expected["layout"], expected["notes"], expected["fingerprint"])


def test_bad_sources_keep_their_messages(rebuilt):
    assert rebuilt[1] == GOLDEN_SUMMARY["messages"]
