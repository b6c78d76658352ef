"""Counting networks with pretrained backbones, photo preprocessing, the feature cache and batched inference."""
