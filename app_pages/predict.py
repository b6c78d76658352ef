"""Predict page: drop in bin photos (or a folder, or an s3:// URI) and get each one's count with its confidence."""
from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app_pages import insight_views
from app_pages.common import (
    cached_thumbnail,
    checked_path,
    current_dataset,
    current_user,
    model_for,
    predictor_for,
    training_progress,
)
from core.data.photos import uploads
from core.data.remote import s3_photos
from core.data.browse import page_of
from core.evaluation.calibration import FLAG_SHARE, calibrated_threshold, chosen_threshold, save_chosen_threshold, \
    share_below
from core.evaluation.predictions import model_fingerprint, photos_fingerprint, probability_columns
from core.jobs import queue as jobs
from core.jobs import worker
from core.jobs.params import describe_dataset, training_problems
from core.jobs.runs import available_runs, current_run, get_run, register_run, run_label, set_current_run
from core.models.engines import bf16_supported
from core.models.inference import CLOSE_CALL, likely_counts, predict_inputs, with_ties
from core.models.networks import ModelError

PHOTOS_PER_PAGE = 12
QUICK_TRAINING = {"backbone": "efficientnet_lite0", "mode": "frozen", "image_size": 224, "balance": "weights",
                  "device": "auto"}








def show_photo(path: str) -> None:
    picture = cached_thumbnail(path, 480, 360)
    if isinstance(picture, bytes):
        st.image(picture, width="stretch")
    else:
        st.warning(picture)


def no_model_yet() -> None:
    active = jobs.list_jobs(statuses=jobs.ACTIVE, kind="train")
    if active:
        worker.ensure_workers()  # a job queued before the app restarted gets its worker
        training_progress(active[0].id)
        return
    st.info("**No model yet.** Predictions need a trained model. Train a quick one here (a frozen "
            "EfficientNet-Lite0 on the current dataset: a few minutes on a CPU), or choose the settings on the "
            "**Train** page.")
    last = st.session_state.get("quick_job")
    if last is not None:
        try:
            job = jobs.get(last)
        except jobs.JobError:
            job = None
        if job is None:
            pass
        elif job.status in ("failed", "cancelled"):
            st.error(f"The quick training {job.status}: {job.error or 'see its log on the Train page'}")
        elif job.status == "done":
            st.error(f"The quick training finished but left no model in `{job.run_dir}`: see its log on the Train page.")
    dataset = current_dataset()
    if dataset is None:
        return
    facts = describe_dataset(dataset)
    params = {**facts, **QUICK_TRAINING, "batch_size": max(1, min(32, facts["n_train"]))}
    problems = training_problems(params, facts["n_train"], cuda_available=False)
    if problems:
        st.warning("The current dataset cannot train a model yet: " + " ".join(problems))
        return
    refused = current_user().why_not("train")
    if st.button("Train a quick model", type="primary", key="quick_train", disabled=refused is not None,
                 help=refused) and not refused:
        job = jobs.submit("train", params, user=current_user().name)
        worker.ensure_workers()
        st.session_state["quick_job"] = job.id
        st.rerun()


def choose_run(runs: list[dict]) -> dict:
    by_id = {r["id"]: r for r in runs}
    current = current_run()
    ids = list(by_id)
    default = ids.index(current.id) if current is not None and current.id in by_id else 0
    left, right = st.columns([3, 2])
    run_id = left.selectbox("Model", ids, index=default, format_func=lambda i: run_label(by_id[i]),
                            key="predict_run")
    with right:
        threshold = threshold_slider(by_id[run_id])
        fast = bf16_supported() and st.toggle(
            "Faster, in bfloat16", key="predict_bf16",
            help="About twice as fast on this CPU. Probabilities move by up to a few hundredths, so a photo whose "
                 "two likeliest counts are that close may swap them (9 of 500 test photos did).")
    if current is None or current.id != run_id:
        refused = current_user().why_not("train")
        if st.button("Make this the current model", key="make_current", disabled=refused is not None,
                     help=refused) and not refused:
            try:
                get_run(run_id)
            except jobs.JobError:
                register_run(by_id[run_id]["path"])
            set_current_run(run_id)
            st.rerun()
    return by_id[run_id] | {"threshold": threshold, "precision": "bf16" if fast else "fp32"}


def model_meta(run: dict) -> dict:
    """The run's model.pt meta (its classes, calibration and the low-confidence default stored at training end)."""
    try:
        return model_for(Path(run["path"]) / "model.pt")[1]
    except (OSError, ModelError) as exc:
        st.error(f"**The model of run `{run['id']}` cannot be loaded.** {exc}")
        st.stop()


