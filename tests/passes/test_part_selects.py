"""eecompile.passes.part_selects: a fused QKV reshaped into (parts, heads, width) at once and then selected
along the parts (Slice + Squeeze as dynamo writes ``unbind``, Split as the TorchScript exporter writes it,
a scalar Gather) has each part selected first, so every part's heads are followed and protected; the
rewrite keeps the function (ONNX Runtime before and after, and the compiled model against the original)."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from eecompile.passes.graph import ModelGraph, infer_shapes, load_model
from eecompile.passes.normalize import normalize

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
H, HD = 2, 4
D = H * HD


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _select(style: str) -> tuple[list, dict]:
    """Nodes taking ``parts`` [B, S, 3, H, HD] to q4/k4/v4 [B, S, H, HD]."""
    inits = {"axis2": np.array([2])}
    nodes = []
    if style == "slice":
        for i, t in enumerate("qkv"):
            inits[f"{t}_lo"], inits[f"{t}_hi"] = np.array([i]), np.array([i + 1])
            nodes += [helper.make_node("Slice", ["parts", f"{t}_lo", f"{t}_hi", "axis2"], [f"{t}5"], name=f"{t}_slice"),
                      helper.make_node("Squeeze", [f"{t}5", "axis2"], [f"{t}4"], name=f"{t}_squeeze")]
    elif style == "split":
        inits["ones"] = np.array([1, 1, 1])
        nodes.append(helper.make_node("Split", ["parts", "ones"], ["q5", "k5", "v5"], name="split", axis=-3))
        nodes += [helper.make_node("Squeeze", [f"{t}5", "axis2"], [f"{t}4"], name=f"{t}_squeeze") for t in "qkv"]
    else:
        for i, t in enumerate("qkv"):
            inits[f"{t}_index"] = np.array(i - 3 if t == "v" else i)  # a negative index counts from the end
            nodes.append(helper.make_node("Gather", ["parts", f"{t}_index"], [f"{t}4"], name=f"{t}_gather", axis=2))
    return nodes, inits


def _transposed_split() -> tuple[list, dict]:
    """``qkv.transpose(3, 1).unbind(2)`` as optimum exports ModernBERT: [B, S, 3, H, HD] -> [B, H, 3, S, HD], Split
    along the parts, Squeeze; a Transpose back to [B, S, H, HD] so the rest of the graph is shared."""
    nodes = [helper.make_node("Transpose", ["parts"], ["parts_t"], name="parts_transpose", perm=[0, 3, 2, 1, 4]),
             helper.make_node("Split", ["parts_t", "ones"], ["q5", "k5", "v5"], name="split", axis=2)]
    for t in "qkv":
        nodes += [helper.make_node("Squeeze", [f"{t}5", "axis2"], [f"{t}_bhsd"], name=f"{t}_squeeze"),
                  helper.make_node("Transpose", [f"{t}_bhsd"], [f"{t}4"], name=f"{t}_back", perm=[0, 2, 1, 3])]
    return nodes, {"ones": np.array([1, 1, 1]), "axis2": np.array([2])}


def _fused_attention(rng, style: str, dynamic_target: bool):
    """x @ Wqkv reshaped to [B, S, 3, H, HD] (target constant, or built from Shape(x) as dynamo does), parts
    selected by ``style``, then softmax(q·kᵀ)·v per head and the output projection."""
    nodes = [helper.make_node("MatMul", ["x", "Wqkv"], ["qkv"], name="qkv_proj")]
    inits = {"Wqkv": _f(rng, D, 3 * D), "Wo": _f(rng, D, D), "merge_shape": np.array([0, 0, D])}
    if dynamic_target:
        nodes += [helper.make_node("Shape", ["qkv"], ["qkv_shape"], name="qkv_shape", start=0, end=2),
                  helper.make_node("Concat", ["qkv_shape", "tail"], ["target"], name="target", axis=0)]
        inits["tail"] = np.array([3, H, HD])
    else:
        inits["target"] = np.array([0, 0, 3, H, HD])
    nodes.append(helper.make_node("Reshape", ["qkv", "target"], ["parts"], name="split_parts"))
    selects, more = _transposed_split() if style == "transposed" else _select(style)
    nodes += selects
    inits.update(more)
    nodes += [helper.make_node("Transpose", [f"{t}4"], [f"{t}h"], name=f"{t}_transpose", perm=[0, 2, 1, 3])
              for t in "qkv"]
    nodes += [helper.make_node("Transpose", ["kh"], ["kt"], name="k_t", perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["qh", "kt"], ["scores"], name="qk"),
              helper.make_node("Softmax", ["scores"], ["probs"], name="softmax", axis=-1),
              helper.make_node("MatMul", ["probs", "vh"], ["ctx"], name="pv"),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="ctx_transpose", perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"], name="merge"),
              helper.make_node("MatMul", ["merged", "Wo"], ["y"], name="o_proj")]
    return nodes, inits


@pytest.mark.parametrize("style,dynamic_target", [("slice", True), ("slice", False), ("split", False),
                                                   ("split", True), ("gather", False),
                                                   ("transposed", False)])
def test_fused_qkv_parts_are_selected_first_and_protected(style, dynamic_target, rng, build, lint,
                                                          compile_exact):
    nodes, inits = _fused_attention(rng, style, dynamic_target)
    path = build(nodes, [("x", FLOAT, ["B", "S", D])], [("y", FLOAT, ["B", "S", D])], inits)
    mg = ModelGraph(infer_shapes(load_model(path)))
    result = normalize(mg)
    assert result.parts_selected == ["split_parts"]
    assert "split_parts" not in [n.name for n in mg.nodes]
    report = lint(path)
    space = report.space("qkv")
    assert space["basis"] == "block-invertible" and space["blocks"] == 3 * H  # three parts, H heads each
    assert any("part selected" in p for p in report["policies"])
    compile_exact(path, [{"x": _f(rng, 2, 3, D)}, {"x": _f(rng, 1, 5, D)}])


def test_selection_not_along_the_parts_is_left_alone(rng, build, lint, compile_exact):
    """A Slice of the head axis (not the parts): no rewrite, the reshape is handled (or cleared) as before."""
    nodes = [helper.make_node("MatMul", ["x", "Wqkv"], ["qkv"], name="qkv_proj"),
             helper.make_node("Reshape", ["qkv", "target"], ["parts"], name="split_parts"),
             helper.make_node("Slice", ["parts", "lo", "hi", "axis3"], ["first_head"], name="head_slice")]
    inits = {"Wqkv": _f(rng, D, 3 * D), "target": np.array([0, 0, 3, H, HD]), "lo": np.array([0]),
             "hi": np.array([1]), "axis3": np.array([3])}
    path = build(nodes, [("x", FLOAT, ["B", "S", D])], [("first_head", FLOAT, ["B", "S", 3, 1, HD])], inits)
    mg = ModelGraph(infer_shapes(load_model(path)))
    assert normalize(mg).parts_selected == []
    assert "split_parts" in [n.name for n in mg.nodes]
    compile_exact(path, {"x": _f(rng, 2, 3, D)})


def test_one_size_inference_left_unknown_is_solved_from_the_element_count(rng, build):
    """ONNX inference (the fallback for opset-23 graphs) can leave one size of the target unknown
    (``[B, S, 3, unk, HD]``): the leading axes are equal, so the element count fixes it."""
    nodes, inits = _fused_attention(rng, "slice", dynamic_target=True)
    path = build(nodes, [("x", FLOAT, ["B", "S", D])], [("y", FLOAT, ["B", "S", D])], inits)
    mg = ModelGraph(infer_shapes(load_model(path)))
    mg.tensors["parts"].shape = ["B", "S", 3, "unk__7", HD]
    assert normalize(mg).parts_selected == ["split_parts"]
    mg = ModelGraph(infer_shapes(load_model(path)))
    mg.tensors["parts"].shape = ["B", "S", "unk__7", "unk__8", HD]  # two unknowns: not determined
    assert normalize(mg).parts_selected == []
