"""Tiny random-weight Hugging Face causal LMs, exported four ways (the real-export matrix).

Eleven architectures (:data:`ARCHS`) are built from tiny configs (hidden 64, 2 layers, 4 heads of
16, 2 KV heads where the architecture has GQA, intermediate 128, vocabulary 256, 128 positions),
with small random noise added to *every* parameter so no two initializers are equal (the dynamo
exporter deduplicates equal tensors, e.g. all-ones norm gains) and norm gains are non-trivial.
Fused projections stay fused: Phi-3 keeps ``qkv_proj`` / ``gate_up_proj``, GPT-NeoX keeps
``query_key_value``, GPT-2 keeps its ``c_attn`` Conv1D.

Each checkpoint is exported with (:data:`EXPORTERS`):

* ``optimum``  — ``optimum.exporters.onnx.main_export(task="text-generation-with-past")``, run in
  a separate virtual environment (optimum needs ``transformers < 4.58``; :data:`OPTIMUM_PYTHON`).
  KV cache: inputs ``input_ids, attention_mask[, position_ids], past_key_values.N.key|value``,
  outputs ``logits, present.N.key|value``.  The weights are the same as for the other exporters:
  the optimum side rebuilds the model from :func:`tiny_config` with its own transformers and loads
  the ``model.safetensors`` written here.
* ``dynamo20`` / ``dynamo23`` — ``torch.onnx.export(dynamo=True)`` at the default opset (20) / 23,
  no cache: ``input_ids, attention_mask -> logits`` with dynamic batch and sequence.
* ``legacy17`` — the TorchScript exporter (``dynamo=False``) at opset 17, same IO.

Exports are cached: an existing ``model.onnx`` is reused, and a recorded failure
(``export_error.txt``, one line) is reported again without retrying unless asked to.

The module imports only the standard library at import time, so it also runs as a script under
the optimum environment's interpreter (``python hf_decoders.py optimum-export ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma3", "gpt2", "gpt_neox", "opt",
                          "granite", "olmo2")
"""The architectures of the matrix (``gemma3`` is the text-only ``Gemma3ForCausalLM``)."""

EXPORTERS: tuple[str, ...] = ("optimum", "dynamo20", "dynamo23", "legacy17")
"""The four ways every checkpoint is exported."""

OPTIMUM_PYTHON: str = os.environ.get("EECOMPILE_OPTIMUM_PYTHON", "/work/optvenv/bin/python")
"""Interpreter of the environment holding ``optimum-onnx`` and ``transformers < 4.58``."""

HIDDEN, LAYERS, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE, VOCAB, POSITIONS = 64, 2, 4, 2, 16, 128, 256, 128

_COMMON_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
_LLAMA_LIKE = {"hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
               "num_key_value_heads": KV_HEADS, "intermediate_size": INTERMEDIATE, "vocab_size": VOCAB,
               "max_position_embeddings": POSITIONS}

_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": {"model_type": "llama", **_LLAMA_LIKE, "head_dim": HEAD_DIM},
    "qwen2": {"model_type": "qwen2", **_LLAMA_LIKE},
    "qwen3": {"model_type": "qwen3", **_LLAMA_LIKE, "head_dim": HEAD_DIM},
    "mistral": {"model_type": "mistral", **_LLAMA_LIKE, "head_dim": HEAD_DIM, "sliding_window": None},
    "phi3": {"model_type": "phi3", **_LLAMA_LIKE, "original_max_position_embeddings": POSITIONS},
    "gemma3": {"model_type": "gemma3_text", **_LLAMA_LIKE, "head_dim": HEAD_DIM, "query_pre_attn_scalar": HEAD_DIM,
               "sliding_window": 64, "layer_types": ["sliding_attention", "full_attention"]},
    "gpt2": {"model_type": "gpt2", "n_embd": HIDDEN, "n_layer": LAYERS, "n_head": HEADS, "n_inner": INTERMEDIATE,
             "vocab_size": VOCAB, "n_positions": POSITIONS},
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS,
                 "num_attention_heads": HEADS, "intermediate_size": INTERMEDIATE, "vocab_size": VOCAB,
                 "max_position_embeddings": POSITIONS},
    "opt": {"model_type": "opt", "hidden_size": HIDDEN, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "ffn_dim": INTERMEDIATE, "vocab_size": VOCAB, "max_position_embeddings": POSITIONS,
            "word_embed_proj_dim": HIDDEN},
    "granite": {"model_type": "granite", **_LLAMA_LIKE, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                "attention_multiplier": 1.0 / HEAD_DIM, "logits_scaling": 8.0},
    "olmo2": {"model_type": "olmo2", **_LLAMA_LIKE},
}

_ALIASES: tuple[tuple[str, str], ...] = (("embed_out.weight", "lm_head.weight"), ("lm_head.weight", "embed_out.weight"))
"""(key in a checkpoint, key of the running transformers' model): GPT-NeoX's head is ``embed_out`` in 4.x."""

WEIGHT_NOISE = 0.02
"""Standard deviation of the noise added to every matrix / embedding parameter."""
VECTOR_NOISE = 0.1
"""Standard deviation of the noise added to every 1-D parameter (norm gains, biases)."""


def check_arch(arch: str) -> None:
    """Raise ``ValueError`` naming the known architectures if ``arch`` is not one of :data:`ARCHS`."""
    if arch not in _CONFIGS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {', '.join(ARCHS)}")


def check_exporter(exporter: str) -> None:
    """Raise ``ValueError`` if ``exporter`` is not one of :data:`EXPORTERS`."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; expected one of {', '.join(EXPORTERS)}")


