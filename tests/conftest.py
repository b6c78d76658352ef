"""Shared fixtures: a private BINSIGHT_HOME per test, empty Streamlit caches, the demo set, small real ABID folders,
small trained runs (each test gets its own copy of their home), S3 relays; servers and workers stopped after use."""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABID = (ROOT / ".." / "shared" / "abid").resolve()

# Under pytest-xdist each test process gets its share of the cores (and so do the trainings, workers and servers it
# starts): PyTorch's default of one thread per core in each process oversubscribes them, and spinning threads cost
# the suite a fifth more CPU time.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


def wait_for(condition, timeout: float, what: str, every: float = 0.1):
    """The condition's first truthy value, polled until `timeout` seconds; a clear failure naming `what` after that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture(autouse=True)
def binsight_home(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own BINSIGHT_HOME and no configured dataset; workers it started are stopped after it."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("BINSIGHT_HOME", str(home))
    monkeypatch.delenv("BINSIGHT_DATA", raising=False)
    monkeypatch.setenv("BINSIGHT_DEMO_MODEL", "0")  # no demo model trained behind a test's back (one test asks for it)
    # Pages refuse paths outside the data roots: tests type paths under their own temporary folders and ../shared/abid
    monkeypatch.setenv("BINSIGHT_DATA_ROOTS", os.pathsep.join([str(tmp_path_factory.getbasetemp()), str(ABID)]))
    yield home
    stop_detached_workers(home)


@pytest.fixture(autouse=True)
def fresh_streamlit_caches():
    """Streamlit's st.cache_data / st.cache_resource live in this process: empty them around every test."""
    clear_streamlit_caches()
    yield
    clear_streamlit_caches()


def clear_streamlit_caches() -> None:
    if "streamlit" in sys.modules:  # nothing can be cached before a page test imported streamlit
        import streamlit as st

        st.cache_data.clear()
        st.cache_resource.clear()


@pytest.fixture(scope="session", autouse=True)
def stop_s3_server_at_the_end():
    """The moto S3 server (tests/moto_s3.py), if a test started one, is stopped when the session ends."""
    yield
    if "tests.moto_s3" in sys.modules:
        sys.modules["tests.moto_s3"].stop_shared_world()


@pytest.fixture
def relay():
    """Make tests.moto_s3.Relay's in front of the S3 server; every one made is stopped after the test, passed or not."""
    from tests.moto_s3 import Relay

    made = []

    def make(*args, **kwargs) -> Relay:
        made.append(Relay(*args, **kwargs))
        return made[-1]

    yield make
    for each in made:
        each.stop()


