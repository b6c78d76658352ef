"""A short soak (bench/soak.py): two browser sessions at once on Spot-check, Predict and Overview while a training
job runs; no page error, no 5xx, no exception, and every spot-check decision attempted is saved."""
import os
from pathlib import Path

import pytest

from tests.browser_app import CHROMIUM
from tests.conftest import make_abid_subset


@pytest.fixture
def chromium():
    if not Path(CHROMIUM).exists() and os.environ.get("CI") != "true":
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    pytest.importorskip("playwright.async_api")


def test_two_sessions_at_once_while_training(chromium, binsight_home, tmp_path):
    from bench.soak import report, soak

    data = make_abid_subset(tmp_path / "soak_data", per_class=6)
    figures = soak(sessions=2, seconds=35, data=data, pages=("Spot-check", "Predict", "Overview"), home=binsight_home,
                   training="frozen")
    print(report(figures))
    assert figures["errors"] == [] and figures["server_5xx"] == []
    assert figures["exceptions_shown"] == 0 and figures["server_tracebacks"] == []
    assert figures["page_views"] >= 2 and figures["p95_s"] > 0
    assert figures["attempted"] >= 1 and figures["saved"] == figures["attempted"] and figures["lost"] == 0
    assert figures["rss_start_mb"] > 0 and figures["rss_peak_mb"] >= figures["rss_end_mb"] > 0
    assert figures["training_during_soak"] in ("queued", "running", "done")
