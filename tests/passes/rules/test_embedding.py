"""eecompile.passes.rules.embedding: Gather from a constant table is ``one_hot(ids) · E``.

Token ids become permuted index values (a substitution cipher) and the table is folded as
``E' = P⁻¹ · E · T``; a Gather along a clear axis of an activation carries its basis, one along
the protected axis clears it.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import eecompile

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _mm(a, w, out):
    return helper.make_node("MatMul", [a, w], [out], name=f"mm_{out}")


def _init(path, name):
    return next(numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.name == name)


def test_embedding_lookup(rng, build, lint, compile_exact):
    path = build([helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"), _mm("e", "W", "y")],
                 [("ids", INT64, ["B", "S"])], [("y", FLOAT, ["B", "S", 3])], {"E": _f(rng, 11, 4), "W": _f(rng, 4, 3)})
    report = lint(path)
    ids = report.space("ids")
    assert ids["basis"] == "permutation" and ids["size"] == 11
    assert ids["limited_by"]["node"] == "embed" and "substitution cipher" in ids["limited_by"]["reason"]
    assert report.basis("e") == "invertible"  # the table's columns: any basis
    assert report.protection("inputs", "ids") == "permuted index values (11 classes)"
    assert any("substitution cipher" in w for w in report["weaknesses"])
    ids_in = rng.integers(0, 11, (2, 5)).astype(np.int64)
    result = compile_exact(path, {"ids": ids_in})
    # E' = P⁻¹ E T: the row a ciphertext id selects is the plaintext row in the output basis
    client = eecompile.Client.load(result.client_dir)
    enc_ids = client.encrypt({"ids": np.arange(11, dtype=np.int64)})["ids"]
    assert sorted(enc_ids.tolist()) == list(range(11)) and not np.array_equal(enc_ids, np.arange(11))
    table, folded = _init(path, "E"), _init(result.server_model, "E")
    t = np.linalg.lstsq(table.astype(np.float64), folded[enc_ids].astype(np.float64), rcond=None)[0]
    np.testing.assert_allclose(table @ t, folded[enc_ids], atol=1e-4)  # one linear map for every row


def test_token_and_position_embeddings_share_the_residual_space(rng, build, lint, compile_exact):
    path = build([helper.make_node("Gather", ["E", "ids"], ["e"], name="tok"),
                  helper.make_node("Gather", ["P", "pos"], ["p"], name="positions"),
                  helper.make_node("Add", ["e", "p"], ["s"], name="add"), _mm("s", "W", "y")],
                 [("ids", INT64, ["B", "S"]), ("pos", INT64, ["B", "S"])], [("y", FLOAT, ["B", "S", 3])],
                 {"E": _f(rng, 11, 4), "P": _f(rng, 8, 4), "W": _f(rng, 4, 3)})
    report = lint(path)
    assert report.space("e")["name"] == report.space("p")["name"]
    assert report.space("ids")["name"] != report.space("pos")["name"]  # one permutation per table size
    assert report.protection("inputs", "pos") == "permuted index values (8 classes)"
    compile_exact(path, {"ids": rng.integers(0, 11, (2, 3)).astype(np.int64),
                         "pos": rng.integers(0, 8, (2, 3)).astype(np.int64)})


def test_one_id_input_feeding_two_tables_of_its_size(rng, build, lint, compile_exact):
    path = build([helper.make_node("Gather", ["E", "ids"], ["e"], name="tok"),
                  helper.make_node("Gather", ["E2", "ids"], ["e2"], name="tok2"), _mm("e", "W", "y"), _mm("e2", "W2", "z")],
                 [("ids", INT64, ["B", "S"])], [("y", FLOAT, ["B", "S", 3]), ("z", FLOAT, ["B", "S", 3])],
                 {"E": _f(rng, 11, 4), "E2": _f(rng, 11, 5), "W": _f(rng, 4, 3), "W2": _f(rng, 5, 3)})
    report = lint(path)
    assert report.basis("ids") == "permutation"
    assert report.space("e")["name"] != report.space("e2")["name"]
    compile_exact(path, {"ids": rng.integers(0, 11, (2, 3)).astype(np.int64)})


def _two_table_sizes(build, rng):
    return build([helper.make_node("Gather", ["E", "ids"], ["e"], name="tok"),
                  helper.make_node("Gather", ["E2", "ids"], ["e2"], name="tok13"), _mm("e", "W", "y"),
                  _mm("e2", "W2", "z")],
                 [("ids", INT64, ["B", "S"])], [("y", FLOAT, ["B", "S", 3]), ("z", FLOAT, ["B", "S", 3])],
                 {"E": _f(rng, 11, 4), "E2": _f(rng, 13, 5), "W": _f(rng, 4, 3), "W2": _f(rng, 5, 3)})


def test_ids_indexing_tables_of_different_sizes_are_cleared(rng, build, lint, compile_exact):
    path = _two_table_sizes(build, rng)
    report = lint(path)
    ids = report.space("ids")
    assert ids["basis"] == "clear" and ids["limited_by"]["node"] == "tok13"
    assert report.basis("e") == "invertible"
    compile_exact(path, {"ids": rng.integers(0, 11, (2, 3)).astype(np.int64)})


def test_cleared_ids_are_reported_clear(rng, build, lint, tmp_path):
    path = _two_table_sizes(build, rng)
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    client = eecompile.Client.load(result.client_dir)
    ids = np.arange(11, dtype=np.int64)
    assert np.array_equal(client.encrypt({"ids": ids})["ids"], ids)  # sent in clear ...
    compiled = json.loads((result.out_dir / "report.json").read_text())
    protection = next(i["protection"] for i in compiled["inputs"] if i["name"] == "ids")
    assert "permuted" not in protection  # ... so the report must not claim a permutation
    assert "permuted" not in lint(path).protection("inputs", "ids")


def test_gather_along_a_clear_axis_of_an_activation(rng, build, lint, compile_exact):
    """Picking the last token: the feature basis passes through."""
    path = build([_mm("x", "W1", "h"), helper.make_node("Gather", ["h", "last"], ["g"], name="last_token", axis=1),
                  _mm("g", "W2", "y")],
                 [("x", FLOAT, ["B", 5, 4])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 6, 3), "last": np.array(-1)})
    report = lint(path)
    assert report.basis("h") == "invertible" and "g" in report.space("h")["tensors"]
    assert report.protection("outputs", "y") == "basis change on axis 1: invertible"
    compile_exact(path, {"x": _f(rng, 2, 5, 4)})


def test_gather_along_the_protected_axis_clears_it(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"), helper.make_node("Gather", ["h", "idx"], ["g"], name="pick", axis=1),
                  _mm("g", "W2", "y")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, 6), "W2": _f(rng, 2, 3), "idx": np.array([0, 3])})
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "pick"
    compile_exact(path, {"x": _f(rng, 3, 4)})


def test_gather_from_a_3d_table_leaves_ids_clear(rng, build, lint, compile_exact):
    path = build([helper.make_node("Gather", ["E", "ids"], ["e"], name="tok"),
                  helper.make_node("Reshape", ["e", "shape"], ["r"], name="flat"), _mm("r", "W", "y")],
                 [("ids", INT64, ["B"])], [("y", FLOAT, ["B", 3])],
                 {"E": _f(rng, 11, 2, 2), "shape": np.array([-1, 4]), "W": _f(rng, 4, 3)})
    report = lint(path)
    assert report.protection("inputs", "ids") == "clear"
    assert report.basis("y") == "invertible"
    compile_exact(path, {"ids": rng.integers(0, 11, 4).astype(np.int64)})
