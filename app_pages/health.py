"""Data health page: likely wrong counts (out-of-fold, count-aware), the estimated noise matrix, duplicate and
look-alike photos across splits or with other counts, unreadable, dark and blurred photos; CSV of every finding."""
import pandas as pd
import plotly.express as px
import streamlit as st

from app_pages.common import cached_thumbnail, current_dataset, current_user, view_key
from app_pages.review_views import (
    label_issues_now,
    outcome_word,
    photo_with_open,
    precision_chart,
    recheck_line,
    send_to_spot_check,
)
from core import config
from core.data.photos.photo_checks import has_cached_checks
from core.evaluation.label_issues import MIN_FLAGGED_SCORE
from core.review.health import HealthReport, health_report

CONTACT_SHEET = 12
PAIRS_SHOWN = 8


def run_report(dataset, label_issues: bool) -> HealthReport:
    bar = st.progress(0.0, text="Starting the health check…")
    try:
        return health_report(dataset, label_issues=label_issues,
                             on_progress=lambda f, text: bar.progress(min(max(f, 0.0), 1.0), text=text))
    finally:
        bar.empty()


def current_report(dataset) -> HealthReport | None:
    """The report from the caches once the photos were checked (instant): the photo checks, which no label change
    touches, and the label issues with the reviews since (re-checked in the background after a label changed);
    None before the first check."""
    if not has_cached_checks(dataset.key):
        return None
    issues = label_issues_now(dataset)
    home = config.home()
    return _cached_report(view_key(dataset, home / "label_issues" / dataset.key, home / "photo_checks"), dataset,
                          issues)


@st.cache_resource(show_spinner=False, max_entries=2)
def _cached_report(key: tuple, _dataset, _issues) -> HealthReport:
    """The report made once while the loaded dataset (its photos as indexed), the decisions and the saved checks
    stay the same: at 536 K photos stamping every photo and keying the pairs takes ~8 s a run."""
    return health_report(_dataset, label_issues=False, found_issues=_issues)


def show_photo(path, name: str, caption: str, key: str) -> None:
    photo_with_open(path, name, caption, key, cached_thumbnail)


def tiles(report: HealthReport) -> None:
    summary = report.summary()
    shown = [("Likely wrong counts", "likely wrong counts",
              "Photos whose count looks like another one to heads that never saw them: doubted by confident "
              f"learning (cleanlab) and off by at least {MIN_FLAGGED_SCORE:g} objects on average."),
             ("Look-alike pairs", "look-alike pairs", "The same bin from the same angle: re-shot, shifted, or before "
                                                      "and after a pick (perceptual hashes)."),
             ("Pairs across splits", "pairs across splits (leakage)",
              "Look-alike or identical photos in different splits: a test photo the model has in effect seen."),
             ("Look-alikes, other counts", "look-alikes with other counts",
              "Often the same bin before and after a pick; sometimes a wrong count."),
             ("Exact duplicates", "exact duplicates", "Byte-identical files."),
             ("Unreadable", "unreadable", "Files that are not readable photos."),
             ("Very dark", "very dark", "Too dark to count by eye."),
             ("Blurred", "blurred", "Edges smeared: motion or focus.")]
    columns = [c for _ in range(2) for c in st.columns(4)]  # two rows: eight tiles in one cut their titles
    for column, (label, key, help_text) in zip(columns, shown):
        value = summary[key]
        column.metric(label, "—" if value is None else f"{value:,}", help=help_text)


