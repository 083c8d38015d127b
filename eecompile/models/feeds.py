"""Random ONNX Runtime feeds for the zoo models and a torch reference runner."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from .registry import check_name, input_names, model_config, output_names

BATCH_LIMITS: dict[tuple[str, str, int], int] = {}
"""Largest batch that ONNX Runtime (CPU) evaluates correctly, per (model, exporter, opset).

Absent key = no limit.  Older ONNX Runtime builds were reported to compute
``RotaryEmbedding-23`` wrongly on the CPU provider for batch > 1, which would limit
``("llama", "dynamo", 23)`` to batch 1.  With onnxruntime 1.32.0 (the version this zoo is
tested with) that does not reproduce: 4-D ``[B, H, S, D]`` and 3-D inputs, 3-D per-batch
cos/sin caches and 2-D caches with ``position_ids`` all match torch at batch 1, 2 and 3,
so the table is empty.  Add an entry here if a runtime/provider needs one; the zoo tests
read it.
"""


def make_feeds(
    name: str, seed: int = 0, batch: int = 2, seq: int = 5, past: int = 0
) -> dict[str, np.ndarray]:
    """Random, valid ONNX Runtime feeds for zoo model ``name`` (keys are ONNX input names).

    * float inputs (``x``, ``image``): float32 ``N(0, 1)``;
    * ``input_ids``: int64 uniform in ``[0, vocab_size)``, shape ``[batch, seq]``;
    * ``attention_mask``: int64 ones; for ``bert`` row ``b`` of the batch starts with
      ``min(b, seq - 1)`` zeros (left padding), so padding is exercised whenever
      ``batch > 1``; for ``llama`` it covers past and new tokens, shape ``[batch, past + seq]``;
    * ``position_ids`` (llama): ``arange(past, past + seq)`` broadcast to ``[batch, seq]``;
    * ``past_key_values.{i}.key|value`` (llama): float32 ``N(0, 1)``,
      ``[batch, kv_heads, past, head_dim]`` (``past`` may be 0).

    ``seq`` and ``past`` are ignored by models without those axes.  Some runtimes evaluate
    an export correctly only at a limited batch size; callers pick ``batch`` within
    :data:`BATCH_LIMITS` (e.g. the opset-23 llama's ``RotaryEmbedding-23`` was reported
    to need ``batch=1`` on older ONNX Runtime CPU builds; not needed with 1.32.0).
    """
    check_name(name)
    cfg = model_config(name)
    rng = np.random.default_rng(seed)
    if name.startswith("mlp"):
        return {"x": rng.standard_normal((batch, cfg["in_features"]), dtype=np.float32)}
    if name == "cnn":
        size = cfg["image_size"]
        return {"image": rng.standard_normal((batch, cfg["in_channels"], size, size), dtype=np.float32)}
    ids = rng.integers(0, cfg["vocab_size"], size=(batch, seq), dtype=np.int64)
    if name == "gpt2":
        return {"input_ids": ids}
    if name == "bert":
        mask = np.ones((batch, seq), dtype=np.int64)
        for b in range(batch):
            mask[b, : min(b, seq - 1)] = 0
        return {"input_ids": ids, "attention_mask": mask}
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids,
        "attention_mask": np.ones((batch, past + seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past, past + seq, dtype=np.int64), (batch, seq)).copy(),
    }
    shape = (batch, cfg["kv_heads"], past, cfg["head_dim"])
    for n in input_names(name)[3:]:
        feeds[n] = rng.standard_normal(shape, dtype=np.float32)
    return feeds


def torch_inputs(name: str, feeds: Mapping[str, np.ndarray]) -> tuple[torch.Tensor, ...]:
    """Convert ONNX feeds to the positional torch arguments of the zoo model ``name``."""
    return tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in input_names(name))


def run_torch(name: str, model: nn.Module, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run the torch ``model`` on ONNX-style ``feeds``; return outputs keyed by ONNX output name."""
    with torch.no_grad():
        out = model(*torch_inputs(name, feeds))
    outs = out if isinstance(out, tuple) else (out,)
    return {n: t.detach().cpu().numpy() for n, t in zip(output_names(name), outs, strict=True)}
