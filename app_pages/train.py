"""Train: launch a training job in the background, watch it live, cancel it, choose the current model, search
hyperparameters."""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from app_pages.common import current_dataset, current_user
from core import gpu
from core.jobs import hpo, worker
from core.jobs import queue as jobs
from core.jobs.describe import duration, ensemble_summary, params_summary, progress_text, search_params, trial_epochs
from core.jobs.estimates import estimate_seconds, features_cached
from core.jobs.params import describe_dataset, training_problems
from core.jobs.runs import (
    backbones_label,
    current_run,
    final_metrics,
    final_test_metrics,
    list_runs,
    read_run_metrics,
    rename_run,
    run_name,
    set_current_run,
)
from core.jobs.sagemaker import SageMakerError, SageMakerTarget
from core.training import config as training

REFRESH_S = 2.0
JUST_FINISHED_S = 1800  # a job finished this recently stays at the top of the page
IDLE_REFRESH_S = 10.0  # with nothing running, still notice jobs queued elsewhere (CLI, another tab)
IMAGE_SIZES = [96, 128, 160, 192, 224, 256, 288, 320, 384, 448]
ASPECTS = [1.0, 1.37]
ASPECT_NAMES = {1.0: "square (1.0)", 1.37: "the bins' shape (1.37)"}
MODE_NAMES = {"frozen": "frozen backbone (minutes)", "finetune": "fine-tune the whole network (for GPUs)",
              "partial": "fine-tune the last stages (fast on a CPU)"}
TTA_NAMES = {"none": "the photo only", "hflip": "photo + left-right mirror", "flips": "photo + its 3 mirrors"}
# After a launch the page is scrolled down at the Launch button; the new job's card is under Jobs, at the top.
SCROLL_TO_JOBS = """<script>
(function scroll(tries) {
  const jobs = document.getElementById("jobs");
  if (jobs) { jobs.scrollIntoView({block: "start"}); } else if (tries > 0) { setTimeout(() => scroll(tries - 1), 100); }
})(30);
</script>"""


# ---------------------------------------------------------------------------------------------- the form

def setting_widget(container, item: training.Setting, value, key: str, **extra):
    """The widget for one TrainConfig setting, by its kind: choices, yes/no, a number or text."""
    common = {"help": item.help or None, "key": key}
    if item.choices:
        options = list(item.choices)
        if value is None and item.default is None and "format_func" not in extra:  # an optional choice: "none" too
            options, extra = [None, *options], extra | {"format_func": lambda v: "none" if v is None else str(v)}
        index = options.index(value) if value in options else None
        return container.selectbox(item.label, options, index=index, **common, **extra)
    if item.type is bool:
        return container.checkbox(item.label, value=bool(value), **common)
    if item.type is int:
        return container.number_input(item.label, value=None if value is None else int(value), step=1, **common)
    if item.type is float:
        step = item.step or (abs(value) / 10 if value else 0.01)
        return container.number_input(item.label, value=None if value is None else float(value), step=float(step),
                                      format="%g", **common)
    return container.text_input(item.label, value="" if value is None else str(value), **common) or None


def advanced_settings(mode_defaults: training.TrainConfig) -> dict:
    """Every setting meant for the Advanced expander, drawn by its kind: a new TrainConfig field appears here. A
    setting whose default depends on the mode shows that mode's, in a widget of its own per mode."""
    items = [item for item in training.settings() if item.page == training.ADVANCED]
    resolved = mode_defaults.to_dict()
    values = {}
    with st.expander("Advanced"):
        columns = st.columns(3)
        for number, item in enumerate(items):
            per_mode = item.default is None and resolved.get(item.name) is not None
            key = f"train_{item.name}_{mode_defaults.mode}" if per_mode else f"train_{item.name}"
            value = resolved[item.name] if per_mode else item.default
            values[item.name] = setting_widget(columns[number % 3], item, value, key)
    return values


