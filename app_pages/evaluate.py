"""Evaluate page: a run's metrics on a split, a confusion matrix that opens its photos, and runs compared."""
from dataclasses import replace
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from app_pages import insight_views
from app_pages.common import (
    cached_thumbnail,
    checked_path,
    current_dataset,
    current_user,
    model_for,
    remember_annotator,
    remembered_annotator,
    training_progress,
)
from core.data.labels import annotations
from core.data.browse import page_of
from core.data.classes import ClassRange, model_class_range
from core.data.dataset import DatasetError
from core.data.layouts.registry import load_dataset
from core.evaluation import reports
from core.evaluation.calibration import LEGACY_THRESHOLD, chosen_threshold
from core.evaluation.predictions import PredictionStore, probability_columns
from core.evaluation.results import EvaluationResult, score, skipped_summary
from core.jobs import queue as jobs
from core.jobs.runs import available_runs, current_run, run_label
from core.models.networks import WeightsError

SPLITS = {"test": "Test split", "valid": "Validation split", "train": "Training split", "all": "All labelled photos"}
OTHER_FOLDER = "Another labelled folder…"
PHOTOS_PER_PAGE = 12








def show_photo(path: str) -> None:
    picture = cached_thumbnail(path, 480, 360)
    if isinstance(picture, bytes):
        st.image(picture, width="stretch")
    else:
        st.warning(picture)


def model_loader(run_path: str):
    return lambda: model_for(Path(run_path) / "model.pt")


def result_for(run: dict, rows: pd.DataFrame, split: str, problems=()) -> EvaluationResult:
    """The run's result on these photos from the prediction store; a progress bar while photos are predicted."""
    slot = st.empty()
    model_path = Path(run["path"]) / "model.pt"
    missing = len(PredictionStore(model_path).missing(rows))
    text = f"Predicting {missing:,} photos with {run['id']} (once: the results are kept)…"
    if missing:
        slot.progress(0.0, text=text)

    def progress(info):
        slot.progress(min(max(float(info.get("fraction") or 0.0), 0.0), 1.0), text=text)

    try:
        return score(model_path, rows, model_loader(run["path"]), run=run["id"], split=split, problems=problems,
                     on_progress=progress)
    finally:
        slot.empty()


def choose_photos(model_range: ClassRange):
    """(rows, split, problems, description) of the photos to evaluate on, or stop with a message.

    The dataset is read with the model's class range, so the truth is what the model was trained to predict.
    """
    left, right = st.columns([2, 3])
    options = list(SPLITS) + [OTHER_FOLDER]
    choice = left.selectbox("Photos", options, format_func=lambda o: SPLITS.get(o, o), key="eval_split")
    if choice == OTHER_FOLDER:
        refused = current_user().why_not("open_folder")
        folder = right.text_input("Labelled folder (ABID layout or <count>/*.jpg folders)", key="eval_folder",
                                  placeholder="/data/abid_holdout", disabled=refused is not None, help=refused).strip()
        if refused:
            st.info(refused)
            st.stop()
        if not folder:
            st.info("Give the path of a labelled folder to evaluate on.")
            st.stop()
        allowed = checked_path(folder)
        if allowed is None:
            st.stop()
        source, split = str(allowed), "all"
    else:
        current = current_dataset()
        if current is None:
            st.stop()
        source, split = current.source, choice
        if current.class_range != model_range:
            st.info(f"Evaluated with the model's class range {model_range.describe()} "
                    f"(the sidebar's is {current.class_range.describe()}).")
    try:
        dataset = load_dataset(source, model_range)
    except DatasetError as exc:
        st.error(f"**This folder cannot be used.** {exc}")
        st.stop()
    st.session_state["eval_dataset_key"] = dataset.key  # where a correction made from a confusion cell is saved
    rows = dataset.rows(split)
    description = SPLITS[split].lower() if choice != OTHER_FOLDER else f"labelled photos of `{dataset.source}`"
    for note in dataset.notes:
        st.caption(note)
    if rows.empty:
        st.warning(f"No labelled photo on disk in the {description}: nothing to evaluate.")
        st.stop()
    return rows, split, dataset.problems, description


