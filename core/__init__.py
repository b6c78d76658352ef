"""Binsight core library: data, models, training, jobs, metrics and storage (no Streamlit here)."""
