"""eecompile.passes.analyze: the dataflow driver over the op-rule registry.

Graph inputs are bound by their first value-reading consumer; ops without a rule clear what
they touch and are listed; token ids and vocabulary logits share one permutation; KV-cache
``past*``/``present*`` tensors are server-side state.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

import eecompile
from eecompile.passes.analyze import analyze
from eecompile.passes.annotations import IndexValues, Protected
from eecompile.passes.graph import ModelGraph, infer_shapes, load_model
from eecompile.passes.normalize import normalize
from eecompile.passes.rules import unregistered
from eecompile.passes.spaces import BasisClass

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def _analysis(path):
    mg = ModelGraph(infer_shapes(load_model(path)))
    normalize(mg)
    return analyze(ModelGraph(infer_shapes(mg.export())))


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# -- binding graph inputs ----------------------------------------------------------------------


def test_shape_consumer_does_not_bind_an_input(rng, build, lint, compile_exact):
    path = build([helper.make_node("Shape", ["x"], ["s"], name="shape"),
                  helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                  helper.make_node("Reshape", ["h", "s"], ["y"], name="reshape")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 4])], {"W": _f(rng, 4, 4)})
    analysis = _analysis(path)
    assert analysis.mg.nodes[0].op == "Shape"  # the Shape node is reached first ...
    x = analysis.ctx.get(analysis.mg.tensors["x"])
    assert isinstance(x, Protected) and x.axis == 1  # ... yet the MatMul binds x
    report = lint(path)
    assert report.basis("x") == "invertible"
    assert report.protection("inputs", "x").startswith("basis change on axis 1")
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_first_value_reading_consumer_binds_an_input(rng, build, lint, compile_exact):
    """Relu reads x first and has no binding proposal: x stays clear although a MatMul also reads it."""
    path = build([helper.make_node("Relu", ["x"], ["r"], name="relu"),
                  helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                 [("x", FLOAT, ["B", 4])], [("r", FLOAT, ["B", 4]), ("y", FLOAT, ["B", 4])], {"W": _f(rng, 4, 4)})
    analysis = _analysis(path)
    assert analysis.ctx.get(analysis.mg.tensors["x"]) is None
    report = lint(path)
    assert report.protection("inputs", "x") == "clear"
    assert not [s for s in report["spaces"] if "x" in s["tensors"]]
    assert report.basis("y") == "invertible"
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_add_binds_an_input_to_the_other_operand(rng, build, lint, compile_exact):
    path = build([helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
                  helper.make_node("Add", ["h", "skip"], ["s"], name="add"),
                  helper.make_node("MatMul", ["s", "W2"], ["y"], name="mm2")],
                 [("x", FLOAT, ["B", 4]), ("skip", FLOAT, ["B", 5])], [("y", FLOAT, ["B", 3])],
                 {"W": _f(rng, 4, 5), "W2": _f(rng, 5, 3)})
    report = lint(path)
    assert report.space("skip")["name"] == report.space("h")["name"]
    assert report.basis("skip") == "invertible"
    compile_exact(path, {"x": _f(rng, 2, 4), "skip": _f(rng, 2, 5)})


# -- ops without a rule ------------------------------------------------------------------------


def _mlp(build, rng, act_node, extra_opsets=()):
    return build([helper.make_node("MatMul", ["x", "W1"], ["a"], name="mm1"), act_node,
                  helper.make_node("MatMul", ["g", "W2"], ["y"], name="mm2")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])], {"W1": _f(rng, 4, 5), "W2": _f(rng, 5, 3)},
                 extra_opsets=extra_opsets)


def test_unregistered_op_clears_its_spaces_and_is_reported(rng, build, lint, compile_exact):
    path = _mlp(build, rng, helper.make_node("Gelu", ["a"], ["g"], name="the_gelu"))
    assert lint(path).basis("a") == "permutation"  # with its rule: a permutation
    with unregistered("Gelu"):
        analysis = _analysis(path)
        report = lint(path)
        assert [(u.node, u.op_type, u.domain) for u in analysis.unsupported] == [("the_gelu", "Gelu", "ai.onnx")]
        assert report["unsupported_ops"] == [{"node": "the_gelu", "op_type": "Gelu", "domain": "ai.onnx"}]
        space = report.space("a")
        assert space["basis"] == "clear"
        assert space["limited_by"]["node"] == "the_gelu" and "no rule" in space["limited_by"]["reason"]
        assert analysis.ctx.get(analysis.mg.tensors["g"]) is None
        # the spaces it does not touch keep their strength
        assert report.basis("x") == "invertible" and report.basis("y") == "invertible"
        compile_exact(path, {"x": _f(rng, 3, 4)})
    assert lint(path)["unsupported_ops"] == []  # the rule is back


def test_custom_domain_op_is_reported_by_lint(rng, build, lint):
    node = helper.make_node("FancyAct", ["a"], ["g"], name="fancy", domain="com.example")
    path = _mlp(build, rng, node, extra_opsets=[("com.example", 1)])
    report = lint(path)
    assert report["unsupported_ops"] == [{"node": "fancy", "op_type": "FancyAct", "domain": "com.example"}]
    assert report.basis("a") == "clear"
    assert "com.example::FancyAct" in report.space("a")["limited_by"]["reason"]
    assert report.basis("x") == "invertible"
    assert any("without an op rule" in w for w in report["weaknesses"])


# -- the vocabulary tie ------------------------------------------------------------------------


def _lm(build, rng, vocab: int, out_vocab: int):
    return build([helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
                  helper.make_node("MatMul", ["h", "W"], ["logits"], name="head")],
                 [("ids", INT64, ["B", "S"])], [("logits", FLOAT, ["B", "S", out_vocab])],
                 {"E": _f(rng, vocab, 6), "W": _f(rng, 6, out_vocab)})


def test_token_ids_and_logits_share_one_permutation(rng, build, lint, compile_exact):
    path = _lm(build, rng, 13, 13)
    report = lint(path)
    space = report.space("ids")
    assert space["name"] == report.space("logits")["name"]
    assert space["basis"] == "permutation" and space["size"] == 13
    assert any("vocabulary tie" in p and "logits" in p for p in report["policies"])
    assert report.protection("inputs", "ids") == "permuted index values (13 classes)"
    ids = rng.integers(0, 13, (2, 5)).astype(np.int64)
    result = compile_exact(path, {"ids": ids})
    # greedy decoding on the server: argmax of ciphertext logits is the ciphertext of the next id
    client = eecompile.Client.load(result.client_dir)
    plain = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    server = ort.InferenceSession(str(result.server_model), providers=["CPUExecutionProvider"])
    cipher = server.run(None, client.encrypt({"ids": ids}))[0]
    next_plain = plain.argmax(-1).astype(np.int64)
    assert not np.array_equal(cipher, plain)
    np.testing.assert_array_equal(cipher.argmax(-1), client.encrypt({"ids": next_plain})["ids"])


def test_no_tie_when_sizes_differ(rng, build, lint, compile_exact):
    path = _lm(build, rng, 13, 7)
    report = lint(path)
    assert report.space("ids")["name"] != report.space("logits")["name"]
    assert report.basis("logits") == "invertible"  # nothing follows the head: a dense basis
    assert not any("vocabulary tie" in p for p in report["policies"])
    compile_exact(path, {"ids": rng.integers(0, 13, (2, 4)).astype(np.int64)})


# -- KV-cache state ------------------------------------------------------------------------------


def _kv(build, rng):
    return build([helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
                  helper.make_node("Concat", ["past_key", "k"], ["present_key"], name="cache", axis=1),
                  helper.make_node("MatMul", ["present_key", "Wo"], ["y"], name="out")],
                 [("x", FLOAT, ["B", "S", 6]), ("past_key", FLOAT, ["B", "P", 6])],
                 [("y", FLOAT, ["B", "T", 3]), ("present_key", FLOAT, ["B", "T", 6])],
                 {"Wk": _f(rng, 6, 6), "Wo": _f(rng, 6, 3)})


def test_past_and_present_are_state(rng, build, lint, tmp_path):
    path = _kv(build, rng)
    analysis = _analysis(path)
    assert analysis.state_inputs == ["past_key"] and analysis.state_outputs == ["present_key"]
    report = lint(path)
    assert "server-side state" in report.protection("inputs", "past_key")
    assert "server-side state" in report.protection("outputs", "present_key")
    assert report.protection("inputs", "x").startswith("basis change")
    assert report.basis("past_key") == "invertible"  # the cache lives in the key space

    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    client = eecompile.Client.load(result.client_dir)
    assert client.state_inputs == ["past_key"] and client.state_outputs == ["present_key"]
    past = _f(rng, 2, 3, 6)
    assert client.encrypt({"past_key": past})["past_key"] is past or np.array_equal(
        client.encrypt({"past_key": past})["past_key"], past)

    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    enc = eecompile.EncryptedSession(result.out_dir, providers=["CPUExecutionProvider"])
    plain_past = cipher_past = np.zeros((2, 0, 6), np.float32)
    for step in range(3):
        x = _f(rng, 2, 2 if step == 0 else 1, 6)
        y_plain, present_plain = ref.run(None, {"x": x, "past_key": plain_past})
        y_enc, present_cipher = enc.run(None, {"x": x, "past_key": cipher_past})
        scale = np.abs(y_plain).max()
        assert np.abs(y_plain - y_enc).max() / scale <= 1e-5, f"step {step}"
        assert present_cipher.shape == present_plain.shape
        assert not np.allclose(present_cipher, present_plain)  # the cache stays ciphertext
        plain_past, cipher_past = present_plain, present_cipher


def test_state_names(build):
    """KV-cache names (past_key_values.N / past_key / present.N) mark state; other uses of the words do not."""
    pairs = (("past_key_values.0.key", "present.0.key"), ("compass", "representative"), ("x_past", "y"),
             ("past_values", "future_values"))
    nodes = [helper.make_node("Identity", [i], [o]) for i, o in pairs]
    path = build(nodes, [(i, FLOAT, [2]) for i, _ in pairs], [(o, FLOAT, [2]) for _, o in pairs])
    analysis = _analysis(path)
    assert analysis.state_inputs == ["past_key_values.0.key"]
    assert analysis.state_outputs == ["present.0.key"]


def test_index_values_reaching_a_rule_without_index_support_are_cleared(rng, build, lint, compile_exact):
    """Token ids also used as numbers (Cast to float) cannot stay permuted: the id space is cleared."""
    path = build([helper.make_node("Gather", ["E", "ids"], ["h"], name="embed"),
                  helper.make_node("Cast", ["ids"], ["idf"], name="cast", to=FLOAT),
                  helper.make_node("Unsqueeze", ["idf", "ax"], ["idu"], name="unsq"),
                  helper.make_node("Add", ["h", "idu"], ["y"], name="add")],
                 [("ids", INT64, ["B", "S"])], [("y", FLOAT, ["B", "S", 4])],
                 {"E": _f(rng, 9, 4), "ax": np.array([-1], np.int64)})
    analysis = _analysis(path)
    assert analysis.ctx.get(analysis.mg.tensors["ids"]) is None
    report = lint(path)
    space = report.space("ids")
    assert space["basis"] == "clear" and space["limited_by"]["node"] == "cast"
    assert report.protection("inputs", "ids") == "clear"
    assert report.basis("h") == "ones-orthogonal"  # a per-row scalar is added to every coordinate
    compile_exact(path, {"ids": rng.integers(0, 9, (2, 5)).astype(np.int64)})
