"""Streamed generation on ``eecompile serve`` with the trained tinylm: RemoteGenerator (gRPC and HTTP) equals
the in-process EncryptedGenerator token for token, 8 concurrent streams of 64 tokens, bad input refused
with a protocol error, and 100 aborted streams leave no cache behind (state count and server memory)."""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest


PROTOCOLS = ("grpc", "http")
PROMPTS = ["And God said", "In the beginning", "The LORD is my shepherd", "Blessed are the meek",
           "And it came to pass", "Thus saith the LORD", "Let there be light", "Honour thy father"]


@pytest.fixture(scope="module")
def local(lm_out):
    """The in-process reference (CPU, as the server)."""
    from eecompile.runtime.generate import EncryptedGenerator

    return EncryptedGenerator(lm_out, "cpu")


def wait_until(predicate, timeout: float = 20.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not predicate():
        time.sleep(0.05)
    return predicate()


def _metadata(server) -> dict:
    with urllib.request.urlopen(f"{server.http}/v2/models/tinylm-generate", timeout=10) as response:
        return json.loads(response.read())["parameters"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_remote_generation_equals_local(lm_server, lm_out, local, protocol):
    from eecompile import RemoteGenerator

    remote = RemoteGenerator(lm_server.url(protocol), lm_out / "client")
    assert remote.server.model_name == "tinylm-generate"
    for kwargs in ({}, {"temperature": 0.8, "top_k": 40, "seed": 7}, {"temperature": 1.0, "top_p": 0.9, "seed": 3}):
        streamed: list[int] = []
        got = remote.generate("And God said", 24, stream=streamed.append, **kwargs)
        want = local.generate("And God said", 24, **kwargs)
        assert got.wire_ids == want.wire_ids == streamed and got.plain_ids == want.plain_ids
        assert got.text == want.text and got.finish_reason == want.finish_reason == "length"
        assert got.prompt_wire_ids != got.prompt_plain_ids  # the server saw the permuted prompt
    eos_id = want.plain_ids[3]
    stopped = remote.generate("And God said", 24, eos_ids=[eos_id], **kwargs)
    assert stopped.finish_reason == "eos" and stopped.plain_ids == want.plain_ids[:want.plain_ids.index(eos_id) + 1]


def test_eight_concurrent_streams_of_64_tokens(lm_server, lm_out, local):
    from eecompile import RemoteGenerator

    expected = [local.generate(p, 64).wire_ids for p in PROMPTS]
    generators = {p: RemoteGenerator(lm_server.url(p), lm_out / "client") for p in PROTOCOLS}

    def run(i: int):
        result = generators[PROTOCOLS[i % 2]].generate(PROMPTS[i], 64)
        return result.wire_ids, result.finish_reason

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(run, range(8)))
    assert [r[0] for r in results] == expected
    assert all(len(ids) == 64 and reason == "length" for ids, reason in results)
    assert wait_until(lambda: _metadata(lm_server)["active_streams"] == 0)


class _Abort(Exception):
    pass


def _abort_after(n: int):
    seen = []

    def callback(token: int) -> None:
        seen.append(token)
        if len(seen) >= n:
            raise _Abort()

    return callback


def test_aborted_streams_free_their_cache(lm_server, lm_out):
    """100 streams with 100-token prompts aborted after 2 tokens: no decoder state left, memory at baseline."""
    from eecompile import RemoteGenerator

    generators = {p: RemoteGenerator(lm_server.url(p), lm_out / "client") for p in PROTOCOLS}
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 2000, 100).tolist() for _ in range(8)]

    def aborted(i: int) -> None:
        with pytest.raises(_Abort):
            generators[PROTOCOLS[i % 2]].generate(prompts[i % 8], 60, stream=_abort_after(2))

    for i in range(20):  # warm-up: allocator arenas and thread stacks reach their working size
        aborted(i)
    assert wait_until(lambda: _metadata(lm_server)["active_streams"] == 0)
    baseline = lm_server.rss_bytes()
    started = _metadata(lm_server)["streams_started"]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(aborted, range(100)))
    assert wait_until(lambda: _metadata(lm_server)["active_streams"] == 0)
    assert _metadata(lm_server)["streams_started"] == started + 100
    # each leaked stream would hold its KV cache (~100 KiB) and prefill logits [1, 100, 2048] (800 KiB): ~90 MiB
    assert lm_server.rss_bytes() - baseline < 16 << 20, (baseline, lm_server.rss_bytes())
    assert lm_server.alive()


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case, fragment", [
    ("vocab", "token id 5000 is outside the model's vocabulary [0, 2048)"),
    ("temperature", "temperature must be >= 0"),
    ("context", "the prompt has 200 tokens but the model's context holds 128"),
    ("compilation", "encrypted for compilation"),
])
def test_bad_generation_requests_are_refused_and_serving_goes_on(lm_server, lm_out, local, protocol, case, fragment,
                                                                  monkeypatch):
    """Requests the client shim would refuse, sent raw to the server (its own checks answer them)."""
    from eecompile.remote import RemoteError, RemoteGenerator

    remote = RemoteGenerator(lm_server.url(protocol), lm_out / "client")
    prompt = {"vocab": [1, 5000], "context": [5] * 200}.get(case, [1, 5, 9])
    if case == "temperature":
        original = remote.server._parameters
        monkeypatch.setattr(remote.server, "_parameters", lambda n, s: {**original(n, s), "temperature": -1.0})
    if case == "compilation":
        remote.server.model_id = "0" * 64
    with pytest.raises(RemoteError) as info:
        remote.server.generate(prompt, 4)
    message = str(info.value)
    assert fragment in message and "\n" not in message, message
    assert ("INVALID_ARGUMENT" in message) if protocol == "grpc" else (" 400 " in message), message
    fresh = RemoteGenerator(lm_server.url(protocol), lm_out / "client")
    assert fresh.generate("And God said", 8).wire_ids == local.generate("And God said", 8).wire_ids


