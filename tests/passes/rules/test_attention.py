"""Attention: the decomposed form (heads Reshape/Transpose, Q·Kᵀ, Softmax, ·V, fused-QKV Split) and the
opset-23 ``Attention`` op of eecompile.passes.rules.attention (GQA, KV cache).

Per head, keys take the dual of the query basis (``T_K = T_Q^{-T}``) so the scores stay clear
and exact; values and the attention output share a per-head invertible basis folded into the
output projection; the KV cache stays in the key/value bases on the server.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import eecompile
from eecompile.passes.analyze import analyze
from eecompile.passes.graph import ModelGraph, infer_shapes, load_model
from eecompile.passes.normalize import normalize
from eecompile.passes.verify import relative_error

FLOAT = TensorProto.FLOAT
H, HD = 2, 4
D = H * HD


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _analysis(path):
    mg = ModelGraph(infer_shapes(load_model(path)))
    normalize(mg)
    return analyze(ModelGraph(infer_shapes(mg.export())))


def _decomposed(rng, fused: bool = False, mask: bool = False):
    """Multi-head self-attention as exporters write it, [B, S, D] in and out."""
    nodes = []
    if fused:
        nodes += [helper.make_node("MatMul", ["x", "Wqkv"], ["qkv"], name="qkv_proj"),
                  helper.make_node("Split", ["qkv", "splits"], ["q", "k", "v"], name="split_qkv", axis=2)]
    else:
        nodes += [helper.make_node("MatMul", ["x", f"W{t}"], [t], name=f"{t}_proj") for t in "qkv"]
    for t in "qkv":
        nodes += [helper.make_node("Reshape", [t, "heads_shape"], [f"{t}4"], name=f"{t}_split_heads"),
                  helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], name=f"{t}_transpose", perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Transpose", ["kh"], ["kt"], name="k_t", perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qh", "kt"], ["scores"], name="qk"),
              helper.make_node("Div", ["scores", "sqrt_d"], ["scaled"], name="scale")]
    probs_in = "scaled"
    if mask:
        nodes.append(helper.make_node("Add", ["scaled", "mask"], ["masked"], name="add_mask"))
        probs_in = "masked"
    nodes += [helper.make_node("Softmax", [probs_in], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["ctx"], name="pv"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_transpose", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"], name="merge_heads"),
              helper.make_node("MatMul", ["merged", "Wo"], ["y"], name="o_proj")]
    inits = {"heads_shape": np.array([0, 0, H, HD]), "merge_shape": np.array([0, 0, D]),
             "sqrt_d": np.array(np.sqrt(HD), np.float32), "Wo": _f(rng, D, D)}
    if fused:
        inits.update(Wqkv=_f(rng, D, 3 * D), splits=np.array([D, D, D]))
    else:
        inits.update(Wq=_f(rng, D, D), Wk=_f(rng, D, D), Wv=_f(rng, D, D))
    if mask:
        inits["mask"] = np.triu(np.full((3, 3), -1e4, np.float32), 1)
    return nodes, inits


@pytest.mark.parametrize("fused", [False, True], ids=["separate-qkv", "fused-qkv-split"])
def test_decomposed_multi_head_attention(fused, rng, build, lint, compile_exact):
    nodes, inits = _decomposed(rng, fused)
    path = build(nodes, [("x", FLOAT, ["B", "S", D])], [("y", FLOAT, ["B", "S", D])], inits)
    report = lint(path)
    assert report.basis("x") == "invertible" and report.basis("y") == "invertible"
    assert not [s for s in report["spaces"] if {"scores", "probs"} & set(s["tensors"])]  # scores in clear
    analysis = _analysis(path)
    spaces, ann = analysis.ctx.spaces, analysis.ctx.ann
    q, k, v, ctx = (ann[t] for t in ("qh", "kh", "vh", "ctx"))
    assert q.head_axis == 1 and q.axis == 3 and len(q.refs) == H
    for h in range(H):
        rq, rk = spaces.find(q.refs[h]), spaces.find(k.refs[h])
        assert rq.space == rk.space and rq.dual != rk.dual  # T_K = T_Q^{-T}, per head
        assert spaces.size(q.refs[h]) == HD
        assert spaces.find(ctx.refs[h]) == spaces.find(v.refs[h])  # P·V stays in V's basis
    assert spaces.find(q.refs[0]).space != spaces.find(q.refs[1]).space  # one basis per head
    assert spaces.find(v.refs[0]).space != spaces.find(q.refs[0]).space
    qkv = report.space("qkv" if fused else "q")
    assert qkv["basis"] == "block-invertible" and qkv["blocks"] == (3 * H if fused else H)
    compile_exact(path, {"x": _f(rng, 2, 3, D)})


def test_decomposed_attention_with_a_constant_mask(rng, build, lint, compile_exact):
    nodes, inits = _decomposed(rng, mask=True)
    path = build(nodes, [("x", FLOAT, [2, 3, D])], [("y", FLOAT, [2, 3, D])], inits)
    report = lint(path)
    assert report.space("q")["basis"] == "block-invertible"
    assert any("attention patterns" in w for w in report["weaknesses"])
    compile_exact(path, {"x": _f(rng, 2, 3, D)})


# -- the opset-23 Attention op -----------------------------------------------------------------------

HQ, HKV = 4, 2


def _gqa(build, rng, with_past: bool = True):
    nodes = [helper.make_node("MatMul", ["x", f"W{t}"], [t], name=f"{t}_proj") for t in "qkv"]
    inputs = ["q", "k", "v"] + (["", "past_key", "past_value"] if with_past else [])
    outputs = ["att", "present_key", "present_value"] if with_past else ["att"]
    nodes += [helper.make_node("Attention", inputs, outputs, name="attention", q_num_heads=HQ, kv_num_heads=HKV),
              helper.make_node("MatMul", ["att", "Wo"], ["y"], name="o_proj")]
    graph_inputs = [("x", FLOAT, ["B", "S", D])]
    graph_outputs = [("y", FLOAT, ["B", "S", D])]
    if with_past:
        graph_inputs += [("past_key", FLOAT, ["B", HKV, "P", HD]), ("past_value", FLOAT, ["B", HKV, "P", HD])]
        graph_outputs += [("present_key", FLOAT, ["B", HKV, "T", HD]), ("present_value", FLOAT, ["B", HKV, "T", HD])]
    inits = {"Wq": _f(rng, D, HQ * HD), "Wk": _f(rng, D, HKV * HD), "Wv": _f(rng, D, HKV * HD),
             "Wo": _f(rng, HQ * HD, D)}
    return build(nodes, graph_inputs, graph_outputs, inits, opset=23)


def test_attention_op_grouped_query_heads(rng, build, lint, compile_exact):
    path = _gqa(build, rng, with_past=False)
    report = lint(path)
    assert report.space("q")["blocks"] == HQ and report.space("k")["blocks"] == HKV
    assert report.space("v")["basis"] == "block-invertible"
    analysis = _analysis(path)
    spaces, ann = analysis.ctx.spaces, analysis.ctx.ann
    q, k, v = (spaces.expand(ann[t].refs) for t in "qkv")
    group = HQ // HKV
    for h in range(HQ):
        rq, rk = spaces.find(q[h]), spaces.find(k[h // group])
        assert rq.space == rk.space and rq.dual != rk.dual  # query head h reads key head h // g
    assert spaces.find(q[0]).space != spaces.find(q[group]).space
    att = ann["att"]
    assert [spaces.find(r) for r in att.refs] == [spaces.find(v[h // group]) for h in range(HQ)]
    compile_exact(path, {"x": _f(rng, 2, 3, D)})


def test_attention_op_with_kv_cache_decodes_on_ciphertext(rng, build, lint, tmp_path):
    path = _gqa(build, rng, with_past=True)
    report = lint(path)
    for name in ("past_key", "past_value"):
        assert "server-side state" in report.protection("inputs", name)
    analysis = _analysis(path)
    spaces, ann = analysis.ctx.spaces, analysis.ctx.ann
    for cache, new in (("past_key", "k"), ("past_value", "v"), ("present_key", "k"), ("present_value", "v")):
        assert [spaces.find(r) for r in ann[cache].refs] == [spaces.find(r) for r in spaces.expand(ann[new].refs)]
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    enc = eecompile.EncryptedSession(result.out_dir, providers=["CPUExecutionProvider"])
    plain = cipher = (np.zeros((2, HKV, 0, HD), np.float32),) * 2
    for step in range(3):
        x = _f(rng, 2, 3 if step == 0 else 1, D)
        y_plain, *plain = ref.run(None, {"x": x, "past_key": plain[0], "past_value": plain[1]})
        y_enc, *cipher = enc.run(None, {"x": x, "past_key": cipher[0], "past_value": cipher[1]})
        assert relative_error(y_plain, y_enc) <= 1e-5, f"step {step}"
        for p, c in zip(plain, cipher):
            assert p.shape == c.shape and not np.allclose(p, c)  # the cache stays ciphertext


def test_attention_op_with_unprotected_keys_clears_queries(rng, build, lint, compile_exact):
    """Keys read straight from a graph input in clear: queries cannot take a basis either."""
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
             helper.make_node("Attention", ["q", "kin", "v"], ["att"], name="attention", q_num_heads=HQ,
                              kv_num_heads=HKV),
             helper.make_node("MatMul", ["att", "Wo"], ["y"], name="o_proj")]
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("kin", FLOAT, ["B", "S", HKV * HD])],
                 [("y", FLOAT, ["B", "S", D])],
                 {"Wq": _f(rng, D, HQ * HD), "Wv": _f(rng, D, HKV * HD), "Wo": _f(rng, HQ * HD, D)}, opset=23)
    report = lint(path)
    assert report.basis("q") == "clear"
    assert report.protection("inputs", "kin") == "clear"
    assert report.basis("v") == "block-invertible"  # values are independent of the pairing
    compile_exact(path, {"x": _f(rng, 2, 3, D), "kin": _f(rng, 2, 3, HKV * HD)})


def test_attention_op_single_head_4d_without_head_attributes(rng, build, lint, compile_exact):
    """A diffusers VAE's mid-block attention at opset 23: one head, ``[B,S,D] -> [B,S,1,D] -> [B,1,S,D]``
    4-D inputs and no ``q_num_heads`` (the heads are axis 1): Q/K dual, V carried, nothing cleared."""
    nodes = [helper.make_node("MatMul", ["x", f"W{t}"], [t], name=f"{t}_proj") for t in "qkv"]
    for t in "qkv":
        nodes += [helper.make_node("Reshape", [t, "one_head"], [f"{t}4"], name=f"{t}_view"),
                  helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], name=f"{t}_t", perm=[0, 2, 1, 3])]
    nodes += [helper.make_node("Attention", ["qh", "kh", "vh"], ["att"], name="attention"),
              helper.make_node("Transpose", ["att"], ["att_t"], name="att_t", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["att_t", "merge"], ["merged"], name="merge"),
              helper.make_node("MatMul", ["merged", "Wo"], ["y"], name="o_proj")]
    inits = {**{f"W{t}": (_f(rng, D, D) / np.sqrt(D)).astype(np.float32) for t in "qkv"}, "Wo": _f(rng, D, D),
             "one_head": np.array([0, 0, 1, D]), "merge": np.array([0, 0, D])}
    path = build(nodes, [("x", FLOAT, ["B", "S", D])], [("y", FLOAT, ["B", "S", D])], inits, opset=23)
    report = lint(path)
    assert report.basis("q") != "clear" and report.basis("v") != "clear"
    result = compile_exact(path, {"x": _f(rng, 2, 5, D)})
    assert result.report["exposure"]["intermediates_exposed"] == 0