def countable_tiles(result: EvaluationResult, metrics: dict) -> None:
    """The headline figures again without the photos a reviewer marked uncountable (items hidden), when any is here."""
    hidden = annotations.uncountable(st.session_state.get("eval_dataset_key"))
    scored = result.scored()
    marked = int(scored["name"].isin(hidden).sum())
    if not marked:
        return
    countable = replace(result, frame=result.frame[~result.frame["name"].isin(hidden)])
    if countable.scored().empty:
        st.caption(f"All {marked:,} photos scored are marked uncountable (items hidden).")
        return
    figures = countable.metrics()
    st.markdown(f"**On countable photos only** — {figures['n']:,} of {metrics['n']:,}: {marked:,} marked “items "
                "hidden” in Spot-check are left out (the change is against all photos)")
    cols = st.columns(5)
    for column, (key, label) in zip(cols, [("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"),
                                           ("mae", "MAE (objects)"), ("off_by_one", "Off-by-one accuracy")]):
        percent = key != "mae"
        value, delta = figures[key], figures[key] - metrics[key]
        column.metric(f"{label}, countable", f"{value:.1%}" if percent else f"{value:.3f}",
                      f"{delta * 100:+.1f} pts" if percent else f"{delta:+.3f}",
                      delta_color="inverse" if key == "mae" else "normal")
    cols[4].metric("Marked uncountable", f"{marked:,}", help="Photos whose latest Spot-check decision is “items "
                   "hidden”: the record is right but the items cannot be counted from the photo.")


def metric_tiles(metrics: dict, skipped: list[dict]) -> None:
    cols = st.columns(5)
    cols[0].metric("Accuracy", f"{metrics['accuracy']:.1%}")
    cols[1].metric("Balanced accuracy", f"{metrics['balanced_accuracy']:.1%}")
    cols[2].metric("MAE (objects)", f"{metrics['mae']:.3f}")
    cols[3].metric("Off-by-one accuracy", f"{metrics['off_by_one']:.1%}")
    cols[4].metric("Photos scored", f"{metrics['n']:,}")
    left_out = metrics.get("left_out", {})
    if skipped:
        st.warning(f"{len(skipped):,} photos could not be read and are left out of the metrics.")
        with st.expander("Skipped photos"):
            st.caption(skipped_summary(skipped))
            st.dataframe(pd.DataFrame(skipped), hide_index=True, width="stretch", key="skipped_table")
    if left_out.get("outside_classes"):
        st.warning(f"{left_out['outside_classes']:,} photos have a count the model does not know "
                   f"(it predicts {', '.join(map(str, metrics['classes']))}) and are left out.")


def per_class_section(result: EvaluationResult) -> None:
    table = result.per_class()
    weakest = result.weakest_class()
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Per class")
        styled = table.style.format({"precision": "{:.3f}", "recall": "{:.3f}", "f1": "{:.3f}"}).apply(
            lambda row: ["background-color: #fde2e1; font-weight: 600" if row["class"] == weakest else ""] * len(row),
            axis=1)
        st.dataframe(styled, hide_index=True, width="stretch", key="per_class_table")
        if weakest is not None:
            f1 = float(table.loc[table["class"] == weakest, "f1"].iloc[0])
            st.caption(f"Weakest class: **{weakest}** (F1 {f1:.3f}), highlighted.")
    with right:
        long = table.melt(id_vars="class", value_vars=["precision", "recall", "f1"], var_name="metric")
        figure = px.bar(long, x="class", y="value", color="metric", barmode="group", range_y=[0, 1],
                        labels={"class": "object count (class)", "value": ""})
        figure.update_layout(height=300, margin=dict(t=10, b=10), xaxis_type="category")
        st.plotly_chart(figure, width="stretch")


