"""MLServer runtimes for a compiled ``server/`` folder: single-pass inference and streamed generation.

Imported only inside the serving process (MLServer and ``tritonclient.grpc`` both register the
``inference.*`` protobuf messages, so they cannot share a process). Two runtimes:

* :class:`EncryptedOnnxModel` — ``predict``: ciphertext tensors in, ciphertext tensors out,
  through an ONNX Runtime session of ``model.onnx``. Checks the request against the model
  (names, datatypes, shapes, the compilation id the client sent) and answers a mismatch with
  a 400 carrying eecompile's one-line message. Runs ONNX Runtime in a thread so the event loop
  keeps serving other requests.
* :class:`GenerationModel` — ``predict_stream``: encrypted prompt ids in, one encrypted id per
  streamed response out. Each stream gets its own :class:`~eecompile.runtime.generate.ServerDecoder`
  state (KV cache and logits on the device, the on-device sampler) sharing one session; the
  state is dropped when the stream ends, fails or is aborted by the client.
"""

from __future__ import annotations

import asyncio
import copy
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import numpy as np
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.errors import InferenceError
from mlserver.types import (InferenceRequest, InferenceResponse, MetadataModelResponse, MetadataTensor, Parameters,
                            ResponseOutput)

from eecompile.errors import EECompileError
from eecompile.serve.interface import MODEL_ID_PARAMETER, PLATFORM, ServedModel, TensorSpec, describe

_SESSIONS: dict[tuple[str, str], object] = {}  # one ONNX Runtime session per (model, provider) in this process
_SESSIONS_LOCK = threading.Lock()


def _extra(settings) -> dict:
    parameters = settings.parameters
    return dict(parameters.extra or {}) if parameters is not None else {}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _metadata_tensor(spec: TensorSpec) -> MetadataTensor:
    return MetadataTensor(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))


def _check_model_id(payload: InferenceRequest, served: ServedModel, name: str) -> None:
    """Refuse a request the client encrypted for another compilation (the id it sends as a parameter)."""
    parameters = payload.parameters.model_dump() if payload.parameters is not None else {}
    claimed = parameters.get(MODEL_ID_PARAMETER)
    if claimed is not None and claimed != served.model_id:
        raise InferenceError(f"the request was encrypted for compilation {str(claimed)[:16]}... but model '{name}' "
                             f"is compilation {served.model_id[:16]}...: its ciphertext would decrypt to garbage")


def _parameters(payload: InferenceRequest) -> dict:
    return payload.parameters.model_dump() if payload.parameters is not None else {}


def session_for(served: ServedModel, provider: str):
    """The process's ONNX Runtime session of ``served`` on ``provider`` (created once, shared by the runtimes)."""
    from eecompile.runtime.ort_session import make_session

    key = (str(served.model_path), provider)
    with _SESSIONS_LOCK:
        if key not in _SESSIONS:
            _SESSIONS[key] = make_session(served.model_path, provider)
        return _SESSIONS[key]


