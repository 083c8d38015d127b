"""End-to-end compiler tests on the zoo: exactness, report outcomes, keys, determinism."""

from __future__ import annotations

import filecmp
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

pytest.importorskip("torch")
pytest.importorskip("onnxscript")

from eecompile import Client, EncryptedSession, compile_model  # noqa: E402
from eecompile.models import EXPORTERS, ZOO_MODELS, make_feeds, model_config  # noqa: E402
from eecompile.passes.verify import relative_error  # noqa: E402

CASES = [(m, e, o) for m in ZOO_MODELS for e, o in EXPORTERS]
TOLERANCE = 1e-5


def _id(case) -> str:
    return f"{case[0]}-{case[1]}{case[2]}"


def _plain_outputs(session) -> list[str]:
    return [o.name for o in session.get_outputs() if not o.name.startswith("present")]


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_encrypted_session_equals_original(case, zoo, key_a):
    """decrypt(F'(encrypt(x))) = F(x) on fresh random inputs, several seeds."""
    name, exporter, opset = case
    result = zoo.compile(name, exporter, opset, key_a)
    ref = ort.InferenceSession(str(zoo.export(name, exporter, opset)), providers=["CPUExecutionProvider"])
    enc = EncryptedSession(result.out_dir, providers=["CPUExecutionProvider"])
    names = _plain_outputs(ref)
    for seed in (11, 12, 13):
        feeds = make_feeds(name, seed=seed, batch=2, seq=5)
        for n, expected, got in zip(names, ref.run(names, feeds), enc.run(names, feeds)):
            assert got.dtype == expected.dtype
            assert relative_error(expected, got) <= TOLERANCE, f"{n}: seed {seed}"


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[f"{e}{o}" for e, o in EXPORTERS])
def test_llama_decode_steps_with_encrypted_cache(exporter, opset, zoo, key_a):
    """Prefill plus three decode steps that feed the ciphertext present.* back as past.*."""
    result = zoo.compile("llama", exporter, opset, key_a)
    ref = ort.InferenceSession(str(zoo.export("llama", exporter, opset)), providers=["CPUExecutionProvider"])
    enc = EncryptedSession(result.out_dir, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in ref.get_outputs()]
    cfg = model_config("llama")
    rng = np.random.default_rng(5)
    feeds = make_feeds("llama", seed=5, batch=2, seq=4, past=0)
    plain_feeds, enc_feeds = dict(feeds), dict(feeds)
    past = 0
    for step in range(4):
        plain = dict(zip(out_names, ref.run(out_names, plain_feeds)))
        cipher = dict(zip(out_names, enc.run(out_names, enc_feeds)))
        assert relative_error(plain["logits"], cipher["logits"]) <= TOLERANCE, f"step {step}"
        for n in out_names:
            if n.startswith("present"):
                assert not np.allclose(plain[n], cipher[n]), "the cache must stay encrypted on the server"
        past += plain_feeds["input_ids"].shape[1]
        ids = rng.integers(0, cfg["vocab_size"], size=(2, 1)).astype(np.int64)
        common = {"input_ids": ids, "attention_mask": np.ones((2, past + 1), np.int64),
                  "position_ids": np.full((2, 1), past, np.int64)}
        plain_feeds = {**common, **{n.replace("present", "past_key_values"): plain[n] for n in out_names
                                    if n.startswith("present")}}
        enc_feeds = {**common, **{n.replace("present", "past_key_values"): cipher[n] for n in out_names
                                  if n.startswith("present")}}


def _report(zoo, key, name, exporter="dynamo", opset=20) -> dict:
    return json.loads((zoo.compile(name, exporter, opset, key).out_dir / "report.json").read_text())


