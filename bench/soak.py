"""Soak: N browser sessions at once cycle through the app's pages for T seconds while a training job runs; prints page
errors, HTTP 5xx answers, exceptions (shown on a page or logged by the server), p50/p95 page time, the server's memory
(at start, once every session has been round the pages, at its peak and at the end) and spot-check decisions saved
vs attempted, each against its target.

    python bench/soak.py --sessions 10 --seconds 300 [--data DIR] [--pages Overview,Browse,...]

One `streamlit run app.py` on 127.0.0.1 (a free port), headless Debian Chromium with one context per session. The
dataset is a small real ABID subset (../shared/abid, else the demo set) in a temporary BINSIGHT_HOME, with a quick
model trained first so Evaluate, Predict and Spot-check have one; then a longer training is queued and runs meanwhile.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.browser_app import CHROMIUM, CHROMIUM_FLAGS, running_app  # noqa: E402

PAGES = ("Overview", "Browse", "Evaluate", "Predict", "Spot-check")
MAX_CYCLES = 1000  # per session: the time budget ends a soak long before this
STEP_TIMEOUT_MS = 180_000
BACKGROUND_EPOCHS = 200  # the training that runs during the soak; cancelled at the end
MEMORY_EVERY_S = 2.0
MAX_RSS_GROWTH_PCT = 10.0  # target: server memory after the soak within 10 % of its warmed-up size


# ---------------------------------------------------------------------------------------------- the world

def prepare(home: Path, data: Path | None) -> Path:
    """The dataset (a small real subset unless given) and a current model, in BINSIGHT_HOME=home."""
    os.environ["BINSIGHT_HOME"] = str(home)
    if data is None:
        from tests.conftest import make_abid_subset

        data = make_abid_subset(home.parent / "soak_data", per_class=12)
    from core.jobs.runs import register_run, set_current_run
    from core.training.config import TrainConfig
    from core.training.loop import train

    out = home / "runs" / "soak-model"
    train(TrainConfig(data=str(data), out=str(out), mode="frozen", epochs=1, image_size=96, batch_size=8,
                      device="cpu", seed=0, num_workers=0))
    set_current_run(register_run(out).id)
    return data


def start_training(data: Path, mode: str):
    """Queue a long training (its worker starts now); it is cancelled when the soak ends."""
    from core.data.layouts.registry import load_dataset
    from core.jobs import worker
    from core.jobs.params import describe_dataset

    facts = describe_dataset(load_dataset(str(data)))
    params = {**facts, "backbone": "efficientnet_lite0", "mode": mode, "epochs": BACKGROUND_EPOCHS,
              "image_size": 96, "batch_size": 8, "balance": "weights", "device": "cpu"}
    return worker.launch("train", params, user="soak")


def server_process() -> psutil.Process:
    """The `streamlit run` process started by running_app (a child of this process)."""
    for child in psutil.Process().children(recursive=True):
        try:
            if "streamlit" in " ".join(child.cmdline()):
                return child
        except psutil.Error:
            continue
    raise RuntimeError("the streamlit server process was not found")


def stop_workers() -> None:
    """End the job workers of this soak's BINSIGHT_HOME (they would otherwise idle for minutes before leaving)."""
    from core.jobs import queue as jobs

    for registered in jobs.list_workers():
        try:
            process = psutil.Process(int(registered["pid"]))
            if process.environ().get("BINSIGHT_HOME") == os.environ["BINSIGHT_HOME"]:
                process.terminate()
        except (psutil.Error, KeyError, TypeError, ValueError):
            continue


def saved_decisions(data: Path, annotators: set[str]) -> int:
    from core.data.labels import annotations
    from core.data.layouts.registry import load_dataset

    trail = annotations.history(load_dataset(str(data)).key)
    return int(trail["annotator"].isin(annotators).sum()) if len(trail) else 0


# ---------------------------------------------------------------------------------------------- one session

class Session:
    """One browser context going round the pages; what it measured."""

    def __init__(self, index: int, url: str, photos: list[Path], pages: tuple[str, ...]):
        self.name = f"soak-{index}"
        self.url, self.photos, self.pages = url, photos, pages
        self.times: list[float] = []
        self.errors: list[str] = []
        self.server_errors: list[str] = []  # HTTP answers ≥ 500 the browser got
        self.exceptions = 0  # Streamlit exception boxes shown on a page
        self.attempted = 0
        self.uploads = 0
        self.rounds = 0  # times this session went round every page

    async def run(self, browser, deadline: float) -> None:
        context = await browser.new_context(viewport={"width": 1300, "height": 900})
        page = await context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_MS)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("response", lambda r: self.server_errors.append(f"{r.status} {r.url}") if r.status >= 500 else None)
        try:
            await page.goto(f"{self.url}/?annotator={self.name}")
            await page.get_by_role("heading", name="Overview", exact=True).wait_for()
            for _ in range(MAX_CYCLES):
                for title in self.pages:
                    if time.monotonic() >= deadline:
                        return
                    await self.step(page, title)
                self.rounds += 1
        finally:
            await context.close()

    async def step(self, page, title: str) -> None:
        started = time.monotonic()
        try:
            await page.locator('[data-testid="stSidebarNav"] a', has_text=title).click()
            await page.get_by_role("heading", name=title, exact=True).wait_for()
            await STEPS[title](self, page)
            await wait_idle(page)
            # the page is shown when its photos are: leaving earlier would make Streamlit drop them mid-download (404)
            await page.wait_for_function("Array.from(document.images).every(image => image.complete)")
            shown = await page.locator('[data-testid="stException"]').count()
            if shown:
                self.exceptions += shown
                self.errors.append(f"{title}: {await page.locator('[data-testid=stException]').first.inner_text()}")
            self.times.append(time.monotonic() - started)
        except Exception as exc:  # a timeout or a vanished element: counted, then start the page afresh
            self.errors.append(f"{title}: {type(exc).__name__}: {str(exc).splitlines()[0]}")
            await page.goto(f"{self.url}/?annotator={self.name}")


