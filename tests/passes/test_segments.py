"""eecompile.passes.segments: a model run in segments gives the whole-model run's values bit for bit."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eecompile.passes import segments
from eecompile.passes.segments import SegmentedSession, plan_segments, weight_bytes
from eecompile.passes.store import in_place_session, load_structure

FLOAT = TensorProto.FLOAT
D, LAYERS = 16, 6


def _decoder(path, rng):
    """Residual blocks h += Relu(LayerNorm(h)·W_i) over x, then present = Concat(past, h·Wk), y = present·Wo."""
    f = lambda *s: (rng.standard_normal(s) / np.sqrt(s[0])).astype(np.float32)  # noqa: E731
    nodes, inits, h = [], {}, "x"
    inits["g"], inits["b"] = np.ones(D, np.float32), np.zeros(D, np.float32)
    for i in range(LAYERS):
        inits[f"w{i}"] = f(D, D)
        nodes += [helper.make_node("LayerNormalization", [h, "g", "b"], [f"n{i}"], axis=-1),
                  helper.make_node("MatMul", [f"n{i}", f"w{i}"], [f"m{i}"]),
                  helper.make_node("Relu", [f"m{i}"], [f"r{i}"]),
                  helper.make_node("Add", [h, f"r{i}"], [f"h{i}"])]
        h = f"h{i}"
    inits["Wk"], inits["Wo"] = f(D, D), f(D, 3)
    nodes += [helper.make_node("MatMul", [h, "Wk"], ["k"]),
              helper.make_node("Concat", ["past_key", "k"], ["present_key"], axis=1),
              helper.make_node("MatMul", ["present_key", "Wo"], ["y"])]
    graph = helper.make_graph(
        nodes, "dec",
        [helper.make_tensor_value_info("x", FLOAT, ["B", "T", D]),
         helper.make_tensor_value_info("past_key", FLOAT, ["B", "P", D])],
        [helper.make_tensor_value_info("y", FLOAT, ["B", "S", 3]),
         helper.make_tensor_value_info("present_key", FLOAT, ["B", "S", D])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _layer_bytes() -> int:
    return D * D * 4


def _count_segment_builds(monkeypatch) -> list:
    """From now on, the start node of every segment model built (one per session)."""
    built = []
    real = segments.SegmentedSession._segment

    def counting(self, *args):
        built.append(args[0])
        return real(self, *args)

    monkeypatch.setattr(segments.SegmentedSession, "_segment", counting)
    return built


def test_plan_cuts_into_consecutive_ranges_between_layers(tmp_path):
    model = load_structure(_decoder(tmp_path / "m.onnx", np.random.default_rng(0)))
    ranges = plan_segments(model, 3 * _layer_bytes())
    assert len(ranges) == 3
    assert ranges[0][0] == 0 and ranges[-1][1] == len(model.graph.node)
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # consecutive, nothing skipped
    for _, stop in ranges[:-1]:  # each cut after a residual Add: only the stream crosses it
        assert model.graph.node[stop - 1].op_type == "Add"


def test_piecewise_run_equals_the_whole_run_bit_for_bit_with_a_decode_step(tmp_path):
    import onnxruntime as ort

    path = _decoder(tmp_path / "m.onnx", np.random.default_rng(1))
    model = load_structure(path)
    options = ort.SessionOptions()
    whole = in_place_session(model, tmp_path, options)
    pieces = SegmentedSession(model, tmp_path, options, 3 * _layer_bytes())
    assert len(pieces.ranges) == 3
    assert [i.name for i in pieces.get_inputs()] == [i.name for i in whole.get_inputs()]
    assert [o.name for o in pieces.get_outputs()] == [o.name for o in whole.get_outputs()]
    assert pieces.get_inputs()[0].shape == ["B", "T", D] and pieces.get_inputs()[0].type == "tensor(float)"
    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 4, D)).astype(np.float32),
             "past_key": rng.standard_normal((2, 2, D)).astype(np.float32)}
    names = ["y", "present_key"]
    a, b = whole.run(names, feeds), pieces.run(names, feeds)
    for u, v in zip(a, b):
        assert u.dtype == v.dtype and u.shape == v.shape and np.array_equal(u, v)
    step = {"x": rng.standard_normal((2, 1, D)).astype(np.float32), "past_key": a[1]}  # the cache fed back
    a2, b2 = whole.run(names, step), pieces.run(names, {**step, "past_key": b[1]})
    assert a2[1].shape == (2, 7, D)
    for u, v in zip(a2, b2):
        assert np.array_equal(u, v)
    # intermediates of any segment can be fetched, equal to the whole model's with them as outputs
    mid = pieces.run(["h1", "n4", "y"], feeds)
    extra = load_structure(path)
    extra.graph.output.extend([onnx.ValueInfoProto(name="h1"), onnx.ValueInfoProto(name="n4")])
    ref = in_place_session(extra, tmp_path, options).run(["h1", "n4", "y"], feeds)
    assert all(np.array_equal(u, v) for u, v in zip(mid, ref))


def test_compile_verifies_and_measures_exposure_in_segments_with_a_decode_step(tmp_path, monkeypatch):
    """Forced into segments (threshold 0), verification still checks the prefill and the decode step."""
    import eecompile

    path = _decoder(tmp_path / "m.onnx", np.random.default_rng(3))
    assert weight_bytes(load_structure(path)) > 0
    monkeypatch.setattr(segments, "PIECEWISE_BYTES", 0)
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 3 * _layer_bytes())
    runs = []
    real = SegmentedSession.run

    def counted(self, names, feeds, run_options=None):
        runs.append(len(self.ranges))
        return real(self, names, feeds, run_options)

    monkeypatch.setattr(SegmentedSession, "run", counted)
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out", progress=False)
    v = result.verification
    assert v.checked and v.decode_checked and v.max_relative_error <= 1e-5, v.detail
    assert runs and all(n >= 3 for n in runs)  # the compiled model has its own weights (more nodes)
    exposure = result.report["exposure"]
    assert exposure["checked"] and exposure["matched"] > 0, exposure["detail"]


def test_run_many_builds_each_segment_once_and_equals_single_runs(tmp_path, monkeypatch):
    """Feed sets of different sequence lengths through one build of each segment, each equal to its own run."""
    path = _decoder(tmp_path / "m.onnx", np.random.default_rng(4))
    pieces = SegmentedSession(load_structure(path), tmp_path, None, 3 * _layer_bytes())
    rng = np.random.default_rng(5)
    sets = [{"x": rng.standard_normal((2, t, D)).astype(np.float32),
             "past_key": rng.standard_normal((2, p, D)).astype(np.float32)} for t, p in ((4, 2), (1, 6))]
    single = [pieces.run(["y", "present_key"], f) for f in sets]
    built = _count_segment_builds(monkeypatch)
    many = segments.run_all(pieces, ["y", "present_key"], sets)
    assert len(built) == len(pieces.ranges) == 3
    assert many[1][1].shape == (2, 7, D)
    for a, b in zip(single, many):
        assert all(np.array_equal(u, v) for u, v in zip(a, b))


def test_a_linked_decode_step_runs_in_its_prefill_pass(tmp_path, monkeypatch):
    """A step whose cache is its prefill's ``present_key``, taken segment by segment: one build of each segment
    for both, equal bit for bit to running the prefill and then the step; without segments, the same."""
    import onnxruntime as ort

    path = _decoder(tmp_path / "m.onnx", np.random.default_rng(6))
    model = load_structure(path)
    pieces = SegmentedSession(model, tmp_path, None, 3 * _layer_bytes())
    whole = in_place_session(model, tmp_path, ort.SessionOptions())
    rng = np.random.default_rng(7)
    prefill = {"x": rng.standard_normal((2, 4, D)).astype(np.float32),
               "past_key": rng.standard_normal((2, 2, D)).astype(np.float32)}
    step = {"x": rng.standard_normal((2, 1, D)).astype(np.float32)}
    names = ["y", "present_key"]
    first = pieces.run(names, prefill)
    second = pieces.run(names, {**step, "past_key": first[1]})
    built = _count_segment_builds(monkeypatch)
    links = [{}, {"past_key": (0, "present_key")}]
    chained = segments.run_all(pieces, names, [prefill, step], links)
    assert len(built) == len(pieces.ranges) == 3
    assert chained[1][1].shape == (2, 7, D)
    for a, b in zip([first, second], chained):
        assert all(np.array_equal(u, v) for u, v in zip(a, b))
    unsegmented = segments.run_all(whole, names, [prefill, step], links)
    for a, b in zip([first, second], unsegmented):
        assert all(np.array_equal(u, v) for u, v in zip(a, b))


def test_a_link_to_a_tensor_not_yet_computed_is_refused(tmp_path):
    path = _decoder(tmp_path / "m.onnx", np.random.default_rng(8))
    pieces = SegmentedSession(load_structure(path), tmp_path, None, 3 * _layer_bytes())
    x = np.zeros((1, 1, D), np.float32)
    sets = [{"x": x, "past_key": np.zeros((1, 1, D), np.float32)}, {"x": x}]
    with pytest.raises(ValueError, match="not computed yet"):
        pieces.run_many(["y", "present_key"], sets, links=[{}, {"past_key": (1, "present_key")}])  # its own
    with pytest.raises(ValueError, match="must be a graph output"):
        pieces.run_many(["y"], sets, links=[{}, {"past_key": (0, "h1")}])


def test_compile_verifies_prefill_and_decode_step_in_one_pass_per_model(tmp_path, monkeypatch):
    """The decode step's cache shapes are predicted (past + new tokens), so each model's prefill and decode step
    share one pass over its segments: two passes in all (original, compiled), each of 2 prefills + 2 steps."""
    import eecompile

    path = _decoder(tmp_path / "m.onnx", np.random.default_rng(9))
    monkeypatch.setattr(segments, "PIECEWISE_BYTES", 0)
    monkeypatch.setattr(segments, "SEGMENT_BYTES", 3 * _layer_bytes())
    passes = []
    real = SegmentedSession.run_many

    def counted(self, names, feeds_list, run_options=None, links=None):
        passes.append((len(feeds_list), bool(links and any(links))))
        return real(self, names, feeds_list, run_options, links)

    monkeypatch.setattr(SegmentedSession, "run_many", counted)
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out", progress=False)
    v = result.verification
    assert v.checked and v.decode_checked and "decode step" in v.detail and v.max_relative_error <= 1e-5, v.detail
    assert passes.count((4, True)) == 2 and (2, False) not in passes, passes
