"""Train: launch a training job in the background, watch it live, cancel it, choose the current model, search
hyperparameters."""
from __future__ import annotations

import dataclasses
import time

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core import gpu
from core.jobs import hpo, worker
from core.jobs import queue as jobs
from core.jobs.estimates import estimate_seconds, input_shape
from core.jobs.params import describe_dataset, training_problems
from core.jobs.runs import current_run, final_metrics, list_runs, set_current_run
from core.models.networks import BACKBONES
from core.training import config as training
from app_pages.common import current_dataset

REFRESH_S = 2.0
IDLE_REFRESH_S = 10.0  # with nothing running, still notice jobs queued elsewhere (CLI, another tab)
IMAGE_SIZES = [96, 128, 160, 192, 224, 256, 288, 320, 384, 448]
ASPECTS = [1.0, 1.37]
ASPECT_NAMES = {1.0: "square (1.0)", 1.37: "the bins' shape (1.37)"}
TTA_NAMES = {"none": "the photo only", "hflip": "photo + left-right mirror", "flips": "photo + its 3 mirrors"}
MODE_HELP = {"frozen": "backbone frozen, features computed once: minutes on a CPU",
             "finetune": "the whole network learns: slower, usually more accurate"}


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def training_defaults() -> dict:
    return {f.name: f.default for f in dataclasses.fields(training.TrainConfig) if f.default is not dataclasses.MISSING}


def params_summary(params: dict) -> str:
    if "seconds" in params and "backbone" not in params:
        return f"{params['seconds']} s check"
    parts = [params.get("backbone", "?"), params.get("mode", "?")]
    if params.get("epochs"):
        parts.append(f"{params['epochs']} epochs")
    if params.get("batch_size"):
        parts.append(f"batch {params['batch_size']}")
    if params.get("lr"):
        parts.append(f"lr {params['lr']:g}")
    if params.get("image_size"):
        height, aspect = input_shape(params)
        parts.append(f"{height} px" if aspect == 1.0 else f"{height}×{round(height * aspect)} px")
    if params.get("balance") and params["balance"] != "none":
        parts.append(f"balance {params['balance']}")
    if params.get("n_trials"):
        parts.append(f"{params['n_trials']} trials")
    return " · ".join(str(p) for p in parts)


# ---------------------------------------------------------------------------------------------- the form

