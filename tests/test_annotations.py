"""Spot-check decisions: durable under SIGKILL, no lost update between processes, overrides, queues and CSV export."""
import os
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from core import db
from core.cli import main as cli_main
from core.data.labels import annotations
from core.data.classes import ClassRange
from core.data.layouts.registry import load_dataset
from core.review.queue import QueueError, build_queue

ROOT = Path(__file__).resolve().parents[1]

# A writer says "ready" once imported, waits for a line on stdin (the start signal), then saves and prints each id.
WRITER = """
import sys
from core.data.labels.annotations import save_decision
who, n = sys.argv[1], int(sys.argv[2])
print("ready", flush=True)
sys.stdin.readline()
for i in range(n):
    saved = save_decision("shared", f"bin{i % 5}.jpg", who, (i * 7 + len(who)) % 6, recorded_count=1, note=f"{who} {i}")
    print(saved.decision.id, flush=True)
"""


class Writer:
    """A writer process whose output lines are read by a thread, so every read can time out."""

    def __init__(self, who: str, n: int):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, "-c", WRITER, who, str(n)], cwd=ROOT, env=env,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(line.strip())
        self.lines.put(None)  # end of output

    def next_line(self, timeout: float = 60) -> str:
        line = self.lines.get(timeout=timeout)
        assert line is not None, f"the writer ended early: {self.process.stderr.read()}"
        return line

    def rest(self, timeout: float = 120) -> list[str]:
        """Every line until the process ends."""
        self.process.wait(timeout)
        found = []
        while (line := self.lines.get(timeout=timeout)) is not None:
            found.append(line)
        return found

    def start(self) -> None:
        self.process.stdin.write("go\n")
        self.process.stdin.flush()


@pytest.fixture
def writers():
    """Start Writers; every one still running after the test (passed or failed) is killed."""
    started = []

    def start(who: str, n: int) -> Writer:
        started.append(Writer(who, n))
        return started[-1]

    yield start
    for writer in started:
        if writer.process.poll() is None:
            writer.process.kill()
        writer.process.wait()


def start_together(group: list) -> None:
    """Both writers are imported and waiting before either may begin, so their saves overlap."""
    for writer in group:
        assert writer.next_line() == "ready"
    for writer in group:
        writer.start()


def assert_unbroken_chains(trail: pd.DataFrame, recorded: int) -> None:
    """Each decision's old count is the count the photo's previous decision set (the first: the recorded one)."""
    for _, decisions in trail.sort_values("id").groupby("photo"):
        expected = recorded
        for old, new in zip(decisions["old_count"], decisions["new_count"]):
            assert old == expected
            expected = new


def test_sigkill_between_saves_keeps_every_saved_annotation(writers):
    writer = writers("killed", 100_000)
    start_together([writer])
    acknowledged = [int(writer.next_line()) for _ in range(40)]
    os.kill(writer.process.pid, signal.SIGKILL)
    acknowledged += [int(line) for line in writer.rest()]
    assert writer.process.returncode == -signal.SIGKILL
    trail = annotations.history("shared")
    assert set(acknowledged) <= set(trail["id"])
    assert len(trail) in (len(acknowledged), len(acknowledged) + 1)  # at most the save in flight, whole
    assert trail["id"].tolist() == list(range(1, len(trail) + 1))
    with db.connection() as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert_unbroken_chains(trail, recorded=1)


def test_two_concurrent_writers_lose_nothing_and_keep_one_history(writers):
    n = 60
    started = {who: writers(who, n) for who in ("alice", "bob")}
    start_together(list(started.values()))
    saved = {}
    for who, writer in started.items():
        saved[who] = [int(line) for line in writer.rest()]
        assert writer.process.returncode == 0, writer.process.stderr.read()
    trail = annotations.history("shared")
    assert len(trail) == 2 * n
    for who, ids in saved.items():
        mine = trail[trail["id"].isin(ids)]
        assert len(ids) == n and (mine["annotator"] == who).all()
        assert sorted(mine["note"]) == sorted(f"{who} {i}" for i in range(n))
    assert_unbroken_chains(trail, recorded=1)
    last = trail.sort_values("id").groupby("photo").tail(1)
    assert annotations.label_overrides("shared") == dict(zip(last["photo"], last["new_count"].astype(int)))


