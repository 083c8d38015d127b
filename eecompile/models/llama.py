"""Tiny Llama with GQA, RoPE, SwiGLU, RMSNorm and a Hugging Face/optimum-style KV cache.

Signature (flat, so that both ONNX exporters name every tensor)::

    forward(input_ids [B, S] int64,
            attention_mask [B, P+S] int64,
            position_ids [B, S] int64,
            past_key_0, past_value_0, past_key_1, past_value_1, ...   # [B, kv_heads, P, head_dim]
    ) -> (logits [B, S, vocab], present_key_0, present_value_0, ...)  # [B, kv_heads, P+S, head_dim]

Keys are cached *after* the rotary embedding; ``present = concat(past, new)`` on axis 2.
The causal + padding additive mask and the RoPE ``cos``/``sin`` are computed in-graph
(from ``attention_mask`` and ``position_ids`` / the ``inv_freq`` buffer).

Two numerically equivalent code paths exist, chosen by :attr:`TinyLlama.standard_ops`:

* ``False`` (default; used for opset < 23 and the legacy exporter): everything decomposed —
  RMSNorm as ``x * rsqrt(mean(x^2) + eps) * w``, ``rotate_half`` via slice/neg/cat,
  ``repeat_kv`` via unsqueeze/expand/reshape, attention as MatMul/Softmax/MatMul.
* ``True`` (dynamo at opset >= 23): ``F.rms_norm`` (-> ``RMSNormalization-23``),
  ``torch.onnx.ops.rotary_embedding`` (-> ``RotaryEmbedding-23``) and
  ``torch.onnx.ops.attention`` (-> ``Attention-23``, which also does the GQA head
  broadcast and the past/present concatenation).
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
    "kv_heads": 2,
    "head_dim": 8,
    "intermediate": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_positions": 64,
    "tied_embeddings": False,
}


class LlamaRMSNorm(nn.Module):
    """RMSNorm with a learned gain; decomposed or ``F.rms_norm`` depending on ``standard``."""

    def __init__(self, hidden: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden))
        self.eps = eps
        self.standard = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` over its last axis."""
        if self.standard:
            return nn.functional.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        var = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(var + self.eps) * self.weight


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``[x1, x2] -> [-x2, x1]`` on the last axis (Hugging Face / GPT-NeoX convention)."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """``[B, kv, T, D] -> [B, kv * n_rep, T, D]``; query head ``h`` uses kv head ``h // n_rep``."""
    if n_rep == 1:
        return x
    b, kv, t, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n_rep, t, d).reshape(b, kv * n_rep, t, d)


class LlamaRotary(nn.Module):
    """Computes the RoPE angles ``position_ids * inv_freq`` in-graph."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``position_ids [B, S]`` -> ``(cos, sin)`` each ``[B, S, head_dim / 2]``."""
        freqs = position_ids[:, :, None].to(torch.float32) * self.inv_freq[None, None, :]
        return freqs.cos(), freqs.sin()


