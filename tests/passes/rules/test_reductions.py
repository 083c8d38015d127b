"""eecompile.passes.rules.reductions: Softmax, ArgMax, TopK and Reduce* over (or beside) the protected axis.

Over the axis: Softmax/ArgMax/TopK/ReduceMax allow permutations only (ArgMax and TopK indices become
permuted index values, TopK values are clear); a mean or sum needs a ones-preserving basis.
Beside the axis a linear reduction keeps any basis.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import eecompile

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _mm(a, w, out):
    return helper.make_node("MatMul", [a, w], [out], name=f"mm_{out}")


def _classifier(build, rng, head_nodes, outputs):
    # tanh, not relu: a row killed by relu gives all-equal logits, and ArgMax breaks ties by position
    return build([_mm("x", "W1", "h"), helper.make_node("Tanh", ["h"], ["r"], name="tanh"), _mm("r", "W2", "logits"),
                  *head_nodes],
                 [("x", FLOAT, ["B", 4])], outputs, {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 5), "k": np.array([2])})


def test_class_logits_without_a_head_stay_dense(rng, build, lint, compile_exact):
    path = _classifier(build, rng, [], [("logits", FLOAT, ["B", 5])])
    assert lint(path).basis("logits") == "invertible"
    compile_exact(path, {"x": _f(rng, 3, 4)})


@pytest.mark.parametrize("op", ["Softmax", "LogSoftmax"])
def test_softmax_over_the_axis_is_permutation(op, rng, build, lint, compile_exact):
    path = _classifier(build, rng, [helper.make_node(op, ["logits"], ["p"], name="softmax", axis=-1)],
                       [("p", FLOAT, ["B", 5])])
    report = lint(path)
    space = report.space("logits")
    assert space["basis"] == "permutation" and "p" in space["tensors"]
    assert space["limited_by"] == {"node": "softmax", "op_type": op, "reason": f"{op} commutes only with permutations"}
    assert report.protection("outputs", "p") == "basis change on axis 1: permutation"  # the label stays hidden
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_argmax_gives_permuted_index_values(rng, build, lint, compile_exact, tmp_path):
    path = _classifier(build, rng, [helper.make_node("ArgMax", ["logits"], ["label"], name="argmax", axis=-1,
                                                     keepdims=0)],
                       [("label", INT64, ["B"])])
    report = lint(path)
    assert report.basis("logits") == "permutation"
    assert report.protection("outputs", "label") == "permuted index values (5 classes)"
    result = compile_exact(path, {"x": _f(rng, 8, 4)})
    # the server's labels are the permuted ones: the server does not learn the class
    x = _f(rng, 64, 4)
    client = eecompile.Client.load(result.client_dir)
    server = ort.InferenceSession(str(result.server_model), providers=["CPUExecutionProvider"])
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cipher = server.run(None, client.encrypt({"x": x}))[0]
    assert not np.array_equal(plain, cipher)
    np.testing.assert_array_equal(client.decrypt({"label": cipher})["label"], plain)


def test_topk_values_clear_indices_permuted(rng, build, lint, compile_exact):
    path = _classifier(build, rng, [helper.make_node("TopK", ["logits", "k"], ["values", "indices"], name="topk",
                                                     axis=-1)],
                       [("values", FLOAT, ["B", 2]), ("indices", INT64, ["B", 2])])
    report = lint(path)
    assert report.basis("logits") == "permutation"
    assert report.protection("outputs", "values") == "clear"
    assert report.protection("outputs", "indices") == "permuted index values (5 classes)"
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_mean_over_the_axis_needs_ones_orthogonal(rng, build, lint, compile_exact):
    """Centering ``h - mean(h)``: the mean is basis-free only if ``1·T = 1``."""
    path = build([_mm("x", "W1", "h"), helper.make_node("ReduceMean", ["h", "axes"], ["m"], name="mean"),
                  helper.make_node("Sub", ["h", "m"], ["c"], name="center"), _mm("c", "W2", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 2])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 2), "axes": np.array([-1])})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "ones-orthogonal" and space["limited_by"]["node"] == "mean"
    assert "c" in space["tensors"]
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_max_over_the_axis_is_permutation(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("ReduceMax", ["h", "axes"], ["m"], name="max", keepdims=0)],
                 [("x", FLOAT, ["B", 4])], [("m", FLOAT, ["B"])], {"W1": _f(rng, 4, 6), "axes": np.array([1])})
    report = lint(path)
    assert report.basis("h") == "permutation"
    assert report.protection("outputs", "m") == "clear"
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_sum_beside_the_axis_keeps_any_basis(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("ReduceSum", ["h", "axes"], ["s"], name="sum_rows",
                                                        keepdims=0),
                  _mm("s", "W2", "y")],
                 [("x", FLOAT, [2, 5, 4])], [("y", FLOAT, [2, 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3), "axes": np.array([1])})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "invertible" and "s" in space["tensors"]
    compile_exact(path, {"x": _f(rng, 2, 5, 4)})


def test_max_beside_the_axis(rng, build, lint, compile_exact):
    """Global max pooling over tokens, ``amax(h, dim=1)``."""
    path = build([_mm("x", "W1", "h"), helper.make_node("ReduceMax", ["h", "axes"], ["m"], name="max_rows",
                                                        keepdims=0),
                  _mm("m", "W2", "y")],
                 [("x", FLOAT, [2, 5, 4])], [("y", FLOAT, [2, 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3), "axes": np.array([1])})
    report = lint(path)
    assert report.space("h")["class"] in ("positive-monomial", "permutation")
    compile_exact(path, {"x": _f(rng, 2, 5, 4)})


def test_softmax_beside_the_axis_is_permutation(rng, build, lint, compile_exact):
    """A softmax over tokens for each feature (attention pooling) still needs a permutation."""
    path = build([_mm("x", "W1", "h"), helper.make_node("Softmax", ["h"], ["p"], name="softmax", axis=1),
                  _mm("p", "W2", "y")],
                 [("x", FLOAT, [2, 5, 4])], [("y", FLOAT, [2, 5, 3])], {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3)})
    report = lint(path)
    assert report.basis("h") == "permutation" and "p" in report.space("h")["tensors"]
    compile_exact(path, {"x": _f(rng, 2, 5, 4)})


def test_argmax_of_generated_logits(rng, build, lint, compile_exact):
    """Greedy decoding inside the graph: ids in, next id out, both permuted index values."""
    path = _greedy_lm(build, rng)
    report = lint(path)
    assert report.protection("inputs", "ids") == report.protection("outputs", "next_id") == \
        "permuted index values (7 classes)"
    assert report.space("logits")["basis"] == "permutation"
    compile_exact(path, {"ids": rng.integers(0, 7, 9).astype(np.int64)})


def _greedy_lm(build, rng):
    return build([helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"), _mm("e", "W", "logits"),
                  helper.make_node("ArgMax", ["logits"], ["next_id"], name="argmax", axis=-1, keepdims=0)],
                 [("ids", INT64, ["B"])], [("next_id", INT64, ["B"])], {"E": _f(rng, 7, 4), "W": _f(rng, 4, 7)})


def test_generated_ids_use_the_token_id_permutation(rng, build, tmp_path):
    path = _greedy_lm(build, rng)
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    client = eecompile.Client.load(result.client_dir)
    ids = np.arange(7, dtype=np.int64)
    plain_next = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    server = ort.InferenceSession(str(result.server_model), providers=["CPUExecutionProvider"])
    cipher_next = server.run(None, client.encrypt({"ids": ids}))[0]
    np.testing.assert_array_equal(cipher_next, client.encrypt({"ids": plain_next})["ids"])
