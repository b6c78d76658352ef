"""Losses and class balancing for counting: cross-entropy with a count-aware (EMD) term, class weights, a sampler."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class CountLoss(nn.Module):
    """Cross-entropy (class weights, label smoothing), plus for 'emd' the squared earth mover's distance.

    EMD compares cumulative distributions over the ordered counts, so predicting 4 for a 5 costs less than
    predicting 1: the loss knows that counts are ordinal while the output stays a softmax over classes.
    """

    def __init__(self, kind: str = "ce", weight=None, label_smoothing: float = 0.0, emd_weight: float = 1.0):
        super().__init__()
        self.kind = kind
        self.emd_weight = emd_weight
        self.ce = nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)
        self.register_buffer("weight", weight if weight is not None else torch.ones(0))

    def forward(self, logits, target):
        loss = self.ce(logits, target)
        if self.kind == "emd":
            probs = logits.float().softmax(1)
            truth = nn.functional.one_hot(target, logits.shape[1]).float()
            emd = ((probs.cumsum(1) - truth.cumsum(1)) ** 2).sum(1)
            if self.weight.numel():
                w = self.weight[target]
                emd = (emd * w).sum() / w.sum()
            else:
                emd = emd.mean()
            loss = loss + self.emd_weight * emd
        return loss


def class_weights(labels: np.ndarray, n_classes: int) -> torch.Tensor:
    """n / (classes × count): every class weighs the same in the loss; absent classes get weight 0."""
    counts = np.bincount(labels, minlength=n_classes).astype(np.float64)
    weights = np.where(counts > 0, len(labels) / (n_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def balanced_sampler(labels: np.ndarray, generator: torch.Generator) -> torch.utils.data.Sampler:
    counts = np.bincount(labels)
    per_photo = 1.0 / counts[labels]
    return torch.utils.data.WeightedRandomSampler(torch.as_tensor(per_photo, dtype=torch.double), len(labels),
                                                  replacement=True, generator=generator)
