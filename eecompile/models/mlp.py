"""Tiny multilayer perceptrons: ``mlp``, ``mlp_softmax`` and ``mlp_argmax``.

``x [batch, 16] -> Linear(16,32) -> LayerNorm(32) -> GELU(erf) -> Linear(32,32) -> ReLU
-> Linear(32,10)`` followed by nothing (``logits``), a softmax (``probs``) or an argmax
(``label``, int64).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

CONFIG: dict[str, int] = {"in_features": 16, "hidden": 32, "num_classes": 10}

Head = Literal["logits", "softmax", "argmax"]


class TinyMLP(nn.Module):
    """Linear -> LayerNorm -> GELU -> Linear -> ReLU -> Linear, with an optional output head."""

    def __init__(self, head: Head = "logits", config: dict[str, int] | None = None) -> None:
        super().__init__()
        cfg = dict(CONFIG if config is None else config)
        if head not in ("logits", "softmax", "argmax"):
            raise ValueError(f"unknown MLP head {head!r}")
        self.head: Head = head
        self.fc1 = nn.Linear(cfg["in_features"], cfg["hidden"])
        self.norm = nn.LayerNorm(cfg["hidden"])
        self.act = nn.GELU(approximate="none")
        self.fc2 = nn.Linear(cfg["hidden"], cfg["hidden"])
        self.fc3 = nn.Linear(cfg["hidden"], cfg["num_classes"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``x [batch, in_features]`` to logits, probabilities or int64 labels."""
        h = self.act(self.norm(self.fc1(x)))
        h = torch.relu(self.fc2(h))
        logits = self.fc3(h)
        if self.head == "softmax":
            return torch.softmax(logits, dim=-1)
        if self.head == "argmax":
            return torch.argmax(logits, dim=-1)
        return logits
