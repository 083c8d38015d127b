"""Where weights live while compiling: read in place from the model file, written once into the server's data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eecompile.errors import ModelFileError
from eecompile.passes.graph import ModelGraph, load_checked
from eecompile.passes.store import (ALIGN, ALIGN_ABOVE, INLINE_BYTES, DerivedValues, FileValues, TensorStore,
                                    load_structure)


def _model(path, big: np.ndarray, small: np.ndarray):
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, big.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, big.shape[1]])],
                              [numpy_helper.from_array(big, "W"), numpy_helper.from_array(small, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_embedded_weights_are_referenced_in_place_not_loaded(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.standard_normal((128, 256)).astype(np.float32)  # 128 KiB: above INLINE_BYTES
    small = rng.standard_normal(256).astype(np.float32)
    path = _model(tmp_path / "m.onnx", big, small)
    model = load_structure(path)
    weights = {t.name: t for t in model.graph.initializer}
    assert weights["W"].data_location == TensorProto.EXTERNAL and not weights["W"].raw_data
    assert {e.key: e.value for e in weights["W"].external_data}["location"] == "m.onnx"  # relative, the file itself
    assert weights["b"].data_location != TensorProto.EXTERNAL  # small weights stay inline
    assert model.ByteSize() < INLINE_BYTES < big.nbytes
    mg = ModelGraph(model, tmp_path)
    assert isinstance(mg.tensors["W"]._values, FileValues)
    np.testing.assert_array_equal(mg.const("W"), big)
    np.testing.assert_array_equal(mg.const("b"), small)
    assert isinstance(mg.tensors["W"]._values, FileValues), "reading a weight must not keep it in the graph"


def test_compile_path_load_checks_the_structure(tmp_path):
    path = _model(tmp_path / "m.onnx", np.ones((128, 256), np.float32), np.ones(256, np.float32))
    model, validity = load_checked(path, TensorStore(tmp_path / "scratch.bin"))
    assert validity.describe() == "onnx.checker"
    assert not (tmp_path / "scratch.bin").exists(), "nothing is copied to scratch"
    broken = onnx.load(str(path))
    broken.graph.node[0].input[1] = "missing"
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    with pytest.raises(ModelFileError, match="not a valid ONNX model.*missing"):
        load_checked(tmp_path / "broken.onnx", TensorStore(tmp_path / "scratch.bin"))


def test_a_weight_whose_data_does_not_fit_its_shape_is_refused(tmp_path):
    path = _model(tmp_path / "m.onnx", np.ones((128, 256), np.float32), np.ones(256, np.float32))
    model = onnx.load(str(path))
    model.graph.initializer[0].dims[0] = 129
    onnx.save(model, str(path))
    with pytest.raises(ModelFileError, match="'W' holds 131072 bytes of data, its shape \\[129, 256\\] needs"):
        load_checked(path, TensorStore(tmp_path / "scratch.bin"))


def test_not_an_onnx_file_is_one_clear_error(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\xff\xff\xff\xff not protobuf")
    with pytest.raises(ModelFileError, match="not a readable ONNX model"):
        load_checked(path, TensorStore(tmp_path / "scratch.bin"))


def test_final_tensors_go_to_the_data_file_aligned(tmp_path):
    store = TensorStore(tmp_path / "scratch.bin")
    first = store.put("a", np.arange(INLINE_BYTES, dtype=np.uint8))
    assert isinstance(first, FileValues) and first.path == str(tmp_path / "scratch.bin")
    store.open_final(tmp_path / "model.onnx.data", "model.onnx.data")
    small = store.put("s", np.arange(INLINE_BYTES // 4, dtype=np.float32) + 0.5)
    large = store.put("l", np.arange(ALIGN_ABOVE // 4, dtype=np.float32).reshape(-1, 64))
    store.close()
    assert small.offset == 0 and large.offset % ALIGN == 0 and large.offset > 0
    assert {e.key: e.value for e in large.tensor.external_data}["location"] == "model.onnx.data"
    np.testing.assert_array_equal(large.load(), np.arange(ALIGN_ABOVE // 4, dtype=np.float32).reshape(-1, 64))
    np.testing.assert_array_equal(small.load(), np.arange(INLINE_BYTES // 4, dtype=np.float32) + 0.5)
    assert not isinstance(store.put("tiny", np.ones(3)), FileValues)  # below INLINE_BYTES: memory


def _gain_transpose_model(path, rng, shared: bool = False):
    """x · diag(g) · Transpose(Wt) (and a second MatMul reading the same transposed weight when ``shared``):
    the rewrites normalize defers for a weight in its file."""
    d, n = 128, 256  # Wt is 128 KiB: above INLINE_BYTES
    nodes = [helper.make_node("Mul", ["x", "g"], ["xg"], name="gain"),
             helper.make_node("Transpose", ["Wt"], ["W"], name="wt"),
             helper.make_node("MatMul", ["xg", "W"], ["y"], name="proj")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", n])]
    if shared:
        nodes += [helper.make_node("MatMul", ["x", "W"], ["z"], name="proj2")]
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["B", n]))
    inits = {"g": rng.uniform(0.5, 2.0, d).astype(np.float32), "Wt": rng.standard_normal((n, d)).astype(np.float32)}
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", d])], outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path, inits


def test_normalize_defers_the_rewrites_of_a_weight_in_its_file(tmp_path):
    """The folded transpose and gain are not written anywhere: the constant holds them until a rule reads it,
    and reading gives exactly the eager rewrite (transposed, the gain product rounded once)."""
    from eecompile.compiler import _analysed

    path, inits = _gain_transpose_model(tmp_path / "m.onnx", np.random.default_rng(0))
    store = TensorStore(tmp_path / "scratch.bin")
    mg, _, normalized = _analysed(path, store)
    assert normalized.transposes_folded == ["Wt"] and normalized.gains_folded == ["gain"]
    weight = next(n for n in mg.nodes if n.name == "proj").inputs[1]
    assert isinstance(weight._values, DerivedValues), "re-imported after shape inference, still deferred"
    assert [step[0] for step in weight._values.steps] == ["transpose", "scale"]
    assert not (tmp_path / "scratch.bin").exists() and store.bytes_written == 0
    eager = (inits["Wt"].T * inits["g"].astype(np.float64)[:, None]).astype(np.float32)
    np.testing.assert_array_equal(mg.const(weight), eager)
    assert isinstance(weight._values, DerivedValues), "reading a deferred weight must not keep it in the graph"


@pytest.mark.parametrize("shared", [False, True])
def test_a_deferred_weight_compiles_exactly(tmp_path, shared):
    import eecompile

    rng = np.random.default_rng(1)
    path, _ = _gain_transpose_model(tmp_path / "m.onnx", rng, shared)
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    assert result.verification.checked and result.verification.max_relative_error <= 1e-5
    assert result.report["exposure"]["intermediates_exposed"] == 0


def test_release_memory_collects_only_for_large_releases(monkeypatch):
    """Small releases skip the (slow) full garbage collection; large ones and unsized calls run it."""
    import gc

    from eecompile.passes import store

    calls = []
    monkeypatch.setattr(gc, "collect", lambda *a: calls.append(a) or 0)
    store.release_memory(1 << 20)
    assert calls == []
    store.release_memory(store.RELEASE_MIN_BYTES)
    store.release_memory()
    assert len(calls) == 2


def test_model_bytes_counts_external_data_once(tmp_path):
    """``model_bytes`` is the file plus each external data file it references, counted once."""
    from eecompile.passes.store import model_bytes

    big, small = np.ones((64, 32), np.float32), np.ones(32, np.float32)
    model = onnx.load(_model(tmp_path / "m.onnx", big, small))
    onnx.save(model, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    expected = (tmp_path / "m.onnx").stat().st_size + (tmp_path / "m.data").stat().st_size
    assert model_bytes(tmp_path / "m.onnx") == expected
    assert (tmp_path / "m.data").stat().st_size >= big.nbytes + small.nbytes


def test_frozen_heap_skips_what_was_alive_and_still_collects_new_cycles():
    import gc
    import weakref

    from eecompile.passes.store import FrozenHeap

    class Node:
        pass

    before = gc.get_freeze_count()
    with FrozenHeap() as heap:
        assert gc.get_freeze_count() == before  # nothing is frozen until asked
        heap.freeze()
        assert gc.get_freeze_count() > before
        cycle = Node()
        cycle.self = cycle
        alive = weakref.ref(cycle)
        del cycle
        gc.collect()
        assert alive() is None  # garbage made after the freeze is still found
    assert gc.get_freeze_count() == 0
