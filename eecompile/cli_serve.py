"""The serving commands of the CLI: ``serve``, ``export-triton`` and ``generate --server``.

Registered by :func:`add_parsers` from :func:`eecompile.cli.build_parser`; errors are
:class:`~eecompile.errors.EECompileError` lines like every other command's.
"""

from __future__ import annotations

import argparse
import sys

from eecompile.errors import EECompileError

PROVIDERS = ("auto", "cuda", "cpu")


def _missing_extra(exc: ImportError) -> EECompileError:
    from eecompile.serve.interface import ServeError

    return ServeError(f"serving needs the [serve] extra ({exc.name or exc} is not installed): "
                      "pip install 'eecompile[serve]'")


def _positive(value: int | float | None, flag: str, minimum: float = 0) -> None:
    from eecompile.cli import UsageError

    if value is not None and value < minimum:
        raise UsageError(f"{flag} must be >= {minimum:g}, got {value}")


def _cmd_serve(args: argparse.Namespace) -> int:
    """``eecompile serve SERVER_DIR``: MLServer with the eecompile runtime, HTTP and gRPC, until Ctrl-C/SIGTERM."""
    from eecompile.cli import UsageError
    from eecompile.serve.interface import describe

    for flag, value in (("--http-port", args.http_port), ("--grpc-port", args.grpc_port)):
        if not 0 <= value <= 65535:
            raise UsageError(f"{flag} must be a port in 0..65535 (0: a free one), got {value}")
    if args.metrics_port is not None and not 1 <= args.metrics_port <= 65535:
        raise UsageError(f"--metrics-port must be a port in 1..65535, got {args.metrics_port}")
    _positive(args.workers, "--workers")
    _positive(args.max_streams, "--max-streams", 1)
    _positive(args.max_request_mb, "--max-request-mb", 0.001)
    _positive(args.max_batch_size, "--max-batch-size")
    served = describe(args.server_dir)  # a bad folder is one line before MLServer is imported
    try:
        from eecompile.serve.launcher import serve
        from eecompile.serve.settings import ServeOptions
    except ImportError as exc:
        raise _missing_extra(exc) from None
    name = args.name or "eecompile"
    options = ServeOptions(name=name, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                           provider=args.provider, workers=args.workers, metrics_port=args.metrics_port,
                           max_request_bytes=int(args.max_request_mb * (1 << 20)), max_streams=args.max_streams,
                           max_batch_size=args.max_batch_size, max_batch_time=args.max_batch_ms / 1000.0,
                           max_positions=args.max_context)
    print(f"eecompile: serving {served.server_dir} (model id {served.model_id[:16]}, "
          f"{'decoder: also ' + name + '-generate' if served.is_decoder else 'single-pass'})", file=sys.stderr,
          flush=True)
    serve(served.server_dir, options)
    return 0


def _cmd_export_triton(args: argparse.Namespace) -> int:
    """``eecompile export-triton SERVER_DIR --repo REPO``: a model repository for Triton's onnxruntime backend."""
    from eecompile.triton import export_triton

    result = export_triton(args.server_dir, args.repo, name=args.name, max_batch_size=args.max_batch_size,
                           instances=args.instances, gpu=args.gpu, force=args.force)
    print(f"wrote Triton model '{result.name}' into {result.model_dir}/ (config.pbtxt checked against Triton's "
          f"ModelConfig; model id {result.model_id[:16]} as version 1)")
    if result.decoder:
        print("  note: the decoder serves single-pass requests there (the client feeds the KV cache back); "
              "streamed generation with the cache on the server needs 'eecompile serve'")
    return 0


def cmd_generate_remote(args: argparse.Namespace) -> int:
    """``eecompile generate OUT --server URL``: the client side only; the server generates on ciphertext."""
    from eecompile.cli import PROG, UsageError, _parse_ids

    if args.max_new_tokens < 0:
        raise UsageError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.max_context is not None:
        raise UsageError("--max-context is the server's setting with --server (eecompile serve --max-context)")
    try:
        from eecompile.remote import RemoteGenerator
    except ImportError as exc:
        raise _missing_extra(exc) from None
    from pathlib import Path

    generator = RemoteGenerator(args.server, Path(args.out_dir) / "client", protocol=args.protocol,
                                model_name=args.model_name)
    if args.prompt is not None:
        prompt = args.prompt
    else:
        prompt = _parse_ids(args.prompt_ids)
        if not prompt:
            raise UsageError("--prompt-ids is empty")
    try:
        result = generator.generate(prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                    top_p=args.top_p, seed=args.seed, add_special_tokens=not args.no_special_tokens)
    finally:
        generator.close()
    if result.finish_reason == "context":
        print(f"{PROG}: stopped after {len(result.plain_ids)} tokens: the model's context is full", file=sys.stderr)
    if args.show_wire:
        print(f"{PROG}: prompt ids as the server saw them: {' '.join(map(str, result.prompt_wire_ids))}",
              file=sys.stderr)
        print(f"{PROG}: generated ids as the server produced them: {' '.join(map(str, result.wire_ids))} "
              f"(stopped: {result.finish_reason})", file=sys.stderr)
    if args.prompt is not None:
        sys.stdout.write(result.text)
        if sys.stdout.isatty():
            sys.stdout.write("\n")
    else:
        sys.stdout.write(" ".join(map(str, result.plain_ids)) + "\n")
    sys.stdout.flush()
    return 0


