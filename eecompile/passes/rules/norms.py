"""Normalisations over the protected axis, and BatchNorm over channels.

LayerNormalization preserves ones-orthogonal bases (and RMS norms any orthogonal basis)
when its gain is all ones — the normalize pass folds gains into the following linear
layers when every direct consumer is one; otherwise the gain must be permuted, which
allows only permutations.

A gain normalize could not fold is *deferred*: the rule restricts the space as if the gain
were ones, and :func:`settle_gains` (run when the analysis has annotated every tensor)
follows the normalised tensor through the ops that only move its feature axis — as the
annotations say: each output carries the same blocks, flat — into every linear consumer
(the gain scales its weight rows) and every graph output (the client multiplies it in after
decrypting). If the gain reaches anything else (an Add into the residual stream, a
nonlinearity), that op binds it: the gain stays in the graph, permuted, and the space is
restricted to permutations with a limit naming the norm and the op that bound it.

BatchNormalization is a per-channel affine map: input and output share a permutation
and keep independent scales.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Protected
from eecompile.passes.context import AnalysisContext, FoldContext, apply_on_axis
from eecompile.passes.rules import SHAPE_ONLY_OPS, register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.spaces import BasisClass, meet

FEATURE_NORM_OPS = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")
FEATURE_MOVES = frozenset({"Gather", "Slice", "Squeeze", "Unsqueeze", "Reshape", "Flatten", "Transpose", "Split",
                           "Expand", "Identity", "Dropout"})
"""Ops that move or copy values without mixing the feature axis: a per-coordinate gain commutes with them
whenever the analysis gives their output the same flat blocks as their input."""


def restrict_for_norm(ctx: AnalysisContext, node: gs.Node, x: Protected, scale: np.ndarray | None,
                      bias: np.ndarray | None, rms: bool) -> None:
    """The bases a norm over ``x``'s protected (last) axis allows, given its gain and bias constants.

    With an all-ones gain (or one normalize folded away) an RMS norm keeps any orthogonal basis and a
    layer norm the orthogonal bases that map ones to ones; a gain left in the graph must be permuted.
    """
    ones = scale is None or bool(np.all(scale == 1)) or deferrable(ctx, node, x, scale, bias)
    if ones:
        cls = BasisClass.ORTHOGONAL if rms else BasisClass.ONES_ORTHOGONAL
        reason = ("RMS normalisation preserves only orthogonal bases" if rms else
                  "layer normalisation preserves only orthogonal bases that map ones to ones")
    elif x.head_axis is not None:
        # One gain vector serves every head: the heads may differ only by a sign per
        # coordinate pair (no permutation), which also commutes with a RoPE that follows.
        cls = BasisClass.PAIR_SIGNS_HALF if rms else BasisClass.CLEAR
        reason = ("a per-head norm's gain is shared by all heads and cannot be folded: a sign per "
                  "coordinate pair is the strongest basis that commutes with norm, gain and RoPE")
    else:
        cls = BasisClass.SIGNED_PERMUTATION if rms else BasisClass.PERMUTATION
        reason = "its gain cannot be folded into every consumer, so it must be permuted"
    if x.head_axis is not None and bias is not None and np.any(bias != 0):
        cls, reason = BasisClass.CLEAR, "a per-head norm's bias is shared by all heads"
    ctx.restrict(x, cls, node, reason)


def fold_norm_constants(ctx: FoldContext, node: gs.Node, x: Protected, rank: int, scale_index: int,
                        bias_index: int | None) -> None:
    """Express a norm's gain (permuted) and bias (in the basis) for the planned basis of ``x``."""
    scale = ctx.const(node.inputs[scale_index]) if len(node.inputs) > scale_index else None
    if scale is not None and not np.all(scale == 1) and x.head_axis is None:
        ctx.set_const(node, scale_index, apply_on_axis(ctx, scale, x, rank, "perm").reshape(scale.shape))
    bias = ctx.const(node.inputs[bias_index]) if bias_index is not None and len(node.inputs) > bias_index else None
    if bias is not None:
        ctx.set_const(node, bias_index, apply_on_axis(ctx, bias, x, rank, "right").reshape(bias.shape))


class FeatureNormRule(OpRule):
    """LayerNormalization, RMSNormalization, SimplifiedLayerNormalization over the last axis."""

    op_types = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        for extra in node.outputs[1:]:
            ctx.set(extra, None)
        if x is None:
            ctx.set(node.outputs[0], None)
            return
        rank = ctx.rank(node.inputs[0])
        axis = int(node.attrs.get("axis", -1)) % rank if rank else None
        if not isinstance(x, Protected) or axis != x.axis or axis != rank - 1:
            ctx.clear(x, node, "normalisation over an axis other than the protected one")
            ctx.set(node.outputs[0], None)
            return
        scale = ctx.const(node.inputs[1]) if len(node.inputs) > 1 else None
        bias = _bias(ctx, node)
        restrict_for_norm(ctx, node, x, scale, bias, rms=node.op != "LayerNormalization")
        ctx.set(node.outputs[0], x)

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        x = ctx.get(node.inputs[0])
        if not isinstance(x, Protected):
            return
        fold_norm_constants(ctx, node, x, ctx.mg.rank(node.inputs[0]), 1, 2)


