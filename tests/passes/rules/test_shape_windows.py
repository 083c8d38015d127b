"""Window partitions (Swin) through the reshape reasoning of eecompile.passes.rules.shape.

``[B, H, W, C] -> [B, H/w, w, W/w, w, C] -> transpose -> [B·H·W/w², w², C]`` and back moves only
pixels: the channel axis keeps its basis, with the batch dynamic (dims compared symbolically).
"""

from __future__ import annotations

import numpy as np
import pytest


def _window_block():
    import torch
    from torch import nn

    class Windows(nn.Module):
        """Patch embedding, cyclic shift, window partition, per-window attention, window reverse, MLP."""

        def __init__(self, window: int = 2) -> None:
            super().__init__()
            self.window = window
            self.patch = nn.Conv2d(3, 8, 2, stride=2)
            self.norm = nn.LayerNorm(8)
            self.qkv = nn.Linear(8, 24)
            self.out = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.patch(x).permute(0, 2, 3, 1)  # [B, H, W, C]
            b, height, width, c = h.shape
            w = self.window
            s = torch.roll(self.norm(h), shifts=(-1, -1), dims=(1, 2))
            s = torch.nn.functional.pad(s, (0, 0, 0, 0, 0, 0))
            win = s.view(b, height // w, w, width // w, w, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, w * w, c)
            q, k, v = self.qkv(win).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(1, 2) / c ** 0.5, dim=-1) @ v
            back = self.out(att).view(b, height // w, width // w, w, w, c).permute(0, 1, 3, 2, 4, 5)
            back = torch.roll(back.reshape(b, height, width, c), shifts=(1, 1), dims=(1, 2))
            return self.head((h + back).mean(dim=(1, 2)))

    torch.manual_seed(0)
    return Windows()


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_swin_window_partition_export(exporter, rng, torch_export, lint, compile_exact):
    import torch

    dynamic = {"x": {0: "batch"}, "y": {0: "batch"}} if exporter == "legacy" else {"x": {0: "batch"}}
    path = torch_export(_window_block(), (torch.randn(2, 3, 8, 8),), exporter, ["x"], ["y"], dynamic=dynamic)
    report = lint(path)
    assert not report["unsupported_ops"]
    assert report.protection("inputs", "x") != "clear" and report.protection("outputs", "y") != "clear"
    residual = [s for s in report["spaces"] if s["size"] == 8 and s["basis"] != "clear"]
    assert residual, [(s["name"], s["basis"], s["limited_by"]) for s in report["spaces"]]
    assert not [s for s in report["spaces"] if s["basis"] == "clear"], report["spaces"]
    feeds = [{"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32)} for n in (1, 3)]
    result = compile_exact(path, feeds)
    assert result.report["exposure"]["intermediates_exposed"] == 0
