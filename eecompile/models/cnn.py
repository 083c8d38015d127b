"""Tiny ResNet-style CNN for ``image [batch, 3, 16, 16]`` -> ``logits [batch, 10]``.

stem: Conv3x3(3->8) -> BN -> ReLU -> MaxPool2d(2)
block1: BasicBlock(8->8, stride 1, identity skip)
block2: BasicBlock(8->16, stride 2, 1x1 conv + BN projection skip)
head: AdaptiveAvgPool2d(1) -> flatten -> Linear(16, 10)
"""

from __future__ import annotations

import torch
from torch import nn

CONFIG: dict[str, int] = {
    "in_channels": 3,
    "image_size": 16,
    "stem_channels": 8,
    "channels": 16,
    "num_classes": 10,
}


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """ResNet basic block: Conv-BN-ReLU-Conv-BN plus (identity or projection) skip, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, cout, stride)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = _conv3x3(cout, cout)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(cout),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the residual block."""
        h = torch.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return torch.relu(h + self.shortcut(x))


class TinyResNet(nn.Module):
    """A two-block ResNet small enough for unit tests."""

    def __init__(self, config: dict[str, int] | None = None) -> None:
        super().__init__()
        cfg = dict(CONFIG if config is None else config)
        c0, c1 = cfg["stem_channels"], cfg["channels"]
        self.conv1 = _conv3x3(cfg["in_channels"], c0)
        self.bn1 = nn.BatchNorm2d(c0)
        self.pool = nn.MaxPool2d(2)
        self.layer1 = BasicBlock(c0, c0, stride=1)
        self.layer2 = BasicBlock(c0, c1, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c1, cfg["num_classes"])

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """Map ``image [batch, 3, H, W]`` to ``logits [batch, num_classes]``."""
        h = self.pool(torch.relu(self.bn1(self.conv1(image))))
        h = self.layer2(self.layer1(h))
        h = torch.flatten(self.avgpool(h), 1)
        return self.fc(h)