def label_issues_section(report: HealthReport, dataset) -> None:
    st.subheader("Likely wrong counts")
    issues = report.label_issues
    if issues is None:
        st.info("Likely wrong counts were not looked for"
                + (f": {report.label_issues_problem}" if report.label_issues_problem else " yet."))
        if not report.label_issues_problem and st.button("Find the likely wrong counts", key="health_find_issues"):
            run_report(dataset, label_issues=True)
            st.rerun()
        return
    recheck_line(dataset.key, issues)
    st.caption(f"Every labelled photo was scored by {issues.info['folds']} heads on frozen EfficientNet-Lite0 "
               "features, each photo by a head that never saw it (test photos by heads trained without any test "
               f"photo). {issues.info['flagged']:,} of {issues.info['photos']:,} photos are flagged.")
    left, right = st.columns(2)
    with left:
        per_class = issues.per_class()
        per_class["text"] = [f"{n:,} of {p:,}" for n, p in zip(per_class["flagged"], per_class["photos"])]
        figure = px.bar(per_class, x="label", y="share flagged", text="text",
                        labels={"label": "recorded count", "share flagged": "share flagged"},
                        title="Flagged photos per recorded count")
        figure.update_traces(textposition="outside", cliponaxis=False)
        figure.update_yaxes(tickformat=".0%", rangemode="tozero")
        figure.update_xaxes(type="category")
        figure.update_layout(height=340, margin=dict(t=40, b=10))
        st.plotly_chart(figure, width="stretch", key="health_per_class")
        none = per_class.loc[per_class["flagged"] == 0, "label"].tolist()
        if none:
            st.caption(f"No bar for {', '.join(map(str, none))}: no photo recorded so is flagged (a flag needs "
                       f"cleanlab to doubt the record and the heads to put the count {MIN_FLAGGED_SCORE:g} or more "
                       "objects away from it).")
    with right:
        noise = issues.noise_frame()
        figure = px.imshow(noise, text_auto=".0%", color_continuous_scale="Oranges", zmin=0, zmax=1,
                           labels={"x": "likely true count", "y": "recorded count", "color": "share"},
                           title="Each recorded count: what its photos look like")
        figure.update_layout(height=340, margin=dict(t=40, b=10), coloraxis_showscale=False)
        figure.update_xaxes(type="category", side="bottom")
        figure.update_yaxes(type="category")
        st.plotly_chart(figure, width="stretch", key="health_noise")
        frame = issues.frame
        agreement = (frame["suggested"] == frame["label"]).groupby(frame["label"]).mean().mean()
        st.caption(f"Estimated by cleanlab from the heads' out-of-fold probabilities. The heads agree with "
                   f"{agreement:.0%} of recorded counts (balanced), so the matrix mixes wrong labels with the "
                   "heads' own confusion: read it as which counts are hard to tell apart, and look at the photos "
                   "before trusting a share.")
    flagged = issues.flagged()
    if flagged.empty:
        st.success("No photo is flagged: the recorded counts agree with what the photos look like.")
        return
    paths = dataset.paths_of(flagged["name"].head(CONTACT_SHEET))
    st.markdown(f"**The {min(CONTACT_SHEET, len(flagged))} most likely wrong counts** (most likely first)")
    columns = st.columns(6)
    for i, row in enumerate(flagged.head(CONTACT_SHEET).itertuples(index=False)):
        with columns[i % 6]:
            reviewed = outcome_word(getattr(row, "outcome", ""))
            show_photo(paths.get(row.name), row.name, f"{row.name} · recorded **{row.label}**, looks like "
                       f"**{row.suggested}** (~{row.score:.1f} off)" + (f" · reviewed: **{reviewed}**"
                                                                        if reviewed else ""), f"health_open_{i}")
    todo = int((flagged["outcome"] == "").sum()) if "outcome" in flagged else len(flagged)
    if current_user().can("spot_check") and todo:
        if st.button(f"Check the {todo:,} flagged bins not reviewed yet in Spot-check", type="primary",
                     key="health_to_spot_check"):
            st.session_state["spot_kind"] = "likely_wrong"
            st.switch_page("app_pages/spot_check.py")


