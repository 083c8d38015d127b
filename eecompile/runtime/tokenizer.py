"""The encrypted tokenizer: a Hugging Face ``tokenizer.json`` whose ids are the permuted ids.

A compiled language model sees token ids under a secret vocabulary permutation (plain id
``perm[e]`` travels as ``e``; ``e = argsort(perm)[plain]``). :func:`encrypt_tokenizer`
rewrites every id in a ``tokenizer.json`` with that permutation — the model's vocabulary
(BPE / WordPiece / WordLevel ``vocab`` dicts, the Unigram ``vocab`` list and ``unk_id``),
the ``added_tokens``, the post-processor's special-token ids (``TemplateProcessing``
``special_tokens[*].ids``, ``BertProcessing`` / ``RobertaProcessing`` ``sep`` / ``cls``,
``Sequence`` of those) and the padding id — so that a stock
``tokenizers.Tokenizer.from_file(path)`` encodes text straight to ciphertext ids and
decodes ciphertext ids back to text. Nothing else (merges, normalizers, pre-tokenizers,
decoders) refers to ids, so the text side behaves exactly as before.

The compiler keeps the encrypted tokenizer beside the client bundle:
``client/tokenizer.json`` plus ``client/tokenizer-manifest.json`` (which compilation it
belongs to, and the special tokens: BOS/EOS). See :func:`add_tokenizer_to_bundle`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from eecompile.errors import BundleError, EECompileError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_MANIFEST = "tokenizer-manifest.json"
TOKENIZER_FORMAT = "eecompile-tokenizer"
TOKENIZER_VERSION = 1

# Contents of special tokens that end a generation / start a text, most common first.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<eos>", "<|eos|>", "<|end_of_text|>", "<|im_end|>", "[EOS]", "<|eot_id|>")
BOS_CANDIDATES = ("<s>", "<bos>", "<|bos|>", "<|begin_of_text|>", "<|startoftext|>", "[BOS]")
_UNUSED_PIECE = "<eecompile:unused:{}>"  # Unigram filler pieces for ids the tokenizer does not use
_UNUSED_SCORE = -1e9


class TokenizerError(EECompileError):
    """A tokenizer file is missing, unreadable, of an unsupported kind, or does not fit the model."""


# -- the permutation ---------------------------------------------------------------------
def token_id_permutation(client_or_perm: Any) -> np.ndarray:
    """``perm`` with plain id = ``perm[encrypted id]``, from a Client, a client directory or an array.

    A :class:`~eecompile.runtime.client.Client` (or the path of a client bundle) gives the
    permutation of its token-id input (the ``index`` input named ``input_ids``, or the only
    ``index`` input). A model whose ids are sent in clear gives the identity.
    """
    from eecompile.runtime.client import Client

    if isinstance(client_or_perm, (str, os.PathLike)):
        client_or_perm = Client.load(client_or_perm)
    if isinstance(client_or_perm, Client):
        return client_token_ids(client_or_perm)[1]
    perm = np.asarray(client_or_perm)
    if perm.ndim != 1 or not np.issubdtype(perm.dtype, np.integer) or not np.array_equal(np.sort(perm), np.arange(len(perm))):
        raise TokenizerError("the vocabulary permutation must be a 1-D integer array holding each of 0..n-1 once")
    return perm.astype(np.int64)


def client_token_ids(client) -> tuple[str, np.ndarray]:
    """(name, perm) of the client's token-id input: plain id = ``perm[encrypted id]``."""
    index_inputs = [t for t in client.spec.inputs if t.kind == "index"]
    named = [t for t in client.spec.inputs if t.name == "input_ids"]
    if named and named[0].kind == "index":
        t = named[0]
    elif len(index_inputs) == 1:
        t = index_inputs[0]
    elif named:  # input_ids sent in clear: the identity permutation of the model's vocabulary
        vocab = _clear_vocab_size(client)
        if vocab is None:
            raise BundleError("the model's token ids are sent in clear and its vocabulary size is unknown")
        return named[0].name, np.arange(vocab, dtype=np.int64)
    else:
        names = [t.name for t in client.spec.inputs]
        raise BundleError(f"the compiled model has no token-id input (inputs: {names}); "
                          "expected 'input_ids' or one input with permuted index values")
    return t.name, np.asarray(t.index.index_map(), dtype=np.int64)


