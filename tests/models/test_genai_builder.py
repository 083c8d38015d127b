"""ONNX Runtime GenAI's model builder output, compiled and served by the stock runtime on ciphertext (issue 10).

For each architecture × precision (``-p fp32`` / ``-p int4 -e cpu``; tiny random checkpoints): compile
verifies exactly against the same builder model (int4: the original int4 model, grid-keeping bases), no
activation or KV-cache output of the server equals the plaintext run, and ``og.Generator`` on the
compiled folder — fed client-encrypted prompt ids — generates, once decrypted, exactly what it generates
on the original folder from the plaintext ids: greedy for 32 tokens, and seeded sampling.
Llama fp32/int4 run by default (CI); the other architectures are marked slow.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from eecompile.models import hf_decoders as hd
from eecompile.runtime.generate import GenerationClient

og = pytest.importorskip("onnxruntime_genai")

ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "granite")
DEFAULT_RUN = {("llama", "fp32"), ("llama", "int4")}
PROMPT = [1, 17, 42, 99, 5, 200, 33]


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
def checkpoints(tmp_path_factory):
    """``checkpoints(arch)``: a tiny random checkpoint with a tokenizer, built once per module."""
    root = tmp_path_factory.mktemp("genai")
    made: dict[str, Path] = {}

    def _get(arch: str) -> Path:
        if arch not in made:
            made[arch] = hd.build_checkpoint(arch, root / arch)
            _tokenizer(made[arch])
        return made[arch]
    return _get


def _build(checkpoint: Path, out: Path, precision: str) -> Path:
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint),
                           "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.parent / f"cache-{precision}")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "model.onnx"


CASES = [pytest.param(arch, precision, id=f"{arch}-{precision}",
                      marks=() if (arch, precision) in DEFAULT_RUN else pytest.mark.slow)
         for arch in ARCHS for precision in ("fp32", "int4")]


@pytest.mark.parametrize("arch,precision", CASES)
def test_builder_model_served_by_stock_runtime_on_ciphertext(arch, precision, checkpoints, tmp_path):
    from eecompile.genai import genai_generate, run_generator

    model = _build(checkpoints(arch), tmp_path / precision, precision)
    from eecompile.cli import main

    out, key = tmp_path / "out", tmp_path / "key"
    assert main(["keygen", str(key)]) == 0
    assert main(["compile", str(model), "--key", str(key), "--out", str(out)]) == 0  # as a user runs it
    report = json.loads((out / "report.json").read_text())
    verification = report["verification"]
    assert verification["checked"] and verification["max_relative_error"] <= 1e-5, verification
    assert "decode step" in verification["detail"]
    assert report["unsupported_ops"] == []
    assert report["validity"].startswith("onnx.checker + ONNX Runtime op registry")
    exposure = report["exposure"]
    assert exposure["checked"] and exposure["intermediates_compared"] > 0
    assert exposure["intermediates_exposed"] == 0, exposure["exposed"]
    assert exposure["state_outputs_compared"] == 2 * hd.LAYERS and exposure["state_outputs_exposed"] == 0
    for io in report["outputs"]:  # logits permuted, every KV-cache output ciphertext
        assert io["protection"] != "clear", io
    if precision == "int4":
        assert any(p.startswith("quantised weights kept on their grid") for p in report["policies"])

    # The server folder is what og.Model loads; the special ids in its config are the server's.
    server = out / "server"
    assert sorted(p.name for p in server.iterdir()) in (["genai_config.json", "model.onnx"],
                                                          ["genai_config.json", "model.onnx", "model.onnx.data"])
    source = json.loads((model.parent / "genai_config.json").read_text())
    served = json.loads((server / "genai_config.json").read_text())
    client = GenerationClient.load(out / "client")
    assert served["model"]["eos_token_id"] == client.encrypt_ids([source["model"]["eos_token_id"]])[0]
    assert served["model"]["pad_token_id"] == client.encrypt_ids([source["model"]["pad_token_id"]])[0]
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        served["model"].pop(key), source["model"].pop(key)
    assert served == source  # nothing else in it derives from the key
    assert (out / "client" / "tokenizer.json").is_file()

    greedy = genai_generate(out, PROMPT, 32)
    assert greedy.prompt_wire_ids == client.encrypt_ids(PROMPT) != PROMPT
    assert greedy.plain_ids == run_generator(model.parent, PROMPT, 32) and len(greedy.plain_ids) == 32
    assert greedy.wire_ids != greedy.plain_ids  # the server produced ciphertext ids
    for seed, top_k in ((7, None), (11, 5)):
        sampled = genai_generate(out, PROMPT, 32, temperature=0.8, top_k=top_k, seed=seed)
        assert sampled.plain_ids == run_generator(model.parent, PROMPT, 32, temperature=0.8, top_k=top_k, seed=seed)


def test_generate_cli_runs_the_stock_runtime(checkpoints, tmp_path):
    """``eecompile generate OUT --runtime genai``: ids in, the decrypted ids out, equal to plaintext genai."""
    from eecompile.cli import main
    from eecompile.genai import run_generator

    model = _build(checkpoints("llama"), tmp_path / "fp32", "fp32")
    key = tmp_path / "key"
    assert main(["keygen", str(key)]) == 0
    out = tmp_path / "out"
    assert main(["compile", str(model), "--key", str(key), "--out", str(out)]) == 0
    proc = subprocess.run([sys.executable, "-m", "eecompile", "generate", str(out), "--runtime", "genai",
                           "--prompt-ids", " ".join(map(str, PROMPT)), "--max-new-tokens", "16"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert [int(t) for t in proc.stdout.split()] == run_generator(model.parent, PROMPT, 16)
    text = subprocess.run([sys.executable, "-m", "eecompile", "generate", str(out), "--runtime", "genai",
                           "--prompt", "t5 t9 t33", "--max-new-tokens", "4"], capture_output=True, text=True, timeout=300)
    assert text.returncode == 0 and len(text.stdout.split()) == 4 and all(t.startswith("t") for t in text.stdout.split())


def test_generate_genai_on_a_folder_without_config_is_one_line(tmp_path):
    from eecompile.errors import BundleError
    from eecompile.genai import genai_generate

    (tmp_path / "server").mkdir()
    with pytest.raises(BundleError, match="has no genai_config.json"):
        genai_generate(tmp_path, [1, 2], 4)
