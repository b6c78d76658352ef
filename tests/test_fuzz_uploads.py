"""Generated files given to the app through AppTest: the Predict page's uploads, and Spot-check on photos damaged after
indexing. A message per bad file, the good ones still counted (and decisions still saved); never an exception."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from streamlit.testing.v1 import AppTest

from core.data.photos import uploads
from core.data.photos.images import unreadable_name
from core.data.photos.uploads import photo_problem
from tests.test_fuzz_service import declared_png, encode, images, photos
from tests.test_serve import small_model

PAGES = Path(__file__).resolve().parents[1] / "app_pages"
# no shrinking: each example is a whole page run; a failure is reported as generated (print_blob reproduces it)
FUZZ = settings(derandomize=True, deadline=None, database=None, print_blob=True, phases=[Phase.explicit, Phase.generate],
                suppress_health_check=list(HealthCheck))
_numbered = itertools.count()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small model (exported once, for the whole module) to count the good uploads."""
    return small_model(tmp_path_factory.mktemp("fuzz_uploads_run") / "fuzz-model").parent


@pytest.fixture
def current_model(model_dir):
    from core.jobs.runs import current_run, register_run

    register_run(model_dir)
    assert current_run().id == model_dir.name


def staged_names(names: list[str]) -> list[str]:
    """The names the page shows: made safe, and unique within the batch."""
    taken, shown = set(), []
    for name in names:
        unique = uploads._unique(uploads.safe_name(name), taken)
        taken.add(unique)
        shown.append(unique)
    return shown


# a browser never sends a NUL in a file name (Streamlit itself refuses one before the page sees it)
upload_names = st.tuples(st.text(st.characters(blacklist_characters="\0"), max_size=30),
                         st.sampled_from([".jpg", ".jpeg", ".png", ".webp", ".bmp", ".JPG"])).map("".join)
batches = st.lists(st.tuples(upload_names, photos | images), min_size=1, max_size=6)


def test_generated_upload_batches_get_a_message_per_bad_file_and_the_good_ones_counted(current_model):
    seen = {"good": 0, "bad": 0}

    @settings(FUZZ, max_examples=6)
    @given(batch=batches)
    def upload(batch):
        at = AppTest.from_file(str(PAGES / "predict.py"), default_timeout=120).run()
        files = [(name, data, "image/jpeg") for name, data in batch]
        at.file_uploader(key="predict_files").set_value(files).run()
        assert not at.exception, [e.value for e in at.exception]
        names = staged_names([name for name, _ in batch])
        problems = {name: photo_problem(data, name) for name, (_, data) in zip(names, batch)}
        bad = [name for name in names if problems[name]]
        metrics = {m.label: m.value for m in at.metric}
        assert metrics["Photos predicted"] == str(len(names) - len(bad))
        assert metrics["Could not be read"] == str(len(bad))
        assert sorted(e.value for e in at.error) == sorted(problems[name] for name in bad)
        seen["good"] += len(names) - len(bad)
        seen["bad"] += len(bad)

    upload()
    print("uploads:", seen)
    assert seen["good"] >= 3 and seen["bad"] >= 3


damage = st.one_of(images.filter(lambda data: photo_problem(data, "x") is not None),
                   st.builds(declared_png, st.just(9000), st.just(9000)))