def reset_threshold(run_id: str, value: float) -> None:
    save_chosen_threshold(run_id, None)
    st.session_state["predict_threshold"] = value


def threshold_slider(run: dict) -> float:
    """The low-confidence threshold: the model's calibrated default (or the one chosen for it), and what it flags."""
    meta = model_meta(run)
    own = calibrated_threshold(meta)
    chosen = chosen_threshold(meta, run["id"])
    if st.session_state.get("predict_threshold_for") != run["id"]:  # another model: its own threshold
        st.session_state["predict_threshold"] = round(chosen, 2)
        st.session_state["predict_threshold_for"] = run["id"]
    threshold = st.slider("Flag predictions less confident than", 0.0, 1.0, step=0.01, key="predict_threshold",
                          help="Confidence is the model's probability for the count it predicts, calibrated on the "
                               "validation photos. The default flags the least certain "
                               f"{FLAG_SHARE:.0%} of them: the photos worth a second look.")
    if abs(threshold - chosen) > 1e-9 and abs(threshold - round(chosen, 2)) > 1e-9:
        save_chosen_threshold(run["id"], threshold)
    share = share_below(meta.get("valid_confidence_quantiles") or [], threshold)
    note = (f"Flags **{share:.0%}** of the validation photos" if share is not None
            else "This model predates the calibrated default: retrain it to see what share this flags")
    line = st.container(horizontal=True, vertical_alignment="center")
    line.caption(note + f" · the model's default is {own:.2f}.")
    if abs(threshold - round(own, 2)) > 1e-9:
        line.button("Reset", key="predict_threshold_reset", on_click=reset_threshold, args=(run["id"], round(own, 2)),
                    help="Back to the model's calibrated default")
    return threshold


def verdict(row: pd.Series, classes: list[int]) -> str:
    """"→ 4 objects (62%)", or "→ 3 or 4 objects (31% / 31%)" when the two likeliest counts are a toss-up."""
    probs = {c: float(row[f"prob_{c}"]) for c in classes}
    counts = likely_counts(probs)
    if len(counts) == 2:
        return (f"→ **{counts[0]} or {counts[1]} objects** ({probs[counts[0]]:.0%} / {probs[counts[1]]:.0%}: "
                "too close to call)")
    return f"→ **{counts[0]} object{'' if counts[0] == 1 else 's'}** ({probs[counts[0]]:.0%})"


def gather_inputs() -> tuple[str, list[uploads.PhotoInput], list[str]] | None:
    """(signature, inputs, notes) of the photos given (uploads, a folder or an S3 URI), or None when none yet."""
    origin = st.radio("Photos from", ["Upload", "Local folder", "S3"], horizontal=True, key="predict_origin")
    files, folder, uri, recursive, limit = None, "", "", False, 100
    if origin == "Upload":
        files = st.file_uploader("Bin photos (JPEG, PNG, WebP, BMP)", type=["jpg", "jpeg", "png", "webp", "bmp"],
                                 accept_multiple_files=True, key="predict_files")
    elif origin == "Local folder":
        refused = current_user().why_not("open_folder")
        if refused:
            st.caption(refused)
        folder = st.text_input("Folder of photos on this machine", key="predict_folder", disabled=refused is not None,
                               placeholder="/data/new_bins", help=refused).strip()
        recursive = st.checkbox("Include subfolders", key="predict_recursive", disabled=refused is not None)
        if folder and (refused or checked_path(folder) is None):
            return None  # refused: said why above
    else:
        uri = st.text_input("S3 URI of a photo or of a prefix", key="predict_s3",
                            placeholder="s3://aft-vbi-pds/bin-images/523.jpg").strip()
        limit = st.number_input("At most this many photos under a prefix", 1, 5000, 100, key="predict_s3_limit")
        st.caption("The public bucket aft-vbi-pds is read unsigned. Another S3-compatible store: set "
                   "BINSIGHT_S3_ENDPOINT_URL (and BINSIGHT_S3_ACCESS_KEY_ID / BINSIGHT_S3_SECRET_ACCESS_KEY).")
    try:
        if files:
            signature = "upload:" + "|".join(f"{f.file_id}:{f.name}:{f.size}" for f in files)
            cached = st.session_state.get("predict_inputs")
            if cached and cached[0] == signature:
                return cached
            staged = uploads.stage_uploads([(f.name, f.getvalue()) for f in files])
            st.session_state["predict_inputs"] = (signature, staged, [])
            return st.session_state["predict_inputs"]
        if folder:
            inputs, notes = uploads.folder_inputs(folder, recursive=recursive)
            stamp = photos_fingerprint(pd.DataFrame({"name": [i.name for i in inputs],
                                                     "path": [i.path for i in inputs]}))
            return f"folder:{folder}:{stamp}", inputs, notes
        if uri:
            signature = f"s3:{uri}:{int(limit)}"
            cached = st.session_state.get("predict_inputs")
            if cached and cached[0] == signature:
                return cached
            slot = st.empty()
            try:
                inputs, notes = s3_photos.s3_inputs(uri, int(limit), on_progress=lambda f, text: slot.progress(
                    min(max(float(f), 0.0), 1.0), text=text))
            finally:
                slot.empty()
            st.session_state["predict_inputs"] = (signature, inputs, notes)
            return st.session_state["predict_inputs"]
    except uploads.InputError as exc:
        st.error(str(exc))
    return None


