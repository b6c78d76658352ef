"""Datasets: what a dataset is (here), and rooms for its photos, labels, remote stores, layout readers and curation."""
