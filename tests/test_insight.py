"""What the model sees, on real photos and runs: the embeddings map's selection and bulk relabel (audited, undoable,
refused to a viewer), bootstrap intervals, McNemar's test, Grad-CAM heatmaps and the model card."""
from math import comb
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from core.access import AccessDenied, User
from core.data.labels import annotations
from core.data.photos.images import load_image
from core.data.layouts.registry import load_dataset
from core.evaluation.comparison import compare_paired, mcnemar
from core.evaluation.intervals import _from_confusions, bootstrap_intervals
from core.evaluation.metrics import compute_metrics
from core.evaluation.model_card import card_for_result, card_for_run
from core.evaluation.results import EvaluationResult, evaluate
from core.models.heatmaps import heatmaps
from core.models.networks import build_model, load_model
from core.models.preprocess import preprocessing
from tests.conftest import make_abid_subset

BROWSE = str(Path(__file__).resolve().parents[1] / "app_pages" / "browse.py")
CLASSES = [1, 2, 3, 4, 5]
ROLES = {"annotator": ["ann@example.com"], "default": "viewer"}


@pytest.fixture
def tiny_abid(tmp_path, monkeypatch) -> Path:
    source = make_abid_subset(tmp_path / "tiny", per_class=2)
    monkeypatch.setenv("BINSIGHT_DATA", str(source))
    return source


def open_browse(email: str | None = None) -> AppTest:
    at = AppTest.from_file(BROWSE, default_timeout=300)
    at.user = {"is_logged_in": True, "email": email, "name": email.split("@")[0]} if email else {}
    at.secrets["roles"] = ROLES
    return at.run()


def select_on_map(at: AppTest, names: list[str]) -> AppTest:
    """What the browser sends after clicking these photos (a lasso or a box sends its region too, which selects every
    photo inside, drawn or not: tests/test_bounded_memory.py): each point carries its name as customdata."""
    at.session_state["browse_map_chart"] = {"selection": {
        "points": [{"customdata": [n, 1, "—"], "x": 0.0, "y": 0.0} for n in names],
        "point_indices": list(range(len(names))), "box": [], "lasso": []}}
    return at.run()


def test_a_lasso_on_the_map_opens_its_photos_and_an_annotator_relabels_them(tiny_abid):
    at = open_browse("ann@example.com")
    at.button(key="browse_map_compute").click().run()
    assert not at.exception and not at.error
    assert at.get("plotly_chart"), "the map is drawn"
    frame = load_dataset(tiny_abid).rows("all")
    chosen = list(frame["name"][:3])
    thumbnails_before = len(at.image)
    at = select_on_map(at, chosen)
    assert not at.exception
    assert any(m.value == "**3 photos selected**" for m in at.markdown)
    assert len(at.image) == thumbnails_before + 3
    assert {c.value.split(" · ")[0] for c in at.caption} >= set(chosen)

    at.selectbox(key="browse_map_bulk_count").set_value(4)
    at.text_input(key="browse_map_bulk_why").input("all show four boxes")
    at.checkbox(key="browse_map_bulk_sure").check().run()
    at.button(key="browse_map_bulk_save").click().run()
    assert not at.exception and not at.error
    trail = annotations.history(load_dataset(tiny_abid).key)
    assert sorted(trail["photo"]) == sorted(chosen)  # one decision per photo
    recorded = dict(zip(frame["name"], frame["count"]))
    assert trail["annotator"].eq("ann@example.com").all() and trail["new_count"].eq(4).all()
    assert [int(recorded[p]) for p in trail["photo"]] == trail["old_count"].tolist()
    assert trail["note"].str.startswith("all show four boxes").all()

    at.button(key="browse_map_undo").click().run()
    after = annotations.history(load_dataset(tiny_abid).key)
    assert len(after) == 3 and after["undone_at"].notna().all()  # undone, not a new "corrected" decision each
    assert annotations.label_overrides(load_dataset(tiny_abid).key) == {}
    assert load_dataset(tiny_abid).frame.set_index("name").loc[chosen, "count"].tolist() == \
        [recorded[n] for n in chosen]


