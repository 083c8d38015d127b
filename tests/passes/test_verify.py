"""eecompile.passes.verify: structural checks and the equivalence check of a compiled model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eecompile.passes.insert import BoundarySpec, BoundaryTransform
from eecompile.passes.verify import (
    PRIVATE_DOMAIN,
    CannotVerify,
    VerificationError,
    assign,
    candidate_assignments,
    check_structure,
    feeds_for,
    load_feeds,
    parse_shapes,
    random_feeds,
    relative_error,
    state_pairs,
    symbol_roles,
    verify_equivalence,
)
from eecompile.runtime.client import Client

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


# -- relative_error ----------------------------------------------------------------------------


def test_relative_error_is_max_abs_error_over_max_abs():
    expected = np.array([[1.0, -4.0], [2.0, 0.5]])
    actual = expected + np.array([[0.0, 0.0], [0.02, -0.01]])
    assert relative_error(expected, actual) == pytest.approx(0.02 / 4.0)
    assert relative_error(expected, expected) == 0.0
    assert relative_error(expected.astype(np.float32), expected.astype(np.float32)) == 0.0


def test_relative_error_edge_cases():
    assert relative_error(np.zeros(3), np.array([0.0, 1e-3, 0.0])) == pytest.approx(1e-3)  # absolute when all zero
    assert relative_error(np.zeros(3), np.zeros((3, 1))) == float("inf")  # shape mismatch
    assert relative_error(np.zeros((0, 4)), np.zeros((0, 4))) == 0.0
    assert relative_error(np.array([1, 2, 3]), np.array([1, 2, 4])) == pytest.approx(1 / 3)  # integer outputs


def test_relative_error_of_nan_is_not_small():
    err = relative_error(np.array([1.0, 2.0]), np.array([1.0, np.nan]))
    assert err > 1e-4


# -- check_structure ---------------------------------------------------------------------------


def _model(nodes, inputs=None, outputs=None, inits=None, opsets=(("", 17),)):
    graph = helper.make_graph(nodes, "g", inputs or [helper.make_tensor_value_info("x", FLOAT, [2, 3])],
                              outputs or [helper.make_tensor_value_info("y", FLOAT, [2, 3])],
                              [numpy_helper.from_array(v, k) for k, v in (inits or {}).items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


def test_check_structure_accepts_a_plain_model():
    check_structure(_model([helper.make_node("Relu", ["x"], ["y"])]))


def test_check_structure_rejects_a_leftover_private_op():
    model = _model([helper.make_node("BasisChange", ["x"], ["t"], name="change_0", domain=PRIVATE_DOMAIN),
                    helper.make_node("Relu", ["t"], ["y"])],
                   opsets=(("", 17), (PRIVATE_DOMAIN, 1)))
    with pytest.raises(VerificationError, match="private basis-change ops left.*change_0"):
        check_structure(model)


def test_check_structure_rejects_an_invalid_model():
    model = _model([helper.make_node("Relu", ["missing"], ["y"])])
    with pytest.raises(VerificationError, match="onnx.checker"):
        check_structure(model)


# -- verify_equivalence ------------------------------------------------------------------------


def _clear_client(inputs=("x",), outputs=("y",)) -> Client:
    return Client(BoundarySpec([BoundaryTransform(n, "clear") for n in inputs],
                               [BoundaryTransform(n, "clear") for n in outputs]))


def _save(model, path):
    onnx.save(model, str(path))
    return path


def test_verify_equivalence_passes_an_equal_model_and_rejects_a_different_one(tmp_path):
    original = _save(_model([helper.make_node("Relu", ["x"], ["y"])]), tmp_path / "a.onnx")
    same = _save(_model([helper.make_node("Max", ["x", "zero"], ["y"])], inits={"zero": np.zeros(1, np.float32)}),
                 tmp_path / "b.onnx")
    result = verify_equivalence(original, same, _clear_client())
    assert result.checked and result.max_relative_error == 0.0
    off = _save(_model([helper.make_node("Add", ["x", "c"], ["y"])], inits={"c": np.full(1, 0.01, np.float32)}),
                tmp_path / "c.onnx")
    with pytest.raises(VerificationError, match="'y' differs"):
        verify_equivalence(original, off, _clear_client())


def test_verify_equivalence_skips_a_model_ort_cannot_load(tmp_path):
    original = _save(_model([helper.make_node("Relu", ["x"], ["y"])]), tmp_path / "a.onnx")
    custom = _model([helper.make_node("Nope", ["x"], ["y"], domain="com.example")],
                    opsets=(("", 17), ("com.example", 1)))
    result = verify_equivalence(original, _save(custom, tmp_path / "b.onnx"), _clear_client())
    assert not result.checked and result.detail.startswith("skipped")


def test_verify_equivalence_rejects_nan_outputs(tmp_path):
    original = _save(_model([helper.make_node("Relu", ["x"], ["y"])]), tmp_path / "a.onnx")
    nan = _save(_model([helper.make_node("Add", ["x", "c"], ["y"])], inits={"c": np.full(1, np.nan, np.float32)}),
                tmp_path / "nan.onnx")
    with pytest.raises(VerificationError):
        verify_equivalence(original, nan, _clear_client())


# -- random_feeds ------------------------------------------------------------------------------


def test_random_feeds_shapes_and_integer_inputs(tmp_path):
    model = _model(
        [helper.make_node("Identity", [n], [f"{n}_out"]) for n in ("x", "ids", "position_ids", "attention_mask",
                                                                     "past_key")],
        inputs=[helper.make_tensor_value_info("x", FLOAT, ["batch", "seq", 4]),
                helper.make_tensor_value_info("ids", INT64, ["batch", "seq"]),
                helper.make_tensor_value_info("position_ids", INT64, ["batch", "seq"]),
                helper.make_tensor_value_info("attention_mask", INT64, ["batch", "total"]),
                helper.make_tensor_value_info("past_key", FLOAT, ["batch", 2, "past_len", 4])],
        outputs=[helper.make_tensor_value_info(f"{n}_out", t, None) for n, t in
                 (("x", FLOAT), ("ids", INT64), ("position_ids", INT64), ("attention_mask", INT64),
                  ("past_key", FLOAT))])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = random_feeds(session, seed=3, index_sizes={"ids": 7})
    assert feeds["x"].shape == (2, 3, 4) and feeds["x"].dtype == np.float32
    assert feeds["ids"].shape == (2, 3) and feeds["ids"].max() < 7 and feeds["ids"].dtype == np.int64
    np.testing.assert_array_equal(feeds["position_ids"], [[2, 3, 4], [2, 3, 4]])  # after a past of 2
    assert (feeds["attention_mask"] == 1).all() and feeds["attention_mask"].shape == (2, 5)  # total = past + seq
    assert feeds["past_key"].shape == (2, 2, 2, 4)
    again = random_feeds(session, seed=3, index_sizes={"ids": 7})
    np.testing.assert_array_equal(again["x"], feeds["x"])
    assert not np.array_equal(random_feeds(session, seed=4)["x"], feeds["x"])



# -- shapes derived from the graph -------------------------------------------------------------


def _inputs(*specs):
    return [(name, "tensor(int64)" if "ids" in name or "mask" in name else "tensor(float)", shape)
            for name, shape in specs]


def test_optimum_style_symbols_share_values_and_size_the_mask_past_plus_seq():
    inputs = _inputs(("input_ids", ["batch_size", "sequence_length"]),
                     ("attention_mask", ["batch_size", "past_sequence_length + sequence_length"]),
                     ("position_ids", ["batch_size", "sequence_length"]),
                     ("past_key_values.0.key", ["batch_size", 2, "past_sequence_length", 4]),
                     ("past_key_values.0.value", ["batch_size", 2, "past_sequence_length", 4]))
    roles = symbol_roles(inputs)
    assert roles == {"batch_size": "batch", "sequence_length": "seq", "past_sequence_length": "past",
                     "past_sequence_length + sequence_length": "expr"}
    symbols = assign(roles, {"batch": 2, "seq": 3, "past": 2})
    assert symbols["past_sequence_length + sequence_length"] == 5 and symbols["past_sequence_length"] == 2


def test_decode_only_and_total_and_unnamed_symbols():
    roles = symbol_roles(_inputs(("input_ids", ["batch_size", 1]),
                                 ("attention_mask", ["batch_size", "past_sequence_length + 1"]),
                                 ("past_key_values.0.key", ["batch_size", 4, "past_sequence_length", 8])))
    assert assign(roles, {"batch": 1, "seq": 3, "past": 2})["past_sequence_length + 1"] == 3
    roles = symbol_roles(_inputs(("input_ids", ["s0", "s1"]), ("attention_mask", ["s0", "unk__2"]),
                                 ("past_key", ["s0", 2, "unk__7", 4])))
    assert roles == {"s0": "batch", "s1": "seq", "unk__2": "total", "unk__7": "past"}
    roles = symbol_roles(_inputs(("input_ids", ["batch", "sequence"]), ("attention_mask", ["batch", "total_sequence"]),
                                 ("past_key_values.0.key", ["batch", 2, "past_sequence", 4])))
    assert assign(roles, {"batch": 2, "seq": 3, "past": 2}) == {"batch": 2, "sequence": 3, "total_sequence": 5,
                                                               "past_sequence": 2}


def test_user_shapes_fix_symbols_and_roles():
    assert parse_shapes("batch_size=1, past_sequence_length=4") == {"batch_size": 1, "past_sequence_length": 4}
    with pytest.raises(Exception, match="name=size"):
        parse_shapes("batch_size=one")
    model = _model([helper.make_node("Identity", ["ids"], ["o"])],
                   inputs=[helper.make_tensor_value_info("ids", INT64, ["batch_size", "sequence_length"]),
                           helper.make_tensor_value_info("past_key", FLOAT, ["batch_size", 2, "past_len", 4])],
                   outputs=[helper.make_tensor_value_info("o", INT64, None)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    first = candidate_assignments(session, {"past_len": 6, "seq": 5})[0]
    assert first == {"batch_size": 2, "sequence_length": 5, "past_len": 6}
    feeds = feeds_for(session, first, 0)
    assert feeds["ids"].shape == (2, 5) and feeds["past_key"].shape == (2, 2, 6, 4)
    assert all(a["past_len"] == 0 for a in candidate_assignments(session, allow_past=False))


def test_group_query_attention_lengths():
    model = _model([helper.make_node("Identity", [n], [f"{n}_o"]) for n in ("seqlens_k", "total_sequence_length")],
                   inputs=[helper.make_tensor_value_info("input_ids", INT64, ["batch_size", "sequence_length"]),
                           helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch_size"]),
                           helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
                           helper.make_tensor_value_info("past_key_values.0.key", FLOAT,
                                                         ["batch_size", 2, "past_sequence_length", 4])],
                   outputs=[helper.make_tensor_value_info(f"{n}_o", TensorProto.INT32, None)
                            for n in ("seqlens_k", "total_sequence_length")])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = random_feeds(session, 0)
    assert feeds["seqlens_k"].tolist() == [4, 4] and int(feeds["total_sequence_length"]) == 5


def test_state_pairs_by_name():
    assert state_pairs(["past_key_values.0.key", "past_key_values.0.value", "past_key"],
                       ["present.0.value", "present.0.key", "present_key"]) == [
        ("past_key_values.0.key", "present.0.key"), ("past_key_values.0.value", "present.0.value"),
        ("past_key", "present_key")]


def _reshape_model(target):
    """y = Reshape(x, target) · 2: runs only when batch × n fits ``target``."""
    return _model([helper.make_node("Reshape", ["x", "shape"], ["r"]), helper.make_node("Mul", ["r", "two"], ["y"])],
                  inputs=[helper.make_tensor_value_info("x", FLOAT, ["B", "n"])],
                  outputs=[helper.make_tensor_value_info("y", FLOAT, [f"d{i}" for i in range(len(target))])],
                  inits={"shape": np.array(target, np.int64), "two": np.full(1, 2.0, np.float32)})


def test_verify_tries_other_shapes_then_gives_up_with_the_reason(tmp_path):
    batch_one = _save(_reshape_model([3]), tmp_path / "one.onnx")  # needs B·n = 3: the second candidate
    result = verify_equivalence(batch_one, batch_one, _clear_client())
    assert result.checked and "B=1, n=3" in result.detail and result.feeds[0]["x"].shape == (1, 3)
    fours = _save(_reshape_model([-1, 4]), tmp_path / "four.onnx")  # needs B·n divisible by 4: none of them
    result = verify_equivalence(fours, fours, _clear_client())
    assert not result.checked and "runs on none of" in result.detail and "Reshape" in result.detail
    result = verify_equivalence(fours, fours, _clear_client(), shapes={"n": 4})
    assert result.checked and result.feeds[0]["x"].shape == (2, 4)
    given = verify_equivalence(fours, fours, _clear_client(), feeds_list=[{"x": np.ones((1, 8), np.float32)}])
    assert given.checked and given.feeds[0]["x"].shape == (1, 8)


def test_compile_refuses_a_model_it_cannot_verify(tmp_path):
    import eecompile

    path = _save(_reshape_model([-1, 4]), tmp_path / "four.onnx")
    with pytest.raises(CannotVerify, match="--verify-shapes.*--no-verify"):
        eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out", verify_shapes={"n": 8})
    assert result.verification.checked and result.report["verification"]["checked"]
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out2", verify=False)
    assert not result.verification.checked


def test_load_feeds(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.ones((1, 8), np.float32))
    assert load_feeds(tmp_path / "f.npz")["x"].shape == (1, 8)
    with pytest.raises(Exception, match="cannot read --verify-feeds"):
        load_feeds(tmp_path / "missing.npz")


# -- the KV cache: a non-empty past, then one decode step on the fed-back cache ------------------


def _kv_model(rng):
    """present_key = Concat(past_key, x·Wk) on the sequence axis; y = present_key · Wo."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    return _model([helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
                   helper.make_node("Concat", ["past_key", "k"], ["present_key"], name="cache", axis=1),
                   helper.make_node("MatMul", ["present_key", "Wo"], ["y"], name="out")],
                  inputs=[helper.make_tensor_value_info("x", FLOAT, ["B", "S", 6]),
                          helper.make_tensor_value_info("past_key", FLOAT, ["B", "P", 6])],
                  outputs=[helper.make_tensor_value_info("y", FLOAT, ["B", "T", 3]),
                           helper.make_tensor_value_info("present_key", FLOAT, ["B", "T", 6])],
                  inits={"Wk": f(6, 6), "Wo": f(6, 3)})


