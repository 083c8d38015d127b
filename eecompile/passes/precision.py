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

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

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


# -- storing float64 results in the model's type ----------------------------------------------
BFLOAT16 = np.dtype(ml_dtypes.bfloat16)


def numpy_dtype(dtype) -> np.dtype:
    """A numpy dtype for a tensor's dtype as graphsurgeon gives it (bfloat16 arrives as the ONNX enum 16)."""
    if isinstance(dtype, (int, np.integer)) and not isinstance(dtype, bool) and int(dtype) == TensorProto.BFLOAT16:
        return BFLOAT16
    return np.dtype(dtype)


def is_float_dtype(dtype) -> bool:
    """Whether a numpy dtype holds floats (numpy's own, and ml_dtypes' bfloat16)."""
    dtype = numpy_dtype(dtype)
    return dtype == BFLOAT16 or np.issubdtype(dtype, np.floating)


def round_to_bfloat16(value: np.ndarray) -> np.ndarray:
    """``value`` rounded once, to nearest even, to bfloat16 (ml_dtypes rounds float64 through float32: twice).

    The float64 significand is rounded to bfloat16's 8 bits in its bit pattern, which bfloat16 then holds
    exactly (its exponent range is float32's; below 2^-126, where bfloat16 is subnormal, a second rounding
    remains)."""
    x = np.ascontiguousarray(value, dtype=np.float64)
    bits = x.view(np.uint64)
    drop = np.uint64(52 - 7)
    lsb = (bits >> drop) & np.uint64(1)
    rounded = ((bits + (np.uint64(1) << (drop - np.uint64(1))) - np.uint64(1) + lsb) >> drop) << drop
    out = np.where(np.isfinite(x), rounded.view(np.float64), x)
    with np.errstate(over="ignore"):  # beyond bfloat16's range: infinity, as the rounding says
        return out.astype(BFLOAT16)


def store_as(value: np.ndarray, dtype) -> np.ndarray:
    """A float64 result stored in ``dtype`` with one rounding (bfloat16 by :func:`round_to_bfloat16`)."""
    dtype = numpy_dtype(dtype)
    value = np.asarray(value)
    if dtype == BFLOAT16 and value.dtype != BFLOAT16:
        return round_to_bfloat16(value).reshape(value.shape)
    return value.astype(dtype, copy=False)


# -- bfloat16 where ONNX Runtime's CPU provider has no kernel -----------------------------------
def has_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether any initializer, graph input or output of ``model`` is bfloat16."""
    return (any(t.data_type == TensorProto.BFLOAT16 for t in model.graph.initializer)
            or any(v.type.tensor_type.elem_type == TensorProto.BFLOAT16
                   for v in [*model.graph.input, *model.graph.output]))


def widen_bfloat16(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computing in float32 what it computes in bfloat16, with the same weights.

    Every bfloat16 initializer is read as it is (external data stays where it is) and widened by a Cast
    (exact: bfloat16 values are float32 values); bfloat16 inputs, outputs, value types, Casts, Constants
    and dtype attributes become float32. The copy then differs from the model only in that its
    activations are not rounded to bfloat16.
    """
    wide = onnx.ModelProto()
    wide.CopyFrom(model)
    graph = wide.graph
    casts = []
    for init in graph.initializer:
        if init.data_type == TensorProto.BFLOAT16:
            name = init.name
            init.name = f"{name}__bfloat16"
            casts.append(onnx.helper.make_node("Cast", [init.name], [name], to=TensorProto.FLOAT,
                                               name=f"{name}__widen"))
    for value in [*graph.input, *graph.output, *graph.value_info]:
        if value.type.tensor_type.elem_type == TensorProto.BFLOAT16:
            value.type.tensor_type.elem_type = TensorProto.FLOAT
    for node in graph.node:
        for attr in node.attribute:
            if attr.name in ("to", "dtype") and attr.type == onnx.AttributeProto.INT and attr.i == TensorProto.BFLOAT16:
                attr.i = TensorProto.FLOAT
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.BFLOAT16:
                widened = numpy_helper.from_array(numpy_helper.to_array(attr.t).astype(np.float32), attr.t.name)
                attr.t.CopyFrom(widened)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return wide


class _Arg:
    """What ONNX Runtime's ``NodeArg`` tells verification: name, type and shape."""

    def __init__(self, arg, elem_type: str) -> None:
        self.name, self.type, self.shape = arg.name, elem_type, arg.shape


class WidenedSession:
    """An ONNX Runtime session of :func:`widen_bfloat16`'s copy that looks like the bfloat16 model from outside.

    Inputs and outputs that are bfloat16 in the model are bfloat16 here (``ml_dtypes``): fed values are
    widened exactly, outputs rounded once to bfloat16, as the model would return them. ``note`` says what
    was run instead of the model and why.
    """

    def __init__(self, session, model: onnx.ModelProto, reason: str) -> None:
        self.session = session
        bf16 = {v.name for v in [*model.graph.input, *model.graph.output]
                if v.type.tensor_type.elem_type == TensorProto.BFLOAT16}
        self._bf16 = bf16
        self._inputs = [_Arg(a, "tensor(bfloat16)" if a.name in bf16 else a.type) for a in session.get_inputs()]
        self._outputs = [_Arg(a, "tensor(bfloat16)" if a.name in bf16 else a.type) for a in session.get_outputs()]
        self.note = (f"bfloat16 run with its bfloat16 weights, inputs and outputs but float32 activations "
                     f"(ONNX Runtime's CPU provider: {reason})")

    def get_inputs(self) -> list:
        """The model's inputs (bfloat16 where the model's are)."""
        return self._inputs

    def get_outputs(self) -> list:
        """The model's outputs (bfloat16 where the model's are)."""
        return self._outputs

    def run(self, names, feeds: dict, run_options=None) -> list:
        """Run on bfloat16 (or any) feeds; bfloat16 outputs come back rounded to bfloat16."""
        wide = {k: (np.asarray(v).astype(np.float32) if np.asarray(v).dtype == BFLOAT16 else v)
                for k, v in feeds.items()}
        names = names or [o.name for o in self._outputs]
        outs = self.session.run(names, wide, run_options)
        return [store_as(o, BFLOAT16) if n in self._bf16 else o for n, o in zip(names, outs)]
