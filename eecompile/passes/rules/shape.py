"""Layout ops: the protected axis follows Transpose/Unsqueeze/Squeeze/Expand/Reshape; a
Reshape into (heads, head_dim) makes the basis block-diagonal, one block per head; Split,
Slice and Concat along the axis make it a direct sum of the parts' bases."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes import dims
from eecompile.passes.annotations import Annotation, Protected
from eecompile.passes.context import AnalysisContext, FoldContext, apply_on_axis
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.shape_completion import reshape_target

Dims = list[int | str | None]


def _axes_input(node: gs.Node, ctx: AnalysisContext, index: int = 1) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > index and node.inputs[index].name:
        value = ctx.const(node.inputs[index])
        return None if value is None else [int(a) for a in np.atleast_1d(value)]
    return None


class TransposeRule(OpRule):
    """Transpose: the protected and head axes move with the permutation."""

    op_types = ("Transpose",)
    keeps_index_values = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        if not isinstance(x, Protected):
            ctx.clear_all(node, "transpose of a non-feature annotation") if x is not None else ctx.set(node.outputs[0], None)
            return
        rank = ctx.rank(node.inputs[0])
        perm = list(node.attrs.get("perm", range(rank - 1, -1, -1)))
        head = None if x.head_axis is None else perm.index(x.head_axis)
        ctx.set(node.outputs[0], x.moved(perm.index(x.axis), head))


class UnsqueezeRule(OpRule):
    """Unsqueeze: axes shift around the inserted ones."""

    op_types = ("Unsqueeze",)
    keeps_index_values = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        y = node.outputs[0]
        if x is None:
            ctx.set(y, None)
            return
        axes, rank_out = _axes_input(node, ctx), ctx.rank(y)
        if not isinstance(x, Protected) or axes is None or rank_out is None:
            ctx.clear_all(node, "Unsqueeze with unknown axes", node.inputs[:1])
            return
        inserted = sorted(a % rank_out for a in axes)
        kept = [i for i in range(rank_out) if i not in inserted]
        head = None if x.head_axis is None else kept[x.head_axis]
        ctx.set(y, x.moved(kept[x.axis], head))


class SqueezeRule(OpRule):
    """Squeeze: axes shift; squeezing the protected axis itself clears it."""

    op_types = ("Squeeze",)
    keeps_index_values = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        y = node.outputs[0]
        if x is None:
            ctx.set(y, None)
            return
        rank = ctx.rank(node.inputs[0])
        axes = _axes_input(node, ctx)
        shape = ctx.shape(node.inputs[0])
        if axes is None and shape is not None:
            axes = [i for i, d in enumerate(shape) if d == 1]
        if not isinstance(x, Protected) or axes is None or rank is None:
            ctx.clear_all(node, "Squeeze with unknown axes", node.inputs[:1])
            return
        removed = sorted(a % rank for a in axes)
        if x.axis in removed or x.head_axis in removed:
            ctx.clear_all(node, "squeezes the protected axis", node.inputs[:1])
            return
        def shift(a: int) -> int:
            return a - sum(1 for r in removed if r < a)
        ctx.set(y, x.moved(shift(x.axis), None if x.head_axis is None else shift(x.head_axis)))


class ExpandRule(OpRule):
    """Expand/Tile-free broadcast: the protected axis keeps its size and moves with the rank."""

    op_types = ("Expand",)
    keeps_index_values = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        y = node.outputs[0]
        if not isinstance(x, Protected):
            ctx.clear_all(node, "expand of a non-feature annotation", node.inputs[:1]) if x is not None else ctx.set(y, None)
            return
        rank_in, rank_out = ctx.rank(node.inputs[0]), ctx.rank(y)
        if rank_in is None or rank_out is None:
            ctx.clear_all(node, "unknown ranks", node.inputs[:1])
            return
        _refine_expand_shape(node, ctx, rank_out)
        ctx.set(y, x.shifted(rank_out - rank_in))


def _refine_expand_shape(node: gs.Node, ctx: AnalysisContext, rank_out: int) -> None:
    """Expand keeps every non-1 input dim; a 1 becomes the target's (constant) element."""
    din, target = ctx.shape(node.inputs[0]), ctx.partial_values(node.inputs[1])
    inferred = ctx.shape(node.outputs[0]) or [None] * rank_out
    if din is None or target is None or len(target) != rank_out:
        return
    din = [1] * (rank_out - len(din)) + list(din)
    ctx.shape_overrides[node.outputs[0].name] = [
        d if d != 1 else (t if t is not None else o) for d, t, o in zip(din, target, inferred)]


