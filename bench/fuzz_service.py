"""Fuzz `core serve` with a larger budget than the test suite's: schemathesis, generated photos and hand-written
requests against a real `python -m core serve` process; prints examples and answers per target, internal errors
logged, and the server's memory (RSS) after warm-up, at its peak and at the end.

    python bench/fuzz_service.py [--examples 500] [--targets schema,photos,headers]

The same generators and checks as tests/test_fuzz_service.py (fixed seed), on a small model in a temporary
BINSIGHT_HOME; s3:// URIs in generated bodies go to a closed local port, never the internet.
"""
from __future__ import annotations

import argparse
import warnings
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.test_fuzz_service import closed_port, fuzz_headers, fuzz_photos, fuzz_schema  # noqa: E402
from tests.test_serve import small_model  # noqa: E402

TARGETS = {"schema": lambda url, port, n: fuzz_schema(url, n), "photos": lambda url, port, n: fuzz_photos(url, n),
           "headers": lambda url, port, n: fuzz_headers(port, n)}


class Peak:
    """The largest RSS of a process, sampled every `every` seconds on a thread."""

    def __init__(self, process: psutil.Process, every: float = 0.2):
        self.process, self.every, self.mb = process, every, 0.0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopped.wait(self.every):
            try:
                self.mb = max(self.mb, self.process.memory_info().rss / 2**20)
            except psutil.Error:
                return

    def stop(self) -> float:
        self.stopped.set()
        self.thread.join()
        return self.mb


def start_server(home: Path, log) -> tuple[subprocess.Popen, str, int]:
    model = small_model(home / "runs" / "fuzz-model")
    port = closed_port()
    env = {**os.environ, "BINSIGHT_HOME": str(home), "BINSIGHT_S3_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}"}
    server = subprocess.Popen([sys.executable, "-m", "core", "serve", "--model", str(model), "--port", str(port)],
                              cwd=Path(__file__).resolve().parents[1], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}; see {log.name}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return server, url, port
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise RuntimeError(f"the server did not answer /ping within 180 s; see {log.name}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=500, help="generated examples per target")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated, from " + ", ".join(TARGETS))
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="PIL")  # the checks decode damaged photos on purpose
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if [t for t in targets if t not in TARGETS] or args.examples < 1:
        parser.error(f"targets are {', '.join(TARGETS)} and examples ≥ 1")
    home = Path(tempfile.mkdtemp(prefix="binsight-fuzz-"))
    failures = 0
    with open(home / "server.log", "w+") as log:
        server, url, port = start_server(home, log)
        process = psutil.Process(server.pid)
        try:
            fuzz_photos(url, 5)  # warm-up: the first requests load what every later one uses
            rss_start = process.memory_info().rss / 2**20
            peak = Peak(process)
            for target in targets:
                started = time.monotonic()
                try:
                    answers = dict(TARGETS[target](url, port, args.examples))
                    outcome = "ok"
                except Exception as exc:  # noqa: BLE001 — a failed property is the finding: print it, go on
                    failures += 1
                    answers, outcome = {}, f"FAILED: {type(exc).__name__}: {str(exc)[:400]}"
                print(f"{target}: {args.examples} examples in {time.monotonic() - started:.0f} s, {outcome}; "
                      f"answers {answers}", flush=True)
            alive = server.poll() is None and httpx.get(f"{url}/ping", timeout=30).status_code == 200
            rss_end = process.memory_info().rss / 2**20
            rss_peak = max(peak.stop(), rss_end)
        finally:
            server.terminate()
            server.wait(30)
        log.seek(0)
        internal = [line.strip() for line in log if " ERROR " in line]
    print(f"server up at the end: {alive}; internal errors logged: {len(internal)}")
    print(f"server RSS: {rss_start:.0f} MB after warm-up, {rss_peak:.0f} MB at peak, {rss_end:.0f} MB at the end "
          f"({100 * (rss_end - rss_start) / rss_start:+.1f} %)")
    for line in internal[:10]:
        print("  ", line)
    return 1 if failures or internal or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