def tiny_config(arch: str) -> dict[str, Any]:
    """The tiny config of ``arch`` as keyword arguments of ``AutoConfig.for_model`` (``model_type`` included).

    Token ids (pad 0, bos 1, eos 2) are set inside the small vocabulary for every architecture.
    Works with transformers 4.x and 5.x (the keys are the config classes' constructor arguments).
    """
    check_arch(arch)
    return {**_CONFIGS[arch], **_COMMON_IDS}


def model_dims(arch: str) -> dict[str, int]:
    """``{"vocab_size", "layers", "heads", "kv_heads", "head_dim", "hidden"}`` of the tiny ``arch``.

    ``kv_heads`` equals ``heads`` for the architectures without GQA (gpt2, gpt_neox, opt).
    """
    cfg = tiny_config(arch)
    kv = cfg.get("num_key_value_heads", HEADS)
    return {"vocab_size": VOCAB, "layers": LAYERS, "heads": HEADS, "kv_heads": kv, "head_dim": HEAD_DIM,
            "hidden": HIDDEN}


def export_path(root: str | Path, arch: str, exporter: str) -> Path:
    """Where ``exporter``'s export of ``arch`` lives under ``root``: ``root/arch/exporter/model.onnx``."""
    check_arch(arch)
    check_exporter(exporter)
    return Path(root) / arch / exporter / "model.onnx"


def checkpoint_dir(root: str | Path, arch: str) -> Path:
    """The checkpoint folder of ``arch`` under ``root``: ``root/arch/checkpoint``."""
    check_arch(arch)
    return Path(root) / arch / "checkpoint"


def error_line(exc: BaseException) -> str:
    """One line describing ``exc``: ``Type: first line of the message`` (at most 300 characters)."""
    text = str(exc).strip().splitlines()
    msg = next((t.strip() for t in text if t.strip()), "")
    return f"{type(exc).__name__}: {msg}"[:300]


# --- building ---------------------------------------------------------------------------


