"""Binsight's pages: thin Streamlit UI over core."""