def test_spot_check_on_photos_damaged_after_indexing_says_so_and_saves_every_decision(tmp_path, monkeypatch):
    from core.data.labels import annotations
    from core.data.layouts.registry import load_dataset

    @settings(FUZZ, max_examples=4)
    @given(damaged=st.lists(damage, min_size=1, max_size=3))
    def check(damaged):
        source = tmp_path / f"spot{next(_numbered)}"
        (source / "bin-images").mkdir(parents=True)
        names = [f"{i:03d}.jpg" for i in range(len(damaged) + 2)]
        for i, name in enumerate(names):
            (source / "bin-images" / name).write_bytes(encode("RGB", (40, 30), "JPEG", 1, None, i))
        (source / "labels.csv").write_text("image,count\n" + "".join(f"{n},{i % 5 + 1}\n" for i, n in enumerate(names)))
        monkeypatch.setenv("BINSIGHT_DATA", str(source))
        key = load_dataset(source).key  # indexed while every photo is good
        for name, data in zip(names, damaged):
            (source / "bin-images" / name).write_bytes(data)
        at = AppTest.from_file(str(PAGES / "spot_check.py"), default_timeout=120)
        at.user = {}
        at = at.run()
        assert not at.exception and not at.error, ([e.value for e in at.exception], [e.value for e in at.error])
        at.text_input(key="annotator_input").input("fuzz")
        at = at.button[0].click().run()
        # the page indexes the folder again: a photo whose header is unreadable now is listed as a problem, not queued
        flagged = dict(load_dataset(source).problems)
        queue = list(at.session_state["spot_queue"])
        assert sorted(queue) == sorted(n for n in names if n not in flagged)
        for name in names[:len(damaged)]:
            assert name in queue or "not a readable image" in flagged[name], name
        cannot_show = 0
        for _ in queue:
            assert not at.exception, [e.value for e in at.exception]
            name = queue[at.session_state["spot_pos"]]
            if name in names[:len(damaged)]:
                assert any("This photo cannot be shown" in e.value and name in e.value for e in at.error), name
                cannot_show += 1
            at.button(key="decide_unclear").click().run()
        assert not at.exception
        shown["cannot be shown"] += cannot_show
        shown["left out as problems"] += len(flagged)
        saved = annotations.latest_decisions(key)
        assert sorted(saved["photo"]) == sorted(queue)  # every decision attempted is saved

    shown = {"cannot be shown": 0, "left out as problems": 0}
    check()
    print("spot-check:", shown)
    assert shown["cannot be shown"] >= 1


# names as file systems hold them: text, or bytes that are not UTF-8 at all (from an old zip, say)
folder_names = st.tuples(st.one_of(st.text(st.characters(blacklist_characters="/\0", blacklist_categories=["Cs"]),
                                           min_size=1, max_size=10).map(str.encode),
                                   st.binary(min_size=1, max_size=10).filter(lambda b: b"/" not in b and b"\0" not in b)),
                         st.sampled_from([b".jpg", b".png", b".JPEG", b".txt"])).map(b"".join)


def test_a_local_folder_of_generated_files_and_names_gets_a_message_per_bad_file(current_model, tmp_path, monkeypatch):
    seen = {"good": 0, "bad": 0}

    @settings(FUZZ, max_examples=4)
    @given(files=st.lists(st.tuples(folder_names, st.one_of(photos, photos, images)), min_size=1, max_size=5,
                          unique_by=lambda item: item[0].lower()).filter(
        lambda files: all(name.lower() != b"0 good.jpg" for name, _ in files)))
    def predict_folder(files):
        folder = tmp_path / f"folder{next(_numbered)}"
        folder.mkdir()
        files = [(b"0 good.jpg", encode("RGB", (40, 30), "JPEG", 1, None, len(files)))] + files  # one sure to count
        for name, data in files:
            with open(os.path.join(os.fsencode(folder), name), "wb") as handle:
                handle.write(data)
        photo_files = [(os.fsdecode(n), d) for n, d in files if not n.lower().endswith(b".txt")]
        at = AppTest.from_file(str(PAGES / "predict.py"), default_timeout=120).run()
        at.radio(key="predict_origin").set_value("Local folder").run()
        at.text_input(key="predict_folder").input(str(folder)).run()
        assert not at.exception, [e.value for e in at.exception]
        bad = [name for name, data in photo_files if unreadable_name(name) or photo_problem(data, name)]
        metrics = {m.label: m.value for m in at.metric}
        assert metrics["Photos predicted"] == str(len(photo_files) - len(bad))
        assert metrics["Could not be read"] == str(len(bad)) and len(at.error) == len(bad)
        seen["good"] += len(photo_files) - len(bad)
        seen["bad"] += len(bad)

    predict_folder()
    print("local folder:", seen)
    assert seen["bad"] >= 3
