"""Overview page: what the dataset holds — classes per split, imbalance, counts above the range, photo sizes."""
import pandas as pd
import plotly.express as px
import streamlit as st

from app_pages.common import current_dataset, current_user, reload_dataset
from core import storage
from core.data import overview
from core.data.labels.splits import resplit

st.title("Overview")
dataset = current_dataset()
if dataset is None:
    st.stop()

summary = dataset.summary()
for note in dataset.notes:
    st.warning(note)

cols = st.columns(5)
cols[0].metric("Photos", f"{summary['photos']:,}")
cols[1].metric(f"In classes {dataset.class_range.describe()}", f"{summary['in_range']:,}",
               help="Photos whose count is one of the classes: the ones models train and are evaluated on")
cols[2].metric("Outside the classes", f"{summary['excluded']:,}",
               help="Photos whose count is outside the class range (change it in the sidebar): left out of training")
cols[3].metric("Unreadable", f"{summary['problems']:,}", help="Photos or labels that could not be read: skipped")
ratio = overview.imbalance_ratio(dataset)
cols[4].metric("Imbalance", f"{ratio:.1f}×" if ratio else "—",
               help="Photos in the largest class ÷ photos in the smallest: 1× is balanced")
sources = ", ".join(f"{k}: {v:,}" for k, v in summary["label_sources"].items()) or "none"
st.caption(f"Source `{dataset.source}` ({dataset.layout} layout) · labels from {sources}")

if summary["in_range"] == 0:
    st.error("No usable labelled photo falls inside the class range: nothing to train or evaluate on. "
             "Check the labels or widen the class range in the sidebar.")
    st.stop()
empty = overview.empty_classes(dataset)
if empty:
    st.error(f"Classes with no photo at all: {', '.join(map(str, empty))}. A model cannot learn them.")
elif ratio and ratio >= overview.IMBALANCE_WARNING:
    st.warning(f"The classes are imbalanced ({ratio:.1f}× between the largest and the smallest). "
               "Balance them on the Balance page or train with class weights.")

left, right = st.columns([3, 2])
with left:
    st.subheader("Classes per split")
    distribution = overview.class_distribution(dataset)
    figure = px.bar(distribution, x="class_name", y="photos", color="split", barmode="group",
                    labels={"class_name": "object count (class)", "photos": "photos"},
                    category_orders={"split": overview.SPLIT_ORDER}, color_discrete_map=overview.SPLIT_COLOURS)
    st.plotly_chart(figure, width="stretch")
    short = dataset.split_info.get("short_test") or {}
    if short:
        asked = dataset.split_info.get("test_per_class")
        st.info("Fewer test photos than the " + str(asked) + " asked, so every class keeps training photos: "
                + ", ".join(f"class {c}: {n}" for c, n in short.items()))
with right:
    st.subheader("All recorded counts")
    counts = overview.count_histogram(dataset)
    figure = px.bar(counts, x="count", y="photos", color="range",
                    color_discrete_map={"class": "#1f77b4", "excluded": "#bbbbbb"})
    st.plotly_chart(figure, width="stretch")
    st.caption(f"{summary['excluded']:,} photos have counts outside {dataset.class_range.describe()} "
               "and are left out of training and evaluation.")

sizes = overview.image_sizes(dataset)
if not sizes.empty:
    st.subheader("Photo sizes")
    figure = px.density_heatmap(sizes, x="width", y="height", nbinsx=40, nbinsy=40,
                                labels={"width": "width (px)", "height": "height (px)"})
    st.plotly_chart(figure, width="stretch")
    st.caption(f"Median {int(sizes['width'].median())}×{int(sizes['height'].median())} px")

if dataset.problems:
    with st.expander(f":material/warning: {len(dataset.problems):,} photos or labels skipped"):
        st.dataframe([{"photo": n, "problem": p} for n, p in dataset.problems[:1000]], width="stretch")

with st.expander("Split recipe"):
    if dataset.split_info.get("source") == "folders":
        st.write("This dataset brings its own train/valid/test folders; they are used as they are.")
    elif dataset.split_info.get("source") == "version":
        st.write("This is a balanced version: it keeps the split of the dataset it was made from "
                 "(its test photos never change). Re-split the original dataset instead.")
    else:
        with st.form("resplit"):
            st.write("Stratified and seeded: N test photos per class (never more than a fifth of a class), "
                     "the rest split train/valid. Re-splitting changes which photos every later run tests on.")
            c1, c2, c3 = st.columns(3)
            test_per_class = c1.number_input("Test photos per class", 1, 10000,
                                             int(dataset.split_info.get("test_per_class", 100)))
            valid_fraction = c2.number_input("Validation fraction", 0.05, 0.5,
                                             float(dataset.split_info.get("valid_fraction", 0.2)), step=0.05)
            seed = c3.number_input("Seed", 0, 1_000_000, int(dataset.split_info.get("seed", 0)))
            refused = current_user().why_not("change_dataset")
            if st.form_submit_button("Re-split the dataset", disabled=refused is not None, help=refused) \
                    and not refused:
                resplit(dataset.frame, dataset.key, int(test_per_class), float(valid_fraction), int(seed))
                reload_dataset()
                st.rerun()


def _mb(size: int | None) -> str:
    return "no cap" if size is None else f"{size / storage.MB:,.1f} MB"


with st.expander(":material/hard_drive: Storage"):
    st.write("Caches under the Binsight folder (predictions, features, stage maps for fast fine-tuning, S3 downloads, "
             "uploads) are kept under a cap "
             f"each (setting `{storage.CAPS_SETTING}` or `{storage.CAPS_ENV}`): the least recently used files go "
             "first, never one in use. Pruning runs by itself after writes; the button runs it now.")
    if st.button("Prune now", key="storage_prune"):  # before the sizes, so they show the result
        pruned = storage.prune_all()
        deleted = sum(len(p.deleted) for p in pruned.values())
        freed = sum(p.freed for p in pruned.values())
        over = [name for name, p in pruned.items() if p.cap is not None and p.size_after > p.cap]
        st.success(f"Deleted {deleted:,} cached files, freed {_mb(freed)}."
                   + (f" Still over the cap (its files are in use or recent): {', '.join(over)}." if over else ""))
    caps, sizes = storage.cache_caps(), storage.cache_sizes()
    frame = pd.DataFrame([{"cache": name, "used (MB)": sizes[name] / storage.MB,
                           "room left (MB)": max(0, (caps[name] or 0) - sizes[name]) / storage.MB}
                          for name in storage.CACHES])
    long = frame.melt(id_vars="cache", var_name="part", value_name="MB")
    figure = px.bar(long, x="MB", y="cache", color="part", orientation="h", height=220,
                    color_discrete_map={"used (MB)": "#1f77b4", "room left (MB)": "#dddddd"},
                    labels={"cache": "", "part": ""})
    figure.update_xaxes(rangemode="tozero", title="MB")
    figure.update_layout(margin=dict(t=10, b=10), legend=dict(orientation="h", y=1.15, x=0))
    st.plotly_chart(figure, width="stretch", key="storage_chart")
    st.caption(" · ".join(f"{name}: {_mb(sizes[name])} of {_mb(caps[name])}" for name in storage.CACHES))