def _aligned(din: Dims, i: int, dout: Dims, j: int) -> bool:
    """Whether the boundary before input axis ``i`` maps to the one before output axis ``j``."""
    return dims.same_elements(din, 0, i, dout, 0, j) or dims.same_elements(din, i, len(din), dout, j, len(dout))


def _maps_to(din: Dims, i: int, dout: Dims, j: int) -> bool:
    """Whether input axis ``i`` survives the reshape as output axis ``j`` (same size, same place)."""
    return dims.equal(din[i], dout[j]) and _aligned(din, i, dout, j) and _aligned(din, i + 1, dout, j + 1)


def reshape_annotation(ctx: AnalysisContext, x: Protected, din: Dims, dout: Dims) -> Annotation | bool:
    """Where ``x`` goes through a reshape ``din -> dout``; False when it cannot be followed.

    Sizes are compared symbolically (:mod:`eecompile.passes.dims`), so ``[batch, seq, 64] ->
    [batch, seq, 4, 16]`` splits heads and ``[batch, 4, seq, 16] -> [4*batch, seq, 16]`` merges
    the batch into the head axis (a *tiled* head axis) whatever batch and seq are.
    """
    a, h = x.axis, x.head_axis
    n = ctx.axis_size(x)
    din = list(din)
    din[a] = n if din[a] is None else din[a]
    for b in range(len(dout)):
        if h is None:
            if dims.equal(dout[b], n) and _aligned(din, a, dout, b) and _aligned(din, a + 1, dout, b + 1):
                return x.moved(b)
            heads, width = (dims.as_int(dout[b]), dims.as_int(dout[b + 1])) if b + 1 < len(dout) else (None, None)
            if (heads is not None and width is not None and heads * width == n and heads > 1
                    and _aligned(din, a, dout, b) and _aligned(din, a + 1, dout, b + 2)):
                blocks = ctx.spaces.refine(x.refs, [width * (k + 1) for k in range(heads)])
                return Protected(b + 1, blocks, head_axis=b)
            width = dims.as_int(dout[b + 1]) if b + 1 < len(dout) else None
            heads = n // width if width and n % width == 0 else 0
            if (heads > 1 and a >= 1 and dims.equal(dout[b], dims.product([din[a - 1], heads]))
                    and _aligned(din, a - 1, dout, b) and _aligned(din, a + 1, dout, b + 2)):
                # [.., S, H·d] -> [.., S·H, d]: split into heads and merge the axis before them in one step
                blocks = ctx.spaces.refine(x.refs, [width * (k + 1) for k in range(heads)])
                return Protected(b + 1, blocks, head_axis=b, head_tiled=True)
        else:
            heads = len(x.refs)
            if (h == a - 1 and not x.head_tiled and dims.equal(din[h], heads) and dims.equal(dout[b], heads * n)
                    and _aligned(din, h, dout, b) and _aligned(din, a + 1, dout, b + 1)):
                return Protected(b, tuple(x.refs))
            if (h == a - 1 and x.head_tiled and b >= 1 and dims.equal(dout[b], heads * n)
                    and dims.equal(din[h], dims.product([dout[b - 1], heads]))
                    and _aligned(din, h, dout, b - 1) and _aligned(din, a + 1, dout, b + 1)):
                return Protected(b, tuple(x.refs))  # [.., S·H, d] -> [.., S, H·d]: untile and merge heads
    if h is None:
        return False
    head_to = feat_to = None
    refs, tiled = tuple(x.refs), x.head_tiled
    heads = len(refs)
    for b in range(len(dout)):
        if _maps_to(din, h, dout, b):
            head_to = b
        elif (not x.head_tiled and h + 1 < len(din) and h + 1 != a and dims.as_int(din[h]) is not None
              and dims.as_int(din[h + 1]) is not None and dims.equal(dout[b], dims.product(din[h:h + 2]))
              and _aligned(din, h, dout, b) and _aligned(din, h + 2, dout, b + 1)):
            head_to, refs = b, tuple(r for r in x.refs for _ in range(dims.as_int(din[h + 1])))  # GQA repeat
        elif (not x.head_tiled and h >= 1 and h - 1 != a and dims.equal(din[h], heads)
              and dims.equal(dout[b], dims.product(din[h - 1:h + 1]))
              and _aligned(din, h - 1, dout, b) and _aligned(din, h + 1, dout, b + 1)):
            head_to, tiled = b, True  # [B, H, ...] -> [B·H, ...]
        elif (x.head_tiled and b >= 1 and dims.equal(dout[b], heads) and b - 1 != feat_to
              and dims.equal(din[h], dims.product(dout[b - 1:b + 1]))
              and _aligned(din, h, dout, b - 1) and _aligned(din, h + 1, dout, b + 1)):
            head_to, tiled = b, False  # [B·H, ...] -> [B, H, ...]
        if dims.equal(dout[b], n) and _aligned(din, a, dout, b) and _aligned(din, a + 1, dout, b + 1):
            feat_to = b
    if head_to is not None and feat_to is not None and head_to != feat_to:
        return Protected(feat_to, refs, head_axis=head_to, head_tiled=tiled)
    return False


