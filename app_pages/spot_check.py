"""Spot-check page: go through a queue of bins, confirm or correct each count; audit trail, progress and CSV export."""
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

from app_pages.common import current_dataset, current_user, model_for, remembered_annotator
from app_pages.review_views import label_issues_now, precision_tiles, recheck_line
from core.data.labels import annotations
from core.data.classes import ClassRange, model_class_range
from core.data.dataset import photo_items
from core.data.photos.images import ImageError, load_image
from core.jobs.runs import current_model_path
from core.review.queue import (
    ISSUE_QUEUES,
    MODEL_QUEUES,
    QUEUES,
    QueueError,
    agrees,
    build_queue,
    candidates,
    inside_classes,
    model_scores,
    score_photos,
    unscored,
)

COUNT_FILTERS = [0, 1, 2, 3, 4, 5, annotations.MORE_THAN_FIVE]
SPLITS = ["train", "valid", "test", "none"]
STATUS_COLOURS = {"confirmed": "#2ca02c", "corrected": "#e07b00", "unclear": "#7f7f7f", "hidden": "#6f42c1",
                  "model_wrong": "#1f77b4"}
SHORTCUTS = ("Keys: **Y** confirm · **0**–**5** set the count · **M** more than 5 · **H** items hidden · "
             "**W** model wrong · **U** unclear · **N** next · **P** previous")


def who_is_annotating() -> str:
    """The signed-in user (when their role may spot-check) when the app has sign-in, else a name asked once per
    browser session."""
    signed_in = current_user()
    if signed_in.signed_in:
        refused = signed_in.why_not("spot_check")
        if refused:
            st.info(refused)
            st.stop()
        return signed_in.name
    user = st.user.to_dict()
    if user.get("is_logged_in") or ("is_logged_in" not in user and user.get("email")):
        return str(user.get("email") or user.get("name") or user.get("sub"))
    if "is_logged_in" in user:
        st.info("Log in to spot-check: each decision is saved under your name.")
        st.button("Log in", on_click=st.login, type="primary")
        st.stop()
    name = remembered_annotator()
    if name:
        return name
    with st.form("annotator_form"):
        typed = st.text_input("Your name — saved with each of your decisions", key="annotator_input")
        started = st.form_submit_button("Start checking", type="primary")
    if started and typed.strip():
        st.session_state["annotator"] = typed.strip()
        st.rerun()
    if started:
        st.error("Type a name first: every decision records who made it.")
    st.stop()


def flash(kind: str, text: str) -> None:
    st.session_state["spot_flash"] = (kind, text)


def move(step: int, length: int) -> None:
    st.session_state["spot_pos"] = min(max(st.session_state.get("spot_pos", 0) + step, 0), max(length - 1, 0))


def decide(choice: str, key: str, name: str, path: str, current: int | None, seen_id: int | None, who: str,
           length: int) -> None:
    """Button callback: save the decision (its own transaction) and go to the next bin."""
    note = st.session_state.get(f"spot_note_{name}", "")
    outcome = choice if choice in annotations.OUTCOMES else None
    count = (current if choice == "confirm" or outcome else annotations.UNCLEAR if choice == "unclear"
             else int(choice))
    try:
        result = annotations.save_decision(key, name, who, count, recorded_count=current, note=note, path=path,
                                           seen_id=seen_id, outcome=outcome,
                                           queue=st.session_state.get("spot_kind", ""))
    except annotations.PhotoMissing as exc:
        flash("error", f"**This photo has vanished.** {exc}")
        return
    except annotations.AnnotationError as exc:
        flash("error", str(exc))
        return
    st.session_state.pop(f"spot_note_{name}", None)
    saved = result.decision
    message = (f"Saved **{name}**: {annotations.STATUS_WORDS[saved.status]}, count "
               f"{annotations.count_label(saved.new_count)}.")
    if st.session_state.get("spot_pos", 0) >= length - 1:
        message += " That was the last bin of this queue: draw a **New queue** for more."
    if result.overtaken:
        other = result.overtaken
        flash("warning", message + f" Note: {other.annotator} had set it to "
              f"{annotations.count_label(other.new_count)} at {other.created_at[:19]} while you looked; "
              "both decisions are kept and yours, the later one, is now the label.")
    else:
        flash("success", message)
    move(+1, length)





