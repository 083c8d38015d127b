"""eecompile.passes.rules.spatial: Resize and Pad.

Resizing or padding axes other than the protected one keeps its basis (a non-zero constant fill
only keeps bases that map ones to ones); a constant pad of the protected axis appends a clear
block; resizing, reflecting or repeating the protected axis clears it.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
C = 4


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _conv_sandwich(build, rng, middle: list, x_shape, y_shape, inits=None, opset=19):
    """Conv -> middle (reads 'h', writes 'm') -> Conv."""
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["h"], name="conv1"), *middle,
             helper.make_node("Conv", ["m", "W2"], ["y"], name="conv2")]
    weights = {"W1": _f(rng, C, 3, 1, 1), "b1": _f(rng, C), "W2": _f(rng, 2, C, 1, 1), **(inits or {})}
    return build(nodes, [("x", FLOAT, x_shape)], [("y", FLOAT, y_shape)], weights, opset=opset)


@pytest.mark.parametrize("mode", ["nearest", "linear", "cubic"])
def test_resize_of_spatial_axes_keeps_any_basis(mode, rng, build, lint, compile_exact):
    resize = helper.make_node("Resize", ["h", "", "scales"], ["m"], name="resize", mode=mode)
    path = _conv_sandwich(build, rng, [resize], ["B", 3, 4, 4], ["B", 2, 8, 8],
                          {"scales": np.array([1, 1, 2, 2], np.float32)})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "invertible" and "m" in space["tensors"]
    assert not report["unsupported_ops"]
    compile_exact(path, {"x": _f(rng, 2, 3, 4, 4)})


def test_resize_to_computed_sizes(rng, build, lint, compile_exact):
    """sizes = Concat(Shape(h)[0:2], [6, 6]): the channel dim is read through the shape arithmetic."""
    nodes = [helper.make_node("Shape", ["h"], ["hs"], name="shape", start=0, end=2),
             helper.make_node("Concat", ["hs", "hw"], ["sizes"], name="sizes", axis=0),
             helper.make_node("Resize", ["h", "", "", "sizes"], ["m"], name="resize", mode="linear")]
    path = _conv_sandwich(build, rng, nodes, ["B", 3, 4, 4], ["B", 2, 6, 6], {"hw": np.array([6, 6], np.int64)})
    report = lint(path)
    assert report.basis("h") == "invertible" and "m" in report.space("h")["tensors"]
    compile_exact(path, {"x": _f(rng, 2, 3, 4, 4)})


def test_resize_of_the_channel_axis_clears(rng, build, lint, compile_exact):
    resize = helper.make_node("Resize", ["h", "", "scales"], ["m"], name="resize", mode="nearest")
    path = build([helper.make_node("Conv", ["x", "W1"], ["h"], name="conv1"), resize,
                  helper.make_node("Conv", ["m", "W2"], ["y"], name="conv2")],
                 [("x", FLOAT, ["B", 3, 4, 4])], [("y", FLOAT, ["B", 2, 4, 4])],
                 {"W1": _f(rng, C, 3, 1, 1), "scales": np.array([1, 2, 1, 1], np.float32),
                  "W2": _f(rng, 2, 2 * C, 1, 1)}, opset=19)
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "resize"
    compile_exact(path, {"x": _f(rng, 2, 3, 4, 4)})


@pytest.mark.parametrize("mode,value,basis", [("constant", 0.0, "invertible"), ("constant", 1.5, "ones-orthogonal"),
                                              ("reflect", None, "invertible"), ("edge", None, "invertible")])
def test_pad_of_spatial_axes(mode, value, basis, rng, build, lint, compile_exact):
    inputs = ["h", "pads"] + (["value"] if value is not None else [])
    inits = {"pads": np.array([0, 0, 1, 2, 0, 0, 2, 1], np.int64)}
    if value is not None:
        inits["value"] = np.array(value, np.float32)
    pad = helper.make_node("Pad", inputs, ["m"], name="pad", mode=mode)
    path = _conv_sandwich(build, rng, [pad], ["B", 3, 4, 4], ["B", 2, 7, 7], inits)
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == basis and "m" in space["tensors"]
    if basis != "invertible":
        assert space["limited_by"]["node"] == "pad"
    compile_exact(path, {"x": _f(rng, 2, 3, 4, 4)})


def _feature_pad(build, rng, pads: list[int], mode: str = "constant", value: float = 0.0):
    """MatMul -> Pad on [B, S, D] (pads on S and D) -> MatMul."""
    width = 6 + pads[2] + pads[5]
    return build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                  helper.make_node("Pad", ["h", "pads", "value"], ["m"], name="pad", mode=mode),
                  helper.make_node("MatMul", ["m", "W2"], ["y"], name="mm2")],
                 [("x", FLOAT, ["B", 3, 4])], [("y", FLOAT, ["B", 3 + pads[1] + pads[4], 2])],
                 {"W1": _f(rng, 4, 6), "pads": np.array(pads, np.int64), "value": np.array(value, np.float32),
                  "W2": _f(rng, width, 2)}, opset=19)


def test_constant_pad_of_the_feature_axis_appends_a_clear_block(rng, build, lint, compile_exact):
    path = _feature_pad(build, rng, [0, 0, 2, 0, 1, 1], value=0.5)
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "ones-orthogonal"  # the fill 0.5 also lands in the new token along S
    assert "m" in space["tensors"]
    fills = [s for s in report["spaces"] if "/pad_" in s["name"]]
    assert len(fills) == 2 and all(s["basis"] == "clear" for s in fills)
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


def test_negative_pad_crops_the_feature_axis_to_whole_blocks(rng, build, lint, compile_exact):
    path = _feature_pad(build, rng, [0, 0, -2, 0, 0, 0])
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "block-invertible" and space["blocks"] == 2  # the first 2 coordinates are cut off
    assert report.protection("outputs", "y") == "basis change on axis 2: invertible"
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


def test_reflect_pad_of_the_feature_axis_clears(rng, build, lint, compile_exact):
    path = _feature_pad(build, rng, [0, 0, 1, 0, 0, 1], mode="reflect")
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "pad"
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


def test_pad_with_computed_pads_clears(rng, build, lint, compile_exact):
    """Pads fed at run time: whether they touch the feature axis is unknown, so it is cleared."""
    path = build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                  helper.make_node("Pad", ["h", "pads"], ["m"], name="pad"),
                  helper.make_node("ReduceSum", ["m"], ["y"], name="sum", keepdims=0)],
                 [("x", FLOAT, ["B", 3, 4]), ("pads", INT64, [6])], [("y", FLOAT, [])],
                 {"W1": _f(rng, 4, 6)}, opset=19)
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "pad"
    compile_exact(path, {"x": _f(rng, 2, 3, 4), "pads": np.array([0, 1, 0, 0, 0, 2], np.int64)})


@pytest.mark.parametrize("first", ["pad", "cast", "cast+pad"])
def test_image_input_padded_or_cast_before_the_stem_is_encrypted(first, rng, build, lint, compile_exact):
    """``pixel_values`` read first by a spatial Pad (a stride-2 stem's ``same`` padding, legacy MobileNetV2) or a
    float Cast (CLIP's ``pixel_values.to(dtype)``) takes the basis the stem Conv binds, instead of staying clear."""
    nodes, src = [], "x"
    if "cast" in first:
        nodes.append(helper.make_node("Cast", [src], ["xc"], name="cast", to=TensorProto.FLOAT))
        src = "xc"
    if "pad" in first:
        nodes.append(helper.make_node("Pad", [src, "pads"], ["xp"], name="pad"))
        src = "xp"
    nodes += [helper.make_node("Conv", [src, "W1", "b1"], ["h"], name="stem", strides=[2, 2]),
              helper.make_node("Relu", ["h"], ["y"], name="relu")]
    path = build(nodes, [("x", FLOAT, ["B", 3, 8, 8])], [("y", FLOAT, ["B", C, "H", "W"])],
                 {"pads": np.array([0, 0, 0, 1, 0, 0, 1, 1], np.int64), "W1": _f(rng, C, 3, 3, 3), "b1": _f(rng, C)})
    report = lint(path)
    assert report.basis("x") == "invertible"
    result = compile_exact(path, {"x": _f(rng, 2, 3, 8, 8)})
    assert result.report["exposure"]["intermediates_exposed"] == 0


def test_pad_with_run_time_spatial_pads_keeps_the_channel_basis(rng, build, lint, compile_exact):
    """Swin (optimum) pads ``[B, H, W, C]`` up to whole windows with pads computed from the run-time width,
    written by torch's legacy ``F.pad`` lowering (pairs reversed with a step -1 Slice, transposed, flattened).
    The channel pads are constant zeros, so the channel basis survives; the padded width is derived too."""
    i64 = TensorProto.INT64
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="proj"),
             helper.make_node("Shape", ["h"], ["hs"], name="shape"),
             helper.make_node("Gather", ["hs", "two"], ["w"], name="width", axis=0),
             helper.make_node("Mod", ["w", "four"], ["wm"], name="wmod"),
             helper.make_node("Sub", ["four", "wm"], ["ws"], name="wsub"),
             helper.make_node("Mod", ["ws", "four"], ["padw"], name="padw"),
             helper.make_node("Unsqueeze", ["padw", "zero"], ["padw1"], name="unsq"),
             helper.make_node("Concat", ["c3", "padw1", "c2"], ["torch_pads"], name="cat_pads", axis=0),
             helper.make_node("ConstantOfShape", ["two1"], ["zeros"], name="zeros",
                              value=helper.make_tensor("v", i64, [1], [0])),
             helper.make_node("Concat", ["torch_pads", "zeros"], ["all_pads"], name="cat_all", axis=0),
             helper.make_node("Reshape", ["all_pads", "pairs"], ["p2"], name="pairs"),
             helper.make_node("Slice", ["p2", "s_start", "s_end", "zero", "s_step"], ["rev"], name="reverse"),
             helper.make_node("Transpose", ["rev"], ["revt"], name="t", perm=[1, 0]),
             helper.make_node("Reshape", ["revt", "flat"], ["pads"], name="flat"),
             helper.make_node("Pad", ["h", "pads"], ["m"], name="pad", mode="constant"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="out")]
    inits = {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3), "two": np.array(2, np.int64), "four": np.array(4, np.int64),
             "zero": np.array([0], np.int64), "c3": np.zeros(3, np.int64), "c2": np.zeros(2, np.int64),
             "two1": np.array([2], np.int64), "pairs": np.array([-1, 2], np.int64),
             "s_start": np.array([-1], np.int64), "s_end": np.array([-(2 ** 62)], np.int64),
             "s_step": np.array([-1], np.int64), "flat": np.array([-1], np.int64)}
    path = build(nodes, [("x", FLOAT, ["B", 3, "W", 4])], [("y", FLOAT, ["B", 3, "V", 3])], inits)
    report = lint(path)
    space = report.space("h")
    assert space["basis"] != "clear" and {"m", "r"} <= set(space["tensors"])
    result = compile_exact(path, [{"x": _f(rng, 2, 3, 5, 4)}, {"x": _f(rng, 1, 3, 8, 4)}])
    assert result.report["exposure"]["intermediates_exposed"] == 0
