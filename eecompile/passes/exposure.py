"""Measured exposure: which tensors the server computes in plaintext.

The analysis says which spaces *should* be protected; this pass measures it. After a
compile, the original model runs on the verification inputs and the server model on the
same inputs encrypted by the client, each with every intermediate float tensor added as an
extra graph output (the structure is read without the weights, and ONNX Runtime reads the weights in
place from the model's own files). The server
model keeps the original tensor names for almost every tensor, so tensors are matched by
name; those that cannot be matched are counted, not guessed.

A tensor is **exposed** when its server value equals the plaintext one (same shape,
``np.allclose`` with a tight tolerance). Counted are intermediate float tensors with more
than one element that depend on the model's content inputs (not only on constants, shapes,
attention masks or positions) and that are not constant-valued, plus the server-side state
outputs (the KV cache). Excluded, because equivariant encryption leaves them visible by
design:

* attention scores and probabilities: tensors in clear produced by Softmax, by a contraction
  of two protected operands (``Q·Kᵀ`` with dual bases), or on the way from such a
  contraction to the Softmax (scaling, masking);
* per-token statistics: outputs of a reduction (``ReduceMean``, ...) over a protected axis,
  the mean / inverse-std outputs of normalisation ops, and what is computed from them alone
  (``+ eps``, ``Sqrt``, ``Reciprocal``);
* shapes, integer tensors and tensors derived only from masks and positions.

Memory: one model is loaded and run at a time (its session, which holds its weights, is released
before the next is built; a large model runs in segments, :mod:`eecompile.passes.segments`, one segment's
weights at a time); the plaintext values are parked on disk in the staging folder and compared
one tensor at a time. Models above :data:`MAX_MODEL_BYTES` (weights included) are not measured; the result
says so.
"""

from __future__ import annotations

import re
import shutil
from collections import deque
from pathlib import Path

import numpy as np
import onnx

from eecompile.passes.store import in_place_session, load_structure, model_bytes, release_memory

FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16}
MAX_MODEL_BYTES = 1 << 40
"""Largest model (protobuf + external data) whose exposure is measured (large ones run in segments, so memory
holds one segment's weights; the limit is for callers that want to skip the time)."""
RTOL, ATOL = 1e-5, 1e-6  # atol is relative to the tensor's max |value|
METADATA_INPUT = re.compile(r"mask|position|cache_position|token_type|segment", re.IGNORECASE)
REDUCTIONS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceProd"}
NORMS_WITH_STATS = {"LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
                    "SkipSimplifiedLayerNormalization", "RMSNormalization"}
CONTRACTIONS = {"MatMul", "Einsum", "Gemm", "FusedMatMul"}
SHAPE_SOURCES = {"Shape", "Size", "ConstantOfShape", "EyeLike", "RandomNormalLike", "RandomUniformLike"}


def not_measured(detail: str) -> dict:
    """The exposure entry of a compile that did not measure it."""
    return {"checked": False, "detail": detail}


class _Graph:
    """Producers, consumers and input dependence of a model's main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.constants = {i.name for i in g.initializer}
        self.constants |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
        self.inputs = [i for i in g.input if i.name not in self.constants]
        self.outputs = {o.name for o in g.output}
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in g.node:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        types = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.output, *g.value_info]}
        self.types = types
        content = {i.name for i in self.inputs
                   if not (types.get(i.name) not in FLOAT_TYPES and METADATA_INPUT.search(i.name))}
        metadata = {i.name for i in self.inputs} - content
        self.content: set[str] = set(content)  # depends on a content input
        self.meta: set[str] = set(metadata)  # depends on masks/positions (and not on content)
        for n in self.nodes:  # graph nodes are topologically sorted (ONNX requires it)
            if n.op_type in SHAPE_SOURCES:
                continue
            ins = [i for i in n.input if i]
            if any(i in self.content for i in ins):
                self.content.update(o for o in n.output if o)
            elif any(i in self.meta for i in ins):
                self.meta.update(o for o in n.output if o)

    def data_inputs(self, node) -> list[str]:
        """Inputs of ``node`` that depend on the model's content."""
        return [i for i in node.input if i and i in self.content]


