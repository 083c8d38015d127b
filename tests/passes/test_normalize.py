"""eecompile.passes.normalize: canonical forms that keep the function and help the analysis.

Constant nodes become initializers, constant transposes are folded (untying a tied LM head),
SliceGPT-style gains are folded into the following linear layers, shared initializers are
cloned, and every node gets a unique name. Each rewrite is checked to keep the function
(ONNX Runtime before and after).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eecompile.passes.graph import ModelGraph, infer_shapes
from eecompile.passes.normalize import normalize

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def _normalized(model: onnx.ModelProto):
    mg = ModelGraph(infer_shapes(model))
    result = normalize(mg)
    return mg, result


def _run(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _assert_same_function(before: onnx.ModelProto, after: onnx.ModelProto, feeds: dict, tol: float = 1e-5):
    for a, b in zip(_run(before, feeds), _run(after, feeds)):
        scale = max(float(np.abs(a).max()), 1e-30)
        assert float(np.abs(a - b).max()) / scale <= tol


def _node(mg: ModelGraph, name: str) -> gs.Node:
    return next(n for n in mg.nodes if n.name == name)


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# -- constants and transposes ----------------------------------------------------------------


def test_constant_nodes_become_initializers(make_model, rng):
    c = _f(rng, 4)
    model = make_model(
        [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(c, "cv"), name="const"),
         helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("Add", ["h", "c"], ["y"], name="add")],
        [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 4])], {"W": _f(rng, 4, 4)})
    mg, _ = _normalized(model)
    assert "Constant" not in [n.op for n in mg.nodes]
    bias = _node(mg, "add").inputs[1]
    assert isinstance(bias, gs.Constant)
    np.testing.assert_array_equal(np.asarray(bias.values), c)
    exported = mg.export()
    assert not [n for n in exported.graph.node if n.op_type == "Constant"]
    _assert_same_function(model, exported, {"x": _f(rng, 3, 4)})


def _tied(make_model, rng, vocab: int, dim: int) -> onnx.ModelProto:
    """GPT-2's tied head: ``logits = E[ids] @ Transpose(E)``."""
    return make_model(
        [helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
         helper.make_node("Transpose", ["E"], ["E_t"], name="tie", perm=[1, 0]),
         helper.make_node("MatMul", ["h", "E_t"], ["logits"], name="head")],
        [("ids", INT64, ["B", "S"])], [("logits", FLOAT, ["B", "S", vocab])], {"E": _f(rng, vocab, dim)})


@pytest.mark.parametrize("vocab,dim", [(12, 4), (1100, 240)], ids=["small-table", "table-over-1MiB"])
def test_tied_embedding_is_untied(make_model, vocab, dim, rng):
    model = _tied(make_model, rng, vocab, dim)
    mg, _ = _normalized(model)
    assert "Transpose" not in [n.op for n in mg.nodes]
    table, head = _node(mg, "embed").inputs[0], _node(mg, "head").inputs[1]
    assert isinstance(table, gs.Constant) and isinstance(head, gs.Constant)
    assert table is not head and table.name != head.name  # two tensors: each folds in its own basis
    np.testing.assert_array_equal(np.asarray(head.values), np.asarray(table.values).T)
    ids = rng.integers(0, vocab, (2, 3)).astype(np.int64)
    _assert_same_function(model, mg.export(), {"ids": ids})


def test_untying_a_large_table_is_stated_in_the_report_policy(make_model, rng, build, lint):
    model = _tied(make_model, rng, 1100, 240)
    path = build(model)
    policies = lint(path)["policies"]
    assert any("untied" in p and "E" in p for p in policies), policies


def test_untying_a_small_table_is_stated_in_the_report_policy(make_model, rng, build, lint):
    model = _tied(make_model, rng, 12, 4)
    path = build(model)
    policies = lint(path)["policies"]
    assert any("untied" in p for p in policies), policies


# -- SliceGPT gain folding -------------------------------------------------------------------


def _ln_into_linears(make_model, rng, dim: int = 6) -> onnx.ModelProto:
    return make_model(
        [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln", axis=-1),
         helper.make_node("MatMul", ["n", "W1"], ["y1"], name="mm"),
         helper.make_node("Gemm", ["n", "W2", "c2"], ["y2"], name="gemm", transB=1)],
        [("x", FLOAT, [3, dim])], [("y1", FLOAT, [3, 4]), ("y2", FLOAT, [3, 5])],
        {"gamma": _f(rng, dim) + 2.0, "beta": _f(rng, dim), "W1": _f(rng, dim, 4), "W2": _f(rng, 5, dim),
         "c2": _f(rng, 5)}, opset=17)