class EncryptedOnnxModel(MLModel):
    """Serves ``model.onnx`` of a compiled server folder: the ciphertext tensors exactly as the compiler emitted them."""

    async def load(self) -> bool:
        """Open the server folder and its ONNX Runtime session; publish the tensors and the model id as metadata."""
        extra = _extra(self.settings)
        self.served = describe(extra["server_dir"])
        self.session = session_for(self.served, extra.get("provider", "auto"))
        self._inputs_by_name = {t.name: t for t in self.served.inputs}
        self._output_names = [t.name for t in self.served.outputs]
        self.inputs = [_metadata_tensor(t) for t in self.served.inputs]
        self.outputs = [_metadata_tensor(t) for t in self.served.outputs]
        return True

    async def metadata(self) -> MetadataModelResponse:
        """Name, the model id as the version, tensors; over HTTP also the id and the providers as parameters."""
        return MetadataModelResponse(
            name=self.name, platform=PLATFORM, versions=[self.served.model_id], inputs=self.inputs,
            outputs=self.outputs,
            parameters=Parameters(**{MODEL_ID_PARAMETER: self.served.model_id,
                                     "providers": ",".join(self.session.get_providers())}))

    def _decode(self, payload: InferenceRequest) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        for request_input in payload.inputs:
            spec = self._inputs_by_name.get(request_input.name)
            if spec is None:
                raise InferenceError(f"unknown input '{request_input.name}'; model '{self.name}' takes "
                                     f"{sorted(self._inputs_by_name)}")
            if request_input.name in feeds:
                raise InferenceError(f"input '{request_input.name}' is given twice")
            datatype = getattr(request_input.datatype, "value", request_input.datatype)
            if datatype != spec.datatype:
                raise InferenceError(f"input '{spec.name}' has datatype {datatype}; the model expects {spec.datatype}")
            shape = list(request_input.shape)
            if len(shape) != len(spec.shape) or any(w >= 0 and w != g for w, g in zip(spec.shape, shape)):
                expected = ", ".join("?" if d is None else str(d) for d in spec.dims)
                raise InferenceError(f"input '{spec.name}' has shape {shape}; the model expects [{expected}]")
            try:
                feeds[spec.name] = NumpyCodec.decode_input(request_input)
            except (ValueError, TypeError) as exc:
                raise InferenceError(f"input '{spec.name}' does not hold {int(np.prod(shape))} {datatype} values "
                                     f"for shape {shape} ({_one_line(exc)})") from None
        from eecompile.runtime.session import EncryptedSession

        try:  # the same feed checks as the local session: missing inputs, one size per symbolic dim, mask length
            EncryptedSession._check(SimpleNamespace(session=self.session), feeds)
        except EECompileError as exc:
            raise InferenceError(_one_line(exc)) from None
        return feeds

    def _requested(self, payload: InferenceRequest) -> list[str]:
        if not payload.outputs:
            return list(self._output_names)
        names = [o.name for o in payload.outputs]
        unknown = sorted(set(names) - set(self._output_names))
        if unknown:
            raise InferenceError(f"unknown output(s) {unknown}; model '{self.name}' returns {self._output_names}")
        return names

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        """Check the request, run ONNX Runtime on the ciphertext feeds (in a thread), return the ciphertext outputs."""
        _check_model_id(payload, self.served, self.name)
        feeds = self._decode(payload)
        names = self._requested(payload)
        loop = asyncio.get_running_loop()
        try:
            results = await loop.run_in_executor(None, self.session.run, names, feeds)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime rejects what the checks above could not see
            raise InferenceError(f"ONNX Runtime could not run the request: {_one_line(exc).splitlines()[0][:400]}") \
                from None
        return InferenceResponse(model_name=self.name, model_version=self.served.model_id,
                                 outputs=[NumpyCodec.encode_output(n, r) for n, r in zip(names, results)])


# -- generation --------------------------------------------------------------------------
class _Aborted(Exception):
    """Raised inside the decoding thread when the client went away."""


_DONE = object()


