"""Starting the real app (`streamlit run app.py`) on a free localhost port, and a headless Chromium for it."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


URL_LINE = re.compile(r"URL: (http://127\.0\.0\.1:\d+)")


@contextmanager
def running_app(home: Path, env: dict | None = None, timeout: float = 90):
    """Yield the URL of `streamlit run app.py` with BINSIGHT_HOME=home; stopped afterwards, also on failure.

    The server picks a free port itself (port 0) and prints it; the URL is read from its output.
    """
    environment = {**os.environ, "BINSIGHT_HOME": str(home), **(env or {})}
    environment.pop("BINSIGHT_DATA", None) if env is None or "BINSIGHT_DATA" not in env else None
    log_path = home / "streamlit.log"
    log = open(log_path, "w")
    process = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", "0",
         "--server.address", "127.0.0.1", "--server.headless", "true"],
        cwd=ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        url = wait_until_serving(process, log_path, timeout)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def wait_until_serving(process: subprocess.Popen, log_path: Path, timeout: float) -> str:
    """The app's URL once its health endpoint answers; RuntimeError with its output if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        found = URL_LINE.search(log_path.read_text())
        if found:
            try:
                urllib.request.urlopen(found[1] + "/_stcore/health", timeout=2)
                return found[1]
            except OSError:
                pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"streamlit did not start: {log_path.read_text()[-2000:]}")
        time.sleep(0.2)  # polling the condition above, not waiting a guessed time
