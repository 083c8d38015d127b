"""``eecompile export-triton``: a Triton Inference Server model repository for a compiled ``server/`` folder.

Writes ``REPO/NAME/config.pbtxt`` and ``REPO/NAME/1/`` (the folder's files, so the version
folder hashes to the same model id the client bundle records) for Triton's onnxruntime
backend. The config is built as Triton's own ``ModelConfig`` protobuf message (the
definition ``tritonclient`` ships) and written in its text format, so a field Triton does not
know cannot be written; :func:`load_config` parses a file back against the same schema.

Only single-pass inference: Triton runs the ciphertext model as it is (a decoder's client
feeds its KV cache back). Streamed generation with the cache and sampler on the server is
``eecompile serve``'s ``NAME-generate``.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from eecompile.serve.interface import MODEL_ID_PARAMETER, ServeError, ServedModel, describe

NAME_PATTERN = "letters, digits, '-', '_' and '.'"


@dataclass(frozen=True)
class TritonExport:
    """What :func:`export_triton` wrote."""

    name: str
    model_dir: Path
    config_path: Path
    model_id: str
    decoder: bool


def _model_config():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as exc:
        raise ServeError(f"export-triton needs tritonclient for Triton's ModelConfig schema ({exc.name} is not "
                         "installed): pip install 'eecompile[serve]'") from None
    return model_config_pb2


def build_config(served: ServedModel, name: str, max_batch_size: int, instances: int, gpu: bool):
    """The ``ModelConfig`` message for ``served`` (dims without the batch dim when ``max_batch_size > 0``)."""
    pb = _model_config()
    config = pb.ModelConfig(name=name, backend="onnxruntime", max_batch_size=max_batch_size)
    for side, specs in (("input", served.inputs), ("output", served.outputs)):
        for spec in specs:
            dims = list(spec.shape)
            if max_batch_size > 0:
                if not dims or spec.dims[0] is None or isinstance(spec.dims[0], int):
                    raise ServeError(f"'{spec.name}' has no symbolic batch dim first (shape {list(spec.dims)}); "
                                     "Triton batches along a leading dim every tensor shares: use --max-batch-size 0")
                dims = dims[1:]
            datatype = "TYPE_STRING" if spec.datatype == "BYTES" else f"TYPE_{spec.datatype}"
            entry = getattr(config, side).add(name=spec.name, data_type=pb.DataType.Value(datatype))
            entry.dims.extend(dims)
    if max_batch_size > 0:
        batch_dims = {spec.dims[0] for spec in served.inputs + served.outputs}
        if len(batch_dims) != 1:
            raise ServeError(f"the tensors' leading dims differ ({sorted(map(str, batch_dims))}); Triton's batch dim "
                             "must be one: use --max-batch-size 0")
        config.dynamic_batching.SetInParent()
    group = config.instance_group.add(count=instances,
                                      kind=pb.ModelInstanceGroup.KIND_GPU if gpu else pb.ModelInstanceGroup.KIND_CPU)
    if gpu:
        group.gpus.append(0)
    config.version_policy.specific.versions.append(1)
    config.parameters[MODEL_ID_PARAMETER].string_value = served.model_id
    return config


def load_config(path: str | Path):
    """Parse a ``config.pbtxt`` against Triton's ``ModelConfig`` (unknown fields or bad enums raise ``ServeError``)."""
    from google.protobuf import text_format

    pb = _model_config()
    try:
        return text_format.Parse(Path(path).read_text(), pb.ModelConfig())
    except text_format.ParseError as exc:
        raise ServeError(f"{path} is not a valid Triton ModelConfig: {exc}") from None


def export_triton(server_dir: str | Path, repo: str | Path, *, name: str | None = None, max_batch_size: int = 8,
                  instances: int = 1, gpu: bool = False, force: bool = False) -> TritonExport:
    """Write ``repo/name/{config.pbtxt,1/}`` for ``server_dir``; refuses an existing model folder unless ``force``."""
    from google.protobuf import text_format

    name = name or "eecompile"
    if not name or name in (".", "..") or not all(c.isalnum() or c in "-_." for c in name):
        raise ServeError(f"model name {name!r} must be {NAME_PATTERN}")
    if max_batch_size < 0:
        raise ServeError(f"--max-batch-size must be >= 0, got {max_batch_size}")
    if instances < 1:
        raise ServeError(f"--instances must be >= 1, got {instances}")
    served = describe(server_dir)
    config = build_config(served, name, max_batch_size, instances, gpu)
    repo = Path(repo)
    if repo.exists() and not repo.is_dir():
        raise ServeError(f"{repo} is not a folder; give the model repository folder")
    target = repo / name
    if target.exists() and not force:
        raise ServeError(f"{target} already exists; refusing to replace it (use --force)")
    repo.mkdir(parents=True, exist_ok=True)
    staging = repo / f".{name}.eecompile-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        (staging / "1").mkdir(parents=True)
        for path in sorted(served.server_dir.iterdir()):
            if path.is_file():
                shutil.copy2(path, staging / "1" / path.name)
        (staging / "config.pbtxt").write_text(text_format.MessageToString(config))
        load_config(staging / "config.pbtxt")  # the file reads back as a ModelConfig
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return TritonExport(name, target, target / "config.pbtxt", served.model_id, served.is_decoder)