def training_form(dataset, facts: dict, on_gpu: bool) -> dict | None:
    """The training parameters chosen, with the reasons they cannot work shown; None when they cannot."""
    defaults = training_defaults()
    st.caption(f"Dataset `{facts['data']}` · version `{facts['dataset_version']}` · classes "
               f"{', '.join(map(str, facts['classes']))} · {facts['n_train']:,} train / {facts['n_valid']:,} valid / "
               f"{facts['n_test']:,} test photos. Change it in the sidebar.")
    left, middle, right = st.columns(3)
    backbones = list(BACKBONES)
    backbone = left.selectbox("Backbone", backbones, index=backbones.index(defaults.get("backbone", backbones[0])),
                              key="train_backbone")
    mode = left.radio("Mode", ["frozen", "finetune"], index=["frozen", "finetune"].index(defaults.get("mode", "frozen")),
                      format_func=lambda m: f"{m} — {MODE_HELP[m]}", key="train_mode")
    # Epochs and learning rate have per-mode defaults, so each mode keeps its own widget.
    epochs = middle.number_input("Epochs", value=int(training.DEFAULT_EPOCHS[mode]), step=1,
                                 key=f"train_epochs_{mode}")
    batch_size = middle.number_input("Batch size", value=int(defaults.get("batch_size", 32)), step=1,
                                     key="train_batch")
    lr = middle.number_input("Learning rate", value=float(training.DEFAULT_LR[mode]), step=0.0001, format="%.5f",
                             key=f"train_lr_{mode}")
    size_default, aspect_default = training.DEFAULT_INPUT[mode]
    sizes = sorted(set(IMAGE_SIZES + [size_default]))
    image_size = right.selectbox("Image height (px)", sizes, index=sizes.index(size_default), key=f"train_size_{mode}")
    aspects = sorted(set(ASPECTS) | {aspect_default})
    aspect = right.selectbox("Shape (width ÷ height)", aspects, index=aspects.index(aspect_default),
                             format_func=lambda a: ASPECT_NAMES.get(a, f"{a:g}"), key=f"train_aspect_{mode}",
                             help="Bin photos are about 1.37 times wider than high; keeping that shape helps fine-tuning.")
    balances = ["none", "weights", "sampler"]
    balance = right.selectbox("Balancing", balances, index=balances.index(defaults.get("balance", "none")),
                              help="weights: loss weighted by inverse class frequency; sampler: rare classes drawn "
                                   "more often", key="train_balance")
    tta_choices = list(TTA_NAMES)
    tta = middle.selectbox("Test-time views", tta_choices, index=tta_choices.index(training.DEFAULT_TTA[mode]),
                           format_func=TTA_NAMES.get, key=f"train_tta_{mode}",
                           help="Each photo's prediction is the average over these views of it; its 3 mirrors are "
                                "left-right, top-bottom and both.")
    devices = ["auto", "cpu"] + (["cuda"] if on_gpu else [])
    device = right.selectbox("Device", devices, key="train_device")
    params = {**facts, "backbone": backbone, "mode": mode, "epochs": int(epochs), "batch_size": int(batch_size),
              "lr": float(lr), "image_size": int(image_size), "aspect": float(aspect), "tta": tta,
              "balance": balance, "device": device}
    problems = training_problems(params, facts["n_train"], on_gpu)
    if problems:
        st.error("**These settings cannot be trained:**\n" + "\n".join(f"- {p}" for p in problems))
        return None
    seconds, measured = estimate_seconds(params, facts["n_train"], facts["n_valid"], facts["n_test"],
                                              on_gpu and device != "cpu")
    st.caption(f"Estimated duration: about **{duration(seconds)}** "
               + ("(from the images/s measured by earlier runs on this machine)." if measured else
                  "(a rough guess: the first run measures this machine's images/s and later estimates use it)."))
    return params


def launch(kind: str, params: dict) -> None:
    st.session_state["train_launched"] = worker.launch(kind, params).id


# ---------------------------------------------------------------------------------------------- live jobs

def curves(history: list[dict]) -> go.Figure | None:
    if not history:
        return None
    frame = pd.DataFrame(history)
    figure = make_subplots(rows=1, cols=2, subplot_titles=("Loss", "Accuracy"))
    for column, name, dash in (("train_loss", "train", None), ("valid_loss", "valid", "dash")):
        if column in frame and frame[column].notna().any():
            figure.add_trace(go.Scatter(x=frame["epoch"], y=frame[column], name=f"{name} loss", mode="lines+markers",
                                        line={"dash": dash}), row=1, col=1)
    for column, name, dash in (("train_acc", "train", None), ("valid_acc", "valid", "dash")):
        if column in frame and frame[column].notna().any():
            figure.add_trace(go.Scatter(x=frame["epoch"], y=frame[column], name=f"{name} accuracy",
                                        mode="lines+markers", line={"dash": dash}), row=1, col=2)
    figure.update_xaxes(title_text="epoch")
    figure.update_yaxes(tickformat=".0%", row=1, col=2)
    figure.update_layout(height=280, margin={"t": 30, "b": 10, "l": 10, "r": 10})
    return figure


def progress_text(progress: dict) -> str:
    stage = progress.get("stage") or "starting"
    text = {"features": "Computing backbone features", "train": "Training", "evaluate": "Evaluating on the test split",
            "search": "Searching", "sleep": "Checking the queue", "done": "Finishing"}.get(stage, stage)
    if progress.get("epoch") and stage == "train":
        text += f" — epoch {progress['epoch']}/{progress.get('epochs', '?')}"
    if progress.get("message"):
        text += f" · {progress['message']}"
    return text


