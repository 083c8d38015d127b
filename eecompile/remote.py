"""The client of a remote ``eecompile serve``: encrypt here, compute there, decrypt here.

:class:`RemoteSession` has ``run(output_names, feeds)`` — ``onnxruntime.InferenceSession.run``'s
signature — and sends only ciphertext over the Open Inference Protocol with the stock
``tritonclient`` (gRPC or HTTP). :class:`RemoteGenerator` is :class:`EncryptedGenerator` whose
server is remote: the prompt is encrypted here, the server streams encrypted ids (its KV
cache and sampler never leave it), the text is decrypted here.

Both refuse a server whose model is another compilation than the bundle's: the server
publishes the compilation's model id as the model's version, and every request carries the
bundle's id, which the server checks.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from eecompile.errors import EECompileError, FeedError
from eecompile.runtime.client import Client
from eecompile.runtime.generate import (EncryptedGenerator, GenerationClient, GenerationError, SamplingConfig,
                                        ServerResult, StreamCallback)
from eecompile.serve.interface import GENERATE_SUFFIX, MODEL_ID_PARAMETER

PROTOCOLS = ("grpc", "http")
DEFAULT_PORTS = {"grpc": 8081, "http": 8080}


class RemoteError(EECompileError):
    """The server cannot be reached, does not serve this bundle's compilation, or refused a request."""


def parse_url(url: str, protocol: str | None = None) -> tuple[str, str]:
    """(protocol, ``host:port``) of ``grpc://host:port``, ``http://host:port`` or ``host:port`` with ``protocol``."""
    if not isinstance(url, str) or not url.strip():
        raise RemoteError(f"the server URL must be host:port, grpc://host:port or http://host:port, got {url!r}")
    text = url.strip()
    if "://" not in text:
        text = f"{protocol or 'grpc'}://{text}"
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme not in PROTOCOLS:
        raise RemoteError(f"unknown protocol {parts.scheme!r} in {url!r}; use grpc:// or http://")
    if protocol is not None and protocol != scheme:
        raise RemoteError(f"the URL {url!r} says {scheme} but protocol={protocol!r} was asked for")
    if not parts.hostname:
        raise RemoteError(f"no host in the server URL {url!r}")
    try:
        port = parts.port or DEFAULT_PORTS[scheme]
    except ValueError:
        raise RemoteError(f"bad port in the server URL {url!r}") from None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return scheme, f"{host}:{port}"


def _message(exc: Exception) -> str:
    text = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    return " ".join(str(text).split())


class _Connection:
    """One tritonclient per thread (the HTTP client is not thread-safe), plus the protocol's helpers."""

    def __init__(self, url: str, protocol: str | None, timeout: float) -> None:
        self.protocol, self.address = parse_url(url, protocol)
        self.url = f"{self.protocol}://{self.address}"
        self.timeout = timeout
        self._local = threading.local()
        if self.protocol == "grpc":
            import tritonclient.grpc as module
        else:
            import tritonclient.http as module
        self.module = module
        from tritonclient.utils import InferenceServerException

        self.error_type = InferenceServerException

    def client(self):
        """This thread's tritonclient."""
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                client = self.module.InferenceServerClient(self.address)
            else:
                client = self.module.InferenceServerClient(self.address, connection_timeout=self.timeout,
                                                           network_timeout=self.timeout)
            self._local.client = client
        return client

    def call(self, what: str, fn, *args, **kwargs):
        """``fn(*args)`` with a tritonclient/connection error turned into one :class:`RemoteError` line."""
        try:
            return fn(*args, **kwargs)
        except self.error_type as exc:
            raise RemoteError(f"{what} at {self.url} failed: {_message(exc)}") from None
        except (OSError, ConnectionError) as exc:
            raise RemoteError(f"cannot reach {self.url} ({what}): {exc.strerror or exc}") from None

    def models(self) -> list[dict]:
        """The server's models (name, version) from the repository index."""
        if self.protocol == "grpc":
            index = self.call("listing the models", lambda: self.client().get_model_repository_index(
                as_json=True, client_timeout=self.timeout))
            items = index.get("models", [])
        else:  # tritonclient.http posts no body, which MLServer's index endpoint refuses
            items = self.post_json("listing the models", "/v2/repository/index", {})
        return [{"name": m.get("name", ""), "version": m.get("version", "")} for m in items]

    def post_json(self, what: str, path: str, body: dict):
        """POST ``body`` as JSON to ``path`` of the HTTP server; the decoded answer, or a :class:`RemoteError`."""
        host, _, port = self.address.rpartition(":")
        connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self.timeout)
        try:
            connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            raw = response.read()
        except OSError as exc:
            raise RemoteError(f"cannot reach {self.url} ({what}): {exc.strerror or exc}") from None
        finally:
            connection.close()
        try:
            answer = json.loads(raw)
        except ValueError:
            answer = None
        if response.status != 200:
            message = answer.get("error") if isinstance(answer, dict) else raw.decode(errors="replace")
            raise RemoteError(f"{what} at {self.url} failed: {response.status} {' '.join(str(message).split())}")
        return answer

    def metadata(self, name: str) -> dict:
        """The model metadata as JSON (name, versions, platform, inputs, outputs)."""
        kwargs = {"as_json": True, "client_timeout": self.timeout} if self.protocol == "grpc" else {}
        return self.call(f"reading the metadata of model '{name}'",
                         lambda: self.client().get_model_metadata(name, **kwargs))

    def close(self) -> None:
        """Close this thread's client."""
        client = getattr(self._local, "client", None)
        if client is not None:
            client.close()
            self._local.client = None