def test_compile_verifies_a_prefill_with_a_past_and_a_decode_step(tmp_path):
    import eecompile

    path = _save(_kv_model(np.random.default_rng(5)), tmp_path / "kv.onnx")
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    v = result.verification
    assert v.checked and v.decode_checked and "decode step" in v.detail and "P=2" in v.detail
    assert v.feeds[0]["past_key"].shape == (2, 2, 6)
    # without the cache's bases (the client alone) the past is empty, and the decode step still runs
    client = eecompile.runtime.client.Client.load(tmp_path / "out" / "client")
    alone = verify_equivalence(path, tmp_path / "out" / "server" / "model.onnx", client)
    assert alone.checked and alone.decode_checked and "P=0" in alone.detail


def test_a_wrong_cache_is_caught_by_the_decode_step(tmp_path):
    """A server whose present output is off only in the part the decode step reads back."""
    model = _kv_model(np.random.default_rng(6))
    path = _save(model, tmp_path / "kv.onnx")
    bad = onnx.ModelProto()
    bad.CopyFrom(model)
    bad.graph.node[1].output[0] = "cat"  # present_key = cat + 0.5, y stays exact in the prefill
    bad.graph.node.append(helper.make_node("Add", ["cat", "half"], ["present_key"]))
    bad.graph.node[2].input[0] = "cat"
    bad.graph.initializer.append(numpy_helper.from_array(np.full(1, 0.5, np.float32), "half"))
    client = Client(BoundarySpec([BoundaryTransform("x", "clear"), BoundaryTransform("past_key", "state")],
                                 [BoundaryTransform("y", "clear"), BoundaryTransform("present_key", "state")]))
    with pytest.raises(VerificationError, match="'y' differs from the original in the decode step"):
        verify_equivalence(path, _save(bad, tmp_path / "bad.onnx"), client)


