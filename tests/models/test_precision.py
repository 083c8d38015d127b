"""Reduced precision end to end: tiny random Hugging Face models in float16 / bfloat16, exported with torch.onnx,
compiled and verified with the tolerance their precision and depth give (:mod:`eecompile.passes.precision`).

Every case checks: compile verifies (report.json says checked, the dtype, the tolerance and its formula), the
verified error is the compiled model's (non-zero, within the tolerance) and so is the error on fresh inputs
measured here, the server's weights keep the model's type, and ``EncryptedSession`` returns the model's type.
CI runs the float16 BERT (dynamo, default opset) and the wrong-fold hook on it; the rest is ``slow``.

    python -m pytest tests/models/test_precision.py -m slow -q
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
UNIT_ROUNDOFF = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}


def _require() -> None:
    for module in ("torch", "transformers", "onnxscript"):
        if importlib.util.find_spec(module) is None:
            if IN_CI:
                pytest.fail(f"CI=true but '{module}' is not installed", pytrace=False)
            pytest.skip(f"'{module}' is not installed (pip install -e '.[dev]')")


def build(arch: str):
    """A tiny random-weight model, its example inputs and their names."""
    import torch
    from transformers import (BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, ResNetConfig, ResNetModel,
                              ViTConfig, ViTModel)

    torch.manual_seed(0)
    if arch == "bert":
        inner = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64))

        class Outputs(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids, attention_mask):
                out = self.inner(input_ids=input_ids, attention_mask=attention_mask)
                return out.last_hidden_state, out.pooler_output

        return Outputs(inner), (torch.randint(0, 100, (1, 8)), torch.ones(1, 8, dtype=torch.long)), \
            ["input_ids", "attention_mask"]
    if arch == "vit":
        return ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  image_size=16, patch_size=8)), (torch.randn(1, 3, 16, 16),), ["pixel_values"]
    if arch == "resnet":
        return ResNetModel(ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic")), \
            (torch.randn(1, 3, 32, 32),), ["pixel_values"]
    if arch == "llama":
        inner = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))

        class Logits(torch.nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner

            def forward(self, input_ids):
                return self.inner(input_ids=input_ids, use_cache=False).logits

        return Logits(inner), (torch.randint(0, 128, (1, 8)),), ["input_ids"]
    raise ValueError(arch)


def export(arch: str, dtype: str, exporter: str, path: Path) -> Path:
    """``arch`` in ``dtype`` (float16/bfloat16) exported by ``exporter`` (dynamo: default opset; legacy17)."""
    import torch

    warnings.filterwarnings("ignore")
    model, args, names = build(arch)
    cast = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    model = model.eval().to(cast)
    args = tuple(a.to(cast) if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        if exporter == "legacy17":
            torch.onnx.export(model, args, str(path), dynamo=False, opset_version=17, input_names=names)
        else:
            torch.onnx.export(model, args, str(path), dynamo=True, input_names=names)
    return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    cache: dict[tuple, Path] = {}

    def get(arch: str, dtype: str, exporter: str) -> Path:
        _require()
        key = (arch, dtype, exporter)
        if key not in cache:
            cache[key] = export(arch, dtype, exporter, root / f"{arch}-{dtype}-{exporter}.onnx")
        return cache[key]

    return get


def _float_types(model: onnx.ModelProto) -> set[int]:
    floats = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE}
    return {t.data_type for t in model.graph.initializer if t.data_type in floats and math.prod(t.dims) > 1}


def check_compile(model_path: Path, out: Path, dtype: str) -> dict:
    """Compile, then check everything the module docstring lists; returns the measured numbers."""
    import onnxruntime as ort

    import eecompile
    from eecompile.passes.verify import feeds_for, relative_error, symbols_of

    result = eecompile.compile_model(model_path, eecompile.generate_key(), out)
    v = result.verification
    report = json.loads((out / "report.json").read_text())
    tol = report["verification"]["tolerance"]
    assert v.checked and report["verification"]["checked"], v.detail
    assert tol["dtype"] == dtype and tol["value"] == pytest.approx(
        max(1e-4, 2 * UNIT_ROUNDOFF[dtype] * math.sqrt(tol["depth"])))
    assert "verification tolerance: " in (out / "report.md").read_text()
    assert 0 < v.max_relative_error <= tol["value"], v.detail  # the compiled model's error, not zero
    original = onnx.load(str(model_path), load_external_data=False)
    server = onnx.load(str(out / "server" / "model.onnx"), load_external_data=False)
    elem = {"float16": onnx.TensorProto.FLOAT16, "bfloat16": onnx.TensorProto.BFLOAT16}[dtype]
    assert elem in _float_types(server) and _float_types(server) <= _float_types(original)  # weights keep the type
    fresh = None
    if dtype == "float16":  # independent inputs (bfloat16 does not run on ONNX Runtime's CPU provider)
        ref = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        enc = eecompile.EncryptedSession(out, providers=["CPUExecutionProvider"])
        index = {t.name: t.index.size for t in enc.client.spec.inputs if t.kind == "index"}
        symbols = symbols_of(ref, v.feeds[0])
        fresh = 0.0
        for seed in (101, 102, 103):
            feeds = feeds_for(ref, symbols, seed, index)
            expected, got = ref.run(None, feeds), enc.run(None, feeds)
            for e, g in zip(expected, got):
                assert g.dtype == e.dtype and g.shape == e.shape
                fresh = max(fresh, relative_error(e, g))
        assert 0 < fresh <= tol["value"]
    return {"error": v.max_relative_error, "fresh": fresh, "tolerance": tol["value"], "depth": tol["depth"],
            "detail": v.detail}


def test_fp16_bert_dynamo_compiles_and_verifies(exports, tmp_path):
    """The issue's case: an fp16 BERT (dynamo) was reported as 0 error; its error is real and within the bound."""
    print(f"bert float16 dynamo: {check_compile(exports('bert', 'float16', 'dynamo'), tmp_path / 'out', 'float16')}")