def test_a_viewer_sees_the_selection_but_cannot_relabel(tiny_abid):
    at = open_browse("someone@example.com")
    at.button(key="browse_map_compute").click().run()
    at = select_on_map(at, list(load_dataset(tiny_abid).rows("all")["name"][:2]))
    assert not at.exception
    assert any("Only an annotator may relabel bins" in i.value for i in at.info)
    assert not [b for b in at.button if b.key == "browse_map_bulk_save"]
    key = load_dataset(tiny_abid).key
    with pytest.raises(AccessDenied):
        annotations.save_bulk_decision(key, {"x.jpg": 2}, 3, user=User("someone@example.com", "viewer"))
    assert annotations.history(key).empty


def test_bulk_relabel_is_one_transaction_and_undo_restores_the_previous_decision(small_abid):
    key = load_dataset(small_abid).key
    annotator = User("ann@example.com", "annotator")
    saved = annotations.save_bulk_decision(key, {"a.jpg": 1, "b.jpg": 2, "c.jpg": None}, 3, user=annotator)
    assert [(d.photo, d.old_count, d.new_count, d.status) for d in saved] == [
        ("a.jpg", 1, 3, "corrected"), ("b.jpg", 2, 3, "corrected"), ("c.jpg", None, 3, "corrected")]
    annotations.save_decision(key, "b.jpg", "bob", 5, recorded_count=2)
    annotations.save_decision(key, "c.jpg", "bob", 4, recorded_count=None)
    again = annotations.save_bulk_decision(key, {"a.jpg": 1, "c.jpg": 4}, 2, user=annotator)
    undone, left = annotations.undo_decisions(key, saved[:2] + again, user=annotator)
    # Undo restores what was there: c.jpg goes back to bob's 4, a.jpg to no decision at all (its recorded count);
    # b.jpg, decided by bob since, keeps his decision. Nothing is added: the undone rows are marked, not counted.
    assert left == ["a.jpg", "b.jpg"] and [d.photo for d in undone] == ["a.jpg", "c.jpg"]
    annotations.undo_decisions(key, saved[:1], user=annotator)
    assert annotations.label_overrides(key) == {"b.jpg": 5, "c.jpg": 4}
    trail = annotations.history(key)
    assert len(trail) == 7 and trail["undone_at"].notna().sum() == 3
    assert annotations.progress(key).set_index("annotator").loc["ann@example.com", "corrected"] == 2  # b, c: not undone
    with pytest.raises(annotations.AnnotationError):
        annotations.save_bulk_decision(key, {"a.jpg": 1}, -2, user=annotator)
    assert len(annotations.history(key)) == 7  # nothing saved by the refused one


def test_bootstrap_intervals_contain_the_point_and_narrow_with_more_photos(shared):
    result = evaluate(shared["runs"]["better"] / "model.pt", shared["data"], split="all")
    metrics, intervals = result.metrics(), result.intervals()
    assert intervals == result.intervals() and intervals["n"] == metrics["n"]  # seeded: the same every time
    for name, (low, high) in intervals["overall"].items():
        assert low <= metrics[name] <= high, name
    for count, found in intervals["per_class"].items():
        for name, (low, high) in found.items():
            assert low <= metrics["per_class"][count][name] <= high, (count, name)
    rows = result.scored()
    truth, predicted = rows["truth"].astype(int).to_numpy(), rows["predicted"].astype(int).to_numpy()
    more = bootstrap_intervals(np.tile(truth, 4), np.tile(predicted, 4), CLASSES)  # the same photos, 4 times as many
    for name in ("accuracy", "mae", "macro_f1"):
        width, narrower = np.diff(intervals["overall"][name])[0], np.diff(more["overall"][name])[0]
        assert narrower < 0.7 * width, name