def _spaces_with(report: dict, tensor: str) -> list[dict]:
    return [s for s in report["spaces"] if tensor in s["tensors"]]


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[f"{e}{o}" for e, o in EXPORTERS])
def test_llama_report_outcomes(exporter, opset, zoo, key_a):
    """Residual: one orthogonal basis; V/O per-head invertible; MLP perm+scales; Q/K complex; vocab permutation."""
    report = _report(zoo, key_a, "llama", exporter, opset)
    cfg = model_config("llama")
    by_basis: dict[str, list[dict]] = {}
    for s in report["spaces"]:
        by_basis.setdefault(s["basis"], []).append(s)
    orthogonal = by_basis.get("orthogonal", [])
    assert len(orthogonal) == 1 and orthogonal[0]["size"] == cfg["hidden"]
    # the residual stream: the embedding output and every residual Add share that one basis
    assert len(orthogonal[0]["tensors"]) >= 2 * cfg["layers"] + 1
    v_spaces = by_basis.get("block-invertible", [])
    assert len(v_spaces) == cfg["layers"]
    assert all(s["blocks"] == cfg["kv_heads"] and s["size"] == cfg["kv_heads"] * cfg["head_dim"] for s in v_spaces)
    complex_spaces = by_basis.get("complex-pairs", [])
    assert len(complex_spaces) == 2 * cfg["layers"]  # q and k per layer, dual per head
    monomial = [s for s in by_basis.get("monomial", []) if s["size"] == cfg["intermediate"]]
    assert len(monomial) == cfg["layers"]  # the up branch carries scales
    gates = [s for s in by_basis.get("permutation", []) if s["size"] == cfg["intermediate"]
             and "input_ids" not in s["tensors"]]
    assert len(gates) == cfg["layers"]
    vocab = _spaces_with(report, "input_ids")
    assert len(vocab) == 1 and vocab[0]["basis"] == "permutation" and "logits" in vocab[0]["tensors"]
    assert not report["unsupported_ops"]
    assert {s["basis"] for s in report["spaces"]} <= {"orthogonal", "block-invertible", "complex-pairs",
                                                      "monomial", "permutation"}


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[f"{e}{o}" for e, o in EXPORTERS])
def test_bert_report_outcomes(exporter, opset, zoo, key_a):
    """Post-LN BERT: permutations on LayerNorm-bound spaces, per-head bases inside attention."""
    report = _report(zoo, key_a, "bert", exporter, opset)
    cfg = model_config("bert")
    residual = [s for s in report["spaces"] if s["size"] == cfg["hidden"] and s["basis"] == "permutation"
                and s["limited_by"] and s["limited_by"]["op_type"] == "LayerNormalization"]
    assert residual, "LayerNorm-bound residual spaces must be permutations"
    per_head = [s for s in report["spaces"] if s["basis"] == "block-invertible" and s["blocks"] == cfg["heads"]]
    assert len(per_head) >= 3 * cfg["layers"]  # q, k (dual of q) and v per layer
    logits = _spaces_with(report, "logits")
    assert logits and logits[0]["basis"] == "invertible"


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[f"{e}{o}" for e, o in EXPORTERS])
def test_cnn_report_outcomes(exporter, opset, zoo, key_a):
    """CNN: channel permutations with positive scales; the image's 3 channels and the logits dense."""
    report = _report(zoo, key_a, "cnn", exporter, opset)
    channel = [s for s in report["spaces"] if s["size"] in (8, 16) and s["tensors"]]
    assert channel and all(s["class"] == "positive-monomial" for s in channel)
    assert _spaces_with(report, "logits")[0]["basis"] == "invertible"
    assert _spaces_with(report, "image")[0]["basis"] == "invertible"


@pytest.mark.parametrize("exporter,opset", EXPORTERS, ids=[f"{e}{o}" for e, o in EXPORTERS])
def test_class_logits_leave_in_a_secret_basis(exporter, opset, zoo, key_a):
    """Dense invertible when nothing follows the last layer; permuted when softmax/argmax follows."""
    assert _spaces_with(_report(zoo, key_a, "mlp", exporter, opset), "logits")[0]["basis"] == "invertible"
    assert _spaces_with(_report(zoo, key_a, "mlp_softmax", exporter, opset), "probs")[0]["basis"] == "permutation"
    argmax = _report(zoo, key_a, "mlp_argmax", exporter, opset)
    assert argmax["outputs"][0]["protection"].startswith("permuted index values")


def _initializers(path) -> dict[str, np.ndarray]:
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


WEIGHT_SLOTS = {"MatMul": 1, "Gemm": 1, "Conv": 1, "Gather": 0}


def _weights(path) -> dict[str, np.ndarray]:
    """Initializers used as weight matrices, kernels or embedding tables."""
    consumed = {n.input[WEIGHT_SLOTS[n.op_type]] for n in onnx.load(str(path)).graph.node
                if n.op_type in WEIGHT_SLOTS}
    return {n: v for n, v in _initializers(path).items() if n in consumed and v.ndim >= 2}