def perturb_parameters(model: Any, seed: int = 0, weight_noise: float = WEIGHT_NOISE,
                       vector_noise: float = VECTOR_NOISE) -> int:
    """Add Gaussian noise to every parameter of the torch ``model`` in place; return how many.

    Matrices and embeddings get ``N(0, weight_noise)``, 1-D parameters (norm gains, biases)
    ``N(0, vector_noise)``, so all-ones / all-zeros initializers become distinct and norm gains
    non-trivial (Gemma's zero-initialised ``1 + w`` gains included).  Tied parameters are shared
    objects and get the noise once, so ties survive.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 12345)
    count = 0
    with torch.no_grad():
        for _, p in model.named_parameters():
            std = vector_noise if p.dim() <= 1 else weight_noise
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
            count += 1
    return count


def build_model(arch: str, seed: int = 0, attn_implementation: str = "eager") -> Any:
    """A tiny random-weight ``AutoModelForCausalLM`` of ``arch`` in eval mode (noise on every parameter)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = tiny_config(arch)
    model_type = kwargs.pop("model_type")
    config = AutoConfig.for_model(model_type, **kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    perturb_parameters(model, seed)
    return model.eval()


def build_checkpoint(arch: str, directory: str | Path, seed: int = 0) -> Path:
    """Write the tiny ``arch`` checkpoint (``save_pretrained``) into ``directory``; reuse an existing one.

    Returns ``directory``.  The weights are ``model.safetensors``; :func:`load_model` rebuilds
    the model from :func:`tiny_config` and these weights with any transformers version.
    """
    directory = Path(directory)
    if (directory / "model.safetensors").is_file() and (directory / "config.json").is_file():
        return directory
    model = build_model(arch, seed)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory))
    (directory / "eecompile_tiny_config.json").write_text(json.dumps(tiny_config(arch), indent=2) + "\n")
    return directory


def load_model(arch: str, checkpoint: str | Path, attn_implementation: str = "eager") -> Any:
    """Rebuild ``arch`` from :func:`tiny_config` (the running transformers) with the checkpoint's weights.

    Tied weights absent from the file (``lm_head.weight`` when tied to the embedding) are allowed;
    any other missing or unexpected key raises ``RuntimeError``.
    """
    from safetensors.torch import load_file

    model = build_model(arch, seed=0, attn_implementation=attn_implementation)
    state = load_file(str(Path(checkpoint) / "model.safetensors"))
    names = set(model.state_dict())
    for saved, ours in _ALIASES:  # names a transformers version saves under a legacy key
        if saved in state and saved not in names and ours in names:
            state[ours] = state.pop(saved)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight", "embed_out.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {checkpoint} does not fit {arch}: missing {missing}, unexpected {unexpected}")
    if tied:
        model.tie_weights()
    return model.eval()


# --- exporting with torch.onnx ----------------------------------------------------------


