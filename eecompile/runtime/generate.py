"""Text generation on ciphertext: the server decodes encrypted ids, only the client reads the text.

A compiled decoder's token ids travel under a secret vocabulary permutation, and its
logits come back under *the same* permutation (the report's "vocabulary tie"). So the
server can pick the next token without decrypting anything: greedy argmax, and sampling
with temperature / top-k / top-p, depend only on the multiset of logit values, not on
their order. The server sorts by probability, cuts top-k and top-p on the sorted list and
draws by inverse CDF with a seeded uniform; the token it picks is the encrypted id of the
token the plaintext model would pick with the same seed. That id is fed straight back.

Two sides, kept apart in the code as they would be on two machines:

* :class:`ServerDecoder` — owns the ONNX Runtime session of ``server/model.onnx``, holds
  the KV cache (ciphertext: ``present.*`` outputs fed back as ``past_key_values.*``) on
  the device with IO binding, takes encrypted ids, samples the next encrypted id on the
  device (a tiny ONNX sampler graph), stops on the encrypted EOS ids the client sends.
  Only the sampled id crosses to the host per step. Decoders without a cache re-run the
  whole sequence each step (a sliding window of the model's context when it is full).
* :class:`GenerationClient` — encrypts prompt ids (or encodes text with the encrypted
  tokenizer), decrypts the returned ids and decodes them to text.

:class:`EncryptedGenerator` puts both in one process; :class:`PlainGenerator` runs the
original model with the same loop and sampler, as the reference.

Decoder interface (the Hugging Face / optimum convention, as either torch exporter writes
it): inputs ``input_ids``, optional ``attention_mask`` (ones over past + new tokens),
optional ``position_ids`` (``past .. past+new-1``), ``past_key_values.N.key|value``
(batch × kv_heads × past × head_dim); outputs ``logits`` and ``present.N.key|value``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from eecompile.errors import BundleError, EECompileError
from eecompile.runtime.ort_session import make_session, session_device

StreamCallback = Callable[[int], None]

_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(bfloat16)": None, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
_MAX_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_positions", "context_length",
                      "max_sequence_length", "n_ctx")


class GenerationError(EECompileError):
    """Bad generation input: an empty or too long prompt, ids outside the vocabulary, bad sampling settings."""


class UnsupportedDecoderError(EECompileError):
    """The model does not have the decoder interface generation needs."""


# -- sampling ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen: greedy when ``temperature == 0`` (the default)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k is not None and (int(self.top_k) != self.top_k or self.top_k < 1):
            raise GenerationError(f"top-k must be a positive integer, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise GenerationError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer))
                                      or not 0 <= self.seed < 2 ** 128):
            raise GenerationError(f"the seed must be an integer in [0, 2**128), got {self.seed}")
        if self.greedy and (self.top_k is not None or self.top_p is not None):
            raise GenerationError("top-k and top-p need a temperature > 0 (temperature 0 is greedy decoding)")

    @property
    def greedy(self) -> bool:
        """Greedy (argmax) decoding."""
        return self.temperature == 0


def _sampler_inputs(config: SamplingConfig, vocab: int, u: float) -> dict[str, np.ndarray]:
    k = vocab if config.top_k is None else min(int(config.top_k), vocab)
    return {"temperature": np.array(config.temperature, np.float32), "k": np.array([k], np.int64),
            "top_p": np.array(1.0 if config.top_p is None else config.top_p, np.float32),
            "u": np.array([[u]], np.float32)}


def build_sampler_model(greedy: bool, logits_elem_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """The sampler as an ONNX graph: ``logits [B, S, V]`` (+ settings) → ``next_id [B, 1]`` int64.

    Greedy: ``ArgMax`` of the last position. Sampling: ``TopK(k)`` sorts the last row of
    ``logits / temperature`` by value; ``Softmax`` over the kept values renormalises; a
    token is kept for top-p while the mass before it is ``< top_p`` (the first always
    is); the draw is the first sorted token whose cumulative kept mass exceeds
    ``u * total`` for the uniform ``u`` in ``[0, 1)``. Every step is order-free, so the
    same ``u`` picks the same token under any vocabulary permutation.
    """
    nodes, inits = [], []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(onnx.numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(op: str, inputs: list[str], outputs: list[str] | str, **attrs) -> list[str] | str:
        outs = [outputs] if isinstance(outputs, str) else outputs
        nodes.append(helper.make_node(op, inputs, outs, name=f"sampler_{outs[0]}", **attrs))
        return outputs

    last = node("Gather", ["logits", const("last_index", np.array(-1, np.int64))], "last_logits", axis=1)
    if logits_elem_type != TensorProto.FLOAT:
        last = node("Cast", [last], "last_logits_f32", to=TensorProto.FLOAT)
    inputs = [helper.make_tensor_value_info("logits", logits_elem_type, ["batch", "sequence", "vocab"])]
    if greedy:
        node("ArgMax", [last], "next_id", axis=-1, keepdims=1)
    else:
        inputs += [helper.make_tensor_value_info("temperature", TensorProto.FLOAT, []),
                   helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
                   helper.make_tensor_value_info("top_p", TensorProto.FLOAT, []),
                   helper.make_tensor_value_info("u", TensorProto.FLOAT, ["batch", 1])]
        axis = const("minus_one", np.array(-1, np.int64))
        axes = const("axes_last", np.array([-1], np.int64))
        scaled = node("Div", [last, "temperature"], "scaled")
        values, order = node("TopK", [scaled, "k"], ["top_values", "top_order"], axis=-1, largest=1, sorted=1)
        probs = node("Softmax", [values], "top_probs", axis=-1)
        cum = node("CumSum", [probs, axis], "cum_probs")
        before = node("Sub", [cum, probs], "mass_before")
        keep = node("Less", [before, "top_p"], "keep")
        kept = node("Mul", [probs, node("Cast", [keep], "keep_f32", to=TensorProto.FLOAT)], "kept_probs")
        kept_cum = node("CumSum", [kept, axis], "kept_cum")
        total = node("Gather", [kept_cum, const("last_col", np.array([-1], np.int64))], "kept_total", axis=-1)
        threshold = node("Mul", ["u", total], "threshold")
        passed = node("Cast", [node("LessOrEqual", [kept_cum, threshold], "passed_bool")], "passed", to=TensorProto.INT64)
        count = node("ReduceSum", [passed, axes], "passed_count", keepdims=1)
        n_keep = node("ReduceSum", [node("Cast", [keep], "keep_i64", to=TensorProto.INT64), axes], "n_keep", keepdims=1)
        last_kept = node("Sub", [n_keep, const("one", np.array(1, np.int64))], "last_kept")
        pick = node("Min", [count, last_kept], "pick")
        node("GatherElements", [order, pick], "next_id", axis=-1)
    graph = helper.make_graph(nodes, "eecompile_sampler", inputs,
                              [helper.make_tensor_value_info("next_id", TensorProto.INT64, ["batch", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], producer_name="eecompile.sampler")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def sample_reference(logits: np.ndarray, config: SamplingConfig, u: float | None = None) -> int:
    """The sampler in numpy (float32, the same steps as :func:`build_sampler_model`), for one logits row."""
    row = np.asarray(logits, dtype=np.float32).reshape(-1)
    if config.greedy:
        return int(np.argmax(row))
    scaled = row / np.float32(config.temperature)
    k = len(row) if config.top_k is None else min(int(config.top_k), len(row))
    order = np.argsort(-scaled, kind="stable")[:k]
    values = scaled[order]
    probs = np.exp(values - values[0])
    probs = (probs / probs.sum()).astype(np.float32)
    cum = np.cumsum(probs, dtype=np.float32)
    keep = (cum - probs) < np.float32(1.0 if config.top_p is None else config.top_p)
    kept = probs * keep
    kept_cum = np.cumsum(kept, dtype=np.float32)
    count = int(np.sum(kept_cum <= np.float32(u) * kept_cum[-1]))
    return int(order[min(count, int(keep.sum()) - 1)])


# -- the decoder interface ---------------------------------------------------------------
@dataclass
class CacheEntry:
    """One KV-cache tensor: the ``past`` input and the ``present`` output that feeds it next step."""

    past: str
    present: str
    shape: list[int]  # with 0 on the sequence axis (2): the empty cache of batch 1
    dtype: np.dtype


@dataclass
class DecoderInterface:
    """What a decoder model takes and returns, read from its ONNX Runtime session."""

    ids: str
    ids_dtype: np.dtype
    logits: str
    logits_elem_type: int
    vocab_size: int | None
    attention_mask: str | None = None
    mask_dtype: np.dtype = np.dtype(np.int64)
    position_ids: str | None = None
    position_dtype: np.dtype = np.dtype(np.int64)
    cache: list[CacheEntry] = field(default_factory=list)
    max_positions: int | None = None

    @property
    def has_cache(self) -> bool:
        """Whether the model has a KV cache (``past_*`` inputs)."""
        return bool(self.cache)


def _cache_key(name: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if name.startswith(prefix):
            return name[len(prefix):].lstrip("._")
    return None


def read_interface(session, model_path: str | Path | None = None) -> DecoderInterface:
    """The :class:`DecoderInterface` of a decoder session (``model_path`` to find its context length)."""
    inputs = {i.name: i for i in session.get_inputs()}
    outputs = {o.name: o for o in session.get_outputs()}
    if "input_ids" not in inputs:
        raise UnsupportedDecoderError(f"the model has no 'input_ids' input (inputs: {sorted(inputs)}); "
                                      "generation needs a decoder with the Hugging Face input names")
    if "logits" not in outputs:
        raise UnsupportedDecoderError(f"the model has no 'logits' output (outputs: {sorted(outputs)})")
    logits = outputs["logits"]
    elem = {"tensor(float)": TensorProto.FLOAT, "tensor(float16)": TensorProto.FLOAT16,
            "tensor(double)": TensorProto.DOUBLE, "tensor(bfloat16)": TensorProto.BFLOAT16}.get(logits.type)
    if elem is None:
        raise UnsupportedDecoderError(f"'logits' has type {logits.type}; expected a float tensor")
    vocab = logits.shape[-1] if logits.shape and isinstance(logits.shape[-1], int) else None
    iface = DecoderInterface("input_ids", np.dtype(_NP_TYPES.get(inputs["input_ids"].type, np.int64)),
                             "logits", elem, vocab)
    presents = {_cache_key(n, ("present",)): n for n in outputs if n != "logits"}
    for name, value in inputs.items():
        if name == "input_ids":
            continue
        if name == "attention_mask":
            iface.attention_mask, iface.mask_dtype = name, np.dtype(_NP_TYPES.get(value.type) or np.int64)
            continue
        if name == "position_ids":
            iface.position_ids, iface.position_dtype = name, np.dtype(_NP_TYPES.get(value.type) or np.int64)
            continue
        key = _cache_key(name, ("past_key_values", "past"))
        if key is None:
            raise UnsupportedDecoderError(f"the decoder input '{name}' is not supported by generation "
                                          "(expected input_ids, attention_mask, position_ids, past_key_values.*)")
        present = presents.get(key)
        if present is None:
            raise UnsupportedDecoderError(f"the cache input '{name}' has no matching 'present' output")
        shape = list(value.shape)
        if len(shape) != 4:
            raise UnsupportedDecoderError(f"cache input '{name}' has rank {len(shape)}; expected "
                                          "[batch, kv_heads, past_sequence, head_dim]")
        out_shape = list(outputs[present].shape)
        dims = []
        for axis in (1, 3):
            dim = shape[axis] if isinstance(shape[axis], int) else (
                out_shape[axis] if len(out_shape) == 4 and isinstance(out_shape[axis], int) else None)
            if dim is None and axis == 3 and model_path is not None:
                from eecompile.genai import head_size

                dim = head_size(model_path)  # a model-builder cache: [batch, kv_heads, length, kv_cache_dim]
            if dim is None:
                raise UnsupportedDecoderError(f"cache input '{name}' has no static size on axis {axis} "
                                              f"(shape {shape}); cannot build the empty cache")
            dims.append(dim)
        dtype = _NP_TYPES.get(value.type)
        if dtype is None:
            raise UnsupportedDecoderError(f"cache input '{name}' has unsupported type {value.type}")
        iface.cache.append(CacheEntry(name, present, [1, dims[0], 0, dims[1]], np.dtype(dtype)))
    if model_path is not None:
        iface.max_positions, table_vocab = _model_limits(model_path)
        if iface.vocab_size is None:
            iface.vocab_size = table_vocab
    return iface


def model_context_length(model_path: str | Path) -> int | None:
    """The context length an ONNX decoder declares: metadata ``max_position_embeddings`` (or a
    similar key), else ``max_position_embeddings`` (or similar) in a ``config.json`` beside the
    model, else the rows of a learned position-embedding table or of a RoPE cos/sin cache;
    None when unknown."""
    return _model_limits(model_path)[0]


def _positive_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.strip().isdigit():
        return int(value) or None
    return None


def _config_context(model_path: Path) -> int | None:
    """``max_position_embeddings`` (or a similar key) of the Hugging Face style ``config.json`` beside the model."""
    config = model_path.parent / "config.json"
    try:
        doc = json.loads(config.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    for section in (doc, doc.get("text_config"), doc.get("llm_config")):
        if isinstance(section, dict):
            for key in _MAX_POSITION_KEYS:
                value = _positive_int(section.get(key))
                if value is not None:
                    return value
    return None


def _rope_cache_rows(model: onnx.ModelProto, tables: dict[str, list[int]]) -> list[int]:
    """Rows of RoPE cos/sin caches: constant inputs of a RotaryEmbedding op, or tables gathered by position ids."""
    rows = []
    for n in model.graph.node:
        if n.op_type == "RotaryEmbedding":
            rows += [tables[i][0] for i in n.input if i in tables]
    positions = {"position_ids"}
    for n in model.graph.node:  # position ids reach a cache through casts and reshapes at most
        if n.op_type in ("Cast", "Identity", "Unsqueeze", "Squeeze", "Reshape", "Flatten") and n.input \
                and n.input[0] in positions:
            positions.update(n.output)
    rows += [tables[n.input[0]][0] for n in model.graph.node
             if n.op_type == "Gather" and len(n.input) > 1 and n.input[0] in tables and n.input[1] in positions]
    return rows


def _model_limits(model_path: str | Path) -> tuple[int | None, int | None]:
    """(context length, vocabulary size) read from the graph: metadata, a config beside it, or the tables.

    The context length is, in this order: a metadata entry (``max_position_embeddings`` and
    similar keys); the same key in a ``config.json`` beside the model; the row count of a
    learned position-embedding table (a constant 2-D table gathered by something other than
    ``input_ids``, as wide as the token table); the row count of a RoPE cos/sin cache.
    Models computing rotary angles on the fly and stating nothing have none (None).
    """
    from eecompile.passes.store import load_structure

    model_path = Path(model_path)
    try:
        model = load_structure(model_path)  # the structure only: embedded weights stay in the file
    except Exception as exc:  # noqa: BLE001 - protobuf / onnx errors of a file that is not a model
        from eecompile.errors import ModelFileError

        raise ModelFileError(f"cannot read {model_path} as an ONNX model ({type(exc).__name__})") from None
    max_positions = None
    for prop in model.metadata_props:
        if prop.key in _MAX_POSITION_KEYS and _positive_int(prop.value) is not None:
            max_positions = int(prop.value)
    if max_positions is None:
        max_positions = _config_context(model_path)
    tables = {t.name: list(t.dims) for t in model.graph.initializer if len(t.dims) == 2}
    ids_like = {"input_ids"}
    for n in model.graph.node:  # ids reach the embedding through Casts at most
        if n.op_type in ("Cast", "Identity") and n.input and n.input[0] in ids_like:
            ids_like.update(n.output)
    token_tables = [tables[n.input[0]] for n in model.graph.node
                    if n.op_type == "Gather" and len(n.input) > 1 and n.input[0] in tables and n.input[1] in ids_like]
    vocab = token_tables[0][0] if token_tables else None
    if max_positions is None and token_tables:
        width = token_tables[0][1]
        rows = [tables[n.input[0]][0] for n in model.graph.node
                if n.op_type == "Gather" and len(n.input) > 1 and n.input[0] in tables
                and n.input[1] not in ids_like and tables[n.input[0]][1] == width]
        max_positions = min(rows) if rows else None
    if max_positions is None:
        rows = _rope_cache_rows(model, tables)
        max_positions = min(rows) if rows else None
    return max_positions, vocab


# -- the server side ---------------------------------------------------------------------
class ServerDecoder:
    """Runs a decoder on (encrypted) ids: holds the session, the KV cache and the last logits on the device.

    It never sees plaintext and needs nothing from the client bundle. ``prefill(ids)``
    runs the prompt; ``sample(config, u)`` picks the next id from the last logits on the
    device (only that id crosses to the host); ``append(id)`` runs one decode step;
    :meth:`generate` loops. With ``io_binding=True`` (the default) the ``present.*`` outputs
    stay in device OrtValues that are bound as the next step's ``past_*`` inputs; with
    ``False`` every tensor goes through numpy (the reference path). ``binding_runs`` and
    ``host_runs`` count model runs of each kind.
    """

    def __init__(self, model_path: str | Path, provider: str | list[str] | None = "auto", *,
                 io_binding: bool = True, max_positions: int | None = None) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise BundleError(f"no decoder model at {self.model_path}")
        self.session = make_session(self.model_path, provider)
        self.providers = self.session.get_providers()
        self.device_type, self.device_id = session_device(self.session)
        self.interface = read_interface(self.session, self.model_path)
        if max_positions is not None:
            if max_positions < 1:
                raise GenerationError(f"the context length must be positive, got {max_positions}")
            self.interface.max_positions = int(max_positions)
        self.io_binding = io_binding
        self.binding_runs = 0
        self.host_runs = 0
        self.sampler_runs = 0
        samplers = {greedy: build_sampler_model(greedy, self.interface.logits_elem_type).SerializeToString()
                    for greedy in (True, False)}
        self._samplers = {greedy: make_session(blob, self.providers) for greedy, blob in samplers.items()}
        self.reset()

    # -- state ----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int | None:
        """Size of the model's vocabulary (None when the graph does not say)."""
        return self.interface.vocab_size

    @property
    def max_positions(self) -> int | None:
        """The model's context length (None when unknown or unbounded, e.g. rotary positions)."""
        return self.interface.max_positions

    @property
    def tokens(self) -> list[int]:
        """Every id of the current sequence (prompt and generated), as the server saw them."""
        return list(self._tokens)

    def reset(self) -> None:
        """Forget the sequence, the cache and the logits."""
        self._tokens: list[int] = []
        self._past_length = 0
        self._cache: dict[str, object] = {}
        self._logits = None
        self._keepalive: list[np.ndarray] = []

    def check_ids(self, ids: Sequence[int]) -> list[int]:
        """``ids`` as ints, or a :class:`GenerationError` when one lies outside the vocabulary."""
        out = [int(i) for i in ids]
        vocab = self.vocab_size
        bad = [i for i in out if i < 0 or (vocab is not None and i >= vocab)]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the model's vocabulary [0, {vocab})")
        return out

    def can_append(self) -> bool:
        """Whether one more token fits (always for cache-less models: their window slides)."""
        if not self.interface.has_cache or self.max_positions is None:
            return True
        return len(self._tokens) < self.max_positions

    # -- running the model ------------------------------------------------------------------
    def prefill(self, ids: Sequence[int]) -> None:
        """Start a sequence with the prompt ``ids`` (fails if empty, outside the vocabulary or too long)."""
        ids = self.check_ids(ids)
        if not ids:
            raise GenerationError("the prompt is empty; generation needs at least one token")
        if self.max_positions is not None and len(ids) > self.max_positions:
            raise GenerationError(f"the prompt has {len(ids)} tokens but the model's context holds "
                                  f"{self.max_positions}")
        self.reset()
        self._run(ids)

    def append(self, token: int) -> None:
        """Run one decode step with ``token`` (after :meth:`prefill`)."""
        if not self._tokens:
            raise GenerationError("append() before prefill()")
        (token,) = self.check_ids([token])
        if not self.can_append():
            raise GenerationError(f"the model's context of {self.max_positions} tokens is full")
        self._run([token])

    def _feeds(self, new: list[int]) -> tuple[dict[str, np.ndarray], int]:
        iface = self.interface
        self._tokens.extend(new)
        if iface.has_cache:
            run_ids, past = new, self._past_length
        else:  # re-run the whole sequence, or the last max_positions tokens of it
            run_ids = self._tokens[-self.max_positions:] if self.max_positions else self._tokens
            past = 0
        total = past + len(run_ids)
        feeds = {iface.ids: np.array([run_ids], dtype=iface.ids_dtype)}
        if iface.attention_mask:
            feeds[iface.attention_mask] = np.ones((1, total), dtype=iface.mask_dtype)
        if iface.position_ids:
            feeds[iface.position_ids] = np.arange(past, total, dtype=iface.position_dtype)[None, :]
        return feeds, total

    def _run(self, new: list[int]) -> None:
        feeds, total = self._feeds(new)
        iface = self.interface
        names = [iface.logits] + [c.present for c in iface.cache]
        if self.io_binding:
            binding = self.session.io_binding()
            for name, value in feeds.items():
                self._keepalive.append(value)
                binding.bind_cpu_input(name, value)
            for entry in iface.cache:
                value = self._cache.get(entry.past)
                if value is None:  # the empty cache (no bytes to copy) at the start of a sequence
                    empty = np.zeros(entry.shape, dtype=entry.dtype)
                    self._keepalive.append(empty)
                    binding.bind_cpu_input(entry.past, empty)
                else:  # the previous step's present.* OrtValue, still on the device
                    binding.bind_ortvalue_input(entry.past, value)
            for name in names:
                binding.bind_output(name, self.device_type, self.device_id)
            self.session.run_with_iobinding(binding)
            outputs = binding.get_outputs()
            self.binding_runs += 1
        else:
            for entry in iface.cache:
                value = self._cache.get(entry.past)
                feeds[entry.past] = np.zeros(entry.shape, dtype=entry.dtype) if value is None else value
            outputs = self.session.run(names, feeds)
            self.host_runs += 1
        self._logits = outputs[0]
        self._cache = {entry.past: outputs[i + 1] for i, entry in enumerate(iface.cache)}
        self._keepalive = []
        if iface.has_cache:
            self._past_length = total

    def sample(self, config: SamplingConfig, u: float | None = None) -> int:
        """The next id from the last logits: greedy, or sampled with the uniform ``u`` in [0, 1)."""
        if self._logits is None:
            raise GenerationError("sample() before prefill()")
        session = self._samplers[config.greedy]
        feeds = {} if config.greedy else _sampler_inputs(config, self.vocab_size or self._vocab_from_logits(), u)
        if self.io_binding:
            binding = session.io_binding()
            binding.bind_ortvalue_input("logits", self._logits)
            for name, value in feeds.items():
                binding.bind_cpu_input(name, value)
            binding.bind_output("next_id", "cpu")
            session.run_with_iobinding(binding)
            (next_id,) = binding.copy_outputs_to_cpu()
        else:
            (next_id,) = session.run(["next_id"], {"logits": self._logits, **feeds})
        self.sampler_runs += 1
        return int(next_id.reshape(-1)[0])

    def _vocab_from_logits(self) -> int:
        shape = self._logits.shape() if callable(getattr(self._logits, "shape", None)) else self._logits.shape
        return int(shape[-1])

    # -- the loop ---------------------------------------------------------------------------
    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig | None = None, *,
                 eos_ids: Iterable[int] = (), stream: StreamCallback | None = None) -> "ServerResult":
        """Prefill ``prompt_ids`` and decode up to ``max_new_tokens`` ids (stopping after an EOS id).

        ``stream`` is called with every id as soon as it is chosen. The sampler draws one
        uniform per token from ``numpy.random.default_rng(sampling.seed)``.
        """
        sampling = sampling or SamplingConfig()
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens}")
        eos = set(self.check_ids(list(eos_ids)))
        rng = None if sampling.greedy else np.random.default_rng(sampling.seed)
        started = time.perf_counter()
        self.prefill(prompt_ids)
        out: list[int] = []
        step_times: list[float] = []
        reason = "length"
        prefill_s = 0.0
        t0 = time.perf_counter()
        while len(out) < max_new_tokens:
            token = self.sample(sampling, None if rng is None else float(rng.random()))
            now = time.perf_counter()
            if not out:
                prefill_s = now - started
            else:
                step_times.append(now - t0)
            t0 = now
            out.append(token)
            if stream is not None:
                stream(token)
            if token in eos:
                reason = "eos"
                break
            if len(out) == max_new_tokens:
                break
            if not self.can_append():
                reason = "context"
                break
            self.append(token)
        return ServerResult(out, reason, prefill_s, step_times)


