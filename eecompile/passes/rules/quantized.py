"""Block-quantised weights: com.microsoft MatMulNBits, folded exactly (the quantisation grid is kept).

``MatMulNBits(A, B, scales[, zero_points][, g_idx][, bias])`` computes ``A @ W (+ bias)`` with the logical
weight ``W[k, n] = (q[n, k] - zero_point[n, k // block_size]) * scales[n, k // block_size]``: ``B`` packs
the ``bits``-wide integers ``q`` of each column ``n`` along K, ``block_size`` values per blob, low bits
first; ``zero_points`` is packed the same way (uint8) or unpacked (float), default ``2^(bits-1)``.

A dense basis change cannot be folded into such a weight without re-quantising it, which changes the
function. What stays exact:

* output axis N: each column is quantised on its own, so any permutation of the columns is exact, and a
  nonzero scale per column folds into that column's block scales (float32 scales: rounding only; other
  scale types: permutations only) — a monomial basis; ``bias`` follows as ``b' = b·T``.
* input axis K: ``W' = T⁻¹·W`` moves rows of ``W``. A permutation inside one quantisation block keeps each
  block's values, scale and zero point (only their order within the blob changes), and keeps the int8
  quantisation of ``A`` that ``accuracy_level=4`` applies per block of the same size; a permutation across
  blocks, a sign (``-(-8)`` leaves the 4-bit grid) or a scale do not. The input space is split at the block
  boundaries and each block restricted to a permutation.

``accuracy_level=4`` quantises ``A`` to int8 per block at run time, which makes the op discontinuous in
``A``: a rounding-level difference of the (folded, so not bit-identical) input that crosses an int8 step
moves the output by about one step (measured on the op itself: ±1e-6 at a rounding midpoint changes the
output by ~1e-2). The compiled model then matches the original to float rounding except at such rare
crossings; the report says so.

``g_idx`` (act-order, deprecated) and prepacked weights (``weight_prepacked``) are not folded: the node
clears what it touches.

With ``CompileOptions.requantize`` (``eecompile compile --requantize``) the node is treated like a MatMul:
both axes may take dense bases; at fold time the weight is dequantised in float64, the bases are folded
and the result is quantised again with the same bits, block size and symmetry, by ONNX Runtime's own
block quantiser (the one the model builder uses). That changes the function by the quantisation error;
compile measures the change against the original quantised model and the report records it.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Annotation, Protected
from eecompile.passes.basis import AxisBasis
from eecompile.passes.context import AnalysisContext, FoldContext
from eecompile.passes.rules import register
from eecompile.passes.rules.base import OpRule
from eecompile.passes.spaces import BasisClass

MS_DOMAIN = "com.microsoft"


def unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """The ``count`` unsigned ``bits``-wide integers packed along the last axis of a uint8 array, low bits first."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).astype(np.uint8)
    values = (packed[..., :, None] >> shifts) & np.uint8((1 << bits) - 1)
    return values.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)[..., :count]


def pack(values: np.ndarray, bits: int, nbytes: int) -> np.ndarray:
    """Inverse of :func:`unpack`: ``values`` (last axis) into ``nbytes`` bytes each, zero-padded."""
    per_byte = 8 // bits
    padded = np.zeros((*values.shape[:-1], nbytes * per_byte), np.uint8)
    padded[..., :values.shape[-1]] = values
    grouped = padded.reshape(*values.shape[:-1], nbytes, per_byte).astype(np.uint16)
    shifts = np.arange(per_byte, dtype=np.uint16) * bits
    return (grouped << shifts).sum(axis=-1).astype(np.uint8)


