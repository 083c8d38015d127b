"""Gather: embedding lookups from constant tables, and gathers along activation axes.

A table lookup ``E[ids]`` is ``one_hot(ids) · E``: the ids are permuted vocabulary
indices, the table becomes ``E' = P⁻¹ · E · T`` (rows permuted, columns in the output space).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Annotation, IndexValues, Protected
from eecompile.passes.context import AnalysisContext, FoldContext
from eecompile.passes.weight_fold import fold_matrix
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.spaces import BasisClass


class GatherRule(OpRule):
    """Gather from a constant 2-D table along axis 0, or along a clear axis of an activation."""

    op_types = ("Gather",)
    accepts_index = True

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        table = ctx.const_shape(node.inputs[0])
        if index == 1 and table is not None and len(table) == 2 and int(node.attrs.get("axis", 0)) == 0:
            ref = ctx.spaces.new(f"input:{node.inputs[1].name}", int(table[0]), node.name)
            ctx.spaces.restrict(ref, BasisClass.PERMUTATION,
                                ctx.limit(node, "token ids can only be permuted (a substitution cipher)"))
            return IndexValues(ref)
        return None

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        data, indices = node.inputs[:2]
        y = node.outputs[0]
        table = ctx.const_shape(data)
        idx = ctx.get(indices)
        axis = int(node.attrs.get("axis", 0))
        if table is not None:
            if len(table) != 2 or axis != 0 or (idx is not None and not isinstance(idx, IndexValues)):
                ctx.clear_all(node, "gather from a table that is not a 2-D embedding", [indices])
                return
            if isinstance(idx, IndexValues) and ctx.spaces.size(idx.ref) != table[0]:
                ctx.clear_all(node, "index space size differs from the table", [indices])
                return
            rank = ctx.rank(y)
            ctx.set(y, ctx.fresh(node, y, rank - 1, int(table[1])) if rank else None)
            return
        x = ctx.get(data)
        if idx is not None:
            ctx.clear(idx, node, "index values used to gather from an activation")
        if x is None:
            ctx.set(y, None)
            return
        rank = ctx.rank(data)
        irank = ctx.rank(indices)
        if not isinstance(x, Protected) or rank is None or irank is None:
            ctx.clear_all(node, "gather from a non-feature tensor", [data])
            return
        axis %= rank
        if axis in (x.axis, x.head_axis):
            ctx.clear_all(node, "gather along the protected axis", [data])
            return

        def move(a: int) -> int:
            return a if a < axis else a + irank - 1
        ctx.set(y, x.moved(move(x.axis), None if x.head_axis is None else move(x.head_axis)))

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        y = ctx.get(node.outputs[0])
        if ctx.const_shape(node.inputs[0]) is None or not isinstance(y, Protected):
            return
        idx = ctx.get(node.inputs[1])
        rows = ctx.basis(idx.ref).dual() if isinstance(idx, IndexValues) else None
        ctx.set_const(node, 0, fold_matrix(ctx.const(node.inputs[0]), rows, ctx.axis_basis(y)))


register(GatherRule())
