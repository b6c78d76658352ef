"""Seed ensembles of partial fine-tunes as one network: one frozen trunk, each member's trained tail and head, their
probabilities averaged (the output is the log of the mean probability, so a temperature calibrates it like logits)."""
from __future__ import annotations

import math

import torch
from torch import nn

from core.models.stages import Tail, Trunk


class EnsembleBackbone(nn.Module):
    """Photo → the members' feature vectors side by side. The stages up to the cut are frozen and the same in every
    member, so they run once (member 1's); each member's own stages after the cut run on that map."""

    def __init__(self, members: list[nn.Module], cut: str):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.cut = cut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = Trunk(self.members[0], self.cut)(x)
        return torch.cat([Tail(member, self.cut)(shared) for member in self.members], 1)


class EnsembleHead(nn.Module):
    """The members' heads, each on its own part of the features; log of their mean class probabilities."""

    def __init__(self, heads: list[nn.Module], feature_dim: int):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.feature_dim = feature_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        parts = features.split(self.feature_dim, 1)
        log_probs = torch.stack([head(part).float().log_softmax(1) for head, part in zip(self.heads, parts)])
        return torch.logsumexp(log_probs, 0) - math.log(len(self.heads))


def ensemble_parts(backbones: list[nn.Module], heads: list[nn.Module], cut: str, feature_dim: int):
    """(backbone, head) of the ensemble of these members."""
    return EnsembleBackbone(backbones, cut), EnsembleHead(heads, feature_dim)