class MatMulNBitsRule(OpRule):
    """com.microsoft MatMulNBits: permutations within quantisation blocks on K, monomial bases on N."""

    op_types = ("MatMulNBits",)
    domain = MS_DOMAIN

    @staticmethod
    def _params(node: gs.Node, ctx) -> tuple[int, int, int, int] | None:
        """(K, N, bits, block_size) when the node can be folded exactly, else None."""
        attrs = node.attrs
        k, n, bits, block = (int(attrs.get(a, d)) for a, d in (("K", 0), ("N", 0), ("bits", 4), ("block_size", 0)))
        if attrs.get("weight_prepacked", 0) or bits not in (2, 4, 8) or k <= 0 or n <= 0 or block <= 0:
            return None
        if len(node.inputs) > 4 and node.inputs[4].name:
            return None  # g_idx: rows reordered across blocks
        blocks = -(-k // block)
        if ctx.const_shape(node.inputs[1]) != (n, blocks, block * bits // 8):
            return None
        scales = ctx.const_shape(node.inputs[2])
        if scales is None or int(np.prod(scales)) != n * blocks:
            return None
        for index in (3, 5):  # zero points, bias: constants or absent
            if len(node.inputs) > index and node.inputs[index].name and ctx.const_shape(node.inputs[index]) is None:
                return None
        return k, n, bits, block

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        params = self._params(node, ctx)
        rank = ctx.rank(node.inputs[0])
        if index == 0 and params is not None and rank:
            return ctx.fresh(node, node.inputs[0], rank - 1, params[0])
        return None

    def analyze(self, node: gs.Node, ctx: AnalysisContext) -> None:
        params = self._params(node, ctx)
        a_t, y_t = node.inputs[0], node.outputs[0]
        a = ctx.get(a_t)
        ra, ry = ctx.rank(a_t), ctx.rank(y_t)
        if params is None or ra is None or ry is None:
            ctx.clear_all(node, "MatMulNBits with act-order g_idx, prepacked or non-constant weights, or unknown "
                                "ranks: not folded")
            return
        k, n, bits, block = params
        if ctx.mg.options.requantize:
            if a is not None and not (isinstance(a, Protected) and a.head_axis is None and a.axis == ra - 1
                                      and ctx.axis_size(a) == k):
                ctx.clear(a, node, "protected axis is not MatMulNBits' contracted axis")
            ctx.set(y_t, ctx.fresh(node, y_t, ry - 1, n))
            return
        if a is not None:
            if isinstance(a, Protected) and a.head_axis is None and a.axis == ra - 1 and ctx.axis_size(a) == k:
                cuts = list(range(block, k, block)) + [k]
                reason = (f"{bits}-bit weights quantised in blocks of {block} along K: only a permutation within "
                          "each block keeps the quantisation grid exact (no re-quantisation)")
                for ref in ctx.spaces.refine(a.refs, cuts):
                    ctx.spaces.restrict(ref, BasisClass.PERMUTATION, ctx.limit(node, reason))
            else:
                ctx.clear(a, node, "protected axis is not MatMulNBits' contracted axis")
        out = ctx.fresh(node, y_t, ry - 1, n)
        scales = node.inputs[2]
        if scales.dtype is not None and np.dtype(scales.dtype) == np.float32:
            ctx.restrict(out, BasisClass.MONOMIAL, node, f"{bits}-bit quantised columns: a permutation of the "
                         "columns and a scale per column (folded into its block scales) keep the weight exact")
        else:
            ctx.restrict(out, BasisClass.PERMUTATION, node, f"{bits}-bit quantised columns with non-float32 scales: "
                         "only a permutation of the columns keeps the weight exact")
        ctx.set(y_t, out)

    def fold(self, node: gs.Node, ctx: FoldContext) -> None:
        params = self._params(node, ctx)
        a, y = ctx.get(node.inputs[0]), ctx.get(node.outputs[0])
        if params is None:
            return
        k, n, bits, block = params
        blocks = -(-k // block)
        ra = ctx.mg.rank(node.inputs[0])
        fold_in = isinstance(a, Protected) and a.head_axis is None and a.axis == ra - 1
        fold_out = isinstance(y, Protected) and y.head_axis is None
        if ctx.mg.options.requantize:
            if fold_in or fold_out or node.name in ctx.mg.row_gains:
                _fold_requantized(node, ctx, params, a if fold_in else None, y if fold_out else None)
            return
        rows = _index_map(ctx.axis_basis(a).dual(), block) if fold_in else None
        cols, col_scale = monomial_map(ctx.axis_basis(y)) if fold_out else (None, None)
        if (rows is None or np.array_equal(rows, np.arange(k))) and cols is None:
            return
        raw = ctx.const(node.inputs[1])
        q = unpack(raw.reshape(n, blocks * raw.shape[2]), bits, blocks * block)
        if rows is not None:
            q[:, :k] = q[:, rows]
        scales = ctx.const(node.inputs[2])
        zp_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        bias_t = node.inputs[5] if len(node.inputs) > 5 and node.inputs[5].name else None
        if cols is not None:
            q = q[cols]
            shaped = scales.reshape(n, blocks).astype(np.float64)[cols] * col_scale[:, None]
            ctx.set_const(node, 2, shaped.reshape(scales.shape))
            if zp_t is not None:
                zp = ctx.const(zp_t)
                ctx.set_const(node, 3, zp.reshape(n, -1)[cols].reshape(zp.shape))
            if bias_t is not None:
                bias = ctx.const(bias_t)
                ctx.set_const(node, 5, (bias.astype(np.float64)[cols] * col_scale).reshape(bias.shape))
        packed = pack(q.reshape(n, blocks, block), bits, raw.shape[2])
        ctx.set_const(node, 1, packed.reshape(raw.shape))


def dequantize(node: gs.Node, ctx: FoldContext, params: tuple[int, int, int, int]) -> np.ndarray:
    """The logical ``K × N`` float64 weight of a MatMulNBits node."""
    k, n, bits, block = params
    blocks = -(-k // block)
    raw = ctx.const(node.inputs[1])
    q = unpack(raw.reshape(n, blocks * raw.shape[2]), bits, blocks * block).reshape(n, blocks, block)
    scales = ctx.const(node.inputs[2]).astype(np.float64).reshape(n, blocks)
    zp_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    if zp_t is None:
        zero = np.full((n, blocks), 2 ** (bits - 1), np.float64)
    else:
        zp = ctx.const(zp_t)
        zero = (zp.astype(np.float64).reshape(n, blocks) if zp.dtype != np.uint8 else
                unpack(zp.reshape(n, -1), bits, blocks).astype(np.float64))
    w = (q.astype(np.float64) - zero[:, :, None]) * scales[:, :, None]
    return w.reshape(n, blocks * block)[:, :k].T


def requantize(w: np.ndarray, bits: int, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(packed, scales, zero_points)`` of a ``K × N`` weight, by ONNX Runtime's block quantiser (RTN)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits)
    return DefaultWeightOnlyQuantizer(config).qbits_block_quant(np.ascontiguousarray(w, dtype=np.float32))


def _fold_requantized(node: gs.Node, ctx: FoldContext, params: tuple[int, int, int, int],
                      a: Protected | None, y: Protected | None) -> None:
    """Dequantise, fold the (dense) bases as a MatMul does, quantise again on the same grid shape."""
    k, n, bits, block = params
    w = dequantize(node, ctx, params)
    gain = ctx.mg.row_gains.get(node.name)
    if gain is not None:  # a norm's gain normalize folded into these rows
        w = w * gain[:, None]
    if a is not None:
        w = ctx.axis_basis(a).dual().right(w, 0)
    if y is not None:
        w = ctx.axis_basis(y).right(w, 1)
    zp_t = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
    packed, scales, zero = requantize(w, bits, block, symmetric=zp_t is None)
    ctx.set_const(node, 1, packed.reshape(ctx.const_shape(node.inputs[1])))
    ctx.set_const(node, 2, scales.reshape(ctx.const_shape(node.inputs[2])))
    if zp_t is not None:
        zp = ctx.const(zp_t)
        if zp.dtype == np.uint8:
            ctx.set_const(node, 3, zero.reshape(zp.shape))
        else:  # float zero points: the quantiser's integer ones, unpacked
            ctx.set_const(node, 3, unpack(zero, bits, zp.reshape(n, -1).shape[1]).reshape(zp.shape))
    bias_t = node.inputs[5] if len(node.inputs) > 5 and node.inputs[5].name else None
    if bias_t is not None and y is not None:
        ctx.set_const(node, 5, ctx.axis_basis(y).right(ctx.const(bias_t).astype(np.float64), 0))


def _index_map(basis: AxisBasis, block: int) -> np.ndarray:
    """Global row order of a permutation basis whose blocks each lie inside one quantisation block."""
    out, offset = [], 0
    for b in basis.blocks:
        if b.dense is not None or b.scale is not None:
            raise AssertionError("MatMulNBits input basis is not a permutation")
        if b.size and offset // block != (offset + b.size - 1) // block:
            raise AssertionError("MatMulNBits input basis crosses a quantisation block")
        out.append(b.index_map() + offset)
        offset += b.size
    return np.concatenate(out)


def monomial_map(basis: AxisBasis) -> tuple[np.ndarray, np.ndarray]:
    """(source index, scale) of a monomial basis: ``(w @ T)[..., j] = w[..., perm[j]] * scale[j]``."""
    perms, scales, offset = [], [], 0
    for b in basis.blocks:
        if b.dense is not None:
            raise AssertionError("a quantised weight's basis is not monomial")
        perms.append(b.index_map() + offset)
        scales.append(b.scale if b.scale is not None else np.ones(b.size))
        offset += b.size
    return np.concatenate(perms), np.concatenate(scales)


def quantized_weight_policies(mg, ctx) -> list[str]:
    """Report lines: which option each quantised weight got (MatMulNBits and QDQ weights: kept on the grid,
    re-quantised, or left clear)."""
    from eecompile.passes.rules.qdq import qdq_weight_policies

    lines = qdq_weight_policies(mg, ctx)
    nodes = [n for n in mg.nodes if n.op == "MatMulNBits" and (n.domain or "") == MS_DOMAIN]
    if not nodes:
        return lines
    kept = [n.name for n in nodes if MatMulNBitsRule._params(n, ctx) is not None]
    if kept and mg.options.requantize:
        lines.append(f"quantised weights re-quantised (--requantize: dense bases, not exact) in {len(kept)} "
                     "MatMulNBits node(s): dequantised, folded, quantised again with the same bits and block size "
                     f"by ONNX Runtime's block quantiser ({_names(kept)}); the accuracy change is measured below")
    elif kept:
        lines.append(f"quantised weights kept on their grid (exact, no re-quantisation) in {len(kept)} MatMulNBits "
                     "node(s): output columns permuted and scaled into the block scales, input rows permuted only "
                     f"within a quantisation block ({_names(kept)})")
        int8 = [n for n in nodes if n.name in set(kept) and int(n.attrs.get("accuracy_level", 0)) == 4]
        if int8:
            lines.append(f"{len(int8)} MatMulNBits node(s) quantise their activations to int8 (accuracy_level 4): "
                         "the compiled model matches to float rounding except where a rounding difference crosses "
                         "an int8 step, which moves that output by about one step (rare; the original model is "
                         "as sensitive to its own input)")
    left = [n.name for n in nodes if n.name not in set(kept)]
    if left:
        lines.append(f"quantised weights not folded (act-order g_idx or prepacked) in {len(left)} MatMulNBits "
                     f"node(s), their spaces clear: {_names(left)}")
    return lines


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


register(MatMulNBitsRule())
