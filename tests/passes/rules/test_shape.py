"""eecompile.passes.rules.shape: layout ops move the protected axis; Reshape into heads, Split and Slice
along the axis make the basis a direct sum of blocks; Concat along the axis joins the parts' bases
and Concat along another axis makes the operands share one basis."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

FLOAT = TensorProto.FLOAT


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _mm(a, w, out):
    return helper.make_node("MatMul", [a, w], [out], name=f"mm_{out}")


def test_transpose_moves_the_protected_axis(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Transpose", ["h"], ["t"], name="t1", perm=[2, 0, 1]),
                  helper.make_node("Relu", ["t"], ["r"], name="relu"),
                  helper.make_node("Transpose", ["r"], ["back"], name="t2", perm=[1, 2, 0]), _mm("back", "W2", "y")],
                 [("x", FLOAT, ["B", "S", 4])], [("y", FLOAT, ["B", "S", 3])], {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3)})
    report = lint(path)
    space = report.space("h")
    assert {"t", "r", "back"} <= set(space["tensors"]) and space["class"] == "positive-monomial"
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


def test_unsqueeze_expand_and_reduction_beside_the_axis(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Unsqueeze", ["h", "ax1"], ["u"], name="unsqueeze"),
                  helper.make_node("Expand", ["u", "shape"], ["e"], name="expand"),
                  helper.make_node("ReduceSum", ["e", "ax1"], ["s"], name="sum", keepdims=0), _mm("s", "W2", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3), "ax1": np.array([1]), "shape": np.array([1, 3, 1])})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "invertible" and {"u", "e", "s"} <= set(space["tensors"])
    compile_exact(path, {"x": _f(rng, 2, 4)})


def test_squeezing_the_protected_axis_clears_it(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Squeeze", ["h", "ax1"], ["s"], name="squeeze")],
                 [("x", FLOAT, ["B", 4])], [("s", FLOAT, ["B"])], {"W1": _f(rng, 4, 1), "ax1": np.array([1])})
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "squeeze"
    assert report.basis("x") == "invertible"
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_reshape_merging_other_axes_keeps_the_feature_axis(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Reshape", ["h", "shape"], ["r"], name="flatten_rows"),
                  _mm("r", "W2", "y")],
                 [("x", FLOAT, [2, 3, 4])], [("y", FLOAT, [6, 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3), "shape": np.array([-1, 6])})
    report = lint(path)
    assert report.basis("h") == "invertible" and "r" in report.space("h")["tensors"]
    assert report.protection("outputs", "y") == "basis change on axis 1: invertible"
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


def test_reshape_mixing_the_feature_axis_clears_it(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Reshape", ["h", "shape"], ["r"], name="mix"),
                  _mm("r", "W2", "y")],
                 [("x", FLOAT, [2, 3, 4])], [("y", FLOAT, [2, 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 18, 3), "shape": np.array([2, 18])})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "clear" and space["limited_by"]["node"] == "mix"
    assert "[2, 3, 6] -> [2, 18]" in space["limited_by"]["reason"]
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


def test_reshape_into_heads_makes_blocks(rng, build, lint, compile_exact):
    """[B,S,6] → [B,S,2,3]: one block per head; a per-head op (Relu) restricts every block."""
    path = build([_mm("x", "W1", "h"), helper.make_node("Reshape", ["h", "heads"], ["r"], name="split_heads"),
                  helper.make_node("Relu", ["r"], ["rr"], name="relu"),
                  helper.make_node("Reshape", ["rr", "merge"], ["m"], name="merge_heads"), _mm("m", "W2", "y")],
                 [("x", FLOAT, ["B", "S", 4])], [("y", FLOAT, ["B", "S", 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3), "heads": np.array([0, 0, 2, 3]),
                  "merge": np.array([0, 0, 6])})
    report = lint(path)
    space = report.space("h")
    assert space["blocks"] == 2 and space["class"] == "positive-monomial"
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


def test_reshape_into_heads_without_a_pointwise_op_is_block_invertible(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Reshape", ["h", "heads"], ["r"], name="split_heads"),
                  helper.make_node("Reshape", ["r", "merge"], ["m"], name="merge_heads"), _mm("m", "W2", "y")],
                 [("x", FLOAT, ["B", "S", 4])], [("y", FLOAT, ["B", "S", 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3), "heads": np.array([0, 0, 3, 2]),
                  "merge": np.array([0, 0, 6])})
    report = lint(path)
    assert report.basis("h") == "block-invertible" and report.space("h")["blocks"] == 3
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


def test_slice_along_the_axis_cuts_blocks(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Slice", ["h", "starts", "ends", "axes"], ["part"], name="slice"),
                  _mm("part", "W2", "y"), _mm("h", "W3", "z")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3]), ("z", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 4, 3), "W3": _f(rng, 6, 3), "starts": np.array([1]),
                  "ends": np.array([5]), "axes": np.array([1])})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "block-invertible" and space["blocks"] == 3  # [0,1) [1,5) [5,6)
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_slice_along_another_axis_keeps_the_basis(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Slice", ["h", "starts", "ends", "axes"], ["part"], name="slice"),
                  _mm("part", "W2", "y")],
                 [("x", FLOAT, ["B", 5, 4])], [("y", FLOAT, ["B", 2, 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3), "starts": np.array([1]), "ends": np.array([3]),
                  "axes": np.array([1])})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "invertible" and space["blocks"] == 1 and "part" in space["tensors"]
    compile_exact(path, {"x": _f(rng, 2, 5, 4)})


def test_split_along_the_axis(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Split", ["h", "sizes"], ["a", "b"], name="split", axis=1),
                  _mm("a", "W2", "y"), _mm("b", "W3", "z")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3]), ("z", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 2, 3), "W3": _f(rng, 4, 3), "sizes": np.array([2, 4])})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "block-invertible" and space["blocks"] == 2
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_split_into_equal_parts_without_sizes(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"),
                  helper.make_node("Split", ["h"], ["a", "b", "c"], name="split", axis=-1, num_outputs=3),
                  helper.make_node("Sigmoid", ["a"], ["sa"], name="sig"),
                  _mm("sa", "W2", "y"), _mm("b", "W3", "z"), _mm("c", "W4", "w")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 2]), ("z", FLOAT, ["B", 2]), ("w", FLOAT, ["B", 2])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 2, 2), "W3": _f(rng, 2, 2), "W4": _f(rng, 2, 2)}, opset=18)
    report = lint(path)
    space = report.space("h")
    assert space["blocks"] == 3
    assert space["basis"] == "permutation"  # the report names the weakest block (sigmoid on the first)
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_split_along_another_axis_keeps_the_basis(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Split", ["h", "sizes"], ["a", "b"], name="split", axis=0),
                  _mm("a", "W2", "y"), _mm("b", "W3", "z")],
                 [("x", FLOAT, [5, 4])], [("y", FLOAT, [2, 3]), ("z", FLOAT, [3, 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3), "W3": _f(rng, 6, 3), "sizes": np.array([2, 3])})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "invertible" and {"a", "b"} <= set(space["tensors"])
    compile_exact(path, {"x": _f(rng, 5, 4)})


def test_concat_along_the_axis_is_a_direct_sum(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "a"), _mm("x", "W2", "b"), helper.make_node("Concat", ["a", "b"], ["c"], name="concat",
                                                                           axis=-1),
                  _mm("c", "W3", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, 3), "W2": _f(rng, 4, 5), "W3": _f(rng, 8, 3)})
    report = lint(path)
    a, b = report.space("a"), report.space("b")
    assert a["name"] != b["name"]  # each part keeps its own basis
    assert a["basis"] == b["basis"] == "invertible" and "c" in a["tensors"] and "c" in b["tensors"]
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_concat_along_the_axis_with_a_clear_part(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "a"), helper.make_node("Concat", ["a", "z"], ["c"], name="concat", axis=-1),
                  _mm("c", "W3", "y")],
                 [("x", FLOAT, ["B", 4]), ("z", FLOAT, ["B", 2])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, 3), "W3": _f(rng, 5, 3)})
    report = lint(path)
    assert report.basis("a") == "invertible"
    assert report.protection("inputs", "z") == "clear"
    clear_parts = [s for s in report["spaces"] if "c" in s["tensors"] and s["basis"] == "clear"]
    assert len(clear_parts) == 1 and clear_parts[0]["size"] == 2
    compile_exact(path, {"x": _f(rng, 3, 4), "z": _f(rng, 3, 2)})


def test_concat_along_another_axis_shares_one_basis(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "a"), _mm("x", "W2", "b"),
                  helper.make_node("Concat", ["a", "b", "row"], ["c"], name="concat", axis=0), _mm("c", "W3", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["N", 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 4, 6), "row": _f(rng, 1, 6), "W3": _f(rng, 6, 3)})
    report = lint(path)
    space = report.space("a")
    assert space["name"] == report.space("b")["name"]
    assert space["basis"] == "invertible" and "c" in space["tensors"]
    compile_exact(path, {"x": _f(rng, 3, 4)})  # the constant row is folded: row·T


def test_concat_with_a_class_token_expanded_over_the_batch(rng, build, lint, compile_exact):
    """ViT with a dynamic batch (dynamo): ``Concat(Expand(cls_token, [B, 1, D]), patches)`` along the sequence.
    The Expand of a constant read only there is folded in the patches' basis instead of clearing them."""
    nodes = [_mm("x", "W1", "h"),
             helper.make_node("Shape", ["x"], ["xs"], name="shape", start=0, end=1),
             helper.make_node("Concat", ["xs", "one_d"], ["target"], name="target", axis=0),
             helper.make_node("Expand", ["cls", "target"], ["cls_b"], name="expand"),
             helper.make_node("Concat", ["cls_b", "h"], ["c"], name="cat", axis=1),
             helper.make_node("Relu", ["c"], ["r"], name="relu"), _mm("r", "W2", "y")]
    path = build(nodes, [("x", FLOAT, ["B", "S", 4])], [("y", FLOAT, ["B", "T", 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3), "cls": _f(rng, 1, 1, 6),
                  "one_d": np.array([1, 6], np.int64)})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] != "clear" and {"c", "r"} <= set(space["tensors"])
    result = compile_exact(path, [{"x": _f(rng, 2, 3, 4)}, {"x": _f(rng, 1, 5, 4)}])
    assert result.report["exposure"]["intermediates_exposed"] == 0