def training_form(dataset, facts: dict, on_gpu: bool) -> dict | None:
    """The training parameters chosen, with the reasons they cannot work shown; None when they cannot."""
    items = {item.name: item for item in training.settings()}
    st.caption(f"Dataset `{facts['data']}` · version `{facts['dataset_version']}` · classes "
               f"{', '.join(map(str, facts['classes']))} · {facts['n_train']:,} train / {facts['n_valid']:,} valid / "
               f"{facts['n_test']:,} test photos. Change it in the sidebar.")
    left, middle, right = st.columns(3)
    backbone = setting_widget(left, items["backbone"], items["backbone"].default, "train_backbone")
    mode_item = items["mode"]
    mode = left.radio(mode_item.label, list(mode_item.choices), index=list(mode_item.choices).index(mode_item.default),
                      format_func=lambda m: MODE_NAMES.get(m, m), help=mode_item.help, key="train_mode")
    # Settings left to the mode (epochs, lr, input, views) have per-mode defaults, so each mode keeps its own widget.
    mode_defaults = training.TrainConfig(mode=mode)
    epochs = setting_widget(middle, items["epochs"], mode_defaults.n_epochs, f"train_epochs_{mode}")
    batch_size = setting_widget(middle, items["batch_size"], items["batch_size"].default, "train_batch")
    lr_item = items["lr"]
    lr = middle.number_input(lr_item.label, value=float(mode_defaults.learning_rate), step=0.0001, format="%.5f",
                             help=lr_item.help, key=f"train_lr_{mode}")
    size_default, aspect_default = mode_defaults.input_height, mode_defaults.input_aspect
    sizes = sorted(set(IMAGE_SIZES + [size_default]))
    image_size = right.selectbox(items["image_size"].label, sizes, index=sizes.index(size_default),
                                 help=items["image_size"].help, key=f"train_size_{mode}")
    aspects = sorted(set(ASPECTS) | {aspect_default})
    aspect = right.selectbox(items["aspect"].label, aspects, index=aspects.index(aspect_default),
                             format_func=lambda a: ASPECT_NAMES.get(a, f"{a:g}"), help=items["aspect"].help,
                             key=f"train_aspect_{mode}")
    if st.session_state.get("train_balance_dataset") != facts["dataset_key"]:
        # Another dataset: its own recommended balance becomes the default again.
        st.session_state.pop("train_balance", None)
        st.session_state["train_balance_dataset"] = facts["dataset_key"]
    balance = setting_widget(right, items["balance"], training.default_balance(dataset), "train_balance")
    tta = setting_widget(middle, items["tta"], mode_defaults.test_views, f"train_tta_{mode}",
                         format_func=lambda v: TTA_NAMES.get(v, v))
    device_item = items["device"]
    devices = [d for d in device_item.choices if on_gpu or not d.startswith("cuda")]
    device = right.selectbox(device_item.label, devices, help=device_item.help, key="train_device")
    params = {**facts, "backbone": backbone, "mode": mode, "epochs": epochs, "batch_size": batch_size,
              "lr": float(lr), "image_size": int(image_size), "aspect": float(aspect), "tta": tta,
              "balance": balance, "device": device, **advanced_settings(mode_defaults)}
    problems = training_problems(params, facts["n_train"], on_gpu)
    if problems:
        st.error("**These settings cannot be trained:**\n" + "\n".join(f"- {p}" for p in problems))
        return None
    seconds, measured = estimate_seconds(params, facts["n_train"], facts["n_valid"], facts["n_test"],
                                         on_gpu and device != "cpu")
    cached = features_cached(params)
    st.caption(f"Estimated duration: about **{duration(seconds)}** "
               + ("(from the images/s measured by earlier runs on this machine" if measured else
                  "(a rough guess: the first run measures this machine's images/s and later estimates use it")
               + ("; the photos' features are cached by an earlier run with this backbone and input, so they are "
                  "read back, not computed)." if cached else ")."))
    return params


def sagemaker_form(params: dict) -> dict | None:
    """The SageMaker target chosen (image, role, instances, S3 locations); None, with the reason, when incomplete."""
    left, right = st.columns(2)
    data = str(params.get("data") or "")
    values = {
        "image": left.text_input("Training image (ECR)", key="sm_image",
                                 placeholder="123456789012.dkr.ecr.us-east-1.amazonaws.com/binsight:latest"),
        "role": right.text_input("Execution role ARN", key="sm_role"),
        "instance_type": left.text_input("Instance type", "ml.g5.xlarge", key="sm_instance_type"),
        "instance_count": int(right.number_input("Instances", 1, 64, 1, key="sm_instance_count")),
        "input_s3": left.text_input("Shard set (s3://)", data if data.startswith("s3://") else "", key="sm_input",
                                    help="python -m core shards --data … --out s3://… packs one"),
        "output_s3": right.text_input("Model output (s3://)", key="sm_output"),
        "checkpoint_s3": left.text_input("Checkpoints (s3://, optional)", key="sm_checkpoint") or None,
    }
    try:
        target = SageMakerTarget.from_params(values)
    except SageMakerError as exc:
        st.info(str(exc))
        return None
    return params | {"sagemaker": target.to_params(), "device": "remote"}