class GenerationModel(MLModel):
    """Streamed generation on ciphertext ids: the KV cache and the sampler stay on the server."""

    async def load(self) -> bool:
        """Open the decoder (its session shared with the inference runtime of this process)."""
        from eecompile.runtime.generate import ServerDecoder

        extra = _extra(self.settings)
        self.served = describe(extra["server_dir"])
        provider = extra.get("provider", "auto")
        self._base = ServerDecoder(self.served.model_path, provider, max_positions=extra.get("max_positions"))
        with _SESSIONS_LOCK:  # the inference runtime of this process reuses the decoder's session
            _SESSIONS.setdefault((str(self.served.model_path), provider), self._base.session)
        self._executor = ThreadPoolExecutor(max_workers=int(extra.get("max_streams", 16)),
                                            thread_name_prefix="eecompile-generate")
        self._lock = threading.Lock()
        self.active_streams = 0
        self.streams_started = 0
        self.inputs = [MetadataTensor(name="input_ids", datatype="INT64", shape=[1, -1]),
                       MetadataTensor(name="eos_ids", datatype="INT64", shape=[-1])]
        self.outputs = [MetadataTensor(name="output_ids", datatype="INT64", shape=[1, 1])]
        return True

    async def unload(self) -> bool:
        """Stop the decoding threads."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        return True

    async def metadata(self) -> MetadataModelResponse:
        """The model id as the version; over HTTP also the streams running now (the caches held)."""
        return MetadataModelResponse(
            name=self.name, platform=PLATFORM, versions=[self.served.model_id], inputs=self.inputs,
            outputs=self.outputs,
            parameters=Parameters(**{MODEL_ID_PARAMETER: self.served.model_id, "active_streams": self.active_streams,
                                     "streams_started": self.streams_started,
                                     "vocab_size": self._base.vocab_size or 0,
                                     "max_positions": self._base.max_positions or 0}))

    def _request(self, payload: InferenceRequest):
        from eecompile.runtime.generate import GenerationError, SamplingConfig

        _check_model_id(payload, self.served, self.name)
        parameters = _parameters(payload)
        arrays = {}
        for request_input in payload.inputs:
            if request_input.name not in ("input_ids", "eos_ids"):
                raise InferenceError(f"unknown input '{request_input.name}'; model '{self.name}' takes input_ids "
                                     "and, optionally, eos_ids")
            datatype = getattr(request_input.datatype, "value", request_input.datatype)
            if datatype not in ("INT64", "INT32"):
                raise InferenceError(f"input '{request_input.name}' has datatype {datatype}; token ids are INT64")
            try:
                arrays[request_input.name] = NumpyCodec.decode_input(request_input)
            except (ValueError, TypeError) as exc:
                raise InferenceError(f"input '{request_input.name}' does not match its shape ({_one_line(exc)})") \
                    from None
        if "input_ids" not in arrays:
            raise InferenceError("missing input 'input_ids' (the encrypted prompt ids, shape [1, n])")
        ids = arrays["input_ids"]
        if ids.ndim != 2 or ids.shape[0] != 1:
            raise InferenceError(f"input 'input_ids' has shape {list(ids.shape)}; generation takes one prompt, [1, n]")
        try:
            top_p = parameters.get("top_p")  # floats arrive as text over gRPC (MLServer has no double parameter)
            sampling = SamplingConfig(float(parameters.get("temperature", 0.0)), parameters.get("top_k"),
                                      None if top_p is None else float(top_p), parameters.get("seed"))
            max_new = parameters.get("max_new_tokens", 32)
            if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 0:
                raise GenerationError(f"max_new_tokens must be a non-negative integer, got {max_new!r}")
            prompt = self._base.check_ids(ids.reshape(-1).tolist())
            if not prompt:
                raise GenerationError("the prompt is empty; generation needs at least one token")
            if self._base.max_positions is not None and len(prompt) > self._base.max_positions:
                raise GenerationError(f"the prompt has {len(prompt)} tokens but the model's context holds "
                                      f"{self._base.max_positions}")
            eos = self._base.check_ids(arrays["eos_ids"].reshape(-1).tolist()) if "eos_ids" in arrays else []
        except (EECompileError, TypeError, ValueError) as exc:
            raise InferenceError(_one_line(exc)) from None
        return prompt, max_new, sampling, eos

    def _decode(self, prompt, max_new, sampling, eos, push, aborted: threading.Event) -> None:
        """One stream in a worker thread: a fresh decoder state on the shared session, freed when it ends."""
        decoder = copy.copy(self._base)  # shares the session and samplers; reset() gives it its own cache
        decoder.reset()
        with self._lock:
            self.active_streams += 1
            self.streams_started += 1

        def stream(token: int) -> None:
            if aborted.is_set():
                raise _Aborted()
            push(token)

        try:
            result = decoder.generate(prompt, max_new, sampling, eos_ids=eos, stream=stream)
            push((_DONE, result))
        except _Aborted:
            pass
        except Exception as exc:  # noqa: BLE001 - reported to the client as the stream's error
            push(exc)
        finally:
            decoder.reset()  # drop the KV cache and logits now, not when the copy is collected
            with self._lock:
                self.active_streams -= 1

    async def predict_stream(self, payloads):
        """Prefill the encrypted prompt, then yield each encrypted id as the on-device sampler picks it.

        Request parameters: ``max_new_tokens``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
        ``eecompile_model_id``; input ``eos_ids`` (encrypted) is optional. The last response
        has no outputs and the parameter ``finish_reason`` (length, eos, context). A client that
        goes away stops the decoding at the next token and frees the cache.
        """
        payload = await payloads.__anext__()
        prompt, max_new, sampling, eos = self._request(payload)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        aborted = threading.Event()

        def push(item) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        future = loop.run_in_executor(self._executor, self._decode, prompt, max_new, sampling, eos, push, aborted)
        index = 0
        try:
            while True:
                item = await queue.get()
                if isinstance(item, tuple) and item and item[0] is _DONE:
                    result = item[1]
                    yield InferenceResponse(model_name=self.name, model_version=self.served.model_id, outputs=[],
                                            parameters=Parameters(finish_reason=result.finish_reason,
                                                                  generated=len(result.ids),
                                                                  prefill_seconds=result.prefill_seconds))
                    break
                if isinstance(item, BaseException):
                    raise InferenceError(_one_line(item))
                yield InferenceResponse(
                    model_name=self.name, model_version=self.served.model_id,
                    outputs=[ResponseOutput(name="output_ids", datatype="INT64", shape=[1, 1], data=[int(item)])],
                    parameters=Parameters(index=index))
                index += 1
        finally:
            aborted.set()  # the thread stops at its next token and frees the cache
            del future

