"""Spot-checking: which bins to check next, ranked with the current model's predictions."""
