"""eecompile.passes.rules.group_norms: InstanceNormalization and the GroupNorm export pattern.

GroupNorm (``Reshape [B,C,H,W] -> [B,G,·]``, InstanceNormalization, Reshape back, per-channel
``Mul``/``Add``) keeps a ones-preserving orthogonal basis inside each group of ``C/G`` channels;
the per-channel gain reduces each block to a permutation. One channel per group, and a plain
InstanceNormalization, allow signed permutations, with scale and bias folded.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

EXPORTERS = ("dynamo", "legacy")
FLOAT = TensorProto.FLOAT
C, G = 8, 2


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _init(path, name):
    return next(numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if t.name == name)


def _group_norm_graph(build, rng, groups: int, gain: str, norm_params: str = "unit"):
    """Conv -> GroupNorm as torch's legacy exporter writes it -> Conv."""
    gamma = np.ones((C, 1, 1), np.float32) if gain == "ones" else _f(rng, C, 1, 1)
    scale, bias = ((np.ones(groups, np.float32), np.zeros(groups, np.float32)) if norm_params == "unit"
                   else (_f(rng, groups), _f(rng, groups)))
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Reshape", ["h", "grouped"], ["hg"], name="to_groups"),
             helper.make_node("InstanceNormalization", ["hg", "s", "t"], ["ng"], name="norm", epsilon=1e-5),
             helper.make_node("Shape", ["h"], ["hshape"], name="shape"),
             helper.make_node("Reshape", ["ng", "hshape"], ["n"], name="back"),
             helper.make_node("Mul", ["n", "gamma"], ["m"], name="gain"),
             helper.make_node("Add", ["m", "beta"], ["a"], name="shift"),
             helper.make_node("Conv", ["a", "W2"], ["y"], name="conv2")]
    inits = {"W1": _f(rng, C, 3, 3, 3), "b1": _f(rng, C), "grouped": np.array([0, groups, -1], np.int64),
             "s": scale, "t": bias, "gamma": gamma, "beta": _f(rng, C, 1, 1), "W2": _f(rng, 4, C, 1, 1)}
    return build(nodes, [("x", FLOAT, ["B", 3, 5, 5])], [("y", FLOAT, ["B", 4, 5, 5])], inits, opset=17)


@pytest.mark.parametrize("gain,basis", [("random", "permutation"), ("ones", "ones-orthogonal")])
def test_group_norm_keeps_a_basis_per_group(gain, basis, rng, build, lint, compile_exact):
    path = _group_norm_graph(build, rng, G, gain)
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == basis and space["blocks"] == G
    assert {"n", "m", "a"} <= set(space["tensors"])
    assert space["limited_by"]["node"] == ("gain" if gain == "random" else "norm")
    assert not report["unsupported_ops"]
    assert report.basis("x") == "invertible" and report.basis("y") == "invertible"
    result = compile_exact(path, [{"x": _f(rng, 2, 3, 5, 5)}, {"x": _f(rng, 1, 3, 5, 5) * 4}])
    assert result.report["exposure"]["intermediates_exposed"] == 0


def test_one_channel_per_group_is_a_signed_permutation(rng, build, lint, compile_exact):
    """G = C: each channel normalised alone; the per-group scale and bias of the norm are folded."""
    path = _group_norm_graph(build, rng, C, "ones", norm_params="random")
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "signed-permutation" and space["limited_by"]["node"] == "norm"
    result = compile_exact(path, {"x": _f(rng, 2, 3, 5, 5)})
    assert not np.allclose(_init(result.server_model, "s"), _init(path, "s"))  # scale permuted


def test_instance_norm(rng, build, lint, compile_exact):
    path = build([helper.make_node("Conv", ["x", "W1"], ["h"], name="conv1"),
                  helper.make_node("InstanceNormalization", ["h", "s", "t"], ["n"], name="norm"),
                  helper.make_node("Conv", ["n", "W2"], ["y"], name="conv2")],
                 [("x", FLOAT, ["B", 3, 4, 4])], [("y", FLOAT, ["B", 2, 4, 4])],
                 {"W1": _f(rng, C, 3, 1, 1), "s": _f(rng, C), "t": _f(rng, C), "W2": _f(rng, 2, C, 1, 1)})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "signed-permutation" and "n" in space["tensors"]
    result = compile_exact(path, {"x": _f(rng, 2, 3, 4, 4)})
    for name in ("s", "t"):
        assert not np.allclose(_init(result.server_model, name), _init(path, name))