async def wait_idle(page) -> None:
    await page.wait_for_timeout(300)
    await page.locator('[data-testid="stStatusWidget"]').wait_for(state="hidden", timeout=STEP_TIMEOUT_MS)


async def overview(session: Session, page) -> None:
    await page.locator('[data-testid="stPlotlyChart"]').first.wait_for()


async def browse(session: Session, page) -> None:
    await page.locator('[data-testid="stImage"]').first.wait_for()


async def evaluate(session: Session, page) -> None:
    await page.get_by_role("heading", name="Confusion matrix").wait_for()


async def predict(session: Session, page) -> None:
    photo = session.photos[session.uploads % len(session.photos)]
    session.uploads += 1
    await page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files([str(photo)])
    await page.get_by_text(re.compile(rf"{re.escape(photo.name)} → \d+( or \d+)? objects")).first.wait_for()


async def spot_check(session: Session, page) -> None:
    name_box = page.get_by_label("Your name — saved with each of your decisions")
    confirm = page.locator(".st-key-decide_confirm button")
    await name_box.or_(confirm).first.wait_for()
    if await name_box.count():
        await name_box.fill(session.name)
        await page.get_by_role("button", name="Start checking").click()
    await confirm.wait_for()
    await wait_idle(page)
    session.attempted += 1
    await confirm.click()
    await page.locator('[data-testid="stAlertContentSuccess"], [data-testid="stAlertContentWarning"]',
                       has_text="Saved").first.wait_for()


STEPS = {"Overview": overview, "Browse": browse, "Evaluate": evaluate, "Predict": predict, "Spot-check": spot_check}


# ---------------------------------------------------------------------------------------------- the soak

class Memory:
    """The server's RSS (MB) sampled while the soak runs; `warm` is taken once every session has been round the pages,
    or at half-time if one has not (the first round loads models, caches and page code that then stay: growth is
    measured from there)."""

    def __init__(self, server: psutil.Process):
        self.server = server
        self.start = self.rss()
        self.warm: float | None = None
        self.peak = self.start

    def rss(self) -> float:
        return self.server.memory_info().rss / 2**20

    async def watch(self, crowd: list[Session], deadline: float) -> None:
        halfway = (time.monotonic() + deadline) / 2  # slow pages may keep a session from going round: warm by then
        while time.monotonic() < deadline:
            await asyncio.sleep(MEMORY_EVERY_S)
            now = self.rss()
            self.peak = max(self.peak, now)
            if self.warm is None and (all(s.rounds >= 1 for s in crowd) or time.monotonic() >= halfway):
                self.warm = now


async def drive(url: str, sessions: int, seconds: float, photos: list[Path], pages: tuple[str, ...],
                memory: Memory) -> list[Session]:
    from playwright.async_api import async_playwright

    async with async_playwright() as driver:
        browser = await driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True)
        try:
            deadline = time.monotonic() + seconds
            crowd = [Session(i, url, photos[i::sessions] or photos, pages) for i in range(sessions)]
            await asyncio.gather(memory.watch(crowd, deadline), *(s.run(browser, deadline) for s in crowd))
            return crowd
        finally:
            await browser.close()


def server_tracebacks(log: Path) -> list[str]:
    """The last line of each traceback the app's server logged (an exception a page may not have shown)."""
    lines = log.read_text(errors="replace").splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            following = [later for later in lines[i + 1:i + 200] if later and not later.startswith((" ", "\t"))]
            found.append(following[0] if following else line)
    return found


