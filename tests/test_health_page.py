"""The Data health page and the Likely-wrong queue through AppTest: the check runs from the page, its findings show,
and its button opens Spot-check on the flagged bins, most likely wrong first, each with its suggested count."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import config
from core.data.layouts.demo import generate_demo
from core.evaluation import label_issues

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def planted(tmp_path, monkeypatch) -> tuple[Path, set[str]]:
    """The demo drawing, 16 bins a count, two of them recorded two objects off; the label-issue recipe made small."""
    monkeypatch.setitem(label_issues.RECIPE, "image_size", 96)
    monkeypatch.setitem(label_issues.RECIPE, "aspect", 1.0)
    monkeypatch.setitem(label_issues.RECIPE, "views", ["plain"])
    folder = generate_demo(tmp_path / "planted", counts={c: 16 for c in range(1, 6)})
    flipped = set()
    for meta in sorted((folder / "metadata").glob("*.json")):
        record = json.loads(meta.read_text())
        if record["EXPECTED_QUANTITY"] in (1, 5) and len(flipped) < 2 and \
                not any(record["EXPECTED_QUANTITY"] == c for c, _ in flipped):
            flipped.add((record["EXPECTED_QUANTITY"], f"{meta.stem}.jpg"))
            record["EXPECTED_QUANTITY"] = 4 if record["EXPECTED_QUANTITY"] == 1 else 2
            meta.write_text(json.dumps(record))
    config.save_settings(data_dir=str(folder))
    return folder, {name for _, name in flipped}


def texts(at, kind: str) -> list[str]:
    return [str(element.value) for element in getattr(at, kind)]


def test_the_health_check_runs_from_the_page_and_leads_to_the_likely_wrong_queue(planted):
    folder, flipped = planted
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=240).run()
    at.switch_page("app_pages/health.py").run()
    assert not at.exception
    assert any("has not been checked yet" in t for t in texts(at, "info"))

    at.button(key="health_run").click().run()
    assert not at.exception, at.exception
    tiles = {m.label: m.value for m in at.metric}
    assert int(tiles["Likely wrong counts"]) >= 1
    assert tiles["Unreadable"] == "0"
    captions = " ".join(texts(at, "caption"))
    assert any(name in captions for name in flipped), "a planted photo is on the contact sheet"
    assert at.get("plotly_chart"), "the per-count bar and the noise heatmap"

    at.button(key="health_to_spot_check").click().run()
    assert not at.exception
    if "annotator_input" in [w.key for w in at.text_input]:  # no sign-in configured: the name is asked once
        at.text_input(key="annotator_input").input("ops").run()
        at.button[0].click().run()
    assert not at.exception
    queue = at.session_state["spot_queue"]
    assert at.session_state["spot_kind"] == "likely_wrong"
    assert queue[0] in flipped, f"planted {flipped}, queue starts {queue[:4]}"
    assert any("Data health suggests" in t for t in texts(at, "markdown"))

    # A correction of the first bin (recorded 4 or 2) changes a label: the queue keeps its order and moves on, the
    # precision tiles count it, and Data health keeps every finding, the bin's row marked, while a re-check runs.
    at.button(key="decide_3").click().run()
    assert not at.exception
    assert at.session_state["spot_queue"] == queue and at.session_state["spot_pos"] == min(1, len(queue) - 1)
    # (AppTest draws the page it last switched to, so this run drew Data health, as a user going back would see it)
    assert not any("has not been checked" in t for t in texts(at, "info"))
    assert {m.label: m.value for m in at.metric}["Unreadable"] == "0"
    captions = texts(at, "caption")
    assert any(queue[0] in t and "reviewed: **corrected**" in t for t in captions)
    assert any("Likely wrong count 100%" in t for t in captions), "the queue's measured precision"
    from core.data.layouts.registry import load_dataset
    from core.evaluation.label_issues import cached_label_issues
    from core.review.recheck import recheck_state

    state = recheck_state(load_dataset(str(folder)).key)
    deadline = time.monotonic() + 120
    while state.running and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the background re-check, not a guessed wait
    assert not state.running and not state.error, state.error
    assert cached_label_issues(load_dataset(str(folder))) is not None, "the re-check cached the current labels"
    at.run()
    assert not any("Ranked by the check of" in t for t in texts(at, "caption")), "no stale line over fresh results"