def _find_model(conn: _Connection, model_id: str, model_name: str | None, generate: bool) -> dict:
    """The metadata of the served model of compilation ``model_id``, or a :class:`RemoteError` saying why not."""
    if model_name is None:
        served = [m for m in conn.models() if m["name"].endswith(GENERATE_SUFFIX) == generate]
        matching = [m["name"] for m in served if m["version"] == model_id]
        if not matching:
            listed = ", ".join(f"{m['name']} ({(m['version'] or 'no id')[:16]})" for m in served) or "none"
            kind = "generation model" if generate else "model"
            raise RemoteError(f"the server at {conn.url} serves no {kind} of this bundle's compilation "
                              f"{model_id[:16]} (it serves: {listed})")
        model_name = matching[0]
    elif generate and not model_name.endswith(GENERATE_SUFFIX):
        model_name += GENERATE_SUFFIX
    meta = conn.metadata(model_name)
    versions = list(meta.get("versions") or [])
    if model_id not in versions:
        raise RemoteError(f"model '{model_name}' at {conn.url} is compilation "
                          f"{(versions[0] if versions else 'unknown')[:16]}, not this bundle's {model_id[:16]}: "
                          "its answers would not decrypt; serve the server/ folder of this compilation")
    return meta


class RemoteSession:
    """``InferenceSession.run`` on a remote server: plaintext feeds in and out, ciphertext on the wire."""

    def __init__(self, url: str, client_dir: str | Path, protocol: str | None = None, *,
                 model_name: str | None = None, timeout: float = 60.0) -> None:
        self.client = Client.load(client_dir)
        self._conn = _Connection(url, protocol, timeout)
        self.protocol = self._conn.protocol
        self.metadata = _find_model(self._conn, self.client.model_id, model_name, generate=False)
        self.model_name = self.metadata["name"]
        self._inputs = {t["name"]: t for t in self.metadata.get("inputs", [])}
        self._outputs = [t["name"] for t in self.metadata.get("outputs", [])]

    def get_inputs(self) -> list[dict]:
        """The served model's inputs (name, datatype, shape with -1 for symbolic dims)."""
        return [dict(t) for t in self.metadata.get("inputs", [])]

    def get_outputs(self) -> list[dict]:
        """The served model's outputs."""
        return [dict(t) for t in self.metadata.get("outputs", [])]

    def run(self, output_names: list[str] | None, feeds: dict[str, np.ndarray], run_options=None) -> list[np.ndarray]:
        """Like ``InferenceSession.run``: plaintext feeds in, plaintext outputs out (``run_options`` unused).

        Server-state outputs (KV cache ``present*``) come back as ciphertext, to be fed back as
        the matching ``past*`` inputs.
        """
        del run_options
        if output_names is not None:
            if isinstance(output_names, str) or not all(isinstance(n, str) for n in output_names):
                raise FeedError(f"output_names must be a list of output names, got {output_names!r}")
            unknown = sorted(set(output_names) - set(self._outputs))
            if unknown:
                raise FeedError(f"unknown output name(s) {unknown}; the model's outputs are {self._outputs}")
        names = list(output_names) if output_names else list(self._outputs)
        encrypted = self.client.encrypt(feeds)
        raw = self._infer(names, encrypted)
        plain = self.client.decrypt(raw)
        return [plain[n] for n in names]

    def _infer(self, names: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from tritonclient.utils import np_to_triton_dtype

        m = self._conn.module
        binary = self.protocol == "grpc"  # MLServer's REST reads JSON tensors, not Triton's binary extension
        inputs = []
        for name, value in feeds.items():
            array = np.ascontiguousarray(value)
            item = m.InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            if binary:
                item.set_data_from_numpy(array)
            else:
                item.set_data_from_numpy(array, binary_data=False)
            inputs.append(item)
        outputs = [m.InferRequestedOutput(n) if binary else m.InferRequestedOutput(n, binary_data=False)
                   for n in names]
        kwargs = {"client_timeout": self._conn.timeout} if binary else {}
        result = self._conn.call(f"inference on model '{self.model_name}'", self._conn.client().infer,
                                 self.model_name, inputs, outputs=outputs,
                                 parameters={MODEL_ID_PARAMETER: self.client.model_id}, **kwargs)
        return {n: result.as_numpy(n) for n in names}

    def close(self) -> None:
        """Close this thread's connection."""
        self._conn.close()


# -- generation --------------------------------------------------------------------------
class _Stop(Exception):
    pass


class RemoteDecoder:
    """The server side of :class:`EncryptedGenerator`, remote: streams encrypted ids from ``NAME-generate``."""

    def __init__(self, conn: _Connection, model_name: str, model_id: str, metadata: dict) -> None:
        self._conn = conn
        self.model_name = model_name
        self.model_id = model_id
        self.metadata = metadata
        params = metadata.get("parameters") or {}
        self.vocab_size = int(params["vocab_size"]) if params.get("vocab_size") else None
        self.max_positions = int(params["max_positions"]) if params.get("max_positions") else None

    def _parameters(self, max_new_tokens: int, sampling: SamplingConfig) -> dict:
        params = {"max_new_tokens": int(max_new_tokens), "temperature": float(sampling.temperature),
                  MODEL_ID_PARAMETER: self.model_id}
        for key in ("top_k", "top_p", "seed"):
            value = getattr(sampling, key)
            if value is not None:
                params[key] = int(value) if key != "top_p" else float(value)
        return params

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingConfig | None = None, *,
                 eos_ids: Iterable[int] = (), stream: StreamCallback | None = None) -> ServerResult:
        """Like :meth:`ServerDecoder.generate`, over the network; a ``stream`` callback that raises aborts the stream
        (the server frees its cache) and the exception propagates."""
        sampling = sampling or SamplingConfig()
        if int(max_new_tokens) != max_new_tokens or max_new_tokens < 0:
            raise GenerationError(f"max_new_tokens must be a non-negative integer, got {max_new_tokens}")
        if sampling.seed is not None and sampling.seed >= 2 ** 63:
            raise GenerationError("a remote generation's seed must be below 2**63 (the protocol's int64 parameter)")
        prompt = np.array([[int(i) for i in prompt_ids]], dtype=np.int64)
        eos = np.array([int(i) for i in eos_ids], dtype=np.int64)
        params = self._parameters(max_new_tokens, sampling)
        run = self._grpc if self._conn.protocol == "grpc" else self._http
        return run(prompt, eos, params, stream)

    def _collect(self, events, stream: StreamCallback | None, started: float) -> ServerResult:
        ids: list[int] = []
        steps: list[float] = []
        prefill = 0.0
        last = started
        for kind, value in events:
            now = time.perf_counter()
            if kind == "token":
                if not ids:
                    prefill = now - started
                else:
                    steps.append(now - last)
                last = now
                ids.append(int(value))
                if stream is not None:
                    stream(int(value))
            else:
                return ServerResult(ids, str(value), prefill, steps)
        raise RemoteError(f"the stream from {self._conn.url} ended without a finish reason after {len(ids)} tokens")

    # gRPC: ModelStreamInfer. MLServer streams plain ModelInferResponse messages where Triton streams
    # ModelStreamInferResponse wrappers, so tritonclient's start_stream() cannot parse them; the call is made
    # with grpcio and tritonclient's own protocol messages instead.
    def _channel(self):
        import grpc

        if getattr(self, "_grpc_channel", None) is None:
            self._grpc_channel = grpc.insecure_channel(self._conn.address)
        return self._grpc_channel

    def _grpc(self, prompt, eos, params, stream) -> ServerResult:
        import grpc
        import tritonclient.grpc as grpcclient
        from tritonclient.grpc import service_pb2 as pb

        request = pb.ModelInferRequest(model_name=self.model_name)
        for key, value in params.items():
            # MLServer's InferParameter has no double_param (KServe v2 has bool, int64, string): floats go as text
            field = {bool: "bool_param", int: "int64_param"}.get(type(value), "string_param")
            setattr(request.parameters[key], field, repr(value) if isinstance(value, float) else value)
        for name, array in (("input_ids", prompt), ("eos_ids", eos)):
            if name == "input_ids" or array.size:
                tensor = request.inputs.add(name=name, datatype="INT64")
                tensor.shape.extend(array.shape)
                request.raw_input_contents.append(array.tobytes())
        method = self._channel().stream_stream("/inference.GRPCInferenceService/ModelStreamInfer",
                                               request_serializer=pb.ModelInferRequest.SerializeToString,
                                               response_deserializer=pb.ModelInferResponse.FromString)
        started = time.perf_counter()
        call = method(iter([request]), timeout=self._conn.timeout)

        def events():
            for response in call:
                if "finish_reason" in response.parameters:
                    yield "end", response.parameters["finish_reason"].string_param
                    return
                yield "token", int(grpcclient.InferResult(response).as_numpy("output_ids").reshape(-1)[0])

        try:
            return self._collect(events(), stream, started)
        except grpc.RpcError as exc:
            raise RemoteError(f"generation on model '{self.model_name}' at {self._conn.url} failed: "
                              f"{exc.code().name} {' '.join(str(exc.details()).split())}") from None
        finally:
            call.cancel()  # no-op after a finished stream; aborts an unfinished one (the server frees the cache)

    # HTTP: MLServer's generate_stream endpoint (server-sent events of InferenceResponse JSON)
    def _http(self, prompt, eos, params, stream) -> ServerResult:
        body = {"inputs": [{"name": "input_ids", "shape": list(prompt.shape), "datatype": "INT64",
                            "data": prompt.reshape(-1).tolist()}], "parameters": params}
        if eos.size:
            body["inputs"].append({"name": "eos_ids", "shape": list(eos.shape), "datatype": "INT64",
                                   "data": eos.tolist()})
        host, _, port = self._conn.address.rpartition(":")
        connection = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=self._conn.timeout)
        started = time.perf_counter()
        try:
            try:
                connection.request("POST", f"/v2/models/{self.model_name}/generate_stream", json.dumps(body),
                                   {"Content-Type": "application/json"})
                response = connection.getresponse()
            except OSError as exc:
                raise RemoteError(f"cannot reach {self._conn.url} (generation): {exc.strerror or exc}") from None
            if response.status != 200:
                raw = response.read()
                try:
                    message = json.loads(raw).get("error") or raw.decode(errors="replace")
                except ValueError:
                    message = raw.decode(errors="replace")
                raise RemoteError(f"generation on model '{self.model_name}' at {self._conn.url} failed: "
                                  f"{response.status} {' '.join(str(message).split())}")

            def events():
                while True:
                    line = response.readline()
                    if not line:
                        return
                    if not line.startswith(b"data:"):
                        continue
                    event = json.loads(line[5:])
                    parameters = event.get("parameters") or {}
                    if "finish_reason" in parameters:
                        yield "end", parameters["finish_reason"]
                        return
                    outputs = {o["name"]: o for o in event.get("outputs", [])}
                    yield "token", int(outputs["output_ids"]["data"][0])

            return self._collect(events(), stream, started)
        finally:
            connection.close()  # an unfinished stream is aborted: the server frees the cache


class RemoteGenerator(EncryptedGenerator):
    """:class:`EncryptedGenerator` with the server across the network (``eecompile serve``'s NAME-generate).

    Only the client bundle is read here; the prompt is encrypted here, the server streams
    encrypted ids, and :meth:`generate` returns the same :class:`GenerationResult` as the
    local generator (text decoded here).
    """

    def __init__(self, url: str, client_dir: str | Path, protocol: str | None = None, *,
                 model_name: str | None = None, timeout: float = 120.0) -> None:  # noqa: D107
        self.client = GenerationClient.load(client_dir)
        self._conn = _Connection(url, protocol, timeout)
        model_id = self.client.client.model_id
        meta = _find_model(self._conn, model_id, model_name, generate=True)
        self.server = RemoteDecoder(self._conn, meta["name"], model_id, meta)
        if self.server.vocab_size is not None and self.server.vocab_size != self.client.vocab_size:
            raise RemoteError(f"the server model's vocabulary has {self.server.vocab_size} entries but the client "
                              f"bundle's has {self.client.vocab_size}")

    def close(self) -> None:
        """Close the metadata connection of this thread."""
        self._conn.close()
