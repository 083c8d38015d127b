"""The small language model trained here, shipped with the package, and a plaintext generator.

``eecompile/models/tinylm/`` holds the output of
``python -m eecompile.models.train_lm --out eecompile/models/tinylm --steps 600 --seed 0``
(see ``README.md`` there): a :class:`~eecompile.models.llama.TinyLlama` trained on the King
James Bible (Debian ``bible-kjv-text``), its byte-level BPE ``tokenizer.json``,
``model.onnx`` (dynamo exporter, opset 20, Hugging Face/optimum KV-cache IO),
``model.pt`` (``{"state_dict", "config"}``), ``config.json`` and ``metrics.json``.

:func:`greedy_generate_plain` / :func:`greedy_generate_ids` run the *plaintext* ONNX model
with ONNX Runtime (CPU) and a KV cache; they are the reference that encrypted generation
must reproduce token for token.

Generation protocol (what an encrypted generator must match):

* the prompt is encoded with ``tokenizer.json`` (its post-processor prepends ``<s>`` = id 1;
  an empty prompt is just ``[<s>]``);
* prefill: the whole prompt in one call, ``attention_mask`` all ones,
  ``position_ids = 0..P-1``, empty past (``[1, kv_heads, 0, head_dim]``);
* each decode step feeds the previous argmax token alone with ``position_ids = [[t]]``, the
  ``present.*`` tensors of the previous call as ``past_key_values.*`` and an all-ones
  ``attention_mask`` of the total length;
* greedy = ``argmax`` of the last position's logits (ties -> lowest id, numpy semantics);
* stops after ``max_new_tokens`` or, with ``stop_at_eos``, right after emitting ``</s>`` (id 2).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import EECompileError

BOS_ID, EOS_ID = 1, 2
FILES: tuple[str, ...] = ("model.onnx", "tokenizer.json", "config.json", "model.pt", "metrics.json")
"""Files of a trained model directory."""


class ContextLengthError(EECompileError, ValueError):
    """Prompt plus requested new tokens exceed the model's trained context."""


def tinylm_dir() -> Path:
    """Directory of the shipped model (raises ``FileNotFoundError`` if its files are missing)."""
    d = Path(__file__).resolve().parent
    missing = [f for f in FILES if not (d / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{d} lacks {', '.join(missing)}; regenerate with: "
            f"python -m eecompile.models.train_lm --out {d} --steps 600 --seed 0"
        )
    return d


def _dir(model_dir: str | Path | None) -> Path:
    return tinylm_dir() if model_dir is None else Path(model_dir)


def load_tinylm(model_dir: str | Path | None = None) -> tuple[Path, Path, dict[str, Any]]:
    """``(onnx_path, tokenizer_path, config)`` of the shipped model (or of ``model_dir``).

    ``config`` is the :class:`~eecompile.models.llama.TinyLlama` config dict (``vocab_size``,
    ``hidden``, ``layers``, ``heads``, ``kv_heads``, ``head_dim``, ``max_positions`` = the
    trained context, ...).
    """
    d = _dir(model_dir)
    config = json.loads((d / "config.json").read_text())
    return d / "model.onnx", d / "tokenizer.json", config


def load_metrics(model_dir: str | Path | None = None) -> dict[str, Any]:
    """The ``metrics.json`` written by the training run (held-out perplexity, ...)."""
    return json.loads((_dir(model_dir) / "metrics.json").read_text())


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


@functools.lru_cache(maxsize=4)
def _session(path: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def load_tokenizer(model_dir: str | Path | None = None):
    """The ``tokenizers.Tokenizer`` of the shipped model (cached)."""
    return _tokenizer(str(load_tinylm(model_dir)[1]))


def load_checkpoint(model_dir: str | Path | None = None):
    """The torch :class:`~eecompile.models.llama.TinyLlama` with the trained weights (eval mode)."""
    from ..train_lm import load_checkpoint as _load

    return _load(_dir(model_dir) / "model.pt")


def empty_past(config: dict[str, Any], batch: int = 1) -> dict[str, np.ndarray]:
    """``past_key_values.N.key|value`` feeds of length 0."""
    shape = (batch, int(config["kv_heads"]), 0, int(config["head_dim"]))
    return {
        f"past_key_values.{i}.{kv}": np.zeros(shape, dtype=np.float32)
        for i in range(int(config["layers"]))
        for kv in ("key", "value")
    }


def greedy_generate_ids(
    prompt_ids: list[int],
    max_new_tokens: int = 32,
    model_dir: str | Path | None = None,
    stop_at_eos: bool = True,
) -> list[int]:
    """Greedy continuation ids of ``prompt_ids`` (which should start with ``<s>``) on the
    plaintext ONNX model with a KV cache; see the module docstring for the protocol.

    The returned list holds only the new ids; it ends with ``</s>`` (2) if generation stopped
    there.  Raises :class:`ContextLengthError` if ``len(prompt_ids) + max_new_tokens``
    exceeds the trained context, ``ValueError`` for an empty prompt or an id out of range.
    """
    onnx_path, _, config = load_tinylm(model_dir)
    ctx, vocab = int(config["max_positions"]), int(config["vocab_size"])
    prompt_ids = [int(i) for i in prompt_ids]
    if not prompt_ids:
        raise ValueError("empty prompt_ids (encode the prompt with the tokenizer: it starts with <s>)")
    if any(not 0 <= i < vocab for i in prompt_ids):
        raise ValueError(f"prompt ids out of range: each must be in [0, {vocab})")
    if max_new_tokens < 0:
        raise ValueError("max_new_tokens must be >= 0")
    if len(prompt_ids) + max_new_tokens > ctx:
        raise ContextLengthError(
            f"prompt of {len(prompt_ids)} tokens + {max_new_tokens} new tokens exceeds the model's "
            f"context of {ctx} tokens"
        )
    sess = _session(str(onnx_path))
    out_names = [o.name for o in sess.get_outputs()]
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.asarray([prompt_ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(prompt_ids)), dtype=np.int64),
        "position_ids": np.arange(len(prompt_ids), dtype=np.int64)[None, :],
        **empty_past(config),
    }
    new: list[int] = []
    total = len(prompt_ids)
    while len(new) < max_new_tokens:
        outs = dict(zip(out_names, sess.run(None, feeds), strict=True))
        nxt = int(np.argmax(outs["logits"][0, -1]))
        new.append(nxt)
        if stop_at_eos and nxt == EOS_ID:
            break
        feeds = {
            "input_ids": np.asarray([[nxt]], dtype=np.int64),
            "attention_mask": np.ones((1, total + 1), dtype=np.int64),
            "position_ids": np.asarray([[total]], dtype=np.int64),
        }
        for name, value in outs.items():
            if name.startswith("present."):
                feeds["past_key_values." + name[len("present."):]] = value
        total += 1
    return new


def greedy_generate_plain(
    prompt: str,
    max_new_tokens: int = 32,
    model_dir: str | Path | None = None,
    stop_at_eos: bool = True,
) -> str:
    """Greedy plaintext continuation of ``prompt`` (decoded text of the new tokens only,
    special tokens dropped).  ``prompt + continuation`` reads as the full text."""
    tok = load_tokenizer(model_dir)
    ids = tok.encode(prompt).ids
    return tok.decode(greedy_generate_ids(ids, max_new_tokens, model_dir, stop_at_eos))


__all__ = [
    "ContextLengthError",
    "FILES",
    "empty_past",
    "greedy_generate_ids",
    "greedy_generate_plain",
    "load_checkpoint",
    "load_metrics",
    "load_tinylm",
    "load_tokenizer",
    "tinylm_dir",
]