def calibration_section(result, threshold: float = LEGACY_THRESHOLD) -> None:
    """Reliability diagram, ECE, and what the Predict page's low-confidence threshold flags on these photos."""
    calibration = result.calibration(threshold)
    table, flags = calibration["table"], calibration["flags"]
    filled = table[table["count"] > 0]
    st.subheader("Confidence calibration")
    figure = go.Figure()
    figure.add_trace(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated",
                                line=dict(dash="dash", color="grey"), hoverinfo="skip"))
    figure.add_trace(go.Bar(x=(filled["bin_low"] + filled["bin_high"]) / 2, y=filled["accuracy"],
                            width=filled["bin_high"] - filled["bin_low"], name="accuracy per confidence bin",
                            customdata=filled[["bin_low", "bin_high", "confidence", "count"]].to_numpy().tolist(),
                            hovertemplate="confidence %{customdata[0]:.2f}–%{customdata[1]:.2f}<br>mean confidence "
                                          "%{customdata[2]:.3f}<br>accuracy %{y:.3f}<br>%{customdata[3]} photos"
                                          "<extra></extra>"))
    figure.add_trace(go.Scatter(x=filled["confidence"], y=filled["accuracy"], mode="markers", name="mean confidence",
                                hoverinfo="skip"))
    figure.update_layout(xaxis=dict(title="confidence (top class probability)", range=[0, 1]),
                         yaxis=dict(title="accuracy", range=[0, 1]), height=360, margin=dict(t=10, b=10),
                         legend=dict(orientation="h", y=-0.25))
    left, right = st.columns([3, 2])
    left.plotly_chart(figure, width="stretch", key="reliability_chart")
    right.metric("Expected calibration error", f"{calibration['ece']:.3f}",
                 help="ECE: how far the model's confidence is from how often it is right, averaged over 15 "
                      "confidence bins and weighted by their photos (0 is perfect: 70 % sure means right 70 % of "
                      "the time).")
    right.metric(f"Flagged below {threshold:.0%} confidence", f"{flags['share_flagged']:.1%}")

    def accuracy(value):
        return "—" if value is None else f"{value:.1%}"

    right.caption(f"Accuracy of the flagged photos: **{accuracy(flags['accuracy_flagged'])}**, of the rest: "
                  f"**{accuracy(flags['accuracy_rest'])}** (the threshold is set on the Predict page).")


def confusion_figure(matrix, classes, normalised: bool) -> go.Figure:
    values = reports.row_normalised(matrix) if normalised else matrix
    labels = [str(c) for c in classes]
    text = [[f"{v:.0%}" if normalised else f"{int(v)}" for v in row] for row in values]
    figure = go.Figure(go.Heatmap(z=values, x=labels, y=labels, text=text, texttemplate="%{text}",
                                  colorscale="Blues", hoverinfo="skip", showscale=True,
                                  zmin=0, zmax=1 if normalised else None))
    # Heatmaps cannot be selected in plotly: an invisible marker on each cell carries the click.
    xs, ys, custom, hover = [], [], [], []
    for i, true in enumerate(classes):
        for j, predicted in enumerate(classes):
            xs.append(str(predicted))
            ys.append(str(true))
            custom.append([int(true), int(predicted)])
            hover.append(f"true {true}, predicted {predicted}: {int(matrix[i, j])} photos")
    figure.add_trace(go.Scatter(x=xs, y=ys, mode="markers", customdata=custom, hovertext=hover, hoverinfo="text",
                                marker=dict(symbol="square", size=40, color="rgba(0,0,0,0)"), showlegend=False))
    figure.update_layout(xaxis_title="predicted count", yaxis_title="true count", height=420,
                         xaxis=dict(type="category"), yaxis=dict(type="category", autorange="reversed"),
                         margin=dict(t=10, b=10), clickmode="event+select", dragmode=False)
    return figure


