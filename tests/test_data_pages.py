"""Overview and Browse pages through AppTest, on the demo set, on real ABID photos and on bad folders."""
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core import config

PAGES = Path(__file__).resolve().parents[1] / "pages"


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


def metrics(at: AppTest) -> dict:
    return {m.label: m.value for m in at.metric}


def test_overview_on_demo_set_generates_it_and_shows_distribution():
    at = run_page("overview.py")
    assert not at.exception and not at.error
    shown = metrics(at)
    assert int(shown["Photos"]) > 250 and int(shown["In classes 1–5"]) > 200
    assert int(shown["Excluded (outside the range)"]) > 0
    assert len(at.get("plotly_chart")) == 3  # classes per split, all counts, photo sizes
    assert (config.demo_dir() / ".complete").is_file()


def test_overview_on_real_abid_warns_about_imbalance(abid_dir, monkeypatch):
    monkeypatch.setenv("BINSIGHT_DATA", str(abid_dir))
    at = run_page("overview.py")
    shown = metrics(at)
    assert shown["Photos"] == "2,244" and shown["In classes 1–5"] == "2,011"
    assert shown["Excluded (outside the range)"] == "233"
    assert any("imbalanced" in w.value for w in at.warning)
    assert any("class 3: 10" in i.value for i in at.info)  # the capped test split is explained


def test_overview_resplit_changes_the_saved_split(monkeypatch, small_abid):
    from core.dataset import load_dataset

    monkeypatch.setenv("BINSIGHT_DATA", str(small_abid))
    before = load_dataset(small_abid).frame.set_index("name")["split"]
    at = run_page("overview.py")
    at.number_input[2].set_value(5)  # seed
    at.button[0].click().run()
    assert not at.exception
    after = load_dataset(small_abid).frame.set_index("name")["split"]
    assert (before != after).any()


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
    assert metrics(at)["Skipped (unreadable)"] == "1"
    assert "zz_broken.jpg" in at.expander[0].label or any("1 photos" in e.label for e in at.expander)


def test_browse_filters_by_count_and_item_text(abid_dir, monkeypatch):
    monkeypatch.setenv("BINSIGHT_DATA", str(abid_dir))
    at = run_page("browse.py")
    assert len([b for b in at.button if b.key and b.key.startswith("open_")]) == 24
    at.multiselect[0].set_value([3]).run()
    labels = [b.label for b in at.button if b.key and b.key.startswith("open_")]
    assert labels and all(label.endswith("· 3") for label in labels)
    at.text_input[0].set_value("cable").run()
    assert "photos match" in at.caption[0].value
    n = int(at.caption[0].value.split()[0].replace(",", ""))
    from core.dataset import load_dataset

    frame = load_dataset(abid_dir).frame
    expected = frame[(frame["count"] == 3) & frame["item_names"].str.contains("cable", case=False)]
    assert n == len(expected) > 0


def test_browse_sample_per_count_and_open_a_photo(monkeypatch, demo_source):
    monkeypatch.setenv("BINSIGHT_DATA", str(demo_source))
    at = run_page("browse.py")
    at.radio[0].set_value("Random sample per count").run()
    at.number_input[0].set_value(2).run()
    opened = [b for b in at.button if b.key and b.key.startswith("open_")]
    counts = [int(b.label.split("·")[1]) for b in opened]
    assert all(counts.count(c) == 2 for c in set(counts)) and 0 in counts and 5 in counts
    first = next(b for b, c in zip(opened, counts) if c > 0)
    first.click().run()
    assert not at.exception
    dialog = dialog_elements(at)
    tables = [e for e in dialog if e.type == "dataframe"]
    assert tables and "ASIN" in tables[0].value.columns and len(tables[0].value) >= 1
    assert any(e.type == "image" for e in dialog)
    assert any(first.label.split(" · ")[0] in e.value for e in dialog if e.type == "markdown")