@pytest.mark.parametrize("name", ["mlp", "cnn", "bert", "gpt2", "llama"])
def test_every_weight_is_folded(name, zoo, key_a):
    """Every weight matrix / conv kernel / embedding table of the server differs from the original."""
    original = _initializers(zoo.export(name, "dynamo", 20))
    weights = _weights(zoo.compile(name, "dynamo", 20, key_a).server_model)
    assert weights
    compared = 0
    for n, value in weights.items():
        base = original.get(n) if n in original else original.get(n.split("_g")[0].split("_clone")[0])
        if base is None or base.shape != value.shape:
            continue
        compared += 1
        assert not np.allclose(base, value), f"initializer {n} was not folded"
    assert compared >= len(weights) // 2


@pytest.mark.parametrize("name", ["mlp", "llama"])
def test_second_key_gives_other_weights_and_wrong_outputs(name, zoo, key_a, key_b):
    """A second key changes every weight; the first key's client cannot read its outputs."""
    a = zoo.compile(name, "dynamo", 20, key_a)
    b = zoo.compile(name, "dynamo", 20, key_b, tag="b")
    wa, wb = _weights(a.server_model), _weights(b.server_model)
    matrices = [n for n in wa if n in wb]
    assert matrices and all(not np.allclose(wa[n], wb[n]) for n in matrices)
    feeds = make_feeds(name, seed=21)
    ref = ort.InferenceSession(str(zoo.export(name, "dynamo", 20)), providers=["CPUExecutionProvider"])
    names = _plain_outputs(ref)
    expected = ref.run(names, feeds)
    client_a = Client.load(a.client_dir)
    server_b = ort.InferenceSession(str(b.server_model), providers=["CPUExecutionProvider"])
    mixed = client_a.decrypt(dict(zip(names, server_b.run(names, client_a.encrypt(feeds)))))
    assert relative_error(expected[0], mixed[names[0]]) > 0.1


def test_same_key_gives_byte_identical_artifacts(zoo, key_a, tmp_path):
    """Compiling twice with one key gives the same bytes in every artifact."""
    model = zoo.export("llama", "dynamo", 20)
    first = compile_model(model, key_a, tmp_path / "one")
    second = compile_model(model, key_a, tmp_path / "two")
    files = sorted(p.relative_to(first.out_dir) for p in first.out_dir.rglob("*") if p.is_file())
    assert files
    for rel in files:
        assert filecmp.cmp(first.out_dir / rel, second.out_dir / rel, shallow=False), rel


def test_compile_never_modifies_its_input(zoo, key_a, tmp_path):
    """The input model file is byte-identical after compilation."""
    model = zoo.export("gpt2", "dynamo", 20)
    before = model.read_bytes()
    compile_model(model, key_a, tmp_path / "out")
    assert model.read_bytes() == before


@pytest.mark.parametrize("name,op", [("bert", "Gelu"), ("llama", "Sigmoid"), ("cnn", "MaxPool")])
def test_op_without_rule_compiles_exactly_and_is_reported(name, op, zoo, key_a, tmp_path):
    """Unregistering a rule leaves its spaces clear, names the nodes, and keeps exactness."""
    from eecompile.passes.rules import unregistered

    model = zoo.export(name, "dynamo", 20)
    with unregistered(op):
        result = compile_model(model, key_a, tmp_path / "out")
    reported = {u["op_type"] for u in result.report["unsupported_ops"]}
    assert reported == {op}
    names = {u["node"] for u in result.report["unsupported_ops"]}
    graph_nodes = {n.name for n in onnx.load(str(model)).graph.node if n.op_type == op}
    assert names == graph_nodes
    ref = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    enc = EncryptedSession(result.out_dir, providers=["CPUExecutionProvider"])
    outputs = _plain_outputs(ref)
    feeds = make_feeds(name, seed=31)
    for expected, got in zip(ref.run(outputs, feeds), enc.run(outputs, feeds)):
        assert relative_error(expected, got) <= TOLERANCE


def test_lint_names_a_custom_domain_op(zoo, tmp_path):
    """A custom-domain op between two layers: lint names it and its spaces stay clear."""
    from eecompile import lint_model

    model = onnx.load(str(zoo.export("mlp", "dynamo", 20)))
    relu = next(n for n in model.graph.node if n.op_type == "Relu")
    relu.op_type, relu.domain, relu.name = "MyActivation", "com.example", "custom_act"
    model.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    path = tmp_path / "custom.onnx"
    onnx.save(model, str(path))
    report = lint_model(path)
    assert report["unsupported_ops"] == [{"node": "custom_act", "op_type": "MyActivation", "domain": "com.example"}]
    touched = [s for s in report["spaces"] if s["limited_by"] and s["limited_by"]["node"] == "custom_act"]
    assert touched and all(s["basis"] == "clear" for s in touched)


