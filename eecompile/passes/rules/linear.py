"""MatMul, Gemm and Conv: any invertible basis on input and output, folded into the weight
(grouped Conv: block-diagonal per group; depthwise Conv: one monomial basis in and out).

``W' = T_in^{-1} · W · T_out`` for a constant weight; for two activations (attention)
the contracted axes must be dual (``T_B = T_A^{-T}``) and the free axes pass through.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes import constant_views, group_orders
from eecompile.passes.annotations import Annotation, Protected
from eecompile.passes.basis import AxisBasis
from eecompile.passes.context import AnalysisContext, FoldContext, apply_on_axis
from eecompile.passes.weight_fold import fold_matrix
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.spaces import BasisClass


class MatMulRule(OpRule):
    """MatMul with a constant 2-D weight, or of two activations (Q·Kᵀ, P·V)."""

    op_types = ("MatMul",)

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        weight = ctx.const_shape(node.inputs[1])
        rank = ctx.rank(node.inputs[0])
        if index == 0 and weight is not None and len(weight) == 2 and rank:
            return ctx.fresh(node, node.inputs[0], rank - 1, int(weight[0]))
        return None

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        a_t, b_t = node.inputs[:2]
        y_t = node.outputs[0]
        a, b = ctx.get(a_t), ctx.get(b_t)
        ra, rb, ry = ctx.rank(a_t), ctx.rank(b_t), ctx.rank(y_t)
        weight_b, weight_a = ctx.const_shape(b_t), ctx.const_shape(a_t)
        if ra is None or rb is None or ry is None:
            ctx.clear_all(node, "unknown ranks")
            return
        if weight_b is not None and len(weight_b) == 2:
            out = None
            if isinstance(a, Protected):
                if a.head_axis is None and a.axis == ra - 1:
                    pass  # folded into the weight's rows
                elif a.axis == ra - 2 and ra >= 2:
                    out = a.shifted(ry - ra)
                else:
                    ctx.clear(a, node, "protected axis is not the contracted or row axis")
            elif a is not None:
                ctx.clear(a, node, "unsupported annotation on MatMul input")
            if out is None:
                out = ctx.fresh(node, y_t, ry - 1, int(weight_b[1]))
            ctx.set(y_t, out)
            return
        if weight_a is not None:
            if isinstance(b, Protected) and b.axis == rb - 1:
                ctx.set(y_t, b.shifted(ry - rb))
            else:
                ctx.clear(b, node, "a constant left operand mixes the protected axis")
                ctx.set(y_t, None)
            return
        self._two_activations(node, ctx, a, b, ra, rb, ry)

    @staticmethod
    def _two_activations(node: gs.Node, ctx: AnalysisContext, a: Annotation, b: Annotation,
                         ra: int, rb: int, ry: int) -> None:
        a_contracted = isinstance(a, Protected) and a.axis == ra - 1
        b_contracted = isinstance(b, Protected) and b.axis == rb - 2
        if a_contracted and b_contracted:
            ok = False
            if a.head_axis is None and b.head_axis is None:
                ok = ctx.unify(a, Protected(b.axis, tuple(r.flipped() for r in b.refs)), node,
                               "contracted axes of a product of activations must be dual")
            elif (a.head_axis is not None and b.head_axis is not None
                  and a.head_axis - ra == b.head_axis - rb and len(a.refs) == len(b.refs)
                  and a.head_tiled == b.head_tiled):
                limit = ctx.limit(node, "per-head dual bases (scores stay clear)")
                for ra_, rb_ in zip(a.refs, b.refs):
                    ctx.spaces.union(ra_, rb_.flipped(), limit)
                ok = True
            if not ok:
                ctx.clear(a, node, "cannot pair contracted axes")
                ctx.clear(b, node, "cannot pair contracted axes")
        else:
            if a_contracted and not (b is None and _constant_partner(node, ctx, a, ra, rb)):
                ctx.clear(a, node, "contracted with a clear operand")
            if b_contracted:
                ctx.clear(b, node, "contracted with a clear operand")
        out = None
        a_rows = isinstance(a, Protected) and not a_contracted and a.axis == ra - 2
        b_cols = isinstance(b, Protected) and not b_contracted and b.axis == rb - 1
        if a_rows and b_cols:
            ctx.clear(a, node, "only one protected axis per tensor is tracked")
        elif a_rows:
            out = a.shifted(ry - ra)
        if b_cols:
            out = b.shifted(ry - rb)
        for ann, used in ((a, a_contracted or a_rows), (b, b_contracted or b_cols)):
            if isinstance(ann, Protected) and not used:
                ctx.clear(ann, node, "protected batch axis in a product of activations")
        ctx.set(node.outputs[0], out)

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        shape = ctx.mg.const_shape(node.inputs[1])
        if shape is None or len(shape) != 2:
            _fold_constant_partner(node, ctx)
            return
        a, y = ctx.get(node.inputs[0]), ctx.get(node.outputs[0])
        ra, ry = ctx.mg.rank(node.inputs[0]), ctx.mg.rank(node.outputs[0])
        if ra is None or ry is None:
            return  # analysis cleared the node (unknown ranks)
        fold_in = isinstance(a, Protected) and a.head_axis is None and a.axis == ra - 1
        fold_out = isinstance(y, Protected) and y.head_axis is None and y.axis == ry - 1
        if not fold_in and not fold_out:
            return
        rows = ctx.axis_basis(a).dual() if fold_in else None
        cols = ctx.axis_basis(y) if fold_out else None
        ctx.set_const(node, 1, fold_matrix(ctx.const(node.inputs[1]), rows, cols))


class GemmRule(OpRule):
    """Gemm ``alpha·A·B + beta·C`` with constant B (and C)."""

    op_types = ("Gemm",)

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        weight = ctx.const_shape(node.inputs[1])
        if index == 0 and weight is not None and not node.attrs.get("transA", 0):
            k = weight[1] if node.attrs.get("transB", 0) else weight[0]
            return ctx.fresh(node, node.inputs[0], 1, int(k))
        return None

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        weight = ctx.const_shape(node.inputs[1])
        a = ctx.get(node.inputs[0])
        if weight is None or node.attrs.get("transA", 0):
            ctx.clear_all(node, "Gemm without a constant B, or with transA")
            return
        if a is not None and not (isinstance(a, Protected) and a.axis == 1 and a.head_axis is None):
            ctx.clear(a, node, "protected axis is not Gemm's contracted axis")
        n = weight[0] if node.attrs.get("transB", 0) else weight[1]
        ctx.set(node.outputs[0], ctx.fresh(node, node.outputs[0], 1, int(n)))

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        weight = ctx.const(node.inputs[1])
        if weight is None:
            return
        trans_b = bool(node.attrs.get("transB", 0))
        a, y = ctx.get(node.inputs[0]), ctx.get(node.outputs[0])
        k_basis = ctx.axis_basis(a).dual() if isinstance(a, Protected) and a.axis == 1 and a.head_axis is None \
            else None
        n_basis = None
        if isinstance(y, Protected):
            n_basis = ctx.axis_basis(y)
            c = ctx.const(node.inputs[2]) if len(node.inputs) > 2 else None
            if c is not None:
                ctx.set_const(node, 2, n_basis.right(c.reshape(c.shape or (1,)), -1))
        if k_basis is None and n_basis is None:
            return
        # the stored weight is [K, N], or [N, K] with transB: each basis folds along its own axis of it
        rows, cols = (n_basis, k_basis) if trans_b else (k_basis, n_basis)
        ctx.set_const(node, 1, fold_matrix(weight, rows, cols))


class ConvRule(OpRule):
    """Conv with a constant weight ``[C_out, C_in/g, *kernel]`` on channel axis 1 (DESIGN §1).

    * ``group == 1``: any invertible basis on input and output channels, independently.
    * depthwise (one input and one output channel per group): output channel ``c`` is input
      channel ``c`` filtered on its own, so input and output share one monomial basis (a
      permutation of the groups with a scale each); the filters are permuted.
    * other groups (``a = C_in/g``, ``b = C_out/g``): each group is a dense conv of its own, so
      the input splits into ``g`` blocks of ``a`` and the output into ``g`` blocks of ``b``, each
      any invertible basis (block-diagonal; permuting whole groups is not in the basis lattice).
      A depthwise conv with a channel multiplier (``a == 1 < b``) clears its input: only a
      per-channel scale without a permutation would fold there, and no basis class is that.
    """

    op_types = ("Conv",)

    @staticmethod
    def _groups(node: gs.Node, weight: tuple[int, ...]) -> tuple[int, int, int]:
        """(groups, input channels per group, output channels per group)."""
        groups = int(node.attrs.get("group", 1))
        return groups, int(weight[1]), int(weight[0]) // groups

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        weight = ctx.const_shape(node.inputs[1])
        if index != 0 or weight is None or len(weight) < 3:
            return None
        groups, a, b = self._groups(node, weight)
        if groups > 1 and a == 1 and b > 1:
            return None
        return ctx.fresh(node, node.inputs[0], 1, groups * a)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        weight = ctx.const_shape(node.inputs[1])
        x = ctx.get(node.inputs[0])
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if weight is None or len(weight) < 3 or (bias is not None and ctx.const_shape(bias) is None):
            ctx.clear_all(node, "Conv with a non-constant weight or bias")
            return
        if x is not None and not (isinstance(x, Protected) and x.axis == 1 and x.head_axis is None):
            ctx.clear(x, node, "protected axis is not the channel axis")
            x = None
        groups, a, b = self._groups(node, weight)
        y = node.outputs[0]
        if groups == 1:
            ctx.set(y, ctx.fresh(node, y, 1, int(weight[0])))
        elif a == 1 and b == 1:
            if x is None:  # channel c of a clear input stays channel c: no permutation can fold
                ctx.set(y, None)
                return
            ctx.restrict(x, BasisClass.MONOMIAL, node,
                         "depthwise Conv filters each channel on its own: a permutation with scales, shared by input "
                         "and output")
            ctx.set(y, x)
        elif a == 1:
            if x is not None:
                ctx.clear(x, node, "depthwise Conv with a channel multiplier: only an unpermuted per-channel scale "
                                   "would fold into its input")
            ctx.set(y, self._grouped_output(node, ctx, groups, b))
        else:
            out = self._grouped_output(node, ctx, groups, b)
            if x is not None:
                ctx.spaces.refine(x.refs, [a * (k + 1) for k in range(groups)])
                inputs = ctx.spaces.expand(x.refs)
                if len(inputs) == groups:  # whole groups may be permuted where every op on them allows it
                    group_orders.offer(ctx, node, [inputs, ctx.spaces.expand(out.refs)])
            ctx.set(y, out)

    def keeps_block_order(self, node: gs.Node, ctx: AnalysisContext) -> bool:
        """Every Conv but a depthwise one (whose filters move with a monomial basis) folds through whole-axis
        products, a grouped one group by group in the moved order."""
        weight = ctx.const_shape(node.inputs[1])
        if weight is None or len(weight) < 3:
            return False
        groups, a, _ = self._groups(node, weight)
        return groups == 1 or a > 1

    @staticmethod
    def _grouped_output(node: gs.Node, ctx: AnalysisContext, groups: int, width: int) -> Protected:
        """A fresh output space split into one block per group (block-diagonal basis)."""
        out = ctx.fresh(node, node.outputs[0], 1, groups * width)
        ctx.spaces.split(out.refs[0], (width,) * groups)
        return out

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        shape = ctx.const_shape(node.inputs[1])
        x, y = ctx.get(node.inputs[0]), ctx.get(node.outputs[0])
        if shape is None or len(shape) < 3 or (not isinstance(x, Protected) and not isinstance(y, Protected)):
            return
        groups, a, b = self._groups(node, shape)
        w = ctx.const(node.inputs[1]).astype("float64")
        if groups > 1 and a == 1 and b == 1:
            if isinstance(y, Protected):  # y shares x's monomial basis: the filters are permuted only
                w = apply_on_axis(ctx, w, Protected(0, y.refs), w.ndim, "perm")
        else:
            out_basis = ctx.axis_basis(y) if isinstance(y, Protected) else None
            in_basis = ctx.axis_basis(x).dual() if isinstance(x, Protected) and x.axis == 1 else None
            out_basis, in_basis = (None if b is None or b.is_identity else b for b in (out_basis, in_basis))
            if groups == 1:
                if out_basis is not None:
                    w = out_basis.right(w, 0)
                if in_basis is not None:
                    w = in_basis.right(w, 1)
            else:
                w = _fold_groups(w, groups, a, b, in_basis, out_basis)
        ctx.set_const(node, 1, w)
        if isinstance(y, Protected) and len(node.inputs) > 2 and ctx.const(node.inputs[2]) is not None:
            ctx.set_const(node, 2, ctx.axis_basis(y).right(ctx.const(node.inputs[2]), 0))


def _partner_view(node: gs.Node, ctx: AnalysisContext | FoldContext, a: Protected, ra: int, rb: int,
                  rank, repeats=None) -> tuple[constant_views.ConstantView, int, int | None] | None:
    """``node``'s right operand as a view of a constant whose contracted axis (and head axis) can take
    ``a``'s dual bases: (view, the constant's contracted axis, its head axis or None).

    ``repeats`` reads a Tile's repeats (analysis); None skips the check that the contracted axis is not
    repeated (folding: the analysis made it, and cleared ``a`` where it failed)."""
    view = constant_views.constant_view(node.inputs[1], node, ctx.const_shape, rank, repeats or (lambda t: None),
                                        ctx.const)
    if view is None or len(view.axes) != rb:
        return None
    contracted = view.axes[rb - 2]
    shape = ctx.const_shape(view.constant)
    if contracted.source is None or (contracted.repeats and repeats is not None):  # MatMul ties its size to a's
        return None
    if a.head_axis is None:
        return view, contracted.source, None
    head_at = a.head_axis - ra + rb
    head = view.axes[head_at] if 0 <= head_at < rb - 2 else None
    if head is None or head.source is None or shape[head.source] % len(a.refs):
        return None
    return view, contracted.source, head.source


def _constant_partner(node: gs.Node, ctx: AnalysisContext, a: Protected, ra: int, rb: int) -> bool:
    """Whether the clear right operand is a constant view that ``a``'s dual bases fold into (DeBERTa's
    relative-position keys, tiled over the batch): the products are attention scores, clear."""
    return _partner_view(node, ctx, a, ra, rb, ctx.rank, ctx.partial_values) is not None


def _fold_constant_partner(node: gs.Node, ctx: FoldContext) -> None:
    """Fold the left operand's dual bases into the constant behind the right operand (see
    :func:`_constant_partner`); head ``h`` of the constant takes head ``h mod H``'s basis."""
    a = ctx.get(node.inputs[0])
    ra, rb = ctx.mg.rank(node.inputs[0]), ctx.mg.rank(node.inputs[1])
    if not isinstance(a, Protected) or ra is None or rb is None or a.axis != ra - 1 or ctx.get(node.inputs[1]):
        return
    found = _partner_view(node, ctx, a, ra, rb, ctx.mg.rank)
    if found is None:
        return
    view, contracted, head = found
    value = ctx.const(view.constant).astype(np.float64)
    if head is None:
        value = ctx.axis_basis(a).dual().right(value, contracted)
    else:
        duals = [basis.dual() for basis in ctx.head_bases(a)]
        slices = [duals[h % len(duals)].right(np.take(value, [h], axis=head), contracted)
                  for h in range(value.shape[head])]
        value = np.concatenate(slices, axis=head)
    ctx.set_const(view.reader, view.index, value)