def duplicates_section(report: HealthReport, dataset) -> None:
    st.subheader("Duplicates and look-alikes")
    pairs = report.duplicates
    if pairs.empty:
        st.success("No duplicate or look-alike photos.")
        return
    ordered = pairs.sort_values(["leakage", "conflicting_counts", "bits_256"], ascending=[False, False, True])
    shown = ordered.head(PAIRS_SHOWN)
    paths = dataset.paths_of(list(shown["photo"]) + list(shown["other_photo"]))
    st.caption("Pairs across splits first (leakage), then pairs with other counts. Look-alikes need a look: ABID's "
               "bins share elastic bands and labels, so a neighbouring bin can pass for the same one.")
    for row in shown.itertuples(index=False):
        left, middle, right = st.columns([2, 2, 3])
        with left:
            show_photo(paths.get(row.photo), row.photo, f"{row.photo} · count {_count(row.count)} · "
                       f"{_split(row.split)}", f"pair_open_{row.photo}_{row.other_photo}_a")
        with middle:
            show_photo(paths.get(row.other_photo), row.other_photo,
                       f"{row.other_photo} · count {_count(row.other_count)} · {_split(row.other_split)}",
                       f"pair_open_{row.photo}_{row.other_photo}_b")
        with right:
            flags = [("exact duplicate" if row.kind == "exact" else "look-alike")]
            if row.leakage:
                flags.append(f"**across splits** ({row.split} / {row.other_split})")
            if row.conflicting_counts:
                flags.append("**other counts**")
            st.markdown(" · ".join(flags))
            st.caption(f"Hash distances: {row.bits_64} of 64 bits, {row.bits_256} of 256.")
    both = list(dict.fromkeys(n for pair in zip(ordered["photo"], ordered["other_photo"]) for n in pair))
    send_to_spot_check(both, "health_pairs_to_spot_check",
                       f"Check the {len(both):,} photos of these {len(ordered):,} pairs in Spot-check")
    with st.expander(f"All {len(pairs):,} pairs"):
        st.dataframe(ordered, hide_index=True, width="stretch")


def _count(value) -> str:
    return "—" if pd.isna(value) else str(int(value))


def _split(value) -> str:
    return "no split (count outside the classes)" if pd.isna(value) else f"{value} split"


def quality_section(report: HealthReport, dataset) -> None:
    st.subheader("Unreadable, dark or blurred photos")
    quality = report.quality
    if quality.empty:
        st.success("Every photo is readable, bright enough and sharp enough to count.")
        return
    paths = dataset.paths_of(quality["photo"])
    columns = st.columns(6)
    for i, row in enumerate(quality.head(12).itertuples(index=False)):
        with columns[i % 6]:
            show_photo(paths.get(row.photo), row.photo, f"{row.photo} · {row.problem}: {row.detail}",
                       f"quality_open_{i}")
    readable = [n for n in quality["photo"] if isinstance(paths.get(n), str)]
    send_to_spot_check(readable, "health_quality_to_spot_check",
                       f"Check the {len(readable):,} readable ones in Spot-check (count them, or mark them unclear "
                       "or hidden)")
    if len(quality) > 12:
        st.dataframe(quality, hide_index=True, width="stretch")


st.title("Data health")
dataset = current_dataset()
if dataset is None:
    st.stop()
st.caption("Inventory records are not visual truth: some recorded counts are wrong, some photos are duplicated across "
           "splits, some cannot be counted by eye. This page finds them; Spot-check is where they get fixed.")
report = current_report(dataset)
if report is None:
    st.info("The data has not been checked yet. The first run computes frozen features of every labelled photo "
            "(10–30 minutes on 2 CPU cores for 3,000 photos); later runs reuse them and take seconds, and after a "
            "spot-check decision the check runs again by itself.")
    if st.button("Check the data", type="primary", key="health_run"):
        report = run_report(dataset, label_issues=True)
        st.rerun()  # drawn again from the caches, without this note
    st.stop()
tiles(report)
st.download_button("Every finding (CSV)", report.csv(), f"data-health-{dataset.key}.csv", "text/csv",
                   icon=":material/download:",
                   key="health_csv")
label_issues_section(report, dataset)
st.subheader("How often the flags are right")
st.caption("From the reviewers' decisions in Spot-check: for each queue, the share of its reviewed bins whose record "
           "was wrong (corrected), whose items could not be counted from the photo (hidden), whose record was right "
           "(confirmed, or the model was wrong) or that stayed unclear. On ABID, “looks like another count” is "
           "often “the items are hidden”.")
precision_chart(dataset.key)
duplicates_section(report, dataset)
quality_section(report, dataset)
