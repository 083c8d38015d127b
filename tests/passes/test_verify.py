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
    VerificationError,
    check_structure,
    random_feeds,
    relative_error,
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
    np.testing.assert_array_equal(feeds["position_ids"], [[0, 1, 2], [0, 1, 2]])
    assert (feeds["attention_mask"] == 1).all()
    assert feeds["past_key"].shape == (2, 2, 0, 4)
    again = random_feeds(session, seed=3, index_sizes={"ids": 7})
    np.testing.assert_array_equal(again["x"], feeds["x"])
    assert not np.array_equal(random_feeds(session, seed=4)["x"], feeds["x"])