def test_layernorm_gain_feeding_only_linears_becomes_ones(make_model, rng):
    model = _ln_into_linears(make_model, rng)
    mg, result = _normalized(model)
    assert result.gains_folded == ["ln"]
    ln = _node(mg, "ln")
    np.testing.assert_array_equal(np.asarray(ln.inputs[1].values), np.ones(6, np.float32))
    gamma = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "gamma"))
    beta = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "beta"))
    np.testing.assert_allclose(np.asarray(ln.inputs[2].values), beta / gamma, rtol=1e-6)  # b' = b / g
    w1 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "W1"))
    np.testing.assert_allclose(np.asarray(_node(mg, "mm").inputs[1].values), gamma[:, None] * w1, rtol=1e-6)
    _assert_same_function(model, mg.export(), {"x": _f(rng, 3, 6)})


def test_mul_by_constant_vector_feeding_a_linear_is_folded(make_model, rng):
    model = make_model(
        [helper.make_node("Mul", ["x", "g"], ["n"], name="gain"),
         helper.make_node("MatMul", ["n", "W"], ["y"], name="mm")],
        [("x", FLOAT, ["B", 5])], [("y", FLOAT, ["B", 3])], {"g": _f(rng, 5) + 2.0, "W": _f(rng, 5, 3)})
    mg, result = _normalized(model)
    assert result.gains_folded == ["gain"]
    np.testing.assert_array_equal(np.asarray(_node(mg, "gain").inputs[1].values), np.ones(5, np.float32))
    _assert_same_function(model, mg.export(), {"x": _f(rng, 4, 5)})


def test_rms_norm_gain_is_folded(make_model, rng):
    model = make_model(
        [helper.make_node("RMSNormalization", ["x", "g"], ["n"], name="rms", axis=-1),
         helper.make_node("MatMul", ["n", "W"], ["y"], name="mm")],
        [("x", FLOAT, [2, 3, 8])], [("y", FLOAT, [2, 3, 4])], {"g": _f(rng, 8) + 2.0, "W": _f(rng, 8, 4)},
        opset=23)
    mg, result = _normalized(model)
    assert result.gains_folded == ["rms"]
    _assert_same_function(model, mg.export(), {"x": _f(rng, 2, 3, 8)})


@pytest.mark.parametrize("second", ["Relu", "output"])
def test_gain_with_a_non_linear_consumer_is_not_folded(make_model, second, rng):
    gamma = _f(rng, 6) + 2.0
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["n"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n", "W"], ["y"], name="mm")]
    outputs = [("y", FLOAT, [3, 4])]
    if second == "Relu":
        nodes.append(helper.make_node("Relu", ["n"], ["r"], name="relu"))
        outputs.append(("r", FLOAT, [3, 6]))
    else:
        outputs.append(("n", FLOAT, [3, 6]))
    model = make_model(nodes, [("x", FLOAT, [3, 6])], outputs,
                       {"gamma": gamma, "beta": _f(rng, 6), "W": _f(rng, 6, 4)}, opset=17)
    mg, result = _normalized(model)
    assert result.gains_folded == []
    np.testing.assert_array_equal(np.asarray(_node(mg, "ln").inputs[1].values), gamma)


def test_mul_gain_into_relu_is_not_folded(make_model, rng):
    g = _f(rng, 5) + 2.0
    model = make_model(
        [helper.make_node("Mul", ["x", "g"], ["n"], name="gain"), helper.make_node("Relu", ["n"], ["y"])],
        [("x", FLOAT, ["B", 5])], [("y", FLOAT, ["B", 5])], {"g": g})
    mg, result = _normalized(model)
    assert result.gains_folded == []
    np.testing.assert_array_equal(np.asarray(_node(mg, "gain").inputs[1].values), g)


def test_ones_gain_is_left_alone(make_model, rng):
    model = make_model(
        [helper.make_node("LayerNormalization", ["x", "gamma"], ["n"], name="ln", axis=-1),
         helper.make_node("MatMul", ["n", "W"], ["y"], name="mm")],
        [("x", FLOAT, [3, 6])], [("y", FLOAT, [3, 4])], {"gamma": np.ones(6, np.float32), "W": _f(rng, 6, 4)},
        opset=17)
    mg, result = _normalized(model)
    assert result.gains_folded == []
    assert _node(mg, "mm").inputs[1].name == "W"


# -- cloning and naming ----------------------------------------------------------------------


CLONE_BUG = ("normalize._clone_shared builds the clone as gs.Constant(name, tensor._values), sharing the original's "
             "LazyValues; graphsurgeon's exporter reuses LazyValues.tensor and renames that one TensorProto, so the "
             "post-normalize export has two initializers named 'W_clone1' and none named 'W' (onnx.checker: name "
             "is not unique), and the re-imported graph loses the first consumer's weight")


def test_shared_initializers_are_cloned(make_model, rng):
    w = _f(rng, 4, 4)
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["a"], name="m1"),
         helper.make_node("MatMul", ["z", "W"], ["b"], name="m2")],
        [("x", FLOAT, ["B", 4]), ("z", FLOAT, ["B", 4])], [("a", FLOAT, ["B", 4]), ("b", FLOAT, ["B", 4])],
        {"W": w})
    mg, result = _normalized(model)
    assert result.clones == 1
    w1, w2 = _node(mg, "m1").inputs[1], _node(mg, "m2").inputs[1]
    assert w1 is not w2 and w1.name != w2.name
    exported = mg.export()  # before any pass has touched the values
    onnx.checker.check_model(exported)
    names = [t.name for t in exported.graph.initializer]
    assert sorted(names) == sorted([w1.name, w2.name])
    for t in exported.graph.initializer:
        np.testing.assert_array_equal(numpy_helper.to_array(t), w)
    _assert_same_function(model, exported, {"x": _f(rng, 2, 4), "z": _f(rng, 2, 4)})


