"""Pass 1 — normalize: canonical forms that keep the function and help the analysis.

* Constant nodes become initializers; Transpose of an initializer is folded (this unties
  a tied LM head from its embedding, a V×d copy that the report states).
* Rewrites of large weights still in their file (those transposes, the gains below) are deferred: the
  constant holds the rewrite (:class:`~eecompile.passes.store.DerivedValues`), applied when the weight's
  rule reads it to fold it, so each weight is read once and written once.
* SliceGPT-style gain folding: a per-coordinate gain (a norm's scale, a Mul by a constant
  vector) whose every consumer is a linear layer is multiplied into those weights and
  replaced by ones, so the normalised space may take an orthogonal basis.
* A fused projection reshaped into parts and heads at once (``[.., N] -> [.., P, H, d]``) and then
  selected along the parts has each part selected first (:mod:`eecompile.passes.part_selects`).
* Initializers with several consumers are cloned, so each can be folded on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.graph import ModelGraph
from eecompile.passes.part_selects import select_parts_first
from eecompile.passes.rules import SHAPE_ONLY_OPS
from eecompile.passes.store import DerivedValues, FileValues, derived, shared_values

NORM_OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization",
            "SkipSimplifiedLayerNormalization", "SkipLayerNormalization")
GAIN_INPUT = {"SkipSimplifiedLayerNormalization": 2, "SkipLayerNormalization": 2}
"""Index of a norm's gain among its inputs where it is not 1 (ONNX Runtime's residual norms: input, skip, gamma)."""
BETA_INPUT = {"LayerNormalization": 2, "SkipLayerNormalization": 3}
"""Index of the bias added after the gain (divided by the gain when the gain is folded)."""


@dataclass
class NormalizeResult:
    """What normalize changed, for the report."""

    constants_lifted: int = 0
    transposes_folded: list[str] = field(default_factory=list)
    gains_folded: list[str] = field(default_factory=list)
    clones: int = 0
    parts_selected: list[str] = field(default_factory=list)
    """Reshapes into (parts, heads, ..) whose part selections now come first (:mod:`~eecompile.passes.part_selects`)."""


def normalize(mg: ModelGraph) -> NormalizeResult:
    """Rewrite ``mg`` in place into the canonical form the analysis expects."""
    result = NormalizeResult()
    _name_nodes(mg)
    _lift_constants(mg, result)
    _fold_constant_transposes(mg, result)
    mg.refresh()
    _fold_static_shapes(mg)
    result.parts_selected = select_parts_first(mg)
    _fold_gains(mg, result)
    _clone_shared(mg, result)
    mg.refresh()
    return result


def _name_nodes(mg: ModelGraph) -> None:
    """Give every node a unique name (space names, and so key derivations, build on them)."""
    seen: set[str] = set()
    for index, node in enumerate(mg.nodes):
        name = node.name or f"{node.op}_{index}"
        while name in seen:
            name = f"{name}_{index}"
        node.name = name
        seen.add(name)


def _fold_static_shapes(mg: ModelGraph) -> None:
    """Constant-fold subgraphs that depend only on constants and static dimensions.

    graphsurgeon evaluates them with ONNX Runtime on an exported copy, which cannot read weights that
    stay in their file (an absolute external-data path): the constants such a subgraph reads are loaded
    for the folding and put back in their file afterwards where they survive unfolded.
    """
    lazy = _foldable_file_constants(mg)
    for tensor, values in lazy:
        tensor.values = values.load()
    try:
        mg.graph.fold_constants(fold_shapes=True, error_ok=True, size_threshold=1 << 20)
    except Exception:  # graphsurgeon's folding is an optimisation; the analysis copes without it
        pass
    else:
        mg.graph.cleanup(remove_unused_graph_inputs=False).toposort()
    for tensor, values in lazy:
        tensor._values = values  # still a constant of the graph, or dropped with its consumers
        tensor.data_location = None


def _foldable_file_constants(mg: ModelGraph) -> list[tuple[gs.Constant, FileValues | DerivedValues]]:
    """Constants still in a file (or a deferred rewrite of one) that are read by a node whose inputs are all
    constants (a folding candidate)."""
    found: dict[int, tuple[gs.Constant, FileValues]] = {}
    for node in mg.nodes:
        inputs = [t for t in node.inputs if t.name]
        if not inputs or not all(isinstance(t, gs.Constant) for t in inputs):
            continue
        for tensor in inputs:
            if isinstance(tensor._values, (FileValues, DerivedValues)):
                found[id(tensor)] = (tensor, tensor._values)
    return list(found.values())


def _lift_constants(mg: ModelGraph, result: NormalizeResult) -> None:
    for node in mg.nodes:
        if node.op != "Constant" or "value" not in node.attrs:
            continue
        out = node.outputs[0]
        value = node.attrs["value"]
        values = value.values if isinstance(value, gs.Constant) else np.asarray(value)
        const = gs.Constant(out.name, np.asarray(values))
        if out in mg.graph.outputs:
            continue
        _replace_uses(out, const)
        node.outputs.clear()
        result.constants_lifted += 1


def _replace_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    for consumer in list(old.outputs):
        for i, t in enumerate(consumer.inputs):
            if t is old:
                consumer.inputs[i] = new


def _fold_constant_transposes(mg: ModelGraph, result: NormalizeResult) -> None:
    for node in mg.nodes:
        if node.op != "Transpose" or not isinstance(node.inputs[0], gs.Constant):
            continue
        out = node.outputs[0]
        if out in mg.graph.outputs:
            continue
        source = node.inputs[0]
        perm = tuple(int(p) for p in node.attrs.get("perm", range(len(source.shape) - 1, -1, -1)))
        name = f"{out.name}_folded"
        deferred = derived(source._values, name, mg.store, "transpose", perm)
        if deferred is not None:  # a weight in its file: transposed when its rule reads it to fold it
            const = gs.Constant(name, deferred)
        else:
            src = np.asarray(source.values)
            const = gs.Constant(name, np.zeros(0, src.dtype))
            mg.set_values(const, np.transpose(src, perm))
        _replace_uses(out, const)
        node.outputs.clear()
        result.transposes_folded.append(node.inputs[0].name)


def _linear_consumer(node: gs.Node, tensor: gs.Tensor, requantize: bool = False) -> bool:
    """Whether ``node`` multiplies ``tensor``'s last axis by a constant 2-D weight (with ``requantize``, a
    quantised one too: the gain is applied to its rows when it is re-quantised)."""
    if requantize and node.op == "MatMulNBits" and node.inputs[0] is tensor and node.name:
        return all(isinstance(t, gs.Constant) for t in node.inputs[1:3])
    if requantize and node.op == "MatMul" and node.inputs[0] is tensor and node.name and node.inputs[1].inputs:
        dq = node.inputs[1].inputs[0]  # a QDQ weight: DequantizeLinear of constants, read by this MatMul only
        return (dq.op == "DequantizeLinear" and len(node.inputs[1].outputs) == 1
                and all(isinstance(t, gs.Constant) for t in dq.inputs if t.name))
    if node.op == "MatMul" and node.inputs[0] is tensor and isinstance(node.inputs[1], gs.Constant):
        return len(node.inputs[1].shape) == 2
    if node.op == "Gemm" and node.inputs[0] is tensor and isinstance(node.inputs[1], gs.Constant):
        return not node.attrs.get("transA", 0)
    return False


def _scale_rows(mg: ModelGraph, node: gs.Node, gain: np.ndarray) -> None:
    if node.op == "MatMulNBits" or not isinstance(node.inputs[1], gs.Constant):  # quantised: applied on re-quantising
        previous = mg.row_gains.get(node.name)
        mg.row_gains[node.name] = gain if previous is None else previous * gain
        return
    trans = node.op == "Gemm" and node.attrs.get("transB", 0)
    name = f"{node.inputs[1].name}_g"
    deferred = derived(node.inputs[1]._values, name, mg.store, "scale", gain, 1 if trans else 0)
    if deferred is not None:  # a weight in its file: scaled when its rule reads it to fold it
        node.inputs[1] = gs.Constant(name, deferred)
        return
    weight = np.asarray(node.inputs[1].values)
    scaled = weight * gain[None, :] if trans else weight * gain[:, None]
    const = gs.Constant(name, np.zeros(0, weight.dtype))
    mg.set_values(const, scaled.astype(weight.dtype))
    node.inputs[1] = const


def _fold_gains(mg: ModelGraph, result: NormalizeResult) -> None:
    outputs = set(id(t) for t in mg.graph.outputs)
    for node in mg.nodes:
        if node.op in NORM_OPS:
            gain_index, out = GAIN_INPUT.get(node.op, 1), node.outputs[0]
        elif node.op == "Mul":
            gain_index = next((i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)), None)
            out = node.outputs[0]
            if gain_index is None:
                continue
        else:
            continue
        if len(node.inputs) <= gain_index or not isinstance(node.inputs[gain_index], gs.Constant):
            continue
        gain = np.asarray(node.inputs[gain_index].values)
        if gain.ndim != 1 or gain.size < 2 or np.all(gain == 1) or np.any(gain == 0):
            continue
        if node.op == "Mul" and (node.inputs[1 - gain_index].shape is None
                                 or node.inputs[1 - gain_index].shape[-1] != gain.size):
            continue
        consumers = [c for c in out.outputs if c.op not in SHAPE_ONLY_OPS]
        if not consumers or id(out) in outputs or not all(_linear_consumer(c, out, mg.options.requantize)
                                                            for c in consumers):
            continue
        g64 = gain.astype(np.float64)
        for consumer in consumers:
            _scale_rows(mg, consumer, g64)
        beta = BETA_INPUT.get(node.op)
        if beta is not None and len(node.inputs) > beta and isinstance(node.inputs[beta], gs.Constant):
            bias = np.asarray(node.inputs[beta].values)
            node.inputs[beta] = gs.Constant(f"{node.inputs[beta].name}_g", (bias / g64).astype(bias.dtype))
        node.inputs[gain_index] = gs.Constant(f"{node.inputs[gain_index].name}_ones", np.ones_like(gain))
        result.gains_folded.append(node.name)


def _clone_shared(mg: ModelGraph, result: NormalizeResult) -> None:
    seen: dict[int, int] = {}
    for node in mg.nodes:
        for i, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant):
                continue
            if not mg.is_float(tensor):
                continue
            count = seen.get(id(tensor), 0)
            seen[id(tensor)] = count + 1
            if count:  # the clone reads the same data until a fold replaces its values
                node.inputs[i] = gs.Constant(f"{tensor.name}_clone{count}", shared_values(tensor._values))
                result.clones += 1
