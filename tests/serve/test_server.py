"""``eecompile serve`` of the zoo BERT-style model driven by the stock tritonclient and by RemoteSession:
health/metadata, exact equality with the local EncryptedSession, protocol errors that leave the
server serving, and the bounded loopback load test (16 clients x 200 requests, HTTP and gRPC)."""

from __future__ import annotations

import http.client
import json
import urllib.parse
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from eecompile.models.feeds import make_feeds

PROTOCOLS = ("grpc", "http")


@pytest.fixture(scope="module")
def local(bert_out):
    """The in-process reference."""
    from eecompile import EncryptedSession

    return EncryptedSession(bert_out, providers=["CPUExecutionProvider"])


def _stock_client(server, protocol):
    if protocol == "grpc":
        import tritonclient.grpc as module

        return module, module.InferenceServerClient(f"{server.host}:{server.grpc_port}")
    import tritonclient.http as module

    return module, module.InferenceServerClient(f"{server.host}:{server.http_port}")


def _stock_infer(module, client, protocol, name, feeds, parameters=None):
    """One request with the stock tritonclient API (JSON tensors over HTTP: MLServer has no binary extension)."""
    inputs = []
    for key, value in feeds.items():
        item = module.InferInput(key, list(value.shape), {np.dtype("int64"): "INT64", np.dtype("int32"): "INT32",
                                                          np.dtype("float32"): "FP32"}[value.dtype])
        if protocol == "grpc":
            item.set_data_from_numpy(value)
        else:
            item.set_data_from_numpy(value, binary_data=False)
        inputs.append(item)
    outputs = [module.InferRequestedOutput("logits") if protocol == "grpc"
               else module.InferRequestedOutput("logits", binary_data=False)]
    return client.infer(name, inputs, outputs=outputs, parameters=parameters).as_numpy("logits")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_health_and_metadata_show_ciphertext_tensors_and_model_id(bert_server, bert_out, protocol):
    from eecompile.runtime.client import Client

    _, client = _stock_client(bert_server, protocol)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("bert")
    meta = client.get_model_metadata("bert", **({"as_json": True} if protocol == "grpc" else {}))
    assert meta["versions"] == [Client.load(bert_out / "client").model_id]
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    assert inputs == {"input_ids": ("INT64", [-1, -1]), "attention_mask": ("INT64", [-1, -1])}
    assert [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]] == \
        [("logits", "FP32", [-1, 3])]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stock_tritonclient_on_ciphertext_equals_local(bert_server, bert_out, local, protocol):
    """Encrypt with the bundle, send with plain tritonclient, decrypt: exactly the local session's answer."""
    from eecompile.runtime.client import Client

    bundle = Client.load(bert_out / "client")
    module, client = _stock_client(bert_server, protocol)
    for seed in range(3):
        feeds = make_feeds("bert", seed=seed, batch=3, seq=6 + seed)
        wire = bundle.encrypt(feeds)
        assert not np.array_equal(wire["input_ids"], feeds["input_ids"])  # the server sees permuted ids
        cipher = _stock_infer(module, client, protocol, "bert", wire)
        plain = bundle.decrypt({"logits": cipher})["logits"]
        np.testing.assert_array_equal(plain, local.run(None, feeds)[0])
        assert not np.allclose(cipher, plain)  # the logits on the wire are ciphertext


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_remote_session_run_equals_local(bert_server, bert_out, local, protocol):
    from eecompile import RemoteSession

    session = RemoteSession(bert_server.url(protocol), bert_out / "client")
    assert session.model_name == "bert" and session.protocol == protocol
    for seed in range(3):
        feeds = make_feeds("bert", seed=10 + seed, batch=1 + seed, seq=4)
        (got,) = session.run(["logits"], feeds)
        np.testing.assert_array_equal(got, local.run(["logits"], feeds)[0])
    assert [t["name"] for t in session.get_inputs()] == ["input_ids", "attention_mask"]


# -- bad input ------------------------------------------------------------------------------
def _still_serves(server, bert_out, local) -> None:
    from eecompile import RemoteSession

    feeds = make_feeds("bert", seed=99, batch=2, seq=5)
    for protocol in PROTOCOLS:
        np.testing.assert_array_equal(RemoteSession(server.url(protocol), bert_out / "client").run(None, feeds)[0],
                                      local.run(None, feeds)[0])
    assert server.alive()