def launch(kind: str, params: dict) -> None:
    user = current_user()
    user.require("train")  # the button is disabled too; this covers a forged click
    job_id = worker.launch(kind, params, user=user.name).id
    st.session_state["train_launched"] = job_id
    st.session_state["train_jobs_launched"] = (*st.session_state.get("train_jobs_launched", ()), job_id)


def refusal(action: str) -> dict:
    """The disabled/help arguments of a button the current user may not use (empty when they may)."""
    reason = current_user().why_not(action)
    return {"disabled": True, "help": reason} if reason else {}


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


def running_view(job: jobs.Job) -> None:
    progress = job.progress
    fraction = float(progress.get("fraction") or 0.0)
    st.progress(min(max(fraction, 0.0), 1.0), text=f"{fraction:.0%} · {progress_text(progress)}")
    tiles = st.columns(4)
    tiles[0].metric("Epoch", f"{progress['epoch']}/{progress.get('epochs', '?')}" if progress.get("epoch") else "–")
    tiles[1].metric("Time left", duration(progress.get("eta_s")), help="Estimated from the speed so far")
    tiles[2].metric("Elapsed", duration(job.elapsed_s))
    speed = progress.get("images_per_s")
    tiles[3].metric("Images/s", f"{speed:,.1f}" if isinstance(speed, (int, float)) else "–")
    wait = progress.get("data_wait_fraction")
    st.caption(f"Device **{progress.get('device') or job.slot or '–'}**"
               + (f" · waiting on data **{wait:.0%}** of the step time (high means the device idles)"
                  if isinstance(wait, (int, float)) else ""))
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
        if job.active and not job.cancel_requested and button.button("Cancel", key=f"train_cancel_{job.id}",
                                                                      **refusal("cancel_job")) \
                and current_user().can("cancel_job"):
            job = jobs.cancel(job.id)
        if job.status == "running" and job.cancel_requested:
            button.caption("Cancelling…")
        icon = {"queued": ":material/schedule:", "running": ":material/directions_run:", "done": ":material/check_circle:",
                "failed": ":material/error:", "cancelled": ":material/block:"}[job.status]
        head.markdown(f"{icon} **Job {job.id}** · {job.kind} · {job.status} · by {job.user or 'unknown'} · "
                      f"{params_summary(job.params)}")
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
            done_summary(job)
        if job.status != "queued":
            with st.expander("Log", expanded=job.status == "failed"):
                st.code(job.log_tail(60) or "(empty)", language=None)


def done_summary(job: jobs.Job) -> None:
    """A finished job's figures: test accuracy, off-by-one, MAE, the epochs it ran (and why it stopped early)."""
    if job.kind == "hpo":
        st.success(f"Done in {duration(job.elapsed_s)} · results under Hyperparameter search below.")
        return
    metrics = read_run_metrics(job.run_dir) if job.run_dir else {}
    test = final_test_metrics(metrics)
    asked = (metrics.get("config") or {}).get("epochs") or job.params.get("epochs")
    ran = metrics.get("epochs_run")
    epochs = f"{ran} epochs" if ran else ""
    if metrics.get("members"):
        epochs = ensemble_summary(metrics)
    elif ran and asked and ran < int(asked):
        epochs = (f"stopped early at epoch {ran} of {asked}: the validation loss had stopped improving, so the best "
                  f"epoch ({metrics.get('best_epoch')}) was kept")
    figures = ""
    if isinstance(test.get("accuracy"), (int, float)):
        figures = (f" Test accuracy **{test['accuracy']:.1%}** · off by at most one **{test['off_by_one']:.1%}** · "
                   f"mean error **{test['mae']:.2f}** objects.")
    st.success(f"**Done in {duration(job.elapsed_s)}**{' · ' + epochs if epochs else ''}.{figures}")
    line = st.container(horizontal=True, vertical_alignment="center")
    if line.button("See it on Evaluate: confusion matrix and photos", icon=":material/target:",
                   key=f"train_to_evaluate_{job.id}", type="primary"):
        if job.run_dir:
            st.session_state["evaluate_open_run"] = Path(job.run_dir).name
        st.switch_page("app_pages/evaluate.py")
    line.caption(f"Output: `{job.run_dir}`")


