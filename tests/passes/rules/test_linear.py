"""eecompile.passes.rules.linear: MatMul, Gemm and Conv fold ``W' = T_in⁻¹ · W · T_out``.

Each graph is linted (which basis each space gets) and compiled (the encrypted session equals
ONNX Runtime on the plaintext model, relative error ≤ 1e-5, on fresh random inputs).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from eecompile.keys import MasterKey

FLOAT = TensorProto.FLOAT


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _init(path, name):
    return next(numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.name == name)


def test_matmul_relu_matmul(rng, build, lint, compile_exact):
    path = build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                  helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("MatMul", ["r", "W2"], ["y"], name="mm2")],
                 [("x", FLOAT, ["B", "S", 8])], [("y", FLOAT, ["B", "S", 4])],
                 {"W1": _f(rng, 8, 6), "W2": _f(rng, 6, 4)})
    report = lint(path)
    assert report.basis("x") == "invertible"  # only a linear layer reads it
    hidden = report.space("h")
    assert hidden["basis"] == "monomial" and hidden["class"] == "positive-monomial"
    assert "r" in hidden["tensors"]
    assert hidden["limited_by"]["node"] == "relu"
    assert report.basis("y") == "invertible"  # nothing follows the last layer
    assert len({report.space(t)["name"] for t in ("x", "h", "y")}) == 3  # independent in and out bases
    result = compile_exact(path, {"x": _f(rng, 2, 3, 8)})
    for name in ("W1", "W2"):
        assert not np.allclose(_init(result.server_model, name), _init(path, name))


def test_gemm_trans_b_with_bias(rng, build, lint, compile_exact):
    path = build([helper.make_node("Gemm", ["x", "W1", "c1"], ["h"], name="gemm1", transB=1),
                  helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("Gemm", ["r", "W2", "c2"], ["y"], name="gemm2", alpha=0.5, beta=2.0)],
                 [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 5, 4), "c1": _f(rng, 5), "W2": _f(rng, 5, 3), "c2": _f(rng, 3)})
    report = lint(path)
    assert report.basis("x") == "invertible"
    assert report.space("h")["class"] == "positive-monomial"
    assert report.basis("y") == "invertible"
    result = compile_exact(path, {"x": _f(rng, 6, 4)})
    assert not np.allclose(_init(result.server_model, "c2"), _init(path, "c2"))  # b' = b · T_out


def test_gemm_trans_a_is_left_clear(rng, build, lint, compile_exact):
    path = build([helper.make_node("Gemm", ["x", "W"], ["y"], name="gemm", transA=1)],
                 [("x", FLOAT, [4, 2])], [("y", FLOAT, [2, 3])], {"W": _f(rng, 4, 3)})
    report = lint(path)
    assert report.protection("inputs", "x") == "clear" and report.protection("outputs", "y") == "clear"
    compile_exact(path, {"x": _f(rng, 4, 2)})


def test_conv_relu_conv(rng, build, lint, compile_exact):
    path = build([helper.make_node("Conv", ["x", "W1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["h"], ["r"], name="relu"),
                  helper.make_node("Conv", ["r", "W2", "b2"], ["y"], name="conv2", strides=[2, 2])],
                 [("x", FLOAT, ["B", 3, 6, 6])], [("y", FLOAT, ["B", 2, 2, 2])],
                 {"W1": _f(rng, 4, 3, 3, 3), "b1": _f(rng, 4), "W2": _f(rng, 2, 4, 3, 3), "b2": _f(rng, 2)})
    report = lint(path)
    assert report.basis("x") == "invertible"
    assert report.protection("inputs", "x") == "basis change on axis 1: invertible"  # channels, not pixels
    assert report.space("h")["class"] == "positive-monomial"
    assert report.basis("y") == "invertible"
    assert any("spatial layout" in w for w in report["weaknesses"])
    compile_exact(path, {"x": _f(rng, 2, 3, 6, 6)})


def test_depthwise_conv_shares_one_monomial_basis(rng, build, lint, compile_exact):
    """Depthwise: channel c in, channel c out; one permutation with scales on both sides, filters permuted."""
    path = build([helper.make_node("Conv", ["x", "W0", "b0"], ["h"], name="conv0"),
                  helper.make_node("Conv", ["h", "W1", "b1"], ["d"], name="depthwise", group=4, pads=[1, 1, 1, 1]),
                  helper.make_node("Conv", ["d", "W2"], ["y"], name="pointwise")],
                 [("x", FLOAT, ["B", 3, 5, 5])], [("y", FLOAT, ["B", 2, 5, 5])],
                 {"W0": _f(rng, 4, 3, 1, 1), "b0": _f(rng, 4), "W1": _f(rng, 4, 1, 3, 3), "b1": _f(rng, 4),
                  "W2": _f(rng, 2, 4, 1, 1)})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "monomial" and "d" in space["tensors"]
    assert space["limited_by"]["node"] == "depthwise"
    assert report.basis("x") == "invertible" and report.basis("y") == "invertible"
    # a fixed key: a random one leaves the 4 filters in place once in 24 (the scales cancel in a depthwise fold)
    result = compile_exact(path, {"x": _f(rng, 2, 3, 5, 5)}, key=MasterKey(bytes(range(32))))
    w, w0 = _init(result.server_model, "W1"), _init(path, "W1")
    assert not np.array_equal(w, w0)
    assert sorted(map(tuple, w.reshape(4, -1).round(5))) == sorted(map(tuple, w0.reshape(4, -1).round(5)))  # permuted


def test_grouped_conv_is_block_diagonal(rng, build, lint, compile_exact):
    """group=2 with 3 input and 2 output channels per group: one invertible block per group on each side."""
    path = build([helper.make_node("Conv", ["x", "W0"], ["h"], name="conv0"),
                  helper.make_node("Conv", ["h", "W1", "b1"], ["g"], name="grouped", group=2),
                  helper.make_node("Conv", ["g", "W2"], ["y"], name="conv2")],
                 [("x", FLOAT, ["B", 3, 4, 4])], [("y", FLOAT, ["B", 2, 2, 2])],
                 {"W0": _f(rng, 6, 3, 1, 1), "W1": _f(rng, 4, 3, 3, 3), "b1": _f(rng, 4), "W2": _f(rng, 2, 4, 1, 1)})
    report = lint(path)
    assert report.space("h")["basis"] == "block-invertible" and report.space("h")["blocks"] == 2
    assert report.space("g")["basis"] == "block-invertible" and report.space("g")["blocks"] == 2
    compile_exact(path, {"x": _f(rng, 2, 3, 4, 4)})


def test_depthwise_conv_with_a_channel_multiplier_clears_its_input(rng, build, lint, compile_exact):
    path = build([helper.make_node("Conv", ["x", "W0"], ["h"], name="conv0"),
                  helper.make_node("Conv", ["h", "W1"], ["g"], name="multiplier", group=2),
                  helper.make_node("Conv", ["g", "W2"], ["y"], name="conv2")],
                 [("x", FLOAT, ["B", 3, 4, 4])], [("y", FLOAT, ["B", 2, 4, 4])],
                 {"W0": _f(rng, 2, 3, 1, 1), "W1": _f(rng, 6, 1, 1, 1), "W2": _f(rng, 2, 6, 1, 1)})
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "multiplier"
    assert report.space("g")["basis"] == "block-invertible" and report.space("g")["blocks"] == 2
    compile_exact(path, {"x": _f(rng, 2, 3, 4, 4)})


def test_depthwise_conv_binds_a_graph_input_and_leaves_a_clear_one_clear(rng, build, lint, compile_exact):
    path = build([helper.make_node("Conv", ["x", "W1"], ["h"], name="depthwise", group=4),
                  helper.make_node("LpNormalization", ["x"], ["l"], name="lp", axis=1),
                  helper.make_node("Conv", ["l", "W1b"], ["hl"], name="depthwise_clear", group=4),
                  helper.make_node("Add", ["h", "hl"], ["s"], name="add"),
                  helper.make_node("Conv", ["h", "W2"], ["y"], name="pointwise")],
                 [("x", FLOAT, ["B", 4, 5, 5])], [("y", FLOAT, ["B", 2, 3, 3]), ("s", FLOAT, ["B", 4, 3, 3])],
                 {"W1": _f(rng, 4, 1, 3, 3), "W1b": _f(rng, 4, 1, 3, 3), "W2": _f(rng, 2, 4, 1, 1)})
    report = lint(path)
    assert report.protection("inputs", "x") == "clear"  # LpNormalization (no rule) reads it too
    assert report.protection("outputs", "s") == "clear"  # the Add ties h to the clear hl
    assert report.basis("y") == "invertible"
    compile_exact(path, {"x": _f(rng, 2, 4, 5, 5)})
    bound = build([helper.make_node("Conv", ["x", "W1"], ["h"], name="depthwise", group=4),
                   helper.make_node("Conv", ["h", "W2"], ["y"], name="pointwise")],
                  [("x", FLOAT, ["B", 4, 5, 5])], [("y", FLOAT, ["B", 2, 3, 3])],
                  {"W1": _f(rng, 4, 1, 3, 3), "W2": _f(rng, 2, 4, 1, 1)})
    assert lint(bound).protection("inputs", "x") == "basis change on axis 1: monomial"
    compile_exact(bound, {"x": _f(rng, 2, 4, 5, 5)})


def test_depthwise_conv_feeding_an_unsupported_op_stays_exact(rng, build, lint, compile_exact):
    """Input and output of a depthwise conv are one space: clearing the output clears the input too."""
    path = build([helper.make_node("Conv", ["x", "W0"], ["h"], name="conv0"),
                  helper.make_node("Conv", ["h", "W1"], ["d"], name="depthwise", group=4),
                  helper.make_node("LpNormalization", ["d"], ["y"], name="lp", axis=1)],
                 [("x", FLOAT, ["B", 3, 4, 4])], [("y", FLOAT, ["B", 4, 2, 2])],
                 {"W0": _f(rng, 4, 3, 1, 1), "W1": _f(rng, 4, 1, 3, 3)})
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "lp"
    compile_exact(path, {"x": _f(rng, 2, 3, 4, 4)})


def _mobilenet_block():
    import torch
    from torch import nn

    class Block(nn.Module):
        """An inverted residual (MobileNetV2): expand 1x1, depthwise 3x3 with TF-style padding, project 1x1."""

        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.expand = nn.Conv2d(8, 16, 1)
            self.bn = nn.BatchNorm2d(16)
            self.depthwise = nn.Conv2d(16, 16, 3, groups=16)
            self.project = nn.Conv2d(16, 8, 1)
            self.head = nn.Linear(8, 3)
            with torch.no_grad():
                self.bn.running_mean.normal_()
                self.bn.running_var.uniform_(0.5, 2.0)

        def forward(self, x):
            h = self.stem(x)
            e = torch.nn.functional.relu6(self.bn(self.expand(h)))
            e = torch.nn.functional.pad(e, (1, 1, 1, 1))
            h = h + self.project(torch.nn.functional.relu6(self.depthwise(e)))
            return self.head(h.mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Block()


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_mobilenet_block_export(exporter, rng, torch_export, lint, compile_exact):
    import torch

    path = torch_export(_mobilenet_block(), (torch.randn(2, 3, 8, 8),), exporter, ["x"], ["y"])
    report = lint(path)
    assert not report["unsupported_ops"]
    assert not [s for s in report["spaces"] if s["basis"] == "clear"]
    hidden = [s for s in report["spaces"] if s["size"] == 16]
    assert hidden and all(s["basis"] == "permutation" for s in hidden)  # relu6 (Clip) after the depthwise conv
    result = compile_exact(path, {"x": _f(rng, 2, 3, 8, 8)})
    assert result.report["exposure"]["intermediates_exposed"] == 0


def test_protected_axis_as_the_row_axis_of_a_weight(rng, build, lint, compile_exact):
    """``(hᵀ · W)ᵀ`` mixes the sequence axis only: the feature basis passes through."""
    path = build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                  helper.make_node("Transpose", ["h"], ["ht"], name="t1", perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["ht", "Ws"], ["m"], name="mix_tokens"),
                  helper.make_node("Transpose", ["m"], ["mt"], name="t2", perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["mt", "W2"], ["y"], name="mm2")],
                 [("x", FLOAT, ["B", 5, 4])], [("y", FLOAT, ["B", 3, 2])],
                 {"W1": _f(rng, 4, 6), "Ws": _f(rng, 5, 3), "W2": _f(rng, 6, 2)})
    report = lint(path)
    hidden = report.space("h")
    assert hidden["basis"] == "invertible"
    assert {"ht", "m", "mt"} <= set(hidden["tensors"])
    result = compile_exact(path, {"x": _f(rng, 2, 5, 4)})
    np.testing.assert_array_equal(_init(result.server_model, "Ws"), _init(path, "Ws"))  # nothing to fold


def test_constant_left_operand(rng, build, lint, compile_exact):
    path = build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                  helper.make_node("MatMul", ["Wl", "h"], ["m"], name="left"),
                  helper.make_node("MatMul", ["m", "W2"], ["y"], name="mm2")],
                 [("x", FLOAT, [5, 4])], [("y", FLOAT, [3, 2])],
                 {"W1": _f(rng, 4, 6), "Wl": _f(rng, 3, 5), "W2": _f(rng, 6, 2)})
    report = lint(path)
    assert report.basis("h") == "invertible" and "m" in report.space("h")["tensors"]
    compile_exact(path, {"x": _f(rng, 5, 4)})


def test_batched_constant_weight_takes_the_dual_basis(rng, build, lint, compile_exact):
    """A 3-D constant right operand contracts the protected axis like a weight: the dual basis folds into
    its rows for every batch index; its products (no linear layer behind them) stay clear."""
    path = build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                  helper.make_node("MatMul", ["h", "W3"], ["y"], name="batched")],
                 [("x", FLOAT, [2, 5, 4])], [("y", FLOAT, [2, 5, 3])],
                 {"W1": _f(rng, 4, 6), "W3": _f(rng, 2, 6, 3)})
    report = lint(path)
    assert report.basis("x") == "invertible" and report.basis("h") == "invertible"
    result = compile_exact(path, {"x": _f(rng, 2, 5, 4)})
    assert not np.allclose(_init(result.server_model, "W3"), _init(path, "W3"))


H, D_HEAD, R = 4, 8, 6


def _relative_keys(build, rng, repeats_tail=(1, 1), share_tile: bool = False, key_width: int = D_HEAD):
    """DeBERTa's c2p scores: queries split into heads and merged with the batch (``[B·H, S, d]``) times
    ``Transpose(Tile(C, [B, 1, 1]))`` of constant relative-position keys ``C [H, R, d]``."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             helper.make_node("Reshape", ["q", "heads"], ["q4"], name="split"),
             helper.make_node("Transpose", ["q4"], ["qt"], name="to_bhsd", perm=[0, 2, 1, 3]),
             helper.make_node("Reshape", ["qt", "merged"], ["q3"], name="merge"),
             helper.make_node("Shape", ["x"], ["xs"], name="shape"),
             helper.make_node("Slice", ["xs", "zero", "one"], ["batch"], name="batch"),
             helper.make_node("Concat", ["batch", "tail"], ["reps"], name="repeats", axis=0),
             helper.make_node("Tile", ["C", "reps"], ["keys"], name="tile"),
             helper.make_node("Transpose", ["keys"], ["keys_t"], name="keys_t", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q3", "keys_t"], ["c2p"], name="c2p")]
    outputs = [("c2p", FLOAT, ["BH", 5, R])]
    if share_tile:
        nodes.append(helper.make_node("ReduceSum", ["keys"], ["keys_sum"], name="keys_sum", keepdims=0))
        outputs.append(("keys_sum", FLOAT, []))
    inits = {"Wq": _f(rng, 6, H * D_HEAD), "C": _f(rng, H, R, key_width), "heads": i64(0, 0, H, D_HEAD),
             "merged": i64(-1, 5, D_HEAD), "zero": i64(0), "one": i64(1), "tail": i64(*repeats_tail)}
    return build(nodes, [("x", FLOAT, ["B", 5, 6])], outputs, inits)


def test_tiled_constant_keys_take_the_queries_dual_bases_head_by_head(rng, build, lint, compile_exact):
    path = _relative_keys(build, rng)
    report = lint(path)
    queries = report.space("q")
    assert queries["class"] == "invertible" and queries["blocks"] == H and "q3" in queries["tensors"]
    result = compile_exact(path, [{"x": _f(rng, b, 5, 6)} for b in (1, 3)])
    assert not np.allclose(_init(result.server_model, "C"), _init(path, "C"))


def test_constant_keys_read_elsewhere_clear_the_queries(rng, build, lint, compile_exact):
    """Folding into the constant would change what the other reader of the tiled keys sees."""
    path = _relative_keys(build, rng, share_tile=True)
    space = lint(path).space("q")
    assert space["basis"] == "clear" and space["limited_by"]["node"] == "c2p"
    compile_exact(path, {"x": _f(rng, 2, 5, 6)})


def test_keys_tiled_along_the_contracted_axis_clear_the_queries(rng, build, lint, compile_exact):
    """``Tile`` along ``d`` repeats the constant's features: one basis cannot fold into both copies."""
    path = _relative_keys(build, rng, repeats_tail=(1, 2), key_width=D_HEAD // 2)
    assert lint(path).basis("q") == "clear"
    compile_exact(path, {"x": _f(rng, 2, 5, 6)})


def test_per_head_constant_right_operand(rng, build, lint, compile_exact):
    """``[B, H, S, d] · C[H, d, n]``: head ``h`` of the constant takes head ``h``'s dual basis."""
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    path = build([helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
                  helper.make_node("Reshape", ["q", "heads"], ["q4"], name="split"),
                  helper.make_node("Transpose", ["q4"], ["qt"], name="to_bhsd", perm=[0, 2, 1, 3]),
                  helper.make_node("MatMul", ["qt", "C"], ["y"], name="per_head")],
                 [("x", FLOAT, ["B", 5, 6])], [("y", FLOAT, ["B", H, 5, 3])],
                 {"Wq": _f(rng, 6, H * D_HEAD), "C": _f(rng, H, D_HEAD, 3), "heads": i64(0, 0, H, D_HEAD)})
    assert lint(path).space("q")["class"] == "invertible"
    compile_exact(path, {"x": _f(rng, 2, 5, 6)})


def test_gram_matrix_forces_an_orthogonal_basis(rng, build, lint, compile_exact):
    """``h · hᵀ`` contracts a space with itself: ``T = T^{-T}``, so only orthogonal bases keep it exact."""
    path = build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                  helper.make_node("Transpose", ["h"], ["ht"], name="t", perm=[0, 2, 1]),
                  helper.make_node("MatMul", ["h", "ht"], ["gram"], name="gram")],
                 [("x", FLOAT, ["B", 3, 4])], [("gram", FLOAT, ["B", 3, 3])], {"W1": _f(rng, 4, 6)})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "orthogonal" and space["limited_by"]["node"] == "gram"
    assert report.protection("outputs", "gram") == "clear"  # the scores of a product of activations
    result = compile_exact(path, {"x": _f(rng, 2, 3, 4)})
    assert not np.allclose(_init(result.server_model, "W1"), _init(path, "W1"))