def test_corrections_override_the_dataset_labels(small_abid):
    before = load_dataset(small_abid)
    frame = before.frame.set_index("name")
    twos = frame[frame["count"] == 2].index
    fives = frame[frame["count"] == 5].index
    corrected, unclear, fuller, confirmed = twos[0], twos[1], fives[0], fives[1]
    key = before.key
    annotations.save_decision(key, corrected, "ann", 4, recorded_count=2)
    annotations.save_decision(key, corrected, "bob", 3, recorded_count=2, note="one behind the flap")
    annotations.save_decision(key, unclear, "ann", annotations.UNCLEAR, recorded_count=2, note="too dark")
    annotations.save_decision(key, fuller, "ann", annotations.MORE_THAN_FIVE, recorded_count=5)
    annotations.save_decision(key, confirmed, "ann", 5, recorded_count=5)

    after = load_dataset(small_abid)
    counts = after.frame.set_index("name")["count"]
    assert counts[corrected] == 3 and pd.isna(counts[unclear]) and counts[fuller] == annotations.MORE_THAN_FIVE
    assert counts[confirmed] == 5
    checked = after.frame[after.frame["label_source"] == "annotation"]["name"]
    assert set(checked) == {corrected, unclear, fuller, confirmed}
    untouched = before.frame[~before.frame["name"].isin(checked)].set_index("name")["count"]
    assert (counts[untouched.index] == untouched).all()
    labelled = set(after.labelled()["name"])
    assert corrected in labelled and unclear not in labelled and fuller not in labelled
    assert len(after.labelled()) == len(before.labelled()) - 2
    assert after.labelled().set_index("name")["cls"][corrected] == 3
    assert unclear not in set(after.rows("all")["name"])
    bucketed = load_dataset(small_abid, ClassRange(1, 5, top_bucket=True))
    assert bucketed.labelled().set_index("name")["cls"][fuller] == 5

    trail = annotations.history(key, corrected)
    assert trail[["annotator", "old_count", "new_count", "status"]].values.tolist() == [
        ["ann", 2, 4, "corrected"], ["bob", 4, 3, "corrected"]]
    assert annotations.history(key, confirmed)["status"].tolist() == ["confirmed"]


def test_more_than_five_on_a_fuller_bin_confirms_its_recorded_count():
    saved = annotations.save_decision("k", "a.jpg", "ann", annotations.MORE_THAN_FIVE, recorded_count=12).decision
    assert (saved.old_count, saved.new_count, saved.status) == (12, 12, "confirmed")


def test_a_vanished_photo_or_no_annotator_saves_nothing(tmp_path):
    with pytest.raises(annotations.PhotoMissing, match="moved or deleted"):
        annotations.save_decision("k", "gone.jpg", "ann", 3, recorded_count=2, path=tmp_path / "gone.jpg")
    with pytest.raises(annotations.AnnotationError, match="annotator"):
        annotations.save_decision("k", "a.jpg", "  ", 3, recorded_count=2)
    with pytest.raises(annotations.AnnotationError, match="not a count"):
        annotations.save_decision("k", "a.jpg", "ann", -1, recorded_count=2)
    assert annotations.history("k").empty


def test_overtaken_decision_is_reported():
    first = annotations.save_decision("k", "a.jpg", "ann", 3, recorded_count=2).decision
    # bob was shown the photo before ann's save (seen_id None): his save says who got there first
    result = annotations.save_decision("k", "a.jpg", "bob", 4, recorded_count=2, seen_id=None)
    assert result.overtaken == first and result.decision.old_count == 3
    again = annotations.save_decision("k", "a.jpg", "ann", 4, recorded_count=2, seen_id=result.decision.id)
    assert again.overtaken is None and again.decision.status == "confirmed"


