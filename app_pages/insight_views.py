"""Views that show what the model sees: the embeddings map with lasso and bulk relabel, where-it-looked heatmaps,
metrics with their intervals, the model card and runs compared photo by photo. Pages call these; logic is in core."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages.common import (
    cached_thumbnail,
    current_user,
    label_issues_of,
    model_for,
    reload_dataset,
    remember_annotator,
    remembered_annotator,
    view_key,
)
from core import config
from core.data.labels import annotations
from core.data.browse import page_of
from core.errors import BinsightError
from core.evaluation import embedding_map as maps
from core.evaluation.intervals import interval_text
from core.evaluation.predictions import model_fingerprint

PHOTOS_PER_PAGE = 12
SELECTED_PER_PAGE = 6  # the selected photos at a readable size: three a row, two rows a page
HEATMAP_PHOTOS = 6
NEW_COUNTS = [0, 1, 2, 3, 4, 5, annotations.MORE_THAN_FIVE]
# Error 0 (right) is a quiet grey, so the mistakes stand out; the counts get a scale with no white end.
SCALES = {"count": "Viridis", "predicted": "Viridis", "error": [[0, "#cfd3d8"], [0.25, "#fc9272"], [1, "#99000d"]],
          "issue_score": "YlOrRd"}


# ---------------------------------------------------------------------------------------------- photos

def photo_grid(photos: pd.DataFrame, key: str, caption=None) -> None:
    """A page of photos, six a row, each with its caption (default: name · count)."""
    if photos.empty:
        return
    _, pages = page_of(photos, 1, PHOTOS_PER_PAGE)
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key=f"{key}_page") if pages > 1 else 1
    shown, _ = page_of(photos, int(page), PHOTOS_PER_PAGE)
    columns = st.columns(6)
    for i, (_, row) in enumerate(shown.iterrows()):
        with columns[i % 6]:
            picture = cached_thumbnail(row["path"])
            if isinstance(picture, bytes):
                st.image(picture, width="stretch")
            else:
                st.warning(picture)
            st.caption(caption(row) if caption else f"{row['name']} · {row.get('count', '')}")


def plural(n: int, word: str, words: str | None = None) -> str:
    """'1 photo', '3 photos' (or the irregular plural given)."""
    return f"{n:,} {word if n == 1 else words or word + 's'}"


def readable_grid(photos: pd.DataFrame, key: str, caption) -> None:
    """A page of photos at a readable size (three a row, each as wide as its column allows, never blown up past its
    own pixels), with a page number when there are more."""
    _, pages = page_of(photos, 1, SELECTED_PER_PAGE)
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key=f"{key}_page") if pages > 1 else 1
    shown, _ = page_of(photos, int(page), SELECTED_PER_PAGE)
    columns = st.columns(3)
    for i, (_, row) in enumerate(shown.iterrows()):
        with columns[i % 3]:
            try:
                st.image(row["path"], width="stretch")
            except (OSError, ValueError) as exc:
                st.warning(f"{row['name']} cannot be shown: {exc}")
            st.caption(caption(row))


# ---------------------------------------------------------------------------------------------- heatmaps

@st.cache_data(show_spinner=False, max_entries=500)
def _overlays(model_path: str, model_version: str, photo: str, counts: tuple) -> dict | str:
    """{count: JPEG of the photo under that count's heatmap}, or why there is none."""
    from core.models.heatmaps import heatmaps, overlay

    model, meta = model_for(model_path)
    try:
        found = heatmaps(model, meta, photo, list(counts))
    except BinsightError as exc:
        return str(exc)
    return {count: overlay(photo, heat) for count, heat in found.items()}


def heatmap_images(model_path: str | Path, photo: str, counts: list[int], captions: list[str] | None = None) -> None:
    """The photo under the heatmap of each count, side by side (each count's evidence: red is strongest)."""
    counts = list(dict.fromkeys(int(c) for c in counts))
    found = _overlays(str(model_path), model_fingerprint(model_path), photo, tuple(counts))
    if isinstance(found, str):
        st.warning(found)
        return
    columns = st.columns(len(counts)) if len(counts) > 1 else [st.container()]
    for column, count, caption in zip(columns, counts, captions or [f"evidence for {c}" for c in counts]):
        column.image(found[count], width="stretch", caption=caption)


def heatmap_toggle(key: str) -> bool:
    return st.toggle("Show where the model looked", key=key,
                     help="Grad-CAM: the parts of the photo that pushed the model towards a count (red strongest).")


def cell_heatmaps(model_path: str | Path, cell: pd.DataFrame, true: int, predicted: int) -> None:
    """For the first photos of a confusion cell: where the model looked for the count it predicted and for the label."""
    if cell.empty or not heatmap_toggle("cm_heatmaps"):
        return
    counts = [predicted] if true == predicted else [predicted, true]
    names = [f"predicted {predicted}"] if true == predicted else [f"predicted {predicted}", f"label {true}"]
    columns, shown = st.columns(6), 0
    for _, row in cell.head(HEATMAP_PHOTOS).iterrows():
        found = _overlays(str(model_path), model_fingerprint(model_path), row["path"], tuple(counts))
        if isinstance(found, str):
            st.warning(found)
            continue
        for count, name in zip(counts, names):
            columns[shown % 6].image(found[count], width="stretch", caption=f"{row['name']} · {name}")
            shown += 1
    st.caption("Red: where the photo's evidence for that count lies (Grad-CAM)"
               + (f"; the first {HEATMAP_PHOTOS} photos of the {len(cell):,} in this cell." if len(cell) > HEATMAP_PHOTOS
                  else "."))


# ---------------------------------------------------------------------------------------------- the map

def _whole(values) -> list[str]:
    return [str(int(v)) if pd.notna(v) else "—" for v in values]


def _steps(scale: str, values) -> tuple[list, list[int]]:
    """A stepped colour scale with one flat band per whole value (counts 1–5 are five colours, not a gradient),
    and those values."""
    from plotly.colors import sample_colorscale

    whole = sorted({int(v) for v in values})
    colours = sample_colorscale(scale, [i / max(len(whole) - 1, 1) for i in range(len(whole))])
    steps = []
    for i, colour in enumerate(colours):
        steps += [[i / len(whole), colour], [(i + 1) / len(whole), colour]]
    return steps, whole


def _map_figure(frame: pd.DataFrame, colour: str) -> go.Figure:
    """The map in WebGL: every point up to maps.DRAWN_POINTS, else that many over a grey density layer of all."""
    drawn, density = maps.map_view(frame, colour)
    predicted = drawn["predicted"] if "predicted" in drawn else [None] * len(drawn)
    custom = pd.DataFrame({"name": drawn["name"], "count": _whole(drawn["count"]), "predicted": _whole(predicted)},
                          index=drawn.index)
    hover = "%{customdata[0]}<br>count %{customdata[1]}<br>predicted %{customdata[2]}<extra></extra>"
    figure = go.Figure()
    if density is not None:
        figure.add_trace(go.Heatmap(x=density["x"], y=density["y"], z=np.log10(density["z"]), showscale=False,
                                    colorscale=[[0, "#eeeeee"], [1, "#8a8a8a"]], hoverinfo="skip", name="photos"))
    known = drawn[colour].notna()
    size = 6 if density is None else 4
    if (~known).any():
        figure.add_trace(go.Scattergl(x=drawn.loc[~known, "x"], y=drawn.loc[~known, "y"], mode="markers",
                                      name="not known", customdata=custom[~known].to_numpy(),
                                      hovertemplate=hover, marker=dict(size=size, color="#c8c8c8")))
    scale, colour_range = SCALES[colour], {}
    colorbar = dict(title=dict(text=maps.COLOURINGS[colour], side="right"), thickness=12)
    if colour in ("count", "predicted") and known.any():  # a few whole counts: one colour each, not a gradient
        scale, whole = _steps(scale, drawn.loc[known, colour])
        colour_range = dict(cmin=whole[0] - 0.5, cmax=whole[0] + len(whole) - 0.5)
        colorbar |= dict(tickvals=[whole[0] + i for i in range(len(whole))], ticktext=[str(v) for v in whole])
        positions = {v: whole[0] + i for i, v in enumerate(whole)}
        values = drawn.loc[known, colour].map(lambda v: positions[int(v)])
    else:
        values = drawn.loc[known, colour]
    figure.add_trace(go.Scattergl(
        x=drawn.loc[known, "x"], y=drawn.loc[known, "y"], mode="markers", name=maps.COLOURINGS[colour],
        customdata=custom[known].to_numpy(), hovertemplate=hover,
        marker=dict(size=size, color=values, colorscale=scale, opacity=0.85, colorbar=colorbar, **colour_range)))
    figure.update_layout(height=520, margin=dict(l=0, r=0, t=10, b=0), dragmode="lasso", showlegend=False,
                         xaxis=dict(visible=False), yaxis=dict(visible=False))
    return figure


def _compute_map(map_key: str, rows: pd.DataFrame, dataset) -> None:
    bar = st.progress(0.0, text="Reading the photos' features…")
    try:
        maps.embedding_map(map_key, rows, on_progress=lambda f, text: bar.progress(min(max(f, 0.0), 1.0), text=text),
                           **_file_versions(dataset))
    except BinsightError as exc:
        st.error(f"**The map cannot be drawn.** {exc}")
    finally:
        bar.empty()


def _file_versions(dataset) -> dict:
    """What the map's key reads of the photo files as the dataset's loading found them (no stat per photo)."""
    if dataset is None:
        return {}
    return {"known_stamps": dataset.stamps, "files_fingerprint": dataset.files_fingerprint}


@st.cache_resource(show_spinner=False, max_entries=2)
def _dataset_map(key: tuple, map_key: str, _rows: pd.DataFrame, _dataset):
    return maps.cached_map(map_key, _rows, **_file_versions(_dataset))


def embedding_map_view(rows: pd.DataFrame, map_key: str, key: str, *, dataset=None,
                       predictions: pd.DataFrame | None = None, whole_dataset: bool = False) -> list[str]:
    """The map of `rows`' photos (name, path, cls or truth, split), coloured as chosen; a lasso or box selection
    opens its photos, which an annotator may relabel in bulk when `dataset` (the current one) is given.
    whole_dataset: `rows` are all of `dataset`'s, so the map is looked up once per loaded dataset (at 536 K photos
    keying it by every photo's file takes ~6 s). Returns the names selected."""
    st.subheader("Embeddings map")
    if whole_dataset:
        found = _dataset_map(view_key(dataset, config.home() / "embedding_maps" / map_key), map_key, rows, dataset)
    else:
        found = maps.cached_map(map_key, rows, **_file_versions(dataset))
    if found is None:
        st.caption(f"Photos that look alike to the backbone lie together: {len(rows):,} photos, placed once from "
                   "their features (minutes for thousands of photos whose features are not cached yet).")
        if st.button("Draw the map", key=f"{key}_compute"):
            _compute_map(map_key, rows, dataset)
            st.rerun()
        return []
    points, info = found
    issues, stale_note = None, ""
    if dataset is not None:
        latest = label_issues_of(dataset)
        if latest is not None:  # a photo reviewed since the check has no score: its label is a person's now
            issues = latest.frame[latest.frame["outcome"] == ""]
            if latest.info.get("stale"):
                stale_note = (f" Likely-wrong scores: the check of {latest.info.get('computed_at', '')}; the "
                              f"{plural(len(latest.frame) - len(issues), 'photo')} reviewed since are grey.")
    frame = maps.coloured(points, rows, predictions, issues)
    options = [c for c in maps.COLOURINGS if c in frame and frame[c].notna().any()]
    left, right = st.columns([3, 2])
    colour = left.radio("Colour by", options, format_func=maps.COLOURINGS.get, horizontal=True, key=f"{key}_colour")
    shown = (f"; {maps.DRAWN_POINTS:,} drawn, grey where the others lie" if len(frame) > maps.DRAWN_POINTS else "")
    right.caption(f"{info['photos']:,} photos placed by their frozen {info['recipe']['backbone']} features "
                  f"({info['method']}){shown}. Drag a lasso or a box to open every photo inside; double-click to "
                  "clear." + (stale_note if colour == "issue_score" else ""))
    event = st.plotly_chart(_map_figure(frame, colour), width="stretch", on_select="rerun",
                            selection_mode=("points", "box", "lasso"), key=f"{key}_chart")
    names = with_stacked(frame, maps.names_in_region(frame, event))
    if dataset is not None:
        last_relabel(dataset, key)
    indexed = frame.drop_duplicates("name").set_index("name")
    chosen = indexed.loc[[n for n in names if n in indexed.index]].reset_index()
    if chosen.empty:
        st.caption("No photo selected yet.")
        return []
    st.markdown(f"**{plural(len(chosen), 'photo')} selected**")
    readable_grid(chosen, f"{key}_selection", caption=lambda row: f"{row['name']} · count {_whole([row['count']])[0]}"
                  + (f" · predicted {int(row['predicted'])}" if "predicted" in row and pd.notna(row["predicted"])
                     else ""))
    if dataset is not None:
        bulk_relabel(dataset, chosen, key)
    return list(chosen["name"])


def with_stacked(frame: pd.DataFrame, names: list[str]) -> list[str]:
    """The names selected plus every photo drawn on the same spot as one of them (look-alikes can share a point;
    a click picks only the top one)."""
    if not names:
        return names
    points = frame.set_index("name")[["x", "y"]]
    picked = points.loc[[n for n in names if n in points.index]]
    span = max(float(points["x"].max() - points["x"].min()), float(points["y"].max() - points["y"].min()), 1e-9)
    near = pd.Series(False, index=points.index)
    for x, y in picked.itertuples(index=False):
        near |= ((points["x"] - x).abs() <= span * 1e-4) & ((points["y"] - y).abs() <= span * 1e-4)
    return list(dict.fromkeys(names + list(points.index[near])))


# ---------------------------------------------------------------------------------------------- bulk relabel

def last_relabel(dataset, key: str) -> None:
    """What the last bulk relabel of this session did, with its Undo (the selection may be gone by then)."""
    user = current_user()
    refused = user.why_not("relabel")
    last = st.session_state.get(f"{key}_bulk")
    if last:
        st.success(f"Relabelled {plural(len(last), 'photo')} to {annotations.count_label(last[0].new_count)}.")
        if st.button("Undo this relabel", key=f"{key}_undo", disabled=refused is not None):
            saved, left = annotations.undo_decisions(dataset.key, last, user=user,
                                                     annotator=st.session_state.get("annotator", ""))
            st.session_state.pop(f"{key}_bulk")
            st.session_state[f"{key}_bulk_note"] = (
                f"Undone: {plural(len(saved), 'photo has its', 'photos have their')} previous label back"
                + (f"; {plural(len(left), 'was', 'were')} decided again since and keep{'s' if len(left) == 1 else ''} "
                   "that decision." if left else "."))
            reload_dataset()
            st.rerun()
    if st.session_state.get(f"{key}_bulk_note"):
        st.info(st.session_state.pop(f"{key}_bulk_note"))


def bulk_relabel(dataset, chosen: pd.DataFrame, key: str) -> None:
    """Set one count for the selected photos: confirmed, one audited decision per photo, undoable."""
    user = current_user()
    refused = user.why_not("relabel")
    with st.expander(f"Relabel {'this photo' if len(chosen) == 1 else f'these {len(chosen):,} photos'}",
                     expanded=False):
        if refused:
            st.info(refused)
            return
        left, middle, right = st.columns([1, 2, 3])
        count = left.selectbox("New count", NEW_COUNTS, index=None, format_func=annotations.count_label,
                               placeholder="choose", key=f"{key}_bulk_count")
        name = middle.text_input("Your name", value=user.name if user.signed_in else remembered_annotator(),
                                 disabled=user.signed_in, key=f"{key}_bulk_name")
        note = right.text_input("Why (saved with each decision)", key=f"{key}_bulk_why")
        holds = "the count chosen" if count is None else f"{annotations.count_label(count)} objects"
        looked = "this photo: it holds" if len(chosen) == 1 else f"all {len(chosen):,} photos above: each holds"
        sure = st.checkbox(f"I looked at {looked} {holds}", key=f"{key}_bulk_sure")
        if st.button(f"Relabel {plural(len(chosen), 'photo')}", key=f"{key}_bulk_save", type="primary",
                     disabled=not sure or count is None):
            current = dataset.frame.drop_duplicates("name").set_index("name")["count"]
            recorded = {n: current.get(n) for n in chosen["name"]}
            try:
                saved = annotations.save_bulk_decision(dataset.key, recorded, count, user=user, annotator=name,
                                                       note=note)
            except BinsightError as exc:
                st.error(str(exc))
                return
            if name and not user.signed_in:
                remember_annotator(name)
            st.session_state[f"{key}_bulk"] = saved
            reload_dataset()
            st.rerun()


# ---------------------------------------------------------------------------------------------- honest figures

def metric_intervals(result) -> None:
    """Each headline metric and each count's recall with its 95 % interval (bootstrap over photos), as a picture."""
    from core.evaluation.reports import OVERALL_METRICS

    intervals = result.intervals()
    metrics = result.metrics()
    rows = [(label, metrics.get(k), intervals["overall"].get(k)) for k, label, _ in OVERALL_METRICS if k != "mae"]
    rows += [(f"Recall of count {c}", result.per_class().set_index("class").loc[c, "recall"],
              intervals["per_class"].get(str(c), {}).get("recall")) for c in result.classes]
    rows = [r for r in rows if r[1] is not None and r[2]]
    figure = go.Figure(go.Scatter(
        x=[r[1] for r in rows], y=[r[0] for r in rows], mode="markers", marker=dict(size=9, color="#1f5fa8"),
        error_x=dict(type="data", symmetric=False, array=[r[2][1] - r[1] for r in rows],
                     arrayminus=[r[1] - r[2][0] for r in rows], thickness=2, width=4),
        customdata=[interval_text(r[2]) for r in rows],
        hovertemplate="%{y}: %{x:.1%} (95 % interval %{customdata})<extra></extra>"))
    figure.update_layout(height=60 + 26 * len(rows), margin=dict(l=0, r=10, t=10, b=10),
                         xaxis=dict(range=[0, 1], tickformat=".0%"), yaxis=dict(autorange="reversed"))
    with st.expander(f"How sure are these figures? 95 % intervals over the {metrics['n']:,} photos", expanded=True):
        st.plotly_chart(figure, width="stretch", key="intervals_chart")
        per_count = result.per_class()
        for metric in ("precision", "recall", "f1"):
            per_count[metric] = [f"{value:.3f} ({interval_text(intervals['per_class'][str(c)][metric], False)})"
                                 for c, value in zip(per_count["class"], per_count[metric])]
        named = {"class": "count", "precision": "precision (95 % interval)", "recall": "recall (95 % interval)",
                 "f1": "F1 (95 % interval)"}
        st.dataframe(per_count.rename(columns=named), hide_index=True, width="stretch", key="intervals_per_count")
        mae = intervals["overall"].get("mae")
        st.caption(f"Bootstrap over photos ({intervals['resamples']:,} resamples, seed {intervals['seed']}): "
                   f"MAE {metrics['mae']:.3f} ({interval_text(mae, percent=False)} objects)"
                   + (f", ECE {metrics['ece']:.3f} ({interval_text(intervals['overall']['ece'], percent=False)})"
                      if "ece" in intervals["overall"] and metrics.get("ece") is not None else "")
                   + ". Another run inside these bars is not shown better by them: compare the two below.")


def model_card_button(result, run_path: str | Path, meta: dict) -> None:
    from core.evaluation.model_card import card_for_result

    model_id = f"{Path(run_path).name}@{model_fingerprint(Path(run_path) / 'model.pt')}"
    card = card_for_result(result, meta, run_path, model_id=model_id)
    st.download_button("Model card (Markdown)", card.encode(), f"{result.run}-model-card.md", "text/markdown",
                       key="model_card_download")


def paired_comparison(results: dict, names: dict | None = None) -> None:
    """The baseline against each other run, photo by photo: McNemar's verdict, recall change, fixed and broken.
    `names`: run id → the name the runs go by elsewhere."""
    from dataclasses import replace

    from core.evaluation.comparison import ComparisonError, compare_paired

    names = names or {}
    baseline, *others = results.values()
    for other in others:
        try:
            paired = compare_paired(baseline, other)
        except ComparisonError as exc:
            st.warning(str(exc))
            continue
        paired = replace(paired, run_a=names.get(paired.run_a, paired.run_a),
                         run_b=names.get(paired.run_b, paired.run_b))
        st.markdown(f"#### {paired.run_b} against {paired.run_a}, photo by photo")
        st.markdown(paired.verdict())
        left, right = st.columns([1, 1])
        left.dataframe(paired.table(), width="stretch", key=f"paired_table_{other.run}")
        change = paired.recall_change()
        figure = go.Figure(go.Bar(x=change["count"].astype(str), y=change["change"],
                                  marker_color=["#1a7f37" if v >= 0 else "#cf222e" for v in change["change"]],
                                  customdata=change[["recall_a", "recall_b", "photos"]].to_numpy().tolist(),
                                  hovertemplate="count %{x}: recall %{customdata[0]:.1%} → %{customdata[1]:.1%} "
                                                "(%{customdata[2]} photos)<extra></extra>"))
        figure.update_layout(height=220, margin=dict(t=30, b=10), title="Recall change per count",
                             yaxis=dict(tickformat="+.0%", title=None), xaxis=dict(title="true count"))
        right.plotly_chart(figure, width="stretch", key=f"recall_change_{other.run}")
        which = st.radio("Open the photos", ["fixed", "broken"], horizontal=True, key=f"paired_open_{other.run}",
                         format_func=lambda c: f"{c} by {paired.run_b} ({len(paired.photos(c)):,})")
        photo_grid(paired.photos(which), f"paired_{other.run}_{which}", caption=lambda row: (
            f"{row['name']} · {int(row['truth'])}: {int(row['predicted_a'])} → {int(row['predicted_b'])}"))


def evaluation_map(result) -> None:
    """The map of the evaluated photos, coloured by their predictions too; relabelling when they are the current
    dataset's."""
    from app_pages.common import current_dataset
    from core.data.dataset import dataset_key

    rows = result.frame[result.frame["error"].isna()]
    current = current_dataset()
    same = current is not None and str(current.source) == str(result.source)
    map_key = current.key if same else dataset_key(Path(result.source))
    embedding_map_view(rows, map_key, "eval_map", dataset=current if same else None, predictions=rows)


def browse_map(dataset) -> None:
    """The map of every labelled photo of the dataset, with the current model's stored predictions when it has any."""
    from core.evaluation.predictions import PredictionStore
    from core.jobs.runs import current_model_path

    rows = dataset.rows("all")
    model_path = current_model_path()
    predictions = PredictionStore(model_path).stored(rows) if model_path is not None else None
    embedding_map_view(rows, dataset.key, "browse_map", dataset=dataset, predictions=predictions, whole_dataset=True)
    st.divider()