def _clear_vocab_size(client) -> int | None:
    for t in client.spec.outputs:
        if t.kind == "axis" and t.heads:
            return int(t.heads[0].size)
    return None


# -- rewriting tokenizer.json ------------------------------------------------------------
def read_tokenizer_json(path: str | os.PathLike) -> dict:
    """Parse a ``tokenizer.json``, failing with one clear line when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer file not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not a tokenizer.json (invalid JSON: {exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise TokenizerError(f"{path} is not a Hugging Face tokenizer.json (no 'model' section)")
    kind = data["model"].get("type") or _guess_model_type(data["model"])
    if kind not in ("BPE", "WordPiece", "WordLevel", "Unigram"):
        raise TokenizerError(f"{path}: tokenizer model type {kind!r} is not supported "
                             "(BPE, WordPiece, WordLevel and Unigram are)")
    data["model"]["type"] = kind
    return data


def _guess_model_type(model: dict) -> str | None:
    if isinstance(model.get("vocab"), list):
        return "Unigram"
    if "merges" in model:
        return "BPE"
    if "continuing_subword_prefix" in model and "max_input_chars_per_word" in model:
        return "WordPiece"
    if isinstance(model.get("vocab"), dict):
        return "WordLevel"
    return None


def tokenizer_ids(data: dict) -> set[int]:
    """Every id a parsed ``tokenizer.json`` uses (model vocabulary, added and special tokens)."""
    ids: set[int] = set()
    _rewrite(data, lambda i: ids.add(int(i)) or int(i), check_only=True)
    return ids


def tokenizer_vocab_size(data: dict) -> int:
    """1 + the largest id a parsed ``tokenizer.json`` uses."""
    ids = tokenizer_ids(data)
    return max(ids) + 1 if ids else 0


def _rewrite(data: dict, f, check_only: bool = False) -> dict:
    """Apply ``f`` to every id in ``data`` (in place unless ``check_only``); return ``data``."""
    model = data["model"]
    kind = model["type"]
    if kind == "Unigram":
        vocab = model.get("vocab") or []
        if check_only:
            for i in range(len(vocab)):
                f(i)
            if model.get("unk_id") is not None:
                f(model["unk_id"])
        else:
            mapped = {f(i): entry for i, entry in enumerate(vocab)}
            size = max(mapped) + 1 if mapped else 0
            model["vocab"] = [mapped.get(i, [_UNUSED_PIECE.format(i), _UNUSED_SCORE]) for i in range(size)]
            if model.get("unk_id") is not None:
                model["unk_id"] = f(model["unk_id"])
    else:
        vocab = model.get("vocab")
        if not isinstance(vocab, dict):
            raise TokenizerError(f"tokenizer model {kind} has no vocab dict")
        new_vocab = {tok: f(i) for tok, i in vocab.items()}
        if not check_only:
            # Keep the file readable: tokens listed in ciphertext id order.
            model["vocab"] = dict(sorted(new_vocab.items(), key=lambda kv: kv[1]))
    for added in data.get("added_tokens") or []:
        new = f(added["id"])
        if not check_only:
            added["id"] = new
    if not check_only and data.get("added_tokens"):
        data["added_tokens"] = sorted(data["added_tokens"], key=lambda a: a["id"])
    if data.get("post_processor"):
        _rewrite_processor(data["post_processor"], f, check_only)
    padding = data.get("padding")
    if isinstance(padding, dict) and padding.get("pad_id") is not None:
        new = f(padding["pad_id"])
        if not check_only:
            padding["pad_id"] = new
    return data


def _rewrite_processor(proc: dict, f, check_only: bool) -> None:
    kind = proc.get("type")
    if kind == "TemplateProcessing":
        for special in (proc.get("special_tokens") or {}).values():
            new = [f(i) for i in special.get("ids", [])]
            if not check_only:
                special["ids"] = new
    elif kind in ("BertProcessing", "RobertaProcessing"):
        for field in ("sep", "cls"):
            if proc.get(field) is not None:
                token, i = proc[field]
                new = f(i)
                if not check_only:
                    proc[field] = [token, new]
    elif kind == "Sequence":
        for sub in proc.get("processors") or []:
            _rewrite_processor(sub, f, check_only)
    # ByteLevel and other processors carry no ids.


def encrypt_tokenizer_data(data: dict, perm: np.ndarray) -> dict:
    """A parsed ``tokenizer.json`` with every plain id ``p`` replaced by ``argsort(perm)[p]``."""
    perm = np.asarray(perm, dtype=np.int64)
    size = tokenizer_vocab_size(data)
    if size > len(perm):
        raise TokenizerError(f"the tokenizer uses ids up to {size - 1} ({size} ids) but the model's vocabulary "
                             f"has {len(perm)} entries: this tokenizer belongs to another model")
    inv = np.argsort(perm)
    data = json.loads(json.dumps(data))  # a deep copy
    return _rewrite(data, lambda i: int(inv[int(i)]))


def encrypt_tokenizer(tokenizer_json_path: str | os.PathLike, client_or_perm: Any,
                      out_path: str | os.PathLike) -> Path:
    """Write the encrypted ``tokenizer.json`` of ``tokenizer_json_path`` to ``out_path``.

    ``client_or_perm`` is a :class:`~eecompile.runtime.client.Client`, the path of a client
    bundle, or the permutation itself (plain id = ``perm[encrypted id]``). Afterwards
    ``Tokenizer.from_file(out_path).encode(text).ids`` are the encrypted ids of the
    plaintext encoding (special tokens included) and ``.decode(encrypted_ids)`` gives the
    text back. Fails with :class:`TokenizerError` when the tokenizer uses more ids than
    the model's vocabulary has.
    """
    perm = token_id_permutation(client_or_perm)
    data = read_tokenizer_json(tokenizer_json_path)
    plain_vocab = _plain_token_ids(data)
    encrypted = encrypt_tokenizer_data(data, perm)
    text = json.dumps(encrypted, ensure_ascii=False, indent=2) + "\n"
    _check_loads(text, plain_vocab, np.argsort(perm), tokenizer_json_path)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out_path)
    return out_path


def _plain_token_ids(data: dict) -> dict[str, int]:
    model = data["model"]
    if model["type"] == "Unigram":
        vocab = {entry[0]: i for i, entry in enumerate(model.get("vocab") or [])}
    else:
        vocab = dict(model.get("vocab") or {})
    for added in data.get("added_tokens") or []:
        vocab[added["content"]] = added["id"]
    return vocab


def _check_loads(text: str, plain_vocab: dict[str, int], inv: np.ndarray, source) -> None:
    """The encrypted file loads with ``tokenizers`` and maps every token to its encrypted id."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a dependency of the models extra
        return
    try:
        tok = Tokenizer.from_str(text)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise TokenizerError(f"{source}: the tokenizers library cannot load it ({exc})") from None
    for token, plain in plain_vocab.items():
        got = tok.token_to_id(token)
        if got is not None and got != int(inv[plain]):
            raise TokenizerError(f"{source}: token {token!r} did not map to its encrypted id (internal check)")