def model_prediction(model_path: Path | None, row: pd.Series) -> None:
    if model_path is None:
        st.caption(":material/smart_toy: No model yet: train one (Train page) to see its prediction here.")
        return
    from core.models.networks import WeightsError

    try:  # read from the prediction store; predicted (and stored) the first time this bin is shown
        known = score_photos(model_path, row.to_frame().T, lambda: model_for(model_path))
    except (OSError, RuntimeError, ValueError, ImageError, WeightsError) as exc:
        st.caption(f":material/smart_toy: The current model could not predict this photo: {exc}")
        return
    if known.empty or pd.notna(known.iloc[0]["error"]):
        st.caption(":material/smart_toy: The current model could not read this photo.")
        return
    predicted, confidence = known.iloc[0]["predicted"], float(known.iloc[0]["confidence"])
    verdict = (":green[:material/check: agrees with the label]" if agrees(row, predicted)
               else ":red[:material/close: differs from the label]")
    st.markdown(f":material/smart_toy: Model predicts **{predicted}** ({confidence:.0%} sure) · {verdict}")


def label_issue_hint(health_issues, name: str) -> None:
    """What the data health check suggests for this bin (heads that never saw it), when it has run."""
    if health_issues is None:
        return
    row = health_issues.frame[health_issues.frame["name"] == name]
    if row.empty:
        return
    row = row.iloc[0]
    probs = {c: float(row[f"prob_{c}"]) for c in health_issues.classes}
    verdict = "likely wrong" if row["flagged"] else "not flagged"
    if row.get("outcome"):
        verdict += f" (reviewed: {annotations.STATUS_WORDS[row['outcome']]})"
    st.markdown(f":material/health_and_safety: Data health suggests **{row['suggested']}** · {verdict}, expected "
                f"{row['score']:.1f} objects off", help="From heads that never saw this photo (cross-fitted on the "
                "other photos): the expected distance in objects between the recorded count and the true one.")
    st.caption("Probabilities: " + " · ".join(f"{c}: {p:.0%}" for c, p in probs.items()))


PHOTO_HEIGHT = 540  # the whole bin on a 1000 px high screen, beside its buttons, without scrolling


def photo_figure(path: str):
    image = np.asarray(load_image(path))
    figure = px.imshow(image)
    height = int(np.clip(PHOTO_HEIGHT * image.shape[0] / image.shape[1], 300, PHOTO_HEIGHT))
    figure.update_layout(margin=dict(l=0, r=0, t=0, b=0), height=height, dragmode="zoom")
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)
    return figure


def show_progress(key: str, frame: pd.DataFrame) -> None:
    latest = annotations.latest_decisions(key)
    pool = candidates(frame)
    checked = int(pool["name"].isin(latest["photo"]).sum())
    cols = st.columns(5)
    cols[0].metric("Bins checked", f"{checked:,} of {len(pool):,}",
                   help=f"{checked / max(len(pool), 1):.1%} of the bins that can be looked at")
    cols[1].metric("Counts corrected", f"{int((latest['status'] == 'corrected').sum()):,}")
    cols[2].metric("Items hidden", f"{int((latest['status'] == 'hidden').sum()):,}",
                   help="The record is right but the items cannot be counted from the photo; training can leave "
                        "them out (Train → Advanced) and Evaluate reports them apart")
    cols[3].metric("Marked unclear", f"{int((latest['status'] == 'unclear').sum()):,}",
                   help="Left out of training and evaluation until someone sets a count")
    table = annotations.progress(key)
    cols[4].metric("Decisions in total", f"{int(table['decisions'].sum()):,}", help="Undone decisions do not count")
    if table.empty:
        st.info("No decision yet: the chart of each annotator's progress appears after the first one.")
        return
    long = table.melt(id_vars="annotator", value_vars=list(annotations.STATUSES), var_name="status",
                      value_name="n")
    long["status"] = long["status"].map(annotations.STATUS_WORDS)
    colours = {annotations.STATUS_WORDS[s]: c for s, c in STATUS_COLOURS.items()}
    figure = px.bar(long, x="n", y="annotator", color="status", orientation="h", color_discrete_map=colours,
                    title="Decisions per annotator", labels={"n": "decisions"},
                    height=220 + 40 * len(table))
    figure.update_layout(legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0, title=None))
    st.plotly_chart(figure, width="stretch")
    table["last_at"] = table["last_at"].str.slice(0, 19).str.replace("T", " ") + " UTC"
    st.dataframe(table.rename(columns=annotations.STATUS_WORDS | {"last_at": "last decision"}), hide_index=True,
                 width="stretch")


