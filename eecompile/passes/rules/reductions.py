"""Reductions, Softmax, ArgMax and TopK over (or beside) the protected axis."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from eecompile.passes.annotations import IndexValues, Protected, Squares
from eecompile.passes.context import AnalysisContext
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.rules.elementwise import reduce_axes
from eecompile.passes.spaces import BasisClass


def _renumber(p: Protected, removed: list[int]) -> Protected:
    """Axes of ``p`` after the axes ``removed`` disappear."""
    def shift(axis: int) -> int:
        return axis - sum(1 for r in removed if r < axis)
    return Protected(shift(p.axis), p.refs, None if p.head_axis is None else shift(p.head_axis), p.head_tiled)


class ReduceRule(OpRule):
    """ReduceMean/Sum/Max/Min: a sum over the axis is invariant under ones-preserving bases."""

    op_types = ("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        rank = ctx.rank(node.inputs[0])
        y = node.outputs[0]
        if x is None:
            ctx.set(y, None)
            return
        axes = reduce_axes(node, ctx.const, rank) if rank else None
        axes = list(range(rank)) if axes is None and rank else axes
        if isinstance(x, Squares):
            if axes == [x.source.axis] and node.op in ("ReduceMean", "ReduceSum"):
                ctx.set(y, None)
                return
            ctx.restrict(x, BasisClass.PERMUTATION, node, "squares used other than summed")
            x = x.source
        if not isinstance(x, Protected) or axes is None:
            ctx.clear(x, node, "reduction of a non-feature tensor")
            ctx.set(y, None)
            return
        if x.axis in axes:
            cls = BasisClass.ONES_ORTHOGONAL if node.op in ("ReduceMean", "ReduceSum") else BasisClass.PERMUTATION
            ctx.restrict(x, cls, node, f"{node.op} over the protected axis")
            ctx.set(y, None)
            return
        if x.head_axis is not None and x.head_axis in axes:
            ctx.clear(x, node, "reduction over attention heads")
            ctx.set(y, None)
            return
        if node.op in ("ReduceMax", "ReduceMin"):
            ctx.restrict(x, BasisClass.POSITIVE_MONOMIAL, node,
                         f"{node.op} beside the protected axis commutes only with positive monomial bases")
        keep = node.attrs.get("keepdims", 1)
        ctx.set(y, x if keep else _renumber(x, axes))


class SoftmaxRule(OpRule):
    """Softmax/LogSoftmax: permutation only; the output stays in the input's space."""

    op_types = ("Softmax", "LogSoftmax")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        if x is not None:
            ctx.restrict(x, BasisClass.PERMUTATION, node, f"{node.op} commutes only with permutations")
        ctx.set(node.outputs[0], x if isinstance(x, Protected) else None)


class ArgRule(OpRule):
    """ArgMax/ArgMin over the protected axis give permuted index values."""

    op_types = ("ArgMax", "ArgMin")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        y = node.outputs[0]
        rank = ctx.rank(node.inputs[0])
        if not isinstance(x, Protected) or rank is None:
            ctx.clear(x, node, f"{node.op} of a non-feature tensor")
            ctx.set(y, None)
            return
        axis = int(node.attrs.get("axis", 0)) % rank
        ctx.restrict(x, BasisClass.PERMUTATION, node, f"{node.op} commutes only with permutations")
        if axis == x.axis and x.head_axis is None and len(ctx.blocks(x)) == 1:
            ctx.set(y, IndexValues(ctx.blocks(x)[0]))
        elif axis == x.axis:
            ctx.clear(x, node, f"{node.op} over a block-structured axis")
            ctx.set(y, None)
        elif x.head_axis == axis:
            ctx.clear(x, node, f"{node.op} over attention heads")
            ctx.set(y, None)
        else:
            ctx.set(y, x if node.attrs.get("keepdims", 1) else _renumber(x, [axis]))


class TopKRule(OpRule):
    """TopK over the protected axis: values are clear, indices are permuted index values."""

    op_types = ("TopK",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        rank = ctx.rank(node.inputs[0])
        values, indices = node.outputs[0], node.outputs[1]
        if not isinstance(x, Protected) or rank is None:
            ctx.clear(x, node, "TopK of a non-feature tensor")
            ctx.set(values, None)
            ctx.set(indices, None)
            return
        axis = int(node.attrs.get("axis", -1)) % rank
        ctx.restrict(x, BasisClass.PERMUTATION, node, "TopK commutes only with permutations")
        if axis == x.axis and x.head_axis is None and len(ctx.blocks(x)) == 1:
            ctx.set(values, None)
            ctx.set(indices, IndexValues(ctx.blocks(x)[0]))
        elif axis in (x.axis, x.head_axis):
            ctx.clear(x, node, "TopK over a block-structured axis")
            ctx.set(values, None)
            ctx.set(indices, None)
        else:
            ctx.set(values, x)
            ctx.set(indices, x)


for _rule in (ReduceRule(), SoftmaxRule(), ArgRule(), TopKRule()):
    register(_rule)
