"""GatherND and GatherElements: run-time indices that pick positions, not features.

* ``GatherND(data, indices, batch_dims=b)`` indexes the leading ``b + k`` axes of ``data``
  (``k = indices.shape[-1]``) and copies the trailing axes whole: a protected axis among those
  trailing axes keeps its basis (CLIP-text pooling ``h[arange(B), eos_position]`` keeps the
  feature basis of the residual stream). Indexing the protected axis clears it.
* ``GatherElements(data, indices, axis)`` picks ``data[..., indices[i], ...]`` element by
  element: the protected axis keeps its basis when it is not the gathered axis, the indices
  span it whole and provably do not vary along it (an ``Expand`` or ``Unsqueeze`` of indices
  without that axis, or a constant that is flat along it). DeBERTa's relative-position gathers
  read attention scores, which are clear anyway.

The indices themselves are clear (run-time positions); nothing is folded.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from eecompile.passes import dims
from eecompile.passes.annotations import Protected
from eecompile.passes.context import AnalysisContext
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.rules.elementwise import constant_along


class GatherNDRule(OpRule):
    """GatherND: the trailing (copied) axes keep their protection."""

    op_types = ("GatherND",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        data, indices = node.inputs[:2]
        y = node.outputs[0]
        x = ctx.get(data)
        if ctx.get(indices) is not None:
            ctx.clear(ctx.get(indices), node, "GatherND reads its indices as positions")
        if x is None:
            ctx.set(y, None)
            return
        rank, ishape = ctx.rank(data), ctx.shape(indices)
        k = dims.as_int(ishape[-1]) if ishape else None
        batch = int(node.attrs.get("batch_dims", 0))
        if not isinstance(x, Protected) or rank is None or k is None:
            ctx.clear_all(node, "GatherND with unknown index depth", [data])
            return
        lead = batch + k
        axes = [a for a in (x.axis, x.head_axis) if a is not None]
        if any(a < lead for a in axes):
            ctx.clear_all(node, "GatherND indexes the protected axis", [data])
            return
        offset = len(ishape) - 1 - lead
        if ctx.rank(y) != rank + offset:  # ONNX Runtime's symbolic inference ignores batch_dims
            ctx.clear_all(node, f"GatherND output rank {ctx.rank(y)} disagrees with its inputs' "
                                f"({rank + offset}); shape inference got batch_dims wrong", [data])
            return
        ctx.set(y, x.moved(x.axis + offset, None if x.head_axis is None else x.head_axis + offset))


class GatherElementsRule(OpRule):
    """GatherElements along an axis other than the protected one, with indices flat along it."""

    op_types = ("GatherElements",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        data, indices = node.inputs[:2]
        y = node.outputs[0]
        x = ctx.get(data)
        if ctx.get(indices) is not None:
            ctx.clear(ctx.get(indices), node, "GatherElements reads its indices as positions")
        if x is None:
            ctx.set(y, None)
            return
        rank = ctx.rank(data)
        if not isinstance(x, Protected) or rank is None:
            ctx.clear_all(node, "GatherElements of a non-feature tensor", [data])
            return
        axis = int(node.attrs.get("axis", 0)) % rank
        dshape, ishape = ctx.shape(data), ctx.shape(indices)
        for a in (x.axis, x.head_axis):
            if a is None:
                continue
            whole = dshape is not None and ishape is not None and dims.equal(dshape[a], ishape[a])
            if a == axis or not whole or not flat_along(ctx, indices, a, rank):
                ctx.clear_all(node, "GatherElements picks different positions along the protected axis", [data])
                return
        ctx.set(y, x)


def flat_along(ctx: AnalysisContext, tensor: gs.Tensor, axis: int, rank: int, depth: int = 0) -> bool:
    """Whether ``tensor`` (of rank ``rank``) provably holds the same values at every index of ``axis``."""
    value = ctx.const(tensor)
    if value is not None:
        return value.ndim <= rank and constant_along(value, axis, rank)
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or depth > 16:
        return False
    source = producer.inputs[0] if producer.inputs else None
    if producer.op in ("Cast", "Identity", "Neg", "Abs") and source is not None:
        return flat_along(ctx, source, axis, rank, depth + 1)
    if producer.op == "Expand" and source is not None:
        shape = ctx.shape(source)
        if shape is None:
            return False
        inner = axis - (rank - len(shape))
        return inner < 0 or dims.as_int(shape[inner]) == 1 or flat_along(ctx, source, inner, len(shape), depth + 1)
    if producer.op == "Unsqueeze":
        out_rank = ctx.rank(producer.outputs[0])
        inserted = producer.attrs.get("axes")
        if inserted is None and len(producer.inputs) > 1:
            const = ctx.const(producer.inputs[1])
            inserted = None if const is None else const.reshape(-1).tolist()
        return out_rank is not None and inserted is not None and axis in {int(a) % out_rank for a in inserted}
    return False


register(GatherNDRule())
register(GatherElementsRule())