def stop_detached_workers(home: Path) -> None:
    """Kill the `python -m core worker` processes (detached, so pytest would leave them) serving `home`."""
    wanted = f"BINSIGHT_HOME={home}".encode()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if b"worker" not in cmdline or b"core" not in cmdline:
                continue
            if wanted in (proc / "environ").read_bytes().split(b"\0"):
                os.kill(int(proc.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue


@pytest.fixture
def abid_dir() -> Path:
    """The real ABID photos in ../shared/abid; the test is skipped when they are absent."""
    if not (ABID / "bin-images").is_dir():
        pytest.skip("../shared/abid is not present")
    return ABID


@pytest.fixture(scope="session")
def demo_source(tmp_path_factory) -> Path:
    """The embedded demo set, generated once per session (read-only for tests)."""
    from core.data.layouts.demo import generate_demo

    return generate_demo(tmp_path_factory.mktemp("demo_source"))


def make_abid_subset(target: Path, per_class: int, counts=(1, 2, 3, 4, 5), with_metadata=True) -> Path:
    """A small ABID-layout folder: `per_class` real photos of each count from ../shared/abid (or the demo set)."""
    import pandas as pd

    source = ABID if (ABID / "bin-images").is_dir() else None
    if source is None:
        from core.data.layouts.demo import generate_demo

        source = generate_demo(target.parent / f"{target.name}_demo_source")
        labels = pd.DataFrame(
            [{"image": p.stem + ".jpg", "count": __import__("json").loads(p.read_text())["EXPECTED_QUANTITY"]}
             for p in sorted((source / "metadata").glob("*.json"))]
        )
    else:
        labels = pd.read_csv(source / "labels.csv")
    (target / "bin-images").mkdir(parents=True, exist_ok=True)
    chosen = []
    for count in counts:
        names = labels[labels["count"] == count]["image"].head(per_class).tolist()
        chosen += [(n, count) for n in names]
    for name, count in chosen:
        shutil.copy(source / "bin-images" / name, target / "bin-images" / name)
        meta = source / "metadata" / (Path(name).stem + ".json")
        if with_metadata and meta.is_file():
            (target / "metadata").mkdir(exist_ok=True)
            shutil.copy(meta, target / "metadata" / meta.name)
    pd.DataFrame(chosen, columns=["image", "count"]).to_csv(target / "labels.csv", index=False)
    return target


@pytest.fixture
def small_abid(tmp_path) -> Path:
    """12 real photos of each count 1–5 in ABID layout (from ../shared/abid, else the demo set)."""
    return make_abid_subset(tmp_path / "small_abid", per_class=12)


@pytest.fixture(scope="session")
def small_runs(tmp_path_factory) -> dict:
    """Two small frozen runs trained once per session in their own BINSIGHT_HOME (shared by report and page tests).

    {"home": Path, "data": Path (60 real photos, ABID layout), "runs": {"baseline": Path, "better": Path}}
    """
    from core.training.config import TrainConfig
    from core.training.loop import train

    home = tmp_path_factory.mktemp("runs_home")
    data = make_abid_subset(tmp_path_factory.mktemp("runs_data") / "small_abid", per_class=12)
    runs = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BINSIGHT_HOME", str(home))
        for name, epochs, seed in (("baseline", 1, 0), ("better", 3, 1)):
            out = home / "runs" / name
            train(TrainConfig(data=str(data), out=str(out), mode="frozen", epochs=epochs, image_size=96,
                              batch_size=16, device="cpu", seed=seed, num_workers=0))
            runs[name] = out
    return {"home": home, "data": data, "runs": runs}


@pytest.fixture
def shared(small_runs, binsight_home, monkeypatch) -> dict:
    """The shared runs in a copy of their BINSIGHT_HOME that is this test's own, with the dataset pointing at them.

    What a test writes (caches, current model, splits, annotations) stays in its copy; the trained runs and the
    dataset are the session's and are not changed.
    {"home": this test's copy, "data": the session's photos, "runs": {"baseline": Path, "better": Path} in the copy}
    """
    home = binsight_home / "shared_home"
    shutil.copytree(small_runs["home"], home, copy_function=link_or_copy)
    monkeypatch.setenv("BINSIGHT_HOME", str(home))
    monkeypatch.setenv("BINSIGHT_DATA", str(small_runs["data"]))
    return {"home": home, "data": small_runs["data"],
            "runs": {name: home / path.relative_to(small_runs["home"]) for name, path in small_runs["runs"].items()}}


def link_or_copy(source: str, target: str) -> None:
    """Big model and feature files are hard-linked (the code replaces files, never rewrites them); the rest copied."""
    if Path(source).suffix in {".pt", ".npy", ".npz"}:
        os.link(source, target)
    else:
        shutil.copy2(source, target)


@pytest.fixture
def runs(small_runs) -> dict:
    """The shared runs, used from this test's own (empty) BINSIGHT_HOME: nothing cached yet."""
    return small_runs


@pytest.fixture
def served_files(monkeypatch):
    """read(download_button) -> the bytes the button really serves, from AppTest's in-memory media store."""
    import streamlit.testing.v1.app_test as app_test
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    stores = []

    class Recording(MemoryMediaFileStorage):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            stores.append(self)

    monkeypatch.setattr(app_test, "MemoryMediaFileStorage", Recording)

    def read(button) -> bytes:
        file_id = button.proto.url.rsplit("/", 1)[-1].split(".")[0]
        for store in reversed(stores):
            try:
                return store.get_file(file_id).content
            except Exception:  # not in this run's store
                continue
        raise AssertionError(f"no file served at {button.proto.url}")

    return read

