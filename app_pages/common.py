"""UI pieces every page shares: who is signed in, the sidebar (dataset, class range) and the cached current dataset."""
from __future__ import annotations

import os
from dataclasses import astuple
from pathlib import Path

import streamlit as st
from streamlit.errors import StreamlitSecretNotFoundError

from core import config
from core.access import LOCAL_USER, PathRefused, User, allowed_path, role_for
from core.data.classes import ClassRange
from core.data.dataset import Dataset, DatasetError
from core.data.photos.images import ImageError, thumbnail
from core.data.layouts.registry import load_dataset


@st.cache_resource(show_spinner=False, max_entries=4)
def _cached_dataset(source: str | None, range_tuple: tuple, token: str) -> tuple[Dataset, str]:
    """The dataset read from its folder (through its index cache), with the labels' state it was read with."""
    from core.data.labels import annotations

    class_range = ClassRange(*range_tuple)
    progress = st.progress(0.0, text="Preparing the dataset…")
    try:
        labels = annotations.state()
        return load_dataset(source, class_range,
                            on_progress=lambda f, text: progress.progress(min(f, 1.0), text=text)), labels
    finally:
        progress.empty()


@st.cache_resource(show_spinner=False, max_entries=2)
def _labelled_dataset(source: str | None, range_tuple: tuple, token: str, labels: str) -> Dataset:
    """The dataset with the labels as they are now: a decision relabels the loaded index (~2 s at 536 K photos)
    instead of reading the folder again (~12 s)."""
    from core.data.layouts.base import relabelled

    loaded, loaded_labels = _cached_dataset(source, range_tuple, token)
    if loaded_labels == labels:
        return loaded
    found = relabelled(loaded)
    if found is not None:
        return found
    _cached_dataset.clear()  # (a dataset that keeps no index is read again)
    return _cached_dataset(source, range_tuple, token)[0]


def _freshness_token(source: str | None) -> str:
    """Changes whenever the index or the split may have changed, so the dataset is read again; label changes
    relabel it (_labelled_dataset), and other writes to the database, such as a job's progress, leave it."""
    home = config.home()
    parts = []
    for path in [home / "index", home / "datasets", config.demo_dir()] + ([Path(source)] if source else []):
        try:
            parts.append(str(path.stat().st_mtime_ns))
        except OSError:
            parts.append("-")
    for sub in ("bin-images", "metadata", "labels.csv"):
        if source:
            try:
                parts.append(str((Path(source) / sub).stat().st_mtime_ns))
            except OSError:
                pass
    return ":".join(parts)


def view_key(dataset: Dataset, *folders: Path) -> tuple:
    """What a view made from the loaded dataset depends on, to keep it in st.cache_resource: the dataset as loaded
    (its identity and its labels' state: a decision relabels it), and the folders its saved results are written to
    (a result is written beside and renamed in, so the folder's time changes)."""
    from core.data.labels import annotations

    stamps = []
    for folder in folders:
        try:
            stamps.append(folder.stat().st_mtime_ns)
        except OSError:
            stamps.append(0)
    return (str(config.home()), dataset.key, id(dataset), annotations.state(), *stamps)


@st.cache_resource(show_spinner=False, max_entries=4)
def _cached_label_issues(key: tuple, _dataset):
    from core.evaluation.label_issues import current_label_issues

    return current_label_issues(_dataset)


def label_issues_of(dataset: Dataset):
    """current_label_issues, read once while the loaded dataset, the decisions and the saved checks stay the same
    (at 536 K photos reading and keying them takes ~2 s, and every review page needs them on every run)."""
    return _cached_label_issues(view_key(dataset, config.home() / "label_issues" / dataset.key), dataset)


@st.cache_resource(show_spinner="Loading the model…", max_entries=4)
def _cached_model(model_path: str, stamp: str):
    from core.models.networks import load_model

    return load_model(model_path)


def _version(model_path: str | Path) -> str:
    stat = Path(model_path).stat()
    return f"{stat.st_mtime_ns}:{stat.st_size}"


