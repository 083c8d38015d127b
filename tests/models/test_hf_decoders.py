"""Tiny Hugging Face decoders (eecompile.models.hf_decoders) and the decoder-matrix helpers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from eecompile.models import hf_decoders as hd

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "decoder_matrix.py"


def _matrix():
    spec = importlib.util.spec_from_file_location("decoder_matrix", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# --- pure helpers (fast) ----------------------------------------------------------------


@pytest.mark.parametrize("arch", hd.ARCHS)
def test_tiny_config_is_tiny(arch):
    cfg = hd.tiny_config(arch)
    assert cfg["model_type"]
    assert cfg["vocab_size"] == hd.VOCAB and 256 <= hd.VOCAB <= 512
    assert all(cfg[k] < cfg["vocab_size"] for k in ("pad_token_id", "bos_token_id", "eos_token_id"))
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    assert hidden == 64 and heads == 4 and hidden // heads == 16
    assert cfg.get("num_hidden_layers", cfg.get("n_layer")) == 2
    assert cfg.get("intermediate_size", cfg.get("n_inner", cfg.get("ffn_dim"))) == 128
    dims = hd.model_dims(arch)
    assert dims["kv_heads"] in (2, 4) and dims["head_dim"] == 16


def test_config_is_a_copy():
    hd.tiny_config("llama")["hidden_size"] = 1
    assert hd.tiny_config("llama")["hidden_size"] == 64


def test_names_and_paths(tmp_path):
    assert len(hd.ARCHS) == 11 and hd.EXPORTERS == ("optimum", "dynamo20", "dynamo23", "legacy17")
    assert hd.export_path(tmp_path, "phi3", "legacy17") == tmp_path / "phi3" / "legacy17" / "model.onnx"
    assert hd.checkpoint_dir(tmp_path, "opt") == tmp_path / "opt" / "checkpoint"
    with pytest.raises(ValueError, match="unknown architecture"):
        hd.tiny_config("bloom")
    with pytest.raises(ValueError, match="unknown exporter"):
        hd.export_path(tmp_path, "llama", "tflite")


def test_error_line():
    assert hd.error_line(RuntimeError("\n  first line\nsecond")) == "RuntimeError: first line"
    assert len(hd.error_line(ValueError("x" * 1000))) == 300


def test_recorded_failure_is_not_retried(tmp_path):
    err = hd.export_path(tmp_path, "llama", "dynamo20").parent / "export_error.txt"
    err.parent.mkdir(parents=True)
    err.write_text("RuntimeError: boom\n")
    result = hd.export_one(tmp_path, "llama", "dynamo20")
    assert result.path is None and result.error == "RuntimeError: boom" and result.cached


def test_perturb_parameters_makes_every_parameter_distinct():
    torch = pytest.importorskip("torch")
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 8))
    with torch.no_grad():
        model[0].weight.copy_(model[2].weight)
    assert hd.perturb_parameters(model, seed=1) == 6
    gain = model[1].weight.detach().numpy()
    assert not np.allclose(gain, 1.0) and np.abs(gain - 1).max() < 1.0
    assert not np.allclose(model[0].weight.detach().numpy(), model[2].weight.detach().numpy())
    assert not np.allclose(model[1].bias.detach().numpy(), 0.0)


def test_graph_facts_tags_attention_and_taint():
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    m = _matrix()
    nodes = [
        helper.make_node("MatMul", ["q", "kt"], ["scores"]),
        helper.make_node("Div", ["scores", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["masked"]),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "v"], ["ctx"]),
        helper.make_node("Shape", ["q"], ["q_shape"]),
        helper.make_node("Cast", ["m"], ["mask"], to=TensorProto.FLOAT),
    ]
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info(n, f, None) for n in ("q", "kt", "v")]
        + [helper.make_tensor_value_info("m", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("ctx", f, None)],
        [numpy_helper.from_array(np.array(4.0, np.float32), "scale")])
    facts = m._graph_facts(helper.make_model(graph), secret_inputs={"q", "kt", "v"})
    assert {"scores", "scaled", "masked", "probs"} <= facts["attention"]
    assert "ctx" not in facts["attention"]
    assert facts["taint"]["mask"] == "clear-input" and facts["taint"]["q_shape"] == "clear-input"
    assert facts["taint"]["ctx"] == "secret" and facts["taint"]["scale"] == "constant"
    assert facts["producer"]["probs"] == "Softmax"


def test_relative_error_and_embedding_output(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    m = _matrix()
    assert m.relative_error(np.array([1.0, -2.0]), np.array([1.0, -2.2])) == pytest.approx(0.1)
    assert m.relative_error(np.zeros(2), np.zeros(3)) == float("inf")
    table = numpy_helper.from_array(np.ones((256, 64), np.float32), "E")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["E", "input_ids"], ["emb"])], "g",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", "s", 64])], [table])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    assert m.embedding_output(path, 256) == "emb"
    assert m.embedding_output(path, 512) is None


def test_gpt2_keeps_tied_head_and_phi3_keeps_fused_qkv():
    pytest.importorskip("transformers")
    gpt2 = hd.build_model("gpt2")
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    phi3 = hd.build_model("phi3")
    names = {n for n, _ in phi3.named_parameters()}
    assert "model.layers.0.self_attn.qkv_proj.weight" in names
    neox = hd.build_model("gpt_neox")
    assert any("query_key_value" in n for n, _ in neox.named_parameters())


# --- building and exporting one architecture (slow) -------------------------------------


@pytest.mark.slow
def test_build_and_export_llama_dynamo20(tmp_path):
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    result = hd.export_one(tmp_path, "llama", "dynamo20")
    assert result.path and result.error is None, result.error
    again = hd.export_one(tmp_path, "llama", "dynamo20")
    assert again.cached and again.path == result.path
    model = hd.load_model("llama", hd.checkpoint_dir(tmp_path, "llama"))
    ids = np.random.default_rng(0).integers(0, hd.VOCAB, size=(3, 6), dtype=np.int64)
    mask = np.ones_like(ids)
    sess = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_cell_summary_greedy_column():
    m = _matrix()
    base = {"arch": "llama", "exporter": "optimum", "export": {"path": "m.onnx"}, "compile": {"rc": 0},
            "report": {"verification": {"checked": True, "max_relative_error": 1e-7}}, "exact": {"error": "x"},
            "exposure": {"error": "y"}}
    assert m.cell_summary(base)["greedy"] == "—"
    assert m.cell_summary({**base, "greedy": {"rc": 0, "equal": True}})["greedy"] == "equal"
    assert m.cell_summary({**base, "greedy": {"rc": 0, "equal": False}})["greedy"] == "**DIFF**"
    failed = m.cell_summary({**base, "greedy": {"rc": 2, "equal": False, "last_stderr": "eecompile: error: no"}})
    assert failed["greedy"] == "rc 2" and "eecompile generate: eecompile: error: no" in failed["status"]


def test_results_section_replaces_its_own_block(tmp_path):
    m = _matrix()
    row = {"arch": "llama", "exporter": "optimum", "export": {"path": "m.onnx"}, "compile": {"rc": 0},
           "report": {"verification": {"checked": True, "max_relative_error": 1e-7},
                      "residual": {"basis": "orthogonal", "size": 64}},
           "exact": {"max_rel_err": 2e-7, "decode_steps": 2, "batch": 2},
           "exposure": {"exposed_secret": 0, "compared_float": 10, "matched_names": 10, "intermediates": 12,
                        "exposed_attention": 1, "exposed_clear_input": 0, "present_equal": 0, "present_total": 4},
           "greedy": {"rc": 0, "equal": True}}
    legacy = {**row, "exporter": "legacy17", "exact": {"max_rel_err": 2e-7, "decode_steps": 0, "batch": 2}}
    meta = {"commit": "abc123", "date": "2026-12-02 00:00", "torch": "2.13", "onnxruntime": "1.32"}
    section = m.results_section([row, legacy], meta, "python benchmarks/decoder_matrix.py --out X")
    assert "| llama | optimum | 0 | yes / 1.0e-07 | yes 2.0e-07 (+2 dec) | 0/10 | 0/4 | orthogonal (64) = legacy | equal |" \
        in section
    assert "commit `abc123`" in section and "of which ≤ 1e-5: 2" in section
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Other\n\ntext\n")
    m.update_results_md(path, section)
    m.update_results_md(path, section.replace("abc123", "def456"))
    text = path.read_text()
    assert text.count(m.SECTION_START) == 1 and "def456" in text and "abc123" not in text
    assert text.startswith("# Benchmark results\n\n## Other\n\ntext\n")
