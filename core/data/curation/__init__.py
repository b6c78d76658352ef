"""Curation: growing a dataset from candidate pools and balancing it into a saved version."""