def _announced_body_status(server, path: str, size: int) -> tuple[int, str]:
    """POST headers announcing a ``size``-byte body and wait for the answer before sending any of it (what
    ``Expect: 100-continue`` asks for): a server refusing the size from its header answers at once, and no
    half-sent body races the refusal (sending it could end in a broken pipe before the answer is read)."""
    url = urllib.parse.urlsplit(server.http)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(size))
        conn.putheader("Expect", "100-continue")
        conn.endheaders()
        response = conn.getresponse()
        text = response.read().decode()
    finally:
        conn.close()
    return response.status, json.loads(text).get("error", "") if response.status >= 400 else text


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case, fragment", [
    ("name", "unknown input 'input_idz'"),
    ("dtype", "input 'input_ids' has datatype INT32; the model expects INT64"),
    ("rank", "input 'input_ids' has shape [30]; the model expects [batch, sequence]"),
    ("symbols", "'attention_mask' has sequence=3 but 'input_ids' has sequence=6"),
    ("missing", "missing ['attention_mask']"),
    ("compilation", "encrypted for compilation"),
    ("model", "Model nosuchmodel"),  # MLServer's own 404 wording
])
def test_bad_requests_get_a_protocol_error_and_the_server_keeps_serving(bert_server, bert_out, bert_other_out, local,
                                                                         protocol, case, fragment):
    from tritonclient.utils import InferenceServerException

    from eecompile.runtime.client import Client

    module, client = _stock_client(bert_server, protocol)
    feeds = Client.load(bert_out / "client").encrypt(make_feeds("bert", seed=1, batch=5, seq=6))
    name, parameters = "bert", None
    if case == "name":
        feeds = {"input_idz": feeds["input_ids"], "attention_mask": feeds["attention_mask"]}
    elif case == "dtype":
        feeds = {**feeds, "input_ids": feeds["input_ids"].astype(np.int32)}
    elif case == "rank":
        feeds = {**feeds, "input_ids": feeds["input_ids"].reshape(-1)}
    elif case == "symbols":
        feeds = {**feeds, "attention_mask": feeds["attention_mask"][:, :3]}
    elif case == "missing":
        feeds = {"input_ids": feeds["input_ids"]}
    elif case == "compilation":
        parameters = {"eecompile_model_id": Client.load(bert_other_out / "client").model_id}
    elif case == "model":
        name = "nosuchmodel"
    with pytest.raises(InferenceServerException) as info:
        _stock_infer(module, client, protocol, name, feeds, parameters)
    message = info.value.message()
    assert fragment in message and "\n" not in message, message
    status = str(info.value.status())
    assert status in ({"400", "404"} if protocol == "http" else {"StatusCode.INVALID_ARGUMENT", "StatusCode.NOT_FOUND"})
    _still_serves(bert_server, bert_out, local)


def test_a_refused_grpc_request_is_logged_on_one_line(bert_server, bert_out, local):
    """MLServer would log the refusal as an ERROR with the server's traceback; it is one WARNING line."""
    import time

    from tritonclient.utils import InferenceServerException

    module, client = _stock_client(bert_server, "grpc")
    with pytest.raises(InferenceServerException):
        _stock_infer(module, client, "grpc", "bert", {"input_idz": np.zeros((1, 3), np.int64)})
    deadline = time.monotonic() + 10
    while not any("refused a request (400): unknown input 'input_idz'" in line for line in bert_server.log):
        assert time.monotonic() < deadline, "".join(bert_server.log[-20:])
        time.sleep(0.05)
    assert not any("Traceback" in line for line in bert_server.log), "".join(bert_server.log)
    _still_serves(bert_server, bert_out, local)


def test_oversized_body_is_refused_on_both_protocols(bert_server, bert_out, local):
    from tritonclient.utils import InferenceServerException

    big = {"input_ids": np.zeros((1, 200_000), np.int64), "attention_mask": np.ones((1, 200_000), np.int64)}
    status, message = _announced_body_status(bert_server, "/v2/models/bert/infer", 2 << 20)
    assert status == 413 and "at most 1048576" in message
    module, client = _stock_client(bert_server, "grpc")
    with pytest.raises(InferenceServerException) as info:
        _stock_infer(module, client, "grpc", "bert", big)
    assert "RESOURCE_EXHAUSTED" in str(info.value.status())
    _still_serves(bert_server, bert_out, local)


def test_remote_session_refuses_another_compilation(bert_server, bert_other_out):
    from eecompile import RemoteSession
    from eecompile.remote import RemoteError

    with pytest.raises(RemoteError, match="serves no model of this bundle's compilation"):
        RemoteSession(bert_server.grpc, bert_other_out / "client")
    with pytest.raises(RemoteError, match="not this bundle's"):
        RemoteSession(bert_server.http, bert_other_out / "client", model_name="bert")


def test_remote_session_bad_url_and_unreachable_server(bert_out):
    from eecompile import RemoteSession
    from eecompile.remote import RemoteError

    with pytest.raises(RemoteError, match="unknown protocol 'ftp'"):
        RemoteSession("ftp://127.0.0.1:1", bert_out / "client")
    with pytest.raises(RemoteError, match="says grpc but protocol='http'"):
        RemoteSession("grpc://127.0.0.1:1", bert_out / "client", protocol="http")
    for protocol in PROTOCOLS:
        with pytest.raises(RemoteError, match="127.0.0.1:9"):
            RemoteSession(f"{protocol}://127.0.0.1:9", bert_out / "client", timeout=5)


# -- load -----------------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_load_16_clients_x_200_requests(bert_server, bert_out, local, protocol):
    """16 concurrent RemoteSessions x 200 requests each: no error, every answer equal to the local one."""
    from eecompile import RemoteSession

    variants = [make_feeds("bert", seed=s, batch=1 + s % 3, seq=4 + s % 5) for s in range(8)]
    expected = [local.run(None, f)[0] for f in variants]
    session = RemoteSession(bert_server.url(protocol), bert_out / "client")  # one connection per thread inside

    def client(worker: int) -> int:
        wrong = 0
        for i in range(200):
            k = (worker + i) % len(variants)
            if not np.array_equal(session.run(None, variants[k])[0], expected[k]):
                wrong += 1
        return wrong

    with ThreadPoolExecutor(16) as pool:
        wrong = list(pool.map(client, range(16)))
    assert wrong == [0] * 16
    assert bert_server.alive()
