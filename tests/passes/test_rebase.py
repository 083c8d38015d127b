"""eecompile.passes.rebase: the opt-in ``rebase`` policy.

Where an op whose constants cannot be folded binds a residual stream to a permutation — a post-LN norm
gain feeding the residual Add, a nonlinearity at the stream's origin (Whisper's GELU stem) — the policy
inserts one d×d MatMul after it and the stream takes a ones-orthogonal basis; the compiled model stays
exact, the report names the policy and the points, the default inserts nothing and says what the policy
would lift. The tiny Hugging Face exports (ViT default, BERT under the policy) are slow tests.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

import eecompile
from eecompile.passes.options import CompileOptions
from eecompile.passes.verify import relative_error

FLOAT = TensorProto.FLOAT
D = 8


def _f(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _post_ln(build, rng):
    """``n1 = LN(x W1)`` feeds a residual Add (binds its gain), ``n2 = LN(n1 + n1 W2)`` feeds only ``W3``."""
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="in_proj"),
             helper.make_node("LayerNormalization", ["h", "g1", "b1"], ["n1"], name="ln1", axis=-1),
             helper.make_node("MatMul", ["n1", "W2"], ["f"], name="ffn"),
             helper.make_node("Add", ["n1", "f"], ["s"], name="residual"),
             helper.make_node("LayerNormalization", ["s", "g2", "b2"], ["n2"], name="ln2", axis=-1),
             helper.make_node("MatMul", ["n2", "W3"], ["y"], name="head")]
    inits = {"W1": _f(rng, 4, D), "g1": _f(rng, D) + 2.0, "b1": _f(rng, D), "W2": _f(rng, D, D),
             "g2": _f(rng, D) + 2.0, "b2": _f(rng, D), "W3": _f(rng, D, 3)}
    return build(nodes, [("x", FLOAT, ["B", 5, 4])], [("y", FLOAT, ["B", 5, 3])], inits, opset=17)


def _gelu_stem(build, rng, mlp: bool = False):
    """Whisper's stem: Conv1d → Gelu → Transpose starts the residual stream ``s = t + t W2`` → LN → W3.
    With ``mlp`` the Gelu sits between two linear layers instead (nothing to lift)."""
    if mlp:
        nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
                 helper.make_node("Gelu", ["h"], ["a"], name="gelu"),
                 helper.make_node("MatMul", ["a", "W3"], ["y"], name="fc2")]
        inits = {"W1": _f(rng, 4, D), "W3": _f(rng, D, 3)}
        return build(nodes, [("x", FLOAT, ["B", 5, 4])], [("y", FLOAT, ["B", 5, 3])], inits, opset=20)
    nodes = [helper.make_node("Conv", ["x", "Wc"], ["c"], name="conv", pads=[1, 1]),
             helper.make_node("Gelu", ["c"], ["a"], name="gelu"),
             helper.make_node("Transpose", ["a"], ["t"], name="tr", perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "W2"], ["f"], name="ffn"),
             helper.make_node("Add", ["t", "f"], ["s"], name="residual"),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["n"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n", "W3"], ["y"], name="head")]
    inits = {"Wc": _f(rng, D, 4, 3), "W2": _f(rng, D, D), "g": _f(rng, D) + 2.0, "b": _f(rng, D),
             "W3": _f(rng, D, 3)}
    return build(nodes, [("x", FLOAT, ["B", 4, 6])], [("y", FLOAT, ["B", 6, 3])], inits, opset=20)


def _compile(path, tmp_path, policy: str, feeds: list[dict]):
    """Compile under ``policy`` and check the encrypted model against the original on ``feeds``."""
    out = tmp_path / f"out-{policy}"
    result = eecompile.compile_model(path, eecompile.generate_key(), out, options=CompileOptions(policy=policy))
    assert result.verification.checked
    ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    enc = eecompile.EncryptedSession(out, providers=["CPUExecutionProvider"])
    for feed in feeds:
        for e, g in zip(ref.run(None, feed), enc.run(None, feed)):
            assert relative_error(e, g) <= 1e-5
    return result


def _space(report: dict, tensor: str) -> dict:
    found = [s for s in report["spaces"] if tensor in s["tensors"]]
    assert len(found) == 1, tensor
    return found[0]


def _matmuls(path) -> int:
    return sum(n.op_type == "MatMul" for n in onnx.load(str(path)).graph.node)


def test_post_ln_gain_is_named_and_rebased(rng, build, tmp_path):
    path = _post_ln(build, rng)
    feeds = [{"x": _f(rng, 2, 5, 4)}, {"x": _f(rng, 1, 5, 4)}]
    default = _compile(path, tmp_path, "default", feeds)
    space = _space(default.report, "s")
    assert space["basis"] == "permutation"
    assert space["limited_by"]["node"] == "ln1" and "Add 'residual'" in space["limited_by"]["reason"]
    assert space["lift"]["kind"] == "policy"
    assert "--policy rebase` would make this dense at the cost of one 8×8 MatMul per binding op" in space["lift"]["how"]
    assert default.report["policy"] == "default" and _matmuls(default.server_model) == _matmuls(path)

    rebased = _compile(path, tmp_path, "rebase", feeds)
    report = rebased.report
    assert report["policy"] == "rebase"
    assert any(p.startswith("policy rebase: 1 dense re-basing MatMul") and "ln1" in p for p in report["policies"])
    for tensor in ("h", "s", "n2"):
        assert _space(report, tensor)["basis"] == "ones-orthogonal", tensor
    assert _space(report, "h")["name"] != _space(report, "s")["name"]
    assert _matmuls(rebased.server_model) == _matmuls(path) + 1


def test_nonlinearity_at_the_stream_origin_is_rebased(rng, build, tmp_path):
    path = _gelu_stem(build, rng)
    feeds = [{"x": _f(rng, 2, 4, 6)}]
    default = _compile(path, tmp_path, "default", feeds)
    space = _space(default.report, "s")
    assert space["basis"] == "permutation" and space["limited_by"]["node"] == "gelu"
    assert "--policy rebase" in space["lift"]["how"]
    rebased = _compile(path, tmp_path, "rebase", feeds)
    assert _space(rebased.report, "s")["basis"] == "ones-orthogonal"
    assert _space(rebased.report, "a")["basis"] == "permutation"  # the Gelu's own space stays a permutation
    assert any("Gelu 'gelu'" in p for p in rebased.report["policies"])
    assert _matmuls(rebased.server_model) == _matmuls(path) + 1


def test_an_mlp_activation_gets_no_rebase(rng, build, tmp_path):
    path = _gelu_stem(build, rng, mlp=True)
    report = eecompile.lint_model(path, options=CompileOptions(policy="rebase"))
    assert any(p.startswith("policy rebase: no space is bound") for p in report["policies"])
    assert _space(report, "a")["basis"] == "permutation"
    default = eecompile.lint_model(path)
    assert "--policy rebase" not in _space(default, "a")["lift"]["how"]


def test_unknown_policy_is_refused(rng, build, tmp_path, capsys):
    from eecompile.cli import main
    from eecompile.passes.graph import ModelGraph, load_model
    from eecompile.passes.rebase import analyze_with_policy

    path = _post_ln(build, rng)
    with pytest.raises(ValueError, match="unknown policy 'dense'"):
        analyze_with_policy(ModelGraph(load_model(path), path.parent), "dense")
    assert main(["lint", str(path), "--policy", "dense"]) != 0
    err = capsys.readouterr().err
    assert "invalid choice: 'dense'" in err and len(err.strip().splitlines()) == 1


def test_bench_names_the_policy(rng, build, tmp_path):
    from eecompile.bench import run_bench

    path = _post_ln(build, rng)
    _compile(path, tmp_path, "rebase", [{"x": _f(rng, 1, 5, 4)}])
    result = run_bench(tmp_path / "out-rebase", iters=3, warmup=1, progress=False)
    assert result.policy == "rebase" and "compile policy rebase" in result.to_text()
    assert result.encrypted_ms_p50 > 0 and result.plaintext_ms_p50 > 0


# -- tiny Hugging Face exports ----------------------------------------------------------------------

needs_transformers = pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                                        reason="transformers not installed")


def _hf_export(arch: str, tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    try:
        from encoder_streams import export
    finally:
        sys.path.pop(0)
    return export(arch, "legacy17", tmp_path / f"{arch}.onnx")


def _residual(report: dict, path) -> str:
    graph = onnx.load(str(path)).graph
    inputs = {n.input[0] for n in graph.node if n.op_type == "LayerNormalization"}
    classes = {s["basis"] for s in report["spaces"] if inputs & set(s["tensors"])}
    assert classes
    return classes.pop() if len(classes) == 1 else "mixed: " + ", ".join(sorted(classes))


@pytest.mark.slow
@needs_transformers
def test_tiny_vit_residual_is_ones_orthogonal_by_default(tmp_path):
    path = _hf_export("vit", tmp_path)
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    assert result.verification.checked and result.verification.max_relative_error <= 1e-5
    assert _residual(result.report, path) == "ones-orthogonal"
    assert _matmuls(result.server_model) == _matmuls(path)


@pytest.mark.slow
@needs_transformers
def test_tiny_bert_residual_is_ones_orthogonal_under_rebase(tmp_path):
    path = _hf_export("bert", tmp_path)
    default = eecompile.lint_model(path)
    assert _residual(default, path) == "permutation"
    result = eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out",
                                     options=CompileOptions(policy="rebase"))
    assert result.verification.checked and result.verification.max_relative_error <= 1e-5
    assert _residual(result.report, path) == "ones-orthogonal"
    assert _matmuls(result.server_model) == _matmuls(path) + 4  # after the embedding norm and 2 per layer but the last