def show_history(key: str) -> None:
    trail = annotations.history(key)
    if trail.empty:
        st.info("No decision yet.")
        return
    c1, c2 = st.columns(2)
    who = c1.multiselect("Annotator", sorted(trail["annotator"].unique()), placeholder="everyone")
    text = c2.text_input("Photo name contains", key="history_photo")
    if who:
        trail = trail[trail["annotator"].isin(who)]
    if text.strip():
        trail = trail[trail["photo"].str.contains(text.strip(), case=False, regex=False)]
    st.dataframe(readable(trail).iloc[::-1], hide_index=True, width="stretch")
    st.download_button("Export every decision (CSV)", annotations.export_csv(key), "annotations.csv", "text/csv",
                       icon=":material/download:",
                       key="export_csv")


def readable(trail: pd.DataFrame) -> pd.DataFrame:
    shown = trail[["created_at", "photo", "annotator", "status", "old_count", "new_count", "note"]].copy()
    shown["created_at"] = shown["created_at"].str.slice(0, 19).str.replace("T", " ") + " UTC"
    shown["status"] = [annotations.STATUS_WORDS[s] + (f" (undone {u[:19].replace('T', ' ')} by {b})"
                                                      if isinstance(u, str) else "")
                       for s, u, b in zip(trail["status"], trail["undone_at"], trail["undone_by"])]
    shown["old_count"] = [("—" if pd.isna(c) else str(int(c))) for c in shown["old_count"]]
    shown["new_count"] = [annotations.count_label(None if pd.isna(c) else c) for c in shown["new_count"]]
    return shown.rename(columns={"created_at": "time", "old_count": "from", "new_count": "to"})


def model_classes(model_path: Path | None) -> ClassRange | None:
    """The current model's class range: its queues hold only bins it can agree with."""
    if model_path is None:
        return None
    try:
        return model_class_range(model_for(model_path)[1])
    except (OSError, RuntimeError, ValueError):
        return None


QUEUE_CONTROLS = ("spot_kind", "spot_counts", "spot_splits", "spot_size")