@dataclass
class ServerResult:
    """What :meth:`ServerDecoder.generate` produced: ids, why it stopped, timings."""

    ids: list[int]
    finish_reason: str  # "length" | "eos" | "context"
    prefill_seconds: float
    step_seconds: list[float]


# -- the client side ---------------------------------------------------------------------
def _vocab_map_of_logits(client, ids_name: str, perm: np.ndarray) -> None:
    """Check that the logits are permuted by exactly the token-id permutation (the "vocabulary tie")."""
    logits = [t for t in client.spec.outputs if t.name == "logits"]
    if not logits:
        raise BundleError("the client bundle has no 'logits' output; generation needs a decoder")
    t = logits[0]
    if t.kind == "clear" or (t.kind == "axis" and all(h.is_identity for h in t.heads)):
        logit_perm = np.arange(len(perm))
    elif t.kind == "axis" and t.head_axis is None and len(t.heads) == 1:
        parts, offset = [], 0
        for block in t.heads[0].blocks:
            if block.dense is not None or (block.scale is not None and not np.allclose(block.scale, 1.0)):
                raise BundleError("the logits are not protected by a pure permutation of the vocabulary, so the "
                                  "server cannot pick tokens on ciphertext")
            parts.append(block.index_map() + offset)
            offset += block.size
        logit_perm = np.concatenate(parts)
    else:
        raise BundleError(f"the logits are protected as '{t.kind}', not by a vocabulary permutation")
    if t.kind == "axis" and t.axis is not None and t.rank is not None and t.axis % t.rank != t.rank - 1:
        raise BundleError("the logits' protected axis is not the vocabulary (last) axis")
    if len(logit_perm) != len(perm) or not np.array_equal(logit_perm, perm):
        raise BundleError(f"the logits and '{ids_name}' use different vocabulary permutations (no vocabulary tie): "
                          "generated ids could not be fed back")


