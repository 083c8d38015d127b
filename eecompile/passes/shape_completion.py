"""Complete the shapes that shape inference left unknown, by reasoning about what they are.

ONNX shape inference gives up at a Reshape whose target is computed at run time (``Shape →
Gather → Concat``) and writes ``unk__N`` from there on; ONNX Runtime's symbolic inference,
which does better, refuses graphs with ops it does not know (opset-23 ``Attention``). This
pass walks the graph once in topological order and, for every tensor whose inferred shape
has unknown dims, derives the dims from its producer: the Reshape target evaluated
symbolically (``-1`` from the element count), permutations, inserted and removed axes,
broadcasting, MatMul, Concat. Known inferred dims are kept; only unknown ones are filled.
Any other op (Conv, pooling, Resize, Pad, GroupNormalization, ... after an op the symbolic
inference does not know) is inferred node by node by ONNX's own per-op inference
(:func:`onnx_node_shapes`) on the completed input shapes, with small constant inputs as data.
The result lives in :attr:`AnalysisContext.shape_overrides`, which every rule reads through
:meth:`AnalysisContext.shape`.
"""

from __future__ import annotations

import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from eecompile.passes import dims
from eecompile.passes.context import AnalysisContext

SAME_SHAPE_OPS = frozenset({
    "Cast", "CastLike", "Identity", "Neg", "Abs", "Sqrt", "Reciprocal", "Exp", "Log", "Erf", "Tanh", "Sigmoid",
    "Relu", "LeakyRelu", "Gelu", "Silu", "HardSigmoid", "HardSwish", "Softplus", "Softmax", "LogSoftmax",
    "LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization", "RotaryEmbedding", "Dropout",
    "Sin", "Cos", "IsNaN", "IsInf", "Not", "Clip", "Elu", "Mish", "Round", "Floor", "Ceil", "Sign",
    "GroupNormalization", "InstanceNormalization", "BatchNormalization", "LpNormalization", "Selu", "Celu",
    "ThresholdedRelu", "Softsign", "Shrink", "Trilu",
})
BROADCAST_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Where", "Equal", "Less", "Greater", "And", "Or",
                           "Max", "Min", "LessOrEqual", "GreaterOrEqual", "PRelu", "Mod"})

TYPE_CHANGING_OPS = frozenset({
    "Cast", "CastLike", "Shape", "Size", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And",
    "Or", "Xor", "IsNaN", "IsInf", "ArgMax", "ArgMin", "NonZero", "ConstantOfShape", "EyeLike", "QuantizeLinear",
    "DequantizeLinear", "DynamicQuantizeLinear", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
})
"""Ops whose output element type is not their first data input's (every other op keeps it on output 0)."""


OPAQUE_SYMBOL = re.compile(r"_o\d+__d\d+$")
"""Dims ONNX Runtime's symbolic inference names after the op that made them (``Flatten_185_o0__d1``): they
relate to nothing, so a dim derived from the producer replaces them."""


def _dim_known(d) -> bool:
    return dims.expr(d) is not None and not (isinstance(d, str) and OPAQUE_SYMBOL.search(d))


def _known(shape: list | None) -> bool:
    return shape is not None and all(_dim_known(d) for d in shape)


def _merge(inferred: list | None, derived: list | None) -> list | None:
    """Inferred dims where known, derived ones where not (ranks must agree)."""
    if derived is None:
        return inferred
    if inferred is None or len(inferred) != len(derived):
        return derived if inferred is None else inferred
    return [d if _dim_known(d) or dims.expr(e) is None else e for d, e in zip(inferred, derived)]


def _broadcast(shapes: list[list]) -> list | None:
    rank = max(len(s) for s in shapes)
    padded = [[1] * (rank - len(s)) + list(s) for s in shapes]
    out = []
    for column in zip(*padded):
        chosen = None
        for d in column:
            if dims.as_int(d) == 1:
                chosen = chosen if chosen is not None else d
                continue
            if dims.expr(d) is not None:
                chosen = d
                break
            chosen = None if chosen is None or dims.as_int(chosen) == 1 else chosen
        out.append(chosen)
    return out