def _logits_wrapper(model: Any) -> Any:
    """``(input_ids, attention_mask) -> logits`` without cache, as a torch module."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return LogitsOnly(model).eval()


def export_torch(model: Any, path: str | Path, exporter: str) -> Path:
    """Export the HF causal LM ``model`` with ``torch.onnx.export`` (``dynamo20``, ``dynamo23``, ``legacy17``).

    IO: ``input_ids``, ``attention_mask`` (int64 ``[batch, sequence]``) -> ``logits``; batch and
    sequence are dynamic; no cache.  ``dynamo20`` uses the exporter's default opset (20 with torch
    2.13).  The file is self-contained and written atomically.  Raises whatever the exporter raises.
    """
    import contextlib
    import io
    import warnings

    import onnx
    import torch

    check_exporter(exporter)
    if exporter == "optimum":
        raise ValueError("use export_optimum for the optimum exporter")
    model = _logits_wrapper(model)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, VOCAB, (2, 7), generator=gen, dtype=torch.int64)
    mask = torch.ones((2, 7), dtype=torch.int64)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = Path(tmp) / "model.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            if exporter.startswith("dynamo"):
                opset = int(exporter[len("dynamo"):])
                torch.onnx.export(model, (ids, mask), str(raw), dynamo=True,
                                  opset_version=None if opset == 20 else opset,
                                  input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                  dynamic_shapes=axes, external_data=False, verbose=False)
            else:
                torch.onnx.export(model, (ids, mask), str(raw), dynamo=False, opset_version=17,
                                  input_names=["input_ids", "attention_mask"], output_names=["logits"],
                                  dynamic_axes={**axes, "logits": {0: "batch", 1: "sequence"}},
                                  do_constant_folding=True)
        proto = onnx.load(str(raw), load_external_data=True)
    tmp_path = path.with_name(path.name + ".partial")
    onnx.save_model(proto, str(tmp_path), save_as_external_data=False)
    os.replace(tmp_path, path)
    return path


# --- exporting with optimum (in its own environment) ------------------------------------


def export_optimum(arch: str, checkpoint: str | Path, path: str | Path, python: str = OPTIMUM_PYTHON,
                   timeout: float = 900.0) -> Path:
    """Export the checkpoint with optimum (``text-generation-with-past``) to ``path``, in a subprocess.

    The subprocess runs this file under ``python`` (the optimum environment), rebuilds the model
    with that environment's transformers from :func:`tiny_config`, loads the weights, saves a
    checkpoint there and calls ``main_export``.  Raises ``RuntimeError`` with the subprocess's
    last error line if it fails, ``FileNotFoundError`` if ``python`` does not exist.
    """
    if not Path(python).exists():
        raise FileNotFoundError(f"optimum interpreter {python} not found (set EECOMPILE_OPTIMUM_PYTHON)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("PYTHONPATH", None)
    cmd = [python, str(Path(__file__).resolve()), "optimum-export", "--arch", arch,
           "--checkpoint", str(Path(checkpoint).resolve()), "--out", str(path.parent.resolve())]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0 or not path.is_file():
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        marked = [line for line in lines if line.startswith("OPTIMUM-EXPORT-ERROR:")]
        last = marked[-1].split(":", 1)[1].strip() if marked else (lines[-1] if lines else f"rc {proc.returncode}")
        raise RuntimeError(last)
    return path


def _optimum_export_main(arch: str, checkpoint: str, out: str) -> None:
    """Body of the ``optimum-export`` subcommand (runs inside the optimum environment)."""
    from optimum.exporters.onnx import main_export

    model = load_model(arch, checkpoint, attn_implementation="eager")
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        main_export(tmp, output=out, task="text-generation-with-past", library_name="transformers",
                    device="cpu", do_validation=True)


# --- the whole set ----------------------------------------------------------------------


@dataclass
class ExportResult:
    """The outcome of one export: ``path`` when it exists, else the one-line ``error``."""

    arch: str
    exporter: str
    path: str | None
    error: str | None
    seconds: float
    cached: bool
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dictionary."""
        return asdict(self)


def export_one(root: str | Path, arch: str, exporter: str, retry_failed: bool = False,
               optimum_timeout: float = 900.0) -> ExportResult:
    """Build (cached) and export (cached) ``arch`` with ``exporter`` under ``root``; never raises for export errors.

    A failure is written to ``export_error.txt`` beside the would-be model and returned as
    :attr:`ExportResult.error`.  The torch exporters try ``attn_implementation="sdpa"`` first and
    fall back to ``"eager"`` (recorded in :attr:`ExportResult.note`).
    """
    path = export_path(root, arch, exporter)
    err_file = path.parent / "export_error.txt"
    note_file = path.parent / "export_note.txt"
    if path.is_file():
        note = note_file.read_text().strip() if note_file.is_file() else ""
        return ExportResult(arch, exporter, str(path), None, 0.0, True, note)
    if err_file.is_file() and not retry_failed:
        return ExportResult(arch, exporter, None, err_file.read_text().strip(), 0.0, True)
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    note = ""
    try:
        ckpt = build_checkpoint(arch, checkpoint_dir(root, arch))
        if exporter == "optimum":
            export_optimum(arch, ckpt, path, timeout=optimum_timeout)
        else:
            model = load_model(arch, ckpt, attn_implementation="sdpa")
            try:
                export_torch(model, path, exporter)
            except Exception as exc:  # noqa: BLE001 - recorded, then retried with eager attention
                note = f"sdpa failed ({error_line(exc)}); exported with eager attention"
                export_torch(load_model(arch, ckpt, attn_implementation="eager"), path, exporter)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, none hidden
        msg = error_line(exc)
        if note:
            msg = f"{msg} (with eager attention; {note})"
        err_file.write_text(msg + "\n")
        return ExportResult(arch, exporter, None, msg, time.perf_counter() - start, False, note)
    if err_file.is_file():
        err_file.unlink()
    if note:
        note_file.write_text(note + "\n")
    return ExportResult(arch, exporter, str(path), None, time.perf_counter() - start, False, note)


