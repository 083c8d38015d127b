"""eecompile.passes.rules.norms: LayerNormalization, RMS norms (op and decomposed) and BatchNormalization.

A norm whose gain is all ones (or folded away by normalize) keeps orthogonal bases —
ones-preserving for LayerNorm, any for RMS norm; a gain that must stay in the graph allows
only (signed) permutations. BatchNorm is a per-channel affine map: input and output share a
permutation and keep their own scales.
"""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

FLOAT = TensorProto.FLOAT
D, C = 8, 4


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _mm(a, w, out):
    return helper.make_node("MatMul", [a, w], [out], name=f"mm_{out}")


def _norm_graph(build, rng, op: str, gain: str, consumer: str):
    g = np.ones(D, np.float32) if gain == "ones" else _f(rng, D) + 2.0
    inputs = ["h", "g", "b"] if op == "LayerNormalization" else ["h", "g"]
    inits = {"W1": _f(rng, 4, D), "g": g, "W2": _f(rng, D, 3)}
    if op == "LayerNormalization":
        inits["b"] = _f(rng, D)
    nodes = [_mm("x", "W1", "h"), helper.make_node(op, inputs, ["n"], name="norm", axis=-1)]
    outputs = [("y", FLOAT, ["B", "S", 3])]
    if consumer == "linear":
        nodes.append(_mm("n", "W2", "y"))
    elif consumer == "relu":
        nodes += [helper.make_node("Relu", ["n"], ["r"], name="relu"), _mm("r", "W2", "y")]
    else:  # the normalised tensor is also a graph output: the gain folds into the client's decrypt
        nodes.append(_mm("n", "W2", "y"))
        outputs.append(("n", FLOAT, ["B", "S", D]))
    opset = 17 if op == "LayerNormalization" else 23
    return build(nodes, [("x", FLOAT, ["B", "S", 4])], outputs, inits, opset=opset)


@pytest.mark.parametrize("op,gain,consumer,basis", [
    ("LayerNormalization", "ones", "linear", "ones-orthogonal"),
    ("LayerNormalization", "random", "linear", "ones-orthogonal"),  # gain folded into the MatMul
    ("LayerNormalization", "random", "output", "ones-orthogonal"),  # gain into the MatMul and the client
    ("LayerNormalization", "random", "relu", "permutation"),
    ("RMSNormalization", "ones", "linear", "orthogonal"),
    ("RMSNormalization", "random", "linear", "orthogonal"),
    ("RMSNormalization", "random", "output", "orthogonal"),
    ("RMSNormalization", "random", "relu", "permutation"),  # signed permutation ∧ Relu's positive scales
])
def test_feature_norm(op, gain, consumer, basis, rng, build, lint, compile_exact):
    path = _norm_graph(build, rng, op, gain, consumer)
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == basis
    assert "n" in space["tensors"]
    folded = any("norm gains folded" in p for p in report["policies"])
    assert folded == (gain == "random" and consumer != "relu")
    if gain == "random" and consumer == "output":
        assert any("client multiplies the gain into output(s) n" in p for p in report["policies"])
    if consumer != "relu":
        assert space["limited_by"]["node"] == "norm"
    assert report.basis("x") == "invertible" and report.basis("y") == "invertible"
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


def test_norm_over_another_axis_clears(rng, build, lint, compile_exact):
    path = build([_mm("x", "W1", "h"),
                  helper.make_node("LayerNormalization", ["h", "g"], ["n"], name="norm", axis=1),
                  _mm("n", "W2", "y")],
                 [("x", FLOAT, [2, 3, 4])], [("y", FLOAT, [2, 3, 3])],
                 {"W1": _f(rng, 4, D), "g": _f(rng, 3, D), "W2": _f(rng, D, 3)}, opset=17)
    report = lint(path)
    assert report.basis("h") == "clear" and report.space("h")["limited_by"]["node"] == "norm"
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