def reshape_dims(ctx: AnalysisContext, node: gs.Node, din: Dims | None) -> Dims | None:
    """A Reshape's output dims: inferred or completed where known, else read from its shape input."""
    return _target_shape(node, ctx, din)


def _target_shape(node: gs.Node, ctx: AnalysisContext, din: Dims | None) -> Dims | None:
    """The Reshape's output dims: inferred or completed where known, else read from its shape input."""
    dout = ctx.shape(node.outputs[0])
    if dout is not None and all(dims.expr(d) is not None for d in dout):
        return dout
    return reshape_target(ctx, node, din) or dout


class ReshapeRule(OpRule):
    """Reshape/Flatten: follow the axis, split it into heads, or merge heads back."""

    op_types = ("Reshape", "Flatten")
    keeps_index_values = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        y = node.outputs[0]
        if x is None:
            ctx.set(y, None)
            return
        din = ctx.shape(node.inputs[0])
        if not isinstance(x, Protected) or din is None:
            ctx.clear_all(node, "reshape of a tensor with unknown shape", node.inputs[:1])
            return
        if node.op == "Flatten":  # [prod(din[:axis]), prod(din[axis:])], whatever names inference gave them
            axis = int(node.attrs.get("axis", 1)) % (len(din) + 1) if din else 1
            dout = [dims.product(list(din[:axis])) if axis else 1, dims.product(list(din[axis:]))]
            inferred = ctx.shape(y) or [None, None]
            dout = [d if d is not None else i for d, i in zip(dout, inferred)]
        else:
            dout = _target_shape(node, ctx, din)
        result = reshape_annotation(ctx, x, din, dout) if dout is not None else False
        if result is False:
            ctx.clear_all(node, f"cannot follow the protected axis through {list(din)} -> {dout}", node.inputs[:1])
            return
        ctx.set(y, result)