def _by_design(graph: _Graph, clear) -> dict[str, str]:
    """Tensor name → why it is visible by design (``attention`` or ``statistics``)."""
    why: dict[str, str] = {}
    attention: set[str] = set()
    for n in graph.nodes:
        outs = [o for o in n.output if o]
        if n.op_type in ("Softmax", "LogSoftmax"):
            attention.update(o for o in outs if clear(o))
            # what feeds the Softmax: scores, scaled and masked, back to their contraction
            queue = deque([(n.input[0], 0)])
            while queue:
                t, depth = queue.popleft()
                if t in attention or t not in graph.content or not clear(t) or depth > 12:
                    continue
                attention.add(t)
                p = graph.producer.get(t)
                if p is None or p.op_type in CONTRACTIONS:
                    continue
                queue.extend((i, depth + 1) for i in graph.data_inputs(p))
        elif n.op_type in CONTRACTIONS:
            data = graph.data_inputs(n)
            if len(data) >= 2 and not any(clear(i) for i in data[:2]):
                attention.update(o for o in outs if clear(o))
    stats: set[str] = set()
    for n in graph.nodes:
        if n.op_type in REDUCTIONS and n.input and n.input[0] in graph.content and not clear(n.input[0]):
            stats.update(o for o in n.output if o and clear(o))
        elif n.op_type in NORMS_WITH_STATS:
            stats.update(o for o in n.output[1:] if o)
    for seeds, label in ((attention, "attention"), (stats, "statistics")):
        queue = deque(seeds)
        while queue:  # forward through nodes whose only content inputs are in the set (Mul scale, + eps, Sqrt)
            t = queue.popleft()
            for c in graph.consumers.get(t, []):
                if c.op_type in CONTRACTIONS:
                    continue
                if all(i in seeds for i in graph.data_inputs(c)):
                    for o in c.output:
                        if o and o not in seeds and clear(o):
                            seeds.add(o)
                            queue.append(o)
        for t in seeds:
            why.setdefault(t, label)
    return why


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            vi = onnx.ValueInfoProto()
            vi.name = name  # ONNX Runtime infers the type
            model.graph.output.append(vi)
    return model


def _session(model: onnx.ModelProto, folder: Path, names: list[str]):
    """A session of ``model`` (structure only) reading its weights in place from the files in ``folder``.

    A model above :data:`~eecompile.passes.segments.PIECEWISE_BYTES` of weights runs in segments (one
    segment's weights in memory at a time; every intermediate can still be fetched)."""
    import onnxruntime as ort

    from eecompile.passes import segments

    def unoptimised():
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # values as the graph says
        options.log_severity_level = 4
        return options

    if segments.piecewise(model):  # cut where the model's own graph says (before fetches are added)
        return segments.SegmentedSession(model, folder, unoptimised)
    return in_place_session(_with_outputs(model, names), folder, unoptimised())


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.shape != b.shape:
        return False
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    finite = np.isfinite(a64)
    if not np.array_equal(finite, np.isfinite(b64)):
        return False
    if not finite.any():
        return True
    scale = float(np.max(np.abs(a64[finite]))) or 1.0
    return bool(np.allclose(a64[finite], b64[finite], rtol=RTOL, atol=ATOL * scale))


