"""Strided views: a flattened tensor gathered back at its own row-major offsets.

``torch.Tensor.as_strided`` with the tensor's own contiguous strides (Swin's pooler after
``AdaptiveAvgPool1d``, exported by dynamo) becomes

    flat = Reshape(x, [-1])
    y = Gather(flat, offsets, axis=0)      # offsets[i0, ..., ik] = sum_a i_a * stride_a

with ``offsets`` built at run time from ``Range``, ``Mul``, ``Unsqueeze`` and ``Add`` of constants.
When the offsets provably equal the row-major offsets of ``x``'s own shape, ``y`` is ``x``
element for element and keeps its protection; the flattening in between never reaches an op
that reads the feature axis.

The proof is symbolic, not sampled: the offsets are evaluated as an affine form
``sum_a c_a * i_a + K`` over the output coordinates (``K`` a constant array), and compared
with the strides axis by axis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from eecompile.passes import dims
from eecompile.passes.context import AnalysisContext
from eecompile.passes.rules import register_pattern
from eecompile.passes.rules.base import Pattern, PatternInstance

_MAX_DEPTH = 32


@dataclass(frozen=True)
class AffineIndex:
    """Integer tensor values ``sum_a coef[a] * i_a + const`` over its coordinates ``i``.

    ``const`` has the tensor's rank and broadcasts against its shape.
    """

    coef: dict[int, int]
    const: np.ndarray

    @property
    def rank(self) -> int:
        """The tensor's rank."""
        return self.const.ndim

    def scaled(self, factor: int) -> "AffineIndex":
        """The values times ``factor``."""
        return AffineIndex({a: c * factor for a, c in self.coef.items()}, self.const * factor)

    def lifted(self, rank: int) -> "AffineIndex":
        """The same values broadcast to ``rank`` (leading axes added, numpy's rule)."""
        shift = rank - self.rank
        return AffineIndex({a + shift: c for a, c in self.coef.items()},
                           self.const.reshape((1,) * shift + self.const.shape))

    def plus(self, other: "AffineIndex") -> "AffineIndex":
        """The elementwise sum (broadcast)."""
        rank = max(self.rank, other.rank)
        a, b = self.lifted(rank), other.lifted(rank)
        coef = dict(a.coef)
        for axis, c in b.coef.items():
            coef[axis] = coef.get(axis, 0) + c
        return AffineIndex({k: v for k, v in coef.items() if v}, a.const + b.const)

    def unsqueezed(self, axes: list[int]) -> "AffineIndex":
        """``Unsqueeze(axes)`` of the tensor."""
        rank = self.rank + len(axes)
        inserted = sorted(a % rank for a in axes)
        kept = [a for a in range(rank) if a not in inserted]
        return AffineIndex({kept[a]: c for a, c in self.coef.items()}, np.expand_dims(self.const, tuple(inserted)))


def affine_index(ctx: AnalysisContext, tensor: gs.Tensor, depth: int = 0) -> AffineIndex | None:
    """``tensor``'s integer values as an affine form of its coordinates, or None when not provably one."""
    value = ctx.const(tensor)
    if value is not None:
        if not np.issubdtype(value.dtype, np.integer):
            return None
        return AffineIndex({}, value.astype(np.int64))
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or depth > _MAX_DEPTH:
        return None
    ins = producer.inputs
    if producer.op in ("Identity", "Cast") and ins:
        if producer.op == "Cast" and not np.issubdtype(_dtype(tensor), np.integer):
            return None
        return affine_index(ctx, ins[0], depth + 1)
    if producer.op == "Range" and len(ins) == 3:
        start, delta = ctx.const(ins[0]), ctx.const(ins[2])
        if start is None or delta is None or start.size != 1 or delta.size != 1:
            return None
        return AffineIndex({0: int(delta.reshape(()))}, np.array([int(start.reshape(()))], np.int64))
    if producer.op in ("Add", "Sub", "Mul") and len(ins) == 2:
        left, right = (affine_index(ctx, t, depth + 1) for t in ins)
        if left is None or right is None:
            return None
        if producer.op == "Add":
            return left.plus(right)
        if producer.op == "Sub":
            return left.plus(right.scaled(-1))
        for form, scale in ((left, right), (right, left)):
            if not scale.coef and scale.const.size == 1:
                return form.scaled(int(scale.const.reshape(()))).lifted(max(form.rank, scale.rank))
        return None
    if producer.op == "Unsqueeze" and ins:
        source = affine_index(ctx, ins[0], depth + 1)
        axes = producer.attrs.get("axes")
        if axes is None and len(ins) > 1:
            const = ctx.const(ins[1])
            axes = None if const is None else [int(a) for a in const.reshape(-1)]
        return None if source is None or axes is None else source.unsqueezed(list(axes))
    return None