def test_the_bootstrap_computes_each_metric_as_scikit_learn_does():
    rng = np.random.default_rng(3)
    truth = rng.choice(CLASSES, 200)
    predicted = np.where(rng.random(200) < 0.6, truth, rng.choice([1, 2, 3], 200))  # 4 and 5 never predicted
    reference = compute_metrics(truth, predicted, CLASSES)
    values = _from_confusions(np.asarray(reference["confusion_matrix"], dtype=float)[None], CLASSES)
    for name in ("accuracy", "balanced_accuracy", "macro_f1", "mae", "off_by_one"):
        assert values[name][0] == pytest.approx(reference[name]), name
    for i, c in enumerate(CLASSES):
        assert values["f1"][0][i] == pytest.approx(reference["per_class"][str(c)]["f1"])


def test_mcnemar_on_a_hand_made_table():
    # 40 photos both right, 10 only A right, 25 only B right, 5 both wrong
    exact = 2 * sum(comb(35, k) for k in range(11)) / 2 ** 35
    assert mcnemar(10, 25) == pytest.approx(exact) and exact < 0.05
    assert mcnemar(12, 14) > 0.5 and mcnemar(0, 0) == 1.0
    changes = [("both right", 40), ("A only", 10), ("B only", 25), ("both wrong", 5)]
    names, truth, a, b = [], [], [], []
    for change, n in changes:
        for i in range(n):
            names.append(f"{change}-{i}.jpg")
            truth.append(2)
            a.append(2 if change in ("both right", "A only") else 3)
            b.append(2 if change in ("both right", "B only") else 1)

    def result(run, predicted):
        frame = pd.DataFrame({"name": names, "path": names, "truth": pd.array(truth, "Int64"),
                              "predicted": pd.array(predicted, "Int64"), "error": None})
        return EvaluationResult(frame, CLASSES, run=run)

    paired = compare_paired(result("A", a), result("B", b))
    assert (paired.fixed, paired.broken) == (25, 10)
    assert paired.table().loc["A right", "B wrong"] == 10 and paired.table().loc["A wrong", "B wrong"] == 5
    assert paired.p_value() == pytest.approx(exact)
    assert "B is better beyond chance" in paired.verdict()
    assert sorted(paired.photos("broken")["name"]) == sorted(n for n in names if n.startswith("A only"))
    change = paired.recall_change().set_index("count")
    assert change.loc[2, "change"] == pytest.approx((65 - 50) / 80)
    same = compare_paired(result("A", a), result("C", a[::-1]))
    assert "could be chance" in same.verdict() or "no difference" in same.verdict()


def test_heatmaps_have_the_photos_shape_and_differ_between_two_counts(shared):
    model, meta = load_model(shared["runs"]["better"] / "model.pt")
    photo = load_dataset(shared["data"]).rows("all")["path"].iloc[0]
    found = heatmaps(model, meta, photo, [1, 5])
    width, height = load_image(photo).size
    for heat in found.values():
        assert heat.shape == (height, width) and 0 <= heat.min() and heat.max() <= 1 and heat.max() > 0.5
    assert np.abs(found[1] - found[5]).mean() > 0.02


@pytest.mark.parametrize("backbone, features", [("efficientnet_lite0", "multilevel"), ("efficientnet_lite0", None),
                                                 ("resnet18", "multilevel"), ("resnet18", None), ("simple_cnn", None)])
def test_heatmaps_work_for_every_backbone_the_app_trains(backbone, features, small_abid):
    from core.models.catalog import BACKBONES

    spec = BACKBONES[backbone]
    meta = {"backbone": backbone, "classes": CLASSES, "head": "linear", "features": features,
            **preprocessing({"mean": spec.mean, "std": spec.std}, 64, 1.37)}
    model = build_model(meta, pretrained=False)
    photo = sorted((small_abid / "bin-images").glob("*.jpg"))[0]
    found = heatmaps(model, meta, photo, [2, 4])
    assert found[2].shape == found[4].shape == load_image(photo).size[::-1]
    assert all(p.requires_grad for p in model.parameters())  # the model is left as it was


