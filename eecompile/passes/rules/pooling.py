"""Spatial pooling over NCHW tensors with the channel axis protected."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Protected
from eecompile.passes.context import AnalysisContext
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.spaces import BasisClass

_CLASSES = {
    "AveragePool": BasisClass.INVERTIBLE,
    "GlobalAveragePool": BasisClass.INVERTIBLE,
    "MaxPool": BasisClass.POSITIVE_MONOMIAL,
    "GlobalMaxPool": BasisClass.POSITIVE_MONOMIAL,
}


class PoolRule(OpRule):
    """Average pooling is linear per channel (any basis); max pooling allows positive scales."""

    op_types = tuple(_CLASSES)

    def keeps_block_order(self, node: gs.Node, ctx: AnalysisContext) -> bool:
        """Nothing to fold."""
        return True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        for extra in node.outputs[1:]:
            ctx.set(extra, None)
        if x is None:
            ctx.set(node.outputs[0], None)
            return
        if not isinstance(x, Protected) or x.axis != 1 or x.head_axis is not None:
            ctx.clear(x, node, "pooling with a protected spatial axis")
            ctx.set(node.outputs[0], None)
            return
        cls = _CLASSES[node.op]
        if cls != BasisClass.INVERTIBLE:
            ctx.restrict(x, cls, node, f"{node.op} commutes only with positive monomial bases")
        ctx.set(node.outputs[0], x)


register(PoolRule())
