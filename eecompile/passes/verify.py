"""Pass 6 — verify: the compiled graph is well formed and computes the original function.

Checks that no private op remains, that ``onnx.checker`` accepts the server model, and
that client-encrypt → server → client-decrypt equals the original model run by ONNX
Runtime on fresh random inputs (max-abs error relative to max-abs output), within a tolerance derived
from the model's float type and depth (:mod:`eecompile.passes.precision`: 1e-4 for float32, about
2·u·√depth for float16/bfloat16). An output the original computes as NaN/inf everywhere is not counted
as compared; when no output is, nothing was verified and the result says so.

Input shapes are derived from the graph (:func:`candidate_assignments`): a symbolic dim
shared by several inputs keeps one value; batch, sequence and past-sequence symbols are
recognised by name (``batch_size``, ``sequence_length``, ``past_sequence_length``,
``total_sequence_length``, expressions such as ``past_sequence_length + 1``) or by where
they occur (a non-batch symbol of a ``past*`` cache input is a past length; an attention
mask's own symbol is past + sequence); position ids count on from the past length. A symbol
naming a model dimension (``kv_cache_dim``, ``head_size``) is static: its value comes from
``shapes`` or the ``head_size`` of a ``genai_config.json`` beside the model. A few
assignments are tried until the original model runs; ``shapes`` (the CLI's
``--verify-shapes``) fixes symbols or roles, ``feeds_list`` (``--verify-feeds``) gives the
inputs outright. With a KV cache, the check runs a prefill and then one decode step with
the ``present*`` outputs fed back as the ``past*`` inputs, on both models.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from eecompile.errors import EECompileError
from eecompile.passes.graph import InvalidModel, Validity, check_model
from eecompile.passes.precision import (BFLOAT16, Tolerance, WidenedSession, has_bfloat16, verification_tolerance,
                                        widen_bfloat16)
from eecompile.passes.store import model_bytes, release_memory

PRIVATE_DOMAIN = "ai.eecompile"
DEFAULT_TOLERANCE = 1e-4


class VerificationError(EECompileError):
    """The compiled model does not reproduce the original."""


@dataclass
class VerifyResult:
    """Outcome of verification."""

    checked: bool
    max_relative_error: float | None
    detail: str
    feeds: list[dict] = field(default_factory=list, repr=False)  # the plaintext feeds that were verified
    decode_checked: bool = False  # a decode step with the KV cache fed back was compared too
    tolerance: Tolerance | None = None  # what the error was held to (dtype, depth, formula)


def check_structure(model: onnx.ModelProto, path: str | Path | None = None) -> Validity:
    """No private-domain op is left, and the model is valid (on ``path`` when given) as the loader checks it:
    ``onnx.checker``, plus ONNX Runtime's op registry for the ops ONNX does not know (:func:`check_model`)."""
    private = [n.name or n.op_type for n in model.graph.node if n.domain == PRIVATE_DOMAIN]
    if private:
        raise VerificationError(f"private basis-change ops left in the graph: {private[:5]}")
    try:
        return check_model(model, path)
    except InvalidModel as exc:
        raise VerificationError(f"compiled model fails onnx.checker: {exc}") from None


class CannotVerify(VerificationError):
    """Verification could not run (no inputs the original model accepts); not a wrong model."""


# -- shapes of the verification inputs -------------------------------------------------------
ROLES = ("batch", "seq", "past")
ROLE_ALIASES = {"batch": "batch", "batch_size": "batch", "seq": "seq", "sequence": "seq", "sequence_length": "seq",
                "length": "seq", "past": "past", "past_sequence": "past", "past_sequence_length": "past",
                "past_length": "past"}
CANDIDATES: tuple[dict[str, int], ...] = (
    {"batch": 2, "seq": 3, "past": 2},
    {"batch": 1, "seq": 3, "past": 2},
    {"batch": 2, "seq": 3, "past": 0},
    {"batch": 1, "seq": 1, "past": 2},
    {"batch": 1, "seq": 1, "past": 0},
)
"""Role values tried in order until the original model runs (past 0 last: a non-empty cache first)."""

_STATE_INPUT = re.compile(r"(^|[._/])past", re.IGNORECASE)
_STATIC_DIM = re.compile(r"(^|_)dim$|head_?size|head_?dim", re.IGNORECASE)
"""A symbol naming a model dimension, not a length (ONNX Runtime GenAI's ``kv_cache_dim``: the head size)."""
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
        ast.Div: operator.floordiv, ast.Mod: operator.mod}


def _name_role(symbol: str) -> str | None:
    """The role a symbol's name says: batch, past, total (past + sequence), seq, or None."""
    s = symbol.lower()
    if "batch" in s:
        return "batch"
    if re.search(r"past|cache", s):
        return "past"
    if re.search(r"total|all_seq|full_seq|kv_seq|context|key_len|mask", s):
        return "total"
    if re.search(r"seq|length|len\b|token|time|step", s):
        return "seq"
    return None


