"""ONNX Runtime GenAI: a server folder the stock ``onnxruntime_genai`` runtime loads, and generation with it.

The model builder (``python -m onnxruntime_genai.models.builder``) writes ``model.onnx`` beside a
``genai_config.json`` that ``og.Model`` reads. A compiled builder model is served by the same
runtime unchanged: the server folder gets a copy of that config in which the only key-derived
values are the special token ids the runtime itself must recognise (EOS to stop, PAD to pad a
batch, BOS/decoder-start where present), written as the ids the server sees. Everything else is
the builder's. The client keeps the permutation (``client/``) and the encrypted tokenizer.

:func:`genai_generate` runs the whole flow in one process — the client encrypts the prompt ids,
``og.Generator`` appends them and searches on the server model (greedy or sampled, KV cache
managed by the runtime, on ciphertext), the client decrypts what it returns.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eecompile.errors import BundleError, EECompileError

CONFIG = "genai_config.json"
TOKEN_ID_KEYS = ("eos_token_id", "pad_token_id", "bos_token_id", "decoder_start_token_id")
"""Entries of ``genai_config.json["model"]`` that hold token ids the runtime reads."""
GENAI_POLICY = ("onnxruntime-genai: server/genai_config.json is the builder's, with its special token ids (eos, pad, "
                "bos) written as the server sees them; the server learns which ciphertext id ends a generation and "
                "nothing else of the vocabulary permutation")


class GenAIError(EECompileError):
    """onnxruntime-genai is missing, or a folder is not one it can load."""


def source_config(model_path: str | Path) -> dict | None:
    """The ``genai_config.json`` beside ``model_path`` when it describes that model, else None."""
    path = Path(model_path).parent / CONFIG
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise GenAIError(f"{path} is not valid JSON: {exc}") from exc
    decoder = config.get("model", {}).get("decoder", {}) if isinstance(config, dict) else {}
    if decoder.get("filename", Path(model_path).name) != Path(model_path).name:
        return None  # the config is about another model in the folder
    return config


def head_size(model_path: str | Path) -> int | None:
    """The decoder's ``head_size`` from the ``genai_config.json`` beside ``model_path`` (its KV-cache width)."""
    config = source_config(model_path)
    try:
        return int(config["model"]["decoder"]["head_size"]) if config else None
    except (KeyError, TypeError, ValueError):
        return None


def _encrypted(value, wire_of: np.ndarray, key: str):
    if isinstance(value, list):
        return [_encrypted(v, wire_of, key) for v in value]
    plain = int(value)
    if not 0 <= plain < len(wire_of):
        raise GenAIError(f"{CONFIG}: {key} {plain} lies outside the model's vocabulary of {len(wire_of)}")
    return int(wire_of[plain])


def server_config(config: dict, perm: np.ndarray, filename: str = "model.onnx") -> dict:
    """The config for the server folder: special token ids as the server sees them, the server model's file.

    ``perm`` is the client's vocabulary permutation (plain id = ``perm[wire id]``).
    """
    wire_of = np.argsort(np.asarray(perm))
    out = json.loads(json.dumps(config))
    model = out.setdefault("model", {})
    for key in TOKEN_ID_KEYS:
        if key in model and model[key] is not None:
            model[key] = _encrypted(model[key], wire_of, key)
    if "vocab_size" in model and int(model["vocab_size"]) != len(perm):
        raise GenAIError(f"{CONFIG}: vocab_size {model['vocab_size']} differs from the model's {len(perm)}")
    model.setdefault("decoder", {})["filename"] = filename
    return out


def write_server_config(model_path: str | Path, server_dir: Path, client) -> Path | None:
    """Write ``server_dir/genai_config.json`` for a builder model (None when ``model_path`` has no config).

    Raises :class:`BundleError` when the compiled logits do not use the token-id permutation: the
    runtime feeds each generated id back as input, so without that tie it cannot generate.
    """
    config = source_config(model_path)
    if config is None:
        return None
    from eecompile.runtime.generate import _vocab_map_of_logits
    from eecompile.runtime.tokenizer import client_token_ids

    ids_name, perm = client_token_ids(client)
    _vocab_map_of_logits(client, ids_name, perm)
    path = server_dir / CONFIG
    path.write_text(json.dumps(server_config(config, perm), indent=4) + "\n")
    return path


def source_tokenizer(model_path: str | Path) -> Path | None:
    """The builder's ``tokenizer.json`` beside a model that has a ``genai_config.json``, else None."""
    folder = Path(model_path).parent
    tokenizer = folder / "tokenizer.json"
    return tokenizer if source_config(model_path) is not None and tokenizer.is_file() else None


def _og():
    try:
        import onnxruntime_genai as og
    except ImportError as exc:
        raise GenAIError("onnxruntime-genai is not installed: pip install 'eecompile[genai]'") from exc
    return og


@dataclass
class GenAIResult:
    """One generation with the stock runtime: what the client reads and what the server saw."""

    plain_ids: list[int]
    wire_ids: list[int]
    prompt_wire_ids: list[int]
    text: str | None = None


def run_generator(folder: str | Path, prompt_ids: Sequence[int], max_new_tokens: int, *,
                  temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  seed: int | None = None, provider: str = "cpu") -> list[int]:
    """Stock ``og.Generator`` on the model folder ``folder``: the ids it generates after ``prompt_ids``.

    Greedy unless ``temperature > 0``; stops at the config's EOS ids or after ``max_new_tokens``.
    This function sees only what it is given — for a compiled folder, ciphertext ids.
    """
    og = _og()
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise GenAIError(f"{folder} has no {CONFIG}: not a folder onnxruntime-genai can load")
    config = og.Config(str(folder))
    if provider == "cuda":
        config.clear_providers()
        config.append_provider("cuda")
    elif provider == "cpu":
        config.clear_providers()
    model = og.Model(config)
    params = og.GeneratorParams(model)
    sample = temperature > 0
    options = {"max_length": len(prompt_ids) + max_new_tokens, "do_sample": sample}
    if sample:
        options["temperature"] = float(temperature)
        options["top_k"] = int(top_k) if top_k else 0
        options["top_p"] = float(top_p) if top_p else 1.0
    if seed is not None:
        options["random_seed"] = int(seed)
    params.set_search_options(**options)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray([list(prompt_ids)], dtype=np.int32))
    new: list[int] = []
    while not generator.is_done() and len(new) < max_new_tokens:
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    return new


def genai_generate(out_dir: str | Path, prompt: str | Sequence[int], max_new_tokens: int, *,
                   temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                   seed: int | None = None, provider: str = "cpu", add_special_tokens: bool = True) -> GenAIResult:
    """Client encrypts ``prompt`` (text with the encrypted tokenizer, or plaintext ids), the stock runtime
    generates on ``out_dir/server``, the client decrypts the generated ids (and decodes them to text)."""
    from eecompile.runtime.generate import GenerationClient

    out_dir = Path(out_dir)
    server = out_dir / "server"
    if not (server / CONFIG).is_file():
        raise BundleError(f"{server} has no {CONFIG}: compile a model from the onnxruntime-genai model builder "
                          "(its folder holds genai_config.json) to serve it with onnxruntime-genai")
    client = GenerationClient.load(out_dir / "client")
    wire_prompt = client.encode(prompt, add_special_tokens) if isinstance(prompt, str) else client.encrypt_ids(prompt)
    wire = run_generator(server, wire_prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                         seed=seed, provider=provider)
    text = client.continuation(wire_prompt, wire) if isinstance(prompt, str) else None
    return GenAIResult(client.decrypt_ids(wire), wire, wire_prompt, text)
