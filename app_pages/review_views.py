"""Views the review loop shares between Spot-check, Data health and Evaluate: the label issues as they stand (with the
background re-check), the flags' measured precision, and a finding's photo opened large and sent to Spot-check."""
from __future__ import annotations

import time

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages.common import current_user, label_issues_of
from core.review.precision import VERDICT_ORDER, precision_of, queue_precision
from core.review.recheck import recheck, recheck_state

VERDICT_COLOURS = {"record wrong": "#d1495b", "items hidden": "#6f42c1", "record right": "#2a9d8f",
                   "unclear": "#adb5bd"}
VERDICT_HELP = {"record wrong": "The reviewer corrected the count: the flag was right.",
                "items hidden": "The record is right but the items cannot be counted from the photo (hidden, flat, "
                                "blurred): the flag is explained by the photo, not by the record.",
                "record right": "The reviewer confirmed the count or said the model is wrong: the flag was wrong.",
                "unclear": "The reviewer could not tell."}


# ---------------------------------------------------------------------------------------------- label issues

def label_issues_now(dataset):
    """The label issues with the reviews since (None when never checked); a stale ranking starts a background
    re-check (recheck_line shows it)."""
    issues = label_issues_of(dataset)
    if issues is not None and issues.info.get("stale"):
        recheck(dataset, issues)
    return issues


def recheck_line(dataset_key: str, issues) -> None:
    """While the ranking is older than the labels: one line saying so and how the re-check goes; the page is drawn
    again when the fresh ranking is in. Nothing when the ranking is current."""
    if issues is not None and issues.info.get("stale"):
        recheck_progress(dataset_key, issues.info.get("computed_at", ""), issues.info.get("changed", 0), time.time())


@st.fragment(run_every=2)
def recheck_progress(dataset_key: str, computed_at: str, changed: int, drawn_at: float) -> None:
    """One line under the ranking while it is being re-checked; the page is drawn again when the fresh one is in."""
    state = recheck_state(dataset_key)
    if not state.running and state.finished_at and state.finished_at > drawn_at and not state.error:
        st.rerun(scope="app")
    many = changed != 1
    changes = f"{changed:,} label{'s' if many else ''} changed since (marked on {'their' if many else 'its'} row)"
    if state.running:
        st.caption(f":material/sync: Ranked by the check of {computed_at}; {changes}. Re-checking in the background: "
                   f"{state.text} ({state.fraction:.0%}) — the fresh ranking replaces this one when done.")
    elif state.error:
        st.caption(f":material/error: Ranked by the check of {computed_at}; {changes}. The re-check failed: "
                   f"{state.error}")
    else:
        st.caption(f":material/schedule: Ranked by the check of {computed_at}; {changes}.")


# ---------------------------------------------------------------------------------------------- precision

def precision_tiles(dataset_key: str, queue: str, queue_name: str) -> None:
    """What the reviews of this queue found so far: the share of each verdict with its 95 % interval (two by two, to
    fit under the bin's photo)."""
    found = precision_of(queue_precision(dataset_key), queue)
    box = st.container(key="precision_tiles")
    if found is None:
        box.caption(f"How often “{queue_name}” is right shows here after the first review of one of its bins.")
        return
    bins, share, low, high = found["record wrong"]
    box.markdown(f"**How often this queue is right** · {found['reviewed']:,} bin"
                 f"{'s' if found['reviewed'] != 1 else ''} reviewed from it",
                 help="Each bin's latest decision made from this queue; undone decisions do not count.")
    columns = [c for _ in range(2) for c in box.columns(2)]
    for column, verdict in zip(columns, VERDICT_ORDER):
        hits, part, lo, hi = found[verdict]
        column.metric(verdict.capitalize(), f"{part:.0%} ({hits:,})",
                      help=f"{VERDICT_HELP[verdict]} 95 % interval {lo:.0%}–{hi:.0%} (Wilson).")
    box.caption(f"Its flags were right (record wrong) for {share:.0%} of the bins reviewed (95 % interval "
                f"{low:.0%}–{high:.0%}).")


def precision_chart(dataset_key: str) -> None:
    """Every queue reviewed so far: what share of its bins had a wrong record, hidden items or a right record."""
    table = queue_precision(dataset_key)
    if table.empty:
        st.info("No bin has been reviewed yet: after the first decisions in Spot-check this shows how often each "
                "queue's flags are right.")
        return
    figure = go.Figure()
    names = [f"{name} ({n:,})" for name, n in table.drop_duplicates("queue")[["queue_name", "reviewed"]].itertuples(
        index=False)]
    for verdict in VERDICT_ORDER:
        part = table[table["verdict"] == verdict]
        figure.add_trace(go.Bar(
            y=names, x=part["share"], orientation="h", name=verdict, marker_color=VERDICT_COLOURS[verdict],
            text=[f"{s:.0%}" if s >= 0.06 else "" for s in part["share"]], textposition="inside",
            customdata=part[["bins", "reviewed", "low", "high"]].to_numpy().tolist(),
            hovertemplate=f"{verdict}: " + "%{customdata[0]} of %{customdata[1]} (%{x:.0%}; 95 % interval "
                          "%{customdata[2]:.0%}–%{customdata[3]:.0%})<extra></extra>"))
    figure.update_layout(barmode="stack", height=90 + 38 * len(names), margin=dict(l=0, r=10, t=30, b=10),
                         xaxis=dict(tickformat=".0%", range=[0, 1]), yaxis=dict(autorange="reversed"),
                         legend=dict(orientation="h", yanchor="bottom", y=1.0, x=0, title=None,
                                     traceorder="normal"))  # (stacked bars list their legend reversed by default)
    st.plotly_chart(figure, width="stretch", key="precision_chart")
    wrong = table[table["verdict"] == "record wrong"]
    st.caption("Bins reviewed per queue (in brackets) and what the reviewer found. Record wrong, with its 95 % "
               "interval: " + "; ".join(f"{row.queue_name} {row.share:.0%} ({row.low:.0%}–{row.high:.0%})"
                                        for row in wrong.itertuples(index=False)) + ".")


# ---------------------------------------------------------------------------------------------- a finding's photo

def send_to_spot_check(names: list[str], key: str, label: str) -> None:
    """A button that opens Spot-check on these photos (its "sent" queue), for users who may spot-check."""
    if not names or not current_user().can("spot_check"):
        return
    if st.button(label, key=key, icon=":material/fact_check:"):
        st.session_state.update(spot_kind="sent", spot_sent=list(names), spot_settings=None)
        st.switch_page("app_pages/spot_check.py")


@st.dialog("Photo", width="large")
def open_photo(name: str, path: str, caption: str) -> None:
    """The photo at its own size (at most the dialog's width), what was found, and a way to check it."""
    st.image(path, width="content", caption=caption)
    send_to_spot_check([name], f"open_send_{name}", "Check this bin in Spot-check")


def photo_with_open(path, name: str, caption: str, key: str, thumbnail) -> None:
    """A finding's thumbnail with its caption and a button that opens it large."""
    picture = thumbnail(path) if isinstance(path, str) else "not on disk"
    if isinstance(picture, bytes):
        st.image(picture, width="stretch")
    else:
        st.warning(picture)
    st.caption(caption)
    if isinstance(path, str) and st.button("Open", key=key, icon=":material/zoom_in:", width="stretch"):
        open_photo(name, path, caption)


def outcome_word(outcome: str) -> str:
    from core.data.labels.annotations import STATUS_WORDS

    return STATUS_WORDS.get(outcome, "") if isinstance(outcome, str) and outcome and not pd.isna(outcome) else ""
