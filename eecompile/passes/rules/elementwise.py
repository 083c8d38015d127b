"""Elementwise ops: binary arithmetic and unary functions.

Unary functions allow the bases that commute with them (DESIGN §1): a linear op any basis,
an odd function a signed permutation, Relu a permutation with positive scales, any other
nonlinearity a permutation. Binary ops require equal spaces for two activations, and fold
constants (``c' = c·T`` for Add, a permuted gain for Mul).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Annotation, Protected, Squares
from eecompile.passes.context import AnalysisContext, FoldContext, apply_on_axis
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.spaces import BasisClass

ANY = BasisClass.INVERTIBLE
UNARY_CLASSES: dict[str, BasisClass] = {
    **dict.fromkeys(("Identity", "Neg", "Dropout"), ANY),
    **dict.fromkeys(("Relu", "LeakyRelu"), BasisClass.POSITIVE_MONOMIAL),
    **dict.fromkeys(("Tanh", "Erf", "Sin", "Atan", "Asinh", "Softsign", "Sign", "Asin", "Sinh", "Tan"),
                    BasisClass.SIGNED_PERMUTATION),
    **dict.fromkeys(("Sigmoid", "Gelu", "Exp", "Log", "Softplus", "Abs", "Sqrt", "Reciprocal", "HardSigmoid",
                     "HardSwish", "Mish", "Cos", "Elu", "Selu", "Celu", "Floor", "Ceil", "Round",
                     "ThresholdedRelu", "Clip", "Swish", "IsNaN", "IsInf", "Not", "Acos", "Cosh", "Acosh",
                     "Atanh"), BasisClass.PERMUTATION),
}


def aligned(ann: Protected, rank_in: int, rank_out: int) -> Protected:
    """Right-align an input annotation to the broadcast output rank."""
    return ann.shifted(rank_out - rank_in)


def dim_along(ctx: AnalysisContext, tensor: gs.Tensor, axis: int, rank_out: int) -> int | str | None:
    """Size of ``tensor`` along output axis ``axis`` after broadcasting (1 if absent)."""
    shape = ctx.shape(tensor)
    if shape is None:
        return None
    offset = rank_out - len(shape)
    return 1 if axis - offset < 0 else shape[axis - offset]


def constant_along(value: np.ndarray, axis: int, rank_out: int) -> bool:
    """Whether a constant does not vary along output axis ``axis``."""
    value = value.reshape((1,) * (rank_out - value.ndim) + value.shape)
    if value.shape[axis] == 1:
        return True
    first = np.take(value, [0], axis=axis)
    return bool(np.all(value == first))


class UnaryRule(OpRule):
    """Elementwise functions: the output stays in the input's space."""

    op_types = tuple(UNARY_CLASSES)

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
        if not isinstance(x, Protected):
            ctx.clear(x, node, f"{node.op} of a non-feature tensor")
            ctx.set(node.outputs[0], None)
            return
        cls = UNARY_CLASSES[node.op]
        if cls != ANY:
            ctx.restrict(x, cls, node, f"{node.op} commutes only with a {cls.value} basis")
        ctx.set(node.outputs[0], x)


MAX_BIND_DEPTH = 4
"""How many axis-keeping ops a graph input's binding may look through to the op that proposes it."""


def bind_through(node: gs.Node, ctx: AnalysisContext, depth: int = 0) -> Annotation:
    """What the consumers of ``node``'s output would bind it to, for a graph input ``node`` only passes on
    with its axes unchanged (a float ``Cast``, a spatial ``Pad``): ``pixel_values.to(dtype)`` before the
    patch Conv, a ``Pad`` before a stride-2 stem. The first consumer proposing a feature annotation wins."""
    from eecompile.passes.rules import rule_for

    if depth > MAX_BIND_DEPTH or not node.outputs or not ctx.mg.is_float(node.outputs[0]):
        return None
    out = node.outputs[0]
    for consumer in out.outputs:
        rule = rule_for(consumer)
        if rule is None:
            continue
        index = next(i for i, t in enumerate(consumer.inputs) if t is out)
        found = rule.bind_input(consumer, index, ctx)
        if isinstance(found, Protected):
            return found
    return None