def serve_hint(run: dict) -> None:
    """The command that serves this model over HTTP, and a curl line to ask it for a photo's count."""
    with st.expander("Predict over HTTP"):
        precision = " --precision bf16" if run["precision"] == "bf16" else ""
        project = Path(__file__).resolve().parents[1]
        st.markdown(f"**1. Start the service** in a terminal, from the project folder (`{project}`). It keeps "
                    "that terminal busy while it serves; stop it with Ctrl+C.")
        st.code(f"cd {project}\npython -m core serve \\\n  --model {Path(run['path']) / 'model.pt'} \\\n"
                f"  --port 8080{precision}", language="bash", wrap_lines=True)
        st.markdown("**2. Ask it for a count** from a second terminal, in the folder of the photo, once "
                    "`curl -s http://127.0.0.1:8080/ping` answers:")
        st.code("curl -s -X POST -H 'Content-Type: image/jpeg' \\\n  --data-binary @photo.jpg \\\n"
                "  http://127.0.0.1:8080/invocations", language="bash")
        st.caption("The answer: count, second_count and tie (a toss-up: “3 or 4”), probabilities, confidence, "
                   "low_confidence. GET /model describes the model, /docs lists the API.")


def predictions_for(run: dict, signature: str, inputs: list[uploads.PhotoInput]) -> pd.DataFrame:
    """Predicted once per batch of photos and model; a rerun (e.g. moving the threshold) reuses the result."""
    key = (model_fingerprint(Path(run["path"]) / "model.pt"), run["precision"], signature)
    saved = st.session_state.get("predict_results")
    if saved and saved[0] == key:
        return saved[1]
    try:
        model, meta = predictor_for(Path(run["path"]) / "model.pt", run["precision"])
    except (OSError, ModelError) as exc:
        st.error(f"**The model of run `{run['id']}` cannot be loaded.** {exc}")
        st.stop()
    usable = sum(1 for i in inputs if i.path and not i.error)
    slot = st.empty()
    slot.progress(0.0, text=f"Predicting {usable:,} photos…")

    def progress(info):
        slot.progress(min(max(float(info.get("fraction") or 0.0), 0.0), 1.0), text=f"Predicting {usable:,} photos…")

    try:
        frame = predict_inputs(model, meta, inputs, on_progress=progress)
    finally:
        slot.empty()
    st.session_state["predict_results"] = (key, frame)
    return frame


def probability_chart(row: pd.Series, classes: list[int], threshold: float) -> go.Figure:
    values = [float(row[f"prob_{c}"]) for c in classes]
    colours = ["#e07b00" if c == row["predicted"] else "#9db4cc" for c in classes]
    figure = go.Figure(go.Bar(x=values, y=[str(c) for c in classes], orientation="h", marker_color=colours,
                              text=[f"{v:.0%}" for v in values], textposition="auto", hoverinfo="skip"))
    figure.add_vline(x=threshold, line_dash="dot", line_color="#888")
    figure.update_layout(height=150, margin=dict(l=0, r=0, t=0, b=0), xaxis=dict(range=[0, 1], visible=False),
                         yaxis=dict(title=None, type="category"), showlegend=False)
    return figure