@pytest.mark.parametrize("divide", [False, True], ids=["reciprocal-mul", "div"])
def test_decomposed_rms_norm_is_orthogonal(divide, rng, build, lint, compile_exact):
    """``h / sqrt(mean(h²) + eps) * g`` as exported by the legacy exporter."""
    nodes = [_mm("x", "W1", "h"), helper.make_node("Pow", ["h", "two"], ["sq"], name="pow"),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="mean"),
             helper.make_node("Add", ["ms", "eps"], ["mse"], name="add_eps"),
             helper.make_node("Sqrt", ["mse"], ["rms"], name="sqrt")]
    if divide:
        nodes.append(helper.make_node("Div", ["h", "rms"], ["nrm"], name="div"))
    else:
        nodes += [helper.make_node("Reciprocal", ["rms"], ["inv"], name="recip"),
                  helper.make_node("Mul", ["h", "inv"], ["nrm"], name="scale")]
    nodes += [helper.make_node("Mul", ["nrm", "g"], ["n"], name="gain"), _mm("n", "W2", "y")]
    path = build(nodes, [("x", FLOAT, ["B", "S", 4])], [("y", FLOAT, ["B", "S", 3])],
                 {"W1": _f(rng, 4, D), "two": np.array(2.0, np.float32), "axes": np.array([-1]),
                  "eps": np.array(1e-6, np.float32), "g": _f(rng, D) + 2.0, "W2": _f(rng, D, 3)})
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "orthogonal"
    assert {"nrm", "n"} <= set(space["tensors"])
    assert space["limited_by"]["node"] == "pow"
    assert report.protection("outputs", "y").endswith("invertible")
    compile_exact(path, {"x": _f(rng, 2, 3, 4)})


def test_squares_used_other_than_summed_are_permutation(rng, build, lint, compile_exact):
    nodes = [_mm("x", "W1", "h"), helper.make_node("Pow", ["h", "two"], ["sq"], name="pow"),
             helper.make_node("ReduceMean", ["sq", "axes"], ["ms"], name="mean"),
             helper.make_node("Add", ["sq", "ms"], ["z"], name="uses_squares"), _mm("z", "W2", "y")]
    path = build(nodes, [("x", FLOAT, ["B", 4])], [("y", FLOAT, ["B", 3])],
                 {"W1": _f(rng, 4, D), "two": np.array(2.0, np.float32), "axes": np.array([-1]),
                  "W2": _f(rng, D, 3)})
    report = lint(path)
    assert report.basis("h") == "permutation"
    compile_exact(path, {"x": _f(rng, 3, 4)})


# -- BatchNormalization ---------------------------------------------------------------------------


def _bn(x, out, name):
    return helper.make_node("BatchNormalization", [x, f"{name}_s", f"{name}_b", f"{name}_m", f"{name}_v"], [out],
                            name=name)


def _bn_params(rng, name):
    return {f"{name}_s": _f(rng, C), f"{name}_b": _f(rng, C), f"{name}_m": _f(rng, C),
            f"{name}_v": np.abs(_f(rng, C)) + 0.5}


