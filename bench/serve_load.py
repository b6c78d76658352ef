"""Load run against `python -m core serve`: concurrent clients posting real photos (and some bad bodies).

    python bench/serve_load.py [--model RUN_DIR/model.pt] [--seconds 60] [--clients 8] [--bad 0.05]
                               [--precision fp32|bf16]

Starts the service on 127.0.0.1 on a free port, sends photos from ../shared/abid (or the demo set) from
`--clients` threads for `--seconds` (at most `--max-requests` in all), a `--bad` share of them broken bodies
that must get 400, then prints throughput, latency percentiles, answers by status, how the batcher grouped
requests and the server's memory (RSS) before, every 10 s and after. "Before" is taken after a warm-up round (one
photo from each client at once), so that the first burst's one-off allocations (threads, allocator pools) are not
counted as growth. Without --model: the current model, else an EfficientNet-Lite0 of the fine-tune shape (288×395,
four views) with an untrained head.
"""
import argparse
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import httpx  # noqa: E402
from predict_speed import bench_photos, untrained_model  # noqa: E402

START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def bad_bodies(good: bytes) -> list[bytes]:
    return [b"", b"<!doctype html><html>502 Bad Gateway</html>", b"plain words, no photo", good[: len(good) // 4]]


def wait_until_up(url: str, server: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server did not answer /ping within {START_TIMEOUT_S} s")


def client_loop(url: str, bodies: list[bytes], bad: list[bytes], share_bad: float, until: float, budget: int,
                seed: int, records: list) -> None:
    chooser = random.Random(seed)
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(budget):
            if time.monotonic() >= until:
                break
            broken = chooser.random() < share_bad
            body = chooser.choice(bad if broken else bodies)
            started = time.perf_counter()
            try:
                status = http.post("/invocations", content=body, headers={"content-type": "image/jpeg"}).status_code
            except httpx.TransportError as exc:
                status = exc.__class__.__name__
            records.append((broken, status, (time.perf_counter() - started) * 1000))


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="RUN_DIR/model.pt (default: the current model, else an untrained Lite0)")
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--bad", type=float, default=0.05, help="share of requests with a broken body")
    parser.add_argument("--photos", type=int, default=200)
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    os.environ.setdefault("BINSIGHT_HOME", tempfile.mkdtemp(prefix="binsight-load-"))
    model = args.model
    if model is None:
        from core.jobs.runs import current_model_path

        model = current_model_path() or untrained_model(Path(tempfile.mkdtemp(prefix="binsight-load-model-")),
                                                        288, 1.37, "flips")
    bodies = [Path(p).read_bytes() for p in bench_photos(args.photos)]
    bad = bad_bodies(bodies[0])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "core", "serve", "--model", str(model), "--host", "127.0.0.1",
                               "--port", str(port), "--precision", args.precision], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(url, server)
        warm_up = [threading.Thread(target=httpx.post, args=(f"{url}/invocations",),
                                    kwargs={"content": bodies[i % len(bodies)], "timeout": 120,
                                            "headers": {"content-type": "image/jpeg"}}) for i in range(args.clients)]
        for thread in warm_up:
            thread.start()
        for thread in warm_up:
            thread.join(180)
        rss_before = rss_mb(server.pid)
        records: list = []
        until = time.monotonic() + args.seconds
        budget = max(1, args.max_requests // args.clients)
        threads = [threading.Thread(target=client_loop, args=(url, bodies, bad, args.bad, until, budget, i, records))
                   for i in range(args.clients)]
        samples: list[float] = []
        stop_sampling = threading.Event()

        def sample_rss():
            while not stop_sampling.wait(10):
                samples.append(rss_mb(server.pid))

        sampler = threading.Thread(target=sample_rss, daemon=True)
        started = time.perf_counter()
        sampler.start()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(args.seconds + 120)
        stop_sampling.set()
        elapsed = time.perf_counter() - started
        rss_after = rss_mb(server.pid)
        described = httpx.get(f"{url}/model", timeout=30).json()
        alive = httpx.get(f"{url}/ping", timeout=30).status_code == 200
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    good = [ms for broken, status, ms in records if not broken and status == 200]
    statuses = Counter(f"{'bad' if broken else 'good'} body → {status}" for broken, status, _ in records)
    wrong = sum(1 for broken, status, _ in records if status != (400 if broken else 200))
    print(f"model {described['model']} ({described['engine']} {described['precision']}, "
          f"input {described['input_size']}, {len(described['tta_views'])} views); {args.clients} clients for {elapsed:.1f} s; "
          f"load average {os.getloadavg()[0]:.1f} (shared machine: figures move with the neighbours' load)")
    print(f"requests {len(records):,}: {len(records) / elapsed:.1f} requests/s, {len(good) / elapsed:.1f} photos/s")
    if good:
        print(f"latency of photos (ms): p50 {percentile(good, 50):.0f}  p95 {percentile(good, 95):.0f}  "
              f"p99 {percentile(good, 99):.0f}  max {max(good):.0f}")
    print("answers: " + ", ".join(f"{k}: {v:,}" for k, v in sorted(statuses.items())))
    print(f"unexpected answers: {wrong}; server up at the end: {alive}")
    batching = described["batching"]
    print(f"batcher: {batching['forward_passes']:,} forward passes for {batching['requests_served']:,} requests "
          f"({batching['shared_passes']:,} shared), largest batch {batching['largest_batch']}")
    print(f"server RSS: {rss_before:.0f} MB before, {rss_after:.0f} MB after "
          f"({(rss_after / rss_before - 1):+.1%}); every 10 s: {', '.join(f'{mb:.0f}' for mb in samples)}")


if __name__ == "__main__":
    main()