def model_vocab_size(model_path: str | os.PathLike) -> int | None:
    """The vocabulary size of a decoder ONNX model: the last dim of ``logits``, or the rows of the
    table ``input_ids`` gathers from (None when neither says)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    for out in model.graph.output:
        if out.name == "logits":
            dims = out.type.tensor_type.shape.dim
            if dims and dims[-1].HasField("dim_value"):
                return int(dims[-1].dim_value)
    tables = {t.name: list(t.dims) for t in model.graph.initializer if len(t.dims) == 2}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids" and node.input[0] in tables:
            return int(tables[node.input[0]][0])
    return None


def check_tokenizer_fits(tokenizer_json_path: str | os.PathLike, model_path: str | os.PathLike) -> int:
    """Check a tokenizer before compiling: it parses, loads, and its ids fit the model's vocabulary.

    Returns the tokenizer's vocabulary size (1 + its largest id).
    """
    data = read_tokenizer_json(tokenizer_json_path)
    try:
        from tokenizers import Tokenizer

        Tokenizer.from_file(str(tokenizer_json_path))
    except ImportError:  # pragma: no cover
        pass
    except Exception as exc:  # noqa: BLE001
        raise TokenizerError(f"{tokenizer_json_path}: the tokenizers library cannot load it ({exc})") from None
    size = tokenizer_vocab_size(data)
    vocab = model_vocab_size(model_path)
    if vocab is not None and size > vocab:
        raise TokenizerError(f"the tokenizer {tokenizer_json_path} uses ids up to {size - 1} ({size} ids) but the "
                             f"model's vocabulary has {vocab} entries: this tokenizer belongs to another model")
    return size


# -- the tokenizer in a client bundle ----------------------------------------------------
def _special_tokens(data: dict) -> tuple[list[str], list[str]]:
    added = [a["content"] for a in data.get("added_tokens") or [] if a.get("special", True)]
    eos = [t for t in EOS_CANDIDATES if t in added]
    bos = [t for t in BOS_CANDIDATES if t in added]
    return eos[:1], bos[:1]


def add_tokenizer_to_bundle(tokenizer_json_path: str | os.PathLike, client_dir: str | os.PathLike,
                            *, eos_tokens: list[str] | None = None, max_positions: int | None = None) -> Path:
    """Encrypt a tokenizer into ``client_dir/tokenizer.json`` and write ``tokenizer-manifest.json``.

    The manifest names the compilation the tokenizer belongs to (the client bundle's
    ``model_id``), the source file's SHA-256, the vocabulary sizes, the special tokens
    (EOS tokens end a generation; ``eos_tokens`` overrides the ones recognised by name) and,
    when given, the model's context length ``max_positions`` (generation refuses longer
    prompts and stops when it is full).
    """
    from eecompile.runtime.client import Client

    client_dir = Path(client_dir)
    client = Client.load(client_dir)
    data = read_tokenizer_json(tokenizer_json_path)
    perm = token_id_permutation(client)
    out = encrypt_tokenizer(tokenizer_json_path, perm, client_dir / TOKENIZER_FILE)
    eos, bos = _special_tokens(data)
    if eos_tokens is not None:
        known = _plain_token_ids(data)
        missing = [t for t in eos_tokens if t not in known]
        if missing:
            raise TokenizerError(f"EOS token(s) {missing} are not in the tokenizer's vocabulary")
        eos = list(eos_tokens)
    manifest = {
        "format": TOKENIZER_FORMAT,
        "version": TOKENIZER_VERSION,
        "model_id": client.model_id,
        "tokenizer": TOKENIZER_FILE,
        "tokenizer_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "source_sha256": hashlib.sha256(Path(tokenizer_json_path).read_bytes()).hexdigest(),
        "tokenizer_vocab_size": tokenizer_vocab_size(data),
        "model_vocab_size": int(len(perm)),
        "eos_tokens": eos,
        "bos_tokens": bos,
    }
    if max_positions is not None:
        manifest["max_positions"] = int(max_positions)
    (client_dir / TOKENIZER_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return out


def load_bundle_tokenizer(client_dir: str | os.PathLike, model_id: str | None = None):
    """(``tokenizers.Tokenizer``, manifest) of the encrypted tokenizer in a client bundle, or None.

    Fails with :class:`~eecompile.errors.BundleError` when the tokenizer belongs to another
    compilation than ``model_id`` or its file was changed.
    """
    client_dir = Path(client_dir)
    manifest_path = client_dir / TOKENIZER_MANIFEST
    if not manifest_path.is_file():
        return None
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"tokenizer manifest {manifest_path} is corrupt ({exc})") from None
    if manifest.get("format") != TOKENIZER_FORMAT or manifest.get("version") != TOKENIZER_VERSION:
        raise BundleError(f"{manifest_path} is not an eecompile tokenizer manifest of version {TOKENIZER_VERSION}")
    if model_id is not None and manifest.get("model_id") != model_id:
        raise BundleError(f"the tokenizer in {client_dir} belongs to another compilation than this client bundle")
    path = client_dir / manifest.get("tokenizer", TOKENIZER_FILE)
    if not path.is_file():
        raise BundleError(f"the tokenizer manifest names {path}, which is missing")
    if hashlib.sha256(path.read_bytes()).hexdigest() != manifest.get("tokenizer_sha256"):
        raise BundleError(f"{path} does not match its manifest (changed or from another compilation)")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise TokenizerError("the 'tokenizers' package is needed to use the encrypted tokenizer "
                             "(pip install tokenizers)") from None
    try:
        return Tokenizer.from_file(str(path)), manifest
    except Exception as exc:  # noqa: BLE001
        raise BundleError(f"{path} cannot be loaded by the tokenizers library ({exc})") from None
