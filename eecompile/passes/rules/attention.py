"""The opset-23 Attention op: per-head dual Q/K bases, per-head V bases carried to Y.

With grouped-query attention (``q_num_heads = g · kv_num_heads``) query head ``h`` reads
key/value head ``h // g``: its Q basis is the dual of that K basis, its output is in that
V basis. The KV cache (past/present) stays in the K/V bases on the server.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from eecompile.passes import dims
from eecompile.passes.annotations import Annotation, Protected
from eecompile.passes.context import AnalysisContext
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.spaces import Ref


def _head_refs(ctx: AnalysisContext, ann: Annotation, rank: int | None, heads: int | None) -> tuple[Ref, ...] | None:
    """Per-head blocks of a 4-D [B,H,S,D] (headed) or 3-D [B,S,H*D] (flat) annotation."""
    if not isinstance(ann, Protected) or rank is None:
        return None
    if rank == 4 and ann.head_axis == 1 and ann.axis == 3:
        return tuple(ann.refs)
    if rank == 4 and ann.head_axis is None and ann.axis == 3 and heads == 1 and len(ann.refs) == 1:
        return tuple(ann.refs)  # one head: [B,1,S,D] with the feature axis flat (an Unsqueeze of [B,S,D])
    if rank == 3 and ann.head_axis is None and ann.axis == 2 and heads:
        size = ctx.axis_size(ann)
        if size % heads:
            return None
        return ctx.spaces.refine(ann.refs, [size // heads * (k + 1) for k in range(heads)])
    return None


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


class AttentionRule(OpRule):
    """ONNX Attention (opset 23)."""

    op_types = ("Attention",)

    def _heads(self, node: gs.Node, ctx: AnalysisContext, index: int) -> tuple[Ref, ...] | None:
        tensor = node.inputs[index]
        attr = "q_num_heads" if index == 0 else "kv_num_heads"
        heads = node.attrs.get(attr)
        shape = ctx.shape(tensor)
        if heads is None and shape is not None and len(shape) == 4:  # 4-D inputs: the heads are axis 1
            heads = dims.as_int(shape[1])
        return _head_refs(ctx, ctx.get(tensor), ctx.rank(tensor), heads)

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        if index in (4, 5):
            refs = self._heads(node, ctx, index - 3)
            return Protected(3, refs, head_axis=1) if refs else None
        return None

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        q, k, v = (self._heads(node, ctx, i) for i in range(3))
        raw = [ctx.get(node.inputs[i]) for i in range(3)]
        for i, (refs, ann) in enumerate(zip((q, k, v), raw)):
            if ann is not None and refs is None:
                ctx.clear_all(node, "Attention input with an unrecognised head layout")
                return
        mask = _input(node, 3)
        if mask is not None and ctx.get(mask) is not None:
            ctx.clear(ctx.get(mask), node, "attention mask must be clear")
        if (q is None) != (k is None):
            ctx.clear(raw[0], node, "queries and keys must both be protected")
            ctx.clear(raw[1], node, "queries and keys must both be protected")
            q = k = None
        group = len(q) // len(k) if q and k else 1
        if q and k:
            limit = ctx.limit(node, "per-head dual Q/K bases (scores stay clear)")
            for h, ref in enumerate(q):
                ctx.spaces.union(ref, k[h // group].flipped(), limit)
        for index, refs in ((4, k), (5, v)):
            past = _input(node, index)
            if past is not None:
                ann = ctx.get(past)
                if refs and isinstance(ann, Protected):
                    ctx.unify(ann, Protected(3, refs, head_axis=1), node, "cache and new keys/values share a basis")
                elif ann is not None or refs:
                    ctx.clear(ann, node, "cache and new keys/values must both be protected")
        y = node.outputs[0]
        if v:
            heads = len(q) if q else int(node.attrs.get("q_num_heads", len(v)))
            g = max(1, heads // len(v))
            y_refs = tuple(v[h // g] for h in range(heads))
            rank = ctx.rank(y)
            ctx.set(y, Protected(3, y_refs, head_axis=1) if rank == 4 else Protected(2, y_refs))
        else:
            ctx.set(y, None)
        outputs = list(node.outputs) + [None] * 4
        for out, refs in ((outputs[1], k), (outputs[2], v)):
            if out is not None and out.name:
                ctx.set(out, Protected(3, refs, head_axis=1) if refs else None)
        if outputs[3] is not None and outputs[3].name:
            ctx.set(outputs[3], None)


register(AttentionRule())