def test_export_and_annotate_from_the_command_line(small_abid, tmp_path, capsys):
    dataset = load_dataset(small_abid)
    names = dataset.frame.sort_values("name")["name"].tolist()
    assert cli_main(["annotate", names[0], "more", "--data", str(small_abid), "--annotator", "ann"]) == 0
    assert cli_main(["annotate", names[1], "unclear", "--data", str(small_abid), "--annotator", "bob",
                     "--note", "glare"]) == 0
    assert cli_main(["annotate", names[1], "confirm", "--data", str(small_abid)]) == 2  # nothing to confirm
    assert cli_main(["annotate", names[1], "7", "--data", str(small_abid)]) == 2
    assert cli_main(["annotate", "nope.jpg", "3", "--data", str(small_abid)]) == 2
    assert cli_main(["annotate", names[1], "2", "--data", str(small_abid), "--annotator", "ann"]) == 0
    out = tmp_path / "out" / "annotations.csv"
    assert cli_main(["annotations", "export", "--data", str(small_abid), "--csv", str(out)]) == 0
    assert "3 decisions" in capsys.readouterr().out
    # a dataset key is 12 hex digits: read as text, or one of digits only (1 key in ~300) becomes a number
    table = pd.read_csv(out, dtype={"dataset_key": str})
    assert list(table.columns) == annotations.EXPORT_COLUMNS
    assert table["photo"].tolist() == [names[0], names[1], names[1]]
    assert table["new_label"].tolist() == ["more than 5", "unclear", "2"]
    assert table["is_latest"].tolist() == [True, False, True]
    assert table["note"].fillna("").tolist() == ["", "glare", ""]
    assert (table["dataset_key"] == dataset.key).all()


def test_queues_filter_and_order(small_abid):
    dataset = load_dataset(small_abid)
    frame = dataset.frame
    names = frame["name"].tolist()
    ones = set(frame[frame["count"] == 1]["name"])
    assert set(build_queue(frame, "random", counts=[1], size=1000)) == ones
    queue = build_queue(frame, "unchecked", checked=set(names[:10]), size=1000)
    assert set(queue) == set(names[10:]) and build_queue(frame, "random", size=5, seed=3) == \
        build_queue(frame, "random", size=5, seed=3)
    test_names = set(frame[frame["split"] == "test"]["name"])
    assert set(build_queue(frame, "random", splits=["test"], size=1000)) == test_names
    with pytest.raises(QueueError, match="predictions"):
        build_queue(frame, "low_confidence")
    # scores as a model would give them: wrong on every other photo, confidence rising with the row
    scores = pd.DataFrame({"name": names, "predicted": [int(c) if i % 2 else int(c) % 5 + 1
                                                        for i, c in enumerate(frame["count"])],
                           "confidence": [i / len(names) for i in range(len(names))], "error": None})
    assert build_queue(frame, "low_confidence", scores=scores, size=3) == names[:3]
    disputed = build_queue(frame, "disagreement", scores=scores, size=1000)
    assert disputed == [n for i, n in enumerate(names) if i % 2 == 0][::-1]


def test_bins_outside_the_model_classes_leave_its_queues_for_their_own(small_abid):
    from core.data.classes import ClassRange

    frame = load_dataset(small_abid).frame.copy()
    names = frame["name"].tolist()
    frame.loc[frame.index[:4], "count"] = [0, 6, 7, 0]  # bins a 1–5 model can never agree with
    # a model that predicts 1 everywhere, most sure of the first rows: it disagrees with every bin not a 1
    scores = pd.DataFrame({"name": names, "predicted": 1, "confidence": [1 - i / len(names) for i in
                                                                          range(len(names))], "error": None})
    outside = set(names[:4])
    for kind in ("disagreement", "low_confidence"):
        queue = build_queue(frame, kind, scores=scores, size=1000, classes=ClassRange(1, 5))
        assert queue and not outside & set(queue)
    assert set(build_queue(frame, "outside", size=1000, classes=ClassRange(1, 5))) == outside
    assert set(build_queue(frame, "outside", size=1000, classes=ClassRange(0, 7))) == set()
    sent = names[-3:][::-1]
    assert build_queue(frame, "sent", sent=sent) == sent
    with pytest.raises(QueueError, match="Evaluate"):
        build_queue(frame, "sent")


