"""Run a large ONNX model in pieces, so that memory holds one piece's weights at a time.

An ONNX Runtime session holds its whole model's weights. For verification and the exposure measure of a
model whose weights are above :data:`PIECEWISE_BYTES`, the graph is cut into consecutive segments of its
topological order (each with at most about :data:`SEGMENT_BYTES` of weights, cut where few tensors are
live: between transformer layers the residual stream and little else); each segment becomes its own
session (reading only its weights, in place, as :func:`~eecompile.passes.store.in_place_session` does),
runs on the previous segments' outputs and is released before the next is built.

:class:`SegmentedSession` looks like an ``onnxruntime.InferenceSession`` from outside (``get_inputs``,
``get_outputs``, ``run``), and ``run`` may fetch any intermediate tensor, not only graph outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

PIECEWISE_BYTES = 64 << 20
"""Models with more weight bytes than this run in segments (smaller ones in one session)."""
SEGMENT_BYTES = 32 << 20
"""Fewest weight bytes a segment aims at; the budget is this or the largest weight, whichever is larger
(a single node's weights above the budget make a segment of their own)."""


@dataclass(frozen=True)
class _Arg:
    """An input or output as ONNX Runtime's ``NodeArg`` presents it (name, type string, shape)."""

    name: str
    type: str
    shape: list


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of an initializer's values (its external-data length, or its embedded data), read from the proto."""
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        if "length" in info:
            return int(info["length"])
    if tensor.raw_data:
        return len(tensor.raw_data)
    count = int(np.prod(tensor.dims, dtype=np.int64)) if tensor.dims else 1
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize if tensor.data_type else 0


def weight_bytes(model: onnx.ModelProto) -> int:
    """Total bytes of the model's initializers (the structure is read, not the weights)."""
    return sum(tensor_bytes(t) for t in model.graph.initializer)


def segment_budget(model: onnx.ModelProto, floor: int | None = None) -> int:
    """Weight bytes per segment: the largest weight or ``floor`` (default :data:`SEGMENT_BYTES`), the larger."""
    floor = SEGMENT_BYTES if floor is None else floor
    return max([floor, *(tensor_bytes(t) for t in model.graph.initializer)])


def _subgraph_inputs(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs (If/Loop/Scan bodies) read from the enclosing scope."""
    out: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            local = {i.name for i in g.input} | {t.name for t in g.initializer}
            for n in g.node:
                local |= set(n.output)
            for n in g.node:
                out |= {i for i in [*n.input, *_subgraph_inputs(n)] if i and i not in local}
    return out


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """Every name a node reads: its inputs and what its subgraphs take from the enclosing graph."""
    return [i for i in node.input if i] + sorted(_subgraph_inputs(node) - set(node.input))


def plan_segments(model: onnx.ModelProto, budget: int = SEGMENT_BYTES) -> list[tuple[int, int]]:
    """Consecutive ``(start, stop)`` node ranges of ``model``'s (topologically ordered) graph.

    Each range holds about ``budget`` bytes of weights (at least half of it, at most all of it unless one
    node alone holds more); within that window the cut goes where the fewest computed tensors cross it.
    """
    graph = model.graph
    nodes = list(graph.node)
    n = len(nodes)
    sizes = {t.name: tensor_bytes(t) for t in graph.initializer}
    seen: set[str] = set()
    cost = []  # weight bytes each node brings in first
    producer: dict[str, int] = {}
    last: dict[str, int] = {}
    for i, node in enumerate(nodes):
        reads = node_inputs(node)
        fresh = [r for r in reads if r in sizes and r not in seen]
        seen.update(fresh)
        cost.append(sum(sizes[r] for r in fresh))
        for r in reads:
            last[r] = i
        for o in node.output:
            if o:
                producer[o] = i
    outputs = {o.name for o in graph.output}
    crossing = np.zeros(n + 1, dtype=np.int64)  # crossing[c]: tensors made before node c and read at or after it
    for name, p in producer.items():
        end = n if name in outputs else last.get(name, p)
        if end > p:
            crossing[p + 1] += 1
            crossing[end + 1 if end < n else n] -= 1
    crossing = np.cumsum(crossing)
    prefix = np.concatenate([[0], np.cumsum(cost)])
    ranges, start = [], 0
    while start < n:
        stop = int(np.searchsorted(prefix, prefix[start] + budget, side="right")) - 1  # last c with w ≤ budget
        stop = max(stop, start + 1)
        if stop >= n:
            ranges.append((start, n))
            break
        low = int(np.searchsorted(prefix, prefix[start] + budget // 2, side="left"))
        window = range(max(low, start + 1), stop + 1)
        cut = min(window, key=lambda c: (crossing[c], -c)) if len(window) else stop
        ranges.append((start, cut))
        start = cut
    return ranges


def _type_string(elem_type: int) -> str:
    name = onnx.TensorProto.DataType.Name(elem_type).lower()
    return f"tensor({name})"


def _args(values: list[onnx.ValueInfoProto]) -> list[_Arg]:
    out = []
    for v in values:
        tt = v.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
        out.append(_Arg(v.name, _type_string(tt.elem_type), shape))
    return out


def _value_info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
    """A segment input typed as ``array`` with symbolic dims of its rank (other feed sets may differ in size)."""
    from eecompile.passes.precision import BFLOAT16

    array = np.asarray(array)
    elem = (onnx.TensorProto.BFLOAT16 if array.dtype == BFLOAT16
            else onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
    return onnx.helper.make_tensor_value_info(name, elem, [f"{name}_d{i}" for i in range(array.ndim)])


class SegmentedSession:
    """An ``InferenceSession``-like runner of a model (a structure, weights in their files) in segments.

    ``folder`` is where the weights' files are (as for :func:`~eecompile.passes.store.in_place_session`).
    ``options`` is an ``onnxruntime.SessionOptions`` used for every segment's session, or a function making
    a fresh one for each: then the Transposes of large weights are applied before each segment's session is
    built (:mod:`eecompile.passes.transposed_weights`; their values are handed over in memory, which needs
    options of the segment's own).
    """

    def __init__(self, model: onnx.ModelProto, folder: str | Path, options=None, budget: int | None = None,
                 ranges: list[tuple[int, int]] | None = None) -> None:
        from eecompile.passes.transposed_weights import TransposedWeights

        self.model = model
        self.folder = Path(folder)
        self.options = options
        self.ranges = ranges or plan_segments(model, budget or segment_budget(model))
        graph = model.graph
        inits = {t.name for t in graph.initializer}
        self._inputs = _args([i for i in graph.input if i.name not in inits])
        self._outputs = _args(list(graph.output))
        self._init = {t.name: t for t in graph.initializer}
        self._ahead = TransposedWeights(model, self.folder) if options is None or callable(options) else None
        for name in self._ahead.sources if self._ahead else ():
            self._init[name] = self._ahead.declaration(name)  # a weight from now on, its node left out
        self._kept = [not (self._ahead and self._ahead.applied(node)) for node in graph.node]
        self._handed: list = []  # the OrtValues of the weights handed to the segment being run
        self._reads = [node_inputs(node) for node in graph.node]
        self._last: dict[str, int] = {}
        for i, reads in enumerate(self._reads):
            for r in reads:
                self._last[r] = i

    def get_inputs(self) -> list[_Arg]:
        """The model's inputs (weights excluded), as ONNX Runtime lists them."""
        return self._inputs

    def get_outputs(self) -> list[_Arg]:
        """The model's outputs."""
        return self._outputs

    def _nodes(self, start: int, stop: int) -> list[onnx.NodeProto]:
        """The nodes a segment runs (a Transpose applied ahead is not one of them)."""
        return [n for i, n in enumerate(self.model.graph.node[start:stop], start) if self._kept[i]]

    def _options(self, ahead: dict[str, np.ndarray]):
        """The session options of a segment whose weights ``ahead`` come in memory (kept in ``_handed`` until
        the segment's session is released: ONNX Runtime holds a pointer to them, not a reference)."""
        import onnxruntime as ort

        options = self.options() if callable(self.options) else self.options or ort.SessionOptions()
        self._handed = [ort.OrtValue.ortvalue_from_numpy(values) for values in ahead.values()]
        for name, value in zip(ahead, self._handed):  # used in place: these (and their buffers) outlive the session
            options.add_initializer(name, value)
        return options

    def _segment(self, start: int, stop: int, feeds: dict, wanted: list[str]) -> onnx.ModelProto:
        graph = self.model.graph
        nodes = self._nodes(start, stop)
        made = {o for node in nodes for o in node.output if o}
        reads = {r for i, rs in enumerate(self._reads[start:stop], start) if self._kept[i] for r in rs}
        inputs = sorted(r for r in reads if r not in made and r not in self._init)
        missing = [r for r in inputs if r not in feeds]
        if missing:
            raise ValueError(f"segment {start}:{stop} needs '{missing[0]}', which no input or earlier segment gave")
        inits = [self._init[r] for r in sorted(reads) if r in self._init]
        types = {v.name: v for v in graph.value_info if v.name in made}
        seg = onnx.helper.make_graph(nodes, f"{graph.name}_{start}_{stop}",
                                     [_value_info(r, feeds[r]) for r in inputs],
                                     [onnx.ValueInfoProto(name=o) for o in wanted], inits,
                                     value_info=list(types.values()))
        out = onnx.ModelProto()
        out.ir_version = self.model.ir_version
        out.opset_import.extend(self.model.opset_import)
        out.functions.extend(self.model.functions)
        out.graph.CopyFrom(seg)
        return out

    def run(self, names, feeds: dict, run_options=None) -> list:
        """Values of ``names`` (graph outputs or any intermediate tensor; None: every output) on ``feeds``."""
        return self.run_many(names, [feeds], run_options)[0]

    def run_many(self, names, feeds_list: list[dict], run_options=None,
                 links: list[dict[str, tuple[int, str]]] | None = None) -> list[list]:
        """:meth:`run` on each of ``feeds_list``, building each segment's session once for all of them.

        Every feed set must give the segment's inputs the same types; shapes may differ only where the
        first feed set's segment accepts them (each segment's inputs are typed from the first set, their
        dims left symbolic). ``links[j]`` maps inputs of feed set ``j`` to ``(i, tensor)``: tensor ``tensor``
        of an earlier feed set ``i``'s run, taken when a segment first needs it (a decode step's cache is the
        prefill's ``present*``, computed segment by segment in the same pass).
        """
        from eecompile.passes.store import in_place_session, release_memory

        names = list(names or [o.name for o in self._outputs])
        graph_outputs = {o.name for o in self._outputs}
        links = links or [{} for _ in feeds_list]
        linked = {tensor for link in links for _, tensor in link.values()}
        if linked - graph_outputs:
            raise ValueError(f"a linked tensor must be a graph output: {sorted(linked - graph_outputs)[0]}")
        wanted_all = set(names)
        runs = [dict(f) for f in feeds_list]
        given = [set(f) for f in feeds_list]
        for start, stop in self.ranges:
            made = [o for node in self._nodes(start, stop) for o in node.output if o]
            wanted = [o for o in dict.fromkeys(made)
                      if o in wanted_all or o in graph_outputs or self._last.get(o, -1) >= stop]
            if not wanted or not runs:
                continue
            segment = self._segment(start, stop, runs[0], wanted)
            ahead = [t.name for t in segment.graph.initializer if self._ahead and self._ahead.handed(t)]
            options = self._options(dict(zip(ahead, self._ahead.values(ahead))) if ahead else {})
            session = in_place_session(segment, self.folder, options)
            del segment, options  # the session holds what it needs (the weights handed over among it)
            inputs = [i.name for i in session.get_inputs()]
            for j, (values, fed) in enumerate(zip(runs, given)):
                for name in inputs:
                    if name not in values and name in links[j]:
                        source, tensor = links[j][name]
                        if source >= j or tensor not in runs[source]:
                            raise ValueError(f"segment {start}:{stop} needs '{name}' from feed set {source}'s "
                                             f"'{tensor}', which is not computed yet")
                        values[name] = runs[source][tensor]
                got = session.run(wanted, {n: values[n] for n in inputs}, run_options)
                # copies: an array ONNX Runtime returns can keep its session's memory (the segment's weights,
                # where they were copied into its arena) alive after the session is released
                values.update((name, np.array(value, copy=True)) for name, value in zip(wanted, got))
                del got
                for name in [k for k in values if k not in fed and k not in wanted_all
                             and k not in graph_outputs and self._last.get(k, -1) < stop]:
                    del values[name]  # read by no later segment
            del session  # before the next segment refills the buffers its weights came from
            self._handed = []
            release_memory()
        for name in wanted_all & set(self._ahead.sources if self._ahead else ()):  # a fetched weight Transpose
            value = np.array(self._ahead.values([name])[0], copy=True)
            for values in runs:
                values[name] = value
        return [[values[n] for n in names] for values in runs]


def run_all(session, names, feeds_list: list[dict], links: list[dict[str, tuple[int, str]]] | None = None
            ) -> list[list]:
    """``session.run(names, f)`` for each feed set; a :class:`SegmentedSession` builds each segment once.

    ``links`` (see :meth:`SegmentedSession.run_many`) feeds inputs of a later set from an earlier set's outputs,
    which must be among ``names``."""
    if isinstance(session, SegmentedSession):
        return session.run_many(names, feeds_list, links=links)
    names = list(names or [o.name for o in session.get_outputs()])
    outs: list[list] = []
    for j, feeds in enumerate(feeds_list):
        feeds = dict(feeds)
        for name, (source, tensor) in (links[j] if links else {}).items():
            if source >= j:
                raise ValueError(f"feed set {j} links '{name}' to a later feed set {source}")
            feeds[name] = outs[source][names.index(tensor)]
        outs.append(session.run(names, feeds))
    return outs


def piecewise(model: onnx.ModelProto) -> bool:
    """Whether ``model`` runs in segments: its weights are above :data:`PIECEWISE_BYTES` (read at call time)."""
    return weight_bytes(model) > PIECEWISE_BYTES