def running_view(job: jobs.Job) -> None:
    progress = job.progress
    fraction = float(progress.get("fraction") or 0.0)
    st.progress(min(max(fraction, 0.0), 1.0), text=f"{fraction:.0%} · {progress_text(progress)}")
    tiles = st.columns(6)
    tiles[0].metric("Epoch", f"{progress['epoch']}/{progress.get('epochs', '?')}" if progress.get("epoch") else "–")
    speed = progress.get("images_per_s")
    tiles[1].metric("Images/s", f"{speed:,.1f}" if isinstance(speed, (int, float)) else "–")
    tiles[2].metric("ETA", duration(progress.get("eta_s")))
    tiles[3].metric("Elapsed", duration(job.elapsed_s))
    tiles[4].metric("Device", str(progress.get("device") or job.slot or "–"))
    wait = progress.get("data_wait_fraction")
    tiles[5].metric("Waiting on data", f"{wait:.0%}" if isinstance(wait, (int, float)) else "–",
                    help="Share of the step time spent waiting for photos to be loaded: high means the device idles.")
    stats = progress.get("gpu") or gpu.stats_for_device(progress.get("device"))
    if stats:
        used, total = stats["memory_used_mb"], stats["memory_total_mb"]
        st.caption(f"GPU {stats['name']}: utilisation **{stats['utilisation']:.0f} %**, memory "
                   f"**{used / 1024:.1f} / {total / 1024:.1f} GiB**")
    if isinstance(wait, (int, float)) and wait > 0.5:
        st.warning(f"The device waits for data {wait:.0%} of the time: more DataLoader workers, a smaller image size "
                   "or the frozen mode's feature cache would use it better.")
    figure = curves(progress.get("history") or [])
    if figure is not None:
        st.plotly_chart(figure, width="stretch", key=f"train_curves_{job.id}")
    if job.kind == "hpo":
        search_results(job)
    if job.heartbeat and time.time() - job.heartbeat > 15:
        st.warning(f"No heartbeat from the worker for {duration(time.time() - job.heartbeat)}.")


def job_card(job: jobs.Job) -> None:
    with st.container(border=True):
        head, button = st.columns([5, 1])
        if job.active and not job.cancel_requested and button.button("Cancel", key=f"train_cancel_{job.id}"):
            job = jobs.cancel(job.id)
        if job.status == "running" and job.cancel_requested:
            button.caption("Cancelling…")
        icon = {"queued": ":material/schedule:", "running": ":material/directions_run:", "done": ":material/check_circle:",
                "failed": ":material/error:", "cancelled": ":material/block:"}[job.status]
        head.markdown(f"{icon} **Job {job.id}** · {job.kind} · {job.status} · {params_summary(job.params)}")
        if job.status == "queued":
            st.caption(f"Waiting: number {jobs.queue_position(job.id)} in the queue. A worker runs one training at a "
                       "time per GPU, and one on the CPU.")
        elif job.status == "running":
            running_view(job)
        elif job.status == "failed":
            st.error(f"**Failed:** {job.error}")
        elif job.status == "cancelled":
            st.warning(f"Cancelled ({job.error or 'by request'}).")
        elif job.status == "done":
            st.success(f"Done in {duration(job.elapsed_s)}. Output: `{job.run_dir}`"
                       + (" · results under Hyperparameter search below." if job.kind == "hpo" else ""))
        if job.status != "queued":
            with st.expander("Log", expanded=job.status == "failed"):
                st.code(job.log_tail(60) or "(empty)", language=None)


def live_jobs() -> None:
    worker.ensure_workers()  # also fails jobs whose worker died, within one refresh
    active = jobs.list_jobs(jobs.ACTIVE)
    if tuple(job.id for job in active) != st.session_state.get("train_page_active_ids"):
        # A job started or ended since the page was drawn: redraw it all so the runs list and refresh rate follow.
        st.rerun(scope="app")
    if not active:
        st.caption("No job is queued or running.")
    for job in reversed(active):
        job_card(job)
    finished = [j for j in jobs.list_jobs(["done", "failed", "cancelled"], limit=6)]
    if finished:
        with st.expander("Recent finished jobs", expanded=any(j.status == "failed" for j in finished[:1])):
            for job in finished:
                job_card(job)


# ---------------------------------------------------------------------------------------------- runs