def _fusions(path, model_type: str, heads: int, hidden: int) -> dict[str, int]:
    from onnxruntime.transformers.optimizer import optimize_model

    stats = optimize_model(str(path), model_type=model_type, num_heads=heads, hidden_size=hidden,
                           opt_level=0).get_fused_operator_statistics()
    return {k: v for k, v in stats.items() if v}


@pytest.mark.parametrize("name,model_type", [("bert", "bert"), ("llama", "gpt2")])
@pytest.mark.parametrize("exporter,opset", [("dynamo", 20), ("legacy", 17)])
def test_ort_transformer_optimizer_finds_the_same_fusions(name, model_type, exporter, opset, zoo, key_a):
    """Folding keeps the graph's topology, so ORT's fusions are found in the encrypted model too."""
    cfg = model_config(name)
    plain = _fusions(zoo.export(name, exporter, opset), model_type, cfg["heads"], cfg["hidden"])
    encrypted = _fusions(zoo.compile(name, exporter, opset, key_a).server_model, model_type,
                         cfg["heads"], cfg["hidden"])
    assert plain, "the plaintext model should have some fusions"
    assert encrypted == plain


def test_large_model_path_streams_weights_and_stays_exact(zoo, key_a, tmp_path, monkeypatch):
    """The external-data emit path (used above 1 GiB) on a small model: exact, scalars keep their rank."""
    import eecompile.compiler as compiler

    monkeypatch.setattr(compiler, "EXTERNAL_DATA_THRESHOLD", 0)
    monkeypatch.setattr(compiler, "INLINE_BYTES", 256)  # zoo weights are small: stream them all
    model = zoo.export("llama", "legacy", 17)  # many scalar constants from the legacy exporter
    result = compile_model(model, key_a, tmp_path / "out")
    data = result.server_model.parent / compiler.DATA_FILE
    assert data.is_file() and data.stat().st_size > 0
    assert result.verification.checked and result.verification.max_relative_error <= TOLERANCE
    served = onnx.load(str(result.server_model), load_external_data=False).graph.initializer
    assert any(not list(t.dims) for t in served), "0-d constants must stay 0-d (ORT rejects [1] in Concat)"
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in served)


def _ir3_model(path):
    """An IR-3 / opset-7 MLP whose initializers are also listed as graph inputs (as IR < 4 requires)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(0)
    weights = {"W1": rng.random((8, 16)), "B1": rng.random(16), "W2": rng.random((16, 4))}
    inits = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in weights.items()]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]), helper.make_node("Add", ["h", "B1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "W2"], ["y"])]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])]
    inputs += [helper.make_tensor_value_info(k, TensorProto.FLOAT, list(v.shape)) for k, v in weights.items()]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)])
    model.ir_version = 3
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def test_ir3_model_with_initializers_as_inputs_compiles(key_a, tmp_path):
    model = _ir3_model(tmp_path / "ir3.onnx")
    before = model.read_bytes()
    result = compile_model(model, key_a, tmp_path / "out")
    assert result.verification.checked
    server = onnx.load(str(result.server_model))
    onnx.checker.check_model(server)
    assert [i.name for i in server.graph.input] == ["x"]  # the weights are folded constants, not inputs
    x = np.random.default_rng(1).random((2, 8), np.float32)
    (want,) = ort.InferenceSession(str(model)).run(None, {"x": x})
    (got,) = EncryptedSession(result.out_dir).run(None, {"x": x})
    assert relative_error(got, want) < TOLERANCE
    assert model.read_bytes() == before


def test_compile_prints_no_onnx_runtime_warnings(zoo, tmp_path):
    """Constant folding and verification run ONNX Runtime sessions; their optimizer notes
    ("UnsqueezeElimination cannot remove node ...") are not the user's concern (issue 9, item 12)."""
    import subprocess
    import sys

    from eecompile.cli import main

    key = tmp_path / "k.key"
    assert main(["keygen", str(key)]) == 0
    model = zoo.export("llama", "legacy", 17)
    proc = subprocess.run([sys.executable, "-m", "eecompile", "compile", str(model), "--key", str(key), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    proc = subprocess.run([sys.executable, "-m", "eecompile", "lint", str(model)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
