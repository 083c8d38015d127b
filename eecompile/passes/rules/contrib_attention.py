"""ONNX Runtime's com.microsoft attention ops: GroupQueryAttention and MultiHeadAttention.

Both take queries, keys and values flat (``[B, S, heads·D]``, or GroupQueryAttention's packed
``[B, S, (N + 2·kv)·D]``) and keep the KV cache as ``[B, kv_heads, T, D]`` (BNSH). The mathematics
is the opset-23 Attention op's: query head ``h`` and the key head it reads get dual bases (the
scores stay clear), each value head keeps its own basis and carries it to the output, and the
cache stays in the key/value bases on the server. GroupQueryAttention's internal rotary
(``do_rotary``, cos/sin caches) rotates every frequency pair of Q and K by the position's angle:
it commutes only with one complex scalar per pair, in the half or interleaved pairing.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Annotation, Protected
from eecompile.passes.context import AnalysisContext, FoldContext
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.spaces import BasisClass, Ref


def _input(node: gs.Node, index: int) -> gs.Tensor | None:
    """Input ``index`` when the node has it and it is not an omitted optional input."""
    return node.inputs[index] if len(node.inputs) > index and node.inputs[index].name else None


def _output(node: gs.Node, index: int) -> gs.Tensor | None:
    return node.outputs[index] if len(node.outputs) > index and node.outputs[index].name else None


def flat_heads(ctx: AnalysisContext, tensor: gs.Tensor | None, heads: int) -> tuple[Ref, ...] | None:
    """One block per head of a flat ``[B, S, heads·D]`` protected tensor (None when it is not one)."""
    ann = ctx.get(tensor)
    if not isinstance(ann, Protected) or ann.head_axis is not None or ctx.rank(tensor) != 3 or ann.axis != 2:
        return None
    size = ctx.axis_size(ann)
    if heads <= 0 or size % heads:
        return None
    refs = ctx.spaces.refine(ann.refs, [size // heads * (k + 1) for k in range(heads)])
    return refs if len(refs) == heads else None


def bnsh_heads(ctx: AnalysisContext, tensor: gs.Tensor | None) -> tuple[Ref, ...] | None:
    """The per-head blocks of a ``[B, N, S, D]`` headed tensor (None when it is not one)."""
    ann = ctx.get(tensor)
    if isinstance(ann, Protected) and ctx.rank(tensor) == 4 and ann.head_axis == 1 and ann.axis == 3 \
            and not ann.head_tiled:
        return tuple(ann.refs)
    return None


class _HeadedAttention(OpRule):
    """What GroupQueryAttention and MultiHeadAttention share: duals, caches, outputs."""

    domain = "com.microsoft"
    past_inputs: tuple[int, int] = (0, 0)
    """Indices of the past key and past value inputs."""
    clear_inputs: tuple[int, ...] = ()
    """Inputs that must be clear (masks, lengths, positions, attention biases)."""

    def link_queries(self, node: gs.Node, ctx: AnalysisContext, q: tuple[Ref, ...] | None,
                     k: tuple[Ref, ...] | None) -> bool:
        """Pair query heads with the dual of the key head each reads; False when only one side is protected."""
        if (q is None) != (k is None):
            return False
        if q and k:
            if len(q) % len(k):
                return False
            group = len(q) // len(k)
            limit = ctx.limit(node, "per-head dual Q/K bases (scores stay clear)")
            for h, ref in enumerate(q):
                ctx.spaces.union(ref, k[h // group].flipped(), limit)
        return True

    def link_caches(self, node: gs.Node, ctx: AnalysisContext, k: tuple[Ref, ...] | None,
                    v: tuple[Ref, ...] | None) -> None:
        """Past key/value share the new keys'/values' per-head bases; present outputs carry them."""
        for index, refs in zip(self.past_inputs, (k, v)):
            past = _input(node, index)
            if past is None:
                continue
            ann = ctx.get(past)
            if refs and isinstance(ann, Protected):
                ctx.unify(ann, Protected(3, refs, head_axis=1), node, "cache and new keys/values share a basis")
            elif ann is not None or refs:
                ctx.clear(ann, node, "cache and new keys/values must both be protected")
        for index, refs in ((1, k), (2, v)):
            out = _output(node, index)
            if out is not None:
                ctx.set(out, Protected(3, refs, head_axis=1) if refs else None)
        qk = _output(node, 3)
        if qk is not None:
            ctx.set(qk, None)

    def set_output(self, node: gs.Node, ctx: AnalysisContext, heads: int, v: tuple[Ref, ...] | None) -> None:
        """The attention output ``[B, S, heads·D]``: query head ``h`` in the basis of the value head it reads."""
        if not v or heads % len(v):
            ctx.set(node.outputs[0], None)
            return
        group = heads // len(v)
        ctx.set(node.outputs[0], Protected(2, tuple(v[h // group] for h in range(heads))))

    def clear_side_inputs(self, node: gs.Node, ctx: AnalysisContext) -> None:
        """Masks, sequence lengths, positions and additive biases are read in clear."""
        for index in self.clear_inputs:
            tensor = _input(node, index)
            if tensor is not None and ctx.get(tensor) is not None:
                ctx.clear(ctx.get(tensor), node, "attention masks, lengths and positions are read in clear")

    def bind_past(self, node: gs.Node, index: int, ctx: AnalysisContext,
                  kv: tuple[tuple[Ref, ...] | None, tuple[Ref, ...] | None]) -> Annotation:
        """A past key/value graph input takes the per-head bases of the new keys/values."""
        for which, past_index in enumerate(self.past_inputs):
            if index == past_index and kv[which]:
                return Protected(3, kv[which], head_axis=1)
        return None


class GroupQueryAttentionRule(_HeadedAttention):
    """com.microsoft GroupQueryAttention: ``(query, key, value, past_key, past_value, seqlens_k,
    total_sequence_length, cos_cache, sin_cache, position_ids, attention_bias, head_sink)``.

    With ``key``/``value`` omitted the query is packed QKV: ``num_heads`` query blocks, then
    ``kv_num_heads`` key and ``kv_num_heads`` value blocks. Query head ``h`` reads KV head
    ``h // (num_heads / kv_num_heads)``.
    """

    op_types = ("GroupQueryAttention",)
    past_inputs = (3, 4)
    clear_inputs = (5, 6, 9, 10, 11)

    def _qkv(self, node: gs.Node, ctx: AnalysisContext):
        heads, kv_heads = int(node.attrs["num_heads"]), int(node.attrs.get("kv_num_heads", node.attrs["num_heads"]))
        if _input(node, 1) is None and _input(node, 2) is None:
            packed = flat_heads(ctx, node.inputs[0], heads + 2 * kv_heads)
            if packed is None:
                return heads, None, None, None, ctx.get(node.inputs[0]) is not None
            return heads, packed[:heads], packed[heads:heads + kv_heads], packed[heads + kv_heads:], False
        q = flat_heads(ctx, node.inputs[0], heads)
        k = flat_heads(ctx, _input(node, 1), kv_heads)
        v = flat_heads(ctx, _input(node, 2), kv_heads)
        unrecognised = any(ctx.get(t) is not None and refs is None
                           for t, refs in ((node.inputs[0], q), (_input(node, 1), k), (_input(node, 2), v)))
        return heads, q, k, v, unrecognised

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        if index in self.past_inputs:
            _, _, k, v, _ = self._qkv(node, ctx)
            return self.bind_past(node, index, ctx, (k, v))
        return None

    def _rotary(self, node: gs.Node, ctx: AnalysisContext, q, k) -> bool:
        """Restrict Q/K heads to one complex scalar per rotated pair; False when the rotary is not followed."""
        if not int(node.attrs.get("do_rotary", 0)) or not q:
            return True
        cos = ctx.shape(_input(node, 7)) if _input(node, 7) is not None else None
        head_dim = ctx.spaces.size(q[0])
        if not cos or len(cos) != 2 or cos[1] != head_dim // 2:
            return False  # partial rotary (rotary_dim < head size) or unknown cache shape
        layout = BasisClass.COMPLEX_INTERLEAVED if int(node.attrs.get("rotary_interleaved", 0)) \
            else BasisClass.COMPLEX_HALF
        limit = ctx.limit(node, "rotary embedding commutes only with a complex scalar per frequency pair")
        for ref in (*q, *k):
            ctx.spaces.restrict(ref, layout, limit)
        return True

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        heads, q, k, v, unrecognised = self._qkv(node, ctx)
        self.clear_side_inputs(node, ctx)
        for index in (7, 8):  # the cos/sin caches are constants and stay as they are
            if _input(node, index) is not None and ctx.get(node.inputs[index]) is not None:
                ctx.clear(ctx.get(node.inputs[index]), node, "rotary cos/sin caches must be clear")
        if unrecognised:
            ctx.clear_all(node, "GroupQueryAttention input with an unrecognised head layout")
            return
        if not self._rotary(node, ctx, q, k):
            for refs in (q, k):
                for ref in refs or ():
                    ctx.spaces.clear(ref, ctx.limit(node, "partial rotary inside GroupQueryAttention"))
        if not self.link_queries(node, ctx, q, k):
            ctx.clear_all(node, "queries and keys must both be protected")
            return
        self.link_caches(node, ctx, k, v)
        self.set_output(node, ctx, heads, v)


class MultiHeadAttentionRule(_HeadedAttention):
    """com.microsoft MultiHeadAttention: ``(query, key, value, bias, key_padding_mask, attention_bias,
    past_key, past_value, past_sequence_length, cache_indirection)``.

    Followed: 3-D query/key/value ``[B, S, N·D]`` and 4-D BNSH key/value (cross attention on a
    precomputed cache), with an optional constant ``bias`` ``[3·N·D]`` (folded segment by segment).
    Packed QKV (``[B, S, N, 3, D]``) and packed KV are cleared.
    """

    op_types = ("MultiHeadAttention",)
    past_inputs = (6, 7)
    clear_inputs = (4, 5, 8, 9)

    def _qkv(self, node: gs.Node, ctx: AnalysisContext):
        heads = int(node.attrs["num_heads"])
        q = flat_heads(ctx, node.inputs[0], heads)
        kv = []
        for index in (1, 2):
            tensor = _input(node, index)
            kv.append(bnsh_heads(ctx, tensor) if tensor is not None and ctx.rank(tensor) == 4
                      else flat_heads(ctx, tensor, heads))
        unrecognised = any(ctx.get(t) is not None and refs is None
                           for t, refs in ((node.inputs[0], q), (_input(node, 1), kv[0]), (_input(node, 2), kv[1]))
                           if t is not None)
        return heads, q, kv[0], kv[1], unrecognised

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        if index in self.past_inputs:
            _, _, k, v, _ = self._qkv(node, ctx)
            return self.bind_past(node, index, ctx, (k, v))
        return None

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        heads, q, k, v, unrecognised = self._qkv(node, ctx)
        self.clear_side_inputs(node, ctx)
        if _input(node, 1) is None or _input(node, 2) is None:
            ctx.clear_all(node, "packed QKV/KV MultiHeadAttention is not followed")
            return
        if unrecognised:
            ctx.clear_all(node, "MultiHeadAttention input with an unrecognised head layout")
            return
        bias = _input(node, 3)
        if bias is not None and (ctx.const(bias) is None or ctx.rank(_input(node, 1)) != 3):
            ctx.clear_all(node, "a MultiHeadAttention bias that is not a constant over 3-D inputs")
            return
        if not self.link_queries(node, ctx, q, k):
            ctx.clear_all(node, "queries and keys must both be protected")
            return
        self.link_caches(node, ctx, k, v)
        self.set_output(node, ctx, heads, v)

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        bias = _input(node, 3)
        if bias is None:
            return
        value = ctx.const(bias)
        third = value.shape[-1] // 3
        parts = []
        for i, index in enumerate((0, 1, 2)):
            segment = np.asarray(value[..., i * third:(i + 1) * third], dtype=np.float64)
            ann = ctx.get(node.inputs[index])
            parts.append(ctx.axis_basis(ann).right(segment, -1) if isinstance(ann, Protected) else segment)
        ctx.set_const(node, 3, np.concatenate(parts, axis=-1))


register(GroupQueryAttentionRule())
register(MultiHeadAttentionRule())