def runs_section() -> None:
    runs = list_runs()
    current = current_run()
    if not runs:
        st.info("No finished run yet: launch a training above. The first one becomes the current model.")
        return
    rows = []
    for run in runs:
        final = final_metrics(run)
        rows.append({
            "run": run.id, "current": "⭐" if current and current.id == run.id else "",
            "backbone": run.params.get("backbone"), "mode": run.params.get("mode"),
            "epochs": run.params.get("epochs"), "batch": run.params.get("batch_size"), "lr": run.params.get("lr"),
            "size": run.params.get("image_size"), "balance": run.params.get("balance"),
            "balanced accuracy": final.get("balanced_accuracy"), "accuracy": final.get("accuracy"),
            "macro-F1": final.get("macro_f1"), "MAE": final.get("mae"), "off-by-one": final.get("off_by_one"),
            "duration": duration(run.extra.get("duration_s")) if run.extra.get("duration_s") else "",
            "dataset version": run.params.get("dataset_version"),
        })
    table = pd.DataFrame(rows)
    scored = table.dropna(subset=["balanced accuracy"])
    if not scored.empty:
        figure = px.bar(scored.iloc[::-1], x="balanced accuracy", y="run", orientation="h",
                        color="mode", hover_data=["accuracy", "macro-F1", "MAE", "backbone", "epochs", "lr"],
                        title="Test balanced accuracy per run")
        figure.update_xaxes(tickformat=".0%", range=[0, 1])
        figure.update_layout(height=120 + 28 * len(scored), margin={"t": 40, "b": 10, "l": 10, "r": 10})
        st.plotly_chart(figure, width="stretch", key="train_runs_chart")
    percent = st.column_config.NumberColumn(format="%.1f%%")
    shown = table.copy()
    for column in ("balanced accuracy", "accuracy", "macro-F1", "off-by-one"):
        shown[column] = shown[column].astype(float) * 100
    st.dataframe(shown, hide_index=True, width="stretch",
                 column_config={c: percent for c in ("balanced accuracy", "accuracy", "macro-F1", "off-by-one")}
                 | {"MAE": st.column_config.NumberColumn(format="%.3f")})
    ids = [run.id for run in runs]
    chosen = st.selectbox("Current model (used by Predict)", ids,
                          index=ids.index(current.id) if current and current.id in ids else 0, key="train_current")
    if current is None or chosen != current.id:
        if st.button("Use this run as the current model", key="train_set_current"):
            set_current_run(chosen)
            st.rerun()
    else:
        st.caption(f"`{chosen}` is the current model.")


# ---------------------------------------------------------------------------------------------- search

def search_results(job: jobs.Job) -> None:
    table = hpo.trials_table(job)
    if table.empty:
        st.caption("No trial finished yet.")
        return
    done = table[table["state"] == "COMPLETE"]
    if not done.empty:
        figure = px.scatter(done, x="lr", y="valid_loss", color=done["batch_size"].astype(str), log_x=True,
                            labels={"lr": "learning rate", "valid_loss": "final valid loss", "color": "batch size"},
                            hover_data=["trial", "valid_acc"], title="Trials: lower is better")
        figure.update_traces(marker={"size": 11})
        figure.update_layout(height=300, margin={"t": 40, "b": 10, "l": 10, "r": 10})
        st.plotly_chart(figure, width="stretch", key=f"train_search_plot_{job.id}_{job.status}")
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"lr": st.column_config.NumberColumn(format="%.5f"),
                                "valid_loss": st.column_config.NumberColumn("final valid loss", format="%.4f"),
                                "valid_acc": st.column_config.NumberColumn("valid accuracy", format="%.3f")})
    best = hpo.best_params(job)
    if job.status == "done" and best is not None:
        if st.button(f"Train with the best parameters (lr {best['lr']:.5f}, batch {best['batch_size']}, "
                     f"{best['epochs']} epochs)", key=f"train_best_{job.id}", type="primary"):
            launch("train", best)
            st.rerun(scope="app")