def _resnext_block(build, rng, out_of_grouped: bool = False):
    """Conv 1x1 -> Relu -> grouped Conv 3x3 (4 groups of 2) -> Relu -> Conv 1x1, as ResNeXt has it."""
    outputs = [("y", FLOAT, ["B", 3, 4, 4])] + ([("r2", FLOAT, ["B", 8, 4, 4])] if out_of_grouped else [])
    return build([helper.make_node("Conv", ["x", "W0", "b0"], ["h"], name="reduce"),
                  helper.make_node("Relu", ["h"], ["r"], name="relu1"),
                  helper.make_node("Conv", ["r", "W1", "b1"], ["g"], name="grouped", group=4, pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["g"], ["r2"], name="relu2"),
                  helper.make_node("Conv", ["r2", "W2"], ["y"], name="expand")],
                 [("x", FLOAT, ["B", 3, 4, 4])], outputs,
                 {"W0": _f(rng, 8, 3, 1, 1), "b0": _f(rng, 8), "W1": _f(rng, 8, 2, 3, 3), "b1": _f(rng, 8),
                  "W2": _f(rng, 3, 8, 1, 1)})


def test_grouped_conv_groups_are_permuted_as_whole_blocks(rng, build, lint, compile_exact):
    """Where only Convs, activations and pooling touch the groups, the plan moves whole groups: input and
    output blocks by one permutation, the filters of group π(j) becoming group j."""
    from eecompile.passes.analyze import analyze
    from eecompile.passes.graph import ModelGraph, infer_shapes, load_model
    from eecompile.passes.normalize import normalize
    from eecompile.passes.plan import plan

    path = _resnext_block(build, rng)
    report = lint(path)
    for tensor in ("r", "r2"):
        space = report.space(tensor)
        assert space["blocks"] == 4 and space["groups_permuted"] == "grouped", space
    mg = ModelGraph(load_model(path), path.parent)
    normalize(mg)
    analysis = analyze(ModelGraph(infer_shapes(mg.export())))
    moved = 0
    for i in range(6):
        key = MasterKey(bytes([i]) * 32)
        orders = plan(analysis, key).block_orders
        assert len(orders) == 2 and np.array_equal(orders[0][1], orders[1][1])  # input and output move alike
        moved += not np.array_equal(orders[0][1], np.arange(4))
        compile_exact(path, [{"x": _f(rng, 2, 3, 4, 4)}, {"x": _f(rng, 1, 3, 4, 4)}], key=key)
    assert moved >= 4  # identity once in 24 keys: these keys exercise moved groups