def test_decode_step_with_optimum_dim_names(tmp_path):
    """The mask is past + sequence long in the prefill and in the decode step (``past_sequence_length + 1``)."""
    import eecompile

    rng = np.random.default_rng(7)
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    total = "past_sequence_length + sequence_length"
    model = _model([helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
                    helper.make_node("Concat", ["past_key", "k"], ["present_key"], name="cache", axis=1),
                    helper.make_node("Cast", ["attention_mask"], ["maskf"], to=FLOAT),
                    helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"]),
                    helper.make_node("Mul", ["present_key", "mask3"], ["masked"]),
                    helper.make_node("MatMul", ["masked", "Wo"], ["y"], name="out")],
                   inputs=[helper.make_tensor_value_info("x", FLOAT, ["batch_size", "sequence_length", 6]),
                           helper.make_tensor_value_info("attention_mask", INT64, ["batch_size", total]),
                           helper.make_tensor_value_info("past_key", FLOAT, ["batch_size", "past_sequence_length", 6])],
                   outputs=[helper.make_tensor_value_info("y", FLOAT, ["batch_size", total, 3]),
                            helper.make_tensor_value_info("present_key", FLOAT, ["batch_size", total, 6])],
                   inits={"Wk": f(6, 6), "Wo": f(6, 3), "last": np.array([-1])}, opsets=(("", 17),))
    path = _save(model, tmp_path / "kv.onnx")
    v = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out").verification
    assert v.checked and v.decode_checked, v.detail
    assert v.feeds[0]["attention_mask"].shape == (2, 5) and v.feeds[0]["past_key"].shape == (2, 2, 6)


