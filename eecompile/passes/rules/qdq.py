"""QDQ weights: ``DequantizeLinear(q, scale[, zero_point]) → MatMul(X, ·)`` with constant ``q``, scale, zero point.

The logical weight is ``W[k, n] = (q[k, n] - zp[k, n]) · s[k, n]`` where scale and zero point are one value
(per tensor), one per index of ``axis`` (per channel) or, with ``block_size``, one per block of ``axis``
and per index of the other axis. What stays exact without re-quantising, per axis of ``W``:

* a permutation of an axis along which the parameters are constant or per index moves rows/columns of
  ``q`` and the parameters alike; along a blocked axis, a permutation inside each block;
* a scale per index of the axis whose parameters are per index (unblocked) multiplies into the scales —
  a monomial basis (signs included).

The input axis K takes the dual of the activation's basis, the output axis N the fresh output space.
With ``CompileOptions.requantize`` both take dense bases: the weight is dequantised in float64, folded,
and quantised again with the same granularity and symmetry by ONNX Runtime's quantisation utilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes.annotations import Annotation, Protected
from eecompile.passes.context import AnalysisContext, FoldContext
from eecompile.passes.rules import register_pattern
from eecompile.passes.rules.base import Pattern, PatternInstance
from eecompile.passes.rules.quantized import monomial_map
from eecompile.passes.spaces import BasisClass

CONST, PER_INDEX, BLOCKED = "constant", "per index", "blocked"


@dataclass(frozen=True)
class Granularity:
    """How scale and zero point vary along each axis of a ``K × N`` weight."""

    k: str
    n: str
    block: int = 0

    def along(self, axis: int) -> str:
        """The kind of variation along weight axis 0 (K) or 1 (N)."""
        return self.k if axis == 0 else self.n


def granularity(node: gs.Node, weight_shape: tuple[int, int], scale_shape: tuple[int, ...]) -> Granularity | None:
    """The granularity of a DequantizeLinear of a 2-D weight, None when it is not one eecompile follows."""
    k, n = weight_shape
    size = int(np.prod(scale_shape)) if scale_shape else 1
    block = int(node.attrs.get("block_size", 0) or 0)
    if size == 1:
        return Granularity(CONST, CONST)
    axis = int(node.attrs.get("axis", 1)) % 2
    if block:
        other = n if axis == 0 else k
        if tuple(scale_shape) != ((-(-k // block), n) if axis == 0 else (k, -(-n // block))) or other <= 0:
            return None
        return Granularity(BLOCKED, PER_INDEX, block) if axis == 0 else Granularity(PER_INDEX, BLOCKED, block)
    if tuple(scale_shape) != ((k,) if axis == 0 else (n,)):
        return None
    return Granularity(PER_INDEX, CONST) if axis == 0 else Granularity(CONST, PER_INDEX)


def _restrict_axis(ctx: AnalysisContext, refs, size: int, kind: str, block: int, node: gs.Node) -> None:
    if kind == PER_INDEX:
        cls, reason = BasisClass.MONOMIAL, "quantised weight with a scale per index: a permutation and a scale " \
                                           "per index (folded into the scales) keep it exact"
        for ref in refs:
            ctx.spaces.restrict(ref, cls, ctx.limit(node, reason))
        return
    if kind == BLOCKED:
        refs = ctx.spaces.refine(refs, list(range(block, size, block)) + [size])
        reason = f"quantised weight in blocks of {block}: only a permutation within each block keeps the " \
                 "quantisation grid exact (no re-quantisation)"
    else:
        reason = "quantised weight with one scale: only a permutation keeps the quantisation grid exact"
    for ref in refs:
        ctx.spaces.restrict(ref, BasisClass.PERMUTATION, ctx.limit(node, reason))


class _DequantizedMatMul(PatternInstance):
    def __init__(self, dq: gs.Node, matmul: gs.Node, gran: Granularity, shape: tuple[int, int]) -> None:
        super().__init__([dq, matmul], matmul)
        self.dq, self.matmul, self.gran, self.shape = dq, matmul, gran, shape

    def bind_input(self, node: gs.Node, index: int, ctx: AnalysisContext) -> Annotation:
        rank = ctx.rank(node.inputs[0])
        if node is self.matmul and index == 0 and rank:
            return ctx.fresh(node, node.inputs[0], rank - 1, self.shape[0])
        return None

    def analyze(self, ctx: AnalysisContext) -> None:
        node = self.matmul
        a_t, y_t = node.inputs[0], node.outputs[0]
        a, ra, ry = ctx.get(a_t), ctx.rank(a_t), ctx.rank(y_t)
        if ra is None or ry is None:
            ctx.clear_all(node, "unknown ranks", [a_t])
            ctx.set(y_t, None)
            return
        requantize = ctx.mg.options.requantize
        out = None
        if isinstance(a, Protected) and a.head_axis is None and a.axis == ra - 1:
            if not requantize:
                _restrict_axis(ctx, a.refs, self.shape[0], self.gran.k, self.gran.block, node)
        elif isinstance(a, Protected) and a.axis == ra - 2 and ra >= 2:
            out = a.shifted(ry - ra)
        elif a is not None:
            ctx.clear(a, node, "protected axis is not the contracted or row axis")
        if out is None:
            out = ctx.fresh(node, y_t, ry - 1, self.shape[1])
            if not requantize:
                _restrict_axis(ctx, out.refs, self.shape[1], self.gran.n, self.gran.block, node)
        ctx.set(y_t, out)

    def fold(self, ctx: FoldContext) -> None:
        node = self.matmul
        a, y = ctx.get(node.inputs[0]), ctx.get(node.outputs[0])
        ra, ry = ctx.mg.rank(node.inputs[0]), ctx.mg.rank(node.outputs[0])
        if ra is None or ry is None:
            return
        fold_in = isinstance(a, Protected) and a.head_axis is None and a.axis == ra - 1
        fold_out = isinstance(y, Protected) and y.head_axis is None and y.axis == ry - 1
        if not (fold_in or fold_out or self.matmul.name in ctx.mg.row_gains):
            return
        if ctx.mg.options.requantize:
            self._fold_requantized(ctx, a if fold_in else None, y if fold_out else None)
        else:
            self._fold_on_grid(ctx, a if fold_in else None, y if fold_out else None)

    def _params(self, ctx: FoldContext) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """``q`` (K × N) and the scale and zero point expanded to K × N."""
        q = ctx.const(self.dq.inputs[0])
        scale = _expand(ctx.const(self.dq.inputs[1]), self.gran, self.shape)
        zp_t = self.dq.inputs[2] if len(self.dq.inputs) > 2 and self.dq.inputs[2].name else None
        zero = None if zp_t is None else _expand(ctx.const(zp_t), self.gran, self.shape)
        return q, scale, zero

    def _fold_on_grid(self, ctx: FoldContext, a: Protected | None, y: Protected | None) -> None:
        q, scale, zero = self._params(ctx)
        k, n = self.shape
        rows, row_scale = monomial_map(ctx.axis_basis(a).dual()) if a is not None else (np.arange(k), np.ones(k))
        cols, col_scale = monomial_map(ctx.axis_basis(y)) if y is not None else (np.arange(n), np.ones(n))
        q = q[rows][:, cols]
        scale = scale.astype(np.float64)[rows][:, cols] * row_scale[:, None] * col_scale[None, :]
        self._store(ctx, q, scale, None if zero is None else zero[rows][:, cols])

    def _fold_requantized(self, ctx: FoldContext, a: Protected | None, y: Protected | None) -> None:
        from onnxruntime.quantization.quant_utils import compute_scale_zp, get_qmin_qmax_for_qType, quantize_nparray

        q, scale, zero = self._params(ctx)
        w = (q.astype(np.float64) - (0 if zero is None else zero)) * scale
        gain = ctx.mg.row_gains.get(self.matmul.name)
        if gain is not None:  # a norm's gain normalize folded into these rows
            w = w * gain[:, None]
        if a is not None:
            w = ctx.axis_basis(a).dual().right(w, 0)
        if y is not None:
            w = ctx.axis_basis(y).right(w, 1)
        qtype = _onnx_type(q.dtype)
        symmetric = zero is None or not np.any(zero)
        qmin, qmax = get_qmin_qmax_for_qType(qtype, symmetric=symmetric)
        new_scale, new_zero = np.empty_like(w), np.empty(w.shape, q.dtype)
        for group in _groups(self.gran, self.shape):  # one scale/zero point per granule, as in the original
            part = w[group]
            z, s = compute_scale_zp(np.array(min(part.min(), 0.0), np.float32), np.array(max(part.max(), 0.0),
                                    np.float32), qmin, qmax, symmetric=symmetric)
            new_scale[group], new_zero[group] = float(s), np.asarray(z).astype(q.dtype)
        new_q = np.empty_like(q)
        for group in _groups(self.gran, self.shape):
            new_q[group] = quantize_nparray(qtype, w[group].astype(np.float32), np.float32(new_scale[group].flat[0]),
                                            new_zero[group].flat[0])
        self._store(ctx, new_q, new_scale, None if zero is None else new_zero)

    def _store(self, ctx: FoldContext, q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> None:
        ctx.set_const(self.dq, 0, q)
        scale_shape = ctx.const_shape(self.dq.inputs[1])
        ctx.set_const(self.dq, 1, _compress(scale, self.gran, self.shape).reshape(scale_shape))
        if zero is not None:
            ctx.set_const(self.dq, 2, _compress(zero, self.gran, self.shape).reshape(ctx.const_shape(self.dq.inputs[2])))


def _onnx_type(dtype: np.dtype) -> int:
    from onnx import TensorProto

    return {np.dtype(np.int8): TensorProto.INT8, np.dtype(np.uint8): TensorProto.UINT8,
            np.dtype(np.int16): TensorProto.INT16, np.dtype(np.uint16): TensorProto.UINT16}[np.dtype(dtype)]


def _expand(values: np.ndarray, gran: Granularity, shape: tuple[int, int]) -> np.ndarray:
    """Scale or zero point broadcast to the ``K × N`` weight."""
    k, n = shape
    values = np.asarray(values)
    if values.size == 1:
        return np.broadcast_to(values.reshape(1, 1), shape).copy()
    if gran.k == BLOCKED:
        return np.repeat(values.reshape(-1, n), gran.block, axis=0)[:k]
    if gran.n == BLOCKED:
        return np.repeat(values.reshape(k, -1), gran.block, axis=1)[:, :n]
    return np.broadcast_to(values.reshape(k, 1) if gran.k == PER_INDEX else values.reshape(1, n), shape).copy()


def _compress(full: np.ndarray, gran: Granularity, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`_expand`: one value per granule (the planned bases keep granules uniform)."""
    if gran.k == CONST and gran.n == CONST:
        return full[:1, :1]
    if gran.k == BLOCKED:
        return full[::gran.block]
    if gran.n == BLOCKED:
        return full[:, ::gran.block]
    return full[:, :1] if gran.k == PER_INDEX else full[:1, :]


