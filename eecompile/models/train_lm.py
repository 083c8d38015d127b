"""Train a small Llama-style language model on real English text, on a CPU, in minutes.

    python -m eecompile.models.train_lm --out DIR [--steps N] [--seed S] [--corpus kjv]

1. reads the corpus from its Debian package (:mod:`eecompile.models.corpus`) and splits it
   into train / held-out documents (:func:`~eecompile.models.corpus.split_corpus`, 5 %);
2. trains a byte-level BPE tokenizer (``tokenizers``) on the training split; special tokens
   ``<unk>`` (0), ``<s>`` (1), ``</s>`` (2), ``<pad>`` (3); a post-processor puts ``<s>``
   in front of every encoded text; decoding is lossless for any text;
3. trains the zoo's :class:`~eecompile.models.llama.TinyLlama` (GQA, RoPE, SwiGLU,
   RMSNorm; :data:`DEFAULT_CONFIG`) on next-token prediction over the concatenated
   training documents (each ``<s> text </s>``), random windows of ``context`` tokens,
   AdamW with warm-up and cosine decay, ``torch.set_num_threads(2)`` by default;
4. measures held-out perplexity (per token of this tokenizer, non-overlapping windows of
   ``context`` tokens over the held-out stream, each window starting with no context)
   and bits per byte of held-out text;
5. writes to ``--out``: ``tokenizer.json``, ``model.pt`` (``{"state_dict", "config"}``),
   ``config.json``, ``model.onnx`` (dynamo exporter, opset 20, Hugging Face/optimum
   KV-cache IO, see :func:`~eecompile.models.export.export_llama_module`) and
   ``metrics.json``.

On a machine whose cores are shared with other work, run it with ``OMP_WAIT_POLICY=PASSIVE``
(OpenMP threads then sleep instead of spinning while they wait for each other): on an
oversubscribed 2-core machine this made a training step 3-7x faster.

Deterministic for a given seed, corpus package version and torch build (up to the
floating-point nondeterminism of multi-threaded CPU kernels).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .corpus import corpus_documents, load_corpus, split_corpus
from .export import export_llama_module
from .llama import TinyLlama

SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
"""Special tokens; their ids are their positions here (``<unk>`` = 0, ``<s>`` = 1, ...)."""

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

DEFAULT_CONFIG: dict[str, Any] = {
    "vocab_size": 2048,
    "hidden": 128,
    "layers": 4,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 32,
    "intermediate": 384,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_positions": 128,
    "tied_embeddings": False,
}
"""TinyLlama config of the shipped model (about 1.3 M parameters); ``max_positions`` is the
training context (RoPE itself has no hard limit, but longer sequences were never seen)."""

DEFAULTS: dict[str, Any] = {
    "corpus": "kjv",
    "steps": 600,
    "batch": 32,
    "lr": 3e-3,
    "min_lr_ratio": 0.1,
    "warmup": 50,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "heldout_fraction": 0.05,
    "threads": 2,
    "seed": 0,
}
"""Training hyper-parameters (``--steps 600`` takes about 5-7 minutes on 2 idle CPU cores)."""


# --------------------------------------------------------------------------- tokenizer



def record_context_length(path: Path, max_positions: int) -> None:
    """Record the trained context in the ONNX file (metadata ``max_position_embeddings``): the rotary
    angles are computed on the fly, so the graph itself does not state it, and generation must refuse
    longer prompts and stop when it is full."""
    import onnx

    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    props["max_position_embeddings"] = str(int(max_positions))
    onnx.helper.set_model_props(proto, props)
    onnx.save_model(proto, str(path), save_as_external_data=False)

def train_tokenizer(texts: list[str], vocab_size: int = 2048):
    """Byte-level BPE ``tokenizers.Tokenizer`` trained on ``texts``; ``<s>`` is prepended on encode."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    for i, t in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(t) != i:
            raise AssertionError(f"special token {t} got id {tok.token_to_id(t)}, expected {i}")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    return tok


