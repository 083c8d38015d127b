"""ONNX Runtime GenAI's model builder output compiles (issue 10): a tiny random Llama, fp32 and int4 (CPU).

The builder writes ONNX Runtime ops (SimplifiedLayerNormalization in the default domain, com.microsoft
SkipSimplifiedLayerNormalization, GroupQueryAttention, MatMulNBits for int4). Loading accepts them through
ONNX Runtime's op registry, the norms and quantised weights have rules, and the compiled model verifies
exactly (prefill and a decode step). GroupQueryAttention has no rule yet: its spaces (and the KV cache)
stay clear, which the report says.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import eecompile
from eecompile.keys import MasterKey
from eecompile.models import hf_decoders as hd

pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.slow


def _tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the tiny vocabulary (the builder copies one into its output)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, hd.VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<pad>").save_pretrained(str(directory))


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> Path:
    directory = hd.build_checkpoint("llama", tmp_path_factory.mktemp("genai") / "checkpoint")
    _tokenizer(directory)
    return directory


def _build(checkpoint: Path, out: Path, precision: str) -> Path:
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint),
                           "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / f"cache-{precision}")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "model.onnx"


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_builder_output_compiles_exactly(precision, llama_checkpoint, tmp_path):
    model = _build(llama_checkpoint, tmp_path / precision, precision)
    head_size = json.loads((model.parent / "genai_config.json").read_text())["model"]["decoder"]["head_size"]
    # A fixed key keeps the run reproducible. (int4 MatMulNBits quantise activations to int8, accuracy_level 4:
    # verification compares those nodes with float activations, see verify._verification_session.)
    key = MasterKey(bytes(range(32)))
    result = eecompile.compile_model(model, key, tmp_path / "out")  # kv_cache_dim from genai_config.json
    report = result.report
    assert f"kv_cache_dim={head_size}" in report["verification"]["detail"]
    assert report["verification"]["checked"] and report["verification"]["max_relative_error"] <= 1e-5
    assert report["validity"].startswith("onnx.checker + ONNX Runtime op registry (ops onnx.checker does not "
                                         "know: SimplifiedLayerNormalization, com.microsoft::GroupQueryAttention")
    assert report["server_validity"] == report["validity"]
    assert {u["op_type"] for u in report["unsupported_ops"]} == {"GroupQueryAttention"}
    residual = next(s for s in report["spaces"] if "/model/embed_tokens/Gather/output_0" in s["tensors"])
    if precision == "fp32":
        assert residual["basis"] == "orthogonal"  # one dense basis on the whole residual stream
        assert "/model/layers.0/post_attention_layernorm/output_3" in residual["tensors"]
    else:
        assert residual["basis"] == "permutation" and residual["blocks"] == hd.HIDDEN // 32  # int4 blocks of 32
        assert any(p.startswith("quantised weights kept on their grid") for p in report["policies"])
        assert any("int8 (accuracy_level 4)" in p for p in report["policies"])
        assert "MatMulNBits node(s) compared with float activations" in report["verification"]["detail"]
    assert next(o for o in report["outputs"] if o["name"] == "logits")["protection"] != "clear"
