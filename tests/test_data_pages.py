"""Overview and Browse pages through AppTest, on the demo set, on real ABID photos and on bad folders."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import config

PAGES = Path(__file__).resolve().parents[1] / "app_pages"


def run_page(name: str) -> AppTest:
    return AppTest.from_file(str(PAGES / name), default_timeout=120).run()


def dialog_elements(at: AppTest) -> list:
    """Elements inside the open st.dialog (AppTest keeps dialogs outside `main`)."""
    found = []

    def walk(node, inside):
        inside = inside or getattr(node, "type", None) == "dialog"
        children = getattr(node, "children", None)
        if isinstance(children, dict):
            for child in children.values():
                walk(child, inside)
        elif inside:
            found.append(node)

    walk(at._tree, False)
    return found


def by_label(widgets, label: str):
    """The one widget with this label."""
    [found] = [w for w in widgets if w.label == label]
    return found


def metrics(at: AppTest) -> dict:
    return {m.label: m.value for m in at.metric}


def test_overview_on_demo_set_generates_it_and_shows_distribution():
    from core.data.layouts.demo import DEMO_COUNTS

    at = run_page("overview.py")
    assert not at.exception and not at.error
    shown = metrics(at)
    in_range = sum(n for count, n in DEMO_COUNTS.items() if 1 <= count <= 5)
    assert shown["Photos"] == f"{sum(DEMO_COUNTS.values()):,}" and shown["In classes 1–5"] == f"{in_range:,}"
    assert shown["Outside the classes"] == f"{sum(DEMO_COUNTS.values()) - in_range:,}"
    assert len(at.get("plotly_chart")) == 4  # classes per split, all counts, photo sizes, storage
    assert (config.demo_dir() / ".complete").is_file()


def test_overview_on_real_abid_shows_totals_read_from_labels_csv(abid_dir, monkeypatch):
    import pandas as pd

    from core.data.overview import IMBALANCE_WARNING
    from core.data.labels.splits import MAX_TEST_FRACTION

    labels = pd.read_csv(abid_dir / "labels.csv")
    per_class = labels[labels["count"].between(1, 5)].groupby("count").size()
    monkeypatch.setenv("BINSIGHT_DATA", str(abid_dir))
    at = run_page("overview.py")
    shown = metrics(at)
    assert shown["Photos"] == f"{len(labels):,}" and shown["In classes 1–5"] == f"{per_class.sum():,}"
    assert shown["Outside the classes"] == f"{len(labels) - per_class.sum():,}"
    imbalanced = per_class.max() / per_class.min() >= IMBALANCE_WARNING
    assert any("imbalanced" in w.value for w in at.warning) == imbalanced
    short = {c: int(n * MAX_TEST_FRACTION) for c, n in per_class.items() if int(n * MAX_TEST_FRACTION) < 100}
    capped = [i.value for i in at.info if "Fewer test photos" in i.value]
    assert bool(capped) == bool(short)  # a capped test split is explained, and only then
    assert all(f"class {c}: {n}" in capped[0] for c, n in short.items())


def test_overview_resplit_changes_the_saved_split(monkeypatch, small_abid):
    from core.data.layouts.registry import load_dataset
    from core.data.labels.splits import make_split

    monkeypatch.setenv("BINSIGHT_DATA", str(small_abid))
    before = load_dataset(small_abid)
    at = run_page("overview.py")
    by_label(at.number_input, "Seed").set_value(5)
    by_label(at.button, "Re-split the dataset").click().run()
    assert not at.exception
    after = load_dataset(small_abid)
    assert after.split_info["seed"] == 5
    usable = before.frame[before.frame["cls"].notna() & before.frame["problem"].isna()]
    expected, _ = make_split(usable, int(after.split_info["test_per_class"]),
                             float(after.split_info["valid_fraction"]), 5)
    saved = after.frame.dropna(subset=["split"]).set_index("name")["split"].to_dict()
    assert saved == dict(zip(usable["name"], expected[usable.index]))  # the seed-5 split, photo by photo


@pytest.mark.parametrize("page", ["overview.py", "browse.py"])
def test_pages_explain_a_missing_folder(tmp_path, monkeypatch, page):
    monkeypatch.setenv("BINSIGHT_DATA", str(tmp_path / "gone"))
    at = run_page(page)
    assert not at.exception
    assert "does not exist" in at.error[0].value


def test_overview_on_a_folder_with_a_corrupt_photo(small_abid, monkeypatch):
    (small_abid / "bin-images" / "zz_broken.jpg").write_bytes(b"not a jpeg at all")
    monkeypatch.setenv("BINSIGHT_DATA", str(small_abid))
    at = run_page("overview.py")
    assert not at.exception
    assert metrics(at)["Unreadable"] == "1"
    skipped = by_label(at.expander, ":material/warning: 1 photos or labels skipped")
    assert skipped.dataframe[0].value["photo"].tolist() == ["zz_broken.jpg"]


def test_browse_filters_by_count_and_item_text(abid_dir, monkeypatch):
    monkeypatch.setenv("BINSIGHT_DATA", str(abid_dir))
    at = run_page("browse.py")
    assert len([b for b in at.button if b.key and b.key.startswith("open_")]) == 24
    at.multiselect[0].set_value([3]).run()
    labels = [b.label for b in at.button if b.key and b.key.startswith("open_")]
    assert labels and all(label.endswith("· count 3") for label in labels)
    from core.data.layouts.registry import load_dataset

    frame = load_dataset(abid_dir).frame
    # the word: the longest one in the items of the first count-3 photo (by name) that has items
    first = frame[(frame["count"] == 3) & (frame["item_names"] != "")].sort_values("name").iloc[0]
    word = max(first["item_names"].replace("|", " ").split(), key=len)
    at.text_input[0].set_value(word).run()
    matched = next(c.value for c in at.caption if "photos match" in c.value)
    n = int(matched.split()[0].replace(",", ""))
    expected = frame[(frame["count"] == 3) & frame["item_names"].str.contains(word, case=False, regex=False)]
    assert n == len(expected) > 0


def test_browse_sample_per_count_and_open_a_photo(monkeypatch, demo_source):
    monkeypatch.setenv("BINSIGHT_DATA", str(demo_source))
    at = run_page("browse.py")
    at.radio[0].set_value("Random sample per count").run()
    at.number_input[0].set_value(2).run()
    opened = [b for b in at.button if b.key and b.key.startswith("open_")]
    counts = [int(b.label.split("· count")[1]) for b in opened]
    # it starts on the classes 1–5: the bins a model counts, not the empty ones or those above 5
    assert at.multiselect[0].value == [1, 2, 3, 4, 5]
    assert all(counts.count(c) == 2 for c in set(counts)) and set(counts) == {1, 2, 3, 4, 5}
    first = next(b for b, c in zip(opened, counts) if c > 0)
    first.click().run()
    assert not at.exception
    dialog = dialog_elements(at)
    tables = [e for e in dialog if e.type == "dataframe"]
    assert tables and "ASIN" in tables[0].value.columns and len(tables[0].value) >= 1
    assert any(e.type == "image" for e in dialog)
    assert any(first.label.split(" · ")[0] in e.value for e in dialog if e.type == "markdown")
