"""eecompile.passes.rules.rotary: rotary position embeddings allow one complex scalar per head and
frequency pair — the opset-23 ``RotaryEmbedding`` op and the decomposed ``rotate_half`` pattern
(``x·cos + concat(-x2, x1)·sin``) alike."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from eecompile.passes.analyze import analyze
from eecompile.passes.graph import ModelGraph, infer_shapes, load_model
from eecompile.passes.normalize import normalize

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
H, HD = 2, 4
D = H * HD
MAXPOS = 16
INV_FREQ = 1.0 / (10000 ** (np.arange(0, HD, 2) / HD))


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _positions(rng, batch=2, seq=3):
    start = int(rng.integers(0, MAXPOS - seq))
    return np.broadcast_to(np.arange(start, start + seq), (batch, seq)).astype(np.int64)


def _rotate_half(x, out, cos, sin, p):
    return [helper.make_node("Slice", [x, "zero", "half", "last"], [f"{p}x1"], name=f"{p}slice1"),
            helper.make_node("Slice", [x, "half", "big", "last"], [f"{p}x2"], name=f"{p}slice2"),
            helper.make_node("Neg", [f"{p}x2"], [f"{p}neg_x2"], name=f"{p}neg"),
            helper.make_node("Concat", [f"{p}neg_x2", f"{p}x1"], [f"{p}rot"], name=f"{p}concat", axis=-1),
            helper.make_node("Mul", [x, cos], [f"{p}x_cos"], name=f"{p}mul_cos"),
            helper.make_node("Mul", [f"{p}rot", sin], [f"{p}rot_sin"], name=f"{p}mul_sin"),
            helper.make_node("Add", [f"{p}x_cos", f"{p}rot_sin"], [out], name=f"{p}add")]


def _attention(rng, rope_nodes, extra_inits):
    """Q/K/V projections split into heads, a rope block producing qr/kr, then softmax(qr·krᵀ)·v."""
    nodes = [helper.make_node("MatMul", ["x", f"W{t}"], [t], name=f"{t}_proj") for t in "qkv"]
    for t in "qkv":
        nodes += [helper.make_node("Reshape", [t, "heads_shape"], [f"{t}4"], name=f"{t}_heads"),
                  helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], name=f"{t}_transpose", perm=[0, 2, 1, 3])]
    nodes += rope_nodes
    nodes += [helper.make_node("Transpose", ["kr"], ["kt"], name="k_t", perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qr", "kt"], ["scores"], name="qk"),
              helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["ctx"], name="pv"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_transpose", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"], name="merge"),
              helper.make_node("MatMul", ["merged", "Wo"], ["y"], name="o_proj")]
    inits = {"heads_shape": np.array([0, 0, H, HD]), "merge_shape": np.array([0, 0, D]),
             "Wq": _f(rng, D, D), "Wk": _f(rng, D, D), "Wv": _f(rng, D, D), "Wo": _f(rng, D, D), **extra_inits}
    return nodes, inits


def _decomposed(rng, trig: str):
    """rotate_half on qh and kh; cos/sin ``computed`` from the position ids (as torch.export writes
    it) or ``gathered`` from cached tables by position id (older Hugging Face code)."""
    inits = {"zero": np.array([0]), "half": np.array([HD // 2]), "big": np.array([1 << 30]),
             "last": np.array([-1]), "head_axis": np.array([1])}
    if trig == "computed":
        nodes = [helper.make_node("Cast", ["position_ids"], ["pos_f"], name="pos_float", to=FLOAT),
                 helper.make_node("Unsqueeze", ["pos_f", "last"], ["pos_u"], name="pos_unsqueeze"),
                 helper.make_node("Mul", ["pos_u", "inv_freq"], ["freqs"], name="freqs"),
                 helper.make_node("Concat", ["freqs", "freqs"], ["emb"], name="emb", axis=-1),
                 helper.make_node("Cos", ["emb"], ["cos3"], name="cos"),
                 helper.make_node("Sin", ["emb"], ["sin3"], name="sin")]
        inits["inv_freq"] = INV_FREQ.astype(np.float32)
    else:
        angles = np.arange(MAXPOS)[:, None] * INV_FREQ[None]
        emb = np.concatenate([angles, angles], -1)
        nodes = [helper.make_node("Gather", ["cos_table", "position_ids"], ["cos3"], name="cos_gather"),
                 helper.make_node("Gather", ["sin_table", "position_ids"], ["sin3"], name="sin_gather")]
        inits.update(cos_table=np.cos(emb).astype(np.float32), sin_table=np.sin(emb).astype(np.float32))
    nodes += [helper.make_node("Unsqueeze", ["cos3", "head_axis"], ["cos4"], name="cos_heads"),
              helper.make_node("Unsqueeze", ["sin3", "head_axis"], ["sin4"], name="sin_heads")]
    nodes += _rotate_half("qh", "qr", "cos4", "sin4", "q_") + _rotate_half("kh", "kr", "cos4", "sin4", "k_")
    return nodes, inits


def _analysis(path):
    mg = ModelGraph(infer_shapes(load_model(path)))
    normalize(mg)
    return analyze(ModelGraph(infer_shapes(mg.export())))


def _assert_complex_pairs(path, report, layout="complex-pairs"):
    for t in ("q", "k"):
        space = report.space(t)
        assert space["basis"] == "complex-pairs" and space["blocks"] == H
        assert space["class"] == layout
        assert "rotary" in space["limited_by"]["reason"]
    assert report.basis("v") == "block-invertible"  # V is not rotated: any per-head basis
    analysis = _analysis(path)
    spaces, ann = analysis.ctx.spaces, analysis.ctx.ann
    for h in range(H):
        rq, rk = spaces.find(ann["qr"].refs[h]), spaces.find(ann["kr"].refs[h])
        assert rq.space == rk.space and rq.dual != rk.dual  # K rotates in the dual basis


def test_decomposed_rotate_half(rng, build, lint, compile_exact):
    rope, extra = _decomposed(rng, "computed")
    nodes, inits = _attention(rng, rope, extra)
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("position_ids", INT64, ["B", "S"])],
                 [("y", FLOAT, ["B", "S", D])], inits)
    report = lint(path)
    _assert_complex_pairs(path, report)
    assert report.protection("inputs", "position_ids") == "clear"
    compile_exact(path, {"x": _f(rng, 2, 3, D), "position_ids": _positions(rng)})


def test_decomposed_rotate_half_with_gathered_cos_sin(rng, build, lint, compile_exact):
    rope, extra = _decomposed(rng, "gathered")
    nodes, inits = _attention(rng, rope, extra)
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("position_ids", INT64, ["B", "S"])],
                 [("y", FLOAT, ["B", "S", D])], inits)
    compile_exact(path, {"x": _f(rng, 2, 3, D), "position_ids": _positions(rng)})
    report = lint(path)
    _assert_complex_pairs(path, report)


def _rope_op_nodes(interleaved: int = 0, rotary_dim: int = 0):
    attrs = {"interleaved": interleaved}
    if rotary_dim:
        attrs["rotary_embedding_dim"] = rotary_dim
    # separate caches for q and k (one shared cache is the normalize pass's cloning business)
    return [helper.make_node("RotaryEmbedding", ["qh", "cos_q", "sin_q", "position_ids"], ["qr"], name="rope_q", **attrs),
            helper.make_node("RotaryEmbedding", ["kh", "cos_k", "sin_k", "position_ids"], ["kr"], name="rope_k", **attrs)]


def _caches(rng, dim=HD):
    angles = np.arange(MAXPOS)[:, None] * (1.0 / (10000 ** (np.arange(0, dim, 2) / dim)))[None]
    cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
    return {"cos_q": cos, "sin_q": sin, "cos_k": cos.copy() + 0.0, "sin_k": sin.copy() + 0.0}


@pytest.mark.parametrize("interleaved", [0, 1], ids=["half", "interleaved"])
def test_rotary_embedding_op(interleaved, rng, build, lint, compile_exact):
    nodes, inits = _attention(rng, _rope_op_nodes(interleaved), _caches(rng))
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("position_ids", INT64, ["B", "S"])],
                 [("y", FLOAT, ["B", "S", D])], inits, opset=23)
    report = lint(path)
    _assert_complex_pairs(path, report, "complex-pairs-interleaved" if interleaved else "complex-pairs")
    compile_exact(path, {"x": _f(rng, 2, 3, D), "position_ids": _positions(rng)})


def test_partial_rotary_embedding_clears(rng, build, lint, compile_exact):
    nodes, inits = _attention(rng, _rope_op_nodes(rotary_dim=HD // 2), _caches(rng, HD // 2))
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("position_ids", INT64, ["B", "S"])],
                 [("y", FLOAT, ["B", "S", D])], inits, opset=23)
    report = lint(path)
    assert report.basis("q") == "clear" and report.basis("k") == "clear"
    assert report.space("q")["limited_by"]["reason"] == "partial rotary embedding"
    compile_exact(path, {"x": _f(rng, 2, 3, D), "position_ids": _positions(rng)})


def test_rotary_embedding_op_on_flat_heads(rng, build, lint, compile_exact):
    """3-D [B, S, H·D] input with ``num_heads``: the flat axis is split into per-head blocks."""
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             helper.make_node("RotaryEmbedding", ["q", "cos_q", "sin_q", "position_ids"], ["qr"], name="rope_q",
                              num_heads=H),
             helper.make_node("MatMul", ["qr", "Wo"], ["y"], name="o_proj")]
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("position_ids", INT64, ["B", "S"])],
                 [("y", FLOAT, ["B", "S", D])], {"Wq": _f(rng, D, D), "Wo": _f(rng, D, D), **{
                     k: v for k, v in _caches(rng).items() if k.endswith("_q")}}, opset=23)
    report = lint(path)
    space = report.space("q")
    assert space["basis"] == "complex-pairs" and space["blocks"] == H
    compile_exact(path, {"x": _f(rng, 2, 3, D), "position_ids": _positions(rng)})


def _head_rms(x: str, out: str, gain: str, p: str) -> list:
    """Per-head RMS norm with a gain (Qwen3's q_norm / k_norm), decomposed as exporters write it."""
    return [helper.make_node("Pow", [x, "two"], [f"{p}sq"], name=f"{p}pow"),
            helper.make_node("ReduceMean", [f"{p}sq", "last"], [f"{p}ms"], name=f"{p}mean", keepdims=1),
            helper.make_node("Add", [f"{p}ms", "eps"], [f"{p}mse"], name=f"{p}eps"),
            helper.make_node("Sqrt", [f"{p}mse"], [f"{p}rms"], name=f"{p}sqrt"),
            helper.make_node("Div", [x, f"{p}rms"], [f"{p}normed"], name=f"{p}div"),
            helper.make_node("Mul", [f"{p}normed", gain], [out], name=f"{p}gain")]


def test_head_norm_with_gain_before_rope_gets_quarter_turns(rng, build, lint, compile_exact):
    """q/k norm before RoPE: a quarter turn (1, i, -1, -i) per frequency pair commutes with the norm, the
    gain (permuted within the pair) and the rotation; the report says so and the model is exact."""
    rope, extra = _decomposed(rng, "computed")
    rope = [n for n in rope if not n.name.startswith(("q_", "k_"))]
    rope += _head_rms("qh", "qn", "gain_q", "qnorm_") + _head_rms("kh", "kn", "gain_k", "knorm_")
    rope += _rotate_half("qn", "qr", "cos4", "sin4", "q_") + _rotate_half("kn", "kr", "cos4", "sin4", "k_")
    nodes, inits = _attention(rng, rope, {**extra, "two": np.array(2.0, np.float32),
                                          "eps": np.array(1e-6, np.float32),
                                          "gain_q": 1 + 0.3 * _f(rng, HD), "gain_k": 1 + 0.3 * _f(rng, HD)})
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("position_ids", INT64, ["B", "S"])],
                 [("y", FLOAT, ["B", "S", D])], inits)
    report = lint(path)
    for t in ("q", "k"):
        space = report.space(t)
        assert space["class"] == "pair-quarter-turns" and space["blocks"] == H, space
    compile_exact(path, {"x": _f(rng, 2, 3, D), "position_ids": _positions(rng)})