def test_model_dimension_symbols_are_static_and_read_from_genai_config(tmp_path):
    """ONNX Runtime GenAI's KV cache is [batch, kv_heads, past_sequence_length, kv_cache_dim]: kv_cache_dim is
    the head size (from genai_config.json), not a past length."""
    from eecompile.passes.verify import config_shapes

    inputs = _inputs(("input_ids", ["batch_size", "sequence_length"]),
                     ("attention_mask", ["batch_size", "total_sequence_length"]),
                     ("past_key_values.0.key", ["batch_size", 2, "past_sequence_length", "kv_cache_dim"]))
    roles = symbol_roles(inputs)
    assert roles["kv_cache_dim"] == "static" and roles["past_sequence_length"] == "past"
    assert config_shapes(tmp_path / "model.onnx", roles) == {}
    (tmp_path / "genai_config.json").write_text('{"model": {"decoder": {"head_size": 16}}}')
    hints = config_shapes(tmp_path / "model.onnx", roles)
    assert hints == {"kv_cache_dim": 16}
    symbols = assign(roles, {"batch": 2, "seq": 3, "past": 2}, hints)
    assert symbols == {"batch_size": 2, "sequence_length": 3, "total_sequence_length": 5,
                       "past_sequence_length": 2, "kv_cache_dim": 16}