def confusion_section(result: EvaluationResult, metrics: dict) -> None:
    st.subheader("Confusion matrix")
    classes = [int(c) for c in metrics["classes"]]
    matrix = reports.confusion_matrix(metrics)
    view = st.radio("Show", ["Counts", "Row-normalised (recall)"], horizontal=True, key="cm_view")
    normalised = view != "Counts"
    event = st.plotly_chart(confusion_figure(matrix, classes, normalised), width="stretch", on_select="rerun",
                            selection_mode="points", key="cm_chart")
    cell = reports.cell_from_selection(event)
    if cell and cell != st.session_state.get("cm_last_click"):
        # A new click on the chart moves the selectboxes; they stay usable on their own afterwards.
        st.session_state["cm_last_click"] = cell
        st.session_state["cm_true"], st.session_state["cm_pred"] = cell
    st.caption("Click a cell to see its photos, or choose it here:")
    left, right, _ = st.columns([1, 1, 3])
    if st.session_state.get("cm_true") not in classes:
        st.session_state.pop("cm_true", None)
    if st.session_state.get("cm_pred") not in classes:
        st.session_state.pop("cm_pred", None)
    true = left.selectbox("True count", classes, index=None, key="cm_true", placeholder="true")
    predicted = right.selectbox("Predicted count", classes, index=None, key="cm_pred", placeholder="predicted")
    if true is not None and predicted is not None:
        cell_photos(result.cell(true, predicted), true, predicted)
    exports(result)


def cell_photos(cell: pd.DataFrame, true: int, predicted: int) -> None:
    verdict = "correct" if true == predicted else "misclassified"
    st.markdown(f"**{len(cell):,} photos** with true count **{true}** predicted as **{predicted}** ({verdict}), "
                "most confident first")
    if cell.empty:
        return
    _, pages = page_of(cell, 1, PHOTOS_PER_PAGE)
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="cm_page") if pages > 1 else 1
    shown, _ = page_of(cell, int(page), PHOTOS_PER_PAGE)
    send_to_spot_check(cell)
    columns = st.columns(3)
    for i, (_, row) in enumerate(shown.iterrows()):
        with columns[i % 3].container(border=True):
            show_photo(row["path"])
            if st.button(f"{row['name']} · {row['confidence']:.0%} sure", key=f"cm_open_{row['name']}",
                         icon=":material/zoom_in:", width="stretch",
                         help="Open the photo large, and correct its count if the label is wrong"):
                open_cell_photo(row, true, predicted)
    probs = probability_columns(cell)
    table = cell[["name", "confidence"] + probs  # truth and prediction are the cell's, the same on every row
                 + [c for c in ["n_items", "item_names"] if c in cell]].copy()
    if "n_items" in table and "items_json" in cell:  # no metadata is not "0 items": leave the cell empty
        table["n_items"] = table["n_items"].astype("Int64").mask(cell["items_json"].isna())
    column_config = {p: st.column_config.ProgressColumn(f"P({p.split('_', 1)[1]})", min_value=0.0, max_value=1.0,
                                                         format="%.2f") for p in probs}
    column_config["confidence"] = st.column_config.NumberColumn("confidence", format="%.3f")
    column_config["item_names"] = st.column_config.TextColumn("items (metadata)", width="medium")
    column_config["n_items"] = st.column_config.NumberColumn("items", width="small",
                                                             help="Items listed in the photo's metadata (empty: none)")
    for small in probs:
        column_config.setdefault(small, st.column_config.NumberColumn(small, width="small"))
        column_config[small]["width"] = "small"
    st.dataframe(table, hide_index=True, width="stretch", column_config=column_config, key="cm_cell_table")
    insight_views.cell_heatmaps(Path(run["path"]) / "model.pt", cell, true, predicted)


def annotator_name() -> str | None:
    """Who records a correction: the signed-in user, else the name given on Spot-check (or here) this session."""
    user = current_user()
    if user.signed_in:
        return user.name if user.can("spot_check") else None
    return remembered_annotator() or None