def test_conv_batchnorm_relu_maxpool(rng, build, lint, compile_exact):
    path = build([helper.make_node("Conv", ["x", "W1"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                  _bn("c", "b", "bn"), helper.make_node("Relu", ["b"], ["r"], name="relu"),
                  helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
                  helper.make_node("Conv", ["p", "W2"], ["y"], name="conv2")],
                 [("x", FLOAT, ["B", 3, 6, 6])], [("y", FLOAT, ["B", 2, 3, 3])],
                 {"W1": _f(rng, C, 3, 3, 3), "W2": _f(rng, 2, C, 1, 1), **_bn_params(rng, "bn")})
    report = lint(path)
    conv_out, bn_out = report.space("c"), report.space("b")
    assert conv_out["name"] != bn_out["name"]  # own scales on each side ...
    assert conv_out["class"] == "monomial"
    assert conv_out["limited_by"] == {"node": "bn", "op_type": "BatchNormalization",
                                      "reason": "per-channel affine map: input and output share a permutation"}
    assert bn_out["class"] == "positive-monomial" and {"r", "p"} <= set(bn_out["tensors"])
    compile_exact(path, {"x": _f(rng, 2, 3, 6, 6)})


def test_batchnorm_reading_a_graph_input_leaves_it_clear(rng, build, lint, compile_exact):
    """BatchNorm as the first reader of a graph input: the input is left clear, the output too."""
    path = build([_bn("x", "b", "bn"), helper.make_node("Conv", ["b", "W"], ["y"], name="conv")],
                 [("x", FLOAT, ["B", C, 3, 3])], [("y", FLOAT, ["B", 2, 3, 3])],
                 {"W": _f(rng, 2, C, 1, 1), **_bn_params(rng, "bn")})
    report = lint(path)
    assert report.protection("inputs", "x") == "clear"
    assert report.basis("y") == "invertible"
    compile_exact(path, {"x": _f(rng, 2, C, 3, 3)})


def test_residual_block_conv_batchnorm_add(rng, build, lint, compile_exact):
    """ResNet's basic block: relu(conv0(x)) + bn(conv1(relu(conv0(x))))."""
    path = build([helper.make_node("Conv", ["x", "W0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", ["c0"], ["r0"], name="relu0"),
                  helper.make_node("Conv", ["r0", "W1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
                  _bn("c1", "b1", "bn1"), helper.make_node("Add", ["b1", "r0"], ["y"], name="residual")],
                 [("x", FLOAT, ["B", 3, 5, 5])], [("y", FLOAT, ["B", C, 5, 5])],
                 {"W0": _f(rng, C, 3, 3, 3), "W1": _f(rng, C, C, 3, 3), **_bn_params(rng, "bn1")})
    report = lint(path)
    assert report.space("b1")["name"] == report.space("r0")["name"]
    assert report.space("c1")["class"] == "monomial"
    compile_exact(path, {"x": _f(rng, 2, 3, 5, 5)})


# -- gains folded through feature-preserving ops, into the client, or bound ---------------------


def _ln(x, out, name="norm"):
    return helper.make_node("LayerNormalization", [x, "g", "b"], [out], name=name, axis=-1)


def _ln_inits(rng, **weights):
    return {"W1": _f(rng, 4, D), "g": _f(rng, D) + 2.0, "b": _f(rng, D), **weights}


def test_gain_folds_through_cls_gather_and_into_the_client(rng, build, lint, compile_exact):
    """ViT's tail: the final norm is a graph output and feeds a CLS Gather (sequence axis) into a Gemm."""
    nodes = [_mm("x", "W1", "h"), _ln("h", "n"),
             helper.make_node("Gather", ["n", "cls"], ["c"], name="cls", axis=1),
             helper.make_node("Gemm", ["c", "Wp", "bp"], ["p"], name="pool", transB=1),
             helper.make_node("Tanh", ["p"], ["y"], name="tanh")]
    path = build(nodes, [("x", FLOAT, ["B", 5, 4])], [("n", FLOAT, ["B", 5, D]), ("y", FLOAT, ["B", 3])],
                 _ln_inits(rng, cls=np.array(0, np.int64), Wp=_f(rng, 3, D), bp=_f(rng, 3)), opset=17)
    report = lint(path)
    assert report.basis("h") == "ones-orthogonal" and "c" in report.space("h")["tensors"]
    assert any("client multiplies the gain into output(s) n" in p for p in report["policies"])
    assert report.protection("outputs", "n") == "basis change on axis 2: ones-orthogonal"
    result = compile_exact(path, [{"x": _f(rng, 2, 5, 4)}, {"x": _f(rng, 1, 5, 4)}])
    assert result.verification.checked


@pytest.mark.parametrize("move", ["transpose-last", "reshape-gemm", "slice-squeeze", "unsqueeze-expand"])
def test_gain_folds_through_moves_into_linear_layers(move, rng, build, lint, compile_exact):
    nodes = [_mm("x", "W1", "h"), _ln("h", "n")]
    inits = _ln_inits(rng)
    if move == "transpose-last":
        nodes += [helper.make_node("Transpose", ["n"], ["t"], name="mv", perm=[1, 0, 2]), _mm("t", "W2", "y")]
        inits["W2"], out = _f(rng, D, 3), ("y", FLOAT, [5, 2, 3])
    elif move == "reshape-gemm":
        nodes += [helper.make_node("Reshape", ["n", "flat"], ["t"], name="mv"),
                  helper.make_node("Gemm", ["t", "W2"], ["y"], name="gemm", transB=1)]
        inits["flat"], inits["W2"], out = np.array([-1, D], np.int64), _f(rng, 3, D), ("y", FLOAT, [10, 3])
    elif move == "slice-squeeze":
        nodes += [helper.make_node("Slice", ["n", "s0", "s1", "ax"], ["sl"], name="mv"),
                  helper.make_node("Squeeze", ["sl", "ax"], ["t"], name="sq"), _mm("t", "W2", "y")]
        inits.update(s0=np.array([4], np.int64), s1=np.array([5], np.int64), ax=np.array([1], np.int64),
                     W2=_f(rng, D, 3))
        out = ("y", FLOAT, [2, 3])
    else:
        nodes += [helper.make_node("Unsqueeze", ["n", "ax"], ["u"], name="mv"),
                  helper.make_node("Expand", ["u", "shape"], ["t"], name="ex"), _mm("t", "W2", "y")]
        inits.update(ax=np.array([1], np.int64), shape=np.array([2, 3, 5, D], np.int64), W2=_f(rng, D, 3))
        out = ("y", FLOAT, [2, 3, 5, 3])
    path = build(nodes, [("x", FLOAT, [2, 5, 4])], [out], inits, opset=17)
    report = lint(path)
    assert report.basis("h") == "ones-orthogonal"
    assert "t" in report.space("h")["tensors"]
    assert any("norm gains folded through feature-preserving ops" in p for p in report["policies"])
    compile_exact(path, {"x": _f(rng, 2, 5, 4)})


def test_gain_into_an_output_whose_feature_axis_moved(rng, build, lint, tmp_path):
    """A Transpose moves the feature axis to 1 before the output: the client applies the gain on axis 1,
    in numpy and in decrypt.onnx alike."""
    import onnxruntime as ort

    import eecompile
    from eecompile.runtime.client import Client

    nodes = [_mm("x", "W1", "h"), _ln("h", "n"), helper.make_node("Transpose", ["n"], ["y"], name="mv", perm=[0, 2, 1])]
    path = build(nodes, [("x", FLOAT, [2, 5, 4])], [("y", FLOAT, [2, D, 5])], _ln_inits(rng), opset=17)
    assert lint(path).protection("outputs", "y") == "basis change on axis 1: ones-orthogonal"
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    client = Client.load(result.client_dir)
    assert client.spec.outputs[0].gain is not None and client.spec.outputs[0].axis == 1
    x = _f(rng, 2, 5, 4)
    server = ort.InferenceSession(str(result.server_model), providers=["CPUExecutionProvider"])
    (cipher,) = server.run(None, client.encrypt({"x": x}))
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    plain = client.decrypt({"y": cipher})["y"]
    onnx_plain = ort.InferenceSession(str(result.client_dir / "decrypt.onnx"),
                                      providers=["CPUExecutionProvider"]).run(None, {"y": cipher})[0]
    assert np.abs(plain - expected).max() <= 1e-5 * np.abs(expected).max()
    assert np.abs(onnx_plain - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("blocker", ["residual-add", "feature-slice"])
def test_gain_bound_by_an_op_names_it(blocker, rng, build, lint, compile_exact):
    """A post-LN norm feeding the residual Add, or a Slice of the feature axis, binds the gain."""
    nodes = [_mm("x", "W1", "h"), _ln("h", "n")]
    inits = _ln_inits(rng)
    if blocker == "residual-add":
        nodes += [_mm("n", "W2", "f"), helper.make_node("Add", ["n", "f"], ["s"], name="residual"),
                  _mm("s", "W3", "y")]
        inits.update(W2=_f(rng, D, D), W3=_f(rng, D, 3))
        blocking = "Add 'residual'"
    else:
        nodes += [helper.make_node("Slice", ["n", "s0", "s1", "ax"], ["t"], name="half"), _mm("t", "W3", "y")]
        inits.update(s0=np.array([0], np.int64), s1=np.array([D // 2], np.int64), ax=np.array([2], np.int64),
                     W3=_f(rng, D // 2, 3))
        blocking = "Slice 'half'"
    path = build(nodes, [("x", FLOAT, [2, 5, 4])], [("y", FLOAT, [2, 5, 3])], inits, opset=17)
    report = lint(path)
    space = report.space("h")
    assert space["basis"] == "permutation"
    assert space["limited_by"]["node"] == "norm" and blocking in space["limited_by"]["reason"]
    assert not any("norm gains folded" in p for p in report["policies"])
    compile_exact(path, {"x": _f(rng, 2, 5, 4)})


def test_gain_kept_where_the_space_is_permuted_anyway(rng, build, lint, compile_exact):
    """Folding into the client would lift nothing (a Relu already permutes the space): the gain stays."""
    nodes = [_mm("x", "W1", "h0"), helper.make_node("Relu", ["h0"], ["h"], name="relu"), _ln("h", "n"),
             _mm("n", "W2", "y")]
    path = build(nodes, [("x", FLOAT, [2, 5, 4])], [("y", FLOAT, [2, 5, 3]), ("n", FLOAT, [2, 5, D])],
                 _ln_inits(rng, W2=_f(rng, D, 3)), opset=17)
    report = lint(path)
    assert report.basis("h") == "permutation"
    assert not any("norm gains folded" in p for p in report["policies"])
    compile_exact(path, {"x": _f(rng, 2, 5, 4)})