def measure_exposure(original: str | Path, server: str | Path, plain_feeds: dict, encrypted_feeds: dict,
                     work_dir: str | Path, clear=None, state_outputs: list[str] = (),
                     max_bytes: int = MAX_MODEL_BYTES) -> dict:
    """Run both models on one set of feeds and count the tensors the server sees in plaintext.

    ``clear(name)`` says whether the analysis left a tensor's space clear (default: unknown,
    treated as clear, so only Softmax/statistics outputs are excluded); ``state_outputs`` are
    the KV-cache outputs. Returns the report's ``exposure`` entry (see module docstring).
    """
    clear = clear or (lambda name: True)
    original, server, work = Path(original), Path(server), Path(work_dir) / "exposure"
    sizes = {}
    for label, path in (("original", original), ("server", server)):
        size = sizes[label] = model_bytes(path)
        if size > max_bytes:
            return not_measured(f"skipped: the {label} model is {size / 2**20:.0f} MiB, above the "
                                f"{max_bytes / 2**20:.0f} MiB limit of the exposure measurement")
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _measure(original, server, plain_feeds, encrypted_feeds, work, clear, list(state_outputs), sizes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _measure(original: Path, server: Path, plain_feeds, encrypted_feeds, work: Path, clear, state_outputs,
             sizes: dict[str, int]) -> dict:
    model = load_structure(original)  # the graph; the weights stay in their files
    try:
        model = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - types are only a filter; ORT infers them anyway
        pass
    graph = _Graph(model)
    by_design = _by_design(graph, clear)
    names, meta_only = [], 0
    for n in graph.nodes:
        for o in n.output:
            if not o or o in graph.outputs or o in graph.constants:
                continue
            elem = graph.types.get(o)
            if elem and elem not in FLOAT_TYPES:
                continue  # integer and bool tensors: shapes, indices, masks
            if o not in graph.content:
                meta_only += o in graph.meta
                continue
            names.append(o)
    state = [s for s in state_outputs if s in graph.outputs]
    where = {o: (graph.producer[o].name, graph.producer[o].op_type) for o in [*names, *state] if o in graph.producer}
    session = _session(model, original.parent, names)
    del model, graph
    fetch = [*names, *state]
    values = session.run(fetch, plain_feeds)
    del session
    release_memory(sizes["original"])
    kept = []
    for name, value in zip(fetch, values):
        value = np.asarray(value)
        if value.dtype.kind == "f" and (value.size > 1 or name in state):
            np.save(work / f"{len(kept)}.npy", value)
            kept.append(name)
    del values
    index = {name: i for i, name in enumerate(kept)}

    model = load_structure(server)
    server_tensors = {o for n in model.graph.node for o in n.output if o} | {o.name for o in model.graph.output}
    matched = [n for n in kept if n in server_tensors]
    unmatched = len([n for n in kept if n not in server_tensors])
    session = _session(model, server.parent, matched)
    del model
    got = session.run(matched, encrypted_feeds)
    del session
    release_memory(sizes["server"])

    exposed, compared, excluded, uninformative = [], 0, {}, 0
    state_compared = state_exposed = 0
    for name, value in zip(matched, got):
        plain = np.load(work / f"{index[name]}.npy")
        node, op_type = where.get(name, ("", ""))
        if name in state:
            state_compared += 1
            if _equal(plain, np.asarray(value)):
                state_exposed += 1
                exposed.append({"tensor": name, "node": node, "op_type": op_type, "kind": "state"})
            continue
        if name in by_design:
            excluded[by_design[name]] = excluded.get(by_design[name], 0) + 1
            continue
        finite = plain[np.isfinite(plain)]
        if finite.size == 0 or np.ptp(finite) == 0:
            uninformative += 1  # constant-valued: equal under every basis, says nothing
            continue
        compared += 1
        if _equal(plain, np.asarray(value)):
            exposed.append({"tensor": name, "node": node, "op_type": op_type, "kind": "intermediate"})
    if meta_only:
        excluded["positions_and_masks"] = meta_only
    intermediates = [e for e in exposed if e["kind"] == "intermediate"]
    return {
        "checked": True,
        "detail": f"{len(matched)} of {len(kept)} float tensors matched by name in the server model",
        "intermediates_compared": compared,
        "intermediates_exposed": len(intermediates),
        "state_outputs_compared": state_compared,
        "state_outputs_exposed": state_exposed,
        "exposed": exposed,
        "excluded_by_design": sum(excluded.values()),
        "excluded": excluded,
        "uninformative": uninformative,
        "matched": len(matched),
        "unmatched": unmatched,
    }


def clear_test(analysis):
    """``clear(name)`` for :func:`measure_exposure` from an :class:`~eecompile.passes.analyze.Analysis`.

    A tensor is clear when it has no annotation or every block of its annotation is clear;
    a tensor the analysis does not know (renamed) counts as clear.
    """
    from eecompile.passes.annotations import IndexValues, Protected
    from eecompile.passes.spaces import BasisClass

    ann, spaces = analysis.ctx.ann, analysis.ctx.spaces

    def clear(name: str) -> bool:
        a = ann.get(name)
        if a is None:
            return True
        if isinstance(a, IndexValues):
            return spaces.cls(a.ref) == BasisClass.CLEAR
        refs = a.refs if isinstance(a, Protected) else getattr(getattr(a, "source", None), "refs", ())
        if not refs:
            return True
        return all(spaces.cls(b) == BasisClass.CLEAR for b in spaces.expand(tuple(refs)))

    return clear


def exposure_for_compile(original, server, client, state: dict, verification, analysis, work_dir,
                         max_bytes: int = MAX_MODEL_BYTES) -> dict:
    """The compile's ``exposure`` entry: measured on the first verified feeds (not measured without them)."""
    from eecompile.passes.verify import verification_client

    if not verification.checked or not verification.feeds:
        return not_measured("not measured: verification did not run")
    feeds = verification.feeds[0]
    encrypt = verification_client(client, state) or client
    if encrypt is client and any(np.size(feeds[n]) for n in client.state_inputs if n in feeds):
        return not_measured("not measured: the cache's bases are not available to encrypt the past inputs")
    try:
        return measure_exposure(original, server, feeds, encrypt.encrypt(feeds), work_dir, clear_test(analysis),
                                analysis.state_outputs, max_bytes=max_bytes)
    except Exception as exc:  # noqa: BLE001 - a measurement that cannot run is reported, never fatal
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        return not_measured(f"not measured: {type(exc).__name__}: {line}")