class TokenizerCodec:
    """Text ↔ ids with a ``tokenizers.Tokenizer`` (the encrypted one on the client, the plain one for references)."""

    def __init__(self, tokenizer, eos_tokens: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.eos_ids = [i for i in (tokenizer.token_to_id(t) for t in eos_tokens) if i is not None]
        self.unk_id = _unk_id(tokenizer)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text → prompt ids.

        Trailing EOS tokens a post-processor appends are dropped (a prompt is continued,
        not ended). Text the tokenizer cannot represent (an unknown token, or characters it
        drops) is an error rather than a silently different prompt.
        """
        if not text or not text.strip():
            raise GenerationError("the prompt is empty")
        encoding = self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        ids = list(encoding.ids)
        while len(ids) > 1 and ids[-1] in self.eos_ids:
            ids.pop()
        if self.unk_id is not None and self.unk_id in encoding.ids:
            pos = encoding.ids.index(self.unk_id)
            start, end = encoding.offsets[pos]
            raise GenerationError(f"the prompt contains text the tokenizer does not know: {text[start:end]!r} "
                                  "(unknown token)")
        covered = np.zeros(len(text), dtype=bool)
        for start, end in encoding.offsets:
            covered[start:end] = True
        missing = [i for i, ch in enumerate(text) if not covered[i] and not ch.isspace()]
        if missing:
            raise GenerationError(f"the prompt contains a character the tokenizer cannot represent: "
                                  f"{text[missing[0]]!r} at position {missing[0]}")
        if not ids:
            raise GenerationError("the prompt encodes to no tokens")
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Ids → text."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def continuation(self, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
        """The text the new ids add after the prompt (decoded in context, so word boundaries are right)."""
        head = self.decode(prompt_ids)
        full = self.decode(list(prompt_ids) + list(new_ids))
        if full.startswith(head):
            return full[len(head):]
        return self.decode(new_ids)


class GenerationClient:
    """The client side: ids ↔ encrypted ids, text ↔ encrypted ids with the encrypted tokenizer."""

    def __init__(self, client, tokenizer=None, tokenizer_manifest: dict | None = None) -> None:
        from eecompile.runtime.tokenizer import client_token_ids

        self.client = client
        self.ids_name, self.perm = client_token_ids(client)
        _vocab_map_of_logits(client, self.ids_name, self.perm)
        self.inverse = np.argsort(self.perm)
        self.tokenizer_manifest = tokenizer_manifest or {}
        self.codec = None if tokenizer is None else TokenizerCodec(tokenizer, self.tokenizer_manifest.get("eos_tokens", ()))

    @classmethod
    def load(cls, client_dir: str | Path) -> "GenerationClient":
        """The client bundle in ``client_dir`` and its encrypted tokenizer, if it has one."""
        from eecompile.runtime.client import Client
        from eecompile.runtime.tokenizer import load_bundle_tokenizer

        client = Client.load(client_dir)
        loaded = load_bundle_tokenizer(client_dir, client.model_id)
        tokenizer, manifest = loaded if loaded is not None else (None, None)
        return cls(client, tokenizer, manifest)

    @property
    def tokenizer(self):
        """The encrypted ``tokenizers.Tokenizer``, or None."""
        return None if self.codec is None else self.codec.tokenizer

    @property
    def vocab_size(self) -> int:
        """The model's vocabulary size."""
        return len(self.perm)

    def encrypt_ids(self, ids: Sequence[int]) -> list[int]:
        """Plaintext ids → the ids the server sees."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise GenerationError(f"token id {bad[0]} is outside the model's vocabulary [0, {self.vocab_size})")
        return [int(self.inverse[i]) for i in ids]

    def decrypt_ids(self, wire_ids: Sequence[int]) -> list[int]:
        """Ids the server returned → plaintext ids."""
        wire_ids = [int(i) for i in wire_ids]
        bad = [i for i in wire_ids if not 0 <= i < self.vocab_size]
        if bad:
            raise GenerationError(f"id {bad[0]} is outside the model's vocabulary [0, {self.vocab_size})")
        return [int(self.perm[i]) for i in wire_ids]

    def _codec(self) -> TokenizerCodec:
        if self.codec is None:
            raise GenerationError("this client bundle has no tokenizer: compile with --tokenizer tokenizer.json, "
                                  "or give token ids instead of text")
        return self.codec

    def eos_wire_ids(self) -> list[int]:
        """Encrypted ids of the tokenizer's EOS tokens (from the tokenizer manifest)."""
        return [] if self.codec is None else list(self.codec.eos_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text → encrypted prompt ids with the encrypted tokenizer (see :meth:`TokenizerCodec.encode`)."""
        return self._codec().encode(text, add_special_tokens)

    def decode(self, wire_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Encrypted ids → text."""
        return self._codec().decode(wire_ids, skip_special_tokens)

    def continuation(self, prompt_wire_ids: Sequence[int], new_wire_ids: Sequence[int]) -> str:
        """The text the new encrypted ids add after the encrypted prompt."""
        return self._codec().continuation(prompt_wire_ids, new_wire_ids)


def _unk_id(tokenizer) -> int | None:
    try:
        model = json.loads(tokenizer.to_str())["model"]
    except (ValueError, KeyError):
        return None
    if model.get("unk_id") is not None:
        return int(model["unk_id"])
    if model.get("unk_token"):
        return tokenizer.token_to_id(model["unk_token"])
    return None


# -- one process, both sides -------------------------------------------------------------
@dataclass
class GenerationResult:
    """A generation: what the client reads and what the server saw."""

    plain_ids: list[int]  # generated ids, plaintext
    wire_ids: list[int]  # generated ids as the server produced them (ciphertext)
    prompt_plain_ids: list[int]
    prompt_wire_ids: list[int]  # the prompt as the server saw it
    finish_reason: str  # "length" | "eos" | "context"
    text: str | None = None  # the decoded continuation, when a tokenizer is available
    prefill_seconds: float = 0.0
    step_seconds: list[float] = field(default_factory=list)


def _sampling(temperature: float, top_k: int | None, top_p: float | None, seed: int | None) -> SamplingConfig:
    return SamplingConfig(float(temperature), top_k, top_p, seed)


class EncryptedGenerator:
    """Encrypted generation from a compiled decoder directory (``OUT/server``, ``OUT/client``).

    ``providers``: ``None``/``"auto"`` (CUDA when available, else CPU), ``"cuda"`` (or an
    error), ``"cpu"``, or a list of ONNX Runtime provider names.
    """

    def __init__(self, out_dir: str | Path, providers: str | list[str] | None = None, *, io_binding: bool = True,
                 max_positions: int | None = None) -> None:
        from eecompile.compiler import model_id, recover_out_dir

        out = Path(out_dir)
        recover_out_dir(out)  # finish a --force replacement that a killed compile left half done
        server_path = out / "server" / "model.onnx"
        if not server_path.is_file():
            raise BundleError(f"no compiled server model at {server_path}")
        self.client = GenerationClient.load(out / "client")
        if self.client.client.model_id != model_id(out / "server"):
            raise BundleError(f"the client bundle in {out / 'client'} belongs to another compilation than {server_path}")
        if max_positions is None:  # the context length recorded at compile time, if the graph does not say
            max_positions = self.client.tokenizer_manifest.get("max_positions")
        self.server = ServerDecoder(server_path, providers, io_binding=io_binding, max_positions=max_positions)
        if self.server.vocab_size is not None and self.server.vocab_size != self.client.vocab_size:
            raise BundleError(f"the server model's vocabulary has {self.server.vocab_size} entries but the client "
                              f"bundle's has {self.client.vocab_size}")

    @property
    def tokenizer(self):
        """The encrypted tokenizer (``tokenizers.Tokenizer``) or None."""
        return self.client.tokenizer

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 32, *, encrypted: bool = False,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int | None = None, eos_ids: Iterable[int] | None = None,
                 stream: StreamCallback | None = None, add_special_tokens: bool = True) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``prompt``.

        ``prompt`` is text (encoded by the encrypted tokenizer), plaintext ids, or
        encrypted ids with ``encrypted=True``. ``eos_ids`` are plaintext ids (None: the
        tokenizer's EOS tokens, if the bundle has a tokenizer); the client encrypts them
        for the server. ``stream`` receives every generated id as the server produced it
        (ciphertext).
        """
        sampling = _sampling(temperature, top_k, top_p, seed)
        if isinstance(prompt, str):
            wire_prompt = self.client.encode(prompt, add_special_tokens=add_special_tokens)
        elif encrypted:
            wire_prompt = [int(i) for i in prompt]
            self.client.decrypt_ids(wire_prompt)  # range check
        else:
            wire_prompt = self.client.encrypt_ids(prompt)
        if not wire_prompt:
            raise GenerationError("the prompt is empty; generation needs at least one token")
        wire_eos = self.client.eos_wire_ids() if eos_ids is None else self.client.encrypt_ids(list(eos_ids))
        served = self.server.generate(wire_prompt, max_new_tokens, sampling, eos_ids=wire_eos, stream=stream)
        text = self.client.continuation(wire_prompt, served.ids) if self.client.codec is not None else None
        return GenerationResult(self.client.decrypt_ids(served.ids), served.ids, self.client.decrypt_ids(wire_prompt),
                                wire_prompt, served.finish_reason, text, served.prefill_seconds, served.step_seconds)


class PlainGenerator:
    """The plaintext reference: the original model, the same loop and sampler, no encryption.

    ``tokenizer`` (a plaintext ``tokenizers.Tokenizer``) and ``eos_tokens`` make text
    prompts work exactly as they do on the client of an :class:`EncryptedGenerator`.
    """

    def __init__(self, model_path: str | Path, providers: str | list[str] | None = None, *, io_binding: bool = True,
                 max_positions: int | None = None, tokenizer=None, eos_tokens: Sequence[str] = ()) -> None:
        self.server = ServerDecoder(model_path, providers, io_binding=io_binding, max_positions=max_positions)
        self.codec = None if tokenizer is None else TokenizerCodec(tokenizer, eos_tokens)

    def generate(self, prompt: str | Sequence[int], max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 eos_ids: Iterable[int] | None = None, stream: StreamCallback | None = None,
                 add_special_tokens: bool = True) -> GenerationResult:
        """Like :meth:`EncryptedGenerator.generate` on the original model (wire ids = plain ids)."""
        sampling = _sampling(temperature, top_k, top_p, seed)
        if isinstance(prompt, str):
            if self.codec is None:
                raise GenerationError("no tokenizer: give token ids instead of text")
            prompt = self.codec.encode(prompt, add_special_tokens)
        prompt = [int(i) for i in prompt]
        if eos_ids is None:
            eos_ids = [] if self.codec is None else self.codec.eos_ids
        served = self.server.generate(prompt, max_new_tokens, sampling, eos_ids=eos_ids, stream=stream)
        text = None if self.codec is None else self.codec.continuation(prompt, served.ids)
        return GenerationResult(list(served.ids), list(served.ids), prompt, prompt, served.finish_reason, text,
                                served.prefill_seconds, served.step_seconds)