def _bias(ctx: AnalysisContext, node: gs.Node) -> np.ndarray | None:
    return ctx.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None


def deferrable(ctx: AnalysisContext, node: gs.Node, x: Protected, scale: np.ndarray | None,
               bias: np.ndarray | None) -> bool:
    """Whether a feature norm's gain is left for :func:`settle_gains` to fold or bind.

    A constant 1-D gain without zeros over a flat protected last axis (zeros would divide the bias), a
    constant bias or none, on one of :data:`FEATURE_NORM_OPS`.
    """
    if node.op not in FEATURE_NORM_OPS or scale is None or x.head_axis is not None or x.head_tiled:
        return False
    rank = ctx.rank(node.inputs[0])
    if rank is None or x.axis != rank - 1 or int(node.attrs.get("axis", -1)) % rank != rank - 1:
        return False
    if scale.ndim != 1 or scale.size != ctx.axis_size(x) or scale.size < 2:
        return False
    if not np.all(np.isfinite(scale)) or np.any(scale == 0) or np.all(scale == 1):
        return False
    has_bias = len(node.inputs) > 2 and node.inputs[2].name
    return not has_bias or (bias is not None and bias.size == scale.size and bool(np.all(np.isfinite(bias))))


@dataclass
class GainTrace:
    """Where a normalised tensor's values go: linear layers, graph outputs, or an op that binds the gain."""

    linear: list[gs.Node] = field(default_factory=list)
    outputs: list[tuple[str, int]] = field(default_factory=list)
    blocker: gs.Node | None = None
    why: str = ""


@dataclass
class GainFolds:
    """What :func:`settle_gains` decided, for insert (client gains), the report and the rebase policy.

    ``output_gains`` maps a graph output to ``(axis, gain)``: the client multiplies the plaintext by
    ``gain`` along ``axis`` after decrypting. ``binding`` lists ``(norm node, blocking node, op, why)``
    for the gains that stay in the graph and bind their space to a permutation.
    """

    folded: list[str] = field(default_factory=list)
    output_gains: dict[str, tuple[int, np.ndarray]] = field(default_factory=dict)
    binding: list[tuple[str, str, str, str]] = field(default_factory=list)


def _flat_roots(ctx: AnalysisContext, ann) -> tuple | None:
    if not isinstance(ann, Protected) or ann.head_axis is not None or ann.head_tiled:
        return None
    return tuple(ctx.spaces.find(r) for r in ctx.blocks(ann))


