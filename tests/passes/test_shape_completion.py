"""eecompile.passes.shape_completion: shapes inference left unknown, derived from each producer.

After an op whose shape inference gives no shape (``GroupNormalization`` has none in ONNX), the rest
of the graph is completed: same-shape ops directly, Conv / pooling / Resize by ONNX's per-node inference on
the completed inputs, with the element types carried along; a tensor that had no rank gets the
completed shape in the graph itself, so the fold sees it too.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from eecompile.passes.context import AnalysisContext
from eecompile.passes.graph import ModelGraph, load_model
from eecompile.passes.shape_completion import complete_shapes

FLOAT = TensorProto.FLOAT


def _model(build, rng):
    nodes = [helper.make_node("GroupNormalization", ["x", "s", "t"], ["n"], name="norm", num_groups=2),
             helper.make_node("Relu", ["n"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "W"], ["c"], name="conv", strides=[2, 2], pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Resize", ["p", "", "scales"], ["u"], name="up", mode="nearest"),
             helper.make_node("Relu", ["u"], ["y"], name="out")]
    inits = {"s": rng.standard_normal(4).astype(np.float32), "t": rng.standard_normal(4).astype(np.float32),
             "W": rng.standard_normal((6, 4, 3, 3)).astype(np.float32),
             "scales": np.array([1, 1, 2, 2], np.float32)}
    return build(nodes, [("x", FLOAT, ["B", 4, 8, 8])], [("y", FLOAT, ["B", 6, 4, 4])], inits, opset=21)


def test_completes_through_an_op_without_shape_inference(build, rng):
    mg = ModelGraph(load_model(_model(build, rng)))  # no inference run: every intermediate shape unknown
    tensors = {t.name: t for n in mg.nodes for t in n.outputs}
    assert mg.shape(tensors["n"]) is None and tensors["c"].dtype is None
    ctx = AnalysisContext(mg)
    assert complete_shapes(ctx) == 5  # n, r, c, p, u (y is a declared graph output)
    assert ctx.shape(tensors["n"]) == ["B", 4, 8, 8]
    assert ctx.shape(tensors["c"]) == ["B", 6, 4, 4]  # Conv stride 2, pad 1: ONNX's own inference
    assert ctx.shape(tensors["p"]) == ["B", 6, 2, 2]
    assert ctx.shape(tensors["u"])[1:] == [6, 4, 4]  # Resize with constant scales read as data (ONNX drops "B")
    assert mg.shape(tensors["c"]) == ["B", 6, 4, 4] and tensors["c"].dtype == np.float32  # written back
    assert ctx.rank(tensors["u"]) == 4


def test_dims_named_after_their_op_are_replaced(build, rng):
    """ONNX Runtime names dims it cannot relate ``Flatten_7_o0__d0``: Flatten and Gather re-derive them
    (a legacy CLIP text pooling: ``Flatten`` the states, ``Gather`` one row per sequence)."""
    import onnx

    nodes = [helper.make_node("Flatten", ["x"], ["f"], name="Flatten_7", axis=2),
             helper.make_node("Gather", ["f", "rows"], ["g"], name="pick", axis=0),
             helper.make_node("Relu", ["g"], ["y"], name="out")]
    path = build(nodes, [("x", FLOAT, ["B", "S", 4]), ("rows", TensorProto.INT64, ["B"])],
                 [("y", FLOAT, ["B", 4])], {})
    model = onnx.load(str(path))
    model.graph.value_info.extend([
        helper.make_tensor_value_info("f", FLOAT, ["Flatten_7_o0__d0", "Flatten_7_o0__d1"]),
        helper.make_tensor_value_info("g", FLOAT, ["B", "Flatten_7_o0__d1"])])
    mg = ModelGraph(model)
    tensors = {t.name: t for n in mg.nodes for t in n.outputs}
    ctx = AnalysisContext(mg)
    complete_shapes(ctx)
    assert [str(d) for d in ctx.shape(tensors["f"])] == ["B*S", "4"]
    assert [str(d) for d in ctx.shape(tensors["g"])] == ["B", "4"]