# -- reduced precision: the tolerance, what is compared, a wrong fold ---------------------------
from eecompile.passes.precision import (  # noqa: E402
    BFLOAT16,
    GROWTH,
    model_depth,
    model_precision,
    round_to_bfloat16,
    verification_tolerance,
)

F16, BF16 = TensorProto.FLOAT16, TensorProto.BFLOAT16


def _mlp(elem: int, rng, width: int = 32, layers: int = 3) -> onnx.ModelProto:
    """x[2,4,W] -> (MatMul, Add, Relu) x layers -> LayerNormalization -> MatMul: weights and activations in ``elem``."""
    np_type = onnx.helper.tensor_dtype_to_np_dtype(elem)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np_type), f"w{i}"),
                  numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np_type), f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"mm{i}"),
                  helper.make_node("Add", [f"m{i}", f"b{i}"], [f"a{i}"]),
                  helper.make_node("Relu", [f"a{i}"], [f"h{i}"])]
        x = f"h{i}"
    inits += [numpy_helper.from_array(rng.uniform(0.5, 1.5, width).astype(np_type), "g"),
              numpy_helper.from_array((0.1 * rng.standard_normal(width)).astype(np_type), "beta"),
              numpy_helper.from_array((rng.standard_normal((width, width)) / np.sqrt(width)).astype(np_type), "wout")]
    nodes += [helper.make_node("LayerNormalization", [x, "g", "beta"], ["n"], axis=-1, name="ln"),
              helper.make_node("MatMul", ["n", "wout"], ["y"], name="head")]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", elem, [2, 4, width])],
                              [helper.make_tensor_value_info("y", elem, [2, 4, width])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_depth_counts_the_longest_chain_of_rounding_ops(rng):
    model = _mlp(TensorProto.FLOAT, rng, layers=3)
    assert model_depth(model) == 3 * 2 + 2  # MatMul and Add per layer (Relu is exact), LayerNorm, head MatMul
    moved = _model([helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0]),
                    helper.make_node("Reshape", ["t", "s"], ["y"])],
                   outputs=[helper.make_tensor_value_info("y", FLOAT, [6])],
                   inits={"s": np.array([6], np.int64)})
    assert model_depth(moved) == 1  # nothing rounds: the floor of 1


