"""Binsight: the Streamlit entry point — navigation over pages/ and the shared sidebar."""
import streamlit as st

from pages.common import sidebar

st.set_page_config(page_title="Binsight", page_icon="📦", layout="wide")

PAGES = {
    "Data": [
        st.Page("pages/overview.py", title="Overview", icon="📊", default=True),
        st.Page("pages/browse.py", title="Browse", icon="🖼️"),
        st.Page("pages/balance.py", title="Balance", icon="⚖️"),
    ],
    "Model": [
        st.Page("pages/train.py", title="Train", icon="🏋️"),
        st.Page("pages/evaluate.py", title="Evaluate", icon="🎯"),
        st.Page("pages/predict.py", title="Predict", icon="🔮"),
    ],
    "Review": [
        st.Page("pages/spot_check.py", title="Spot-check", icon="✅"),
    ],
}

page = st.navigation(PAGES)
sidebar()
page.run()