def _linear_use(ctx: AnalysisContext, node: gs.Node, tensor: gs.Tensor, ann: Protected) -> bool:
    """Whether ``node`` contracts ``tensor``'s protected last axis with a constant 2-D weight's rows."""
    rank = ctx.rank(tensor)
    if rank is None or ann.axis != rank - 1 or node.inputs[0] is not tensor or tensor in node.inputs[1:]:
        return False
    weight = ctx.const_shape(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or len(weight) != 2:
        return False
    if node.op == "MatMul":
        return True
    return node.op == "Gemm" and not node.attrs.get("transA", 0) and rank == 2


def trace_gain(ctx: AnalysisContext, start: gs.Tensor, outputs: set[str]) -> GainTrace:
    """Follow ``start`` through feature-preserving ops (by the annotations) to where its gain could go."""
    trace = GainTrace()
    roots = _flat_roots(ctx, ctx.get(start))
    stack, seen = [start], set()
    while stack:
        tensor = stack.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        ann = ctx.get(tensor)
        if tensor.name in outputs:
            trace.outputs.append((tensor.name, ann.axis))
        for consumer in tensor.outputs:
            if consumer.op in SHAPE_ONLY_OPS:
                continue
            if _linear_use(ctx, consumer, tensor, ann):
                trace.linear.append(consumer)
                continue
            moved = [o for o in consumer.outputs if o.name]
            if (consumer.op in FEATURE_MOVES and consumer.inputs[0] is tensor and tensor not in consumer.inputs[1:]
                    and moved and all(_flat_roots(ctx, ctx.get(o)) == roots for o in moved)):
                stack.extend(moved)
                continue
            trace.blocker = consumer
            trace.why = ("moves or mixes the normalised feature axis" if consumer.op in FEATURE_MOVES else
                         "is neither a linear layer nor an op that only moves the feature axis")
            return trace
    return trace


def settle_gains(ctx: AnalysisContext, graph_outputs: list[gs.Tensor], nodes: list[gs.Node]) -> GainFolds:
    """Fold or bind every deferred norm gain (see the module docstring); returns what was decided.

    A gain that reaches only linear layers, feature-preserving ops and graph outputs is folded when that
    lets its space keep a stronger class than the permuted gain would allow: the weights' rows are scaled,
    the bias divided by the gain, the gain set to ones, and graph outputs get a client-side gain.
    Otherwise the gain stays and the space is restricted as :func:`restrict_for_norm` would have.
    """
    result = GainFolds()
    outputs = {t.name for t in graph_outputs}
    pending = []
    for node in nodes:
        if node.op not in FEATURE_NORM_OPS:
            continue
        x = ctx.get(node.inputs[0])
        scale = ctx.const(node.inputs[1]) if len(node.inputs) > 1 else None
        if not isinstance(x, Protected) or ctx.get(node.outputs[0]) is None:
            continue
        if not deferrable(ctx, node, x, scale, _bias(ctx, node)):
            continue
        forced = BasisClass.PERMUTATION if node.op == "LayerNormalization" else BasisClass.SIGNED_PERMUTATION
        pending.append((node, x, scale, forced, trace_gain(ctx, node.outputs[0], outputs)))
    for node, x, _, forced, trace in pending:
        if trace.blocker is not None:
            ctx.restrict(x, forced, node, f"its gain cannot be folded: {trace.blocker.op} '{trace.blocker.name}' "
                                          f"{trace.why}, so the gain stays and must be permuted")
            result.binding.append((node.name, trace.blocker.name, trace.blocker.op, trace.why))
    for node, x, scale, forced, trace in pending:
        if trace.blocker is not None:
            continue
        classes = [ctx.spaces.cls(b) for b in ctx.blocks(x)]
        if all(meet(c, forced) == c for c in classes):  # folding would gain nothing: keep the graph as it is
            ctx.restrict(x, forced, node, "its gain is kept (the space is permuted anyway), so it must be permuted")
            continue
        _fold_gain(ctx, node, scale, trace, result)
    return result


def _fold_gain(ctx: AnalysisContext, node: gs.Node, scale: np.ndarray, trace: GainTrace, result: GainFolds) -> None:
    """Move a norm's gain into its linear consumers' weight rows and the client's decrypt."""
    gain = scale.astype(np.float64).reshape(-1)
    mg = ctx.mg
    for consumer in trace.linear:
        weight = consumer.inputs[1]
        values = ctx.const(weight)
        trans = consumer.op == "Gemm" and consumer.attrs.get("transB", 0)
        scaled = values.astype(np.float64) * (gain[None, :] if trans else gain[:, None])
        mg.set_values(weight, scaled.astype(values.dtype))
    bias = _bias(ctx, node)
    if bias is not None:
        mg.set_values(node.inputs[2], (bias.astype(np.float64).reshape(-1) / gain).reshape(bias.shape).astype(bias.dtype))
    node.inputs[1] = gs.Constant(f"{node.inputs[1].name}_ones", np.ones_like(scale))
    for name, axis in trace.outputs:
        result.output_gains[name] = (axis, gain)
    result.folded.append(node.name)


class BatchNormRule(OpRule):
    """BatchNormalization (inference): per-channel affine; shared permutation, own scales."""

    op_types = ("BatchNormalization",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        for extra in node.outputs[1:]:
            ctx.set(extra, None)
        if x is None:
            ctx.set(node.outputs[0], None)
            return
        params = [ctx.const(t) for t in node.inputs[1:5]]
        if (not isinstance(x, Protected) or x.axis != 1 or x.head_axis is not None
                or any(p is None for p in params) or node.attrs.get("training_mode", 0)):
            ctx.clear(x, node, "BatchNormalization with non-constant statistics or an unprotected channel axis")
            ctx.set(node.outputs[0], None)
            return
        out = ctx.fresh(node, node.outputs[0], 1, ctx.axis_size(x))
        ctx.spaces.link_permutation(ctx.blocks(x)[0] if len(ctx.blocks(x)) == 1 else x.refs[0], out.refs[0],
                                    ctx.limit(node, "per-channel affine map: input and output share a permutation"))
        if len(ctx.blocks(x)) != 1:
            ctx.clear(x, node, "BatchNormalization over a block-structured axis")
            ctx.clear(out, node, "BatchNormalization over a block-structured axis")
        ctx.set(node.outputs[0], out)

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        x, y = ctx.get(node.inputs[0]), ctx.get(node.outputs[0])
        if not isinstance(x, Protected) or not isinstance(y, Protected):
            return
        perm_in, d_in = _monomial(ctx.axis_basis(x).blocks[0])
        perm_out, d_out = _monomial(ctx.axis_basis(y).blocks[0])
        if not np.array_equal(perm_in, perm_out):
            raise AssertionError("BatchNormalization spaces do not share their permutation")
        scale, bias, mean, var = (ctx.const(t).astype(np.float64) for t in node.inputs[1:5])
        ctx.set_const(node, 1, scale[perm_in] * d_out / d_in)
        ctx.set_const(node, 2, bias[perm_in] * d_out)
        ctx.set_const(node, 3, mean[perm_in] * d_in)
        ctx.set_const(node, 4, var[perm_in])


def _monomial(basis) -> tuple[np.ndarray, np.ndarray]:
    """(perm, scale) of a monomial or identity basis."""
    perm = basis.perm if basis.perm is not None else np.arange(basis.size)
    scale = basis.scale if basis.scale is not None else np.ones(basis.size)
    return perm, scale


for _rule in (FeatureNormRule(), BatchNormRule()):
    register(_rule)