def choose_queue(dataset, model_path: Path | None, checked: set[str], health_issues) -> list[str]:
    """The queue controls; the queue is rebuilt only when they change, so it stays put while you work."""
    frame, key = dataset.frame, dataset.key
    c1, c2, c3, c4 = st.columns([3, 2, 2, 1])
    linked = st.query_params.get("queue")
    # Streamlit forgets a widget's value when another page is shown: coming back goes on with the queue as it was
    # (and a reload, a new session, with the queue in the address)
    for control in QUEUE_CONTROLS:
        if control not in st.session_state and f"{control}_kept" in st.session_state:
            st.session_state[control] = st.session_state[f"{control}_kept"]
    if "spot_kind" not in st.session_state and linked in QUEUES and linked != "sent":
        st.session_state["spot_kind"] = linked
    if st.session_state.get("spot_kind") == "sent" and not st.session_state.get("spot_sent"):
        del st.session_state["spot_kind"]
    kind = c1.selectbox("Queue", list(QUEUES), format_func=QUEUES.get, key="spot_kind",
                        help="Model queues hold only the bins whose count is one of the model's classes; the others "
                             "are in “Outside the classes”.")
    if kind == "sent":  # a list sent from another page lives in this session only
        st.query_params.pop("queue", None)
    elif linked != kind:
        st.query_params["queue"] = kind
    counts = c2.multiselect("Current count", COUNT_FILTERS, format_func=annotations.count_label,
                            placeholder="all counts", key="spot_counts")
    splits = c3.multiselect("Split", SPLITS, placeholder="all splits", key="spot_splits")
    st.session_state.setdefault("spot_size", 50)  # (not as the widget's default: restored values would clash)
    size = int(c4.number_input("Bins", 1, 1000, key="spot_size"))
    st.session_state.update({f"{control}_kept": st.session_state[control] for control in QUEUE_CONTROLS})
    scores = None
    classes = model_classes(model_path) if kind in MODEL_QUEUES or kind == "outside" else None
    if kind in MODEL_QUEUES:
        if model_path is None:
            st.info(":material/smart_toy: No model yet: this queue needs the current model's predictions. Train a model on the "
                    "Train page (and choose it as current), or pick another queue.")
            st.stop()
        pool = candidates(frame, counts, splits)
        pool = pool[inside_classes(pool, classes)]
        todo = unscored(model_path, pool)
        if len(todo):
            st.caption(f"{len(pool) - len(todo):,} of {len(pool):,} matching bins have model predictions.")
            if st.button(f"Score {len(todo):,} bins with the current model", key="spot_score"):
                bar = st.progress(0.0, text="Loading the model…")
                score_photos(model_path, todo, lambda: model_for(model_path), on_progress=lambda info: bar.progress(
                    min(float(info["fraction"]), 1.0), text=f"Scoring bins with the current model: {info['message']}"))
                bar.empty()
                st.rerun()
        scores = model_scores(model_path, pool)
    issues = None
    if kind in ISSUE_QUEUES:
        if health_issues is None:
            st.info("This queue is ordered by the data health check, which has not run on this dataset yet.")
            st.page_link("app_pages/health.py", label="Open Data health and run the check",
                         icon=":material/health_and_safety:")
            st.stop()
        issues = health_issues.frame
    seed = st.session_state.get("spot_seed", 0)
    sent = st.session_state.get("spot_sent") or []
    # Scoring more photos changes a model queue; the other queues must not move while the current bin is scored.
    settings = (key, kind, tuple(counts), tuple(splits), size, seed, len(scores) if kind in MODEL_QUEUES else None,
                tuple(sent) if kind == "sent" else None)
    if st.session_state.get("spot_settings") != settings:
        try:
            queue = build_queue(frame, kind, checked, scores, counts, splits, size, seed, issues=issues,
                                classes=classes, sent=sent)
        except QueueError as exc:
            st.info(str(exc))
            st.stop()
        st.session_state.update(spot_settings=settings, spot_queue=queue, spot_pos=0)
    return st.session_state["spot_queue"]


