"""Normalisations over the protected axis, and BatchNorm over channels.

LayerNormalization preserves ones-orthogonal bases (and RMS norms any orthogonal basis)
when its gain is all ones — the normalize pass folds gains into the following linear
layers when it can; otherwise the gain must be permuted, which allows only permutations.
BatchNormalization is a per-channel affine map: input and output share a permutation
and keep independent scales.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Protected
from eecompile.passes.context import AnalysisContext, FoldContext, apply_on_axis
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.spaces import BasisClass


def restrict_for_norm(ctx: AnalysisContext, node: gs.Node, x: Protected, scale: np.ndarray | None,
                      bias: np.ndarray | None, rms: bool) -> None:
    """The bases a norm over ``x``'s protected (last) axis allows, given its gain and bias constants.

    With an all-ones gain (or one normalize folded away) an RMS norm keeps any orthogonal basis and a
    layer norm the orthogonal bases that map ones to ones; a gain left in the graph must be permuted.
    """
    ones = scale is None or bool(np.all(scale == 1))
    if ones:
        cls = BasisClass.ORTHOGONAL if rms else BasisClass.ONES_ORTHOGONAL
        reason = ("RMS normalisation preserves only orthogonal bases" if rms else
                  "layer normalisation preserves only orthogonal bases that map ones to ones")
    elif x.head_axis is not None:
        # One gain vector serves every head: the heads may differ only by a sign per
        # coordinate pair (no permutation), which also commutes with a RoPE that follows.
        cls = BasisClass.PAIR_SIGNS_HALF if rms else BasisClass.CLEAR
        reason = ("a per-head norm's gain is shared by all heads and cannot be folded: a sign per "
                  "coordinate pair is the strongest basis that commutes with norm, gain and RoPE")
    else:
        cls = BasisClass.SIGNED_PERMUTATION if rms else BasisClass.PERMUTATION
        reason = "its gain cannot be folded into every consumer, so it must be permuted"
    if x.head_axis is not None and bias is not None and np.any(bias != 0):
        cls, reason = BasisClass.CLEAR, "a per-head norm's bias is shared by all heads"
    ctx.restrict(x, cls, node, reason)


def fold_norm_constants(ctx: FoldContext, node: gs.Node, x: Protected, rank: int, scale_index: int,
                        bias_index: int | None) -> None:
    """Express a norm's gain (permuted) and bias (in the basis) for the planned basis of ``x``."""
    scale = ctx.const(node.inputs[scale_index]) if len(node.inputs) > scale_index else None
    if scale is not None and not np.all(scale == 1) and x.head_axis is None:
        ctx.set_const(node, scale_index, apply_on_axis(ctx, scale, x, rank, "perm").reshape(scale.shape))
    bias = ctx.const(node.inputs[bias_index]) if bias_index is not None and len(node.inputs) > bias_index else None
    if bias is not None:
        ctx.set_const(node, bias_index, apply_on_axis(ctx, bias, x, rank, "right").reshape(bias.shape))


class FeatureNormRule(OpRule):
    """LayerNormalization, RMSNormalization, SimplifiedLayerNormalization over the last axis."""

    op_types = ("LayerNormalization", "RMSNormalization", "SimplifiedLayerNormalization")

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        for extra in node.outputs[1:]:
            ctx.set(extra, None)
        if x is None:
            ctx.set(node.outputs[0], None)
            return
        rank = ctx.rank(node.inputs[0])
        axis = int(node.attrs.get("axis", -1)) % rank if rank else None
        if not isinstance(x, Protected) or axis != x.axis or axis != rank - 1:
            ctx.clear(x, node, "normalisation over an axis other than the protected one")
            ctx.set(node.outputs[0], None)
            return
        scale = ctx.const(node.inputs[1]) if len(node.inputs) > 1 else None
        bias = ctx.const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
        restrict_for_norm(ctx, node, x, scale, bias, rms=node.op != "LayerNormalization")
        ctx.set(node.outputs[0], x)

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        x = ctx.get(node.inputs[0])
        if not isinstance(x, Protected):
            return
        fold_norm_constants(ctx, node, x, ctx.mg.rank(node.inputs[0]), 1, 2)


class BatchNormRule(OpRule):
    """BatchNormalization (inference): per-channel affine; shared permutation, own scales."""

    op_types = ("BatchNormalization",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        for extra in node.outputs[1:]:
            ctx.set(extra, None)
        if x is None:
            ctx.set(node.outputs[0], None)
            return
        params = [ctx.const(t) for t in node.inputs[1:5]]
        if (not isinstance(x, Protected) or x.axis != 1 or x.head_axis is not None
                or any(p is None for p in params) or node.attrs.get("training_mode", 0)):
            ctx.clear(x, node, "BatchNormalization with non-constant statistics or an unprotected channel axis")
            ctx.set(node.outputs[0], None)
            return
        out = ctx.fresh(node, node.outputs[0], 1, ctx.axis_size(x))
        ctx.spaces.link_permutation(ctx.blocks(x)[0] if len(ctx.blocks(x)) == 1 else x.refs[0], out.refs[0],
                                    ctx.limit(node, "per-channel affine map: input and output share a permutation"))
        if len(ctx.blocks(x)) != 1:
            ctx.clear(x, node, "BatchNormalization over a block-structured axis")
            ctx.clear(out, node, "BatchNormalization over a block-structured axis")
        ctx.set(node.outputs[0], out)

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        x, y = ctx.get(node.inputs[0]), ctx.get(node.outputs[0])
        if not isinstance(x, Protected) or not isinstance(y, Protected):
            return
        perm_in, d_in = _monomial(ctx.axis_basis(x).blocks[0])
        perm_out, d_out = _monomial(ctx.axis_basis(y).blocks[0])
        if not np.array_equal(perm_in, perm_out):
            raise AssertionError("BatchNormalization spaces do not share their permutation")
        scale, bias, mean, var = (ctx.const(t).astype(np.float64) for t in node.inputs[1:5])
        ctx.set_const(node, 1, scale[perm_in] * d_out / d_in)
        ctx.set_const(node, 2, bias[perm_in] * d_out)
        ctx.set_const(node, 3, mean[perm_in] * d_in)
        ctx.set_const(node, 4, var[perm_in])


def _monomial(basis) -> tuple[np.ndarray, np.ndarray]:
    """(perm, scale) of a monomial or identity basis."""
    perm = basis.perm if basis.perm is not None else np.arange(basis.size)
    scale = basis.scale if basis.scale is not None else np.ones(basis.size)
    return perm, scale


for _rule in (FeatureNormRule(), BatchNormRule()):
    register(_rule)
