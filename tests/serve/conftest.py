"""Fixtures for the serving tests: compiled zoo BERT and tinylm, and ``eecompile serve`` on loopback.

The server always runs in a subprocess (``python -m eecompile serve ... --http-port 0
--grpc-port 0``): MLServer and ``tritonclient.grpc`` register the same protobuf names and
cannot share the test process. The fixture reads the ports from the server's ready line and
stops it with SIGTERM (then SIGKILL) at the end, so no test leaves a server running.
"""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

READY = re.compile(r"on http://(?P<host>[^:]+):(?P<http>\d+) and grpc [^:]+:(?P<grpc>\d+); ready")


def _need_serve_extra() -> None:
    missing = [m for m in ("mlserver", "tritonclient") if importlib.util.find_spec(m) is None]
    if missing:
        message = f"the [serve] extra is not installed ({', '.join(missing)} missing)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + "; CI installs it (.ci/run)")
        pytest.skip(message)


@dataclass
class Server:
    """A running ``eecompile serve``: its process, ports and everything it wrote (stderr and stdout, in order)."""

    proc: subprocess.Popen
    host: str
    http_port: int
    grpc_port: int
    log: list[str] = field(default_factory=list)

    @property
    def http(self) -> str:
        """``http://host:port``."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def grpc(self) -> str:
        """``grpc://host:port``."""
        return f"grpc://{self.host}:{self.grpc_port}"

    def url(self, protocol: str) -> str:
        """The URL for ``protocol`` (grpc or http)."""
        return self.grpc if protocol == "grpc" else self.http

    def rss_bytes(self) -> int:
        """Resident memory of the server process (Linux /proc)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None


def start_server(server_dir: Path, *args: str, timeout: float = 90.0) -> Server:
    """Start ``eecompile serve server_dir`` on free loopback ports; return once it says it is ready."""
    cmd = [sys.executable, "-m", "eecompile", "serve", str(server_dir), "--http-port", "0", "--grpc-port", "0",
           "--provider", "cpu", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # MLServer logs to stdout
    log: list[str] = []
    found: dict = {}
    ready = threading.Event()

    def reader() -> None:
        for line in proc.stdout:
            log.append(line)
            match = READY.search(line)
            if match and not ready.is_set():
                found.update(match.groupdict())
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    if not ready.wait(timeout) or not found:
        stop_server(proc)
        raise AssertionError("eecompile serve did not become ready:\n" + "".join(log[-40:]))
    return Server(proc, found["host"], int(found["http"]), int(found["grpc"]), log)


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM, then SIGKILL after 20 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="session")
def serve_extra() -> None:
    """Skip (fail under CI) without MLServer and tritonclient."""
    _need_serve_extra()


@pytest.fixture(scope="session")
def bert_out(zoo, key_a) -> Path:
    """OUT of the zoo BERT-style classifier compiled with key a."""
    return zoo.compile("bert", "dynamo", 20, key_a).server_model.parent.parent


@pytest.fixture(scope="session")
def bert_other_out(zoo, key_b) -> Path:
    """The same model compiled with key b: another compilation, another model id."""
    return zoo.compile("bert", "dynamo", 20, key_b, tag="b").server_model.parent.parent


@pytest.fixture(scope="session")
def lm_out(tmp_path_factory, key_a) -> Path:
    """OUT of the shipped trained tinylm compiled with its tokenizer."""
    pytest.importorskip("tokenizers")
    from eecompile import compile_model
    from eecompile.models import tinylm
    from eecompile.runtime.generate import model_context_length
    from eecompile.runtime.tokenizer import add_tokenizer_to_bundle

    onnx_path, tok_path, _ = tinylm.load_tinylm()
    out = tmp_path_factory.mktemp("serve-lm") / "out"
    result = compile_model(onnx_path, key_a, out)
    add_tokenizer_to_bundle(tok_path, result.client_dir, max_positions=model_context_length(onnx_path))
    return out


@pytest.fixture(scope="module")
def bert_server(serve_extra, bert_out):
    """``eecompile serve`` of the compiled BERT (request limit 1 MiB, for the oversized-body test)."""
    server = start_server(bert_out / "server", "--name", "bert", "--max-request-mb", "1")
    yield server
    stop_server(server.proc)


@pytest.fixture(scope="module")
def lm_server(serve_extra, lm_out):
    """``eecompile serve`` of the compiled tinylm: NAME (single pass) and NAME-generate (streamed)."""
    server = start_server(lm_out / "server", "--name", "tinylm")
    yield server
    stop_server(server.proc)

