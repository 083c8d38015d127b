"""eecompile.passes.exposure: the measured count of tensors the server sees in plaintext."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import eecompile
from eecompile.passes.exposure import measure_exposure
from eecompile.passes.rules import unregistered
from eecompile.report import exposure_line, render_markdown

FLOAT = onnx.TensorProto.FLOAT


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _mlp(build, rng):
    """x → h0 = x·W0 → a = h0·W1 → r = Relu(a) → y = r·W2."""
    return build([helper.make_node("MatMul", ["x", "W0"], ["h0"], name="layer0"),
                  helper.make_node("MatMul", ["h0", "W1"], ["a"], name="layer1"),
                  helper.make_node("Relu", ["a"], ["r"], name="act"),
                  helper.make_node("MatMul", ["r", "W2"], ["y"], name="layer2")],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])],
                 {"W0": _f(rng, 4, 5), "W1": _f(rng, 5, 6), "W2": _f(rng, 6, 3)})


def test_protected_tensors_are_not_exposed(rng, build, tmp_path):
    result = eecompile.compile_model(_mlp(build, rng), eecompile.generate_key(), tmp_path / "out")
    e = result.report["exposure"]
    assert e["checked"] and e["intermediates_compared"] == 3 and e["intermediates_exposed"] == 0
    assert e["exposed"] == [] and e["unmatched"] == 0 and e["state_outputs_compared"] == 0
    assert exposure_line(e) == "exposure: 0 of 3 intermediate tensors equal the plaintext run"
    assert exposure_line(e) in render_markdown(result.report)


def test_a_provably_clear_tensor_is_counted_exposed(rng, build, tmp_path):
    path = _mlp(build, rng)
    with unregistered("Relu"):  # Relu's spaces stay clear: a and r are computed in plaintext
        result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    e = result.report["exposure"]
    assert e["intermediates_compared"] == 3 and e["intermediates_exposed"] == 2
    assert {(x["tensor"], x["node"], x["op_type"]) for x in e["exposed"]} == {("a", "layer1", "MatMul"),
                                                                             ("r", "act", "Relu")}
    assert any("2 of 3 intermediate tensor(s) equal the plaintext run" in w for w in result.report["warnings"])


def _attention(build, rng, norm: bool = False):
    """RMS-normalised x·Win (optional), q/k/v per head, softmax(q·kᵀ / 2) · v, merged, projected."""
    nodes, inits, src = [], {}, "x"
    if norm:
        nodes += [helper.make_node("MatMul", ["x", "Win"], ["h"], name="in_proj"),
                  helper.make_node("Pow", ["h", "two"], ["sq"], name="square"),
                  helper.make_node("ReduceMean", ["sq", "last"], ["ms"], name="mean", keepdims=1),
                  helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
                  helper.make_node("Sqrt", ["mse"], ["rms"], name="root"),
                  helper.make_node("Div", ["h", "rms"], ["xn"], name="normalise")]
        inits.update(Win=_f(rng, 6, 6), two=np.array(2.0, np.float32), last=np.array([-1]),
                     eps=np.array(1e-6, np.float32))
        src = "xn"
    for t in "qkv":
        nodes += [helper.make_node("MatMul", [src, f"W{t}"], [t], name=f"{t}_proj"),
                  helper.make_node("Reshape", [t, "heads"], [f"{t}4"], name=f"{t}_heads"),
                  helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], name=f"{t}_t", perm=[0, 2, 1, 3])]
        inits[f"W{t}"] = _f(rng, 6, 6)
    nodes += [helper.make_node("Transpose", ["kh"], ["kt"], name="k_tt", perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qh", "kt"], ["scores"], name="qk"),
              helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scale_scores"),
              helper.make_node("Softmax", ["scaled"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["ctx"], name="pv"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_t", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge"], ["merged"], name="merge"),
              helper.make_node("MatMul", ["merged", "Wo"], ["y"], name="o_proj")]
    inits.update(heads=np.array([0, 0, 2, 3]), merge=np.array([0, 0, 6]), scale=np.array(0.5, np.float32),
                 Wo=_f(rng, 6, 6))
    return build(nodes, [("x", FLOAT, ["B", "S", 6])], [("y", FLOAT, ["B", "S", 6])], inits)


def test_attention_scores_and_statistics_are_excluded_by_design(rng, build, tmp_path):
    result = eecompile.compile_model(_attention(build, rng, norm=True), eecompile.generate_key(), tmp_path / "out")
    e = result.report["exposure"]
    assert e["intermediates_exposed"] == 0, e["exposed"]
    assert e["excluded"]["attention"] == 3  # scores, scaled scores, probabilities
    assert e["excluded"]["statistics"] == 3  # mean square, + eps, its root
    assert e["excluded_by_design"] == 6 and "6 visible by design excluded" in exposure_line(e)


def test_clear_kv_cache_outputs_are_exposed(rng, build, tmp_path):
    path = build([helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
                  helper.make_node("Concat", ["past_key", "k"], ["present_key"], name="cache", axis=1),
                  helper.make_node("MatMul", ["present_key", "Wo"], ["y"], name="out")],
                 [("x", FLOAT, ["B", "S", 6]), ("past_key", FLOAT, ["B", "P", 6])],
                 [("y", FLOAT, ["B", "T", 3]), ("present_key", FLOAT, ["B", "T", 6])],
                 {"Wk": _f(rng, 6, 6), "Wo": _f(rng, 6, 3)})
    e = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "a").report["exposure"]
    assert (e["state_outputs_compared"], e["state_outputs_exposed"]) == (1, 0)
    with unregistered("Concat"):  # the cache's space is left clear
        report = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "b").report
    e = report["exposure"]
    assert (e["state_outputs_compared"], e["state_outputs_exposed"]) == (1, 1)
    assert {"tensor": "present_key", "node": "cache", "op_type": "Concat", "kind": "state"} in e["exposed"]
    assert "1 of 1 KV-cache outputs equal the plaintext run" in exposure_line(e)
    assert any("KV-cache output(s) are CLEAR state" in w for w in report["warnings"])


def test_measure_exposure_matches_by_name_and_skips_large_models(rng, build, tmp_path):
    path = _mlp(build, rng)
    feeds = {"x": _f(rng, 2, 4)}
    same = measure_exposure(path, path, feeds, feeds, tmp_path)  # the plaintext model as its own "server"
    assert same["intermediates_compared"] == 3 and same["intermediates_exposed"] == 3
    model = onnx.load(str(path))
    model.graph.node[1].output[0] = "a_renamed"
    model.graph.node[2].input[0] = "a_renamed"
    renamed = tmp_path / "renamed.onnx"
    onnx.save(model, str(renamed))
    result = measure_exposure(path, renamed, feeds, feeds, tmp_path)
    assert result["unmatched"] == 1 and result["intermediates_compared"] == 2
    assert not (tmp_path / "exposure").exists()  # temporary copies are removed
    big = measure_exposure(path, path, feeds, feeds, tmp_path, max_bytes=64)
    assert not big["checked"] and "limit" in big["detail"]
    assert exposure_line(big).startswith("exposure: not measured (skipped: the original model is")


def test_no_verify_means_no_measurement(rng, build, tmp_path):
    result = eecompile.compile_model(_mlp(build, rng), eecompile.generate_key(), tmp_path / "out", verify=False)
    assert result.report["exposure"] == {"checked": False, "detail": "not measured: verification did not run"}


def test_zoo_llama_keeps_no_plaintext_activation_or_cache(zoo, key_a):
    pytest.importorskip("torch")
    result = zoo.compile("llama", "dynamo", 20, key_a)
    e = result.report["exposure"]
    assert e["checked"] and e["unmatched"] == 0 and e["intermediates_compared"] >= 50
    assert e["intermediates_exposed"] == 0, e["exposed"]
    assert (e["state_outputs_compared"], e["state_outputs_exposed"]) == (4, 0)
    assert e["excluded"]["attention"] >= 2 and e["excluded"]["statistics"] >= 2
    assert result.verification.decode_checked


def test_the_measure_reads_no_weights_through_onnx(rng, build, tmp_path, monkeypatch):
    """With weights embedded above the in-place threshold, the measure loads the structure only and ONNX Runtime
    reads the weights where they are: ``onnx.load``/``onnx.save`` (weights in memory, model copies on disk) are
    never called, and the counts equal the compile's own measure."""
    path = build([helper.make_node("MatMul", ["x", "W0"], ["h0"], name="layer0"),
                  helper.make_node("Relu", ["h0"], ["r"], name="act"),
                  helper.make_node("MatMul", ["r", "W1"], ["y"], name="layer1")],
                 [("x", FLOAT, ["B", 128])], [("y", FLOAT, ["B", 128])],
                 {"W0": _f(rng, 128, 256), "W1": _f(rng, 256, 128)})  # 128 KiB each: referenced in place
    with unregistered("Relu"):
        result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    expected = result.report["exposure"]
    assert expected["checked"] and expected["intermediates_exposed"] == 2

    def refuse(*args, **kwargs):
        raise AssertionError("the exposure measure must not load or save a model with its weights")

    for name in ("load", "load_model", "save", "save_model"):
        monkeypatch.setattr(onnx, name, refuse)
    feeds = result.verification.feeds[0]
    client = eecompile.Client.load(tmp_path / "out" / "client")
    got = measure_exposure(path, tmp_path / "out" / "server" / "model.onnx", feeds, client.encrypt(feeds), tmp_path)
    assert {k: got[k] for k in ("intermediates_compared", "intermediates_exposed", "matched", "unmatched")} == \
        {k: expected[k] for k in ("intermediates_compared", "intermediates_exposed", "matched", "unmatched")}