def soak(sessions: int = 10, seconds: float = 300, data: Path | None = None, pages: tuple[str, ...] = PAGES,
         home: Path | None = None, training: str = "finetune") -> dict:
    """Run the soak while a `training`-mode job runs (finetune keeps the CPU busy; frozen is light); the figures as
    a dict (see report())."""
    from core.jobs import queue as jobs

    home = Path(home or tempfile.mkdtemp(prefix="binsight-soak-"))
    home.mkdir(parents=True, exist_ok=True)
    data = prepare(home, data)
    photos = sorted((data / "bin-images").glob("*.jpg"))
    with running_app(home, env={"BINSIGHT_DATA": str(data), "BINSIGHT_HOME": str(home)}) as url:
        memory = Memory(server_process())
        job = start_training(data, training)
        crowd = asyncio.run(drive(url, sessions, seconds, photos, pages, memory))
        rss_end = memory.rss()
        logged = server_tracebacks(home / "streamlit.log")  # read before the server is stopped
        job_status = jobs.get(job.id).status
        jobs.cancel(job.id)
        stop_workers()
    times = [t for s in crowd for t in s.times]
    warm = memory.warm or memory.start  # a soak too short for every session to go round: growth from the start
    attempted = sum(s.attempted for s in crowd)
    saved = saved_decisions(data, {s.name for s in crowd})
    return {
        "sessions": sessions, "seconds": seconds, "pages": list(pages),
        "page_views": len(times), "errors": [e for s in crowd for e in s.errors],
        "server_5xx": [e for s in crowd for e in s.server_errors],
        "exceptions_shown": sum(s.exceptions for s in crowd), "server_tracebacks": logged,
        "p50_s": float(np.percentile(times, 50)) if times else None,
        "p95_s": float(np.percentile(times, 95)) if times else None,
        "rss_start_mb": memory.start, "rss_warm_mb": memory.warm, "rss_peak_mb": max(memory.peak, rss_end),
        "rss_end_mb": rss_end, "rss_growth_pct": 100 * (rss_end - warm) / warm,
        "rounds": min(s.rounds for s in crowd),
        "attempted": attempted, "saved": saved, "lost": max(attempted - saved, 0),
        "training": training, "training_during_soak": job_status,
    }


def missed_targets(figures: dict) -> list[str]:
    """The targets this soak missed: 0 page errors, 0 5xx, 0 exceptions, 0 decisions lost, RSS growth < 10 %."""
    missed = []
    if figures["errors"]:
        missed.append(f"{len(figures['errors'])} page errors")
    if figures["server_5xx"]:
        missed.append(f"{len(figures['server_5xx'])} HTTP 5xx answers")
    if figures["exceptions_shown"] or figures["server_tracebacks"]:
        missed.append(f"{figures['exceptions_shown']} exceptions shown, {len(figures['server_tracebacks'])} logged")
    if figures["lost"]:
        missed.append(f"{figures['lost']} decisions lost")
    if figures["rss_growth_pct"] >= MAX_RSS_GROWTH_PCT:
        missed.append(f"server memory grew {figures['rss_growth_pct']:.1f} %")
    return missed


def report(figures: dict) -> str:
    lines = [f"{figures['sessions']} sessions × {figures['seconds']:.0f} s over {', '.join(figures['pages'])} "
             f"while a {figures['training']} training job ran (it was {figures['training_during_soak']} at the end)",
             f"page views: {figures['page_views']} (every session went round all pages {figures['rounds']} times), "
             f"page errors: {len(figures['errors'])}, HTTP 5xx: {len(figures['server_5xx'])}, "
             f"exceptions: {figures['exceptions_shown']} shown on pages, {len(figures['server_tracebacks'])} in the "
             "server log",
             f"page time p50 {figures['p50_s'] or 0:.2f} s, p95 {figures['p95_s'] or 0:.2f} s",
             f"server RSS: {figures['rss_start_mb']:.0f} MB at start, "
             + (f"{figures['rss_warm_mb']:.0f} MB once warm, " if figures["rss_warm_mb"] else
                "(some session never went round every page) ")
             + f"{figures['rss_peak_mb']:.0f} MB at peak, {figures['rss_end_mb']:.0f} MB at end "
             f"({figures['rss_growth_pct']:+.1f} % since {'then' if figures['rss_warm_mb'] else 'the start'})",
             f"spot-check decisions: {figures['saved']} saved of {figures['attempted']} attempted "
             f"({figures['lost']} lost)"]
    missed = missed_targets(figures)
    lines.append("targets met" if not missed else "targets missed: " + "; ".join(missed))
    lines += [f"  error: {e}" for e in figures["errors"][:20]]
    lines += [f"  5xx: {e}" for e in figures["server_5xx"][:10]]
    lines += [f"  logged: {e}" for e in figures["server_tracebacks"][:10]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=300)
    parser.add_argument("--data", type=Path, help="an ABID-layout folder (default: 12 real photos per class)")
    parser.add_argument("--training", choices=["finetune", "frozen"], default="finetune",
                        help="the mode of the training that runs meanwhile")
    parser.add_argument("--pages", default=",".join(PAGES), help="comma-separated, from " + ", ".join(PAGES))
    args = parser.parse_args(argv)
    pages = tuple(p.strip() for p in args.pages.split(",") if p.strip())
    unknown = [p for p in pages if p not in STEPS]
    if unknown or args.sessions < 1 or args.seconds <= 0:
        parser.error(f"unknown page(s) {unknown}" if unknown else "sessions ≥ 1 and seconds > 0")
    figures = soak(args.sessions, args.seconds, args.data, pages, training=args.training)
    print(report(figures))
    return 1 if missed_targets(figures) else 0


if __name__ == "__main__":
    sys.exit(main())