class CastRule(OpRule):
    """Cast between float types keeps the basis; to anything else the values must be clear."""

    op_types = ("Cast", "CastLike")
    keeps_index_values = True

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        if index != 0 or not ctx.mg.is_float(node.inputs[0]):
            return None
        return bind_through(node, ctx)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        if x is None:
            ctx.set(node.outputs[0], None)
        elif isinstance(x, Protected) and ctx.mg.is_float(node.outputs[0]):
            ctx.set(node.outputs[0], x)
        else:
            ctx.clear_all(node, "cast of protected values to a non-float type", node.inputs[:1])


class BinaryRule(OpRule):
    """Add, Sub, Mul, Div, Pow."""

    op_types = ("Add", "Sub", "Mul", "Div", "Pow")

    def keeps_block_order(self, node: gs.Node, ctx: AnalysisContext) -> bool:
        """A sum or product of two protected activations folds nothing; a constant operand is folded block
        by block."""
        return all(ctx.get(t) is not None for t in node.inputs[:2])

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        other = ctx.get(node.inputs[1 - index])
        if node.op in ("Add", "Sub") and isinstance(other, Protected):
            mine, theirs = ctx.shape(node.inputs[index]), ctx.shape(node.inputs[1 - index])
            if mine is not None and theirs is not None and len(mine) == len(theirs) \
                    and mine[other.axis] == theirs[other.axis] and (
                        other.head_axis is None or mine[other.head_axis] == theirs[other.head_axis]):
                return other  # a full-size operand; a broadcast one stays clear
        return None

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        y = node.outputs[0]
        ry = ctx.rank(y)
        anns = [ctx.get(t) for t in node.inputs[:2]]
        if all(a is None for a in anns):
            ctx.set(y, None)
            return
        if ry is None or any(a is not None and not isinstance(a, Protected) for a in anns):
            ctx.clear_all(node, "unknown rank or non-feature annotation")
            return
        prot = [aligned(a, ctx.rank(t), ry) if isinstance(a, Protected) else None
                for a, t in zip(anns, node.inputs[:2])]
        if prot[0] is not None and prot[1] is not None:
            ctx.set(y, self._two(node, ctx, prot[0], prot[1]))
        else:
            index = 0 if prot[0] is not None else 1
            ctx.set(y, self._one(node, ctx, prot[index], index, ry))

    def _two(self, node: gs.Node, ctx: AnalysisContext, a: Protected, b: Protected) -> Annotation:
        if (a.axis, a.head_axis) != (b.axis, b.head_axis):
            ctx.clear(a, node, "operands protected on different axes")
            ctx.clear(b, node, "operands protected on different axes")
            return None
        if node.op in ("Add", "Sub"):
            if ctx.unify(a, b, node, "both operands of an addition share one basis"):
                return a
        elif node.op == "Div":
            if ctx.unify(a, b, node, "both operands of a division share one basis"):
                ctx.restrict(a, BasisClass.PERMUTATION, node, "quotient of two activations")
                return a
        elif node.op == "Mul":
            return self._product(node, ctx, a, b)
        ctx.clear(a, node, f"{node.op} of two protected activations")
        ctx.clear(b, node, f"{node.op} of two protected activations")
        return None

    @staticmethod
    def _product(node: gs.Node, ctx: AnalysisContext, a: Protected, b: Protected) -> Annotation:
        """``a ⊙ b``: one shared permutation; the scale-free side is the one already restricted."""
        same = [ctx.spaces.find(r) for r in ctx.blocks(a)] == [ctx.spaces.find(r) for r in ctx.blocks(b)]
        if same or a.head_axis is not None:
            if not ctx.unify(a, b, node, "product of activations"):
                ctx.clear(a, node, "product of activations with different layouts")
                ctx.clear(b, node, "product of activations with different layouts")
                return None
            ctx.restrict(a, BasisClass.PERMUTATION, node, "product of a tensor with itself")
            return a
        cuts = sorted(set(ctx.cuts(a)) | set(ctx.cuts(b)))
        if ctx.cuts(a)[-1] != ctx.cuts(b)[-1]:
            ctx.clear(a, node, "operands of different sizes")
            ctx.clear(b, node, "operands of different sizes")
            return None
        blocks_a, blocks_b = ctx.spaces.refine(a.refs, cuts), ctx.spaces.refine(b.refs, cuts)

        def plain(refs: tuple) -> bool:
            return all(ctx.spaces.cls(r) in (BasisClass.PERMUTATION, BasisClass.CLEAR) for r in refs)

        if plain(blocks_b) and not plain(blocks_a):
            unscaled, result = blocks_b, Protected(a.axis, blocks_a)
        else:
            unscaled, result = blocks_a, Protected(b.axis, blocks_b)
        limit = ctx.limit(node, "product of activations: one shared permutation, scales on one side")
        for x, z in zip(blocks_a, blocks_b):
            ctx.spaces.link_permutation(x, z, limit)
        for r in unscaled:
            ctx.spaces.restrict(r, BasisClass.PERMUTATION, limit)
        return result

    def _one(self, node: gs.Node, ctx: AnalysisContext, p: Protected, index: int, ry: int) -> Annotation:
        other = node.inputs[1 - index]
        value = ctx.const(other)
        op = node.op
        if value is None and op in ("Add", "Sub") and sliced_constant(ctx.const, other, p.axis, ry) is not None:
            return p  # a slice of a constant table (e.g. positions[:S]): the table is folded
        if value is not None:
            flat = constant_along(value, p.axis, ry)
            if p.head_tiled and (op in ("Add", "Sub") or not flat):
                ctx.clear(p, node, f"{op} of a constant along a head axis merged with another axis")
                return None
            if not np.all(np.isfinite(value)) and op in ("Add", "Sub", "Mul", "Div"):
                ctx.restrict(p, BasisClass.POSITIVE_MONOMIAL, node,
                             "an infinite constant survives only positive scaling and permutation")
            if op in ("Add", "Sub"):
                return p
            if op == "Mul" or (op == "Div" and index == 0):
                if not flat:
                    ctx.restrict(p, BasisClass.MONOMIAL, node, "multiplied by a per-coordinate constant")
                return p
            if op == "Div":
                ctx.restrict(p, BasisClass.PERMUTATION, node, "reciprocal of protected values")
                return p
            if op == "Pow" and index == 0:
                if flat and np.all(value == 2) and self._only_summed(node, ctx, p, ry):
                    ctx.restrict(p, BasisClass.ORTHOGONAL, node, "sum of squares is invariant only under orthogonal bases")
                    return Squares(p)
            ctx.restrict(p, BasisClass.PERMUTATION, node, f"{op} is elementwise nonlinear")
            return p
        along = dim_along(ctx, other, p.axis, ry)
        if along == 1 and (p.head_axis is None or dim_along(ctx, other, p.head_axis, ry) in (1, None) or op in ("Mul", "Div")):
            if op == "Mul" or (op == "Div" and index == 0):
                return p
            if op in ("Add", "Sub"):
                ctx.restrict(p, BasisClass.ONES_ORTHOGONAL, node, "a per-row scalar is added to every coordinate")
                return p
        ctx.clear(p, node, f"{op} with a clear tensor that varies along the protected axis")
        return None

    @staticmethod
    def _only_summed(node: gs.Node, ctx: AnalysisContext, p: Protected, ry: int) -> bool:
        consumers = node.outputs[0].outputs
        if not consumers:
            return False
        for consumer in consumers:
            if consumer.op not in ("ReduceMean", "ReduceSum"):
                return False
            axes = reduce_axes(consumer, ctx.const, ry)
            if axes != [p.axis]:
                return False
        return True

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        y = ctx.get(node.outputs[0])
        for index in (0, 1):
            value = ctx.const(node.inputs[index])
            other = ctx.get(node.inputs[1 - index])
            if not isinstance(other, Protected) or ctx.get(node.inputs[index]) is not None:
                continue
            ry = ctx.mg.rank(node.outputs[0])
            p = aligned(other, ctx.mg.rank(node.inputs[1 - index]), ry)
            if value is None:
                slicer = sliced_constant(ctx.const, node.inputs[index], p.axis, ry)
                if slicer is not None and node.op in ("Add", "Sub"):
                    table = ctx.const(slicer.inputs[0])
                    ctx.set_const(slicer, 0, apply_on_axis(ctx, table, p, ry, "right").reshape(table.shape))
                continue
            basis = ctx.axis_basis(p) if p.head_axis is None else None
            flat = constant_along(value, p.axis, ry)
            pure_perm = basis is not None and all(b.dense is None and b.scale is None for b in basis.blocks)
            if node.op in ("Add", "Sub"):
                if flat and (pure_perm or (basis is not None and basis.is_identity)):
                    continue
                ctx.set_const(node, index, apply_on_axis(ctx, value, p, ry, "right"))
            elif not flat and not isinstance(y, Squares):
                ctx.set_const(node, index, apply_on_axis(ctx, value, p, ry, "perm"))