def test_generator_refuses_another_compilation(lm_server, tmp_path, key_b):
    from eecompile import compile_model
    from eecompile.models import tinylm
    from eecompile.remote import RemoteError, RemoteGenerator

    other = compile_model(tinylm.load_tinylm()[0], key_b, tmp_path / "other")
    for protocol in PROTOCOLS:
        with pytest.raises(RemoteError, match="serves no generation model of this bundle's compilation"):
            RemoteGenerator(lm_server.url(protocol), other.client_dir)
        with pytest.raises(RemoteError, match="not this bundle's"):
            RemoteGenerator(lm_server.url(protocol), other.client_dir, model_name="tinylm")


def test_single_pass_decoder_requests_with_remote_session(lm_server, lm_out):
    """The decoder's NAME model runs one step on ciphertext, the KV cache returned encrypted, as locally."""
    from eecompile import EncryptedSession, RemoteSession
    from eecompile.models import tinylm

    config = tinylm.load_tinylm()[2]
    ids = np.array([[1, 40, 50, 60]], np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones((1, 4), np.int64),
             "position_ids": np.arange(4, dtype=np.int64)[None], **tinylm.empty_past(config)}
    want = EncryptedSession(lm_out, providers=["CPUExecutionProvider"]).run(None, feeds)
    for protocol in PROTOCOLS:
        got = RemoteSession(lm_server.url(protocol), lm_out / "client").run(None, feeds)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


def test_cli_generate_with_server(lm_server, lm_out, local, capsys):
    from eecompile.cli import main

    for protocol in PROTOCOLS:
        code = main(["generate", str(lm_out), "--server", lm_server.url(protocol), "--prompt", "And God said",
                     "--max-new-tokens", "16"])
        out, err = capsys.readouterr()
        assert code == 0, err
        assert out == local.generate("And God said", 16).text
    code = main(["generate", str(lm_out), "--server", "127.0.0.1:9", "--prompt", "x", "--max-new-tokens", "2"])
    _, err = capsys.readouterr()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("eecompile: error: ") and "127.0.0.1:9" in err
