"""Binsight: the Streamlit entry point — st.navigation over app_pages/ and the shared sidebar.

The pages live in app_pages/, not pages/: Streamlit treats a pages/ folder beside the entry point as its legacy
multipage app until st.navigation first runs, so a fresh server opened on a deep link would run that page alone.
"""
import os

# Torch's OpenMP threads spin while waiting; beside a training job on the same cores that makes a single
# prediction in the app ~50× slower. Passive waiting costs nothing measurable when the app is alone.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import streamlit as st  # noqa: E402

from app_pages.common import current_dataset, current_user, sidebar  # noqa: E402
from core.jobs import demo, worker  # noqa: E402

st.set_page_config(page_title="Binsight", page_icon="📦", layout="wide")

PAGES = {
    "Data": [
        st.Page("app_pages/overview.py", title="Overview", icon=":material/bar_chart:", default=True),
        st.Page("app_pages/browse.py", title="Browse", icon=":material/photo_library:"),
        st.Page("app_pages/health.py", title="Data health", icon=":material/health_and_safety:"),
        st.Page("app_pages/balance.py", title="Balance", icon=":material/balance:"),
    ],
    "Model": [
        st.Page("app_pages/train.py", title="Train", icon=":material/model_training:"),
        st.Page("app_pages/evaluate.py", title="Evaluate", icon=":material/target:"),
        st.Page("app_pages/predict.py", title="Predict", icon=":material/online_prediction:"),
    ],
    "Review": [
        st.Page("app_pages/spot_check.py", title="Spot-check", icon=":material/fact_check:"),
    ],
}

if "workers_checked" not in st.session_state:
    # Jobs queued before an app restart start now, whichever page the user opens first.
    worker.ensure_workers()
    st.session_state.workers_checked = True
    if demo.wanted():  # a first start on the demo set trains a small model, so Evaluate and Predict show something
        demo_set = current_dataset()
        if demo_set is not None:
            demo.start_demo_training(demo_set)

if not current_user().can("spot_check"):  # a viewer would only see why they may not
    del PAGES["Review"]

page = st.navigation(PAGES)
sidebar()
page.run()