class LlamaAttention(nn.Module):
    """Grouped-query attention with rotary embeddings and a KV cache."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.num_heads: int = cfg["heads"]
        self.num_kv_heads: int = cfg["kv_heads"]
        self.head_dim: int = cfg["head_dim"]
        h = cfg["hidden"]
        self.q_proj = nn.Linear(h, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.standard = False

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(output [B, S, hidden], present_key, present_value)``.

        ``cos``/``sin`` are ``[B, S, head_dim / 2]``; ``mask`` is additive ``[B, 1, S, P+S]``.
        """
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        scale = 1.0 / math.sqrt(self.head_dim)
        if self.standard:
            q = torch.onnx.ops.rotary_embedding(q, cos, sin)
            k = torch.onnx.ops.rotary_embedding(k, cos, sin)
            ctx, present_key, present_value, _ = torch.onnx.ops.attention(
                q, k, v, mask, past_key, past_value, scale=scale
            )
        else:
            cos2 = torch.cat((cos, cos), dim=-1)[:, None]
            sin2 = torch.cat((sin, sin), dim=-1)[:, None]
            q = q * cos2 + rotate_half(q) * sin2
            k = k * cos2 + rotate_half(k) * sin2
            present_key = torch.cat((past_key, k), dim=2)
            present_value = torch.cat((past_value, v), dim=2)
            n_rep = self.num_heads // self.num_kv_heads
            kk = repeat_kv(present_key, n_rep)
            vv = repeat_kv(present_value, n_rep)
            scores = torch.matmul(q, kk.transpose(2, 3)) * scale + mask
            probs = torch.softmax(scores, dim=-1)
            ctx = torch.matmul(probs, vv)
        ctx = ctx.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(ctx), present_key, present_value


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg["hidden"], cfg["intermediate"], bias=False)
        self.up_proj = nn.Linear(cfg["hidden"], cfg["intermediate"], bias=False)
        self.down_proj = nn.Linear(cfg["intermediate"], cfg["hidden"], bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the gated MLP."""
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm decoder layer."""

    def __init__(self, cfg: dict) -> None:
        super().__init__()
        self.input_layernorm = LlamaRMSNorm(cfg["hidden"], cfg["rms_norm_eps"])
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = LlamaRMSNorm(cfg["hidden"], cfg["rms_norm_eps"])
        self.mlp = LlamaMLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        past_key: torch.Tensor,
        past_value: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(hidden, present_key, present_value)``."""
        a, pk, pv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_key, past_value)
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, pk, pv


def build_additive_mask(attention_mask: torch.Tensor, seq: int) -> torch.Tensor:
    """Causal + padding additive mask ``[B, 1, S, P+S]`` (0 = attend, finfo.min = blocked).

    Query ``i`` sits at cache position ``P + i`` and may attend key ``j`` iff ``j <= P + i``
    and ``attention_mask[b, j] == 1``.
    """
    total = attention_mask.shape[1]
    past = total - seq
    q_pos = torch.arange(seq, device=attention_mask.device) + past
    k_pos = torch.arange(total, device=attention_mask.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [S, T]
    allowed = causal[None, None, :, :] & attention_mask[:, None, None, :].to(torch.bool)
    zero = torch.zeros((), dtype=torch.float32)
    neg = torch.full((), torch.finfo(torch.float32).min, dtype=torch.float32)
    return torch.where(allowed, zero, neg)


class TinyLlama(nn.Module):
    """Llama causal LM with an untied LM head and a flat KV-cache signature."""

    def __init__(self, config: dict | None = None) -> None:
        super().__init__()
        cfg = dict(CONFIG if config is None else config)
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg["vocab_size"], cfg["hidden"])
        self.rotary = LlamaRotary(cfg["head_dim"], cfg["rope_theta"])
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg["layers"]))
        self.norm = LlamaRMSNorm(cfg["hidden"], cfg["rms_norm_eps"])
        self.lm_head = nn.Linear(cfg["hidden"], cfg["vocab_size"], bias=False)
        self._standard_ops = False

    @property
    def standard_ops(self) -> bool:
        """Whether the opset-23 standard ops (RMSNormalization, RotaryEmbedding, Attention) are used."""
        return self._standard_ops

    @standard_ops.setter
    def standard_ops(self, value: bool) -> None:
        self._standard_ops = bool(value)
        for m in self.modules():
            if isinstance(m, (LlamaRMSNorm, LlamaAttention)):
                m.standard = bool(value)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *past_key_values: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Run one step; see the module docstring for the flat signature."""
        n = len(self.layers)
        if len(past_key_values) != 2 * n:
            raise ValueError(f"expected {2 * n} past tensors (key, value per layer), got {len(past_key_values)}")
        s = input_ids.shape[1]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids)
        mask = build_additive_mask(attention_mask, s)
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.layers):
            x, pk, pv = layer(x, cos, sin, mask, past_key_values[2 * i], past_key_values[2 * i + 1])
            presents += [pk, pv]
        logits = self.lm_head(self.norm(x))
        return (logits, *presents)