def test_the_model_card_holds_the_runs_figures(shared):
    run = shared["runs"]["better"]
    result = evaluate(run / "model.pt", shared["data"], split="test")
    _, meta = load_model(run / "model.pt")
    card = card_for_result(result, meta, run)
    metrics, intervals = result.metrics(), result.intervals()
    assert card.startswith("# Model card: better")
    assert f"| Accuracy | {metrics['accuracy']:.1%} |" in card
    low, high = intervals["overall"]["accuracy"]
    assert f"{low:.1%}–{high:.1%}".replace("%–", "–") in card
    for count in CLASSES:
        entry = metrics["per_class"][str(count)]
        assert f"| {count} | {entry['support']} | {entry['precision']:.3f}" in card
        row = metrics["confusion_matrix"][CLASSES.index(count)]
        assert f"| {count} | " + " | ".join(map(str, row)) + " |" in card
    assert f"**{metrics['ece']:.3f}**" in card and "| epochs | 3 |" in card and "## Known limits" in card
    from_files = card_for_run(run, meta)  # what GET /model returns: the training's own test figures
    written = __import__("json").loads((run / "metrics.json").read_text())["test"]
    assert f"| Accuracy | {written['accuracy']:.1%} |" in from_files and "interval" in from_files


EVALUATE = str(Path(__file__).resolve().parents[1] / "app_pages" / "evaluate.py")


def test_compare_says_what_changed_photo_by_photo_and_a_cell_shows_where_the_model_looked(shared):
    at = AppTest.from_file(EVALUATE, default_timeout=300).run()
    at.selectbox(key="compare_baseline").set_value("baseline").run()
    at.multiselect(key="compare_runs").set_value(["better"]).run()
    assert not at.exception
    results = {name: evaluate(shared["runs"][name] / "model.pt", shared["data"], split="test")
               for name in ("baseline", "better")}
    paired = compare_paired(results["baseline"], results["better"])
    assert any(m.value == paired.verdict() for m in at.markdown)
    for change in ("fixed", "broken"):
        at.radio(key="paired_open_better").set_value(change).run()
        shown = {c.value.split(" · ")[0] for c in at.caption}
        assert set(paired.photos(change)["name"][:12]) <= shown

    reference = results["better"].frame
    mistakes = reference[reference["truth"] != reference["predicted"]]
    true, predicted = int(mistakes["truth"].iloc[0]), int(mistakes["predicted"].iloc[0])
    at.selectbox(key="eval_run").set_value("better")
    at.selectbox(key="cm_true").set_value(true)
    at.selectbox(key="cm_pred").set_value(predicted).run()
    images = len(at.image)
    at.toggle(key="cm_heatmaps").set_value(True).run()
    assert not at.exception and not at.warning
    cell = results["better"].cell(true, predicted)
    assert len(at.image) == images + 2 * min(len(cell), 6)  # for the count predicted and for the label


def test_a_click_on_a_point_opens_every_photo_drawn_on_it():
    from app_pages.insight_views import _steps, plural, with_stacked

    frame = pd.DataFrame({"name": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "x": [0.0, 0.0, 5.0, 10.0],
                          "y": [1.0, 1.0, 2.0, 3.0]})
    assert with_stacked(frame, ["a.jpg"]) == ["a.jpg", "b.jpg"]  # b sits under a
    assert with_stacked(frame, ["c.jpg", "d.jpg"]) == ["c.jpg", "d.jpg"] and with_stacked(frame, []) == []
    assert (plural(1, "photo"), plural(15, "photo")) == ("1 photo", "15 photos")
    scale, whole = _steps("Viridis", [3, 1, 5, 5, 2, 4])  # five counts: five flat bands
    assert whole == [1, 2, 3, 4, 5] and len(scale) == 10 and len({colour for _, colour in scale}) == 5


def test_the_labels_state_moves_with_decisions_and_undos_but_not_with_other_writes(small_abid):
    from core.jobs import queue as jobs

    key = load_dataset(small_abid).key
    annotator = User("ann@example.com", "annotator")
    states = [annotations.state()]
    jobs.submit("sleep", {"seconds": 0})  # the database changes; the labels do not
    assert annotations.state() == states[-1]
    saved = annotations.save_bulk_decision(key, {"a.jpg": 1}, 3, user=annotator)
    states.append(annotations.state())
    annotations.undo_decisions(key, saved, user=annotator)
    states.append(annotations.state())
    assert len(set(states)) == 3
