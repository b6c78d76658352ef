"""Benchmark: index time for ../shared/abid and the 324,735-entry counting list, and Overview render time."""
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ABID = (ROOT / ".." / "shared" / "abid").resolve()


def timed(label, fn):
    start = time.perf_counter()
    result = fn()
    print(f"{label:<55} {time.perf_counter() - start:7.3f} s")
    return result


def main():
    if not ABID.is_dir():
        print("../shared/abid is absent: nothing to measure")
        return
    os.environ["BINSIGHT_HOME"] = tempfile.mkdtemp(prefix="binsight-bench-")
    from streamlit.testing.v1 import AppTest

    from core.data.layouts.registry import load_dataset

    for label, source in [("ABID folder (2,244 photos)", ABID),
                          ("counting list (324,735 pairs)", ABID / "lists" / "counting_train.json")]:
        timed(f"index {label}, first time", lambda: load_dataset(source))
        timed(f"index {label}, cached", lambda: load_dataset(source))
        os.environ["BINSIGHT_DATA"] = str(source)
        page = str(ROOT / "pages" / "overview.py")
        at = AppTest.from_file(page, default_timeout=120)
        timed(f"Overview first render, {label}", at.run)
        timed(f"Overview rerun (cached dataset), {label}", at.run)


if __name__ == "__main__":
    main()