def _dtype(tensor: gs.Tensor) -> np.dtype:
    try:
        return np.dtype(tensor.dtype)
    except TypeError:
        return np.dtype(np.float32)


def is_row_major_offsets(form: AffineIndex, shape: list) -> bool:
    """Whether ``form`` over a tensor of ``shape`` equals each coordinate's row-major offset in ``shape``."""
    if form.rank != len(shape):
        return False
    sizes = [dims.as_int(d) for d in shape]
    strides: list[int | None] = []
    for axis in range(len(shape)):
        trailing = sizes[axis + 1:]
        strides.append(int(np.prod(trailing, dtype=np.int64)) if None not in trailing else None)
    expected = np.zeros(form.const.shape, np.int64)
    for axis, extent in enumerate(form.const.shape):
        if sizes[axis] == 1:
            continue  # the coordinate is always 0: whatever multiplies it adds nothing
        stride = strides[axis]
        if stride is None:
            return False
        if axis in form.coef:
            if form.coef[axis] != stride or extent != 1:
                return False
            continue
        if extent != sizes[axis]:
            return False  # the constant must spell the coordinate out along the whole axis
        iota = np.arange(extent, dtype=np.int64).reshape([extent if a == axis else 1 for a in range(form.rank)])
        expected = expected + iota * stride
    return bool(np.array_equal(np.broadcast_to(form.const, expected.shape), expected))


class _StridedIdentityInstance(PatternInstance):
    """``Gather(Reshape(x, [-1]), row-major offsets of x)``: the output is ``x``."""

    def __init__(self, flatten: gs.Node, gather: gs.Node) -> None:
        super().__init__([flatten, gather], gather)
        self.x = flatten.inputs[0]

    def analyze(self, ctx: AnalysisContext) -> None:
        ctx.set(self.anchor.outputs[0], ctx.get(self.x))


class StridedIdentityPattern(Pattern):
    """A contiguous ``as_strided`` view of a tensor: flatten, then gather every element in place."""

    name = "strided_identity"

    def match(self, nodes: list[gs.Node], ctx: AnalysisContext) -> list[PatternInstance]:
        found: list[PatternInstance] = []
        for gather in nodes:
            if gather.op != "Gather" or int(gather.attrs.get("axis", 0)) != 0 or len(gather.inputs) != 2:
                continue
            flat, offsets = gather.inputs
            flatten = flat.inputs[0] if len(flat.inputs) == 1 else None
            if flatten is None or flatten.op != "Reshape" or len(flat.outputs) != 1 or ctx.rank(flat) != 1:
                continue
            x = flatten.inputs[0]
            shape, out_shape = ctx.shape(x), ctx.shape(gather.outputs[0])
            if shape is None or out_shape is None or len(shape) != len(out_shape):
                continue
            if not all(dims.equal(a, b) for a, b in zip(shape, out_shape)):
                continue
            form = affine_index(ctx, offsets)
            if form is not None and is_row_major_offsets(form, shape):
                found.append(_StridedIdentityInstance(flatten, gather))
        return found


register_pattern(StridedIdentityPattern())
