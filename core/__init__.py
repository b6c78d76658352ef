"""Binsight core library: data, models, training, jobs, metrics and storage (no Streamlit here)."""
from core.allocator import keep_freed_memory

keep_freed_memory()