def correct_count(name: str, path: str, recorded, count: int | None, who: str, outcome: str | None = None) -> None:
    key = st.session_state.get("eval_dataset_key")
    try:
        saved = annotations.save_decision(key, name, who, count, recorded_count=recorded, path=path,
                                          outcome=outcome, queue="evaluate").decision
    except annotations.AnnotationError as exc:
        st.session_state["cm_flash"] = ("error", str(exc))
        return
    st.session_state["cm_flash"] = ("success", f"Saved **{name}**: {annotations.STATUS_WORDS[saved.status]}, count "
                                    f"{annotations.count_label(saved.new_count)}. Training and evaluation use it "
                                    "from now on; its history is on the Spot-check page.")


def undo_last(decision: annotations.Decision, who: str) -> None:
    key = st.session_state.get("eval_dataset_key")
    undone, _ = annotations.undo_decisions(key, [decision], user=current_user(), annotator=who)
    st.session_state["cm_flash"] = ("info", f"Undone: **{decision.photo}** is back to "
                                    f"{annotations.count_label(decision.old_count)}." if undone else
                                    f"**{decision.photo}** was decided again since: that decision stays.")


@st.dialog("Photo of the confusion cell", width="large")
def open_cell_photo(row: pd.Series, true: int, predicted: int) -> None:
    if "cm_flash" in st.session_state:
        kind, text = st.session_state.pop("cm_flash")
        getattr(st, kind)(text)
    photo, side = st.columns([2, 3])
    photo.image(row["path"], width="content")  # its own pixels at most: a 499 px photo is not blown up
    probs = {int(c.split("_", 1)[1]): float(row[c]) for c in probability_columns(row.to_frame().T)}
    last = annotations.latest_decision(st.session_state.get("eval_dataset_key"), row["name"])
    label = true if last is None else last.new_count  # the label now: this result was scored before a correction
    with side:
        st.markdown(f"#### {row['name']}")
        said = "" if last is None else (f" ({annotations.STATUS_WORDS[last.status]} by {last.annotator}; "
                                        f"{true} when evaluated)")
        st.markdown(f"Label **{annotations.count_label(label)}**{said} · model **{predicted}** "
                    f"({row['confidence']:.0%} sure)")
        st.caption("Model's probabilities: " + " · ".join(f"{c}: {p:.0%}" for c, p in probs.items()))
        correction_buttons(row, label, predicted, last)


def correction_buttons(row: pd.Series, true: int | None, predicted: int,
                       last: annotations.Decision | None = None) -> None:
    """Set the count an annotator sees; saved as a Spot-check decision, with its history."""
    who = annotator_name()
    if who is None and current_user().signed_in:
        st.caption("Your role may not correct counts.")
        return
    if who is None:
        typed = st.text_input("Your name — saved with the correction", key="cm_annotator").strip()
        if not typed:
            st.caption("Give your name to correct this photo's count.")
            return
        remember_annotator(typed)
        who = typed
    st.caption(f"Is the label wrong? Set the count you see (saved as **{who}**, with its history):")
    buttons = st.container(horizontal=True)
    for n in range(6):
        buttons.button(str(n), key=f"cm_set_{n}", type="primary" if n == true else "secondary",
                       on_click=correct_count, args=(row["name"], row["path"], true, n, who))
    buttons.button("More than 5", key="cm_set_more", on_click=correct_count,
                   args=(row["name"], row["path"], true, annotations.MORE_THAN_FIVE, who))
    buttons.button("Unclear", icon=":material/help:", key="cm_set_unclear", on_click=correct_count,
                   args=(row["name"], row["path"], true, annotations.UNCLEAR, who))
    outcomes = st.container(horizontal=True)
    outcomes.button("Items hidden", icon=":material/visibility_off:", key="cm_set_hidden", on_click=correct_count,
                    args=(row["name"], row["path"], true, true, who, "hidden"), disabled=true is None,
                    help="The label is right but the items cannot be counted from this photo")
    outcomes.button("Model wrong", icon=":material/smart_toy:", key="cm_set_model_wrong", on_click=correct_count,
                    args=(row["name"], row["path"], true, true, who, "model_wrong"), disabled=true is None,
                    help="The label is right and can be seen: the model is wrong")
    if last is not None:
        outcomes.button("Undo the last decision", icon=":material/undo:", key="cm_undo", on_click=undo_last,
                        args=(last, who), help=f"Back to {annotations.count_label(last.old_count)}, as before "
                                               f"{last.annotator}'s decision")