def just_finished(finished: list[jobs.Job]) -> jobs.Job | None:
    """The finished job to keep at the top: launched in this session, or finished in the last half hour."""
    if not finished:
        return None
    latest = finished[0]
    mine = latest.id in st.session_state.get("train_jobs_launched", ())
    return latest if mine or (latest.finished and time.time() - latest.finished < JUST_FINISHED_S) else None


def live_jobs() -> None:
    worker.ensure_workers()  # also fails jobs whose worker died, within one refresh
    active = jobs.list_jobs(jobs.ACTIVE)
    if tuple(job.id for job in active) != st.session_state.get("train_page_active_ids"):
        # A job started or ended since the page was drawn: redraw it all so the runs list and refresh rate follow.
        st.rerun(scope="app")
    for job in reversed(active):
        job_card(job)
    finished = [j for j in jobs.list_jobs(["done", "failed", "cancelled"], limit=6)]
    latest = just_finished(finished)
    if latest is not None:
        job_card(latest)
    elif not active:
        st.caption("No job is queued or running.")
    earlier = [j for j in finished if j is not latest]
    if earlier:
        with st.expander("Earlier finished jobs"):
            for job in earlier:
                job_card(job)


# ---------------------------------------------------------------------------------------------- runs

def launched_by(job_id: int | None) -> str:
    try:
        return (jobs.get(job_id).user or "") if job_id is not None else ""
    except jobs.JobError:
        return ""


# What fits 1400 px without scrolling sideways; the run folder, lr and balance show in the chart's hover and the log.
RUN_COLUMNS = ["name", "current", "accuracy", "off-by-one", "MAE", "balanced accuracy", "backbone", "mode", "size",
               "epochs", "launched by"]


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
            "name": run_name(run), "current": bool(current and current.id == run.id),
            "accuracy": final.get("accuracy"), "off-by-one": final.get("off_by_one"), "MAE": final.get("mae"),
            "balanced accuracy": final.get("balanced_accuracy"), "macro-F1": final.get("macro_f1"),
            "backbone": backbones_label(run.params),
            "mode": run.params.get("mode"), "size": run.params.get("image_size"), "epochs": run.params.get("epochs"),
            "lr": run.params.get("lr"), "balance": run.params.get("balance"),
            "duration": duration(run.extra.get("duration_s")) if run.extra.get("duration_s") else "",
            "launched by": launched_by(run.job_id), "run": run.id,
        })
    table = pd.DataFrame(rows)
    scored = table.dropna(subset=["accuracy"])
    if not scored.empty:
        figure = px.bar(scored.iloc[::-1], x="accuracy", y="name", orientation="h",
                        color="mode", hover_data=["run", "off-by-one", "MAE", "epochs", "lr", "balance", "duration"],
                        title="Test accuracy per run", labels={"name": ""})
        figure.update_xaxes(tickformat=".0%", range=[0, 1])
        figure.update_layout(height=120 + 28 * len(scored), margin={"t": 40, "b": 10, "l": 10, "r": 10})
        st.plotly_chart(figure, width="stretch", key="train_runs_chart")
    percent = st.column_config.NumberColumn(format="%.1f%%", width="small")
    shown = table.copy()
    for column in ("balanced accuracy", "accuracy", "macro-F1", "off-by-one"):
        shown[column] = shown[column].astype(float) * 100
    st.dataframe(
        shown, hide_index=True, width="stretch", key="train_runs_table", column_order=RUN_COLUMNS,
        column_config={c: percent for c in ("balanced accuracy", "accuracy", "macro-F1", "off-by-one")}
        | {"name": st.column_config.TextColumn("name", help="Rename a run below (Evaluate and Predict show it)"),
           "current": st.column_config.CheckboxColumn("current", width="small",
                                                      help="The current model (used by Predict)"),
           "MAE": st.column_config.NumberColumn(format="%.2f", width="small",
                                                help="Mean absolute error: objects off, on average"),
           "off-by-one": st.column_config.NumberColumn(format="%.1f%%", width="small",
                                                       help="Share of test bins counted within one object"),
           "size": st.column_config.NumberColumn("px", width="small"),
           "balanced accuracy": st.column_config.NumberColumn("balanced", format="%.1f%%", width="small",
                                                              help="Balanced accuracy: the mean of each count's "
                                                                   "accuracy"),
           "backbone": st.column_config.TextColumn(width="small"),
           "mode": st.column_config.TextColumn(width="small"),
           "epochs": st.column_config.NumberColumn(width="small")})
    rename_form(runs)
    ids = [run.id for run in runs]
    names = {run.id: run_name(run) for run in runs}
    chosen = st.selectbox("Current model (used by Predict)", ids, format_func=names.get,
                          index=ids.index(current.id) if current and current.id in ids else 0, key="train_current")
    if current is None or chosen != current.id:
        if st.button("Use this run as the current model", key="train_set_current", **refusal("train")) \
                and current_user().can("train"):
            set_current_run(chosen)
            st.rerun()
    else:
        st.caption(f"**{names[chosen]}** is the current model.")