def test_rms_normalization_op_per_head_before_rope_never_crashes(rng, build, lint, compile_exact):
    """Opset 23: RMSNormalization with a head_dim-wide scale on [B, H, S, HD] (one gain for all heads) then
    RotaryEmbedding. The gain cannot be permuted per head, so each pair gets a sign; folding keeps the scale 1-D."""
    norm = [helper.make_node("RMSNormalization", ["qh", "gain_q"], ["qn"], name="q_norm", axis=-1),
            helper.make_node("RMSNormalization", ["kh", "gain_k"], ["kn"], name="k_norm", axis=-1)]
    rope = [helper.make_node("RotaryEmbedding", ["qn", "cos_q", "sin_q", "position_ids"], ["qr"], name="rope_q"),
            helper.make_node("RotaryEmbedding", ["kn", "cos_k", "sin_k", "position_ids"], ["kr"], name="rope_k")]
    nodes, inits = _attention(rng, norm + rope, {**_caches(rng), "gain_q": 1 + 0.3 * _f(rng, HD),
                                                 "gain_k": 1 + 0.3 * _f(rng, HD)})
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("position_ids", INT64, ["B", "S"])],
                 [("y", FLOAT, ["B", "S", D])], inits, opset=23)
    report = lint(path)
    for t in ("q", "k"):
        assert report.space(t)["class"] == "pair-signs", report.space(t)
    compile_exact(path, {"x": _f(rng, 2, 3, D), "position_ids": _positions(rng)})


