"""Datasets: the ABID formats, photos, the index, splits, versions, balancing, pools, S3 and the label store."""
