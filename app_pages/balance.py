"""Balance page: classes per split, candidate pools, a strategy's preview, and Apply → a new dataset version."""
import os
from dataclasses import astuple, replace
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from app_pages.common import checked_path, current_dataset, current_user, reload_dataset
from core import config
from core.data.curation import balancing, pools
from core.data.labels import versions
from core.data.dataset import DatasetError
from core.data.overview import SPLIT_COLOURS
from core.data.remote.s3 import S3Error, S3Settings, S3Source, endpoint_problem, s3_settings, save_s3_settings
from core.jobs import queue as jobs
from core.jobs import worker


@st.cache_resource(show_spinner="Reading the candidate pool…", max_entries=4)
def _pool(kind: str, paths: tuple[str, ...], token: str, settings: tuple) -> pools.Pool:
    if kind == "folder":
        return pools.folder_pool(paths[0])
    return pools.list_pool(list(paths), S3Source(S3Settings(*settings)))


def _token(paths) -> str:
    stamps = []
    for path in paths:
        try:
            stamps.append(str(Path(path).stat().st_mtime_ns))
        except OSError:
            stamps.append("-")
    return ":".join(stamps)


def _train_ratio(table: pd.DataFrame) -> str:
    train = table[(table["split"] == "train") & (table["effective"] > 0)]["effective"]
    return f"{train.max() / train.min():.1f}×" if len(train) else "—"


def _distribution_chart(table: pd.DataFrame, title: str):
    figure = px.bar(table, x="class_name", y="effective", color="split", barmode="group", title=title,
                    labels={"class_name": "object count (class)", "effective": "photos per epoch"},
                    category_orders={"split": balancing.SPLIT_ORDER}, color_discrete_map=SPLIT_COLOURS,
                    hover_data={"photos": True})
    st.plotly_chart(figure, width="stretch")


st.title("Balance")
done = st.session_state.pop("balance_done", None)
if done:
    st.success(f"Saved version **{done['name']}**. Train on it with `python -m core train --data {done['path']}`, "
               "or make it the current dataset below. The previous version is kept.")

dataset = current_dataset()
if dataset is None:
    st.stop()
for note in dataset.notes:
    st.warning(note)
if dataset.version:
    info = dataset.split_info
    st.info(f"This is version **{info.get('version')}** ({info.get('strategy')}) of `{info.get('base_source')}`. "
            "Balancing it makes another version.")

# -- versions ------------------------------------------------------------------------------------------
saved = versions.list_versions(dataset)
with st.expander(f"Versions of this dataset ({len(saved)})", expanded=bool(saved)):
    if not saved:
        st.caption("None yet: apply a strategy below to make one. The original dataset is never changed.")
    else:
        st.dataframe(pd.DataFrame([{
            "version": v.name, "created": v.created, "made by": v.user, "strategy": v.strategy,
            "made from": v.info.get("parent") or "original",
            **{split: v.info.get("photos", {}).get(split, 0) for split in balancing.SPLIT_ORDER},
            "manifest": str(v.path),
        } for v in saved]), hide_index=True, width="stretch")
        options = ["original"] + [v.name for v in saved]
        current = dataset.version or "original"
        chosen = st.selectbox("Dataset to work and train on", options, index=options.index(current)
                              if current in options else 0, key="balance_use_version")
        refused = current_user().why_not("change_dataset")
        locked = bool(os.environ.get("BINSIGHT_DATA")) or refused is not None
        if refused:
            st.caption(refused)
        elif locked:
            st.caption("The dataset is fixed by the BINSIGHT_DATA variable; to train on a version, pass its "
                       "manifest path as `--data` or set BINSIGHT_DATA to it.")
        if chosen != current and st.button("Use it as the current dataset", key="balance_use", disabled=locked,
                                           help=refused) and not locked:
            if chosen == "original":
                original = dataset.split_info.get("base_source")
                demo = str(config.demo_dir())
                config.save_settings(data_dir=None if original == demo else original)
            else:
                config.save_settings(data_dir=str(next(v.path for v in saved if v.name == chosen)))
            reload_dataset()
            st.rerun()

# -- shards ---------------------------------------------------------------------------------------------
@st.fragment(run_every=2)
def packing_progress(job_id: int) -> None:
    job = jobs.get(job_id)
    progress = job.progress or {}
    if job.active:
        st.progress(min(max(float(progress.get("fraction") or 0.0), 0.0), 1.0),
                    text=f"Packing job {job.id}: {progress.get('message') or 'waiting for a worker…'}")
    elif job.status == "done":
        st.success(f"Packed: {progress.get('message', '')}. Train from it with `python -m core train --data "
                   f"{job.params['dest']}`, or send it to SageMaker from the Train page.")
    else:
        st.error(f"Packing job {job.id} {job.status}: {job.error}. Packing again resumes after the finished shards.")


