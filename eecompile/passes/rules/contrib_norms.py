"""ONNX Runtime's fused residual norms (com.microsoft): SkipSimplifiedLayerNormalization, SkipLayerNormalization.

Both compute ``sum = input + skip (+ bias)`` and normalise ``sum`` over the last axis::

    SkipSimplifiedLayerNormalization(input, skip, gamma[, bias])
        -> output = sum / rms(sum) * gamma, [mean], [inv_std_var], [input_skip_bias_sum = sum]
    SkipLayerNormalization(input, skip, gamma[, beta][, bias])
        -> output = (sum - mean) / std * gamma + beta, [mean], [inv_std_var], [input_skip_bias_sum]

(``skip`` may broadcast: ``(1, S, H)`` or ``(S, H)`` against ``(B, S, H)``.) The residual sum lives in the
space of ``input`` and ``skip``, which must share one basis, and ``output`` in the same space with the
norm's restriction, as for RMSNormalization / LayerNormalization: orthogonal (ones-preserving for the
layer norm) when the gain is all ones — the normalize pass folds a gain whose every consumer is linear
into those weights — else (signed) permutations with the gain permuted. ``bias`` is added before the
norm and ``beta`` after it; both are expressed in the basis. ``mean`` and ``inv_std_var`` are per-token
statistics and stay clear (equal for the bases allowed).

ONNX Runtime's ``SimplifiedLayerNormalization`` is registered in the default domain and handled by
:mod:`eecompile.passes.rules.norms`.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Annotation, Protected
from eecompile.passes.context import AnalysisContext, FoldContext, apply_on_axis
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.rules.elementwise import aligned
from eecompile.passes.rules.norms import fold_norm_constants, restrict_for_norm

MS_DOMAIN = "com.microsoft"
SUM_OUTPUT = 3


class SkipNormRule(OpRule):
    """com.microsoft SkipSimplifiedLayerNormalization and SkipLayerNormalization."""

    op_types = ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")
    domain = MS_DOMAIN

    @staticmethod
    def indices(node: gs.Node) -> tuple[int | None, int | None]:
        """(beta index, bias index) of ``node``'s inputs."""
        return (3, 4) if node.op == "SkipLayerNormalization" else (None, 3)

    @staticmethod
    def _given(node: gs.Node, index: int | None) -> gs.Tensor | None:
        if index is None or len(node.inputs) <= index or not node.inputs[index].name:
            return None
        return node.inputs[index]

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        """A graph input read as ``input`` or ``skip`` joins the other operand's space when it is full-size."""
        if index not in (0, 1):
            return None
        other = ctx.get(node.inputs[1 - index])
        mine, theirs = ctx.shape(node.inputs[index]), ctx.shape(node.inputs[1 - index])
        if (isinstance(other, Protected) and other.head_axis is None and mine is not None and theirs is not None
                and len(mine) == len(theirs) and mine[other.axis] == theirs[other.axis]):
            return other
        return None

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        for extra in node.outputs[1:SUM_OUTPUT]:
            ctx.set(extra, None)
        outputs = [node.outputs[0]] + node.outputs[SUM_OUTPUT:SUM_OUTPUT + 1]
        total = self._sum(node, ctx)
        if total is None:
            for out in outputs:
                ctx.set(out, None)
            return
        beta_index, bias_index = self.indices(node)
        beta = self._given(node, beta_index)
        restrict_for_norm(ctx, node, total, ctx.const(node.inputs[2]),
                          ctx.const(beta) if beta is not None else None, rms=node.op != "SkipLayerNormalization")
        for out in outputs:
            ctx.set(out, total)

    def _sum(self, node: gs.Node, ctx: AnalysisContext) -> Protected | None:
        """The annotation of ``input + skip``, or None (clear) after clearing what it touches."""
        rank = ctx.rank(node.inputs[0])
        anns = [ctx.get(t) for t in node.inputs[:2]]
        if all(a is None for a in anns):
            return None
        ranks = [ctx.rank(t) for t in node.inputs[:2]]
        ok = rank is not None and all(r is not None for r in ranks)
        prot: list[Protected | None] = []
        for ann, tensor, r in zip(anns, node.inputs[:2], ranks):
            if ann is None:
                prot.append(None)
                if ctx.const(tensor) is None:
                    ok = False  # a clear activation added to a protected one
                continue
            if not isinstance(ann, Protected) or r is None or ann.axis != r - 1 or ann.head_axis is not None:
                ok = False
                prot.append(None)
                continue
            prot.append(aligned(ann, r, rank) if rank is not None else ann)
        if ok:
            a, b = prot
            if a is not None and b is not None:
                ok = ctx.unify(a, b, node, "input and skip of a residual norm share one basis")
            total = a if a is not None else b
            if ok:
                return total
        for ann in anns:
            ctx.clear(ann, node, "a residual norm whose operands are not both protected on the normalised axis")
        return None

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        total = ctx.get(node.outputs[0])
        if not isinstance(total, Protected):
            return
        rank = ctx.mg.rank(node.inputs[0])
        beta_index, bias_index = self.indices(node)
        fold_norm_constants(ctx, node, total, rank, 2, beta_index if self._given(node, beta_index) else None)
        for index in (0, 1, bias_index):  # constants added before the norm: in the sum's basis
            tensor = self._given(node, index)
            value = ctx.const(tensor) if tensor is not None else None
            if value is not None:
                ctx.set_const(node, index, apply_on_axis(ctx, value, total, rank, "right").reshape(value.shape))


register(SkipNormRule())
