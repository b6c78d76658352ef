"""Scoring models: metrics, per-photo evaluation results, the prediction cache and report export."""