with st.expander("Pack as WebDataset shards (to train at bucket scale, here or on SageMaker)"):
    st.caption("Each photo's original bytes, its metadata and its count go into tar shards per split (train-000000.tar, "
               "valid-…, test-…) with a shards.json index; the split is kept. A stopped packing resumes.")
    c1, c2 = st.columns([3, 1])
    dest = c1.text_input("Destination: a folder on this server, or s3://bucket/prefix", key="shards_dest").strip()
    size = c2.selectbox("Shard size", ["50MB", "200MB", "1GB"], index=1, key="shards_size")
    pack_refused = current_user().why_not("balance")
    if st.button("Pack in the background", key="shards_pack", disabled=not dest or pack_refused is not None,
                 help=pack_refused) and not pack_refused:
        target = dest if dest.startswith("s3://") else checked_path(dest)
        if target is not None:
            job = worker.launch("shards", {"data": dataset.location, "dest": str(target), "shard_size": size,
                                           "seed": 0, "device": "cpu"}, user=current_user().name)
            st.session_state["shards_job"] = job.id
    if st.session_state.get("shards_job"):
        packing_progress(st.session_state["shards_job"])

# -- current distribution ---------------------------------------------------------------------------------
before = balancing.current_distribution(dataset)
if before["photos"].sum() == 0:
    st.error("No usable labelled photo falls inside the class range: there is nothing to balance.")
    st.stop()
left, right = st.columns([3, 1])
with left:
    _distribution_chart(before, "Now: photos per class and split")
with right:
    st.metric("Train imbalance", _train_ratio(before), help="largest ÷ smallest class in the train split, per epoch")
    st.caption("The test split is never touched by balancing, so every version is tested on the same photos.")

# -- strategy -----------------------------------------------------------------------------------------
st.subheader("Strategy")
strategy = st.radio("How to balance", list(balancing.STRATEGIES), format_func=balancing.STRATEGIES.get,
                    key="balance_strategy", horizontal=True)
params: dict = {}
train_sizes = before[before["split"] == "train"].set_index("cls")["photos"]
if strategy == "fetch":
    kind = st.radio("Candidate pool", ["bucket", "folder"], horizontal=True, key="balance_pool_kind",
                    format_func={"bucket": "S3 bucket (a photo list)", "folder": "Local folder"}.get)
    pool = None
    folder_refused = current_user().why_not("open_folder")
    if folder_refused:
        st.caption(folder_refused)
    try:
        if kind == "bucket":
            settings = s3_settings()
            with st.expander(f"S3 connection: {settings.describe()}"):
                c1, c2, c3 = st.columns(3)
                bucket = c1.text_input("Bucket", settings.bucket, key="balance_s3_bucket")
                endpoint = c2.text_input("Endpoint URL (S3-compatible servers)", settings.endpoint_url or "",
                                         placeholder="empty for AWS", key="balance_s3_endpoint")
                region = c3.text_input("Region", settings.region, key="balance_s3_region")
                st.caption("Credentials come from BINSIGHT_S3_ACCESS_KEY_ID / BINSIGHT_S3_SECRET_ACCESS_KEY (or the "
                           "usual AWS variables and ~/.aws); the public ABID bucket needs none.")
                edited = replace(settings, bucket=bucket.strip() or settings.bucket,
                                 endpoint_url=endpoint.strip() or None, region=region.strip() or "us-east-1")
                b1, b2 = st.columns(2)
                if b1.button("Save connection", key="balance_s3_save", disabled=folder_refused is not None,
                             help=folder_refused) and not folder_refused:
                    problem = endpoint_problem(edited.endpoint_url)
                    if problem:
                        st.error(problem)
                    else:
                        save_s3_settings(edited)
                        st.rerun()
                if b2.button("Check connection", key="balance_s3_check"):
                    try:
                        st.success(S3Source(edited, attempts=1).check())
                    except S3Error as exc:
                        st.error(f"**The S3 server cannot be used.** {exc}")
            lists = st.text_input("Photo list(s) naming bucket photos and their counts: file_list.json and/or "
                                  "counting lists, comma-separated",
                                  config.load_settings().get("balance_pool_lists", ""), key="balance_lists",
                                  disabled=folder_refused is not None, help=folder_refused)
            if folder_refused:  # a disabled widget's value still comes from the browser: use the saved one
                lists = config.load_settings().get("balance_pool_lists", "")
            paths = tuple(p.strip() for p in lists.split(",") if p.strip())
            if paths:
                allowed = [checked_path(p) for p in paths]
                if None in allowed:
                    st.stop()
                paths = tuple(str(p) for p in allowed)
                pool = _pool("bucket", paths, _token(paths), astuple(settings))
                if config.load_settings().get("balance_pool_lists") != lists:
                    config.save_settings(balance_pool_lists=lists)
        else:
            folder = st.text_input("Pool folder (ABID layout or ImageFolder) with photos not in the dataset",
                                   config.load_settings().get("balance_pool_folder", ""), key="balance_pool_folder",
                                   disabled=folder_refused is not None, help=folder_refused)
            if folder_refused:
                folder = config.load_settings().get("balance_pool_folder", "")
            if folder.strip():
                if checked_path(folder) is None:
                    st.stop()
                pool = _pool("folder", (folder.strip(),), _token([folder.strip()]), ())
                if config.load_settings().get("balance_pool_folder") != folder:
                    config.save_settings(balance_pool_folder=folder)
    except (DatasetError, S3Error, OSError) as exc:
        st.error(f"**The candidate pool cannot be used.** {exc}")
        st.stop()
    if pool is None:
        st.info("Give a candidate pool: the bucket photos named by a file_list.json or counting list, or a "
                "local folder of labelled photos. Only photos not yet in the dataset are picked.")
        st.stop()
    available = pools.availability(pool, dataset)
    st.caption(f"Pool: {pool.description} — {len(pool.photos):,} photos, "
               f"{int(available.sum()):,} of them new and in the class range.")
    figure = px.bar(x=[dataset.class_range.name(c) for c in available.index], y=available.to_numpy(),
                    labels={"x": "object count (class)", "y": "new photos available"},
                    title="Candidates per class (not yet in the dataset)")
    st.plotly_chart(figure, width="stretch")
    totals = before[before["split"] != "test"].groupby("cls")["photos"].sum()
    columns = st.columns(len(dataset.classes))
    more = {}
    for column, cls in zip(columns, dataset.classes):
        suggested = int(min(available.get(cls, 0), max(0, totals.max() - totals.get(cls, 0))))
        more[cls] = column.number_input(f"More of class {dataset.class_range.name(cls)}", 0, 1_000_000, suggested,
                                        key=f"balance_more_{cls}")
    valid_fraction = st.number_input("Share of the new photos for validation", 0.0, 0.9,
                                     float(dataset.split_info.get("valid_fraction", 0.2)), step=0.05,
                                     key="balance_valid_fraction")
    params.update(pool=pool, more=more, valid_fraction=valid_fraction)
