"""The review loop in a real browser (Chromium at 1400×1000) on real ABID photos: the data health check, then five
bins of the "Likely wrong count" queue in a row (correct, items hidden, model wrong, unclear, confirm) without the
queue or Data health going blank, the precision tile counting each decision, and the fresh check swapped in."""
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import make_abid_subset
from tests.test_browser_journey import comes_into_view, nothing_cut, rerun_by, shot, wait_idle, walk

pytest.importorskip("playwright.sync_api")
PER_COUNT = 12  # 60 real photos: the check's features in seconds, yet five heads per count to cross-fit
FLIPS = 4  # per end count, recorded at the other end: far errors the check flags


@pytest.fixture
def flipped_photos(abid_dir, tmp_path) -> Path:
    """Real photos of counts 1–5, a few 1s recorded as 5 and 5s as 1, so the queue surely holds five bins."""
    folder = make_abid_subset(tmp_path / "abid", per_class=PER_COUNT)
    labels = pd.read_csv(folder / "labels.csv")
    for recorded, written in ((1, 5), (5, 1)):
        rows = labels.index[labels["count"] == recorded][:FLIPS]
        labels.loc[rows, "count"] = written
    labels.to_csv(folder / "labels.csv", index=False)
    return folder


def test_five_decisions_in_a_row_keep_the_queue_and_the_health_page(flipped_photos, binsight_home):
    walk(binsight_home, {"BINSIGHT_DATA": str(flipped_photos)}, review_loop, flipped_photos)


# The bin's page is drawn whole: the run ended (a re-check's progress line reruns on its own, so a run's end alone
# does not say the decision's run is done) and no element left over from the run before.
SETTLED = """() => document.querySelector('[data-testid="stApp"]').dataset.testScriptState === 'notRunning'
    && !document.querySelector('[data-stale="true"]')
    && document.querySelectorAll('.st-key-decide_confirm button').length === 1"""


def settle(page) -> None:
    page.wait_for_function(SETTLED, timeout=120_000)


def tile(page, label: str) -> str:
    return page.locator('[data-testid="stMetric"]', has_text=label).first.locator(
        '[data-testid="stMetricValue"]').inner_text()


def shown_bin(page) -> str:
    side = page.locator(".st-key-spot_photo").locator("xpath=ancestor::*[@data-testid='stHorizontalBlock'][1]")
    return side.locator("h4").inner_text().strip()


def review_loop(page, source: Path) -> None:
    from core.data.layouts.registry import load_dataset
    from core.evaluation.label_issues import cached_label_issues

    page.get_by_role("heading", name="Overview", exact=True).wait_for(timeout=120_000)
    page.locator('[data-testid="stSidebarNav"] a', has_text="Data health").click()
    page.get_by_role("heading", name="Data health", exact=True).wait_for()
    page.locator(".st-key-health_run button").click()  # features of 60 photos: a minute on a busy 2-core machine
    page.get_by_role("heading", name="How often the flags are right").wait_for(timeout=600_000)
    wait_idle(page)
    assert "No bin has been reviewed yet" in page.locator('[data-testid="stAlertContentInfo"]').first.inner_text()
    issues = cached_label_issues(load_dataset(str(source)))
    expected = issues.flagged()["name"].tolist()  # the queue's order: most likely wrong first
    assert len(expected) >= 5, f"only {len(expected)} bins flagged"
    assert tile(page, "Likely wrong counts") == str(len(expected))

    rerun_by(page, lambda: page.locator(".st-key-health_to_spot_check button").click())
    page.get_by_role("heading", name="Spot-check", exact=True).wait_for()
    page.get_by_label("Your name").fill("ana")
    rerun_by(page, lambda: page.get_by_role("button", name="Start checking").click())
    page.locator(".st-key-spot_photo").wait_for()
    settle(page)
    assert comes_into_view(page.locator(".st-key-spot_photo"))
    assert comes_into_view(page.locator(".st-key-decide_model_wrong"))
    assert "after the first review" in page.locator(".st-key-precision_tiles").inner_text()

    recorded = pd.read_csv(source / "labels.csv").set_index("image")["count"]
    decisions = [("decide_{}", "corrected"), ("decide_hidden", "items hidden"), ("decide_model_wrong", "model wrong"),
                 ("decide_unclear", "unclear"), ("decide_confirm", "confirmed")]
    for i, (button, word) in enumerate(decisions):
        name = shown_bin(page)
        assert name == expected[i], f"bin {i + 1} is {name}, the queue's order says {expected[i]}"
        if i == 0:
            button = button.format(1 if recorded[name] != 1 else 5)
        page.locator(f".st-key-{button} button").first.click()  # a button with help has its tooltip's twin
        page.locator('[data-testid="stAlertContentSuccess"]', has_text=f"Saved {name}: {word}").wait_for()
        settle(page)
        assert page.locator(".st-key-spot_photo").is_visible(), "the queue went on"
        assert not page.get_by_text("has not run", exact=False).count()
        assert f"{i + 1} bin{'s' if i else ''} reviewed from it" in page.locator(".st-key-precision_tiles").inner_text()
        if i == 0:
            assert tile(page, "Record wrong") == "100% (1)"
            shot(page, "review-01-corrected")
        if i < 4:
            assert shown_bin(page) == expected[i + 1]
    assert [tile(page, v) for v in ("Record wrong", "Items hidden", "Record right", "Unclear")] == [
        "20% (1)", "20% (1)", "40% (2)", "20% (1)"]
    nothing_cut(page)
    page.locator(".st-key-spot_photo").scroll_into_view_if_needed()
    shot(page, "review-02-five-decisions")

    # Data health: every finding still there, the reviewed bins marked, the queue's precision drawn; the re-check
    # (two label changes: the correction and "unclear") swaps its fresh ranking in by itself.
    page.locator('[data-testid="stSidebarNav"] a', has_text="Data health").click()
    page.get_by_role("heading", name="How often the flags are right").wait_for()
    wait_idle(page)
    assert tile(page, "Unreadable") == "0"
    assert page.locator(".st-key-precision_chart").is_visible()
    page.get_by_text(re.compile(r"Likely wrong count 20% \(\d+%–\d+%\)")).wait_for()
    page.get_by_text(re.compile(r"reviewed: items hidden")).first.wait_for()
    page.get_by_text("Ranked by the check of").wait_for(state="detached", timeout=180_000)
    wait_idle(page)
    assert cached_label_issues(load_dataset(str(source))) is not None, "the fresh check is the current one"
    assert page.locator(".st-key-health_per_class").is_visible()
    nothing_cut(page)
    shot(page, "review-03-health-after")
