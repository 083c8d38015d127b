"""eecompile.passes.rules.gather_index: GatherND and GatherElements with run-time indices.

Gathering positions (tokens, pixels) keeps the feature basis; gathering along the feature axis,
or with indices that vary along it, clears it.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
D = 6


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def test_gather_nd_pooling_keeps_the_feature_basis(rng, build, lint, compile_exact):
    """``h[b, pos[b]]`` (CLIP-text pooling) as (batch, position) pairs."""
    batch_dims, depth = 0, 2
    path = build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                  helper.make_node("GatherND", ["h", "idx"], ["p"], name="pool", batch_dims=batch_dims),
                  helper.make_node("MatMul", ["p", "W2"], ["y"], name="mm2")],
                 [("x", FLOAT, [2, 5, 4]), ("idx", INT64, [2, depth])], [("y", FLOAT, [2, 3])],
                 {"W1": _f(rng, 4, D), "W2": _f(rng, D, 3)})
    report = lint(path)
    space = report.space("h")
    assert not report["unsupported_ops"]
    assert space["basis"] == "invertible" and "p" in space["tensors"]
    idx = np.array([[0, 3], [1, 1]], np.int64)
    compile_exact(path, {"x": _f(rng, 2, 5, 4), "idx": idx})


def test_gather_nd_with_batch_dims_and_a_wrong_inferred_rank_clears(rng, build, lint, compile_exact):
    """ONNX Runtime's symbolic shape inference ignores batch_dims (writes p as [2, 5, 6], not [2, 6]):
    the rule sees the disagreement and clears instead of trusting either rank."""
    path = build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                  helper.make_node("GatherND", ["h", "idx"], ["p"], name="pool", batch_dims=1),
                  helper.make_node("ReduceSum", ["p"], ["y"], name="sum", keepdims=0)],
                 [("x", FLOAT, [2, 5, 4]), ("idx", INT64, [2, 1])], [("y", FLOAT, [])], {"W1": _f(rng, 4, D)})
    space = lint(path).space("h")
    assert space["basis"] == "clear" and "batch_dims wrong" in space["limited_by"]["reason"]
    compile_exact(path, {"x": _f(rng, 2, 5, 4), "idx": np.array([[3], [1]], np.int64)})


def test_gather_nd_along_the_feature_axis_clears(rng, build, lint, compile_exact):
    path = build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                  helper.make_node("GatherND", ["h", "idx"], ["p"], name="pick")],
                 [("x", FLOAT, [2, 4]), ("idx", INT64, [3, 2])], [("p", FLOAT, [3])], {"W1": _f(rng, 4, D)})
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "pick"
    compile_exact(path, {"x": _f(rng, 2, 4), "idx": np.array([[0, 1], [1, 5], [0, 0]], np.int64)})


def _gather_elements(build, rng, index_nodes: list, index_inputs: list, axis: int = 1):
    return build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"), *index_nodes,
                  helper.make_node("GatherElements", ["h", "idx"], ["g"], name="gather", axis=axis),
                  helper.make_node("MatMul", ["g", "W2"], ["y"], name="mm2")],
                 [("x", FLOAT, [2, 5, 4]), *index_inputs], [("y", FLOAT, [2, 3, 3])],
                 {"W1": _f(rng, 4, D), "W2": _f(rng, D, 3), "shape": np.array([2, 3, D], np.int64)})


def test_gather_elements_with_indices_broadcast_over_features(rng, build, lint, compile_exact):
    """``torch.gather(h, 1, pos[..., None].expand(-1, -1, D))``: one position per token, all features."""
    path = _gather_elements(build, rng, [helper.make_node("Expand", ["pos", "shape"], ["idx"], name="expand")],
                            [("pos", INT64, [2, 3, 1])])
    report = lint(path)
    assert report.basis("h") == "invertible" and "g" in report.space("h")["tensors"]
    compile_exact(path, {"x": _f(rng, 2, 5, 4), "pos": np.array([[[4], [0], [2]], [[1], [1], [3]]], np.int64)})


def test_gather_elements_with_indices_that_vary_along_features_clears(rng, build, lint, compile_exact):
    path = _gather_elements(build, rng, [helper.make_node("Identity", ["pos"], ["idx"], name="ident")],
                            [("pos", INT64, [2, 3, D])])
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "gather"
    compile_exact(path, {"x": _f(rng, 2, 5, 4), "pos": rng.integers(0, 5, (2, 3, D)).astype(np.int64)})


def _clip_pooler():
    import torch
    from torch import nn

    class Pooler(nn.Module):
        """CLIP text pooling: the hidden state at the first eos token, found by comparing ids."""

        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.norm = nn.LayerNorm(8)
            self.proj = nn.Linear(8, 4, bias=False)

        def forward(self, input_ids):
            h = self.norm(self.embed(input_ids))
            eos = (input_ids == 49).int().argmax(dim=-1)
            pooled = h[torch.arange(h.shape[0]), eos]
            return self.proj(pooled)

    torch.manual_seed(0)
    return Pooler()


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_clip_style_pooling_export(exporter, rng, torch_export, lint, compile_exact):
    import torch

    ids = torch.tensor([[3, 7, 49, 0, 0], [5, 6, 8, 9, 49]])
    path = torch_export(_clip_pooler(), (ids,), exporter, ["input_ids"], ["y"])
    report = lint(path)
    assert not report["unsupported_ops"]
    assert report.protection("inputs", "input_ids") == "permuted index values (50 classes)"
    assert report.protection("outputs", "y") != "clear"
    pooled = [s for s in report["spaces"] if s["size"] == 8 and s["basis"] != "clear"]
    assert pooled, "the pooled hidden state keeps the embedding's basis"
    feeds = []
    for _ in range(3):
        fresh = rng.integers(0, 49, (2, 5)).astype(np.int64)
        fresh[0, rng.integers(0, 5)] = 49
        feeds.append({"input_ids": fresh})
    result = compile_exact(path, feeds)
    assert result.report["exposure"]["intermediates_exposed"] == 0
