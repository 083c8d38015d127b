"""InstanceNormalization, and GroupNorm as exporters write it.

torch exports ``GroupNorm(G, C)`` on ``x [B, C, *spatial]`` as ``Reshape -> [B, G, ·]``,
``InstanceNormalization`` with a scale and bias per group (ones and zeros), ``Reshape`` back to
``x``'s shape, then the per-channel affine ``Mul γ[C,1,1]``, ``Add β[C,1,1]``. What commutes
with it (DESIGN §1), on the channel axis:

* Each group is normalised over its channels and pixels: the mean is invariant under a basis
  that maps ones to ones and the variance under an orthogonal one, so **within each group** of
  ``C/G`` channels the basis may be any ones-preserving orthogonal matrix (block-diagonal; the
  per-channel gain ``γ`` that usually follows reduces each block to a permutation, by the Mul
  rule). Permuting whole groups would also commute, but the basis lattice has no block
  permutations, so groups stay in place and the per-group scale/bias need no folding.
* One channel per group (``G = C``) and a plain ``InstanceNormalization`` normalise each channel
  on its own: channels may be permuted and change sign (``ε`` in ``√(σ² + ε)`` rules out other
  scales); the per-channel scale is permuted and the bias expressed in the basis.
* The ``GroupNormalization`` op (opset 21, as the dynamo exporter writes it at opset 23) is the
  same normalisation in one node with a per-channel ``scale``/``bias``: each group's block is a
  permutation (the gain, as in the decomposed pattern), scale and bias permuted at fold time.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes import dims
from eecompile.passes.annotations import Protected
from eecompile.passes.context import AnalysisContext, FoldContext, apply_on_axis
from eecompile.passes.rules import register, register_pattern
from eecompile.passes.rules.base import OpRule, Pattern, PatternInstance
from eecompile.passes.rules.shape import reshape_dims
from eecompile.passes.spaces import BasisClass

PER_CHANNEL_REASON = ("instance normalisation normalises each channel on its own: channels may only be "
                      "permuted and change sign (ε rules out other scales)")


def _channel_axis(ctx: AnalysisContext, x) -> bool:
    return isinstance(x, Protected) and x.axis == 1 and x.head_axis is None


def _fold_per_channel(ctx: FoldContext, node: gs.Node, x: Protected) -> None:
    """Scale (input 1) permuted, bias (input 2) in the basis, for a signed-permutation channel basis."""
    for index, how in ((1, "perm"), (2, "right")):
        value = ctx.const(node.inputs[index])
        ctx.set_const(node, index, apply_on_axis(ctx, value, Protected(0, x.refs), 1, how).reshape(value.shape))


class InstanceNormRule(OpRule):
    """InstanceNormalization over ``[B, C, *spatial]`` with the channel axis protected."""

    op_types = ("InstanceNormalization",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        y = node.outputs[0]
        if x is None:
            ctx.set(y, None)
            return
        if not _channel_axis(ctx, x) or any(ctx.const(t) is None for t in node.inputs[1:3]):
            ctx.clear_all(node, "instance normalisation with a protected spatial axis or computed scale/bias",
                          node.inputs[:1])
            return
        ctx.restrict(x, BasisClass.SIGNED_PERMUTATION, node, PER_CHANNEL_REASON)
        ctx.set(y, x)

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        x = ctx.get(node.inputs[0])
        if isinstance(x, Protected):
            _fold_per_channel(ctx, node, x)


class _GroupNormInstance(PatternInstance):
    """``Reshape [B,C,*] -> [B,G,·]``, ``InstanceNormalization``, ``Reshape`` back."""

    def __init__(self, nodes: list[gs.Node], groups: int, channels: int) -> None:
        super().__init__(nodes, nodes[-1])
        self.groups, self.per_channel = groups, groups == channels
        self.x = nodes[0].inputs[0]
        self.norm = nodes[1]

    def analyze(self, ctx: AnalysisContext) -> None:
        x = ctx.get(self.x)
        out = self.anchor.outputs[0]
        if x is None:
            ctx.set(out, None)
            return
        if not _channel_axis(ctx, x) or any(ctx.const(t) is None for t in self.norm.inputs[1:3]):
            ctx.clear(x, self.norm, "group normalisation with a protected spatial axis or computed scale/bias")
            ctx.set(out, None)
            return
        width = ctx.axis_size(x) // self.groups
        if self.per_channel:
            ctx.restrict(x, BasisClass.SIGNED_PERMUTATION, self.norm, PER_CHANNEL_REASON)
        else:
            ctx.spaces.refine(x.refs, [width * (k + 1) for k in range(self.groups)])
            ctx.restrict(x, BasisClass.ONES_ORTHOGONAL, self.norm,
                         f"group normalisation over {self.groups} groups of {width} channels: within each group only "
                         "orthogonal bases that map ones to ones keep mean and variance (groups stay in place)")
        ctx.set(out, x)

    def fold(self, ctx: FoldContext) -> None:
        x = ctx.get(self.x)
        if isinstance(x, Protected) and self.per_channel:
            _fold_per_channel(ctx, self.norm, x)


class GroupNormPattern(Pattern):
    """GroupNorm as torch exports it (dynamo and legacy), matched on the shapes around it."""

    name = "group_norm"

    def match(self, nodes: list[gs.Node], ctx: AnalysisContext) -> list[PatternInstance]:
        found = []
        for norm in nodes:
            if norm.op != "InstanceNormalization":
                continue
            inst = self._match_at(norm, ctx)
            if inst is not None:
                found.append(inst)
        return found

    @staticmethod
    def _match_at(norm: gs.Node, ctx: AnalysisContext) -> PatternInstance | None:
        inner = norm.inputs[0]
        before = inner.inputs[0] if len(inner.inputs) == 1 else None
        normed = norm.outputs[0]
        after = normed.outputs[0] if len(normed.outputs) == 1 else None
        if (before is None or after is None or before.op != "Reshape" or after.op != "Reshape"
                or len(inner.outputs) != 1 or after.inputs[0] is not normed):
            return None
        x = before.inputs[0]
        din = ctx.shape(x)
        grouped = reshape_dims(ctx, before, din)
        restored = reshape_dims(ctx, after, ctx.shape(inner))
        if din is None or grouped is None or restored is None or len(din) < 3 or len(grouped) != 3:
            return None
        groups, channels = dims.as_int(grouped[1]), dims.as_int(din[1])
        if groups is None or channels is None or channels % groups:
            return None
        if not (dims.equal(din[0], grouped[0]) and dims.same_elements(din, 1, len(din), grouped, 1, 3)):
            return None
        if len(restored) != len(din) or not all(dims.equal(a, b) for a, b in zip(din, restored)):
            return None
        return _GroupNormInstance([before, norm, after], groups, channels)


class GroupNormalizationRule(OpRule):
    """``GroupNormalization(x, scale, bias, num_groups)`` with the channel axis (1) protected."""

    op_types = ("GroupNormalization",)

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        x = ctx.get(node.inputs[0])
        y = node.outputs[0]
        if x is None:
            ctx.set(y, None)
            return
        groups = int(node.attrs.get("num_groups", 0))
        channels = ctx.axis_size(x) if _channel_axis(ctx, x) else None
        shapes = [ctx.const_shape(t) for t in node.inputs[1:3]]
        if channels is None or groups <= 0 or channels % groups or any(s is None for s in shapes):
            ctx.clear_all(node, "group normalisation with a protected spatial axis, computed scale/bias or "
                          "channels not divisible into its groups", node.inputs[:1])
            return
        if any(int(np.prod(s)) != channels for s in shapes):  # opset 18's per-group pair: refused by onnx.checker
            ctx.clear_all(node, "group normalisation with a per-group scale (deprecated opset-18 form)",
                          node.inputs[:1])
            return
        width = channels // groups
        if groups == channels:
            ctx.restrict(x, BasisClass.SIGNED_PERMUTATION, node, PER_CHANNEL_REASON)
        else:
            ctx.spaces.refine(x.refs, [width * (k + 1) for k in range(groups)])
            ctx.restrict(x, BasisClass.PERMUTATION, node,
                         f"group normalisation over {groups} groups of {width} channels with a per-channel gain: "
                         "only permutations inside each group keep its mean, variance and gain (groups stay in "
                         "place)")
        ctx.set(y, x)

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        x = ctx.get(node.inputs[0])
        if not isinstance(x, Protected):
            return
        _fold_per_channel(ctx, node, x)


register(InstanceNormRule())
register(GroupNormalizationRule())
register_pattern(GroupNormPattern())
