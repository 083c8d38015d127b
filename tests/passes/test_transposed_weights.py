"""eecompile.passes.transposed_weights: a weight Transpose applied before ONNX Runtime builds a segment gives
the values ONNX Runtime computes itself, bit for bit, from buffers reused across segments."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from eecompile.errors import ModelFileError
from eecompile.passes.segments import SegmentedSession
from eecompile.passes.store import load_structure
from eecompile.passes.transposed_weights import AHEAD_BYTES, TransposedWeights, transpose_into

FLOAT = TensorProto.FLOAT
D, OUT, LAYERS = 256, 1030, 3  # each weight [OUT, D] float32 is above AHEAD_BYTES; OUT not a block multiple
LAYER_BYTES = 2 * OUT * D * 4 + 4 * D * 4  # a segment holds one layer's weights


def _export(path, rng, *, transpose_output: bool = False):
    """y = Σ layers of x·Transpose(W_i) (each W_i [OUT, D], as trained) mixed back by a small Transposed V_i."""
    inits, nodes, h = {}, [], "x"
    for i in range(LAYERS):
        inits[f"W{i}"] = (rng.standard_normal((OUT, D)) / np.sqrt(D)).astype(np.float32)
        inits[f"V{i}"] = (rng.standard_normal((D, OUT)) / np.sqrt(OUT)).astype(np.float32)
        inits[f"s{i}"] = (rng.standard_normal((4, D)) / 2).astype(np.float32)  # small: stays a node
        nodes += [helper.make_node("Transpose", [f"W{i}"], [f"Wt{i}"], perm=[1, 0]),
                  helper.make_node("MatMul", [h, f"Wt{i}"], [f"u{i}"]),
                  helper.make_node("Relu", [f"u{i}"], [f"r{i}"]),
                  helper.make_node("Transpose", [f"V{i}"], [f"Vt{i}"]),  # no perm: reversed axes
                  helper.make_node("MatMul", [f"r{i}", f"Vt{i}"], [f"m{i}"]),
                  helper.make_node("Transpose", [f"s{i}"], [f"st{i}"]),
                  helper.make_node("MatMul", [f"m{i}", f"st{i}"], [f"q{i}"]),
                  helper.make_node("MatMul", [f"q{i}", f"s{i}"], [f"p{i}"]),
                  helper.make_node("Add", [h, f"p{i}"], [f"h{i}"])]
        h = f"h{i}"
    outputs = [helper.make_tensor_value_info(h, FLOAT, ["B", D])]
    if transpose_output:
        outputs.append(helper.make_tensor_value_info("Wt0", FLOAT, [D, OUT]))
    graph = helper.make_graph(nodes, "t", [helper.make_tensor_value_info("x", FLOAT, ["B", D])], outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path), save_as_external_data=True, location="weights.bin", size_threshold=1024)
    return path


def _reference(path, x, level):
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})


def _built_segments(monkeypatch) -> list[onnx.ModelProto]:
    built = []
    real = SegmentedSession._segment

    def keep(self, *args):
        seg = real(self, *args)
        built.append(seg)
        return seg

    monkeypatch.setattr(SegmentedSession, "_segment", keep)
    return built


def _options(level):
    made = ort.SessionOptions()
    made.graph_optimization_level = level
    return made


@pytest.mark.parametrize("level", [ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   ort.GraphOptimizationLevel.ORT_DISABLE_ALL])
def test_weights_transposed_ahead_give_onnx_runtimes_own_values_bit_for_bit(tmp_path, monkeypatch, level):
    """Against the same segments with the Transposes left to ONNX Runtime (shared options: nothing handed over),
    and, unoptimised (no fusion differs at a segment's edge), against the whole model."""
    path = _export(tmp_path / "m.onnx", np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((3, D)).astype(np.float32)
    built = _built_segments(monkeypatch)
    got = SegmentedSession(load_structure(path), tmp_path, lambda: _options(level), budget=LAYER_BYTES).run(
        None, {"x": x})[0]
    ahead_segments = list(built)
    built.clear()
    by_ort = SegmentedSession(load_structure(path), tmp_path, _options(level), budget=LAYER_BYTES).run(
        None, {"x": x})[0]
    assert np.array_equal(got, by_ort)
    if level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL:
        assert np.array_equal(got, _reference(path, x, level)[0])
    assert sum(n.op_type == "Transpose" for seg in built for n in seg.graph.node) == 3 * LAYERS  # kept there
    assert len(ahead_segments) >= 2
    ahead = TransposedWeights(load_structure(path), tmp_path)
    large = {f"{w}{i}" for w in "WV" for i in range(LAYERS)}
    handed_all = set()
    for seg in ahead_segments:
        transposed = {n.input[0] for n in seg.graph.node if n.op_type == "Transpose"}
        assert transposed and transposed <= {f"s{i}" for i in range(LAYERS)}  # only the small weights' stay
        handed = {t.name for t in seg.graph.initializer if ahead.handed(t)}
        handed_all |= handed
        assert not {t.name for t in seg.graph.initializer} & large  # read by the Transposes alone: not loaded
    assert handed_all == {f"{w}t{i}" for w in "WV" for i in range(LAYERS)}


def test_a_transpose_that_is_a_graph_output_stays_and_a_fetched_one_is_given(tmp_path):
    path = _export(tmp_path / "m.onnx", np.random.default_rng(4), transpose_output=True)
    model = load_structure(path)
    ahead = TransposedWeights(model, tmp_path)
    assert set(ahead.sources) == {f"Wt{i}" for i in range(1, LAYERS)} | {f"Vt{i}" for i in range(LAYERS)}
    x = np.random.default_rng(5).standard_normal((2, D)).astype(np.float32)
    session = SegmentedSession(model, tmp_path, None, budget=LAYER_BYTES)
    out, wt0, vt1 = session.run(["h2", "Wt0", "Vt1"], {"x": x})
    weights = {t.name: numpy_helper.to_array(t, base_dir=str(tmp_path)) for t in onnx.load(str(path)).graph.initializer}
    assert np.array_equal(wt0, weights["W0"].T) and np.array_equal(vt1, weights["V1"].T)
    by_ort = SegmentedSession(model, tmp_path, ort.SessionOptions(), budget=LAYER_BYTES).run(["h2"], {"x": x})[0]
    assert np.array_equal(out, by_ort)


def test_values_reuse_their_buffers_and_stay_exact(tmp_path):
    path = _export(tmp_path / "m.onnx", np.random.default_rng(6))
    weights = {t.name: numpy_helper.to_array(t, base_dir=str(tmp_path)) for t in onnx.load(str(path)).graph.initializer}
    ahead = TransposedWeights(load_structure(path), tmp_path)
    first = ahead.values(["Wt0", "Vt0"])
    kept = [a.copy() for a in first]
    second = ahead.values(["Wt1", "Vt1"])
    assert all(np.shares_memory(a, b) for a, b in zip(first, second))  # the same buffers, refilled
    assert np.array_equal(kept[0], weights["W0"].T) and np.array_equal(kept[1], weights["V0"].T)
    assert np.array_equal(second[0], weights["W1"].T) and np.array_equal(second[1], weights["V1"].T)
    assert all(a.flags.c_contiguous for a in second)
    assert OUT * D * 4 >= AHEAD_BYTES


@pytest.mark.parametrize("shape,perm", [((37, 5), (1, 0)), ((16, 16), (1, 0)), ((3, 17, 5), (2, 0, 1)),
                                        ((4, 6, 2, 3), (3, 2, 1, 0))])
def test_transpose_into_is_numpys_transpose(shape, perm):
    source = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    target = np.empty(tuple(shape[p] for p in perm), np.float32)
    transpose_into(source, perm, target)
    assert np.array_equal(target, np.transpose(source, perm))


def test_a_truncated_weight_file_is_one_clear_error(tmp_path):
    path = _export(tmp_path / "m.onnx", np.random.default_rng(7))
    model = load_structure(path)
    data = tmp_path / "weights.bin"
    data.write_bytes(data.read_bytes()[:OUT * D * 4 // 2])
    with pytest.raises(ModelFileError, match="truncated: tensor 'W0'"):
        TransposedWeights(model, tmp_path).values(["Wt0"])