def test_precision_is_the_type_of_most_weight_elements(rng):
    assert model_precision(_mlp(F16, rng)) == F16
    assert model_precision(_mlp(TensorProto.FLOAT, rng)) == TensorProto.FLOAT
    mixed = _mlp(F16, rng)  # one float32 scalar among float16 weights does not make it a float32 model
    mixed.graph.initializer.append(numpy_helper.from_array(np.array(1.0, np.float32), "eps"))
    assert model_precision(mixed) == F16


def test_tolerance_follows_dtype_and_depth(rng):
    fp32 = verification_tolerance(_mlp(TensorProto.FLOAT, rng), 1e-4)
    assert fp32.value == 1e-4 and not fp32.derived and fp32.dtype == "float32"
    for elem, name, u in ((F16, "float16", 2.0 ** -11), (BF16, "bfloat16", 2.0 ** -8)):
        for layers in (1, 8):
            model = _mlp(elem, rng, layers=layers)
            tol = verification_tolerance(model, 1e-4)
            assert tol.dtype == name and tol.depth == 2 * layers + 2
            assert tol.value == pytest.approx(GROWTH * u * np.sqrt(2 * layers + 2))
            assert tol.derived and name in tol.describe() and f"√{tol.depth}" in tol.describe()
    assert verification_tolerance(_mlp(F16, rng), float("inf")).value == float("inf")  # --requantize: measured


def test_round_to_bfloat16_rounds_once_to_nearest_even():
    from fractions import Fraction

    def exact(x: float) -> float:  # nearest bfloat16 (8 significant bits) by exact arithmetic, ties to even
        if x == 0:
            return x
        m, e = np.frexp(x)  # x = m·2^e, 0.5 <= |m| < 1
        scaled = Fraction(float(m)) * 256
        q = round(scaled)  # Python rounds Fractions half to even
        return float(Fraction(q, 256) * Fraction(2) ** int(e))

    values = np.concatenate([np.random.default_rng(5).standard_normal(2000) * 10.0 ** np.arange(-5, 5).repeat(200),
                             [1 + 2 ** -8 + 2 ** -30, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8 + 2 ** -40)]])
    got = round_to_bfloat16(values).astype(np.float64)
    want = np.array([exact(float(v)) for v in values])
    np.testing.assert_array_equal(got, want)
    # ml_dtypes' own conversion rounds through float32: once off at a near-tie, which this one is not
    assert float(np.float64(1 + 2 ** -8 + 2 ** -30).astype(BFLOAT16)) == 1.0
    assert got[-4] == 1 + 2 ** -7


