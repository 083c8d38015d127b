"""eecompile.passes.rules.strided: a flattened tensor gathered back at its own row-major offsets.

dynamo exports ``x.as_strided(x.shape, x.stride())`` (Swin's pooler) as ``Gather(Reshape(x, [-1]),
offsets)`` with the offsets built from ``Range``/``Mul``/``Unsqueeze``/``Add``: when they provably are
``x``'s own offsets the output is ``x`` and keeps its basis; any other offsets clear it.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from eecompile.passes.rules.strided import AffineIndex, is_row_major_offsets

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
S, D_IN, D = 5, 4, 6


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _pooled_strided(build, rng, feature_offsets: np.ndarray, row_stride: int = D):
    """``h = x @ W1`` pooled over the sequence to ``[B, D, 1]``, then ``as_strided`` back, then ``@ W2``."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
        helper.make_node("Transpose", ["h"], ["ht"], name="tr", perm=[0, 2, 1]),
        helper.make_node("ReduceMean", ["ht", "mean_axes"], ["pooled"], name="mean", keepdims=1),
        helper.make_node("Reshape", ["pooled", "flat_shape"], ["flat"], name="flatten"),
        helper.make_node("Shape", ["pooled"], ["pshape"], name="shape"),
        helper.make_node("Gather", ["pshape", "zero"], ["batch"], name="batch", axis=0),
        helper.make_node("Range", ["zero", "batch", "one"], ["rows"], name="range"),
        helper.make_node("Mul", ["rows", "row_stride"], ["row_offsets"], name="scale"),
        helper.make_node("Unsqueeze", ["row_offsets", "unsq_axes"], ["row_offsets3"], name="unsq"),
        helper.make_node("Add", ["row_offsets3", "feature_offsets"], ["offsets"], name="offsets"),
        helper.make_node("Gather", ["flat", "offsets"], ["strided"], name="as_strided", axis=0),
        helper.make_node("Squeeze", ["strided", "last"], ["features"], name="squeeze"),
        helper.make_node("MatMul", ["features", "W2"], ["y"], name="mm2"),
    ]
    inits = {"W1": _f(rng, D_IN, D), "W2": _f(rng, D, 3), "mean_axes": i64(-1), "flat_shape": i64(-1),
             "zero": np.array(0, np.int64), "one": np.array(1, np.int64), "row_stride": np.array(row_stride, np.int64),
             "unsq_axes": i64(1, 2), "feature_offsets": feature_offsets.astype(np.int64), "last": i64(-1)}
    return build(nodes, [("x", FLOAT, ["B", S, D_IN])], [("y", FLOAT, ["B", 3])], inits)


def test_contiguous_as_strided_keeps_the_feature_basis(rng, build, lint, compile_exact):
    path = _pooled_strided(build, rng, np.arange(D).reshape(1, D, 1))
    report = lint(path)
    space = report.space("h")
    assert not report["unsupported_ops"]
    assert space["basis"] != "clear" and {"strided", "features"} <= set(space["tensors"])
    compile_exact(path, [{"x": _f(rng, b, S, D_IN)} for b in (1, 3)])


def test_offsets_that_reorder_features_clear(rng, build, lint, compile_exact):
    """Reversed feature offsets permute the features in plaintext coordinates: not the identity."""
    path = _pooled_strided(build, rng, np.arange(D)[::-1].reshape(1, D, 1))
    report = lint(path)
    assert report.basis("h") == "clear"
    compile_exact(path, {"x": _f(rng, 2, S, D_IN)})


def test_a_wrong_row_stride_clears(rng, build, lint, compile_exact):
    """Rows D+1 apart read past each row: the gather is not the tensor (ORT would index out of range, so
    this is only linted)."""
    path = _pooled_strided(build, rng, np.arange(D).reshape(1, D, 1), row_stride=D + 1)
    assert lint(path).basis("h") == "clear"


def test_row_major_offsets_of_a_static_shape_spelled_as_one_constant():
    shape = [2, 3, 4]
    offsets = np.arange(24).reshape(shape)
    assert is_row_major_offsets(AffineIndex({}, offsets), shape)
    assert not is_row_major_offsets(AffineIndex({}, offsets.transpose(0, 2, 1).reshape(shape)), shape)
    assert not is_row_major_offsets(AffineIndex({0: 12}, np.arange(12).reshape(1, 3, 4)), [2, 3, 5])
    assert is_row_major_offsets(AffineIndex({0: 12, 1: 4}, np.arange(4).reshape(1, 1, 4)), ["B", 3, 4])
    assert not is_row_major_offsets(AffineIndex({0: 12, 1: 4}, np.arange(4).reshape(1, 1, 4)), [2, "S", 4])
