"""``eecompile serve`` and the serving folder description: bad input is one line and exit status 2.

Run as subprocesses: the serving process imports MLServer, which cannot share a process with
``tritonclient.grpc`` (the other serving tests import it)."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from eecompile.serve.interface import ServeError, describe


def _serve(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "eecompile", "serve", *argv], capture_output=True, text=True,
                          timeout=timeout)


def _one_line(proc: subprocess.CompletedProcess, fragment: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("eecompile: serving ")]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("eecompile: error: ") and fragment in lines[0], proc.stderr


def test_describe_names_the_ciphertext_tensors_and_the_bundle_id(bert_out, lm_out):
    from eecompile.runtime.client import Client

    bert = describe(bert_out / "server")
    assert bert.model_id == Client.load(bert_out / "client").model_id and not bert.is_decoder
    assert [(t.name, t.datatype, t.shape, t.dims) for t in bert.inputs] == [
        ("input_ids", "INT64", (-1, -1), ("batch", "sequence")),
        ("attention_mask", "INT64", (-1, -1), ("batch", "sequence"))]
    lm = describe(lm_out / "server")
    assert lm.is_decoder and lm.outputs[0].name == "logits" and lm.outputs[0].shape[-1] == 2048


def test_describe_bad_folders(bert_out, tmp_path):
    with pytest.raises(ServeError, match="no server folder at"):
        describe(tmp_path / "nothing")
    with pytest.raises(ServeError, match=r"give OUT/server, not OUT"):
        describe(bert_out)
    (tmp_path / "model.onnx").write_bytes(b"not a model")
    with pytest.raises(ServeError, match="cannot read .* as an ONNX model"):
        describe(tmp_path)


def test_serve_bad_folder(serve_extra, bert_out, tmp_path):
    _one_line(_serve(str(tmp_path / "missing")), "no server folder at")
    _one_line(_serve(str(bert_out)), "give OUT/server, not OUT")


def test_serve_bad_options(serve_extra, bert_out):
    _one_line(_serve(str(bert_out / "server"), "--http-port", "70000"), "--http-port must be a port")
    _one_line(_serve(str(bert_out / "server"), "--http-port", "18123", "--grpc-port", "18123"), "give two ports")
    _one_line(_serve(str(bert_out / "server"), "--workers", "-1"), "--workers must be >= 0")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _one_line(_serve(str(bert_out / "server"), "--http-port", str(port), "--grpc-port", "0"),
                  f"cannot listen on 127.0.0.1:{port} for HTTP")


def test_serve_cuda_without_cuda_is_one_line(serve_extra, bert_out):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    _one_line(_serve(str(bert_out / "server"), "--provider", "cuda", "--http-port", "0", "--grpc-port", "0"),
              "the CUDA provider was requested")
