"""The data-reader fuzz (tests/test_fuzz_readers.py) with a larger budget: every reader gets SCALE times the suite's
examples; prints the pytest summary and how long it took.

    python bench/fuzz_readers.py [--scale 20]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=20, help="times the suite's examples per reader (25 × scale)")
    args = parser.parse_args(argv)
    if args.scale < 1:
        parser.error("scale ≥ 1")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "pytest", "tests/test_fuzz_readers.py", "-q", "-p", "no:randomly",
                           "-p", "no:cacheprovider", "--durations=0"], cwd=ROOT,
                          env={**os.environ, "BINSIGHT_FUZZ_SCALE": str(args.scale)})
    print(f"{25 * args.scale} examples per reader (photo bytes: {150 * args.scale}) in "
          f"{time.monotonic() - started:.0f} s")
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