@pytest.fixture
def fp16_mlp(tmp_path, rng):
    path = tmp_path / "mlp16.onnx"
    onnx.save(_mlp(F16, rng, layers=4), str(path))
    return path


def test_fp16_model_verifies_within_its_stated_tolerance(fp16_mlp, tmp_path):
    import json

    import eecompile

    result = eecompile.compile_model(fp16_mlp, eecompile.generate_key(), tmp_path / "out")
    v = result.verification
    assert v.checked and v.tolerance.dtype == "float16" and v.tolerance.depth == 10
    # the error is the compiled model's: above float32 resolution (the old 1e-4 refused such models), within the bound
    assert 1e-4 < v.max_relative_error <= v.tolerance.value
    assert f"tolerance {v.tolerance.value:.2e}" in v.detail
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["verification"]["tolerance"]["dtype"] == "float16"
    assert report["verification"]["tolerance"]["value"] == pytest.approx(2 * 2.0 ** -11 * np.sqrt(10))
    assert "verification tolerance: " in (tmp_path / "out" / "report.md").read_text()
    server = onnx.load(str(tmp_path / "out" / "server" / "model.onnx"))
    assert {t.data_type for t in server.graph.initializer if t.name.startswith(("w", "b", "g", "beta"))} == {F16}


def test_verification_measures_the_compiled_model(fp16_mlp, tmp_path):
    """The reported error is the compiled model's, recomputed independently on the verified feeds and on new ones."""
    import eecompile

    out = tmp_path / "out"
    result = eecompile.compile_model(fp16_mlp, eecompile.generate_key(), out)
    ref = ort.InferenceSession(str(fp16_mlp), providers=["CPUExecutionProvider"])
    enc = eecompile.EncryptedSession(out, providers=["CPUExecutionProvider"])
    again = max(relative_error(ref.run(None, f)[0], enc.run(None, f)[0]) for f in result.verification.feeds)
    assert again == pytest.approx(result.verification.max_relative_error)
    fresh = [{"x": np.random.default_rng(s).standard_normal((2, 4, 32)).astype(np.float16)} for s in (50, 51, 52)]
    errors = [relative_error(ref.run(None, f)[0], enc.run(None, f)[0]) for f in fresh]
    assert all(0 < e <= result.verification.tolerance.value for e in errors)
    assert enc.run(None, fresh[0])[0].dtype == np.float16


@pytest.mark.parametrize("factor, caught", [(3.0, True), (0.05, False)])
def test_a_wrong_fold_is_caught_by_the_fp16_check(fp16_mlp, tmp_path, monkeypatch, factor, caught):
    """The test hook: one folded weight (the head MatMul's) is perturbed by ``factor`` x the tolerance, element-wise
    with random signs, as a fold that is wrong at the ulp scale would be; 3x is refused, 0.05x (about one ulp) is not."""
    import eecompile
    from eecompile.passes.context import FoldContext
    from eecompile.passes.store import load_structure

    tol = verification_tolerance(load_structure(fp16_mlp), 1e-4).value
    original = FoldContext.set_const
    fired = []

    def perturbed(self, node, index, value):
        if node.name == "head" and index == 1:
            signs = np.random.default_rng(0).choice([-1.0, 1.0], np.shape(value))
            value = np.asarray(value, np.float64) * (1 + factor * tol * signs)
            fired.append(node.name)
        return original(self, node, index, value)

    monkeypatch.setattr(FoldContext, "set_const", perturbed)
    if caught:
        with pytest.raises(VerificationError, match=r"output 'y' differs .*> tolerance .* for float16"):
            eecompile.compile_model(fp16_mlp, eecompile.generate_key(), tmp_path / "out")
    else:
        assert eecompile.compile_model(fp16_mlp, eecompile.generate_key(), tmp_path / "out").verification.checked
    assert fired == ["head"]