# -- ONNX Runtime's com.microsoft RotaryEmbedding: (input, position_ids, cos_cache, sin_cache) --------------

MS = [("com.microsoft", 1)]


def _contrib_rope_nodes(**attrs):
    return [helper.make_node("RotaryEmbedding", ["qh", "position_ids", "cos_q", "sin_q"], ["qr"], name="rope_q",
                             domain="com.microsoft", **attrs),
            helper.make_node("RotaryEmbedding", ["kh", "position_ids", "cos_k", "sin_k"], ["kr"], name="rope_k",
                             domain="com.microsoft", **attrs)]


@pytest.mark.parametrize("interleaved", [0, 1], ids=["half", "interleaved"])
def test_contrib_rotary_embedding_on_heads(interleaved, rng, build, lint, compile_exact):
    """[B, H, S, D] input (BNSH), as the ONNX op: a complex scalar per head and frequency pair, K dual."""
    nodes, inits = _attention(rng, _contrib_rope_nodes(interleaved=interleaved), _caches(rng))
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("position_ids", INT64, ["B", "S"])],
                 [("y", FLOAT, ["B", "S", D])], inits, opset=21, extra_opsets=MS, check=False)
    report = lint(path)
    _assert_complex_pairs(path, report, "complex-pairs-interleaved" if interleaved else "complex-pairs")
    assert not report["unsupported_ops"]
    compile_exact(path, {"x": _f(rng, 2, 3, D), "position_ids": _positions(rng)})


