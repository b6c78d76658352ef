"""A backbone cut at one of its stages: the trunk (photo → stage map, kept frozen) and the tail (map → features, the
part partial fine-tuning trains), sharing the backbone's own modules."""
from __future__ import annotations

import torch
from torch import nn

from core.errors import BinsightError

# The stage-map store keeps the stride-16 map after blocks.4: later cuts are a cheap forward from there, and it is the
# stage the multilevel features (label issues) read. (The cuts a training may choose: core.training.config.CUTS.)
STORE_CUT = "blocks.4"


class CutError(BinsightError):
    """A backbone that cannot be cut where asked; the message says where it can."""


def _net_and_taps(backbone: nn.Module):
    """(the timm network, the multilevel taps' stage steps or None for the pooled last layer)."""
    if hasattr(backbone, "taps"):  # a MultiLevelBackbone (core.models.networks), which reads several stages
        if backbone.family != "timm":
            raise CutError("partial fine-tuning reads the EfficientNet-Lite stages: choose efficientnet_lite0, 1 or 2")
        return backbone.net, backbone
    if not hasattr(backbone, "blocks") or not hasattr(backbone, "conv_stem"):
        raise CutError("partial fine-tuning reads the EfficientNet-Lite stages: choose efficientnet_lite0, 1 or 2")
    return backbone, None


def block_index(cut: str) -> int:
    """N of "blocks.N"."""
    name, _, number = cut.partition(".")
    if name != "blocks" or not number.isdigit():
        raise CutError(f"unknown cut point {cut!r}: a cut is after a block, e.g. blocks.4")
    return int(number)


class Trunk(nn.Module):
    """The backbone from the photo to the map after block `cut` (the stem and the blocks up to it)."""

    def __init__(self, backbone: nn.Module, cut: str = STORE_CUT):
        super().__init__()
        self.net, _ = _net_and_taps(backbone)
        self.last = block_index(cut)
        if self.last >= len(self.net.blocks):
            raise CutError(f"this backbone ends before {cut}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.net.bn1(self.net.conv_stem(x))
        for i in range(self.last + 1):
            x = self.net.blocks[i](x)
        return x


class Tail(nn.Module):
    """The backbone from the map after block `cut` to its feature vector: what the backbone gives for the photo."""

    def __init__(self, backbone: nn.Module, cut: str = STORE_CUT):
        super().__init__()
        self.net, self.multilevel = _net_and_taps(backbone)
        self.first = block_index(cut) + 1
        if self.multilevel is not None:
            wanted = {stage for stage, _ in self.multilevel.taps}
            tapped = [int(step.split(".")[1]) for step, stage in self.multilevel.steps if stage in wanted]
            if min(tapped) < self.first - 1:
                raise CutError(f"the {self.multilevel.family} multilevel features read {', '.join(sorted(wanted))}, "
                               f"before {cut}: cut at blocks.{min(tapped)} or earlier")

    def blocks_after(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        for i in range(start, stop):
            x = self.net.blocks[i](x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.multilevel is None:
            x = self.blocks_after(x, self.first, len(self.net.blocks))
            return self.net.forward_head(self.net.bn2(self.net.conv_head(x)))
        maps = {}
        for step, stage in self.multilevel.steps:
            index = int(step.split(".")[1])
            if index >= self.first:
                x = self.net.blocks[index](x)
            if stage is not None and index >= self.first - 1:
                maps[stage] = x
        return self.multilevel.pool(maps)

    def trained_parameters(self):
        """The parameters partial fine-tuning trains: the blocks after the cut and the last layers."""
        modules = [self.net.blocks[i] for i in range(self.first, len(self.net.blocks))]
        if self.multilevel is None:
            modules += [self.net.conv_head, self.net.bn2]
        return [p for module in modules for p in module.parameters()]

    def trained_modules(self) -> list[nn.Module]:
        modules = [self.net.blocks[i] for i in range(self.first, len(self.net.blocks))]
        return modules + ([self.net.conv_head, self.net.bn2] if self.multilevel is None else [])
