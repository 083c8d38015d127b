"""eecompile.passes.rules.elementwise: binary arithmetic, unary functions, Where and Cast.

A linear op allows any basis, an odd function a signed permutation, Relu positive scales,
any other nonlinearity a permutation; two activations added share one space; a constant
added is folded (``c' = c·T``, a scalar becoming a vector); a per-coordinate gain allows
monomial bases; ``silu(g) * u`` shares one permutation and puts the scales on ``u``.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

FLOAT, BOOL = TensorProto.FLOAT, TensorProto.BOOL
D = 6


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _mm(a, w, out):
    return helper.make_node("MatMul", [a, w], [out], name=f"mm_{out}")


def _init(path, name):
    return next(numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.name == name)


# -- unary functions ---------------------------------------------------------------------------


@pytest.mark.parametrize("op,basis,cls", [
    ("Identity", "invertible", "invertible"),
    ("Neg", "invertible", "invertible"),
    ("Relu", "monomial", "positive-monomial"),
    ("LeakyRelu", "monomial", "positive-monomial"),
    ("Tanh", "signed-permutation", "signed-permutation"),
    ("Erf", "signed-permutation", "signed-permutation"),
    ("Sigmoid", "permutation", "permutation"),
    ("Gelu", "permutation", "permutation"),
    ("Exp", "permutation", "permutation"),
    ("Abs", "permutation", "permutation"),
])
def test_unary_function(op, basis, cls, rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node(op, ["h"], ["a"], name="fn"), _mm("a", "W2", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])], {"W1": _f(rng, 4, D), "W2": _f(rng, D, 3)})
    report = lint(path)
    space = report.space("h")
    assert (space["basis"], space["class"]) == (basis, cls)
    assert "a" in space["tensors"]
    if cls != "invertible":
        assert space["limited_by"] == {"node": "fn", "op_type": op,
                                       "reason": f"{op} commutes only with a {cls} basis"}
    compile_exact(path, {"x": _f(rng, 3, 4)})


# -- binary ops ---------------------------------------------------------------------------------


def test_residual_add_shares_one_space(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), _mm("h", "W2", "r"), helper.make_node("Sub", ["h", "r"], ["d"], name="sub"),
                  helper.make_node("Add", ["d", "h"], ["s"], name="add"), _mm("s", "W3", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, D), "W2": _f(rng, D, D), "W3": _f(rng, D, 3)})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "invertible"
    assert {"r", "d", "s"} <= set(space["tensors"])
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_adding_a_clear_per_row_scalar_needs_ones_orthogonal(rng, build, lint, compile_exact):
    """``h + r`` with ``r`` of shape [B, 1] in clear: ``x·T + r·1 = (x + r·1)·T`` needs ``1·T = 1``."""
    path = build([_mm("x", "W1", "h"), helper.make_node("ReduceMean", ["x"], ["row"], name="mean", axes=[1]),
                  helper.make_node("Add", ["h", "row"], ["s"], name="add"), _mm("s", "W3", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])], {"W1": _f(rng, 4, D), "W3": _f(rng, D, 3)},
                 opset=17)
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "ones-orthogonal" and space["limited_by"]["node"] == "add"
    assert report.basis("x") == "ones-orthogonal"  # a mean over the protected axis
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_adding_two_protected_spaces_of_different_sizes_clears_both(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), _mm("x", "Wr", "row"), helper.make_node("Add", ["h", "row"], ["s"], name="add"),
                  _mm("s", "W3", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, D), "Wr": _f(rng, 4, 1), "W3": _f(rng, D, 3)})
    report = lint(path)
    assert report.basis("h") == "clear" and report.basis("row") == "clear"
    assert report.basis("x") == "invertible"
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_graph_input_broadcast_along_the_protected_axis(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Add", ["h", "row"], ["s"], name="add"), _mm("s", "W3", "y")],
                 [("x", FLOAT, ["B", 4]), ("row", FLOAT, ["B", 1])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, D), "W3": _f(rng, D, 3)})
    report = lint(path)
    assert report.protection("inputs", "row") == "clear"
    compile_exact(path, {"x": _f(rng, 3, 4), "row": _f(rng, 3, 1)})


def test_constant_vector_and_scalar_additions_are_folded(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Add", ["h", "c"], ["a"], name="add_vec"),
                  helper.make_node("Sub", ["s", "a"], ["b"], name="rsub_scalar"), _mm("b", "W2", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, D), "c": _f(rng, D), "s": np.array(1.5, np.float32), "W2": _f(rng, D, 3)})
    report = lint(path)
    assert report.basis("h") == "invertible"
    assert {"a", "b"} <= set(report.space("h")["tensors"])
    result = compile_exact(path, {"x": _f(rng, 3, 4)})
    folded_scalar = _init(result.server_model, "s")
    assert folded_scalar.shape == (D,)  # the broadcast scalar became the vector s·1·T
    assert not np.allclose(folded_scalar, 1.5)
    assert not np.allclose(_init(result.server_model, "c"), _init(path, "c"))


def test_shared_scalar_added_in_two_spaces(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "a"), helper.make_node("Add", ["a", "one"], ["a1"], name="add1"), _mm("a1", "W2", "y"),
                  _mm("x", "W3", "b"), helper.make_node("Add", ["b", "one"], ["b1"], name="add2"), _mm("b1", "W4", "z")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3]), ("z", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, D), "W2": _f(rng, D, 3), "W3": _f(rng, 4, D), "W4": _f(rng, D, 3),
                  "one": np.array(1.0, np.float32)})
    report = lint(path)
    assert report.basis("a") == report.basis("b") == "invertible"
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_mul_by_constant_vector_allows_monomial(rng, build, lint, compile_exact):
    """The gain cannot be folded (the product is a graph output): a permuted, rescaled gain."""
    path = build([_mm("x", "W1", "h"), helper.make_node("Mul", ["h", "g"], ["y"], name="gain")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", D])], {"W1": _f(rng, 4, D), "g": _f(rng, D)})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "monomial" and space["class"] == "monomial"
    assert space["limited_by"]["node"] == "gain"
    result = compile_exact(path, {"x": _f(rng, 3, 4)})
    g, g_folded = _init(path, "g"), _init(result.server_model, "g")
    assert sorted(g.tolist()) == sorted(g_folded.tolist()) and not np.array_equal(g, g_folded)  # permuted


def test_mul_by_a_per_token_constant_keeps_any_basis(rng, build, lint, compile_exact):
    """A constant that varies along the tokens but not along the protected axis is a scalar per row."""
    path = build([_mm("x", "W1", "h"), helper.make_node("Mul", ["h", "c"], ["s"], name="token_scale"),
                  _mm("s", "W2", "y")],
                 [("x", FLOAT, ["B", 3, 4])], [("y", FLOAT, ["B", 3, 2])],
                 {"W1": _f(rng, 4, D), "c": _f(rng, 3, 1), "W2": _f(rng, D, 2)})
    report = lint(path)
    assert report.basis("h") == "invertible" and "s" in report.space("h")["tensors"]
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


def test_mul_and_div_by_scalar_keep_any_basis(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Mul", ["h", "s"], ["a"], name="mul"),
                  helper.make_node("Div", ["a", "t"], ["y"], name="div")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", D])],
                 {"W1": _f(rng, 4, D), "s": np.array(3.0, np.float32), "t": np.array([2.0], np.float32)})
    report = lint(path)
    assert report.basis("h") == "invertible" and "y" in report.space("h")["tensors"]
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_reciprocal_allows_permutation_only(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Div", ["s", "h"], ["y"], name="rdiv")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", D])],
                 {"W1": _f(rng, 4, D), "s": np.array(3.0, np.float32)})
    report = lint(path)
    assert report.basis("h") == "permutation"
    assert report.space("h")["limited_by"]["reason"] == "reciprocal of protected values"
    x = _f(rng, 3, 4)
    compile_exact(path, {"x": x})


def test_pow_other_than_a_summed_square_is_permutation(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Pow", ["h", "three"], ["c"], name="cube"), _mm("c", "W2", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, D), "three": np.array(3.0, np.float32), "W2": _f(rng, D, 3)})
    report = lint(path)
    assert report.basis("h") == "permutation" and report.space("h")["limited_by"]["node"] == "cube"
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_silu_is_a_permutation(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Sigmoid", ["h"], ["sg"], name="sig"),
                  helper.make_node("Mul", ["h", "sg"], ["a"], name="silu"), _mm("a", "W2", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])], {"W1": _f(rng, 4, D), "W2": _f(rng, D, 3)})
    report = lint(path)
    assert report.basis("h") == "permutation" and {"sg", "a"} <= set(report.space("h")["tensors"])
    compile_exact(path, {"x": _f(rng, 3, 4)})


@pytest.mark.parametrize("order", ["silu*u", "u*silu"])
def test_swiglu_shares_a_permutation_and_scales_the_up_branch(order, rng, build, lint, compile_exact):
    operands = ["silu", "u"] if order == "silu*u" else ["u", "silu"]
    path = build([_mm("x", "Wg", "g"), _mm("x", "Wu", "u"), helper.make_node("Sigmoid", ["g"], ["sg"], name="sig"),
                  helper.make_node("Mul", ["g", "sg"], ["silu"], name="silu_mul"),
                  helper.make_node("Mul", operands, ["p"], name="gate"), _mm("p", "Wd", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 4])],
                 {"Wg": _f(rng, 4, D), "Wu": _f(rng, 4, D), "Wd": _f(rng, D, 4)})
    report = lint(path)
    gate, up = report.space("g"), report.space("u")
    assert gate["name"] != up["name"]  # two spaces ...
    assert gate["basis"] == "permutation"
    assert up["class"] == "monomial" and "p" in up["tensors"]  # ... the product lives on the scaled up branch
    assert up["limited_by"]["node"] == "gate"
    result = compile_exact(path, {"x": _f(rng, 3, 4)})
    # one shared permutation: the folded gate and up weights permute the same columns
    wg, wu = _init(path, "Wg"), _init(path, "Wu")
    wg2, wu2 = _init(result.server_model, "Wg"), _init(result.server_model, "Wu")
    assert not np.allclose(wg, wg2) and not np.allclose(wu, wu2)


# -- Where --------------------------------------------------------------------------------------


def test_where_with_a_row_condition_and_constant_fill(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Where", ["cond", "h", "fill"], ["w"], name="where"),
                  _mm("w", "W2", "y")],
                 [("x", FLOAT, ["B", 3, 4])], [("y", FLOAT, ["B", 3, 2])],
                 {"W1": _f(rng, 4, D), "W2": _f(rng, D, 2), "cond": np.array([[True], [False], [True]]),
                  "fill": np.array(-1.0, np.float32)})
    report = lint(path)
    assert report.basis("h") == "invertible" and "w" in report.space("h")["tensors"]
    result = compile_exact(path, {"x": _f(rng, 2, 3, 4)})
    assert _init(result.server_model, "fill").shape == (D,)  # the fill is expressed in the basis


def test_where_between_two_activations_unifies_them(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), _mm("x", "W3", "h2"), helper.make_node("Where", ["m", "h", "h2"], ["w"], name="where"),
                  _mm("w", "W2", "y")],
                 [("x", FLOAT, ["B", 3, 4]), ("m", BOOL, ["B", 3, 1])], [("y", FLOAT, ["B", 3, 2])],
                 {"W1": _f(rng, 4, D), "W3": _f(rng, 4, D), "W2": _f(rng, D, 2)})
    report = lint(path)
    assert report.space("h")["name"] == report.space("h2")["name"] and report.basis("h") == "invertible"
    assert report.protection("inputs", "m") == "clear"
    compile_exact(path, {"x": _f(rng, 2, 3, 4), "m": rng.random((2, 3, 1)) > 0.5})


def test_where_selecting_along_the_protected_axis_clears_it(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Where", ["cond", "h", "zero"], ["w"], name="where"),
                  _mm("w", "W2", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 2])],
                 {"W1": _f(rng, 4, D), "W2": _f(rng, D, 2), "cond": np.array([True, False] * (D // 2)),
                  "zero": np.array(0.0, np.float32)})
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "where"
    assert report.basis("y") == "invertible"
    compile_exact(path, {"x": _f(rng, 3, 4)})


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_where_with_an_infinite_fill(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Where", ["cond", "h", "fill"], ["w"], name="masked_fill")],
                 [("x", FLOAT, ["B", 3, 4])], [("w", FLOAT, ["B", 3, D])],
                 {"W1": _f(rng, 4, D), "cond": np.array([[True], [False], [True]]),
                  "fill": np.array(-np.inf, np.float32)})
    assert lint(path).basis("h") != "clear"
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


# -- Cast -----------------------------------------------------------------------------------------


def test_float_casts_keep_the_basis(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Cast", ["h"], ["hd"], name="to_double", to=TensorProto.DOUBLE),
                  helper.make_node("Cast", ["hd"], ["hf"], name="to_float", to=FLOAT), _mm("hf", "W2", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 2])], {"W1": _f(rng, 4, D), "W2": _f(rng, D, 2)})
    report = lint(path)
    assert report.basis("h") == "invertible" and {"hd", "hf"} <= set(report.space("h")["tensors"])
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_cast_to_integers_clears(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Cast", ["h"], ["hi"], name="to_int", to=TensorProto.INT64)],
                 [("x", FLOAT, ["B", 4])], [("hi", TensorProto.INT64, ["B", D])], {"W1": _f(rng, 4, D)})
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "to_int"
    assert report.protection("outputs", "hi") == "clear"
    compile_exact(path, {"x": 10 * _f(rng, 3, 4)})
