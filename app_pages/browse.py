"""Browse page: a grid of sample bins by count, split and item text; open one to see it large with its items."""
import pandas as pd
import streamlit as st

from app_pages import insight_views
from app_pages.common import cached_thumbnail, current_dataset
from core.data.browse import filter_photos, page_of, sample_per_class
from core.data.dataset import photo_items

st.title("Browse")
dataset = current_dataset()
if dataset is None:
    st.stop()
frame = dataset.frame[dataset.frame["count"].notna()]
if frame.empty:
    st.warning("No labelled photos to browse. " + " ".join(dataset.notes))
    st.stop()


def choose_filters() -> dict:
    """The user's filters, as a dict."""
    c1, c2, c3 = st.columns([2, 2, 3])
    counts = sorted(int(c) for c in frame["count"].dropna().unique())
    classes = [c for c in dataset.class_range.classes if c in counts]  # the model's classes first: what it counts
    chosen_counts = c1.multiselect("Object count", counts, default=classes, placeholder="all counts",
                                   key="browse_counts",
                                   help=f"Starts on the classes ({dataset.class_range.describe()}); add 0 or 6+ "
                                        "to see the bins left out of training")
    chosen_splits = c2.multiselect("Split", ["train", "valid", "test", "none"], default=[], placeholder="all splits")
    text = c3.text_input("Item name contains", placeholder="e.g. cable, bottle")
    c4, c5, c6 = st.columns([2, 2, 3])
    mode = c4.radio("Show", ["All matches", "Random sample per count"], horizontal=True)
    per_class = c5.number_input("Photos per count", 1, 50, 4, disabled=mode == "All matches")
    seed = c6.number_input("Sample seed", 0, 10_000, 0, disabled=mode == "All matches")
    return {"counts": chosen_counts, "splits": chosen_splits, "text": text, "sample": mode != "All matches",
            "per_class": int(per_class), "seed": int(seed)}


@st.dialog("Bin photo", width="large")
def show_photo(row: pd.Series) -> None:
    if row["path"] and not row["problem"]:
        st.image(row["path"], width="content")  # its own pixels at most: a 499 px photo is not blown up
    else:
        st.warning(row["problem"] or "This photo is not on disk (listed only).")
    split = row["split"] or "not in a split"
    st.markdown(f"**{row['name']}** · count **{row['count']}** ({row['label_source']}) · {split}"
                + (f" · {row['width']}×{row['height']} px" if pd.notna(row["width"]) else ""))
    items = photo_items(dataset, row["name"])
    if items:
        st.dataframe(pd.DataFrame(items).rename(columns={"asin": "ASIN"}), hide_index=True, width="stretch")
    else:
        st.caption("No item metadata for this photo.")





insight_views.browse_map(dataset)
filters = choose_filters()
matches = filter_photos(frame, filters["counts"], filters["splits"], filters["text"])
if filters["sample"]:
    matches = sample_per_class(matches, filters["per_class"], filters["seed"])
if matches.empty:
    st.info("No photo matches these filters.")
    st.stop()

page_size = 24
pages = max(1, -(-len(matches) // page_size))
page = st.number_input(f"Page (of {pages})", 1, pages, 1) if pages > 1 else 1
shown, _ = page_of(matches, int(page), page_size)
st.caption(f"{len(matches):,} photos match · showing {len(shown)}")

columns = st.columns(6)
for i, (_, row) in enumerate(shown.iterrows()):
    with columns[i % 6]:
        picture = cached_thumbnail(row["path"]) if row["path"] and not row["problem"] else None
        if isinstance(picture, bytes):
            st.image(picture, width="stretch")
        else:
            st.warning(picture or row["problem"] or "not on disk")
        if st.button(f"{row['name']} · count {row['count']}", key=f"open_{row['name']}", width="stretch",
                     help="Open the photo with its items"):
            show_photo(row)
