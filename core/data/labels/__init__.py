"""Labels: the ABID label formats, splits, the annotation store and saved dataset versions."""