elif strategy in ("undersample", "oversample"):
    c1, c2 = st.columns(2)
    default = train_sizes[train_sizes > 0].min() if strategy == "undersample" else train_sizes.max()
    params["target"] = c1.number_input("Photos per class (per epoch) in each balanced split", 1, 1_000_000,
                                       int(default or 1), key="balance_target")
    params["splits"] = c2.multiselect("Splits to balance (never test)", ["train", "valid"], ["train"],
                                      key="balance_splits")
else:
    st.caption("The photos stay as they are; training uses the stored per-class weights "
               f"(`--balance {'sampler' if strategy == 'sampler' else 'weights'}`).")
params["seed"] = st.number_input("Seed", 0, 1_000_000, 0, key="balance_seed")

# -- preview ------------------------------------------------------------------------------------------
try:
    plan = balancing.preview(dataset, strategy, params)
except balancing.BalanceError as exc:
    st.error(str(exc))
    st.stop()
st.subheader("Preview")
comparison = pd.concat([plan.before.assign(when="now"), plan.after.assign(when="after")], ignore_index=True)
figure = px.bar(comparison, x="class_name", y="effective", color="when", barmode="group", facet_col="split",
                category_orders={"split": balancing.SPLIT_ORDER, "when": ["now", "after"]},
                labels={"class_name": "class", "effective": "photos per epoch"}, hover_data={"photos": True},
                color_discrete_map={"now": "#bbbbbb", "after": "#e07b00"})
figure.update_xaxes(type="category")
figure.for_each_annotation(lambda label: label.update(text=label.text.split("=")[-1]))
st.plotly_chart(figure, width="stretch")
m1, m2 = st.columns(2)
m1.metric("Train imbalance after", _train_ratio(plan.after), help="largest ÷ smallest class, per epoch")
added = int(plan.after["photos"].sum() - plan.before["photos"].sum())
m2.metric("Photos added (+) or left out (−)", f"{added:+,}")
for note in plan.notes:
    st.info(note)

# -- apply --------------------------------------------------------------------------------------------
name_key = f"balance_name_{strategy}"
if name_key not in st.session_state:  # set once, so the suggested name does not change under the user
    st.session_state[name_key] = versions.default_name(strategy)
name = st.text_input("Name of the new version", key=name_key)
refused = current_user().why_not("balance")
if refused:
    st.caption(refused)
if st.button("Apply: save as a new version", type="primary", key="balance_apply", disabled=refused is not None,
             help=refused) and not refused:
    problem = versions.check_name(versions.root_key(dataset), name.strip())
    if problem:
        st.error(problem)
        st.stop()
    progress = st.progress(0.0, text="Preparing…")
    try:
        version = balancing.apply(dataset, strategy, params, name=name.strip(), user=current_user().name,
                                  on_progress=lambda f, text: progress.progress(min(float(f), 1.0), text=text))
    except S3Error as exc:
        progress.empty()
        st.error(f"**The photos could not be fetched; no version was made.** {exc}")
        st.stop()
    except (balancing.BalanceError, DatasetError, OSError) as exc:
        progress.empty()
        st.error(f"**No version was made.** {exc}")
        st.stop()
    st.session_state["balance_done"] = {"name": version.name, "path": str(version.path)}
    del st.session_state[name_key]  # the next version gets a fresh suggested name
    st.rerun()