def _groups(gran: Granularity, shape: tuple[int, int]) -> list[tuple[slice, slice]]:
    """The index ranges sharing one scale and zero point."""
    k, n = shape
    if gran.k == CONST and gran.n == CONST:
        return [(slice(None), slice(None))]
    if gran.k == BLOCKED:
        return [(slice(b, b + gran.block), slice(j, j + 1)) for b in range(0, k, gran.block) for j in range(n)]
    if gran.n == BLOCKED:
        return [(slice(i, i + 1), slice(b, b + gran.block)) for i in range(k) for b in range(0, n, gran.block)]
    return [(slice(i, i + 1), slice(None)) for i in range(k)] if gran.k == PER_INDEX else \
        [(slice(None), slice(j, j + 1)) for j in range(n)]


def qdq_weight_policies(mg, ctx: AnalysisContext) -> list[str]:
    """Report lines for the QDQ weights this rule folds, and how (kept on the grid or re-quantised)."""
    names = [inst.dq.name for inst in DequantizedWeightPattern().match(mg.nodes, ctx)]
    if not names:
        return []
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    if mg.options.requantize:
        return [f"QDQ weights re-quantised (--requantize: dense bases, not exact) in {len(names)} DequantizeLinear "
                f"node(s), with their granularity and symmetry ({shown})"]
    return [f"QDQ weights kept on their grid (exact, no re-quantisation) in {len(names)} DequantizeLinear node(s): "
            f"rows and columns permuted with their scales, scaled where the scale is per index ({shown})"]


