"""MLServer settings for serving one compiled ``server/`` folder — built in memory, nothing written to it.

The folder's files are the model id's input (``compiler.model_id`` hashes every file in it), so
the launcher never adds a ``model-settings.json`` there: the server settings and the model
settings are pydantic objects handed to MLServer directly. This module imports
``mlserver.settings`` and so belongs to the serving process only.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlserver.settings import ModelParameters, ModelSettings, Settings

from eecompile.serve.interface import GENERATE_SUFFIX, ServedModel

INFER_RUNTIME = "eecompile.serve.runtime.EncryptedOnnxModel"
GENERATE_RUNTIME = "eecompile.serve.runtime.GenerationModel"


@dataclass(frozen=True)
class ServeOptions:
    """What ``eecompile serve`` was asked for."""

    name: str
    host: str = "127.0.0.1"
    http_port: int = 8080
    grpc_port: int = 8081
    provider: str = "auto"
    workers: int = 0  # MLServer parallel inference workers for single-pass requests (0: in the server process)
    metrics_port: int | None = None  # Prometheus metrics on this port; None: off
    max_request_bytes: int = 64 << 20
    max_streams: int = 16  # concurrent generations (one decoding thread each); more wait for a free one
    max_batch_size: int = 0  # MLServer adaptive batching of single-pass requests (0: off)
    max_batch_time: float = 0.0
    max_positions: int | None = None


def server_settings(options: ServeOptions) -> Settings:
    """MLServer's server-wide settings: ports, workers, metrics, message limits; no model repository scan."""
    from eecompile import __version__

    metrics = options.metrics_port is not None
    return Settings(
        debug=False, host=options.host, http_port=options.http_port, grpc_port=options.grpc_port,
        parallel_workers=options.workers, server_name="eecompile", server_version=__version__,
        metrics_endpoint="/metrics" if metrics else None, metrics_port=options.metrics_port or 8082,
        grpc_max_message_length=options.max_request_bytes, gzip_enabled=False, load_models_at_startup=False,
        model_repository_implementation="eecompile.serve.launcher.FixedRepository",
    )


def model_settings(served: ServedModel, options: ServeOptions) -> list[ModelSettings]:
    """The models to serve: NAME (single-pass inference) and, for a decoder, NAME-generate (streamed generation).

    Both carry the compilation's model id as their version. The generation model stays in
    the server process (MLServer's parallel workers do not stream).
    """
    extra = {"server_dir": str(served.server_dir.resolve()), "provider": options.provider,
             "max_streams": options.max_streams, "max_positions": options.max_positions}
    infer = ModelSettings(name=options.name, implementation=INFER_RUNTIME, platform="eecompile_onnxruntime",
                          max_batch_size=options.max_batch_size, max_batch_time=options.max_batch_time,
                          parameters=ModelParameters(version=served.model_id, extra=extra))
    models = [infer]
    if served.is_decoder:
        kwargs = {"parallel_workers": 0} if options.workers else {}  # MLServer's per-model opt-out of the pool
        models.insert(0, ModelSettings(name=options.name + GENERATE_SUFFIX, implementation=GENERATE_RUNTIME,
                                       platform="eecompile_onnxruntime",
                                       parameters=ModelParameters(version=served.model_id, extra=extra), **kwargs))
    return models