def _with_server(local):
    """The generate command: remote with ``--server``, the local path otherwise."""

    def run(args: argparse.Namespace) -> int:
        if getattr(args, "server", None):
            return cmd_generate_remote(args)
        return local(args)

    return run


def add_parsers(sub, generate: argparse.ArgumentParser | None = None) -> None:
    """Add ``serve`` and ``export-triton`` to the subcommands, and ``--server`` to the ``generate`` parser."""
    p = sub.add_parser("serve", help="serve a compiled server/ folder over the Open Inference Protocol (HTTP, gRPC)",
                       description="Serve SERVER_DIR (the server/ folder of a compilation; the server never needs "
                                   "client/) with MLServer over the Open Inference Protocol, HTTP and gRPC: "
                                   "health, readiness, metadata (ciphertext tensors; the model id as version) and "
                                   "inference as model NAME; a decoder also streams generation as NAME-generate "
                                   "(KV cache and sampler on the server). Needs the [serve] extra. Stops on "
                                   "Ctrl-C / SIGTERM.")
    p.add_argument("server_dir", metavar="SERVER_DIR", help="the compiled server/ folder")
    p.add_argument("--name", help="model name on the server (default: eecompile)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--http-port", type=int, default=8080, help="HTTP port (default 8080; 0: a free one)")
    p.add_argument("--grpc-port", type=int, default=8081, help="gRPC port (default 8081; 0: a free one)")
    p.add_argument("--provider", choices=PROVIDERS, default="auto",
                   help="ONNX Runtime execution provider: auto (CUDA if available; the default), cuda, cpu")
    p.add_argument("--workers", type=int, default=0,
                   help="MLServer parallel inference worker processes for single-pass requests (default 0: "
                        "the server process, ONNX Runtime in threads)")
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (default: off)")
    p.add_argument("--max-request-mb", type=float, default=64.0,
                   help="largest request body, HTTP and gRPC (default 64 MiB)")
    p.add_argument("--max-streams", type=int, default=16, help="concurrent generations (default 16; more wait)")
    p.add_argument("--max-batch-size", type=int, default=0,
                   help="MLServer adaptive batching of single-pass requests up to this size (default 0: off)")
    p.add_argument("--max-batch-ms", type=float, default=10.0, help="adaptive batching wait (default 10 ms)")
    p.add_argument("--max-context", type=int, metavar="N",
                   help="the decoder's context length when the model does not say")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("export-triton", help="write a Triton Inference Server model repository for a server/ folder",
                       description="Write REPO/NAME/config.pbtxt and REPO/NAME/1/model.onnx for Triton's "
                                   "onnxruntime backend (inputs/outputs with dims, dynamic batching, instance "
                                   "groups), checked against Triton's ModelConfig protobuf. Single-pass "
                                   "inference only; streamed generation needs 'eecompile serve'.")
    p.add_argument("server_dir", metavar="SERVER_DIR", help="the compiled server/ folder")
    p.add_argument("--repo", required=True, metavar="REPO", help="the model repository folder (created if needed)")
    p.add_argument("--name", help="model name (default: eecompile)")
    p.add_argument("--max-batch-size", type=int, default=8,
                   help="Triton max_batch_size (default 8; 0: no batching, dims as the model states them)")
    p.add_argument("--instances", type=int, default=1, help="model instances (default 1)")
    p.add_argument("--gpu", action="store_true", help="instances on the GPU (KIND_GPU; default KIND_CPU)")
    p.add_argument("--force", action="store_true", help="replace REPO/NAME if it exists")
    p.set_defaults(func=_cmd_export_triton)

    if generate is not None:
        generate.add_argument("--server", metavar="URL",
                              help="generate on a remote 'eecompile serve' (grpc://host:8081 or http://host:8080); "
                                   "only OUT_DIR/client is read here")
        generate.add_argument("--protocol", choices=("grpc", "http"),
                              help="protocol for --server when the URL has no scheme (default grpc)")
        generate.add_argument("--model-name", help="the served model's name (default: the one matching the bundle)")
        generate.set_defaults(func=_with_server(generate.get_default("func")))