def _is_expr(symbol: str) -> bool:
    return bool(re.search(r"[+\-*/%()]", symbol))


def _eval_expr(symbol: str, values: dict[str, int]) -> int | None:
    """Evaluate a dim expression such as ``past_sequence_length + 1`` over known symbol values."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name):
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError(symbol)
    try:
        return int(ev(ast.parse(symbol.strip(), mode="eval")))
    except (ValueError, KeyError, SyntaxError, ZeroDivisionError, TypeError):
        return None


def _inputs(session) -> list[tuple[str, str, list]]:
    return [(i.name, i.type, list(i.shape) if i.shape is not None else []) for i in session.get_inputs()]


def symbol_roles(inputs: list[tuple[str, str, list]]) -> dict[str, str]:
    """Role of every symbolic dim of the inputs: batch, seq, past, total, expr or static (see module docstring).

    A ``static`` symbol (``kv_cache_dim``, ``head_size``) is a model dimension: it takes a value only from
    the given shapes or a ``genai_config.json`` beside the model (:func:`config_shapes`).
    """
    occurrences: dict[str, list[tuple[str, int]]] = {}
    for name, _, shape in inputs:
        for axis, d in enumerate(shape):
            if not (isinstance(d, int) and d >= 0):
                occurrences.setdefault(str(d), []).append((name, axis))
    has_state = any(_STATE_INPUT.search(name) for name, _, _ in inputs)
    roles: dict[str, str] = {}
    for symbol, where in occurrences.items():
        if _is_expr(symbol):
            roles[symbol] = "expr"
            continue
        role = "static" if _STATIC_DIM.search(symbol) else _name_role(symbol)
        if role is None:
            if any(_STATE_INPUT.search(n) and axis != 0 for n, axis in where):
                role = "past"
            elif any(axis == 0 for _, axis in where):
                role = "batch"
            elif has_state and all("mask" in n.lower() for n, _ in where):
                role = "total"
            else:
                role = "seq"
        roles[symbol] = role
    return roles


def assign(roles: dict[str, str], values: dict[str, int], fixed: dict[str, int] | None = None) -> dict[str, int] | None:
    """Symbol values for role ``values`` (``fixed`` symbols win); None when an expression comes out < 0."""
    fixed = fixed or {}
    values = dict(values)
    for symbol, value in fixed.items():  # a fixed past/seq/batch symbol sets its role for derived symbols
        if roles.get(symbol) in ROLES:
            values[roles[symbol]] = value
    out: dict[str, int] = {}
    for symbol, role in roles.items():
        if symbol in fixed:
            out[symbol] = fixed[symbol]
        elif role in ROLES:
            out[symbol] = values[role]
        elif role == "total":
            out[symbol] = values["past"] + values["seq"]
    for symbol, role in roles.items():
        if role == "expr" and symbol not in out:
            names = {n: out.get(n, _role_value(n, values)) for n in _IDENT.findall(symbol)}
            value = _eval_expr(symbol, names)
            if value is None or value < 0:
                return None
            out[symbol] = value
    return out


def config_shapes(model_path: str | Path, roles: dict[str, str]) -> dict[str, int]:
    """Values of ``static`` symbols from an ONNX Runtime GenAI ``genai_config.json`` beside the model:
    the decoder's ``head_size`` (its KV cache is ``[batch, kv_heads, length, kv_cache_dim]``)."""
    import json

    statics = [s for s, r in roles.items() if r == "static"]
    config = Path(model_path).parent / "genai_config.json"
    if not statics or not config.is_file():
        return {}
    try:
        head = int(json.loads(config.read_text())["model"]["decoder"]["head_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {s: head for s in statics}


_SHAPE_KEEPING = {"Cast", "Identity", "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Clip", "Pad"}
"""Ops through which an input reaches its first Conv with its axes unchanged (scaling, padding)."""


def _first_conv(graph, name: str):
    """The first Conv a tensor reaches through :data:`_SHAPE_KEEPING` ops (breadth first), or None."""
    consumers: dict[str, list] = {}
    for node in graph.node:
        for x in node.input:
            if x:
                consumers.setdefault(x, []).append(node)
    frontier, seen = [name], set()
    while frontier:
        t = frontier.pop(0)
        if t in seen:
            continue
        seen.add(t)
        for node in consumers.get(t, []):
            if node.op_type == "Conv" and node.input[0] == t:
                return node, consumers
            if node.op_type in _SHAPE_KEEPING:
                frontier.extend(o for o in node.output if o)
    return None, consumers


def _forward_convs(graph, conv, consumers, limit: int = 4) -> list:
    """``conv`` and the next Convs downstream of it, in graph order (at most ``limit``)."""
    reach, frontier = set(), [o for o in conv.output if o]
    while frontier:
        t = frontier.pop()
        for node in consumers.get(t, []):
            if id(node) not in reach:
                reach.add(id(node))
                frontier.extend(o for o in node.output if o)
    order = [n for n in graph.node if id(n) in reach and n.op_type == "Conv"]
    return [conv, *order][:limit]


def _table_lengths(graph) -> list[int]:
    """Row counts of constant tables that are not a contraction's weight (position embeddings), largest first."""
    weights = {n.input[1] for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv", "ConvTranspose")
               and len(n.input) > 1}
    weights |= {n.input[0] for n in graph.node if n.op_type in ("MatMul", "Gemm")}
    lengths = set()
    for init in graph.initializer:
        dims = list(init.dims)
        if init.name in weights or len(dims) not in (2, 3) or (len(dims) == 3 and dims[0] != 1):
            continue
        rows = dims[-2]
        if rows >= 2 and dims[-1] >= 2:
            lengths.add(rows)
    return sorted(lengths, reverse=True)


def structural_shapes(model_path: str | Path, inputs: list[tuple[str, str, list]],
                      roles: dict[str, str]) -> tuple[dict[str, int], list[dict[str, int]]]:
    """Sizes of symbolic input dims the graph itself determines, for inputs feeding a Conv.

    Returns ``(fixed, spatial)``: ``fixed`` sets a symbolic channel axis (axis 1) to the first Conv's
    input channels (weight ``[M, C/group, ...]``); ``spatial`` lists alternative assignments of the
    symbolic spatial axes (2, 3, ...), most likely first: the Conv stem's stride (cumulated over the
    first Convs) times a grid whose cells number the rows of a constant table of the graph, or one
    more (a position-embedding table, with or without a class token: ``[1, (H/p)·(W/p) + 1, D]``),
    then small multiples of the stride.  A ViT exported with a dynamic image size gets its real
    image size instead of a size it cannot run.  Batch and text symbols are left to the roles.
    """
    from eecompile.passes.store import load_structure

    try:
        graph = load_structure(model_path).graph
    except Exception:  # noqa: BLE001 - no structure, nothing derived
        return {}, []
    init = {t.name: list(t.dims) for t in graph.initializer}
    fixed: dict[str, int] = {}
    spatial: list[dict[str, int]] = []
    for name, type_, dims in inputs:
        if "float" not in type_ and "double" not in type_:
            continue
        symbolic = {axis: str(d) for axis, d in enumerate(dims) if not (isinstance(d, int) and d >= 0)
                    and roles.get(str(d)) != "batch"}
        if not symbolic:
            continue
        conv, consumers = _first_conv(graph, name)
        if conv is None or conv.input[1] not in init:
            continue
        weight = init[conv.input[1]]
        group = next((a.i for a in conv.attribute if a.name == "group"), 1)
        if 1 in symbolic and len(weight) >= 3:
            fixed[symbolic[1]] = weight[1] * group
        axes = [a for a in symbolic if a >= 2]
        if not axes:
            continue
        strides, total = [], 1
        for c in _forward_convs(graph, conv, consumers):
            s = next((list(a.ints) for a in c.attribute if a.name == "strides"), [1])
            total *= s[0] if s else 1
            if total not in strides:
                strides.append(total)
        kernel = max(weight[2:] or [1])
        sizes: list[int] = []
        for rows in _table_lengths(graph):
            for cells in (rows, rows - 1):
                grid = round(cells ** (1 / len(axes)))
                if grid >= 1 and grid ** len(axes) == cells:
                    sizes += [stride * grid for stride in strides]
        sizes += [max(kernel, strides[0]) * k for k in (1, 2, 4, 8)]
        for size in dict.fromkeys(sizes):
            option = {symbolic[a]: size for a in axes}
            if option not in spatial:
                spatial.append(option)
    return fixed, spatial[:16]


def _role_value(symbol: str, values: dict[str, int]) -> int:
    role = _name_role(symbol) or "seq"
    return values["past"] + values["seq"] if role == "total" else values[role]


def parse_shapes(text: str) -> dict[str, int]:
    """``"batch=1,past_sequence_length=4"`` → ``{"batch": 1, "past_sequence_length": 4}`` (symbols or roles)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.rpartition("=")
        if not sep or not name.strip() or not value.strip().isdigit():
            raise EECompileError(f"--verify-shapes takes name=size pairs separated by commas, got {part!r}")
        out[name.strip()] = int(value)
    return out


def candidate_assignments(session, shapes: dict[str, int] | None = None, allow_past: bool = True,
                          spatial: list[dict[str, int]] | None = None) -> list[dict[str, int]]:
    """Symbol assignments to try, in order (``shapes``: user symbols or roles; see :data:`ROLE_ALIASES`).

    ``spatial`` (:func:`structural_shapes`) are alternative values of spatial symbols; each is tried
    with every role candidate before the role values alone (symbols ``shapes`` names win over them).
    """
    roles = symbol_roles(_inputs(session))
    shapes = dict(shapes or {})
    role_fixed = {ROLE_ALIASES[k.lower()]: v for k, v in shapes.items() if k not in roles and k.lower() in ROLE_ALIASES}
    fixed = {k: v for k, v in shapes.items() if k in roles}
    out: list[dict[str, int]] = []
    for option in [*(spatial or []), {}]:
        for candidate in CANDIDATES:
            values = {**candidate, **role_fixed}
            if not allow_past and "past" not in role_fixed:
                values["past"] = 0
            assignment = assign(roles, values, {**option, **fixed})
            if assignment is not None and assignment not in out:
                out.append(assignment)
    return out or [assign(roles, {"batch": 1, "seq": 1, "past": 0}, fixed) or {}]


def feeds_for(session, symbols: dict[str, int], seed: int,
              index_sizes: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Random feeds with symbolic dims set by ``symbols`` (unknown ones: 1).

    Integer inputs: index inputs uniform over their classes, ``*position*`` counting on from
    the past length (the last ``L`` of ``past + seq`` positions), ``*mask*`` ones,
    GroupQueryAttention's ``seqlens_k`` past + seq − 1 and ``total_sequence_length`` past +
    seq, others 0.
    """
    rng = np.random.default_rng(seed)
    index_sizes = index_sizes or {}
    inputs = _inputs(session)
    roles = symbol_roles(inputs)
    past = max([symbols[s] for s, r in roles.items() if r == "past" and s in symbols], default=0)
    seq = max([symbols[s] for s, r in roles.items() if r == "seq" and s in symbols], default=0)
    feeds = {}
    for name, type_, dims in inputs:
        shape = [d if isinstance(d, int) and d >= 0 else symbols.get(str(d), 1) for d in dims]
        if "int" in type_:
            if name in index_sizes:
                value = rng.integers(0, index_sizes[name], size=shape)
            elif re.search(r"seqlens", name, re.IGNORECASE):  # GroupQueryAttention: last index per row
                value = np.full(shape, past + seq - 1)
            elif re.fullmatch(r"total_seq(uence)?(_len(gth)?)?", name, re.IGNORECASE):
                value = np.full(shape, past + seq)
            elif "position" in name:
                length = shape[-1] if shape else 1
                start = past + seq - length if 0 < length <= past + seq else 0
                value = np.broadcast_to(np.arange(start, start + length), shape).copy() if shape else np.zeros(shape)
            elif "mask" in name:
                value = np.ones(shape)
            else:
                value = np.zeros(shape)
            feeds[name] = value.astype(np.int64 if "int64" in type_ else np.int32)
        elif "bool" in type_:
            feeds[name] = np.ones(shape, dtype=bool)
        else:
            dtype = (BFLOAT16 if "bfloat16" in type_ else np.float16 if "float16" in type_ else
                     np.float64 if "double" in type_ else np.float32)
            feeds[name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def random_feeds(session, seed: int, index_sizes: dict[str, int] | None = None, *, batch: int = 2,
                 length: int = 3, past: int = 2) -> dict[str, np.ndarray]:
    """Random feeds for an ONNX Runtime session's inputs (batch ``batch``, sequence ``length``, past ``past``)."""
    roles = symbol_roles(_inputs(session))
    symbols = assign(roles, {"batch": batch, "seq": length, "past": past}) or {}
    return feeds_for(session, symbols, seed, index_sizes)


def symbols_of(session, feeds: dict[str, np.ndarray]) -> dict[str, int]:
    """The symbol values that given feeds imply (first occurrence wins)."""
    out: dict[str, int] = {}
    for name, _, dims in _inputs(session):
        if name in feeds:
            for d, n in zip(dims, np.shape(feeds[name])):
                if not (isinstance(d, int) and d >= 0):
                    out.setdefault(str(d), int(n))
    return out


def load_feeds(path: str | Path) -> dict[str, np.ndarray]:
    """Verification feeds from an ``.npz`` file (one array per input name)."""
    try:
        with np.load(str(path), allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise EECompileError(f"cannot read --verify-feeds {path}: {exc}") from None


def state_pairs(state_inputs: list[str], state_outputs: list[str]) -> list[tuple[str, str]]:
    """(past input, present output) pairs by name.

    ``past_key_values.0.key`` ↔ ``present.0.key``, ``past_key`` ↔ ``present_key``.
    """
    def key(name, prefixes):
        for p in prefixes:
            m = re.match(rf"(.*?)(^|[._/]){p}", name, re.IGNORECASE)
            if m:
                return (m.group(1), name[m.end():].lstrip("._/"))
        return None
    presents = {key(n, ("present",)): n for n in state_outputs}
    pairs = []
    for name in state_inputs:
        k = key(name, ("past_key_values", "past"))
        if k is not None and k in presents:
            pairs.append((name, presents[k]))
    return pairs


def state_transforms(analysis, plan) -> dict:
    """The bases of the server-side state (never in the client bundle), to verify with a non-empty cache.

    Call after the plan pass. Maps each state input/output name to a :class:`BoundaryTransform`.
    """
    from eecompile.passes.context import FoldContext
    from eecompile.passes.insert import boundary_transform

    mg = analysis.mg
    ctx = FoldContext(mg, analysis.ctx.ann, analysis.ctx.spaces, plan.bases, plan.block_orders)
    state = set(analysis.state_inputs) | set(analysis.state_outputs)
    out = {}
    for t in [*mg.graph.inputs, *mg.graph.outputs]:
        if t.name in state:
            try:
                out[t.name] = boundary_transform(t.name, ctx.get(t), ctx, False, mg.rank(t))
            except ValueError:
                return {}
    return out


def verification_client(client, state: dict | None):
    """A client that also encrypts/decrypts the server-side state (for verification only)."""
    from eecompile.passes.insert import BoundarySpec
    from eecompile.runtime.client import Client

    if not state:
        return None
    spec = client.spec
    if not all(t.name in state for t in [*spec.inputs, *spec.outputs] if t.kind == "state"):
        return None
    swap = lambda ts: [state[t.name] if t.kind == "state" else t for t in ts]  # noqa: E731
    return Client(BoundarySpec(swap(spec.inputs), swap(spec.outputs)), client.model_id)


def relative_error(expected: np.ndarray, actual: np.ndarray) -> float:
    """max |expected − actual| / max |expected| (absolute error when expected is all zeros)."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual, dtype=np.float64)
    if expected.shape != actual.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    finite = np.isfinite(expected)
    same_special = np.where(finite, np.isfinite(actual), (expected == actual) | (np.isnan(expected) & np.isnan(actual)))
    if not np.all(same_special):
        return float("inf")  # a NaN or an infinity where the other has none (or another)
    if not np.any(finite):
        return 0.0
    scale = float(np.max(np.abs(expected[finite])))
    err = float(np.max(np.abs(expected[finite] - actual[finite])))
    return err / scale if scale > 0 else err


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:limit]


def verify_equivalence(original: str | Path, server: str | Path, client, seeds=(0, 1),
                       tolerance: float = DEFAULT_TOLERANCE, feeds_list=None, shapes: dict[str, int] | None = None,
                       state: dict | None = None) -> VerifyResult:
    """Compare encrypt → server → decrypt with the original on generated (or given) feeds.

    ``state`` (:func:`state_transforms`) lets a non-empty cache be encrypted and the
    ``present*`` outputs be decrypted and compared; without it the past length is 0. When
    no feeds fit the original model the result is not ``checked``; its detail says why.
    Only one model is in memory at a time: the original runs first on every input (and its own decode
    step), is released, and then the compiled model runs on the encrypted inputs.
    ``tolerance`` is the float32 tolerance; a float16/bfloat16 model is held to the larger bound its
    precision and depth allow (:func:`~eecompile.passes.precision.verification_tolerance`, in the result).
    """
    try:
        tol = _tolerance(original, tolerance)
        ref, int8 = _verification_session(original)
        widened = getattr(ref, "note", None)  # bfloat16 run with float32 activations (WidenedSession)
    except Exception as exc:  # ORT raises its own exception types
        return VerifyResult(False, None, f"skipped: ONNX Runtime cannot load the model ({_first_line(exc)})")
    index_sizes = {t.name: t.index.size for t in client.spec.inputs if t.kind == "index"}
    full = verification_client(client, state)
    has_state = bool(client.state_inputs)
    names = [o.name for o in ref.get_outputs()]
    from eecompile.passes.segments import run_all

    expected_list = None  # the original's outputs per plan, computed by the probe that succeeded
    steps_done = None  # the original's decode steps, when the probe ran them in its pass
    if feeds_list:
        plans = [(dict(f), symbols_of(ref, f)) for f in feeds_list]
        if has_state and full is None and any(np.size(f[n]) for f in feeds_list for n in client.state_inputs
                                              if n in f):
            return VerifyResult(False, None, "skipped: the given feeds hold a non-empty cache and the cache's "
                                             "bases are not available to encrypt it")
    else:
        plans, error = None, None
        roles = symbol_roles(_inputs(ref))
        derived, spatial = structural_shapes(original, _inputs(ref), roles)
        shapes = {**derived, **config_shapes(original, roles), **(shapes or {})}
        candidates = candidate_assignments(ref, shapes, allow_past=full is not None or not has_state, spatial=spatial)
        for symbols in candidates:
            tried = [(feeds_for(ref, symbols, s, index_sizes), symbols) for s in seeds]
            prefills = [f for f, _ in tried]
            chained = _predicted_steps(ref, client, tried, index_sizes) if has_state else None
            try:  # every seed at once (a model run in segments builds each segment once for all)
                outs = None
                if chained is not None:  # and each decode step in the same pass, fed its prefill's cache
                    try:
                        outs = run_all(ref, names, prefills + [c[2] for c in chained], _cache_links(chained))
                    except Exception:  # noqa: BLE001 - the steps as predicted do not run: the steps' own pass
                        outs, chained = None, None
                if outs is None:
                    outs = run_all(ref, names, prefills)
                expected_list = [dict(zip(names, o)) for o in outs[:len(prefills)]]
            except Exception as exc:  # the original does not take these shapes: try the next assignment
                error = error or f"{_shape_text(symbols)}: {_first_line(exc)}"
                continue
            plans = tried
            if chained is not None:
                steps_done = _chained_steps(chained, expected_list, outs[len(prefills):], names)
            break
        if plans is None:
            return VerifyResult(False, None, f"skipped: the original model runs on none of "
                                             f"{len(candidates)} generated input shapes "
                                             f"(first failure with {error})")
    if expected_list is None:
        try:
            expected_list = [dict(zip(names, o)) for o in run_all(ref, names, [f for f, _ in plans])]
        except Exception as exc:
            return VerifyResult(False, None, f"skipped: the original model does not run on the given inputs "
                                             f"({_first_line(exc)})")
    if steps_done is not None:
        steps = steps_done
    else:
        steps = ([_plain_step(ref, client, feeds, symbols, expected, index_sizes)
                  for (feeds, symbols), expected in zip(plans, expected_list)] if has_state else [None] * len(plans))
        _run_plain_steps(ref, names, steps)
    runs = [(feeds, expected, step) for (feeds, _), expected, step in zip(plans, expected_list, steps)]
    del ref
    release_memory(model_bytes(original))  # the original's weights leave memory before the compiled model's arrive
    try:
        enc, _ = _verification_session(server)
    except Exception as exc:  # ORT raises its own exception types
        return VerifyResult(False, None, f"skipped: ONNX Runtime cannot load the model ({_first_line(exc)})")
    worst, decoded, notes, measured = 0.0, False, [], set()
    prefills = [(full or client).encrypt(feeds) for feeds, _, _ in runs]
    chainable = steps_done is not None and all(isinstance(step, tuple) for _, _, step in runs)
    if chainable:  # the decode steps in the prefill's pass, each fed the server's own (encrypted) cache
        ciphers = [_without(client.encrypt(step[0]), [past for past, _ in step[1]]) for _, _, step in runs]
        outs = _run_encrypted(enc, names, prefills + ciphers, _cache_links([step for _, _, step in runs]))
        gots, step_gots = outs[:len(prefills)], outs[len(prefills):]
    else:
        gots = _run_encrypted(enc, names, prefills)
    for (feeds, expected, step), got in zip(runs, gots):
        worst = max(worst, _compare(expected, (full or client).decrypt(got), client, full, tol, "prefill", measured))
        if isinstance(step, str):
            notes.append(step)
    if chainable:
        for (_, _, step), got2 in zip(runs, step_gots):
            worst = max(worst, _compare(step[2], (full or client).decrypt(got2), client, full, tol, "decode step",
                                        measured))
        decoded = bool(runs)
    else:
        stepped = [(step, got) for (_, _, step), got in zip(runs, gots)
                   if step is not None and not isinstance(step, str)]
        if stepped:
            worst, decoded = max(worst, _encrypted_steps(enc, client, full, stepped, names, tol, measured)), True
    del enc
    release_memory(model_bytes(server))
    unmeasured = [n for n in names if n not in measured and (full is not None or n not in client.state_outputs)]
    if not measured:
        return VerifyResult(False, None, f"skipped: the original computes NaN or infinity in every element of every "
                                         f"output on the verification inputs ({', '.join(unmeasured[:4])}), so "
                                         f"nothing was compared", tolerance=tol)
    detail = f"max relative error {worst:.2e} (tolerance {tol.value:.2e}) over {len(plans)} input(s)"
    if plans and plans[0][1]:
        detail += f" of shape {_shape_text(plans[0][1])}"
    if decoded:
        detail += ", each with a prefill and one decode step on the fed-back cache"
    elif notes:
        detail += f"; decode step not checked: {notes[0]}"
    if int8:
        detail += (f"; {int8} MatMulNBits node(s) compared with float activations (their accuracy_level 4 "
                   "quantises activations to int8, whose steps a rounding difference can cross)")
    if widened:
        detail += f"; {widened}"
    if unmeasured:
        detail += f"; not compared (NaN or infinity everywhere in the original): {', '.join(unmeasured[:4])}"
    return VerifyResult(True, worst, detail, feeds=[f for f, _ in plans], decode_checked=decoded, tolerance=tol)


def _tolerance(original: str | Path, floor: float) -> Tolerance:
    """The tolerance for ``original`` (its structure only is read)."""
    from eecompile.passes.store import load_structure

    return verification_tolerance(load_structure(original), floor)


def _verification_session(path: str | Path):
    """``(session, n)``: an ONNX Runtime session of ``path`` for verification.

    MatMulNBits with ``accuracy_level`` 4 quantise their activations to int8 at run time, so the op is
    discontinuous: a rounding-level difference in its input (a folded model computes the same values in
    another order) that crosses an int8 step moves the output by about one step, which says nothing about
    the folding. Both models are therefore compared with those ``n`` nodes at ``accuracy_level`` 0 (float
    activations, the weights unchanged); the served model keeps its own setting.
    """
    import onnxruntime as ort

    from eecompile.passes.store import in_place_session, load_structure

    def quiet_options():
        options = ort.SessionOptions()
        options.log_severity_level = 4  # shapes that do not fit are expected while probing: no error logs
        return options

    options = quiet_options()
    model = load_structure(path)  # the graph only: ONNX Runtime reads the weights in place from their files
    changed = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.domain == "com.microsoft":
            for attr in node.attribute:
                if attr.name == "accuracy_level" and attr.i == 4:
                    attr.i = 0
                    changed += 1
    from eecompile.passes import segments

    if segments.piecewise(model) and not has_bfloat16(model):
        # one segment's weights in memory at a time (the graph cut between layers), not the whole model's
        return segments.SegmentedSession(model, Path(path).parent, quiet_options), changed
    try:
        return in_place_session(model, Path(path).parent, options), changed
    except Exception as exc:  # ORT raises its own exception types
        if not (has_bfloat16(model) and "NOT_IMPLEMENTED" in str(exc)):
            raise
        reason = _first_line(exc).split("NOT_IMPLEMENTED : ")[-1]  # no bfloat16 kernel for an op on CPU
        fresh = ort.SessionOptions()
        fresh.log_severity_level = options.log_severity_level
        return WidenedSession(in_place_session(widen_bfloat16(model), Path(path).parent, fresh), model,
                              reason), changed


def _shape_text(symbols: dict[str, int]) -> str:
    return ", ".join(f"{k}={v}" for k, v in symbols.items()) or "static shapes"


def _run_encrypted(enc, names, feeds_list: list[dict], links=None) -> list[dict[str, np.ndarray]]:
    """The compiled model's outputs on each of ``feeds_list`` (a failure is the compiled model's); ``links`` as
    for :func:`~eecompile.passes.segments.run_all`."""
    from eecompile.passes.segments import run_all

    try:
        return [dict(zip(names, o)) for o in run_all(enc, names, feeds_list, links)]
    except Exception as exc:
        raise VerificationError(f"the compiled model fails on inputs the original accepts "
                                f"({_first_line(exc)})") from None


def _compare(expected, decrypted, client, full, tolerance: Tolerance, step: str,
             measured: set[str] | None = None) -> float:
    """Worst relative error over the outputs that can be compared (state only when ``full`` decrypts it).

    The decrypted output must have the original's dtype and shape; outputs with a finite element in the
    original are added to ``measured`` (an all-NaN/inf output matching the original compares nothing)."""
    state = set(client.state_outputs)
    worst = 0.0
    for name, exp in expected.items():
        if name in state and full is None:
            continue
        got = decrypted[name]
        if np.asarray(got).dtype != np.asarray(exp).dtype:
            raise VerificationError(f"compiled model output '{name}' is {np.asarray(got).dtype} after decrypting, "
                                    f"the original's is {np.asarray(exp).dtype}")
        err = relative_error(exp, got)
        worst = max(worst, err)
        if not err <= tolerance.value:
            raise VerificationError(f"compiled model output '{name}' differs from the original in the {step} "
                                    f"(relative error {err:.2e} > tolerance {tolerance.describe()})")
        if measured is not None and np.isfinite(np.asarray(exp, dtype=np.float64)).any():
            measured.add(name)
    return worst


def _plain_step(ref, client, feeds, symbols, expected, index_sizes):
    """The original's decode step: ``present*`` fed back as ``past*`` with one new token.

    Returns ``[step feeds, cache pairs, original's feeds]`` (:func:`_run_plain_steps` appends its outputs),
    or why the step cannot be run.
    """
    pairs = state_pairs(client.state_inputs, client.state_outputs)
    if not pairs or len(pairs) != len(client.state_inputs):
        return "the cache inputs do not pair with present outputs by name"
    inputs = {name: dims for name, _, dims in _inputs(ref)}
    roles = symbol_roles(_inputs(ref))
    cache: dict[str, int] = {}  # the cache inputs' symbols, read off the present outputs
    for past, present in pairs:
        for d, n in zip(inputs[past], expected[present].shape):
            if not (isinstance(d, int) and d >= 0):
                cache[str(d)] = int(n)
    past_len = max([v for s, v in cache.items() if roles.get(s) == "past"], default=0)
    batch = max([v for s, v in symbols.items() if roles.get(s) == "batch"], default=1)
    new = assign(roles, {"batch": batch, "seq": 1, "past": past_len}, cache)
    if new is None:
        return "no decode-step shapes fit the cache"
    step = feeds_for(ref, new, 99, index_sizes)
    return [step, pairs, {**step, **{past: expected[present] for past, present in pairs}}]


def _predicted_steps(ref, client, plans, index_sizes) -> list | None:
    """Each plan's decode step built before its prefill runs, from the cache shapes the prefill will give
    (the ``past`` axis grown by the new tokens), so that one pass runs both (:func:`_cache_links`).

    Returns ``[step feeds, cache pairs, the original's step feeds without the cache, predicted present*]`` per
    plan, or None when a shape cannot be predicted or a step cannot be built (the steps then get their own
    pass)."""
    pairs = state_pairs(client.state_inputs, client.state_outputs)
    if not pairs or len(pairs) != len(client.state_inputs):
        return None
    inputs = {name: dims for name, _, dims in _inputs(ref)}
    roles = symbol_roles(_inputs(ref))
    steps = []
    for feeds, symbols in plans:
        grow = [v for k, v in symbols.items() if roles.get(k) == "seq"]
        predicted = {}
        for past, present in pairs:
            dims = inputs[past]
            axes = [a for a, d in enumerate(dims) if roles.get(str(d)) == "past"]
            if len(axes) != 1 or len(grow) != 1 or past not in feeds:
                return None
            shape = list(np.shape(feeds[past]))
            shape[axes[0]] += grow[0]
            predicted[present] = np.zeros(shape, np.asarray(feeds[past]).dtype)
        step = _plain_step(ref, client, feeds, symbols, predicted, index_sizes)
        if isinstance(step, str):
            return None
        steps.append([step[0], step[1], _without(step[2], [past for past, _ in pairs]), predicted])
    return steps


def _cache_links(steps: list) -> list[dict[str, tuple[int, str]]]:
    """For a run of ``n`` prefills then their ``n`` steps (each with its cache pairs second): step ``i``'s cache
    is prefill ``i``'s ``present*``."""
    return [{} for _ in steps] + [{past: (i, present) for past, present in step[1]} for i, step in enumerate(steps)]


def _chained_steps(chained: list, expected_list: list[dict], outs: list, names: list[str]) -> list | None:
    """The steps of :func:`_predicted_steps` as :func:`_run_plain_steps` leaves them, ``(step feeds, cache pairs,
    expected outputs)``; None when a prefill's cache came out of another shape than predicted (the steps were
    built for a cache they did not get: they run again in their own pass, built from the real cache)."""
    for step, expected in zip(chained, expected_list):
        if any(np.shape(expected[present]) != np.shape(value) for present, value in step[3].items()):
            return None
    return [(step[0], step[1], dict(zip(names, out))) for step, out in zip(chained, outs)]


def _without(feeds: dict, names: list[str]) -> dict:
    return {k: v for k, v in feeds.items() if k not in names}


def _run_plain_steps(ref, names, steps: list) -> None:
    """Run the original's decode steps (all at once; one by one when that fails, to say which cannot run):
    each step becomes ``(step feeds, cache pairs, expected outputs)``, or why it was not run."""
    from eecompile.passes.segments import run_all

    todo = [i for i, s in enumerate(steps) if isinstance(s, list)]
    if not todo:
        return
    try:
        outs = run_all(ref, names, [steps[i][2] for i in todo])
    except Exception:  # noqa: BLE001 - find which one fails
        outs = []
        for i in todo:
            try:
                outs.append(ref.run(names, steps[i][2]))
            except Exception as exc:
                outs.append(f"the original does not take its own cache back ({_first_line(exc)})")
    for i, out in zip(todo, outs):
        steps[i] = out if isinstance(out, str) else (steps[i][0], steps[i][1], dict(zip(names, out)))


def _encrypted_steps(enc, client, full, stepped, names, tolerance: Tolerance, measured: set[str] | None = None) -> float:
    """The compiled model's decode steps on its own (encrypted) caches, compared with the original's.

    ``stepped``: ``((step feeds, cache pairs, expected outputs), prefill outputs)`` per input."""
    ciphers = [{**client.encrypt(feeds), **{past: got[present] for past, present in pairs}}
               for (feeds, pairs, _), got in stepped]
    worst = 0.0
    for ((_, _, expected2), _), got2 in zip(stepped, _run_encrypted(enc, names, ciphers)):
        worst = max(worst, _compare(expected2, (full or client).decrypt(got2), client, full, tolerance,
                                    "decode step", measured))
    return worst