def reshape_target(ctx: AnalysisContext, node: gs.Node, din: list | None) -> list | None:
    """A Reshape's output dims from its shape input: ``0`` copies the input dim, ``-1`` keeps the element count."""
    target = ctx.dim_values(node.inputs[1]) if len(node.inputs) > 1 else None
    if target is None:
        return None
    out: list = []
    infer = None
    for i, t in enumerate(target):
        if t is not None and t == 0 and not node.attrs.get("allowzero", 0):
            out.append(din[i] if din is not None and i < len(din) else None)
        elif t is not None and t == -1:
            infer = i
            out.append(None)
        else:
            out.append(t)
    if infer is not None:
        total = dims.product(din) if din is not None else None
        out[infer] = dims.quotient(total, dims.product(out[:infer] + out[infer + 1:]))
    return out


def _axes(node: gs.Node, ctx: AnalysisContext) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = ctx.const(node.inputs[1])
        return None if value is None else [int(a) for a in np.atleast_1d(value)]
    return None


def derive(ctx: AnalysisContext, node: gs.Node) -> list | None:  # noqa: C901 - one branch per op family
    """Output 0's dims from the node's inputs, or None when this op is not reasoned about."""
    op, ins = node.op, node.inputs
    first = ctx.shape(ins[0]) if ins and ins[0].name else None
    if op in SAME_SHAPE_OPS:
        return first
    if op in BROADCAST_OPS:
        shapes = [ctx.shape(t) for t in ins if t.name]
        return None if any(s is None for s in shapes) else _broadcast(shapes)
    if first is None:
        return None
    if op == "Reshape":
        return reshape_target(ctx, node, first)
    if op == "Transpose":
        perm = node.attrs.get("perm", list(range(len(first) - 1, -1, -1)))
        return [first[p] for p in perm]
    if op == "Unsqueeze":
        axes = _axes(node, ctx)
        if axes is None:
            return None
        rank = len(first) + len(axes)
        inserted = sorted(a % rank for a in axes)
        rest = iter(first)
        return [1 if i in inserted else next(rest) for i in range(rank)]
    if op == "Squeeze":
        axes = _axes(node, ctx)
        if axes is None:
            return None
        removed = {a % len(first) for a in axes}
        return [d for i, d in enumerate(first) if i not in removed]
    if op == "Expand":
        target = ctx.dim_values(ins[1])
        return None if target is None else _broadcast([first, target])
    if op == "MatMul" and len(ins) > 1:
        second = ctx.shape(ins[1])
        if second is None or len(first) < 2 or len(second) < 2:
            return None
        batch = _broadcast([first[:-2], second[:-2]]) if len(first) > 2 or len(second) > 2 else []
        return [*batch, first[-2], second[-1]]
    if op == "Slice":
        return _slice_dims(ctx, node, first)
    if op == "Pad" and "pads" not in node.attrs and len(ins) > 1:  # input dims + pads (known ones)
        from eecompile.passes.rules.spatial import partial_array

        pads = partial_array(ctx, ins[1])
        axes = ctx.const(ins[3]) if len(ins) > 3 and ins[3].name else None
        axes = list(range(len(first))) if axes is None else [int(a) % len(first) for a in np.atleast_1d(axes)]
        if pads is None or pads.ndim != 1 or len(pads) != 2 * len(axes):
            return None
        out = list(first)
        for i, a in enumerate(axes):
            lo, hi = pads[i], pads[i + len(axes)]
            e = dims.expr(first[a])
            out[a] = None if lo is None or hi is None or e is None else e + int(lo) + int(hi)
        return out
    if op == "Flatten":
        axis = int(node.attrs.get("axis", 1)) % (len(first) + 1)
        return [dims.product(first[:axis]) if axis else 1, dims.product(first[axis:])]
    if op == "Gather" and len(ins) > 1:
        index = ctx.shape(ins[1])
        if index is None:
            return None
        axis = int(node.attrs.get("axis", 0)) % len(first)
        return [*first[:axis], *index, *first[axis + 1:]]
    if op == "Attention" and len(ins) > 2:  # opset 23: Y keeps Q's layout with V's head size
        v = ctx.shape(ins[2])
        if v is None or len(first) != len(v):
            return None
        if len(first) == 4:
            return [*first[:3], v[3]]
        heads_q, heads_kv = node.attrs.get("q_num_heads"), node.attrs.get("kv_num_heads")
        width = dims.quotient(dims.expr(v[2]), dims.expr(heads_kv)) if heads_kv else None
        return [*first[:2], None if width is None else width * heads_q]
    if op == "Concat":
        shapes = [ctx.shape(t) for t in ins]
        if any(s is None or len(s) != len(first) for s in shapes):
            return None
        axis = int(node.attrs.get("axis", 0)) % len(first)
        parts = [dims.expr(s[axis]) for s in shapes]
        out = list(first)
        out[axis] = None if any(p is None for p in parts) else sum(parts[1:], parts[0])
        return out
    return None


