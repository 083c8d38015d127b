"""Tiny post-LN BERT encoder with a pooler and a 3-way classifier head.

Written out explicitly in the style of Hugging Face ``BertModel`` (separate q/k/v
projections, ``(1 - mask) * -10000`` additive mask, post-LN residual blocks) but without
depending on ``transformers``.  Inputs ``input_ids``/``attention_mask`` ``[batch, seq]``
int64; output ``logits [batch, num_labels]``.
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
    "intermediate": 64,
    "max_positions": 32,
    "num_labels": 3,
    "layer_norm_eps": 1e-12,
}


class BertEmbeddings(nn.Module):
    """Word + learned position embeddings, then LayerNorm (no token-type embeddings)."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg["vocab_size"], cfg["hidden"])
        self.position_embeddings = nn.Embedding(cfg["max_positions"], cfg["hidden"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden"], eps=cfg["layer_norm_eps"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embed ``input_ids [B, S]``; position ids are ``arange(S)`` computed in-graph."""
        seq = input_ids.shape[1]
        position_ids = torch.arange(seq, dtype=torch.long, device=input_ids.device)
        h = self.word_embeddings(input_ids) + self.position_embeddings(position_ids)[None]
        return self.LayerNorm(h)


class BertSelfAttention(nn.Module):
    """Multi-head self-attention followed by the output projection, residual and LayerNorm."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.num_heads: int = cfg["heads"]
        self.head_dim: int = cfg["hidden"] // cfg["heads"]
        self.query = nn.Linear(cfg["hidden"], cfg["hidden"])
        self.key = nn.Linear(cfg["hidden"], cfg["hidden"])
        self.value = nn.Linear(cfg["hidden"], cfg["hidden"])
        self.dense = nn.Linear(cfg["hidden"], cfg["hidden"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden"], eps=cfg["layer_norm_eps"])

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, hidden: torch.Tensor, ext_mask: torch.Tensor) -> torch.Tensor:
        """``hidden [B, S, H]``, ``ext_mask [B, 1, 1, S]`` additive -> ``[B, S, H]``."""
        b, s, _ = hidden.shape
        q = self._split(self.query(hidden))
        k = self._split(self.key(hidden))
        v = self._split(self.value(hidden))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        scores = scores + ext_mask
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.LayerNorm(self.dense(ctx) + hidden)


class BertLayer(nn.Module):
    """Post-LN encoder layer: attention block then GELU feed-forward block."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.attention = BertSelfAttention(cfg)
        self.intermediate = nn.Linear(cfg["hidden"], cfg["intermediate"])
        self.output = nn.Linear(cfg["intermediate"], cfg["hidden"])
        self.LayerNorm = nn.LayerNorm(cfg["hidden"], eps=cfg["layer_norm_eps"])

    def forward(self, hidden: torch.Tensor, ext_mask: torch.Tensor) -> torch.Tensor:
        """Apply one encoder layer."""
        h = self.attention(hidden, ext_mask)
        ff = self.output(nn.functional.gelu(self.intermediate(h)))
        return self.LayerNorm(ff + h)


class TinyBertClassifier(nn.Module):
    """BERT encoder + tanh pooler on the first token + linear classifier."""

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        cfg = dict(CONFIG if config is None else config)
        self.config = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.layers = nn.ModuleList(BertLayer(cfg) for _ in range(cfg["layers"]))
        self.pooler = nn.Linear(cfg["hidden"], cfg["hidden"])
        self.classifier = nn.Linear(cfg["hidden"], cfg["num_labels"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``input_ids``, ``attention_mask`` int64 ``[B, S]`` -> ``logits [B, num_labels]``."""
        ext = attention_mask[:, None, None, :].to(torch.float32)
        ext = (1.0 - ext) * -10000.0
        h = self.embeddings(input_ids)
        for layer in self.layers:
            h = layer(h, ext)
        pooled = torch.tanh(self.pooler(h[:, 0]))
        return self.classifier(pooled)
