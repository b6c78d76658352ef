"""The first hour on a dataset from an empty BINSIGHT_HOME: Data health, then a partial fine-tune that reuses its pass.
Prints each step's wall time and CPU time (user + system: on a busy machine, CPU time ÷ cores is what a quiet one
would take) and the fine-tune's test balanced accuracy.

    python bench/first_hour.py --data ../shared/abid [--train-args "--ensemble 5"] [--home /tmp/first-hour]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and its children)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - started, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--home", default=None, help="an empty folder for BINSIGHT_HOME (default: a new temporary one)")
    parser.add_argument("--train-args", default="", help="more options for `core train --mode partial`")
    args = parser.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="first-hour-"))
    if home.exists() and any(home.iterdir()):
        print(f"{home} is not empty: the first hour starts from an empty BINSIGHT_HOME", file=sys.stderr)
        return 2
    env = os.environ | {"BINSIGHT_HOME": str(home)}
    run = home / "run"
    steps = {
        "data health": [sys.executable, "-m", "core", "health", "--data", args.data],
        "partial fine-tune": [sys.executable, "-m", "core", "train", "--data", args.data, "--mode", "partial",
                              "--out", str(run), *shlex.split(args.train_args)],
    }
    total_wall = total_cpu = 0.0
    for name, command in steps.items():
        wall, cpu = timed(command, env)
        total_wall, total_cpu = total_wall + wall, total_cpu + cpu
        print(f"{name:18s} wall {wall / 60:5.1f} min   CPU {cpu / 60:5.1f} min", flush=True)
    metrics = json.loads((run / "metrics.json").read_text())
    print(f"{'total':18s} wall {total_wall / 60:5.1f} min   CPU {total_cpu / 60:5.1f} min   "
          f"({os.cpu_count()} cores)")
    print(f"stage maps: {metrics.get('feature_cache_hits')} read, {metrics.get('features_computed')} computed by the "
          f"fine-tune (Data health's pass reused)")
    print(f"test balanced accuracy {metrics['test']['balanced_accuracy']:.3f}, off-by-one "
          f"{metrics['test'].get('off_by_one', float('nan')):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