def send_to_spot_check(cell: pd.DataFrame) -> None:
    """A button that opens Spot-check on these photos, most confident first, to confirm or correct each count."""
    if not current_user().can("spot_check"):
        return
    if st.button(f"Check these {len(cell):,} photos on Spot-check", key="cm_send", icon=":material/fact_check:",
                 help="Opens Spot-check with a queue of exactly these photos, in this order"):
        st.session_state.update(spot_sent=cell["name"].tolist(), spot_kind="sent")
        st.switch_page("app_pages/spot_check.py")


def exports(result: EvaluationResult) -> None:
    with st.expander("Export"):
        stem = f"{result.run}-{result.split}".replace(" ", "_")
        cols = st.columns(4)
        # Made when clicked (deferred data): no PNG drawn on every rerun, no stale file for a browser to miss
        cols[0].download_button("Report (CSV)", result.report_csv, f"{stem}-report.csv", "text/csv")
        cols[1].download_button("Report (JSON)", result.report_json, f"{stem}-report.json", "application/json")
        cols[2].download_button("Confusion matrix (PNG)",
                                lambda: result.confusion_png(title=f"{result.run} · {result.split}"),
                                f"{stem}-confusion.png", "image/png")
        cols[3].download_button("Predictions (CSV)", result.predictions_csv, f"{stem}-predictions.csv", "text/csv")
        insight_views.model_card_button(result, run["path"], meta)


def comparison_section(runs: list[dict], rows: pd.DataFrame, split: str) -> None:
    st.subheader("Compare runs")
    if len(runs) < 2:
        st.caption("Train a second run (e.g. the study's simple_cnn baseline) to compare runs here.")
        return
    by_id = {r["id"]: r for r in runs}
    left, right = st.columns([1, 2])
    ids = list(by_id)
    current = current_run()
    baseline_id = left.selectbox("Baseline", ids, index=ids.index(current.id) if current and current.id in ids else 0,
                                 format_func=lambda i: run_label(by_id[i]), key="compare_baseline",
                                 help="The run the others are measured against (the current model by default)")
    others = right.multiselect("Compared with", [i for i in ids if i != baseline_id],
                               format_func=lambda i: run_label(by_id[i]), key="compare_runs",
                               placeholder="choose one or more runs")
    picked = [baseline_id] + [i for i in others if i != baseline_id]
    if len(picked) < 2:
        st.caption("Choose at least one run to compare with the baseline.")
        return
    results = {}
    for run_id in picked:
        try:
            results[run_id] = result_for(by_id[run_id], rows, split)
        except (OSError, WeightsError) as exc:
            st.error(f"Run `{run_id}` is left out: its model cannot be loaded ({exc}).")
    if len(results) < 2:
        return
    names = {run_id: by_id[run_id].get("name") or run_id for run_id in results}
    baseline, *compared = results.values()
    frame = baseline.compare({names[result.run]: result for result in compared}).rename(
        columns={baseline.run: names[baseline.run]})
    deltas = [c for c in frame.columns if c.startswith("Δ ")]
    run_columns = [c for c in frame.columns if c not in ("metric", "better") and c not in deltas]
    # Each run's difference to the baseline next to its figures; the key metrics are the first rows.
    frame = frame[["metric", run_columns[0]] + [c for name in run_columns[1:] for c in (name, f"Δ {name}")]
                  + ["better"]]

    def colour(column):
        styles = []
        for delta, better in zip(column, frame["better"]):
            direction = reports.delta_direction(delta, better)
            styles.append({1: "color: #1a7f37; font-weight: 600", -1: "color: #cf222e; font-weight: 600"}.get(direction, ""))
        return styles

    number_format = {c: "{:.3f}" for c in run_columns} | {c: "{:+.3f}" for c in deltas}
    styled = frame.style.format(number_format, na_rep="—").apply(colour, subset=deltas)
    st.dataframe(styled, hide_index=True, width="stretch", key="comparison_table",
                 column_config={"metric": st.column_config.TextColumn("metric", pinned=True),
                                "better": st.column_config.TextColumn("better when", width="small")})
    st.caption(f"Baseline: **{names[baseline.run]}**. Δ: difference to it — green better, red worse (for MAE, "
               "lower is better). Rename runs on the Train page.")
    f1 = frame[frame["metric"].str.startswith("F1 class")].melt(id_vars="metric", value_vars=run_columns, var_name="run",
                                                                 value_name="F1")
    figure = px.bar(f1, x="metric", y="F1", color="run", barmode="group", range_y=[0, 1], labels={"metric": ""})
    figure.update_layout(height=320, margin=dict(t=10, b=10))
    st.plotly_chart(figure, width="stretch")
    st.download_button("Comparison (CSV)", frame.to_csv(index=False).encode(), "comparison.csv", "text/csv")
    insight_views.paired_comparison(results, names)