def _slice_params(node: gs.Node, ctx: AnalysisContext):
    starts, ends = ctx.partial_values(node.inputs[1]), ctx.partial_values(node.inputs[2])
    axes = ctx.const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3].name else None
    steps = ctx.const(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else None
    return starts, ends, axes, steps


def take_blocks(ctx: AnalysisContext, refs: tuple, lo: int, hi: int) -> tuple:
    """The blocks of a flat axis covering ``[lo, hi)``, split there first."""
    blocks = ctx.spaces.refine(refs, [lo, hi])
    offset, kept = 0, []
    for ref in blocks:
        if lo <= offset < hi:
            kept.append(ref)
        offset += ctx.spaces.size(ref)
    return tuple(kept)


def _within_heads(ctx: AnalysisContext, x: Protected, lo: int, hi: int) -> Protected | None:
    """``x[..., lo:hi]`` of a headed annotation: each head keeps its own sub-block (fused QKV per head)."""
    parts = [take_blocks(ctx, (ref,), lo, hi) for ref in x.refs]
    if any(len(p) != 1 for p in parts):
        return None
    return Protected(x.axis, tuple(p[0] for p in parts), x.head_axis, x.head_tiled)


class SliceRule(OpRule):
    """Slice: along another axis the annotation follows; along the axis it keeps whole blocks
    (within each head for a headed tensor); bounds computed from shapes are evaluated."""

    op_types = ("Slice",)
    keeps_index_values = True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:  # noqa: C901
        x = ctx.get(node.inputs[0])
        y = node.outputs[0]
        if x is None:
            ctx.set(y, None)
            return
        rank = ctx.rank(node.inputs[0])
        if not isinstance(x, Protected) or rank is None:
            ctx.clear_all(node, "slice of a non-feature annotation", node.inputs[:1])
            return
        starts, ends, axes, steps = _slice_params(node, ctx)
        if axes is None and starts is not None:
            axes = np.arange(len(starts))
        if axes is None:
            ctx.clear_all(node, "slice with computed axes", node.inputs[:1])
            return
        axes = [int(a) % rank for a in np.atleast_1d(axes)]
        if x.axis not in axes and x.head_axis not in axes:
            ctx.set(y, x)
            return
        i = axes.index(x.axis) if x.axis in axes else axes.index(x.head_axis)
        if (starts is None or ends is None or starts[i] is None or ends[i] is None
                or (steps is not None and np.any(steps != 1))):
            ctx.clear_all(node, "slice of the protected axis with computed bounds", node.inputs[:1])
            return
        total = len(x.refs) if x.axis not in axes else ctx.axis_size(x)
        lo, hi = int(starts[i]), int(ends[i])
        lo, hi = (lo + total if lo < 0 else lo), (hi + total if hi < 0 else hi)
        lo, hi = max(0, min(lo, total)), max(0, min(hi, total))
        if x.axis not in axes:  # slicing heads
            if x.head_tiled:
                ctx.clear_all(node, "slice of a head axis merged with another axis", node.inputs[:1])
                return
            ctx.set(y, Protected(x.axis, x.refs[lo:hi], x.head_axis))
            return
        if hi <= lo:
            ctx.set(y, None)  # an empty slice carries no values
            return
        if lo == 0 and hi == total:
            ctx.set(y, x)
            return
        if x.head_axis is not None:
            part = _within_heads(ctx, x, lo, hi)
            if part is None:
                ctx.clear_all(node, "slice inside attention heads across their blocks", node.inputs[:1])
                return
            ctx.set(y, part)
            return
        kept = take_blocks(ctx, x.refs, lo, hi)
        ctx.set(y, Protected(x.axis, kept) if kept else None)


class SplitRule(OpRule):
    """Split: along the protected axis each output gets its blocks (fused QKV)."""

    op_types = ("Split",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        if x is None:
            for out in node.outputs:
                ctx.set(out, None)
            return
        rank = ctx.rank(node.inputs[0])
        if not isinstance(x, Protected) or rank is None:
            ctx.clear_all(node, "split of a non-feature annotation", node.inputs[:1])
            return
        axis = int(node.attrs.get("axis", 0)) % rank
        if axis != x.axis and axis != x.head_axis:
            for out in node.outputs:
                ctx.set(out, x)
            return
        sizes = node.attrs.get("split")
        if sizes is None and len(node.inputs) > 1 and node.inputs[1].name:
            value = ctx.const(node.inputs[1])
            sizes = None if value is None else value.tolist()
        total = ctx.axis_size(x) if axis == x.axis else len(x.refs)
        if sizes is None:
            parts = len(node.outputs)
            sizes = [-(-total // parts)] * (parts - 1)
            sizes.append(total - sum(sizes))
        cuts = list(np.cumsum(sizes))
        if axis == x.head_axis and x.head_tiled:
            ctx.clear_all(node, "split of a head axis merged with another axis", node.inputs[:1])
            return
        if axis == x.head_axis:
            starts = [0, *cuts[:-1]]
            for out, lo, hi in zip(node.outputs, starts, cuts):
                ctx.set(out, Protected(x.axis, x.refs[lo:hi], x.head_axis))
            return
        if x.head_axis is not None:
            starts = [0, *cuts[:-1]]
            parts = [_within_heads(ctx, x, int(lo), int(hi)) for lo, hi in zip(starts, cuts)]
            if any(p is None for p in parts):
                ctx.clear_all(node, "split inside attention heads across their blocks", node.inputs[:1])
                return
            for out, part in zip(node.outputs, parts):
                ctx.set(out, part)
            return
        blocks = ctx.spaces.refine(x.refs, cuts)
        offset, part, groups = 0, 0, [[] for _ in sizes]
        for ref in blocks:
            while offset >= cuts[part]:
                part += 1
            groups[part].append(ref)
            offset += ctx.spaces.size(ref)
        for out, group in zip(node.outputs, groups):
            ctx.set(out, Protected(x.axis, tuple(group)))


class ConcatRule(OpRule):
    """Concat: along the axis a direct sum; along another axis all operands share the basis."""

    op_types = ("Concat",)

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        axis = int(node.attrs.get("axis", 0))
        for t in node.inputs:
            ann = ctx.get(t)
            rank = ctx.rank(t)
            if isinstance(ann, Protected) and rank and axis % rank not in (ann.axis, ann.head_axis):
                return ann
        return None

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        y = node.outputs[0]
        anns = [ctx.get(t) for t in node.inputs]
        prot = [a for a in anns if isinstance(a, Protected)]
        if not prot:
            if any(a is not None for a in anns):
                ctx.clear_all(node, "concat of non-feature annotations")
            else:
                ctx.set(y, None)
            return
        rank = ctx.rank(y)
        axis = int(node.attrs.get("axis", 0)) % rank
        first = prot[0]
        empty = [t for t in node.inputs if (ctx.shape(t) or [None] * rank)[axis] == 0]
        if axis == first.axis and first.head_axis is not None:
            self._within_heads(node, ctx, [(t, a) for t, a in zip(node.inputs, anns) if t not in empty], first)
            return
        if axis == first.axis and first.head_axis is None:
            refs = []
            for t, ann in zip(node.inputs, anns):
                if t in empty:
                    continue
                if isinstance(ann, Protected) and ann.axis == axis and ann.head_axis is None:
                    refs.extend(ctx.blocks(ann))
                else:
                    ctx.clear(ann, node, "concatenated with a clear part")
                    shape = ctx.shape(t)
                    if shape is None or not isinstance(shape[axis], int):
                        ctx.clear_all(node, "concat part of unknown size")
                        return
                    part = ctx.spaces.new(f"{node.name}:{t.name}", shape[axis], node.name)
                    ctx.spaces.clear(part, ctx.limit(node, "clear part of a concatenation"))
                    refs.append(part)
            ctx.set(y, Protected(axis, tuple(refs)))
            return
        for t, ann in zip(node.inputs, anns):
            if ann is None and (ctx.const(t) is not None or _broadcast_constant(t, ctx) is not None):
                continue
            if not (isinstance(ann, Protected) and ctx.unify(first, ann, node, "concatenated operands share one basis")):
                for other in anns:
                    ctx.clear(other, node, "concat of protected and clear activations")
                ctx.set(y, None)
                return
        ctx.set(y, first)

    @staticmethod
    def _within_heads(node: gs.Node, ctx: AnalysisContext, parts: list, first: Protected) -> None:
        """Concat along the feature axis of headed tensors: each head's block is the direct sum of its parts."""
        y = node.outputs[0]
        layout = (first.axis, first.head_axis, first.head_tiled, len(first.refs))
        if any(not isinstance(a, Protected) or (a.axis, a.head_axis, a.head_tiled, len(a.refs)) != layout
               for _, a in parts):
            ctx.clear_all(node, "concat inside attention heads of differently laid out parts")
            return
        if len(parts) == 1:
            ctx.set(y, parts[0][1])
            return
        limit = ctx.limit(node, "concatenated inside each head")
        refs = []
        for h in range(len(first.refs)):
            pieces = [a.refs[h] for _, a in parts]
            whole = ctx.spaces.new(f"{node.name}:{y.name}/head{h}", sum(ctx.spaces.size(r) for r in pieces), node.name)
            for child, piece in zip(ctx.spaces.split(whole, tuple(ctx.spaces.size(r) for r in pieces)), pieces):
                ctx.spaces.union(child, piece, limit)
            refs.append(whole)
        ctx.set(y, Protected(first.axis, tuple(refs), first.head_axis, first.head_tiled))

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        y = ctx.get(node.outputs[0])
        rank = ctx.mg.rank(node.outputs[0])
        if not isinstance(y, Protected):
            return
        if y.axis == int(node.attrs.get("axis", 0)) % rank:
            return
        for index, t in enumerate(node.inputs):
            if ctx.get(t) is not None:
                continue
            value = ctx.const(t)
            if value is not None:
                ctx.set_const(node, index, apply_on_axis(ctx, value, y, rank, "right"))
                continue
            expand = _broadcast_constant(t, ctx)
            if expand is not None:  # a class token Expand-ed over the batch: fold the token itself
                ctx.set_const(expand, 0, apply_on_axis(ctx, ctx.const(expand.inputs[0]), y, rank, "right"))


def _broadcast_constant(t: gs.Tensor, ctx) -> gs.Node | None:
    """The ``Expand`` producing ``t`` from a constant (a class token broadcast to the run-time batch) when ``t``
    is read by nothing else, so its constant can be folded in place; else None."""
    node = t.inputs[0] if len(t.inputs) == 1 else None
    if node is None or node.op != "Expand" or len(t.outputs) != 1 or len(node.inputs[0].outputs) != 1:
        return None
    return node if ctx.const(node.inputs[0]) is not None else None


for _rule in (TransposeRule(), UnsqueezeRule(), SqueezeRule(), ExpandRule(), ReshapeRule(),
              SliceRule(), SplitRule(), ConcatRule()):
    register(_rule)
