"""Seed ensembles of partial fine-tunes as one network: one frozen trunk per backbone, each member's trained tail and
head, their probabilities averaged (the output is the log of the mean probability, so a temperature calibrates it like
logits)."""
from __future__ import annotations

import math

import torch
from torch import nn

from core.models.stages import Tail, Trunk


class EnsembleBackbone(nn.Module):
    """Photo → the members' feature vectors side by side. The stages up to the cut are frozen and the same in every
    member of a backbone, so they run once per backbone (its first member's); each member's own stages after the cut
    run on that map. `kinds` names each member's backbone (members of one backbone when None)."""

    def __init__(self, members: list[nn.Module], cut: str, kinds: list[str] | None = None):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.cut = cut
        kinds = kinds or [""] * len(members)
        self.trunk_of = [kinds.index(kind) for kind in kinds]  # the member whose trunk each member reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = {first: Trunk(self.members[first], self.cut)(x) for first in dict.fromkeys(self.trunk_of)}
        return torch.cat([Tail(member, self.cut)(shared[first]) for member, first in zip(self.members, self.trunk_of)],
                         1)


class EnsembleHead(nn.Module):
    """The members' heads, each on its own part of the features; log of their mean class probabilities."""

    def __init__(self, heads: list[nn.Module], feature_dims: list[int]):
        super().__init__()
        self.heads = nn.ModuleList(heads)
        self.feature_dims = list(feature_dims)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        parts = features.split(self.feature_dims, 1)
        log_probs = torch.stack([head(part).float().log_softmax(1) for head, part in zip(self.heads, parts)])
        return torch.logsumexp(log_probs, 0) - math.log(len(self.heads))


def ensemble_parts(backbones: list[nn.Module], heads: list[nn.Module], cut: str, feature_dims: list[int],
                   kinds: list[str] | None = None):
    """(backbone, head) of the ensemble of these members (`kinds`: each member's backbone name, when they differ)."""
    return EnsembleBackbone(backbones, cut, kinds), EnsembleHead(heads, feature_dims)