def _fold_groups(w: np.ndarray, groups: int, a: int, b: int, in_basis: AxisBasis | None,
                 out_basis: AxisBasis | None) -> np.ndarray:
    """A grouped Conv's filters ``[groups·b, a, *kernel]`` in the planned bases. With the groups permuted
    (both bases move whole blocks by one ``π``), group ``j`` of the result is group ``π(j)``'s filters in the
    bases of position ``j``; otherwise each group in its own blocks."""
    moved = [basis for basis in (in_basis, out_basis) if basis is not None and basis.moves_blocks]
    if moved:
        group_of = _group_sources(in_basis, a, groups) if in_basis is not None else None
        out_of = _group_sources(out_basis, b, groups) if out_basis is not None else None
        if group_of is not None and out_of is not None and group_of != out_of:
            raise ValueError("a grouped Conv's input and output groups are moved differently")
        sources = group_of or out_of
    else:
        sources = list(range(groups))
    parts = []
    for j, g in enumerate(sources):
        part = w[g * b:(g + 1) * b]
        if out_basis is not None:
            part = _position_basis(out_basis, j, b).right(part, 0)
        if in_basis is not None:
            part = _position_basis(in_basis, j, a).right(part, 1)
        parts.append(part)
    return np.concatenate(parts, axis=0)


def _group_sources(basis: AxisBasis, width: int, groups: int) -> list[int]:
    """For each group position of the result, the group of the input it reads (blocks of ``width``)."""
    found = []
    for j in range(groups):
        lo = j * width
        pieces = [(target, source) for target, source, _ in basis.sources() if lo <= target.start < lo + width]
        starts = {source.start - target.start + lo for target, source in pieces}
        if len(starts) != 1 or next(iter(starts)) % width:
            raise ValueError("a basis block crosses a Conv group boundary")
        found.append(next(iter(starts)) // width)
    return found


def _position_basis(basis: AxisBasis, position: int, width: int) -> AxisBasis:
    """The blocks of ``basis`` that write group position ``position`` (``width`` coordinates), in place."""
    lo, hi = position * width, (position + 1) * width
    kept = [block for target, _, block in basis.sources() if lo <= target.start and target.stop <= hi]
    if sum(block.size for block in kept) != width:
        raise ValueError(f"a basis block crosses the group boundary [{lo}, {hi})")
    return AxisBasis(tuple(kept))


for _rule in (MatMulRule(), GemmRule(), ConvRule()):
    register(_rule)