def _slice_dims(ctx: AnalysisContext, node: gs.Node, first: list) -> list | None:
    """Slice with unit steps: sliced axes get ``min(end, dim) - start`` where both are known."""
    ins = node.inputs
    starts, ends = ctx.dim_values(ins[1]), ctx.dim_values(ins[2])
    axes = ctx.const(ins[3]) if len(ins) > 3 and ins[3].name else None
    steps = ctx.const(ins[4]) if len(ins) > 4 and ins[4].name else None
    if starts is None or ends is None or (steps is not None and np.any(steps != 1)):
        return None
    axes = list(range(len(starts))) if axes is None else [int(a) % len(first) for a in np.atleast_1d(axes)]
    out = list(first)
    for axis, lo, hi in zip(axes, starts, ends):
        size, lo, hi = dims.as_int(first[axis]), dims.as_int(lo), dims.as_int(hi)
        if size is None or lo is None or hi is None:
            out[axis] = None
            continue
        lo, hi = (lo + size if lo < 0 else lo), (hi + size if hi < 0 else hi)
        out[axis] = max(0, min(hi, size) - max(0, min(lo, size)))
    return out


def _split_dims(ctx: AnalysisContext, node: gs.Node) -> list[list | None]:
    """Each Split output: the input's dims with the split axis cut into its part."""
    first = ctx.shape(node.inputs[0])
    if first is None:
        return [None] * len(node.outputs)
    axis = int(node.attrs.get("axis", 0)) % len(first)
    sizes = node.attrs.get("split")
    if sizes is None and len(node.inputs) > 1 and node.inputs[1].name:
        sizes = ctx.partial_values(node.inputs[1])
    total = dims.as_int(first[axis])
    if sizes is None and total is not None and total % len(node.outputs) == 0:
        sizes = [total // len(node.outputs)] * len(node.outputs)
    if sizes is None or len(sizes) != len(node.outputs):
        return [None] * len(node.outputs)
    return [[*first[:axis], size, *first[axis + 1:]] for size in sizes]


CONST_DATA_ELEMENTS = 64
"""Constant inputs up to this size are given to ONNX's per-node inference as data (pads, scales, sizes)."""


def _dim_proto(d) -> int | str | None:
    value = dims.as_int(d)
    if value is not None:
        return value
    e = dims.expr(d)
    return None if e is None else str(e)


def onnx_node_shapes(ctx: AnalysisContext, node: gs.Node,
                     dtypes: dict[str, np.dtype] | None = None) -> list[list | None] | None:
    """The node's output dims by ONNX's per-op inference on the (completed) input shapes, or None.

    Symbolic dims travel as ``dim_param`` text (``2*batch``); unknown ones as unnamed dims. Each
    input needs a known rank and dtype; constant inputs of up to :data:`CONST_DATA_ELEMENTS`
    elements are passed as data, so Pad's pads and Resize's scales are read. ``dtypes`` holds the
    element types of tensors inference left without one (filled in here for the outputs).
    """
    dtypes = {} if dtypes is None else dtypes
    domain = node.domain or ""
    version = ctx.mg.opset_imports.get(domain) if hasattr(ctx.mg, "opset_imports") else None
    if version is None or not onnx.defs.has(node.op, domain):
        return None
    schema = onnx.defs.get_schema(node.op, version, domain)
    types, data = {}, {}
    for t in node.inputs:
        if not t.name:
            continue
        shape = ctx.shape(t)
        dtype = t.dtype if t.dtype is not None else dtypes.get(t.name)
        if shape is None or dtype is None:
            return None
        elem = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        types[t.name] = onnx.helper.make_tensor_type_proto(elem, [_dim_proto(d) for d in shape])
        value = ctx.const(t)
        if value is not None and np.size(value) <= CONST_DATA_ELEMENTS:
            data[t.name] = onnx.numpy_helper.from_array(np.asarray(value), t.name)
    attrs = {k: v for k, v in node.attrs.items() if isinstance(v, (int, float, str, bytes, list, tuple))}
    proto = onnx.helper.make_node(node.op, [t.name for t in node.inputs], [t.name for t in node.outputs],
                                  domain=domain, **attrs)
    try:
        inferred = onnx.shape_inference.infer_node_outputs(
            schema, proto, types, data, opset_imports=[onnx.helper.make_opsetid(domain, version)])
    except Exception:  # noqa: BLE001 - onnx refuses what it cannot infer: nothing derived
        return None
    out: list[list | None] = []
    for t in node.outputs:
        tp = inferred.get(t.name)
        if tp is not None and tp.tensor_type.elem_type and t.dtype is None:
            dtypes[t.name] = onnx.helper.tensor_dtype_to_np_dtype(tp.tensor_type.elem_type)
        if tp is None or not tp.tensor_type.HasField("shape"):
            out.append(None)
            continue
        out.append([d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tp.tensor_type.shape.dim])
    return out


def complete_shapes(ctx: AnalysisContext) -> int:
    """Fill unknown dims of every tensor from its producer; returns how many tensors were completed."""
    completed = 0
    dtypes: dict[str, np.dtype] = {}  # element types of tensors inference left untyped
    for node in ctx.mg.nodes:
        outputs = [t for t in node.outputs if not _known(ctx.mg.shape(t))]
        if not outputs:
            continue
        if node.op not in TYPE_CHANGING_OPS and (node.domain or "") in ("", "ai.onnx"):
            operands = node.inputs[1:] if node.op == "Where" else node.inputs
            typed = [t.dtype if t.dtype is not None else dtypes.get(t.name) for t in operands if t.name]
            known = next((d for d in typed if d is not None), None)
            for t in (node.outputs if node.op == "Split" else node.outputs[:1]):
                if t.dtype is None and known is not None:
                    dtypes[t.name] = known
        try:
            derived = _split_dims(ctx, node) if node.op == "Split" else [derive(ctx, node)]
        except (ValueError, TypeError, IndexError, KeyError, ZeroDivisionError):
            derived = [None]
        if all(d is None for d in derived):
            derived = onnx_node_shapes(ctx, node, dtypes) or derived
        for out, shape in zip(node.outputs, derived):
            inferred = ctx.mg.shape(out)
            merged = _merge(inferred, shape)
            if out in outputs and merged is not None and merged != inferred:
                ctx.shape_overrides[out.name] = merged
                completed += 1
                if inferred is None:
                    _write_back(out, merged, dtypes.get(out.name))
    return completed


def _write_back(tensor: gs.Tensor, shape: list, dtype) -> None:
    """Give a tensor inference left without a rank its completed shape (and type) in the graph itself,
    so passes that read the graph (fold, insert) see the rank too; symbolic dims become ``dim_param`` text."""
    if not isinstance(tensor, gs.Variable) or (tensor.dtype is None and dtype is None):
        return
    tensor.shape = [dims.as_int(d) if dims.as_int(d) is not None else (str(dims.expr(d)) if dims.expr(d) is not None
                                                                       else None) for d in shape]
    if tensor.dtype is None:
        tensor.dtype = dtype
