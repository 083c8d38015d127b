"""Rotary position embeddings: per head, per frequency pair, a complex scalar basis.

Both the opset-23 ``RotaryEmbedding`` op and the decomposed ``rotate_half`` pattern
(``x·cos + concat(-x2, x1)·sin``) commute with 2×2 scaled rotations on the rotated pairs,
and with nothing larger.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Protected
from eecompile.passes.context import AnalysisContext
from eecompile.passes.rules import register, register_pattern
from eecompile.passes.rules.base import OpRule, Pattern, PatternInstance
from eecompile.passes.spaces import BasisClass


def _restrict_pairs(ctx: AnalysisContext, refs, layout: BasisClass, node: gs.Node) -> None:
    limit = ctx.limit(node, "rotary embedding commutes only with a complex scalar per frequency pair")
    for ref in refs:
        ctx.spaces.restrict(ref, layout, limit)


class RotaryEmbeddingRule(OpRule):
    """ONNX RotaryEmbedding (opset 23), full rotary dimension: ``(X, cos_cache, sin_cache[, position_ids])``."""

    op_types = ("RotaryEmbedding",)

    def heads(self, node: gs.Node, ctx: AnalysisContext, hidden: int) -> int | None:
        """Number of heads of a 3-D ``[B, S, H·D]`` input (the ``num_heads`` attribute)."""
        return int(node.attrs["num_heads"]) if node.attrs.get("num_heads") else None

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        y = node.outputs[0]
        if x is None:
            ctx.set(y, None)
            return
        rank = ctx.rank(node.inputs[0])
        layout = BasisClass.COMPLEX_INTERLEAVED if node.attrs.get("interleaved", 0) else BasisClass.COMPLEX_HALF
        rot_dim = int(node.attrs.get("rotary_embedding_dim", 0))
        if not isinstance(x, Protected):
            ctx.clear_all(node, "rotary embedding of a non-feature tensor", node.inputs[:1])
            return
        heads = self.heads(node, ctx, ctx.axis_size(x)) if rank == 3 and x.head_axis is None else None
        if rank == 4 and x.head_axis == 1 and x.axis == 3:
            refs = x.refs
            out = x
        elif rank == 3 and x.head_axis is None and x.axis == 2 and heads and ctx.axis_size(x) % heads == 0:
            size = ctx.axis_size(x)
            refs = ctx.spaces.refine(x.refs, [size // heads * (k + 1) for k in range(heads)])
            out = Protected(2, refs)
        else:
            ctx.clear_all(node, "rotary embedding with an unrecognised head layout", node.inputs[:1])
            return
        head_dim = ctx.spaces.size(refs[0])
        if rot_dim not in (0, head_dim):
            ctx.clear_all(node, "partial rotary embedding", node.inputs[:1])
            return
        _restrict_pairs(ctx, refs, layout, node)
        ctx.set(y, out)


class ContribRotaryEmbeddingRule(RotaryEmbeddingRule):
    """ONNX Runtime's com.microsoft RotaryEmbedding: ``(input, position_ids, cos_cache, sin_cache)``.

    ``input`` is ``[B, S, H·D]`` (heads from ``num_heads``, else ``hidden / (2·cos_cache.shape[1])``) or
    ``[B, H, S, D]``; the rotation is the same as the ONNX op's, so the same complex scalar per head and
    frequency pair commutes with it. Packed (ragged) batching and a custom ``scale`` are not followed.
    """

    domain = "com.microsoft"

    def heads(self, node: gs.Node, ctx: AnalysisContext, hidden: int) -> int | None:
        if node.attrs.get("num_heads"):
            return int(node.attrs["num_heads"])
        cos = ctx.shape(node.inputs[2]) if len(node.inputs) > 2 else None
        if not cos or len(cos) != 2 or not isinstance(cos[1], int) or not cos[1] or hidden % (2 * cos[1]):
            return None
        return hidden // (2 * cos[1])

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        if node.attrs.get("is_packed_batching", 0) or float(node.attrs.get("scale", 1.0)) != 1.0:
            ctx.clear_all(node, "rotary embedding with packed batching or a custom scale", node.inputs[:1])
            return
        super().analyze(node, ctx)


def _producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def _value_source(tensor: gs.Tensor) -> gs.Tensor:
    """The tensor ``tensor`` copies: followed back through Identity and Casts to the type it already has."""
    while tensor.inputs:
        node = tensor.inputs[0]
        source = node.inputs[0] if node.inputs else None
        if source is None or not (node.op == "Identity" or (
                node.op == "Cast" and source.dtype is not None and tensor.dtype is not None
                and np.dtype(source.dtype) == np.dtype(tensor.dtype))):
            break
        tensor = source
    return tensor


def same_value(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values: one tensor, or copies of one (legacy exports cast
    ``x.float()`` of a float tensor, once per use)."""
    return a is b or _value_source(a) is _value_source(b)


def _only_consumer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 and tensor not in () else None