def test_fp16_bert_wrong_fold_is_caught(exports, tmp_path, monkeypatch):
    """The test hook: the last MatMul weight, perturbed element-wise by 3x the tolerance (random signs) while folding,
    makes compile refuse with the tolerance named."""
    import eecompile
    from eecompile.passes.context import FoldContext
    from eecompile.passes.precision import verification_tolerance
    from eecompile.passes.store import load_structure
    from eecompile.passes.verify import VerificationError

    path = exports("bert", "float16", "dynamo")
    structure = load_structure(path)
    tol = verification_tolerance(structure, 1e-4).value
    weights = {t.name for t in structure.graph.initializer}
    target = [n.name for n in structure.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights][-1]
    original, fired = FoldContext.set_const, []

    def perturbed(self, node, index, value):
        if node.name == target and index == 1:
            signs = np.random.default_rng(0).choice([-1.0, 1.0], np.shape(value))
            value = np.asarray(value, np.float64) * (1 + 3 * tol * signs)
            fired.append(node.name)
        return original(self, node, index, value)

    monkeypatch.setattr(FoldContext, "set_const", perturbed)
    with pytest.raises(VerificationError, match=r"differs from the original .*> tolerance .* for float16") as caught:
        eecompile.compile_model(path, eecompile.generate_key(), tmp_path / "out")
    print(f"bert float16 dynamo, {target} perturbed by 3x the tolerance: {caught.value}")
    assert fired == [target]


SLOW_CASES = [("bert", "float16", "legacy17"), ("vit", "float16", "dynamo"), ("vit", "float16", "legacy17"),
              ("resnet", "float16", "dynamo"), ("resnet", "float16", "legacy17"), ("llama", "float16", "dynamo"),
              ("llama", "bfloat16", "dynamo")]
XFAIL = {("bert", "float16", "legacy17"): "the legacy exporter writes an fp16 LayerNormalization with float32 "
                                          "scale/bias, which ONNX Runtime refuses to load (the original, not ours)"}


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype, exporter", SLOW_CASES, ids=["-".join(c) for c in SLOW_CASES])
def test_reduced_precision_model(exports, tmp_path, arch, dtype, exporter):
    if (arch, dtype, exporter) in XFAIL:
        pytest.xfail(XFAIL[(arch, dtype, exporter)])
    measured = check_compile(exports(arch, dtype, exporter), tmp_path / "out", dtype)
    if dtype == "bfloat16":
        assert "float32 activations" in measured["detail"]  # what was run instead is stated
    print(f"{arch} {dtype} {exporter}: {measured}")