def test_grouped_conv_groups_stay_in_place_where_the_client_sees_them(rng, build, lint, compile_exact):
    """A graph output carries the grouped Conv's blocks: the client moves no blocks, so the groups stay."""
    path = _resnext_block(build, rng, out_of_grouped=True)
    space = lint(path).space("r2")
    assert space["blocks"] == 4 and space["groups_permuted"] is None
    compile_exact(path, {"x": _f(rng, 2, 3, 4, 4)})


def _resnext_module():
    import torch
    from torch import nn

    class Block(nn.Module):
        """ResNeXt's bottleneck without BatchNorm (folded into the convs at export): reduce, grouped 3x3,
        expand, the residual sum, a pooled head."""

        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.reduce = nn.Conv2d(8, 8, 1)
            self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=4)
            self.expand = nn.Conv2d(8, 8, 1)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            h = self.stem(x)
            g = torch.relu(self.grouped(torch.relu(self.reduce(h))))
            h = torch.relu(h + self.expand(g))
            return self.head(h.mean(dim=(2, 3)))

    torch.manual_seed(0)
    return Block()


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
def test_resnext_block_export_permutes_its_groups(exporter, rng, torch_export, lint, compile_exact):
    import torch

    path = torch_export(_resnext_module(), (torch.randn(2, 3, 6, 6),), exporter, ["x"], ["y"])
    report = lint(path)
    assert not report["unsupported_ops"] and not [s for s in report["spaces"] if s["basis"] == "clear"]
    grouped = [s for s in report["spaces"] if s["blocks"] == 4]
    assert len(grouped) == 2 and all(s["groups_permuted"] for s in grouped), grouped
    for i in range(3):
        result = compile_exact(path, {"x": _f(rng, 2, 3, 6, 6)}, key=MasterKey(bytes([40 + i]) * 32))
        assert result.report["exposure"]["intermediates_exposed"] == 0