def encode_documents(tokenizer, docs: list[str]) -> np.ndarray:
    """Concatenate ``<s> doc </s>`` for every document into one int64 token stream."""
    parts = []
    for enc in tokenizer.encode_batch(docs):
        parts.append(np.asarray(enc.ids + [EOS_ID], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- model


def build_lm(config: dict[str, Any], seed: int) -> TinyLlama:
    """A freshly initialised :class:`TinyLlama` (GPT-2 style init: N(0, 0.02), residual
    projections scaled by ``1/sqrt(2 * layers)``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyLlama(config)
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                std = 0.02
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    std /= math.sqrt(2 * config["layers"])
                nn.init.normal_(p, 0.0, std)
    return model


def _empty_past(model: TinyLlama, batch: int) -> list[torch.Tensor]:
    cfg = model.config
    shape = (batch, cfg["kv_heads"], 0, cfg["head_dim"])
    return [torch.zeros(shape) for _ in range(2 * cfg["layers"])]


def lm_logits(model: TinyLlama, ids: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, S, V]`` of ``ids [B, S]`` with no past and no padding."""
    b, s = ids.shape
    mask = torch.ones((b, s), dtype=torch.int64)
    pos = torch.arange(s, dtype=torch.int64).expand(b, s)
    return model(ids, mask, pos, *_empty_past(model, b))[0]


def evaluation_windows(n_tokens: int, context: int, max_windows: int | None = None) -> list[int]:
    """Start offsets of non-overlapping ``context + 1``-token windows (stride ``context``).

    With ``max_windows`` the windows are a subset spread evenly over the whole stream.
    """
    starts = list(range(0, n_tokens - context - 1 + 1, context))
    if max_windows is not None and len(starts) > max_windows:
        idx = np.linspace(0, len(starts) - 1, max_windows).round().astype(int)
        starts = [starts[i] for i in idx]
    return starts


@torch.no_grad()
def stream_nll(model: TinyLlama, stream: np.ndarray, context: int, max_windows: int | None = None,
               batch: int = 32) -> tuple[float, int]:
    """(total negative log-likelihood in nats, number of predicted tokens) over the windows
    of :func:`evaluation_windows`; every window predicts its last ``context`` tokens."""
    model.eval()
    starts = evaluation_windows(len(stream), context, max_windows)
    total, count = 0.0, 0
    for i in range(0, len(starts), batch):
        chunk = np.stack([stream[s : s + context + 1] for s in starts[i : i + batch]])
        x = torch.from_numpy(chunk)
        logits = lm_logits(model, x[:, :-1])
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).double(), x[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += x[:, 1:].numel()
    return total, count


def heldout_perplexity(model: TinyLlama, stream: np.ndarray, context: int, max_windows: int | None = None) -> float:
    """``exp(mean NLL)`` per token over :func:`evaluation_windows` of the held-out ``stream``."""
    total, count = stream_nll(model, stream, context, max_windows)
    return math.exp(total / count)


# --------------------------------------------------------------------------- training


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def train(
    out: str | Path,
    steps: int = DEFAULTS["steps"],
    seed: int = DEFAULTS["seed"],
    corpus: str = DEFAULTS["corpus"],
    batch: int = DEFAULTS["batch"],
    lr: float = DEFAULTS["lr"],
    threads: int = DEFAULTS["threads"],
    config: dict[str, Any] | None = None,
    eval_windows: int | None = None,
    export: bool = True,
    log=print,
) -> dict[str, Any]:
    """Train tokenizer + model, write the artifacts to ``out`` and return the metrics dict.

    ``eval_windows`` limits the held-out evaluation to that many windows (spread evenly);
    ``None`` evaluates the whole held-out split.
    """
    cfg = dict(DEFAULT_CONFIG if config is None else config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    t_start = time.perf_counter()

    text = load_corpus(corpus)
    train_text, heldout_text = split_corpus(text, DEFAULTS["heldout_fraction"])
    train_docs, heldout_docs = corpus_documents(train_text), corpus_documents(heldout_text)
    tokenizer = train_tokenizer(train_docs, cfg["vocab_size"])
    cfg["vocab_size"] = tokenizer.get_vocab_size()
    train_ids = encode_documents(tokenizer, train_docs)
    heldout_ids = encode_documents(tokenizer, heldout_docs)
    t_tok = time.perf_counter() - t_start
    log(f"corpus {corpus}: {len(train_docs)} train / {len(heldout_docs)} held-out documents, "
        f"{len(train_ids)} / {len(heldout_ids)} tokens, vocab {cfg['vocab_size']} ({t_tok:.1f} s)")

    model = build_lm(cfg, seed)
    n_params = sum(p.numel() for p in model.parameters())
    context = int(cfg["max_positions"])
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": DEFAULTS["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True,
    )
    gen = np.random.default_rng(seed)
    stream = torch.from_numpy(train_ids)
    offsets = torch.arange(context + 1)
    log(f"model: {n_params} parameters, context {context}, batch {batch}, {steps} steps, {threads} threads")
    model.train()
    load_start = os.getloadavg()[0]
    cpu_train = time.process_time()
    t_train = time.perf_counter()
    losses: list[float] = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, steps, lr, DEFAULTS["warmup"], DEFAULTS["min_lr_ratio"])
        starts = torch.from_numpy(gen.integers(0, len(train_ids) - context - 1, size=batch))
        x = stream[starts[:, None] + offsets[None, :]]
        logits = lm_logits(model, x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), DEFAULTS["grad_clip"])
        opt.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {losses[-1]:.3f}  lr {opt.param_groups[0]['lr']:.2e}  "
                f"{time.perf_counter() - t_train:.0f} s")
    train_seconds = time.perf_counter() - t_train
    train_cpu_seconds = time.process_time() - cpu_train
    load_end = os.getloadavg()[0]
    model.eval()

    t_eval = time.perf_counter()
    nll, count = stream_nll(model, heldout_ids, context, eval_windows)
    ppl = math.exp(nll / count)
    starts = evaluation_windows(len(heldout_ids), context, eval_windows)
    n_bytes = sum(len(tokenizer.decode(heldout_ids[s + 1 : s + context + 1].tolist()).encode()) for s in starts)
    eval_seconds = time.perf_counter() - t_eval
    log(f"held-out perplexity {ppl:.2f} per token ({count} tokens), {nll / math.log(2) / n_bytes:.3f} bits/byte")

    tokenizer.save(str(out / "tokenizer.json"))
    torch.save({"state_dict": model.state_dict(), "config": cfg}, out / "model.pt")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    if export:
        export_llama_module(model, out / "model.onnx", exporter="dynamo", opset=20)
        record_context_length(out / "model.onnx", int(cfg["max_positions"]))
    tail = losses[-min(50, len(losses)):]
    metrics = {
        "corpus": corpus,
        "seed": seed,
        "steps": steps,
        "batch": batch,
        "context": context,
        "lr": lr,
        "threads": threads,
        "torch": torch.__version__,
        "vocab_size": cfg["vocab_size"],
        "parameters": n_params,
        "train_tokens": int(len(train_ids)),
        "heldout_tokens": int(len(heldout_ids)),
        "tokens_seen": steps * batch * context,
        "train_loss_final": losses[-1],
        "train_loss_last50_mean": sum(tail) / len(tail),
        "heldout_perplexity": ppl,
        "heldout_nll_per_token": nll / count,
        "heldout_bits_per_byte": nll / math.log(2) / n_bytes,
        "heldout_eval_tokens": count,
        "heldout_eval_windows": len(starts),
        "tokenizer_seconds": round(t_tok, 2),
        "training_seconds": round(train_seconds, 2),
        "training_cpu_seconds": round(train_cpu_seconds, 2),
        "load_average_1min": [round(load_start, 2), round(load_end, 2)],
        "cpu_count": os.cpu_count(),
        "eval_seconds": round(eval_seconds, 2),
        "total_seconds": round(time.perf_counter() - t_start, 2),
        "onnx": "model.onnx (dynamo exporter, opset 20)" if export else None,
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def load_checkpoint(path: str | Path) -> TinyLlama:
    """The :class:`TinyLlama` saved by :func:`train` in ``model.pt`` (eval mode)."""
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    model = TinyLlama(ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    ap = argparse.ArgumentParser(prog="python -m eecompile.models.train_lm", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--corpus", default=DEFAULTS["corpus"], help="corpus name (see eecompile.models.corpus)")
    ap.add_argument("--batch", type=int, default=DEFAULTS["batch"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--threads", type=int, default=DEFAULTS["threads"])
    ap.add_argument("--eval-windows", type=int, default=None,
                    help="evaluate on this many held-out windows only (default: all)")
    ap.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    args = ap.parse_args(argv)
    from ..errors import EECompileError

    try:
        metrics = train(args.out, steps=args.steps, seed=args.seed, corpus=args.corpus, batch=args.batch,
                        lr=args.lr, threads=args.threads, eval_windows=args.eval_windows,
                        export=not args.no_export, log=lambda m: print(m, file=sys.stderr, flush=True))
    except EECompileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