def test_group_norm_of_a_tensor_protected_on_a_spatial_axis_clears(rng, build, lint, compile_exact):
    """x [B, S, D] protected on D, grouped over S: the norm mixes the protected axis into its statistics."""
    path = build([helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
                  helper.make_node("Reshape", ["h", "grouped"], ["hg"], name="to_groups"),
                  helper.make_node("InstanceNormalization", ["hg", "s", "t"], ["ng"], name="norm"),
                  helper.make_node("Reshape", ["ng", "restore"], ["n"], name="back"),
                  helper.make_node("MatMul", ["n", "W2"], ["y"], name="mm2")],
                 [("x", FLOAT, [2, 4, 3])], [("y", FLOAT, [2, 4, 2])],
                 {"W1": _f(rng, 3, C), "grouped": np.array([2, 2, -1], np.int64), "s": np.ones(2, np.float32),
                  "t": np.zeros(2, np.float32), "restore": np.array([2, 4, C], np.int64), "W2": _f(rng, C, 2)})
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "norm"
    compile_exact(path, {"x": _f(rng, 2, 4, 3)})


def _unet_block():
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        """A diffusers-style resnet block: GroupNorm, SiLU, nearest upsampling, convs, a residual."""

        def __init__(self) -> None:
            super().__init__()
            self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
            self.norm1 = nn.GroupNorm(2, 8)
            self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
            self.norm2 = nn.GroupNorm(4, 8)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.out = nn.Conv2d(8, 4, 1)
            with torch.no_grad():
                for norm in (self.norm1, self.norm2):
                    norm.weight.normal_()
                    norm.bias.normal_()

        def forward(self, x):
            h = self.conv_in(x)
            r = self.conv1(F.silu(self.norm1(h)))
            h = h + self.conv2(F.silu(self.norm2(r)))
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            return self.out(h)

    torch.manual_seed(0)
    return Block()


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_unet_block_export(exporter, rng, torch_export, lint, compile_exact):
    import torch

    path = torch_export(_unet_block(), (torch.randn(2, 3, 6, 6),), exporter, ["x"], ["y"])
    report = lint(path)
    assert not report["unsupported_ops"]
    assert report.basis("x") == "invertible" and report.basis("y") == "invertible"
    residual = [s for s in report["spaces"] if s["size"] == 8 and s["blocks"] == 4]
    assert residual and all(s["basis"] == "permutation" for s in residual)  # norm2 splits the residual into 4 groups
    assert not [s for s in report["spaces"] if s["basis"] == "clear"]
    result = compile_exact(path, {"x": _f(rng, 2, 3, 6, 6)})
    assert result.report["exposure"]["intermediates_exposed"] == 0


def _group_normalization_op(build, rng, groups: int, per_channel: bool, opset: int):
    """Conv -> the ``GroupNormalization`` op (opset 21: per-channel scale and bias) -> Conv."""
    n = C if per_channel else groups
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["h"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("GroupNormalization", ["h", "s", "t"], ["n"], name="norm", num_groups=groups,
                              epsilon=1e-5),
             helper.make_node("Conv", ["n", "W2"], ["y"], name="conv2")]
    inits = {"W1": _f(rng, C, 3, 3, 3), "b1": _f(rng, C), "s": _f(rng, n), "t": _f(rng, n),
             "W2": _f(rng, 4, C, 1, 1)}
    return build(nodes, [("x", FLOAT, ["B", 3, 5, 5])], [("y", FLOAT, ["B", 4, 5, 5])], inits, opset=opset)


def test_group_normalization_op_keeps_a_block_per_group(rng, build, lint, compile_exact):
    """Opset 21's per-channel gain makes each group's block a permutation; scale and bias permuted with it."""
    basis, per_channel = "permutation", True
    path = _group_normalization_op(build, rng, G, per_channel, 21)
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == basis and space["blocks"] == G and "n" in space["tensors"]
    assert space["limited_by"]["node"] == "norm" and not report["unsupported_ops"]
    result = compile_exact(path, [{"x": _f(rng, 2, 3, 5, 5)}, {"x": _f(rng, 1, 3, 5, 5) * 3}])
    assert result.report["exposure"]["intermediates_exposed"] == 0
    assert not np.allclose(_init(result.server_model, "s"), _init(path, "s"))


def test_group_normalization_op_one_channel_per_group(rng, build, lint, compile_exact):
    path = _group_normalization_op(build, rng, C, True, 21)
    report = lint(path)
    assert report.basis("h") == "signed-permutation"
    compile_exact(path, {"x": _f(rng, 2, 3, 5, 5)})