def test_outputs_nan_everywhere_are_not_called_verified(tmp_path):
    """An output that is NaN in every element matches 'exactly' and measures nothing: not verified, said so."""
    import eecompile

    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Mul", ["m", "m"], ["sq"]),
             helper.make_node("Neg", ["sq"], ["neg"]),
             helper.make_node("Sub", ["neg", "one"], ["below"]),
             helper.make_node("Sqrt", ["below"], ["y"])]  # sqrt(-(x·W)² - 1): NaN everywhere
    model = _model(nodes, inputs=[helper.make_tensor_value_info("x", FLOAT, [2, 4])],
                   outputs=[helper.make_tensor_value_info("y", FLOAT, [2, 4])],
                   inits={"w": np.eye(4, dtype=np.float32) + 0.1, "one": np.ones(1, np.float32)})
    path = tmp_path / "nan.onnx"
    onnx.save(model, str(path))
    with pytest.raises(CannotVerify, match="NaN or infinity in every element"):
        eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")


def test_bfloat16_model_compiles_and_verifies_widened(tmp_path, rng):
    """ONNX Runtime's CPU provider has no bfloat16 MatMul/Add: both models run widened (bfloat16 weights and
    boundaries, float32 activations), the detail says so, and the server's weights stay bfloat16."""
    import eecompile

    path = tmp_path / "mlp_bf16.onnx"
    onnx.save(_mlp(BF16, rng, layers=2), str(path))
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    v = result.verification
    assert v.checked and v.tolerance.dtype == "bfloat16" and 0 < v.max_relative_error <= v.tolerance.value
    assert "float32 activations" in v.detail and "ONNX Runtime's CPU provider" in v.detail
    assert v.feeds[0]["x"].dtype == BFLOAT16
    server = onnx.load(str(tmp_path / "out" / "server" / "model.onnx"))
    assert {t.data_type for t in server.graph.initializer if t.name.startswith(("w", "b", "g", "beta"))} == {BF16}
    assert {v.type.tensor_type.elem_type for v in [*server.graph.input, *server.graph.output]} == {BF16}


def _vit_stem(tmp_path, patch: int = 8, grid: int = 4, cls: bool = True):
    """A ViT-style stem with a fully dynamic image input: patch Conv, flatten, (class token), + position table."""
    rng = np.random.default_rng(0)
    d = 6
    rows = grid * grid + (1 if cls else 0)
    nodes = [helper.make_node("Conv", ["pixel_values", "W"], ["p"], strides=[patch, patch]),
             helper.make_node("Reshape", ["p", "to3"], ["f"]),
             helper.make_node("Transpose", ["f"], ["t"], perm=[0, 2, 1])]
    src = "t"
    if cls:
        nodes.append(helper.make_node("Concat", ["cls", "t"], ["c"], axis=1))
        src = "c"
    nodes.append(helper.make_node("Add", [src, "pos"], ["y"]))
    inits = [numpy_helper.from_array(rng.standard_normal((d, 3, patch, patch)).astype(np.float32), "W"),
             numpy_helper.from_array(np.array([1, d, -1], np.int64), "to3"),
             numpy_helper.from_array(rng.standard_normal((1, 1, d)).astype(np.float32), "cls"),
             numpy_helper.from_array(rng.standard_normal((1, rows, d)).astype(np.float32), "pos")]
    graph = helper.make_graph(nodes, "stem", [helper.make_tensor_value_info(
        "pixel_values", TensorProto.FLOAT, [1, "num_channels", "height", "width"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    path = tmp_path / "stem.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.mark.parametrize("cls", [True, False])
def test_image_size_derived_from_the_stem_and_the_position_table(tmp_path, cls):
    """optimum's ViT has a dynamic image size; the default role values (3×3) cannot run it. The channels come
    from the patch Conv's weight, the size from its stride × the grid of the position table (with or without a
    class token), and that assignment is tried first."""
    from eecompile.passes.verify import _inputs, structural_shapes, symbol_roles

    path = _vit_stem(tmp_path, cls=cls)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    roles = symbol_roles(_inputs(sess))
    fixed, spatial = structural_shapes(path, _inputs(sess), roles)
    assert fixed == {"num_channels": 3}
    assert spatial[0] == {"height": 32, "width": 32}
    first = candidate_assignments(sess, fixed, spatial=spatial)[0]
    assert first["height"] == first["width"] == 32
    sess.run(None, feeds_for(sess, first, 0))  # the original runs on it