def show_bin(dataset, name: str, who: str, queue: list[str], model_path: Path | None, health_issues) -> None:
    frame = dataset.frame
    found = frame[frame["name"] == name]
    row = None if found.empty else found.iloc[0]
    path = row["path"] if row is not None and isinstance(row["path"], str) else None
    if path is None or not Path(path).is_file():
        where = f" from {path}" if path else ""
        st.error(f"**This photo has vanished:** {name} is gone{where} — moved or deleted after the queue was made. "
                 "It cannot be checked and nothing was saved for it. Go on with **Next**.")
        return
    history = annotations.history(dataset.key, name)
    last = history.iloc[-1] if len(history) else None
    current = None if pd.isna(row["count"]) else int(row["count"])
    left, right = st.columns([3, 2])
    with left:
        try:
            st.plotly_chart(photo_figure(path), width="stretch", key="spot_photo",
                            config={"scrollZoom": True, "displaylogo": False})
            st.caption("Scroll or drag a box to zoom, double-click to reset.")
        except ImageError as exc:
            st.error(f"This photo cannot be shown: {exc}. Mark it unclear or go on with Next.")
        kind = st.session_state.get("spot_kind", "")
        precision_tiles(dataset.key, kind, QUEUES.get(kind, kind))  # under the photo: the buttons stay in view
    with right:
        st.markdown(f"#### {name}")
        source = "checked" if row["label_source"] == "annotation" else f"recorded ({row['label_source']})"
        if current is None:
            shown_count = "unclear" if last is not None else "none"
        else:  # a recorded count is exact; a checked one above 5 means "more than 5"
            shown_count = annotations.count_label(current) if last is not None else str(current)
        st.markdown(f"Count: **{shown_count}** · {source}"
                    f" · split {row['split'] if pd.notna(row['split']) else '—'}")
        if last is not None:
            st.caption(f"Last decision: {last['status']} by {last['annotator']} at {last['created_at'][:19]} UTC")
        model_prediction(model_path, row)
        label_issue_hint(health_issues, name)
        st.text_input("Note (optional)", key=f"spot_note_{name}", placeholder="e.g. items hidden under the flap")
        context = dict(key=dataset.key, name=name, path=path, current=current,
                       seen_id=None if last is None else int(last["id"]), who=who, length=len(queue))
        buttons = st.container(horizontal=True)
        buttons.button(f"Confirm {shown_count if current is not None else ''}", type="primary", icon=":material/check:",
                       shortcut="Y", key="decide_confirm", disabled=current is None, on_click=decide,
                       kwargs=dict(choice="confirm", **context))
        for n in range(6):
            buttons.button(str(n), shortcut=str(n), key=f"decide_{n}", on_click=decide,
                           kwargs=dict(choice=str(n), **context))
        buttons.button("More than 5", shortcut="M", key="decide_more", on_click=decide,
                       kwargs=dict(choice=str(annotations.MORE_THAN_FIVE), **context))
        outcomes = st.container(horizontal=True)
        outcomes.button("Items hidden", shortcut="H", key="decide_hidden", on_click=decide,
                        icon=":material/visibility_off:",
                        disabled=current is None, kwargs=dict(choice="hidden", **context),
                        help="The recorded count is right, but the items cannot be counted from this photo (hidden "
                             "under a box or the bands, flat, blurred). The count stays.")
        outcomes.button("Model wrong", shortcut="W", key="decide_model_wrong", on_click=decide,
                        icon=":material/smart_toy:", disabled=current is None,
                        kwargs=dict(choice="model_wrong", **context),
                        help="The recorded count is right and can be seen: the flag or the model is wrong. The "
                             "count stays.")
        outcomes.button("Unclear", shortcut="U", key="decide_unclear", on_click=decide, icon=":material/help:",
                        kwargs=dict(choice="unclear", **context))
        st.caption(SHORTCUTS)
        items = photo_items(dataset, name)
        if items:  # what counting needs: the item and how many; the dimensions are in Browse
            st.dataframe(pd.DataFrame(items).rename(columns={"asin": "ASIN"}), hide_index=True, width="stretch",
                         column_order=["quantity", "name"],
                         column_config={"quantity": st.column_config.NumberColumn("qty", width="small"),
                                        "name": st.column_config.TextColumn("item", width="medium")})
        else:
            st.caption("No item metadata for this photo.")
    with st.expander(f"History of this bin ({len(history)} decision{'s' if len(history) != 1 else ''})"):
        if history.empty:
            st.caption("Not checked yet.")
        else:
            st.dataframe(readable(history), hide_index=True, width="stretch")


st.title("Spot-check")
dataset = current_dataset()
if dataset is None:
    st.stop()
annotator = who_is_annotating()
st.caption(f"Checking as **{annotator}** · decisions are saved at once and kept with their full history.")
check_tab, progress_tab, history_tab = st.tabs(["Check bins", "Progress", "History"])
with progress_tab:
    show_progress(dataset.key, dataset.frame)
with history_tab:
    show_history(dataset.key)
with check_tab:
    if "spot_flash" in st.session_state:
        kind, text = st.session_state.pop("spot_flash")
        getattr(st, kind)(text)
    model_path = current_model_path()
    checked = set(annotations.latest_decisions(dataset.key)["photo"])
    # the data health check's label issues with the reviews since; re-checked in the background when labels changed
    health_issues = label_issues_now(dataset)
    queue = choose_queue(dataset, model_path, checked, health_issues)
    if not queue:
        st.info("No bin left in this queue: every matching bin is checked, or none matches the filters.")
        st.stop()
    pos = min(st.session_state.get("spot_pos", 0), len(queue) - 1)
    done = sum(name in checked for name in queue)
    nav = st.container(horizontal=True, vertical_alignment="center")
    nav.button("◀ Previous", shortcut="P", key="spot_prev", disabled=pos == 0, on_click=move, args=(-1, len(queue)))
    nav.button("Next ▶", shortcut="N", key="spot_next", disabled=pos >= len(queue) - 1, on_click=move,
               args=(+1, len(queue)))
    nav.progress(done / len(queue), text=f"Bin {pos + 1} of {len(queue)} · {done} of these {len(queue)} checked")
    if nav.button("New queue", icon=":material/shuffle:", key="spot_reshuffle",
                  help="Draw another sample with the same settings"):
        st.session_state["spot_seed"] = st.session_state.get("spot_seed", 0) + 1
        st.rerun()
    show_bin(dataset, queue[pos], annotator, queue, model_path, health_issues)
    recheck_line(dataset.key, health_issues)
