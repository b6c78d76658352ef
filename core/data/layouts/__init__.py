"""Layouts: one reader per way a dataset is laid out, and the ordered registry that load_dataset walks."""
