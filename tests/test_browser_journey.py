"""The main journey in a real browser: headless Chromium drives `streamlit run app.py` on the demo set."""
import os
import re
from pathlib import Path

import pytest

from tests.browser_app import CHROMIUM, CHROMIUM_FLAGS, running_app

playwright = pytest.importorskip("playwright.sync_api")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "screenshots"


@pytest.fixture
def browser_page(binsight_home):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail("CI must run the browser test, but Debian's chromium is not installed")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with running_app(binsight_home) as url, playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        errors = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(url)
        yield page, errors
        browser.close()


def shot(page, name: str) -> None:
    wait_idle(page)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


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


def test_main_journey(browser_page, tmp_path):
    page, errors = browser_page
    try:
        journey(page, errors, tmp_path)
    except BaseException:
        page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)
        raise


def journey(page, errors, tmp_path):

    # Overview: the demo set is generated on first start and its distribution drawn
    page.get_by_role("heading", name="Overview", exact=True).wait_for(timeout=120_000)
    page.locator('[data-testid="stPlotlyChart"]').first.wait_for(timeout=120_000)
    wait_idle(page)
    assert page.locator('[data-testid="stMetricValue"]').first.inner_text().strip() != ""
    shot(page, "01-overview")

    # Browse: a grid of bins; open one and read its items
    go_to(page, "Browse")
    page.locator('[data-testid="stImage"]').nth(5).wait_for()
    opened = page.get_by_role("button", name=re.compile(r"\.jpg · [1-5]$")).first
    name = opened.inner_text().split(" · ")[0]
    opened.click()
    dialog = page.get_by_role("dialog")
    dialog.locator('[data-testid="stDataFrame"]').wait_for()  # the photo's metadata items
    dialog.get_by_text(name).first.wait_for()
    assert dialog.locator('[data-testid="stImage"]').count() == 1
    shot(page, "02-browse-photo")
    page.keyboard.press("Escape")
    dialog.wait_for(state="hidden")

    # Train: a quick frozen job runs in the background until done
    go_to(page, "Train")
    choose(page, "Image height (px)", "128")
    page.get_by_role("button", name="Launch training").click()
    finished = page.locator('[data-testid="stExpander"]', has_text="Recent finished jobs")
    finished.wait_for(timeout=300_000)
    wait_idle(page)
    finished.locator("summary").first.click()
    finished.get_by_text(re.compile(r"^Done in")).first.wait_for()
    shot(page, "03-train-done")

    # Evaluate: metrics, the confusion matrix, and the photos of one cell
    go_to(page, "Evaluate")
    page.get_by_role("heading", name="Confusion matrix").wait_for(timeout=180_000)
    wait_idle(page)
    choose(page, "True count", "3")
    choose(page, "Predicted count", "3")
    page.get_by_text(re.compile(r"photos\s+with true count 3 predicted as 3")).wait_for()
    shot(page, "04-evaluate-cell")

    # Predict: upload a real demo photo and a broken file; one gets a count, the other its message
    go_to(page, "Predict")
    demo_photo = binsight_photo(page)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"this is not a photo")
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files([str(demo_photo), str(broken)])
    page.get_by_text(re.compile(r"→ \d+ objects")).first.wait_for(timeout=120_000)
    page.locator('[data-testid="stAlertContentError"]', has_text=re.compile(r"^broken\.jpg: .*not a photo")).wait_for()
    page.get_by_text(re.compile(r"Counted with (OpenVINO|ONNX Runtime) \(fp32\): within")).wait_for()
    wait_idle(page)
    shot(page, "05-predict")

    assert errors == []


def binsight_photo(page) -> Path:
    """A demo photo from this app's own BINSIGHT_HOME."""
    import os

    photos = sorted((Path(os.environ["BINSIGHT_HOME"]) / "demo" / "bin-images").glob("*.jpg"))
    assert photos
    return photos[0]