st.title("Evaluate")
runs = available_runs()
if not runs:
    training = jobs.list_jobs(statuses=jobs.ACTIVE, kind="train")
    if training:
        training_progress(training[0].id)
        st.stop()
    st.info("No trained model yet. Train one on the **Train** page (a frozen EfficientNet-Lite takes minutes on a CPU), "
            "then come back to see how it does.")
    st.stop()

run_ids = [r["id"] for r in runs]
by_id = {r["id"]: r for r in runs}
current = current_run()
current_id = current.id if current is not None else None
default = run_ids.index(current_id) if current_id in by_id else 0
# Streamlit forgets a widget's value once another page is shown, so the chosen run is kept under its own key; it
# holds until the current model changes (a new training shows its model first).
chosen, chosen_with = st.session_state.get("eval_run_chosen", (None, None))
if chosen in by_id and chosen_with == current_id:
    default = run_ids.index(chosen)
opened = st.session_state.pop("evaluate_open_run", None)  # a finished job's "See it on Evaluate"
if opened in by_id:
    default = run_ids.index(opened)
    st.session_state.pop("eval_run", None)
run_id = st.selectbox("Run", run_ids, index=default, format_func=lambda i: run_label(by_id[i]), key="eval_run")
st.session_state["eval_run_chosen"] = (run_id, current_id)
run = by_id[run_id]
try:
    _, meta = model_loader(run["path"])()
except (OSError, WeightsError) as exc:
    st.error(f"**The model of run `{run_id}` cannot be loaded.** {exc}")
    st.stop()
rows, split, problems, description = choose_photos(model_class_range(meta))

result = result_for(run, rows, split, problems)
classes = result.classes
metrics = result.metrics()
st.caption(f"Run `{run['id']}` on the {description}: {len(result.frame):,} photos.")
if metrics["n"] == 0:
    st.warning("No photo could be scored: none is readable with a count among the model's classes "
               f"({', '.join(map(str, classes))}).")
    st.stop()
metric_tiles(metrics, result.skipped)
countable_tiles(result, metrics)
insight_views.metric_intervals(result)
per_class_section(result)
calibration_section(result, chosen_threshold(meta, run["id"]))
confusion_section(result, metrics)
insight_views.evaluation_map(result)
comparison_section(runs, rows, split)