def engine_note(run: dict) -> str:
    """Which engine counted, and how closely it agrees with PyTorch."""
    from core.models.engines import ENGINE_NAMES

    model, _ = predictor_for(Path(run["path"]) / "model.pt", run["precision"])
    check = getattr(model, "check", None)
    if check is None:
        return "Counted with PyTorch."
    return (f"Counted with {ENGINE_NAMES[model.engine]} ({model.precision}): within {check['max_difference']:.0e} "
            f"of PyTorch's probabilities on {check['photos']} photos ({check.get('photos_from', 'its dataset')}).")


def show_results(frame: pd.DataFrame, run: dict, notes: list[str]) -> None:
    threshold = run["threshold"]
    classes = [int(c.split("_", 1)[1]) for c in probability_columns(frame)]
    ok = frame[frame["error"].isna()].copy()
    ok["low_confidence"] = ok["confidence"] < threshold
    bad = frame[frame["error"].notna()]
    for note in notes:
        st.caption(note)
    cols = st.columns(3)
    cols[0].metric("Photos predicted", f"{len(ok):,}")
    cols[1].metric("Low confidence", f"{int(ok['low_confidence'].sum()):,}",
                   help=f"Photos the model is less than {threshold:.0%} sure of")
    cols[2].metric("Could not be read", f"{len(bad):,}")
    for message in bad["error"]:
        st.error(message)
    if ok.empty:
        return
    st.subheader("Photos")
    _, pages = page_of(ok, 1, PHOTOS_PER_PAGE)
    page = st.number_input(f"Page (of {pages})", 1, pages, 1, key="predict_page") if pages > 1 else 1
    shown, _ = page_of(ok, int(page), PHOTOS_PER_PAGE)
    looked = insight_views.heatmap_toggle("predict_heatmaps")
    columns = st.columns(3)
    for i, (_, row) in enumerate(shown.iterrows()):
        with columns[i % 3].container(border=True):
            if looked:
                insight_views.heatmap_images(Path(run["path"]) / "model.pt", row["path"], [row["predicted"]])
            else:
                show_photo(row["path"])
            flag = " · :orange[low confidence]" if row["low_confidence"] else ""
            st.markdown(f"**{row['name']}** {verdict(row, classes)}{flag}",
                        help=f"Two counts within {CLOSE_CALL:.0%} of each other are shown as a toss-up.")
            st.plotly_chart(probability_chart(row, classes, threshold), width="stretch", key=f"probs_{i}_{row['name']}")
    st.subheader("Batch table")
    table = with_ties(frame)
    table["error"] = table["error"].fillna("")
    table["low_confidence"] = (table["confidence"] < threshold).astype("boolean").mask(table["error"].notna())
    probs = probability_columns(table)
    config_columns = {p: st.column_config.ProgressColumn(f"P({p.split('_', 1)[1]})", min_value=0.0, max_value=1.0,
                                                         format="%.2f") for p in probs}
    config_columns["confidence"] = st.column_config.NumberColumn("confidence", format="%.3f", width="small")
    config_columns["predicted"] = st.column_config.NumberColumn("count", width="small")
    config_columns["second_count"] = st.column_config.NumberColumn("or", width="small",
                                                                   help="The other count of a toss-up (“3 or 4”: "
                                                                        f"within {CLOSE_CALL:.0%}); `tie` in the CSV")
    config_columns["low_confidence"] = st.column_config.CheckboxColumn("flagged", width="small",
                                                                       help="Less confident than the threshold")
    config_columns["error"] = st.column_config.TextColumn("error", width="medium",
                                                          help="Each whole message is above the table")
    for p in probs:  # five probability bars fit beside the rest at 1400 px
        config_columns[p]["width"] = "small"
    shown_columns = ["name", "predicted", "confidence", "low_confidence"] + probs + ["error"]
    st.dataframe(table[shown_columns], hide_index=True, width="stretch", column_config=config_columns,
                 key="predict_table")
    exported = (["name", "predicted", "second_count", "tie", "confidence", "low_confidence"] + probs
                + ["error", "source"])
    st.download_button("Download the table (CSV)", table[exported].to_csv(index=False).encode(),
                       f"predictions-{run['id']}.csv", "text/csv")


st.title("Predict")
runs = available_runs()
if not runs:
    no_model_yet()
    st.stop()
run = choose_run(runs)
serve_hint(run)
given = gather_inputs()
if given is None:
    st.caption("Upload photos, or give a folder or an S3 URI, to predict their object counts.")
    st.stop()
signature, inputs, notes = given
results = predictions_for(run, signature, inputs)
show_results(results, run, notes + [engine_note(run)])