def test_reviewer_outcomes_keep_the_count_and_say_why_the_bin_looked_wrong():
    key = "outcomes"
    hidden = annotations.save_decision(key, "a.jpg", "ann", 1, recorded_count=3, outcome="hidden",
                                       queue="likely_wrong").decision
    wrong = annotations.save_decision(key, "b.jpg", "ann", None, recorded_count=2, outcome="model_wrong",
                                      queue="likely_wrong").decision
    corrected = annotations.save_decision(key, "c.jpg", "ann", 4, recorded_count=2, queue="likely_wrong").decision
    # an outcome keeps the label whatever count is passed; the queue is stored with the decision
    assert [(d.status, d.old_count, d.new_count, d.queue) for d in (hidden, wrong, corrected)] == [
        ("hidden", 3, 3, "likely_wrong"), ("model_wrong", 2, 2, "likely_wrong"), ("corrected", 2, 4, "likely_wrong")]
    assert annotations.label_overrides(key) == {"a.jpg": 3, "b.jpg": 2, "c.jpg": 4}
    assert annotations.uncountable(key) == {"a.jpg"}
    annotations.save_decision(key, "a.jpg", "bob", 3, recorded_count=3)  # a later look counts it: countable again
    assert annotations.uncountable(key) == set()
    with pytest.raises(annotations.AnnotationError, match="not an outcome"):
        annotations.save_decision(key, "d.jpg", "ann", 2, recorded_count=2, outcome="blurry")
    assert set(annotations.export_frame(key)["status"]) == {"hidden", "model_wrong", "corrected", "confirmed"}


def test_each_queue_measures_how_often_its_flags_are_right():
    from core.review.precision import precision_of, queue_precision, wilson_interval

    key = "precision"
    for i, outcome in enumerate(["corrected", "hidden", "hidden", "model_wrong", "confirmed"]):
        count = 5 if outcome == "corrected" else 2
        annotations.save_decision(key, f"{i}.jpg", "ann", count, recorded_count=2,
                                  outcome=outcome if outcome in annotations.OUTCOMES else None, queue="likely_wrong")
    annotations.save_decision(key, "r.jpg", "ann", 4, recorded_count=2, queue="random")
    annotations.save_decision(key, "0.jpg", "bob", 4, recorded_count=2, queue="likely_wrong")  # a second look
    table = queue_precision(key)
    found = precision_of(table, "likely_wrong")
    assert found["reviewed"] == 5  # one row per bin: its latest decision from that queue
    assert {v: found[v][0] for v in ("record wrong", "items hidden", "record right", "unclear")} == {
        "record wrong": 1, "items hidden": 2, "record right": 2, "unclear": 0}
    bins, share, low, high = found["items hidden"]
    assert share == pytest.approx(0.4) and (low, high) == pytest.approx(wilson_interval(2, 5))
    assert 0.05 < low < 0.4 < high < 0.9  # Wilson's interval for 2 of 5
    from scipy.stats import binomtest

    for hits, total in ((0, 1), (2, 5), (5, 5), (7, 30), (150, 151)):  # written out, it is scipy's Wilson interval
        ci = binomtest(hits, total).proportion_ci(0.95, method="wilson")
        assert wilson_interval(hits, total) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert precision_of(table, "random")["record wrong"][:2] == (1, 1.0)
    assert precision_of(table, "disagreement") is None


def test_photos_marked_uncountable_can_be_left_out_of_training_only(small_abid, tmp_path):
    from core.data.layouts.registry import load_dataset
    from core.training.config import TrainConfig
    from core.training.loop import train

    dataset = load_dataset(str(small_abid))
    train_rows, valid_rows = dataset.rows("train"), dataset.rows("valid")
    hidden = list(train_rows["name"][:2]) + list(valid_rows["name"][:1])
    for name in hidden:
        recorded = int(dataset.frame.set_index("name").loc[name, "count"])
        annotations.save_decision(dataset.key, name, "ann", recorded, recorded_count=recorded, outcome="hidden")
    out = tmp_path / "run"
    result = train(TrainConfig(data=str(small_abid), out=str(out), mode="frozen", epochs=1, image_size=96,
                               batch_size=16, device="cpu", num_workers=0, exclude_uncountable=True))
    assert result["config"]["exclude_uncountable"] is True and result["config"]["uncountable_excluded"] == 2
    log = (out / "log.txt").read_text()
    assert "left out 2 training photos marked as uncountable" in log
    assert f"{len(train_rows) - 2} train, {len(valid_rows)} valid" in log  # valid keeps its hidden photo
