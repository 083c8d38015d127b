"""eecompile.passes.rules.pooling: spatial pooling over NCHW with the channel axis protected.

Average pooling is linear per channel (any basis); max pooling commutes with positive
monomial bases only. Pixel layout stays visible.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

FLOAT = TensorProto.FLOAT
C = 4


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _conv(x, w, out, **kw):
    return helper.make_node("Conv", [x, w], [out], name=f"conv_{out}", **kw)


def test_conv_relu_global_average_pool_flatten_gemm(rng, build, lint, compile_exact):
    """A CNN classifier head: channels keep positive scales; class logits leave in a dense basis."""
    path = build([_conv("x", "W1", "c", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"], name="relu"),
                  helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
                  helper.make_node("Flatten", ["g"], ["fl"], name="flatten", axis=1),
                  helper.make_node("Gemm", ["fl", "Wf", "bf"], ["logits"], name="fc", transB=1)],
                 [("x", FLOAT, ["B", 3, 6, 6])], [("logits", FLOAT, ["B", 5])],
                 {"W1": _f(rng, C, 3, 3, 3), "Wf": _f(rng, 5, C), "bf": _f(rng, 5)})
    report = lint(path)
    channels = report.space("c")
    assert channels["class"] == "positive-monomial" and {"r", "g", "fl"} <= set(channels["tensors"])
    assert channels["limited_by"]["node"] == "relu"  # the average pool itself allows any basis
    assert report.basis("logits") == "invertible"
    compile_exact(path, {"x": _f(rng, 2, 3, 6, 6)})


def test_average_pool_allows_any_basis(rng, build, lint, compile_exact):
    path = build([_conv("x", "W1", "c"),
                  helper.make_node("AveragePool", ["c"], ["a"], name="avg", kernel_shape=[2, 2], strides=[2, 2]),
                  _conv("a", "W2", "y")],
                 [("x", FLOAT, ["B", 3, 6, 6])], [("y", FLOAT, ["B", 2, 2, 2])],
                 {"W1": _f(rng, C, 3, 3, 3), "W2": _f(rng, 2, C, 1, 1)})
    report = lint(path)
    assert report.basis("c") == "invertible" and "a" in report.space("c")["tensors"]
    compile_exact(path, {"x": _f(rng, 2, 3, 6, 6)})


def test_max_pools_allow_positive_monomial(rng, build, lint, compile_exact):
    path = build([_conv("x", "W1", "c"),
                  helper.make_node("MaxPool", ["c"], ["m"], name="maxpool", kernel_shape=[2, 2]),
                  helper.make_node("GlobalMaxPool", ["m"], ["y"], name="gmp")],
                 [("x", FLOAT, ["B", 3, 6, 6])], [("y", FLOAT, ["B", C, 1, 1])], {"W1": _f(rng, C, 3, 3, 3)})
    report = lint(path)
    space = report.space("c")
    assert (space["basis"], space["class"]) == ("monomial", "positive-monomial")
    assert space["limited_by"]["op_type"] in ("MaxPool", "GlobalMaxPool")
    assert report.protection("outputs", "y") == "basis change on axis 1: monomial"
    compile_exact(path, {"x": _f(rng, 2, 3, 6, 6)})


def test_pooling_a_tensor_protected_on_another_axis_clears_it(rng, build, lint, compile_exact):
    """MatMul protects the last (spatial, for a pool) axis: the pool cannot carry it."""
    path = build([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                  helper.make_node("MaxPool", ["h"], ["y"], name="pool", kernel_shape=[2, 2])],
                 [("x", FLOAT, [1, 2, 5, 4])], [("y", FLOAT, [1, 2, 4, 5])], {"W": _f(rng, 4, 6)})
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "pool"
    compile_exact(path, {"x": _f(rng, 1, 2, 5, 4)})
