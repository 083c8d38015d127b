"""Tiny GPT-2: pre-LN decoder, learned positions, fused QKV, tanh-GELU, tied LM head.

Input ``input_ids [batch, seq]`` int64; output ``logits [batch, seq, vocab]``.  No KV cache.
The LM head reuses the token-embedding ``Parameter`` (``logits = h @ wte.weight.T``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

CONFIG: dict[str, int | float] = {
    "vocab_size": 64,
    "hidden": 32,
    "layers": 2,
    "heads": 4,
    "kv_heads": 4,
    "head_dim": 8,
    "intermediate": 128,
    "max_positions": 32,
    "layer_norm_eps": 1e-5,
    "tied_embeddings": True,
}


class GPT2Attention(nn.Module):
    """Causal self-attention with a single fused ``c_attn`` projection (hidden -> 3*hidden)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.hidden: int = cfg["hidden"]
        self.num_heads: int = cfg["heads"]
        self.head_dim: int = cfg["hidden"] // cfg["heads"]
        self.c_attn = nn.Linear(self.hidden, 3 * self.hidden)
        self.c_proj = nn.Linear(self.hidden, self.hidden)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, S, hidden]`` -> ``[B, S, hidden]``."""
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).split(self.hidden, dim=2)
        q, k, v = self._split(q), self._split(k), self._split(v)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        causal = torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        scores = torch.where(causal, scores, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.hidden)
        return self.c_proj(ctx)


class GPT2Block(nn.Module):
    """Pre-LN block: ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))``."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg["hidden"], eps=cfg["layer_norm_eps"])
        self.attn = GPT2Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg["hidden"], eps=cfg["layer_norm_eps"])
        self.c_fc = nn.Linear(cfg["hidden"], cfg["intermediate"])
        self.c_proj = nn.Linear(cfg["intermediate"], cfg["hidden"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply one decoder block."""
        x = x + self.attn(self.ln_1(x))
        h = nn.functional.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")
        return x + self.c_proj(h)


class TinyGPT2(nn.Module):
    """GPT-2 language model with the LM head tied to the token embedding."""

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        cfg = dict(CONFIG if config is None else config)
        self.config = cfg
        self.wte = nn.Embedding(cfg["vocab_size"], cfg["hidden"])
        self.wpe = nn.Embedding(cfg["max_positions"], cfg["hidden"])
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg["layers"]))
        self.ln_f = nn.LayerNorm(cfg["hidden"], eps=cfg["layer_norm_eps"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``input_ids [B, S]`` -> ``logits [B, S, vocab]``."""
        s = input_ids.shape[1]
        pos = torch.arange(s, dtype=torch.long, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)[None]
        for block in self.h:
            x = block(x)
        x = self.ln_f(x)
        return x @ self.wte.weight.T