@pytest.mark.parametrize("num_heads", [True, False], ids=["num_heads", "heads-from-cache"])
def test_contrib_rotary_embedding_on_flat_heads(num_heads, rng, build, lint, compile_exact):
    """3-D [B, S, H·D] input; without ``num_heads`` the head size is twice the cache width."""
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             helper.make_node("RotaryEmbedding", ["q", "position_ids", "cos_q", "sin_q"], ["qr"], name="rope_q",
                              domain="com.microsoft", **({"num_heads": H} if num_heads else {})),
             helper.make_node("MatMul", ["qr", "Wo"], ["y"], name="o_proj")]
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("position_ids", INT64, ["B", "S"])],
                 [("y", FLOAT, ["B", "S", D])], {"Wq": _f(rng, D, D), "Wo": _f(rng, D, D), **{
                     k: v for k, v in _caches(rng).items() if k.endswith("_q")}}, opset=21, extra_opsets=MS,
                 check=False)
    report = lint(path)
    space = report.space("q")
    assert space["basis"] == "complex-pairs" and space["blocks"] == H
    compile_exact(path, {"x": _f(rng, 2, 3, D), "position_ids": _positions(rng)})


@pytest.mark.parametrize("attrs,reason", [
    ({"rotary_embedding_dim": HD // 2, "num_heads": H}, "partial rotary embedding"),
    ({"scale": 0.5}, "rotary embedding with packed batching or a custom scale"),
])
def test_contrib_rotary_embedding_not_followed_clears(attrs, reason, rng, build, lint, compile_exact):
    caches = _caches(rng, HD // 2) if "rotary_embedding_dim" in attrs else _caches(rng)
    nodes, inits = _attention(rng, _contrib_rope_nodes(**attrs), caches)
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("position_ids", INT64, ["B", "S"])],
                 [("y", FLOAT, ["B", "S", D])], inits, opset=21, extra_opsets=MS, check=False)
    report = lint(path)
    assert report.basis("q") == "clear" and report.basis("k") == "clear"
    assert report.space("q")["limited_by"]["reason"] == reason
    compile_exact(path, {"x": _f(rng, 2, 3, D), "position_ids": _positions(rng)})


def _rotate_half_legacy(x, out, cos, sin, p):
    """rotate_half as the TorchScript exporter writes ModernBERT's: ``x.float()`` cast once per use (a Cast to
    the type x has) and the half width computed at run time from ``x.shape[-1] // 2``."""
    return [helper.make_node("Cast", [x], [f"{p}xf"], name=f"{p}cast", to=FLOAT),
            helper.make_node("Mul", [f"{p}xf", cos], [f"{p}x_cos"], name=f"{p}mul_cos"),
            helper.make_node("Cast", [f"{p}xf"], [f"{p}xf2"], name=f"{p}cast2", to=FLOAT),
            helper.make_node("Shape", [f"{p}xf2"], [f"{p}shape"], name=f"{p}shape"),
            helper.make_node("Gather", [f"{p}shape", "three"], [f"{p}width"], name=f"{p}width", axis=0),
            helper.make_node("Div", [f"{p}width", "two"], [f"{p}half0"], name=f"{p}half_div"),
            helper.make_node("Unsqueeze", [f"{p}half0", "zero"], [f"{p}half"], name=f"{p}half_unsqueeze"),
            helper.make_node("Slice", [f"{p}xf2", "zero", f"{p}half", "last"], [f"{p}x1"], name=f"{p}slice1"),
            helper.make_node("Slice", [f"{p}xf2", f"{p}half", "big", "last"], [f"{p}x2"], name=f"{p}slice2"),
            helper.make_node("Neg", [f"{p}x2"], [f"{p}neg_x2"], name=f"{p}neg"),
            helper.make_node("Concat", [f"{p}neg_x2", f"{p}x1"], [f"{p}rot"], name=f"{p}concat", axis=-1),
            helper.make_node("Mul", [f"{p}rot", sin], [f"{p}rot_sin"], name=f"{p}mul_sin"),
            helper.make_node("Add", [f"{p}x_cos", f"{p}rot_sin"], [out], name=f"{p}add")]


def test_decomposed_rotate_half_through_casts_and_runtime_bounds(rng, build, lint, compile_exact):
    rope, extra = _decomposed(rng, "computed")
    rope = [n for n in rope if not n.name.startswith(("q_", "k_"))]
    rope += _rotate_half_legacy("qh", "qr", "cos4", "sin4", "q_") + _rotate_half_legacy("kh", "kr", "cos4", "sin4", "k_")
    extra.update(three=np.array(3), two=np.array(2))
    nodes, inits = _attention(rng, rope, extra)
    path = build(nodes, [("x", FLOAT, ["B", "S", D]), ("position_ids", INT64, ["B", "S"])],
                 [("y", FLOAT, ["B", "S", D])], inits)
    report = lint(path)
    _assert_complex_pairs(path, report)
    compile_exact(path, {"x": _f(rng, 2, 3, D), "position_ids": _positions(rng)})