def export_all(root: str | Path, archs: tuple[str, ...] | list[str] = ARCHS,
               exporters: tuple[str, ...] | list[str] = EXPORTERS, retry_failed: bool = False,
               log: Any = None) -> list[ExportResult]:
    """Export every ``arch`` × ``exporter`` under ``root`` sequentially (cached); return the outcomes."""
    results = []
    for arch in archs:
        for exporter in exporters:
            result = export_one(root, arch, exporter, retry_failed=retry_failed)
            if log is not None:
                status = "ok" if result.path else f"FAILED: {result.error}"
                log(f"export {arch}/{exporter}: {status} ({result.seconds:.1f}s{', cached' if result.cached else ''})")
            results.append(result)
    return results


def main(argv: list[str] | None = None) -> int:
    """Command line: ``export`` (this environment) or ``optimum-export`` (inside the optimum environment)."""
    parser = argparse.ArgumentParser(description="tiny Hugging Face decoders, exported four ways")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("export", help="export archs x exporters under --out")
    p.add_argument("--out", required=True)
    p.add_argument("--archs", default=",".join(ARCHS))
    p.add_argument("--exporters", default=",".join(EXPORTERS))
    p.add_argument("--retry-failed", action="store_true")
    q = sub.add_parser("optimum-export", help="(internal) run optimum's main_export on one checkpoint")
    q.add_argument("--arch", required=True)
    q.add_argument("--checkpoint", required=True)
    q.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "optimum-export":
        try:
            _optimum_export_main(args.arch, args.checkpoint, args.out)
        except Exception as exc:  # noqa: BLE001 - reported as one line to the parent process
            traceback.print_exc()
            print(f"OPTIMUM-EXPORT-ERROR: {error_line(exc)}", file=sys.stderr)
            return 1
        return 0
    results = export_all(args.out, args.archs.split(","), args.exporters.split(","), args.retry_failed,
                         log=lambda s: print(s, flush=True))
    return 0 if all(r.path for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())


def reference_greedy(model: Path, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding of the original ``model`` with plain onnxruntime, batch 1 (independent of eecompile)."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    presents = [x for x in names if x.startswith("present")]
    seq, ids, past, cache, out = list(prompt), np.array([prompt], np.int64), 0, None, []
    for _ in range(n):
        feeds: dict[str, Any] = {}
        for spec in sess.get_inputs():
            if spec.name == "input_ids":
                feeds[spec.name] = ids
            elif spec.name == "attention_mask":
                feeds[spec.name] = np.ones((1, past + ids.shape[1]), np.int64)
            elif spec.name == "position_ids":
                feeds[spec.name] = np.arange(past, past + ids.shape[1], dtype=np.int64)[None]
            elif cache is not None:
                feeds[spec.name] = cache[spec.name]
            else:
                feeds[spec.name] = np.zeros((1, spec.shape[1], 0, spec.shape[3]), np.float32)
        res = dict(zip(names, sess.run(names, feeds)))
        nxt = int(np.argmax(res["logits"][0, -1]))
        out.append(nxt)
        seq.append(nxt)
        if presents:
            past += ids.shape[1]
            cache = {past_name(x): res[x] for x in presents}
            ids = np.array([[nxt]], np.int64)
        else:
            ids = np.array([seq], np.int64)
    return out


def past_name(present: str) -> str:
    """The cache input an exported decoder takes for one of its ``present.*`` outputs (optimum naming)."""
    return present.replace("present", "past_key_values", 1)
