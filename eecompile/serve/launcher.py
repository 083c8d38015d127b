"""``eecompile serve``: run MLServer on one compiled ``server/`` folder, HTTP and gRPC, until stopped.

MLServer does the serving (the Open Inference Protocol's REST and gRPC endpoints, health,
metadata, parallel workers, adaptive batching, Prometheus metrics). This module adds what
it lacks for this use: a fixed model repository (the models of the folder, nothing scanned
from the working directory), a request-size limit on HTTP (gRPC has its own), a 4xx answer
for a streamed request refused before its first token, one log line (not a traceback) for a
refused gRPC request, and one "ready" line on stderr with the ports (``--http-port 0`` /
``--grpc-port 0`` pick free ones).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys

from mlserver import MLServer
from mlserver.errors import MLServerError, ModelNotFound
from mlserver.repository import ModelRepository

from eecompile.serve.interface import ServedModel, ServeError, describe
from eecompile.serve.settings import ServeOptions, model_settings, server_settings

_STREAM_PATHS = ("/generate_stream", "/infer_stream")


class FixedRepository(ModelRepository):
    """MLServer's model repository of ``eecompile serve``: exactly the models of the served folder."""

    models: list = []

    def __init__(self, root: str = "", **kwargs) -> None:  # noqa: ARG002 - MLServer passes its repository root
        pass

    async def list(self) -> list:
        """The served models' settings (the repository index lists them with their model id as version)."""
        return list(type(self).models)

    async def find(self, name: str) -> list:
        """The settings of model ``name``."""
        found = [m for m in type(self).models if m.name == name]
        if not found:
            raise ModelNotFound(name)
        return found


class _TooLarge(Exception):
    pass


async def _send_json(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class ProtocolGuard:
    """ASGI middleware: 413 for a body over the limit; a streamed request refused before its first event gets
    the refusal's status (400/404) and message instead of a broken ``200 text/event-stream``."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: int | str) -> str:
        return (f"the request body has {size} bytes; this server takes at most {self.max_bytes} "
                "(eecompile serve --max-request-mb)")

    async def __call__(self, scope, receive, send) -> None:
        """Guard one HTTP request."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await _send_json(send, 413, self._too_large(int(length)))
            return
        received = 0
        streaming = scope.get("path", "").endswith(_STREAM_PATHS)
        held: list[dict] = []
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _TooLarge()
            return message

        async def guarded_send(message) -> None:
            nonlocal started
            if streaming and message["type"] == "http.response.start" and not started:
                held.append(message)  # sent with the first event, or replaced by the refusal
                return
            if held:
                await send(held.pop())
            started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            if started:
                raise
            await _send_json(send, 413, self._too_large(f"more than {self.max_bytes}"))
        except Exception as exc:  # noqa: BLE001 - re-raised unless it is a protocol refusal we can still answer
            cause = exc if isinstance(exc, MLServerError) else exc.__cause__
            if started or not isinstance(cause, MLServerError):
                raise
            await _send_json(send, cause.status_code, str(cause))


class OneLineRefusals(logging.Filter):
    """MLServer logs a refused gRPC request (a 4xx ``MLServerError``: the client's mistake, already answered
    with its status) as an ERROR with the server's traceback; this turns it into one WARNING line. Server
    faults (5xx and other exceptions) keep their traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite a refusal's record in place; every record is kept."""
        error = record.exc_info[1] if record.exc_info else None
        status = getattr(error, "status_code", 500)
        if isinstance(error, MLServerError) and isinstance(status, int) and status < 500:
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.WARNING, logging.getLevelName(logging.WARNING)
            record.msg, record.args = f"refused a request ({status}): {error}", ()
        return True


GRPC_LOGGER = "mlserver.grpc"
"""The logger MLServer's gRPC error handler writes to."""


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_port(host: str, port: int, label: str) -> None:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise ServeError(f"cannot listen on {host}:{port} for {label}: {exc.strerror or exc}") from None


async def _accepting(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    return True


async def _announce(server: MLServer, served: ServedModel, options: ServeOptions, names: list[str]) -> None:
    """Print one line on stderr once every model is loaded and both ports accept connections."""
    while True:
        await asyncio.sleep(0.05)
        models = list(await server._model_registry.get_models())
        if len(models) == len(names) and all(m.ready for m in models) and \
                await _accepting(options.host, options.http_port) and await _accepting(options.host, options.grpc_port):
            break
    print(f"eecompile: serving {', '.join(repr(n) for n in names)} (model id {served.model_id[:16]}) on "
          f"http://{options.host}:{options.http_port} and grpc {options.host}:{options.grpc_port}; ready",
          file=sys.stderr, flush=True)


async def _run(served: ServedModel, options: ServeOptions) -> None:
    settings = server_settings(options)
    models = model_settings(served, options)
    FixedRepository.models = models
    server = MLServer(settings)
    rest = getattr(getattr(server, "_rest_server", None), "_app", None)
    if rest is None:  # pragma: no cover - another MLServer layout
        raise ServeError("this MLServer version has no REST app to guard; install mlserver 1.7")
    rest.add_middleware(ProtocolGuard, max_bytes=options.max_request_bytes)
    grpc_logger = logging.getLogger(GRPC_LOGGER)
    if not any(isinstance(f, OneLineRefusals) for f in grpc_logger.filters):
        grpc_logger.addFilter(OneLineRefusals())
    announce = asyncio.ensure_future(_announce(server, served, options, [m.name for m in models]))
    try:
        await server.start(models)
    finally:
        announce.cancel()


def serve(server_dir, options: ServeOptions) -> None:
    """Serve ``server_dir`` with ``options`` until SIGINT/SIGTERM (ports 0 are replaced by free ones)."""
    served = describe(server_dir)
    if options.http_port == 0 or options.grpc_port == 0:
        from dataclasses import replace

        options = replace(options, http_port=options.http_port or _free_port(options.host),
                          grpc_port=options.grpc_port or _free_port(options.host))
    if options.http_port == options.grpc_port:
        raise ServeError(f"--http-port and --grpc-port are both {options.http_port}; give two ports")
    _check_port(options.host, options.http_port, "HTTP")
    _check_port(options.host, options.grpc_port, "gRPC")
    from eecompile.runtime.ort_session import resolve_providers

    resolve_providers(options.provider)  # --provider cuda without CUDA: one line now, not a failed model load
    asyncio.run(_run(served, options))