def model_for(model_path: str | Path):
    """(model, meta) for a model.pt, loaded once per version of the file and shared by every page."""
    return _cached_model(str(model_path), _version(model_path))


@st.cache_resource(show_spinner="Preparing the model for fast prediction…", max_entries=4)
def _cached_predictor(model_path: str, stamp: str, precision: str):
    from core.models.engines import load_predictor

    # OpenVINO or ONNX Runtime on a CPU (exported once, checked against PyTorch), else PyTorch
    return load_predictor(model_path, precision=precision)


def predictor_for(model_path: str | Path, precision: str = "fp32"):
    """(predictor, meta) for prediction only: the fastest engine for this model file, loaded once per version."""
    return _cached_predictor(str(model_path), _version(model_path), precision)


@st.cache_data(show_spinner=False, max_entries=2000)
def cached_thumbnail(path: str, width: int = 240, height: int = 180) -> bytes | str:
    """The photo upright, letterboxed to width×height as JPEG bytes, or the reason it cannot be shown."""
    try:
        return thumbnail(path, width, height)
    except ImageError as exc:
        return str(exc)


def current_user() -> User:
    """Who uses this session. With sign-in configured (st.login's [auth] secrets, or a proxy's trusted header) the
    signed-in email with its role from the secrets' [roles] table; a signed-out visitor is asked to log in and the
    page stops. Without sign-in: one local user who may do everything."""
    info = st.user.to_dict()
    proxied = bool(st.get_option("server.trustedUserHeaders"))
    if "is_logged_in" not in info and not proxied:
        return User(LOCAL_USER)
    if info.get("is_logged_in") is False or not (info.get("email") or info.get("name") or info.get("sub")):
        st.info("Log in to use Binsight: what you may do depends on your role.")
        if not proxied:
            st.button("Log in", on_click=st.login, type="primary", key="login_button")
        st.stop()
    email = info.get("email")
    return User(str(email or info.get("name") or info.get("sub")), role_for(email, roles_table()))


ANNOTATOR_COOKIE = "binsight_annotator"


def remembered_annotator() -> str:
    """The reviewer name this browser gave before, without sign-in: this session's, the link's ?annotator=, else
    the one kept in a cookie (so a reload does not ask again); "" when none."""
    from urllib.parse import unquote

    cookie = st.context.cookies.get(ANNOTATOR_COOKIE, "")
    name = (st.session_state.get("annotator") or st.query_params.get("annotator", "")
            or (unquote(cookie) if isinstance(cookie, str) else ""))  # (a test harness has no cookies)
    name = str(name).strip()
    if name:
        remember_annotator(name)
    return name


def remember_annotator(name: str) -> None:
    """Keep the reviewer name for this session, in the address and, for a year, in this browser's cookie."""
    import json

    name = name.strip()
    st.session_state["annotator"] = name
    if st.query_params.get("annotator") != name:
        st.query_params["annotator"] = name
    if st.session_state.get("annotator_cookie") != name:
        st.session_state["annotator_cookie"] = name
        st.html(f"<script>document.cookie = '{ANNOTATOR_COOKIE}=' + encodeURIComponent({json.dumps(name)}) + "
                "'; path=/; max-age=31536000; SameSite=Lax';</script>", unsafe_allow_javascript=True)


def roles_table() -> dict | None:
    """The secrets' [roles] table (role → emails), None without one: every signed-in user is then a viewer."""
    try:
        return st.secrets.get("roles")
    except StreamlitSecretNotFoundError:
        return None


def checked_path(typed: str) -> Path | None:
    """The typed path when the app may open it, else None after showing why (nothing else should happen then)."""
    try:
        return allowed_path(typed)
    except PathRefused as exc:
        st.error(f"**This path cannot be used.** {exc}")
        return None


def class_range() -> ClassRange:
    return ClassRange.from_dict(config.load_settings().get("class_range"))


def current_source() -> str | None:
    chosen = config.data_dir()
    return str(chosen) if chosen else None