class DequantizedWeightPattern(Pattern):
    """A constant DequantizeLinear feeding exactly one MatMul as its 2-D weight."""

    name = "dequantized_weight"

    def match(self, nodes: list[gs.Node], ctx: AnalysisContext) -> list[PatternInstance]:
        found = []
        for dq in nodes:
            if dq.op != "DequantizeLinear" or (dq.domain or "") not in ("", "ai.onnx"):
                continue
            if not all(isinstance(t, gs.Constant) for t in dq.inputs if t.name):
                continue
            out = dq.outputs[0]
            if len(out.outputs) != 1 or out in ctx.mg.graph.outputs:
                continue
            mm = out.outputs[0]
            if mm.op != "MatMul" or len(mm.inputs) < 2 or mm.inputs[1] is not out or mm.inputs[0] is out:
                continue
            shape = ctx.mg.const_shape(dq.inputs[0])
            if shape is None or len(shape) != 2:
                continue
            gran = granularity(dq, (int(shape[0]), int(shape[1])), ctx.mg.const_shape(dq.inputs[1]) or ())
            if gran is None or np.dtype(dq.inputs[0].dtype) not in (np.dtype(np.int8), np.dtype(np.uint8)):
                continue
            found.append(_DequantizedMatMul(dq, mm, gran, (int(shape[0]), int(shape[1]))))
        return found


register_pattern(DequantizedWeightPattern())