def rename_form(runs) -> None:
    """Give a run a short, readable name: the tables, charts and run choosers show it instead of its folder."""
    if not current_user().can("train"):
        return
    with st.popover("Rename a run", icon=":material/edit:"):
        names = {run.id: run_name(run) for run in runs}
        run_id = st.selectbox("Run", list(names), format_func=lambda i: f"{names[i]} ({i})", key="train_rename_run")
        typed = st.text_input("New name (empty: back to the default)", value=names[run_id], max_chars=32,
                              key=f"train_rename_{run_id}")
        if st.button("Rename", key="train_rename_apply", type="primary") and typed != names[run_id]:
            rename_run(run_id, typed)
            st.rerun()


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
                     f"{best['epochs']} epochs)", key=f"train_best_{job.id}", type="primary", **refusal("train")):
            launch("train", best)
            st.rerun(scope="app")


def search_form(base: dict | None, facts: dict, on_gpu: bool) -> None:
    st.caption(f"Like the original study's tuner: {hpo.describe_space(hpo.search_space(facts['n_train']))}, "
               "minimising the final valid loss. The other settings come from the form above.")
    if base is None:
        st.info("Fix the training settings above first.")
        return
    left, middle, right, last = st.columns(4)
    n_trials = left.number_input("Trials", value=hpo.DEFAULT_TRIALS, step=1, key="hpo_trials")
    parallel = middle.number_input("In parallel", value=2, step=1, key="hpo_parallel")
    epochs = right.number_input("Epochs per trial", value=trial_epochs(base), step=1, key=f"hpo_epochs_{base['mode']}")
    full_epochs = last.number_input("Epochs of the full training", value=int(base["epochs"]), step=1,
                                    key=f"hpo_full_epochs_{base['mode']}")
    params = search_params(base, n_trials, parallel, epochs, full_epochs)
    problems = hpo.search_problems(params, facts["n_train"], on_gpu)
    allowed, why = hpo.parallel_trials(int(max(parallel, 1)), "cuda" if on_gpu and base["device"] != "cpu" else "cpu")
    if why:
        st.caption(f"{allowed} trial(s) at a time here: {why}.")
    if problems:
        st.error("**This search cannot run:**\n" + "\n".join(f"- {p}" for p in problems))
        return
    if st.button("Launch the search", key="hpo_launch", **refusal("train")):
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

if st.session_state.get("train_launched"):
    st.toast(f"Job {st.session_state.pop('train_launched')} queued: its progress shows under Jobs.")
    st.html(SCROLL_TO_JOBS, unsafe_allow_javascript=True)

st.subheader("Jobs")
st.session_state["train_page_active_ids"] = tuple(job.id for job in jobs.list_jobs(jobs.ACTIVE))
st.fragment(live_jobs, run_every=REFRESH_S if st.session_state["train_page_active_ids"] else IDLE_REFRESH_S)()

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
        kind, launch_params = "train", base_params
        where = st.radio("Where", ["This machine", "SageMaker"], horizontal=True, key="train_target",
                         help="SageMaker: a training job on your AWS account's instances; this app's worker polls "
                              "its progress and fetches the model when it is done.")
        if where == "SageMaker" and base_params is not None:
            kind, launch_params = "sagemaker", sagemaker_form(base_params)
        refused = current_user().why_not("train")
        if refused:
            st.caption(refused)
        if st.button("Launch training", type="primary", disabled=launch_params is None or refused is not None,
                     key="train_launch", help=refused):
            launch(kind, launch_params)
            st.rerun()

st.subheader("Runs")
runs_section()

if facts is not None and facts["n_train"] > 0:
    with st.expander("Hyperparameter search", icon=":material/tune:", expanded=bool(jobs.list_jobs(kind="hpo", limit=1))):
        search_form(base_params, facts, on_gpu)
        searches = [j for j in jobs.list_jobs(kind="hpo", limit=3) if not j.active]
        for job in searches:
            st.markdown(f"**Search job {job.id}** · {job.status} · {params_summary(job.params)}")
            if job.status == "failed":
                st.error(job.error)
            search_results(job)