def sliced_constant(const, tensor: gs.Tensor, axis: int, rank_out: int) -> gs.Node | None:  # noqa: C901
    """The Slice node when ``tensor`` is a slice of a float constant that keeps ``axis`` whole.

    Only a slice whose table and output each have one consumer qualifies, so the table can be
    folded for that one use.
    """
    slicer = tensor.inputs[0] if len(tensor.inputs) == 1 else None
    if slicer is None or slicer.op != "Slice" or len(tensor.outputs) != 1:
        return None
    table = slicer.inputs[0]
    if not isinstance(table, gs.Constant) or not np.issubdtype(np.dtype(table.dtype), np.floating) \
            or len(table.outputs) != 1:
        return None
    ndim = len(table.shape)
    axes = const(slicer.inputs[3]) if len(slicer.inputs) > 3 and slicer.inputs[3].name else np.arange(ndim)
    if axes is None:
        return None
    table_axis = axis - (rank_out - ndim)
    if table_axis < 0 or table_axis in {int(a) % ndim for a in np.atleast_1d(axes)}:
        return None
    return slicer


def reduce_axes(node: gs.Node, const, rank: int) -> list[int] | None:
    """Normalised reduction axes of a Reduce* node (attribute or input form); None = all."""
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        value = const(node.inputs[1])
        if value is None:
            return None
        axes = value.tolist()
    if axes is None:
        return None if not node.attrs.get("noop_with_empty_axes", 0) else []
    return sorted(int(a) % rank for a in np.atleast_1d(axes))