def current_dataset() -> Dataset | None:
    """The dataset chosen in the sidebar (the demo set when none), or None after showing why it failed."""
    source = current_source()
    try:
        from core.data.labels import annotations

        return _labelled_dataset(source, astuple(class_range()), _freshness_token(source), annotations.state())
    except DatasetError as exc:
        st.error(f"**The dataset cannot be used.** {exc}")
        st.info("Pick another folder in the sidebar, or clear the path to use the demo set.")
        return None


def reload_dataset() -> None:
    _cached_dataset.clear()
    _labelled_dataset.clear()


def who_is_here(user: User) -> None:
    if user.signed_in:
        st.caption(f":material/person: **{user.name}** · role **{user.role}**")
        st.button("Log out", on_click=st.logout, key="sidebar_logout")
    else:
        st.caption(":material/person: Single local user: sign-in is not configured — anyone who opens this app may "
                   "do everything.")


def sidebar() -> None:
    """Who is signed in, the dataset choice and class range (persisted in BINSIGHT_HOME/settings.json)."""
    user = current_user()
    refused = user.why_not("change_dataset")
    with st.sidebar:
        st.markdown("### :material/inventory_2: Binsight")
        who_is_here(user)
        locked = bool(os.environ.get("BINSIGHT_DATA")) or refused is not None
        source = current_source()
        st.caption("Dataset: " + (f"`{source}`" if source else "embedded demo set"))
        with st.expander("Change dataset", expanded=False):
            if refused:
                st.caption(refused)
            elif locked:
                st.caption("Set by the BINSIGHT_DATA environment variable.")
            path = st.text_input(
                "Folder (ABID layout, ImageFolder) or a .json list", value=source or "", disabled=locked, help=refused,
                placeholder="e.g. /data/abid — empty for the demo set", key="sidebar_data_path",
            )
            if st.button("Use this dataset", disabled=locked, key="sidebar_apply", help=refused) and not locked:
                chosen = path.strip()
                allowed = checked_path(chosen) if chosen else None
                if chosen and allowed is None:
                    pass  # refused: checked_path said why
                elif allowed is not None and not allowed.exists():
                    st.error(f"{chosen} does not exist.")
                else:
                    config.save_settings(data_dir=str(allowed) if allowed else None)
                    reload_dataset()
                    st.rerun()
        with st.expander("Class range", expanded=False):
            current = class_range()
            if refused:
                st.caption(refused)
            lo, hi = st.slider("Counts that are classes", 0, 12, (current.lo, current.hi), key="sidebar_range",
                               disabled=refused is not None, help=refused)
            bucket = st.checkbox(f"Put counts above {hi} into a “{hi}+” class", value=current.top_bucket,
                                 key="sidebar_bucket", disabled=refused is not None, help=refused)
            chosen_range = ClassRange(lo, hi, bucket)
            if chosen_range != current and user.can("change_dataset") and st.button("Apply class range",
                                                                                   key="sidebar_range_apply"):
                config.save_settings(class_range=chosen_range.to_dict())
                reload_dataset()
                st.rerun()


@st.fragment(run_every=2)
def training_progress(job_id: int) -> None:
    """A background training's progress bar, refreshed; the page is drawn again when it ends."""
    from core.jobs import queue as jobs
    from core.jobs.demo import DEMO_USER

    job = jobs.get(job_id)
    if not job.active:
        st.rerun(scope="app")  # finished: draw the page again, with the new model or the failure
    progress = job.progress or {}
    fraction = min(max(float(progress.get("fraction") or 0.0), 0.0), 1.0)
    text = progress.get("message") or ("Waiting for a worker…" if job.status == "queued" else "Training…")
    if job.user == DEMO_USER:
        st.info("**A small demo model is training** on the demo set (about a minute): this page shows its "
                "results as soon as it is done. Train your own on the **Train** page.",
                icon=":material/model_training:")
    st.progress(fraction, text=f"Training job {job.id}: {text}")
    st.caption("It runs in the background: you can leave this page and come back.")