def search_form(base: dict | None, facts: dict, on_gpu: bool) -> None:
    st.caption("Like the original study's tuner: learning rate 0.001–0.1 (log-uniform) and batch size in "
               "{16, 32, 64, 128, 256} (those that fit the training set), minimising the final valid loss. "
               "The other settings come from the form above.")
    if base is None:
        st.info("Fix the training settings above first.")
        return
    left, middle, right, last = st.columns(4)
    n_trials = left.number_input("Trials", value=hpo.DEFAULT_TRIALS, step=1, key="hpo_trials")
    parallel = middle.number_input("In parallel", value=2, step=1, key="hpo_parallel")
    # Frozen epochs are cheap once the features are cached; fine-tuning trials are kept short.
    trial_epochs = right.number_input("Epochs per trial", step=1, key=f"hpo_epochs_{base['mode']}",
                                      value=int(base["epochs"]) if base["mode"] == "frozen" else min(int(base["epochs"]), 3))
    full_epochs = last.number_input("Epochs of the full training", value=int(base["epochs"]), step=1,
                                    key=f"hpo_full_epochs_{base['mode']}")
    problems = [m for bad, m in ((n_trials < 1, "Trials must be at least 1."),
                                 (parallel < 1, "In parallel must be at least 1."),
                                 (full_epochs < 1, "The full training needs at least 1 epoch.")) if bad]
    params = {**base, "epochs": int(trial_epochs), "n_trials": int(n_trials), "parallel": int(parallel),
              "full_epochs": int(full_epochs)}
    params["batch_size"] = hpo.batch_choices(facts["n_train"])[0]
    problems += training_problems(params, facts["n_train"], on_gpu)
    allowed, why = hpo.parallel_trials(int(max(parallel, 1)), "cuda" if on_gpu and base["device"] != "cpu" else "cpu")
    if why:
        st.caption(f"{allowed} trial(s) at a time here: {why}.")
    if problems:
        st.error("**This search cannot run:**\n" + "\n".join(f"- {p}" for p in problems))
        return
    params.pop("batch_size")
    if st.button("Launch the search", key="hpo_launch"):
        launch("hpo", params)
        st.rerun()


# ---------------------------------------------------------------------------------------------- the page

st.title("Train")
device_facts = gpu.describe()
on_gpu = device_facts["cuda"]
if on_gpu:
    names = ", ".join(g["name"] for g in device_facts["gpus"] if g) or "CUDA"
    st.caption(f"Jobs run in the background on: {names} (one training per GPU at a time) and the CPU.")
else:
    st.caption(f"Jobs run in the background on the CPU ({device_facts['cpu_cores']} cores), one at a time; "
               "they go on when you close the browser or restart the app.")
worker.ensure_workers()  # jobs queued while the app was down start now

dataset = current_dataset()
base_params = None
facts = None
if dataset is not None:
    facts = describe_dataset(dataset)
    st.subheader("New training")
    if facts["n_train"] == 0:
        st.warning("This dataset has no training photos in the chosen classes: pick another dataset or class range.")
    else:
        base_params = training_form(dataset, facts, on_gpu)
        if st.button("Launch training", type="primary", disabled=base_params is None, key="train_launch"):
            launch("train", base_params)
            st.rerun()

if st.session_state.get("train_launched"):
    st.toast(f"Job {st.session_state.pop('train_launched')} queued.")

st.subheader("Jobs")
st.session_state["train_page_active_ids"] = tuple(job.id for job in jobs.list_jobs(jobs.ACTIVE))
st.fragment(live_jobs, run_every=REFRESH_S if st.session_state["train_page_active_ids"] else IDLE_REFRESH_S)()

st.subheader("Runs")
runs_section()

if facts is not None and facts["n_train"] > 0:
    with st.expander("🔎 Hyperparameter search", expanded=bool(jobs.list_jobs(kind="hpo", limit=1))):
        search_form(base_params, facts, on_gpu)
        searches = [j for j in jobs.list_jobs(kind="hpo", limit=3) if not j.active]
        for job in searches:
            st.markdown(f"**Search job {job.id}** · {job.status} · {params_summary(job.params)}")
            if job.status == "failed":
                st.error(job.error)
            search_results(job)