for _rule in (UnaryRule(), CastRule(), BinaryRule()):
    register(_rule)


class WhereRule(OpRule):
    """Where(cond, x, y): a selection that does not vary along the protected axis keeps the basis."""

    op_types = ("Where",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        cond, x, y = node.inputs[:3]
        out = node.outputs[0]
        ry = ctx.rank(out)
        anns = [ctx.get(t) for t in (cond, x, y)]
        if all(a is None for a in anns):
            ctx.set(out, None)
            return
        prot = [aligned(a, ctx.rank(t), ry) for a, t in zip(anns[1:], (x, y)) if isinstance(a, Protected)]
        if anns[0] is not None or not prot or ry is None:
            ctx.clear_all(node, "Where with a protected condition")
            return
        p = prot[0]
        ok = dim_along(ctx, cond, p.axis, ry) == 1
        if len(prot) == 2:
            ok = ok and (prot[0].axis, prot[0].head_axis) == (prot[1].axis, prot[1].head_axis) and ctx.unify(
                prot[0], prot[1], node, "both branches of a selection share one basis")
        else:
            other = y if isinstance(anns[1], Protected) else x
            value = ctx.const(other)
            ok = ok and value is not None
            if ok and not np.all(np.isfinite(value)):
                ctx.restrict(p, BasisClass.POSITIVE_MONOMIAL, node,
                             "an infinite fill value survives only positive scaling and permutation")
        if not ok:
            ctx.clear_all(node, "Where selecting along the protected axis, or with a clear activation branch")
            return
        ctx.set(out, p)

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        out = ctx.get(node.outputs[0])
        if not isinstance(out, Protected):
            return
        ry = ctx.mg.rank(node.outputs[0])
        for index in (1, 2):
            value = ctx.const(node.inputs[index])
            if value is not None:
                ctx.set_const(node, index, apply_on_axis(ctx, value, out, ry, "right"))


register(WhereRule())
