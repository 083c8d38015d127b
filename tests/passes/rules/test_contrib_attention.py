"""com.microsoft GroupQueryAttention and MultiHeadAttention (eecompile.passes.rules.contrib_attention).

Per head, queries take the dual of the basis of the key head they read (scores stay clear), values keep
their own basis into the output projection, the BNSH KV cache stays in the key/value bases; with
GroupQueryAttention's internal rotary the Q/K heads are restricted to one complex scalar per frequency
pair. Every graph is compiled, verified by compile itself on a non-empty cache (prefill and a decode
step), and compared here with ONNX Runtime on fresh inputs.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import eecompile
from eecompile.passes.verify import relative_error
from tests.passes.conftest import io_protection, space_of

FLOAT, INT64 = TensorProto.FLOAT, TensorProto.INT64
B, S, HEADS, KV, HD, MAX = 2, 3, 4, 2, 32, 16  # ORT: head size a multiple of 16
D = HEADS * HD
MS = ("com.microsoft", 1)


def _rope_cache(rotary_dim: int) -> tuple[np.ndarray, np.ndarray]:
    inv = 1.0 / (10000 ** (np.arange(0, rotary_dim, 2) / rotary_dim))
    angles = np.outer(np.arange(MAX), inv)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _mask_nodes() -> list:
    """seqlens_k = sum(mask) - 1 and total_sequence_length = mask.shape[1], as int32 (the builder's subgraph)."""
    return [helper.make_node("ReduceSum", ["attention_mask", "one"], ["mask_sum"], name="mask_sum"),
            helper.make_node("Sub", ["mask_sum", "one"], ["seqlens64"], name="seqlens_sub"),
            helper.make_node("Cast", ["seqlens64"], ["seqlens"], name="seqlens_cast", to=TensorProto.INT32),
            helper.make_node("Shape", ["attention_mask"], ["mask_shape"], name="mask_shape"),
            helper.make_node("Gather", ["mask_shape", "one_scalar"], ["total64"], name="total_gather", axis=0),
            helper.make_node("Cast", ["total64"], ["total"], name="total_cast", to=TensorProto.INT32)]


def _io(heads_kv: int):
    past = [(f"past_key_values.0.{t}", FLOAT, ["batch", heads_kv, "past_sequence_length", HD]) for t in ("key", "value")]
    inputs = [("x", FLOAT, ["batch", "sequence_length", D]),
              ("attention_mask", INT64, ["batch", "total_sequence_length"]), *past]
    outputs = [("y", FLOAT, ["batch", "sequence_length", D]),
               *[(f"present.0.{t}", FLOAT, ["batch", heads_kv, "total_sequence_length", HD]) for t in ("key", "value")]]
    return inputs, outputs


# Weights scaled by 1/sqrt(D), as trained models are: unit-variance projections keep the softmax unsaturated.
def _gqa_model(build, rng, packed: bool = True, rotary_dim: int | None = HD, interleaved: int = 0):
    nodes = _mask_nodes()
    inits = {"one": np.array([1], np.int64), "one_scalar": np.array(1, np.int64),
             "Wo": (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)}
    if packed:
        inits["Wqkv"] = (rng.standard_normal((D, D + 2 * KV * HD)) / np.sqrt(D)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", ["x", "Wqkv"], ["qkv"], name="qkv_proj"))
        qkv = ["qkv", "", ""]
    else:
        for t, width in (("q", D), ("k", KV * HD), ("v", KV * HD)):
            inits[f"W{t}"] = (rng.standard_normal((D, width)) / np.sqrt(D)).astype(np.float32)
            nodes.append(helper.make_node("MatMul", ["x", f"W{t}"], [t], name=f"{t}_proj"))
        qkv = ["q", "k", "v"]
    rotary = rotary_dim is not None
    inputs = [*qkv, "past_key_values.0.key", "past_key_values.0.value", "seqlens", "total"]
    if rotary:
        inits["cos_cache"], inits["sin_cache"] = _rope_cache(rotary_dim)
        inputs += ["cos_cache", "sin_cache"]
    nodes += [helper.make_node("GroupQueryAttention", inputs, ["attn", "present.0.key", "present.0.value"],
                               name="gqa", domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV,
                               do_rotary=int(rotary), rotary_interleaved=interleaved, scale=float(HD) ** -0.5),
              helper.make_node("MatMul", ["attn", "Wo"], ["y"], name="o_proj")]
    inputs_io, outputs_io = _io(KV)
    return build(nodes, inputs_io, outputs_io, inits, opset=20, extra_opsets=[MS], check=False)


@pytest.fixture
def compile_y(tmp_path):
    """Compile, then compare the decrypted ``y`` with ONNX Runtime on the original (the ``present`` outputs are
    server-side state: compile's own check decrypts and compares them, after a decode step too)."""
    def _compile(path, feeds: list[dict]):
        result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / f"out-{path.stem}")
        ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        enc = eecompile.EncryptedSession(result.out_dir, providers=["CPUExecutionProvider"])
        for one in feeds:
            err = relative_error(ref.run(["y"], one)[0], enc.run(["y"], one)[0])
            assert err <= 1e-5, f"relative error {err:.2e}"
        assert result.report["verification"]["checked"]
        assert result.report["verification"]["max_relative_error"] <= 1e-5
        return result
    return _compile


def _feeds(rng, kv_heads: int, seeds: int = 2) -> list[dict]:
    """Fresh prefill inputs (empty cache: compile's own check covers a non-empty one and a decode step)."""
    out = []
    for _ in range(seeds):
        out.append({"x": rng.standard_normal((B, S, D)).astype(np.float32),
                    "attention_mask": np.ones((B, S), np.int64),
                    **{f"past_key_values.0.{t}": np.zeros((B, kv_heads, 0, HD), np.float32) for t in ("key", "value")}})
    return out


@pytest.mark.parametrize("interleaved", [0, 1])
def test_packed_gqa_with_rotary_keeps_cache_encrypted(build, compile_y, rng, interleaved):
    path = _gqa_model(build, rng, interleaved=interleaved)
    result = compile_y(path, _feeds(rng, KV))
    report = result.report
    assert report["verification"]["checked"] and "decode step" in report["verification"]["detail"]
    assert not report["unsupported_ops"]
    qkv = space_of(report, "qkv")
    classes = {c["basis"] for c in qkv.get("blocks_detail", [])} if qkv.get("blocks_detail") else {qkv["basis"]}
    assert "clear" not in classes
    for name in ("present.0.key", "present.0.value"):
        assert "ciphertext" in io_protection(report, "outputs", name)
    assert "complex-pairs" in io_protection(report, "outputs", "present.0.key")
    assert "complex-pairs" not in io_protection(report, "outputs", "present.0.value")  # V: any per-head basis
    assert report["exposure"]["state_outputs_compared"] == 2 and report["exposure"]["state_outputs_exposed"] == 0
    assert report["exposure"]["intermediates_exposed"] == 0


def test_unpacked_gqa_without_rotary_gets_dense_dual_bases(build, compile_y, rng):
    path = _gqa_model(build, rng, packed=False, rotary_dim=None)
    report = compile_y(path, _feeds(rng, KV)).report
    assert space_of(report, "q")["basis"] == "block-invertible"  # one dense basis per head
    assert "invertible" in io_protection(report, "outputs", "present.0.key")
    assert report["exposure"]["state_outputs_exposed"] == 0


def test_partial_rotary_inside_gqa_clears_queries_and_keys(build, compile_y, rng):
    path = _gqa_model(build, rng, rotary_dim=HD // 2)
    report = compile_y(path, _feeds(rng, KV)).report
    assert "ciphertext" not in io_protection(report, "outputs", "present.0.key")
    assert any("partial rotary" in (s["limited_by"] or {}).get("reason", "") for s in report["spaces"])
    assert "ciphertext" in io_protection(report, "outputs", "present.0.value")  # V is unaffected


def _mha_model(build, rng, bias: bool):
    nodes = []
    inits = {"Wo": (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)}
    for t in "qkv":
        inits[f"W{t}"] = (rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32)
        nodes.append(helper.make_node("MatMul", ["x", f"W{t}"], [t], name=f"{t}_proj"))
    inputs = ["q", "k", "v", "bias" if bias else "", "", "", "past_key_values.0.key", "past_key_values.0.value"]
    if bias:
        inits["bias"] = rng.standard_normal(3 * D).astype(np.float32)
    nodes += [helper.make_node("MultiHeadAttention", inputs, ["attn", "present.0.key", "present.0.value"],
                               name="mha", domain="com.microsoft", num_heads=HEADS, unidirectional=1),
              helper.make_node("MatMul", ["attn", "Wo"], ["y"], name="o_proj")]
    inputs_io, outputs_io = _io(HEADS)
    inputs_io = [i for i in inputs_io if i[0] != "attention_mask"]
    return build(nodes, inputs_io, outputs_io, inits, opset=20, extra_opsets=[MS], check=False)


@pytest.mark.parametrize("bias", [False, True])
def test_multi_head_attention_with_cache_and_bias(build, compile_y, rng, bias):
    path = _mha_model(build, rng, bias)
    feeds = [{k: v for k, v in f.items() if k != "attention_mask"} for f in _feeds(rng, HEADS)]
    report = compile_y(path, feeds).report
    assert not report["unsupported_ops"]
    assert space_of(report, "q")["basis"] == "block-invertible"  # one dense basis per head
    for name in ("present.0.key", "present.0.value"):
        assert "invertible" in io_protection(report, "outputs", name)
    assert report["exposure"]["state_outputs_exposed"] == 0 and report["exposure"]["intermediates_exposed"] == 0