class _RotateHalfInstance(PatternInstance):
    def __init__(self, nodes: list[gs.Node], anchor: gs.Node, x: gs.Tensor, trig: list[gs.Tensor],
                 inner: list[gs.Tensor]) -> None:
        super().__init__(nodes, anchor)
        self.x, self.trig, self.inner = x, trig, inner

    def analyze(self, ctx: AnalysisContext) -> None:
        x = ctx.get(self.x)
        out = self.anchor.outputs[0]
        if x is None:
            ctx.set(out, None)
            return
        rank = ctx.rank(self.x)
        ok = isinstance(x, Protected) and x.axis == rank - 1
        if ok and x.head_axis is None and len(ctx.blocks(x)) != 1:
            ok = False
        for t in self.trig:  # cos/sin must be clear; clearing them is always allowed
            ctx.clear(ctx.get(t), self.anchor, "rotary cos/sin tables must be clear")
        if not ok:
            ctx.clear(x, self.anchor, "rotate_half over an unrecognised layout")
            ctx.set(out, None)
            return
        refs = x.refs if x.head_axis is not None else ctx.blocks(x)
        _restrict_pairs(ctx, refs, BasisClass.COMPLEX_HALF, self.anchor)
        for t in self.inner:
            ctx.set(t, x)
        ctx.set(out, x)


class RotateHalfPattern(Pattern):
    """``x * cos + concat(-x[..., D/2:], x[..., :D/2]) * sin`` (the Llama/NeoX convention)."""

    name = "rotate_half"

    def match(self, nodes: list[gs.Node], ctx: AnalysisContext) -> list[PatternInstance]:
        found = []
        for concat in nodes:
            if concat.op != "Concat" or len(concat.inputs) != 2:
                continue
            inst = self._match_at(concat, ctx)
            if inst is not None:
                found.append(inst)
        return found

    def _halves(self, neg_src: gs.Tensor, first: gs.Tensor, ctx: AnalysisContext):
        """The sliced tensor and the slicing nodes when ``first``/``neg_src`` are its two halves."""
        s1, s2 = _producer(first), _producer(neg_src)
        if s1 is None or s2 is None:
            return None
        if s1 is s2 and s1.op == "Split" and len(s1.outputs) == 2 and s1.outputs[0] is first:
            return s1.inputs[0], [s1]
        if s1.op != "Slice" or s2.op != "Slice" or s1.inputs[0] is not s2.inputs[0]:
            return None
        x = s1.inputs[0]
        shape = ctx.shape(x)
        if not shape or not isinstance(shape[-1], int):
            return None
        d = shape[-1]
        rank = len(shape)
        params = []
        for s in (s1, s2):  # bounds may be run-time shape arithmetic (x.shape[-1] // 2): read as dim values
            starts, ends, axes, steps = (ctx.partial_values(s.inputs[i]) if len(s.inputs) > i and s.inputs[i].name
                                         else None for i in range(1, 5))
            if starts is None or ends is None or len(starts) != 1 or len(ends) != 1 or None in starts + ends:
                return None
            axis = axes[0] % rank if axes is not None and len(axes) == 1 and axes[0] is not None else 0
            if axis != rank - 1 or (steps is not None and steps != [1]):
                return None
            params.append((starts[0], min(ends[0], d)))
        if params[0] != (0, d // 2) or params[1] != (d // 2, d):
            return None
        return x, [s1, s2]

    def _match_at(self, concat: gs.Node, ctx: AnalysisContext) -> PatternInstance | None:
        neg = _producer(concat.inputs[0])
        if neg is None or neg.op != "Neg":
            return None
        halves = self._halves(neg.inputs[0], concat.inputs[1], ctx)
        if halves is None:
            return None
        x, slicers = halves
        rank = ctx.rank(x)
        if rank is None or int(concat.attrs.get("axis", 0)) % rank != rank - 1:
            return None
        rot = concat.outputs[0]
        m2 = _only_consumer(rot)
        if m2 is None or m2.op != "Mul":
            return None
        sin = m2.inputs[1] if m2.inputs[0] is rot else m2.inputs[0]
        add = _only_consumer(m2.outputs[0])
        if add is None or add.op != "Add":
            return None
        other = add.inputs[1] if add.inputs[0] is m2.outputs[0] else add.inputs[0]
        m1 = _producer(other)
        if m1 is None or m1.op != "Mul" or len(m1.inputs) != 2 or len(other.outputs) != 1:
            return None
        same = [same_value(t, x) for t in m1.inputs]
        if not any(same):
            return None
        cos = m1.inputs[1] if same[0] else m1.inputs[0]
        inner_ok = all(len(t.outputs) == 1 for s in slicers for t in s.outputs) and len(neg.outputs[0].outputs) == 1
        if not inner_ok:
            return None
        nodes = [*slicers, neg, concat, m2, m1, add]
        return _RotateHalfInstance(nodes, add, x, [cos, sin], [rot, m1.outputs[0], m2.outputs[0]])


register(RotaryEmbeddingRule())
register(ContribRotaryEmbeddingRule())
register_pattern(RotateHalfPattern())