def test_shared_weight_compiles_exactly_with_two_bases(rng, build, compile_exact, lint):
    """One initializer feeding two MatMuls whose inputs live in different spaces."""
    path = build([helper.make_node("MatMul", ["x", "W"], ["a"], name="m1"),
                  helper.make_node("MatMul", ["z", "W"], ["b"], name="m2")],
                 [("x", FLOAT, ["B", 4]), ("z", FLOAT, ["B", 4])],
                 [("a", FLOAT, ["B", 4]), ("b", FLOAT, ["B", 4])], {"W": _f(rng, 4, 4)})
    report = lint(path)
    assert report.space("x")["name"] != report.space("z")["name"]
    assert any("cloned" in p for p in report["policies"])
    compile_exact(path, {"x": _f(rng, 2, 4), "z": _f(rng, 2, 4)})


def test_nodes_get_unique_names(make_model, rng):
    model = make_model(
        [helper.make_node("MatMul", ["x", "W"], ["a"]),
         helper.make_node("Relu", ["a"], ["b"], name="dup"),
         helper.make_node("Relu", ["b"], ["c"], name="dup"),
         helper.make_node("Relu", ["c"], ["d"]),
         helper.make_node("Relu", ["d"], ["y"], name="Relu_3")],
        [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 4])], {"W": _f(rng, 4, 4)})
    mg, _ = _normalized(model)
    names = [n.name for n in mg.nodes]
    assert len(names) == 5 and all(names) and len(set(names)) == 5
    assert "dup" in names


def test_constant_subgraphs_fold_when_weights_stay_in_their_file(tmp_path, rng, compile_exact):
    """A legacy-style export: positions gathered from a large table by constant ids and a bias shared through
    Identity — both foldable. With the table left in the model file (read in place, never copied), folding
    must still run: the bias becomes a constant the Add folds, and the residual stays protected."""
    vocab, positions, dim, seq = 50, 512, 64, 8  # the 512 × 64 table is above the in-place threshold
    inits = {"tok": _f(rng, vocab, dim), "pos": _f(rng, positions, dim), "pos_ids": np.arange(seq)[None, :],
             "bias": np.zeros(dim, np.float32), "W": _f(rng, dim, dim)}
    nodes = [helper.make_node("Gather", ["tok", "input_ids"], ["t"], name="tok_gather"),
             helper.make_node("Gather", ["pos", "pos_ids"], ["p"], name="pos_gather"),
             helper.make_node("Add", ["t", "p"], ["h"], name="embed_add"),
             helper.make_node("Identity", ["bias"], ["bias_copy"], name="shared_bias"),
             helper.make_node("MatMul", ["h", "W"], ["hw"], name="proj"),
             helper.make_node("Add", ["hw", "bias_copy"], ["y"], name="proj_bias")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, seq])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, seq, dim])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))  # embedded: the loader references its large weights in place
    report = compile_exact(path, {"input_ids": rng.integers(0, vocab, (1, seq))}).report
    spaces = {t: s["basis"] for s in report["spaces"] for t in s["tensors"]}
    assert spaces["hw"] != "clear" and spaces["h"] != "clear", spaces
    assert report["exposure"]["intermediates_exposed"] == 0
