"""QDQ weights (eecompile.passes.rules.qdq): DequantizeLinear of constants feeding a MatMul.

Exact by default (the grid kept: permutations of rows/columns, a scale per index folded into per-index
scales, permutations within blocks); dense bases with ``requantize``, whose error is the quantisation error.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import eecompile
from eecompile.passes.options import CompileOptions
from eecompile.passes.verify import relative_error

FLOAT = TensorProto.FLOAT
K, N1, N2 = 32, 16, 6


def _quantize(w: np.ndarray, granularity: str, block: int = 8) -> tuple[np.ndarray, np.ndarray, dict]:
    """int8 symmetric quantisation of ``w`` (K × N): q, scale, DequantizeLinear attributes."""
    k, n = w.shape
    if granularity == "tensor":
        scale = np.array(np.abs(w).max() / 127, np.float32)
        full, attrs = np.full(w.shape, scale), {}
    elif granularity == "axis1":
        scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
        full, attrs = np.broadcast_to(scale, w.shape), {"axis": 1}
    elif granularity == "axis0":
        scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
        full, attrs = np.broadcast_to(scale[:, None], w.shape), {"axis": 0}
    else:  # blocks of ``block`` along K (opset 21)
        scale = (np.abs(w).reshape(k // block, block, n).max(axis=1) / 127).astype(np.float32)
        full, attrs = np.repeat(scale, block, axis=0), {"axis": 0, "block_size": block}
    q = np.clip(np.round(w / full), -127, 127).astype(np.int8)
    return q, scale, attrs


def _mlp(build, rng, granularity: str):
    """x → MatMul(DQ(W1)) → Relu → MatMul(DQ(W2)) → y."""
    inits, nodes = {}, []
    for i, (k, n) in enumerate(((K, N1), (N1, N2))):
        q, scale, attrs = _quantize(rng.standard_normal((k, n)).astype(np.float32), granularity,
                                    block=8 if k % 8 == 0 else k)
        inits[f"q{i}"], inits[f"s{i}"] = q, scale
        nodes.append(helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}"], [f"w{i}"], name=f"dq{i}", **attrs))
    nodes += [helper.make_node("MatMul", ["x", "w0"], ["h"], name="mm0"),
              helper.make_node("Relu", ["h"], ["r"], name="relu"),
              helper.make_node("MatMul", ["r", "w1"], ["y"], name="mm1")]
    return build(nodes, [("x", FLOAT, ["B", 3, K])], [("y", FLOAT, ["B", 3, N2])], inits, opset=21)


def _spaces(report: dict) -> dict[str, str]:
    return {t: s["basis"] for s in report["spaces"] for t in s["tensors"]}


@pytest.mark.parametrize("granularity,x_class,y_class", [
    ("tensor", "permutation", "permutation"),
    ("axis1", "permutation", "monomial"),      # W1's rows share scales per column: rows only permute
    ("axis0", "monomial", "permutation"),      # a scale per row of W1: the input may be scaled too
    ("blocks", "permutation", "monomial"),     # blocks of 8 along K: permutations within them
])
def test_qdq_weights_keep_their_grid_exactly(granularity, x_class, y_class, rng, build, compile_exact):
    path = _mlp(build, rng, granularity)
    report = compile_exact(path, [{"x": rng.standard_normal((2, 3, K)).astype(np.float32)} for _ in range(2)]).report
    assert not report["unsupported_ops"]
    spaces = _spaces(report)
    assert spaces["x"] == x_class and spaces["y"] == y_class, spaces
    assert any(p.startswith("QDQ weights kept on their grid (exact, no re-quantisation) in 2 DequantizeLinear")
               for p in report["policies"]), report["policies"]
    if granularity == "blocks":
        x = next(s for s in report["spaces"] if "x" in s["tensors"])
        assert x["blocks"] == K // 8


def test_requantize_gives_qdq_weights_dense_bases(rng, build, tmp_path):
    path = _mlp(build, rng, "axis1")
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out",
                                     options=CompileOptions(requantize=True))
    spaces = _spaces(result.report)
    assert any(p.startswith("QDQ weights re-quantised") for p in result.report["policies"])
    assert spaces["x"] == "invertible" and spaces["y"] == "invertible"
    x = rng.standard_normal((2, 3, K)).astype(np.float32)
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = eecompile.EncryptedSession(result.out_dir, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert 0 < relative_error(ref, got) < 0.05  # int8 re-quantisation error, not an exact fold
