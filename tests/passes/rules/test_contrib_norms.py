"""eecompile.passes.rules.contrib_norms: com.microsoft SkipSimplifiedLayerNormalization and SkipLayerNormalization.

The residual sum ``input + skip (+ bias)`` is one space; the norm restricts it as RMSNormalization /
LayerNormalization do (orthogonal — ones-preserving for the layer norm — with a gain folded into the
following linear layers, (signed) permutations with a gain left in the graph). Both the normalised
output and the ``input_skip_bias_sum`` output stay protected.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

FLOAT = TensorProto.FLOAT
D = 8
MS = [("com.microsoft", 1)]
OPS = ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _mm(a, w, out):
    return helper.make_node("MatMul", [a, w], [out], name=f"mm_{out}")


def _skip_graph(build, rng, op: str, gain: str = "random", consumer: str = "linear", bias: bool = False,
                beta: bool = False, skip: str = "activation", sum_output: bool = True):
    g = np.ones(D, np.float32) if gain == "ones" else _f(rng, D) + 2.0
    inits = {"W1": _f(rng, 4, D), "W3": _f(rng, 4, D), "g": g, "W2": _f(rng, D, 3), "W4": _f(rng, D, 5)}
    nodes = [_mm("x", "W1", "h")]
    inputs = [("x", FLOAT, ["B", 3, 4])]
    if skip == "activation":
        nodes.append(_mm("x", "W3", "k"))
    elif skip == "constant":  # a (S, D) table broadcast over the batch
        inits["k"] = _f(rng, 3, D)
    elif skip == "input":
        inputs.append(("k", FLOAT, ["B", 3, D]))
    names = ["h", "k", "g"]
    if op == "SkipLayerNormalization":
        names.append("beta" if beta else "")
        if beta:
            inits["beta"] = _f(rng, D)
    if bias:
        names.append("bias")
        inits["bias"] = _f(rng, D)
    while names[-1] == "":
        names.pop()
    outs = ["n", "", "", "s"] if sum_output else ["n"]
    nodes.append(helper.make_node(op, names, outs, name="norm", domain="com.microsoft", epsilon=1e-5))
    outputs = [("y", FLOAT, ["B", 3, 3])]
    if consumer == "linear":
        nodes.append(_mm("n", "W2", "y"))
    elif consumer == "relu":
        nodes += [helper.make_node("Relu", ["n"], ["r"], name="relu"), _mm("r", "W2", "y")]
    else:  # the normalised tensor is also a graph output: the gain cannot be folded
        nodes.append(_mm("n", "W2", "y"))
        outputs.append(("n", FLOAT, ["B", 3, D]))
    if sum_output:
        nodes.append(_mm("s", "W4", "z"))
        outputs.append(("z", FLOAT, ["B", 3, 5]))
    return build(nodes, inputs, outputs, inits, opset=22, extra_opsets=MS, check=False)


def _feeds(rng, batch=2, skip_input=False):
    feeds = {"x": _f(rng, batch, 3, 4)}
    if skip_input:
        feeds["k"] = _f(rng, batch, 3, D)
    return feeds


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("gain,consumer", [("ones", "linear"), ("random", "linear"), ("random", "output"),
                                           ("random", "relu")])
def test_skip_norm_bases(op, gain, consumer, rng, build, lint, compile_exact):
    path = _skip_graph(build, rng, op, gain, consumer)
    report = lint(path)
    rms = op == "SkipSimplifiedLayerNormalization"
    expected = {"linear": "orthogonal" if rms else "ones-orthogonal",
                "output": "signed-permutation" if rms else "permutation",
                "relu": "permutation"}[consumer]
    space = report.space("h")
    assert space["basis"] == expected
    assert {"h", "k", "n", "s"} <= set(space["tensors"])  # input, skip, output and the residual sum: one space
    folded = any("norm gains folded" in p for p in report["policies"])
    assert folded == (gain == "random" and consumer == "linear")
    if consumer != "relu":
        assert space["limited_by"]["node"] == "norm"
    assert not report["unsupported_ops"]
    assert "com.microsoft::" + op in report["validity"]
    compile_exact(path, [_feeds(rng), _feeds(rng, batch=1)])


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("consumer", ["linear", "output"])
def test_bias_and_beta_are_folded(op, consumer, rng, build, lint, compile_exact):
    path = _skip_graph(build, rng, op, "random", consumer, bias=True, beta=op == "SkipLayerNormalization")
    report = lint(path)
    assert report.basis("s") == {("SkipSimplifiedLayerNormalization", "linear"): "orthogonal",
                                 ("SkipSimplifiedLayerNormalization", "output"): "signed-permutation",
                                 ("SkipLayerNormalization", "linear"): "ones-orthogonal",
                                 ("SkipLayerNormalization", "output"): "permutation"}[(op, consumer)]
    compile_exact(path, _feeds(rng))


def test_constant_skip_is_folded(rng, build, lint, compile_exact):
    path = _skip_graph(build, rng, "SkipLayerNormalization", skip="constant", beta=True, bias=True)
    report = lint(path)
    assert report.basis("h") == "ones-orthogonal"
    compile_exact(path, [_feeds(rng), _feeds(rng, batch=1)])


@pytest.mark.parametrize("op", OPS)
def test_skip_read_from_a_graph_input_is_bound_to_the_sum(op, rng, build, lint, compile_exact):
    path = _skip_graph(build, rng, op, skip="input")
    report = lint(path)
    assert report.space("h")["basis"] == ("orthogonal" if op == OPS[0] else "ones-orthogonal")
    assert "k" in report.space("h")["tensors"]
    assert report.protection("inputs", "k") != "clear"
    compile_exact(path, _feeds(rng, skip_input=True))


def test_only_the_normalised_output(rng, build, lint, compile_exact):
    path = _skip_graph(build, rng, "SkipSimplifiedLayerNormalization", sum_output=False)
    assert lint(path).basis("h") == "orthogonal"
    compile_exact(path, _feeds(rng))


def test_builder_residual_chain(rng, build, lint, compile_exact):
    """The model builder's layout: SimplifiedLayerNormalization after the embedding, then a chain of
    SkipSimplifiedLayerNormalization nodes carrying the residual sum; one orthogonal residual basis."""
    V = 16
    inits = {"E": _f(rng, V, D), "g0": _f(rng, D) + 2, "Wa": _f(rng, D, D), "g1": _f(rng, D) + 2,
             "Wb": _f(rng, D, D), "g2": _f(rng, D) + 2, "Wh": _f(rng, D, V)}
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["e"], name="embed"),
        helper.make_node("SimplifiedLayerNormalization", ["e", "g0"], ["n0"], name="norm0", axis=-1, epsilon=1e-6),
        _mm("n0", "Wa", "a"),
        helper.make_node("SkipSimplifiedLayerNormalization", ["e", "a", "g1"], ["n1", "", "", "s1"], name="norm1",
                         domain="com.microsoft", epsilon=1e-6),
        _mm("n1", "Wb", "b"),
        helper.make_node("SkipSimplifiedLayerNormalization", ["s1", "b", "g2"], ["n2"], name="norm2",
                         domain="com.microsoft", epsilon=1e-6),
        _mm("n2", "Wh", "logits"),
    ]
    path = build(nodes, [("ids", TensorProto.INT64, ["B", "S"])], [("logits", FLOAT, ["B", "S", V])], inits,
                 opset=22, extra_opsets=MS, check=False)
    report = lint(path)
    space = report.space("e")
    assert space["basis"] == "orthogonal"
    assert {"e", "n0", "a", "s1", "n1", "b", "n2"} <= set(space["tensors"])
    assert report["validity"].startswith("onnx.checker + ONNX Runtime op registry")
    ids = rng.integers(0, V, (2, 5)).astype(np.int64)
    result = compile_exact(path, {"ids": ids})
    assert result.report["server_validity"] == result.report["validity"]
