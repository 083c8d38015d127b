"""``eecompile demo``: runs on the embedded model (no torch) and shows exact, encrypted inference."""

from __future__ import annotations

import io
import re

import numpy as np
import onnx
import onnxruntime as ort

from eecompile.demo import VOCAB, build_demo_model, run_demo


def test_demo_model_is_valid_and_runs_at_any_length():
    model = build_demo_model()
    onnx.checker.check_model(model, full_check=True)
    names = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    arrays = [onnx.numpy_helper.to_array(i).tobytes() for i in model.graph.initializer
              if i.data_type == onnx.TensorProto.FLOAT]
    assert len(set(arrays)) == len(arrays) == len(names)  # every parameter distinct
    assert {"Gelu", "LayerNormalization", "Softmax", "Gather"} <= {n.op_type for n in model.graph.node}
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch, seq in ((1, 1), (3, 7), (2, 16)):
        ids = np.random.default_rng(seq).integers(0, VOCAB, (batch, seq), dtype=np.int64)
        (logits,) = session.run(None, {"input_ids": ids})
        assert logits.shape == (batch, seq, VOCAB)
        assert np.isfinite(logits).all()


def test_demo_model_is_deterministic():
    assert build_demo_model().SerializeToString() == build_demo_model().SerializeToString()


def test_run_demo_reports_exact_encrypted_inference():
    stream = io.StringIO()
    assert run_demo(stream, seed=3) == 0
    text = stream.getvalue()
    diff = re.search(r"max abs difference, decrypted vs original: (\S+)", text)
    assert diff, text
    assert float(diff.group(1)) <= 1e-4
    plain = re.search(r"plaintext token ids \(you\): +([\d ]+)$", text, re.M)
    cipher = re.search(r"ciphertext token ids \(the server saw\): +([\d ]+)$", text, re.M)
    assert plain and cipher, text
    plain_ids, cipher_ids = plain.group(1).split(), cipher.group(1).split()
    assert len(plain_ids) == len(cipher_ids) > 1
    assert plain_ids != cipher_ids
    assert "verification" in text or "self-check" in text
    assert "input input_ids: permuted index values" in text
    assert "Traceback" not in text
