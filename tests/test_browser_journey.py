"""The analyst's first hour in a real browser: headless Chromium at 1400×1000 drives `streamlit run app.py`.

Two walks: on real ABID photos (Overview → Browse → Train → Evaluate → Spot-check → Predict), asserting what a
new user tripped over (issue 25, points 1–7); and a first start on the demo set, where a small model trains by
itself so Evaluate and Predict have something to show (point 8).
"""
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from tests.browser_app import CHROMIUM, CHROMIUM_FLAGS, running_app
from tests.conftest import make_abid_subset, wait_for

playwright = pytest.importorskip("playwright.sync_api")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"
VIEWPORT = {"width": 1400, "height": 1000}
# Enough real photos per count for a model, a test split and out-of-range bins, yet features in seconds.
PER_COUNT = 36
COUNTS = (0, 1, 2, 3, 4, 5, 6, 7)


def open_browser(url: str):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the browser test, but Debian's chromium is not installed")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver = playwright.sync_playwright().start()
    browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
    page = browser.new_page(viewport=VIEWPORT)
    page.set_default_timeout(60_000)
    errors = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url)
    return driver, browser, page, errors


def walk(home: Path, env: dict, journey, *args) -> None:
    with running_app(home, env=env, timeout=120) as url:
        driver, browser, page, errors = open_browser(url)
        try:
            journey(page, *args)
            assert errors == []
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / f"failure-{journey.__name__}.png"))
            raise
        finally:
            browser.close()
            driver.stop()


def shot(page, name: str) -> None:
    wait_idle(page)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))


def go_to(page, title: str) -> None:
    page.locator('[data-testid="stSidebarNav"] a', has_text=title).click()
    page.get_by_role("heading", name=title, exact=True).wait_for()


APP = '[data-testid="stApp"]'

