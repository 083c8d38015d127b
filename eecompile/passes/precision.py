"""The precision a model computes in, and the verification tolerance that follows from it.

A compiled model computes the original function in another basis, so the two round differently: every
op that rounds its result (a MatMul, an Add, a norm, ...) adds an error of up to one unit roundoff ``u``
of the model's float type to each, the folded weights are rounded once more when they are stored in
that type, and so are the encrypted inputs and decrypted outputs. Independent rounding errors along a
chain of ``L`` rounding ops grow like ``√L`` (the probabilistic forward-error bound of numerical linear
algebra), so verification accepts

    tolerance = max(floor, 2 · u · √L)

where ``u`` is the unit roundoff of the model's float type (2^-24 float32, 2^-11 float16, 2^-8
bfloat16), ``L`` the model's depth (:func:`model_depth`: the longest chain of rounding ops from an
input to an output) and ``floor`` the float32 tolerance (1e-4), which the formula only exceeds for
reduced precision. Measured on tiny random Hugging Face models in float16 (BERT, ViT, ResNet, Llama;
benchmarks/RESULTS.md "Reduced precision"), the error of a correct fold is 1.4–3.3 u, the tolerance
5.7–16.5 u.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import onnx
from onnx import TensorProto

UNIT_ROUNDOFF = {TensorProto.DOUBLE: 2.0 ** -53, TensorProto.FLOAT: 2.0 ** -24, TensorProto.FLOAT16: 2.0 ** -11,
                 TensorProto.BFLOAT16: 2.0 ** -8}
"""Unit roundoff (half the machine epsilon) of each float element type."""
ROUNDOFF_TEXT = {TensorProto.DOUBLE: "2^-53", TensorProto.FLOAT: "2^-24", TensorProto.FLOAT16: "2^-11",
                 TensorProto.BFLOAT16: "2^-8"}
GROWTH = 2.0
"""The constant of the bound: ``tolerance = GROWTH · u · √depth``."""

EXACT_OPS = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Gather", "GatherElements", "GatherND", "Slice",
    "Split", "Concat", "Expand", "Identity", "Shape", "Size", "Constant", "ConstantOfShape", "Tile", "Pad", "Where",
    "Cast", "CastLike", "Dropout", "Range", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not",
    "And", "Or", "Xor", "MaxPool", "ReduceMax", "ReduceMin", "ArgMax", "ArgMin", "Relu", "Neg", "Abs", "Max", "Min",
    "Sign", "Trilu", "NonZero", "ScatterND", "ScatterElements", "DepthToSpace", "SpaceToDepth", "TopK", "IsNaN",
    "IsInf", "OneHot", "EyeLike",
})
"""Ops whose float outputs are values of their inputs (moved, selected, compared): they do not round."""


def float_types(model: onnx.ModelProto) -> Counter:
    """Elements of float weights (initializers and Constant nodes) per element type."""
    counts: Counter = Counter()
    tensors = list(model.graph.initializer)
    tensors += [a.t for n in model.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"]
    for t in tensors:
        if t.data_type in UNIT_ROUNDOFF:
            counts[t.data_type] += math.prod(t.dims)
    return counts


def model_precision(model: onnx.ModelProto) -> int:
    """The float element type the model computes in: that of most of its weight elements, or, with no float
    weights, the narrowest float type of its graph inputs and outputs (float32 when it has none)."""
    counts = float_types(model)
    if counts:
        return max(counts, key=lambda t: (counts[t], UNIT_ROUNDOFF[t]))
    io = [v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]]
    io = [t for t in io if t in UNIT_ROUNDOFF]
    return max(io, key=UNIT_ROUNDOFF.__getitem__) if io else TensorProto.FLOAT


def model_depth(model: onnx.ModelProto) -> int:
    """The longest chain of rounding ops (any op not in :data:`EXACT_OPS`) from a graph input or weight to a
    graph output (at least 1). Nodes are read in the file's order, which ONNX requires to be topological."""
    depth: dict[str, int] = {}
    for node in model.graph.node:
        start = max((depth.get(name, 0) for name in node.input if name), default=0)
        step = 0 if node.op_type in EXACT_OPS and node.domain in ("", "ai.onnx") else 1
        for name in node.output:
            depth[name] = start + step
    return max([1, *(depth.get(o.name, 0) for o in model.graph.output)])


@dataclass(frozen=True)
class Tolerance:
    """The largest relative error verification accepts (:data:`value`), and how it was derived."""

    value: float
    dtype: str  # the model's float type: float32, float16, bfloat16, double
    depth: int
    unit_roundoff: float
    floor: float

    @property
    def derived(self) -> bool:
        """Whether the dtype-and-depth bound (not the floor) sets the value."""
        return self.value > self.floor

    def describe(self) -> str:
        """One line: the value and the formula with its numbers."""
        if math.isinf(self.value):
            return "none (the weights are re-quantised: the error is measured, not bounded)"
        u = ROUNDOFF_TEXT.get(_TYPES_BY_NAME.get(self.dtype), f"{self.unit_roundoff:.2e}")
        bound = GROWTH * self.unit_roundoff * math.sqrt(self.depth)
        return (f"{self.value:.2e} = max({self.floor:.0e}, {GROWTH:g}·u·√depth = {GROWTH:g}·{u}·√{self.depth} = "
                f"{bound:.2e}) for {self.dtype}")

    def to_dict(self) -> dict:
        """For report.json."""
        return {"value": self.value, "dtype": self.dtype, "depth": self.depth, "unit_roundoff": self.unit_roundoff,
                "floor": self.floor, "rule": f"max(floor, {GROWTH:g} * unit_roundoff * sqrt(depth))",
                "text": self.describe()}


_TYPES_BY_NAME = {"double": TensorProto.DOUBLE, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16,
                  "bfloat16": TensorProto.BFLOAT16}


def dtype_name(elem: int) -> str:
    """``float32``, ``float16``, ``bfloat16`` or ``double`` for an ONNX element type."""
    return next(name for name, t in _TYPES_BY_NAME.items() if t == elem)


def verification_tolerance(model: onnx.ModelProto, floor: float) -> Tolerance:
    """The tolerance for verifying a compilation of ``model`` (structure only is enough): see the module."""
    elem = model_precision(model)
    depth = model_depth(model)
    u = UNIT_ROUNDOFF[elem]
    value = floor if math.isinf(floor) else max(floor, GROWTH * u * math.sqrt(depth))
    return Tolerance(value, dtype_name(elem), depth, u, floor)
