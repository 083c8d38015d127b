"""eecompile.passes.rules.shape on graphs as exporters write them: head splits whose target shape
is computed at run time, batch×heads merges (``[B,H,S,D] <-> [B·H,S,D]``), fused QKV split inside
the heads, and token ids reshaped before the embedding lookup. Each keeps per-head bases (or the
vocabulary permutation) and compiles exactly."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
H, HD = 2, 4
D = H * HD


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _shape_of(tensor: str, start: int, end: int, out: str) -> helper.NodeProto:
    return helper.make_node("Shape", [tensor], [out], name=f"shape_{out}", start=start, end=end)


def _computed_heads(t: str) -> list:
    """``t.view(B, S, -1, HD)`` with B and S read from ``x`` at run time (Shape → Concat)."""
    return [_shape_of("x", 0, 2, f"{t}_bs"),
            helper.make_node("Concat", [f"{t}_bs", "minus_one", "head_dim"], [f"{t}_target"], name=f"{t}_cat", axis=0),
            helper.make_node("Reshape", [t, f"{t}_target"], [f"{t}4"], name=f"{t}_heads"),
            helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], name=f"{t}_transpose", perm=[0, 2, 1, 3])]


def _attention_tail(q: str, k: str, v: str) -> list:
    """SDPA as dynamo decomposes it below opset 23: K merged to [B·H, S, HD], transposed, split back."""
    return [_shape_of(k, 2, 4, "seq_dim"),
            helper.make_node("Concat", ["minus_one", "seq_dim"], ["kbh_target"], name="kbh_cat", axis=0),
            helper.make_node("Reshape", [k, "kbh_target"], ["kbh"], name="k_merge_heads"),
            helper.make_node("Transpose", ["kbh"], ["kbh_t"], name="k_t", perm=[0, 2, 1]),
            _shape_of(k, 0, 2, "bh_dims"),
            helper.make_node("Concat", ["bh_dims", "head_dim", "minus_one"], ["kt_target"], name="kt_cat", axis=0),
            helper.make_node("Reshape", ["kbh_t", "kt_target"], ["kt"], name="k_split_heads"),
            helper.make_node("Mul", [q, "scale"], ["qs"], name="q_scale"),
            helper.make_node("MatMul", ["qs", "kt"], ["scores"], name="qk"),
            helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
            helper.make_node("MatMul", ["probs", v], ["ctx"], name="pv"),
            helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_transpose", perm=[0, 2, 1, 3]),
            _shape_of("x", 0, 2, "merge_bs"),
            helper.make_node("Concat", ["merge_bs", "minus_one"], ["merge_target"], name="merge_cat", axis=0),
            helper.make_node("Reshape", ["ctx_t", "merge_target"], ["merged"], name="merge"),
            helper.make_node("MatMul", ["merged", "Wo"], ["y"], name="o_proj")]


def _consts(rng) -> dict:
    return {"minus_one": np.array([-1]), "head_dim": np.array([HD]), "scale": np.array(0.5, np.float32),
            "Wo": _f(rng, D, D)}


def test_computed_head_split_and_batch_head_merge_keep_per_head_bases(rng, build, lint, compile_exact):
    nodes = [helper.make_node("MatMul", ["x", f"W{t}"], [t], name=f"{t}_proj") for t in "qkv"]
    for t in "qkv":
        nodes += _computed_heads(t)
    nodes += _attention_tail("qh", "kh", "vh")
    inits = {**_consts(rng), **{f"W{t}": _f(rng, D, D) for t in "qkv"}}
    path = build(nodes, [("x", FLOAT, ["B", "S", D])], [("y", FLOAT, ["B", "S", D])], inits)
    report = lint(path)
    for t in "qkv":
        space = report.space(t)
        assert space["basis"] == "block-invertible" and space["blocks"] == H, (t, space)
    assert {"kbh", "kbh_t", "kt"} <= set(report.space("k")["tensors"])  # followed through the merge
    compile_exact(path, [{"x": _f(rng, 2, 3, D)}, {"x": _f(rng, 1, 5, D)}])


def test_fused_qkv_split_inside_heads(rng, build, lint, compile_exact):
    """GPT-NeoX style: ``qkv.view(B, S, H, 3·HD)`` then a split of the last axis into q, k, v."""
    nodes = [helper.make_node("MatMul", ["x", "Wqkv"], ["qkv"], name="qkv_proj"),
             helper.make_node("Reshape", ["qkv", "fused_shape"], ["qkv4"], name="qkv_heads"),
             helper.make_node("Split", ["qkv4", "sizes"], ["q4", "k4", "v4"], name="qkv_split", axis=-1)]
    for t in "qkv":
        nodes.append(helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], name=f"{t}_transpose", perm=[0, 2, 1, 3]))
    nodes += _attention_tail("qh", "kh", "vh")
    inits = {**_consts(rng), "Wqkv": _f(rng, D, 3 * D), "fused_shape": np.array([0, 0, H, 3 * HD]),
             "sizes": np.array([HD, HD, HD])}
    path = build(nodes, [("x", FLOAT, ["B", "S", D])], [("y", FLOAT, ["B", "S", D])], inits)
    report = lint(path)
    space = report.space("qkv")
    assert space["basis"] != "clear" and space["blocks"] == 3 * H, space
    assert report.space("v4")["name"] == space["name"]
    compile_exact(path, {"x": _f(rng, 2, 3, D)})


def test_slice_inside_heads_with_computed_bounds(rng, build, lint, compile_exact):
    """Phi-3 style partial-rotary slicing: ``q[..., :rot]`` with ``rot`` read from a shape is the whole head."""
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"), *_computed_heads("q"),
             _shape_of("qh", 3, 4, "rot"),
             helper.make_node("Slice", ["qh", "zero", "rot", "last"], ["q_rot"], name="q_rot_slice"),
             helper.make_node("Slice", ["qh", "rot", "big", "last"], ["q_pass"], name="q_pass_slice"),
             helper.make_node("Relu", ["q_rot"], ["q_act"], name="act"),
             helper.make_node("Concat", ["q_act", "q_pass"], ["q_back"], name="q_concat", axis=-1),
             helper.make_node("Transpose", ["q_back"], ["q_t"], name="q_t", perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["q_t", "merge_shape"], ["merged"], name="merge"),
             helper.make_node("MatMul", ["merged", "Wo"], ["y"], name="o_proj")]
    inits = {**_consts(rng), "Wq": _f(rng, D, D), "zero": np.array([0]), "big": np.array([1 << 30]),
             "last": np.array([-1]), "merge_shape": np.array([0, 0, D])}
    path = build(nodes, [("x", FLOAT, ["B", "S", D])], [("y", FLOAT, ["B", "S", D])], inits)
    report = lint(path)
    space = report.space("q")
    assert space["basis"] == "monomial" and {"q_rot", "q_act", "q_back"} <= set(space["tensors"]), space
    compile_exact(path, {"x": _f(rng, 2, 3, D)})


def test_token_ids_reshaped_before_the_embedding_stay_permuted(rng, build, lint, compile_exact):
    """GPT-2 style ``input_ids.view(-1, S)``: the ids keep the vocabulary permutation and the logits tie to it."""
    vocab = 11
    nodes = [_shape_of("input_ids", 1, 2, "seq"),
             helper.make_node("Concat", ["minus_one", "seq"], ["ids_target"], name="ids_cat", axis=0),
             helper.make_node("Reshape", ["input_ids", "ids_target"], ["ids2"], name="ids_view"),
             helper.make_node("Gather", ["E", "ids2"], ["h"], name="embed"),
             helper.make_node("MatMul", ["h", "W"], ["logits"], name="lm_head")]
    path = build(nodes, [("input_ids", INT64, ["B", "S"])], [("logits", FLOAT, ["B", "S", vocab])],
                 {"minus_one": np.array([-1]), "E": _f(rng, vocab, D), "W": _f(rng, D, vocab)})
    report = lint(path)
    assert report.protection("inputs", "input_ids").startswith("permuted index values")
    assert report.space("input_ids")["name"] == report.space("logits")["name"]  # vocabulary tie
    compile_exact(path, {"input_ids": rng.integers(0, vocab, (2, 4)).astype(np.int64)})


def test_position_ids_stay_clear_even_through_a_reshape(rng, build, lint, compile_exact):
    """Positions are public, and a generating server computes them itself: a learned position table read
    through ``position_ids.view(-1, S)`` must not turn the positions into permuted index values."""
    vocab, positions = 11, 16
    nodes = [_shape_of("input_ids", 1, 2, "seq"),
             helper.make_node("Concat", ["minus_one", "seq"], ["target"], name="cat", axis=0),
             helper.make_node("Reshape", ["input_ids", "target"], ["ids2"], name="ids_view"),
             helper.make_node("Reshape", ["position_ids", "target"], ["pos2"], name="pos_view"),
             helper.make_node("Gather", ["E", "ids2"], ["tok"], name="wte"),
             helper.make_node("Gather", ["P", "pos2"], ["pos"], name="wpe"),
             helper.make_node("Add", ["tok", "pos"], ["h"], name="add"),
             helper.make_node("MatMul", ["h", "W"], ["logits"], name="lm_head")]
    path = build(nodes, [("input_ids", INT64, ["B", "S"]), ("position_ids", INT64, ["B", "S"])],
                 [("logits", FLOAT, ["B", "S", vocab])],
                 {"minus_one": np.array([-1]), "E": _f(rng, vocab, D), "P": _f(rng, positions, D), "W": _f(rng, D, vocab)})
    report = lint(path)
    assert report.protection("inputs", "position_ids") == "clear"
    assert report.protection("inputs", "input_ids").startswith("permuted index values")
    compile_exact(path, {"input_ids": rng.integers(0, vocab, (2, 4)).astype(np.int64),
                         "position_ids": np.broadcast_to(np.arange(4), (2, 4)).astype(np.int64).copy()})