# Streamlit marks its root with data-test-script-state: "running" while the script runs, "notRunning" after.
WATCH_RUNS = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    window.binsightRunEnded = false;
    new MutationObserver(records => {
        if (records.some(r => r.oldValue === "running")) window.binsightRunEnded = true;
    }).observe(app, {attributes: true, attributeOldValue: true, attributeFilter: ["data-test-script-state"]});
}"""
RUN_ENDED = """() => window.binsightRunEnded &&
    document.querySelector('[data-testid="stApp"]').dataset.testScriptState === 'notRunning'"""

# Text cut off: an element narrower than what it holds (tile titles and values end in "…").
CUT_TEXT = """(selector) => [...document.querySelectorAll(selector)].flatMap(tile =>
    [tile, ...tile.querySelectorAll('*')].filter(e => e.scrollWidth > e.clientWidth + 1).map(() => tile.innerText))"""
# A table wider than its container scrolls sideways: its scroller holds more than it shows.
WIDE_TABLES = """() => [...document.querySelectorAll('[data-testid="stDataFrame"]')].map(table => {
    if (table.offsetParent === null) return null;  // in a tab not shown
    const scroller = table.querySelector('.dvn-scroller');
    if (!scroller) return 'a table without its scroller: this check needs updating';
    const where = table.closest('[class*="st-key-"]');
    return scroller.scrollWidth > scroller.clientWidth + 2
        ? `${where ? where.className : 'a table'}: ${scroller.scrollWidth} px in ${scroller.clientWidth}` : null;
}).filter(Boolean)"""


def wait_idle(page) -> None:
    """Until no script run is in progress."""
    page.locator(f'{APP}[data-test-script-state="notRunning"]').wait_for(timeout=120_000)


def rerun_by(page, action) -> None:
    """Do `action` (which makes Streamlit run the script) and wait until that run has ended."""
    page.evaluate(WATCH_RUNS)
    action()
    page.wait_for_function(RUN_ENDED, timeout=120_000)


def choose(page, label: str, option: str) -> None:
    box = page.locator('[data-testid="stSelectbox"]', has_text=label)
    box.locator("input").click()
    box.locator("input").fill(option)
    rerun_by(page, lambda: page.keyboard.press("Enter"))


def type_number(page, key: str, value: int) -> None:
    field = page.locator(f".st-key-{key} input")
    field.fill(str(value))
    rerun_by(page, lambda: field.press("Enter"))


def in_view(locator) -> bool:
    box = locator.bounding_box()
    return box is not None and box["y"] >= 0 and box["y"] + box["height"] <= VIEWPORT["height"]


def comes_into_view(locator, seconds: float = 10) -> bool:
    """True once `locator` is in view, failing after `seconds`: a rerun lays the page out in steps, so one look can
    be early."""
    return wait_for(lambda: in_view(locator), seconds, f"{locator} in view")


def nothing_cut(page) -> None:
    assert page.evaluate(CUT_TEXT, '[data-testid="stMetric"]') == []
    assert page.evaluate(WIDE_TABLES) == []


def percent(text: str) -> float:
    return float(re.search(r"([\d.]+)\s*%", text)[1])


@pytest.fixture
def real_photos(abid_dir, tmp_path) -> Path:
    """A small ABID-layout folder of real photos, counts 0–7: classes 1–5 and bins outside them."""
    return make_abid_subset(tmp_path / "abid", per_class=PER_COUNT, counts=COUNTS)


def test_the_analyst_journey_on_real_photos(real_photos, binsight_home, tmp_path):
    walk(binsight_home, {"BINSIGHT_DATA": str(real_photos)}, analyst_journey, real_photos, tmp_path)


def analyst_journey(page, source: Path, tmp_path: Path) -> None:
    labels = pd.read_csv(source / "labels.csv").set_index("image")["count"]
    # Overview: no Deploy button, tile titles whole, the Storage chart's axis from 0
    page.get_by_role("heading", name="Overview", exact=True).wait_for(timeout=120_000)
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=120_000)
    wait_idle(page)
    assert page.locator('[data-testid="stAppDeployButton"]').count() == 0
    assert page.get_by_text("Imbalance", exact=True).is_visible()
    nothing_cut(page)
    shot(page, "01-overview")
    page.get_by_text("Storage").click()  # an expander opens without a script run
    storage = page.locator(".st-key-storage_chart .js-plotly-plot")
    storage.wait_for()
    axis = page.evaluate("(plot) => plot._fullLayout.xaxis.range", storage.element_handle())
    assert axis[0] == 0 and axis[1] > 0

    # Browse: starts on the model's classes, the number under a photo is a count, the photo is not blown up
    go_to(page, "Browse")
    page.locator('[data-testid="stImage"]').nth(5).wait_for()
    wait_idle(page)
    page.locator(".st-key-browse_counts").get_by_text("5", exact=True).wait_for()
    chips = page.locator(".st-key-browse_counts").inner_text()
    assert re.findall(r"\d+", chips) == ["1", "2", "3", "4", "5"], chips
    buttons = page.get_by_role("button", name=re.compile(r"\.jpg · count \d+$"))
    assert all(re.search(r"count [1-5]$", b) for b in buttons.all_inner_texts())
    buttons.first.click()
    dialog = page.get_by_role("dialog")
    image = dialog.locator('[data-testid="stImage"] img')
    image.wait_for()
    dialog.locator('[data-testid="stDataFrame"]').wait_for()
    assert page.evaluate("(img) => img.complete && img.naturalWidth >= img.clientWidth", image.element_handle())
    nothing_cut(page)
    shot(page, "02-browse-photo")
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")

    # Train: the smallest quick model; the live card at the top, then its figures and the way on to Evaluate
    go_to(page, "Train")
    choose(page, "Image height (px)", "96")
    type_number(page, "train_epochs_frozen", 8)
    page.mouse.wheel(0, 5000)  # as far down as the page goes: the job's card is above the fold from here
    page.get_by_role("button", name="Launch training").click()
    card = page.get_by_text(re.compile(r"Job \d+ · train · ")).first
    card.wait_for()
    # the page went up to it (mid-rerun the Jobs heading can reach the top a moment before the card settles under it)
    assert comes_into_view(card)
    done = page.locator('[data-testid="stAlertContentSuccess"]', has_text="Done in")
    done.wait_for(timeout=300_000)
    # The live card's last fragment run ends before the page's own rerun swaps it for the finished one
    page.get_by_text(re.compile(r"Job \d+ · train · running")).wait_for(state="detached", timeout=120_000)
    wait_idle(page)
    assert comes_into_view(done)
    accuracy = percent(re.search(r"Test accuracy\s+[\d.]+\s*%", done.inner_text())[0])
    assert 0 < accuracy <= 100
    page.get_by_role("button", name=re.compile("See it on Evaluate")).wait_for()
    shot(page, "03-train-done")
    page.get_by_role("heading", name="Runs").scroll_into_view_if_needed()
    nothing_cut(page)

    # Evaluate: the flag says something; a confusion cell's photos open large and can be corrected
    rerun_by(page, lambda: page.get_by_role("button", name=re.compile("See it on Evaluate")).click())
    page.get_by_role("heading", name="Evaluate", exact=True).wait_for()
    page.get_by_role("heading", name="Confusion matrix").wait_for(timeout=180_000)
    wait_idle(page)
    flagged = page.locator('[data-testid="stMetric"]', has_text="Flagged below")
    assert percent(flagged.locator('[data-testid="stMetricValue"]').inner_text()) < 50
    nothing_cut(page)
    choose(page, "True count", "3")
    for predicted in "12345":
        choose(page, "Predicted count", predicted)
        heading = page.get_by_text(re.compile(r"photos\s+with true count 3 predicted as"))
        if int(heading.inner_text().split()[0]) >= 2:  # one is corrected below; the rest go on to Spot-check
            break
    thumbnail = page.locator('[data-testid="stImage"] img').first  # the cell's photos are the page's only ones
    thumbnail.scroll_into_view_if_needed()
    assert thumbnail.bounding_box()["width"] >= 260  # twice the old 130 px stamps
    nothing_cut(page)
    shot(page, "04-evaluate-cell")
    opened = page.get_by_role("button", name=re.compile(r"\.jpg · \d+% sure")).first
    name = re.search(r"(\S+\.jpg)", opened.inner_text())[1]
    opened.click()
    dialog = page.get_by_role("dialog")
    dialog.get_by_role("heading", name=name).wait_for()
    dialog.get_by_label("Your name").fill("ana")
    rerun_by(page, lambda: dialog.get_by_label("Your name").press("Enter"))
    new_count = 2 if labels[name] != 2 else 4
    dialog.get_by_role("button", name=str(new_count), exact=True).click()
    dialog.locator('[data-testid="stAlertContentSuccess"]', has_text=f"Saved {name}").wait_for()
    # the dialog shows the label it saved (not the one evaluated), that count's button lit, and an undo
    saved_label = re.compile(rf"Label {new_count} \(corrected by ana; {labels[name]} when evaluated\)")
    dialog.get_by_text(saved_label).wait_for()
    assert dialog.locator(f".st-key-cm_set_{new_count} button").get_attribute("kind") == "primary"
    dialog.locator(".st-key-cm_undo button:visible").first.wait_for()
    shot(page, "05-evaluate-correct")
    from core.data.labels import annotations
    from core.data.dataset import dataset_key

    history = annotations.history(dataset_key(source), name)
    assert history.iloc[-1]["new_count"] == new_count and history.iloc[-1]["annotator"] == "ana"
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")

    # Spot-check, from the cell: its photos in a queue, the whole bin on screen beside its buttons
    page.get_by_role("button", name=re.compile(r"^Check these \d+ photos on Spot-check")).click()
    page.get_by_role("heading", name="Spot-check", exact=True).wait_for()
    photo = page.locator(".st-key-spot_photo")
    photo.wait_for()
    wait_idle(page)
    assert comes_into_view(photo) and comes_into_view(page.locator(".st-key-decide_confirm"))
    nothing_cut(page)
    shot(page, "06-spot-check")

    # The model queues hold only bins whose count the model knows; the others have their own queue
    choose(page, "Queue", "Model disagrees with the label")
    for _ in range(4):
        shown = page.locator(".st-key-spot_photo").locator("xpath=ancestor::*[@data-testid='stHorizontalBlock'][1]")
        bin_name = shown.locator("h4").inner_text().strip()
        assert 1 <= labels[bin_name] <= 5, f"{bin_name} (count {labels[bin_name]}) is in a model queue"
        rerun_by(page, lambda: page.locator(".st-key-spot_next button").click())
    choose(page, "Queue", "Outside the classes")
    shown = page.locator(".st-key-spot_photo").locator("xpath=ancestor::*[@data-testid='stHorizontalBlock'][1]")
    assert not 1 <= labels[shown.locator("h4").inner_text().strip()] <= 5

    # Predict: the flag's share beside the slider, and a count for a real photo, a message for a broken file
    go_to(page, "Predict")
    share = page.get_by_text(re.compile(r"Flags \d+\s*% of the validation photos"))
    assert percent(share.inner_text()) < 50
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a photo")
    photos = [str(source / "bin-images" / n) for n in labels[labels.between(1, 5)].index[:3]]
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(photos + [str(broken)])
    page.get_by_text(re.compile(r"→ \d+( or \d+)? objects")).first.wait_for(timeout=120_000)
    page.locator('[data-testid="stAlertContentError"]', has_text=re.compile(r"^broken\.jpg: .*not a photo")).wait_for()
    page.get_by_text("Predict over HTTP").click()
    serve = page.locator('[data-testid="stCode"] pre').first
    assert page.evaluate("(e) => e.scrollWidth <= e.clientWidth + 1", serve.element_handle())
    shot(page, "07-predict")
    page.get_by_role("heading", name="Batch table").scroll_into_view_if_needed()
    nothing_cut(page)


def test_a_first_start_on_the_demo_set_trains_a_model_by_itself(binsight_home):
    walk(binsight_home, {"BINSIGHT_DEMO_MODEL": "1"}, demo_journey)


def demo_journey(page) -> None:
    page.get_by_role("heading", name="Overview", exact=True).wait_for(timeout=120_000)
    wait_idle(page)
    go_to(page, "Evaluate")
    page.get_by_text("A small demo model is training").wait_for()  # says so while it trains
    shot(page, "08-demo-training")
    page.get_by_role("heading", name="Confusion matrix").wait_for(timeout=240_000)
    wait_idle(page)
    assert page.locator('[data-testid="stMetricValue"]').first.inner_text().endswith("%")
    go_to(page, "Predict")
    photo = sorted((Path(os.environ["BINSIGHT_HOME"]) / "demo" / "bin-images").glob("*.jpg"))[0]
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files([str(photo)])
    page.get_by_text(re.compile(r"→ \d+( or \d+)? objects")).first.wait_for(timeout=120_000)
    page.get_by_text(re.compile(r"Counted with (OpenVINO|ONNX Runtime) \(fp32\): within")).wait_for()
    shot(page, "09-demo-predict")
