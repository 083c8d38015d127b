"""What a compiled ``server/`` folder serves: its tensors as the Open Inference Protocol names them, and its id.

Pure (onnx only, no serving engine): the launcher, the Triton exporter and the tests read
it. The model id is :func:`eecompile.compiler.model_id` of the folder — the id the client
bundle records — so a client can tell whether a server serves its compilation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
from onnx import TensorProto

from eecompile.errors import EECompileError

MODEL_FILE = "model.onnx"
GENERATE_SUFFIX = "-generate"  # the streamed-generation model of a decoder is served as NAME-generate
MODEL_ID_PARAMETER = "eecompile_model_id"  # request parameter: the compilation the client encrypted for
PLATFORM = "eecompile_onnxruntime"

# ONNX element type -> Open Inference Protocol datatype (Triton's config uses TYPE_ + the same, STRING for BYTES)
OIP_DATATYPES = {
    TensorProto.FLOAT: "FP32", TensorProto.FLOAT16: "FP16", TensorProto.DOUBLE: "FP64",
    TensorProto.BFLOAT16: "BF16", TensorProto.INT8: "INT8", TensorProto.INT16: "INT16",
    TensorProto.INT32: "INT32", TensorProto.INT64: "INT64", TensorProto.UINT8: "UINT8",
    TensorProto.UINT16: "UINT16", TensorProto.UINT32: "UINT32", TensorProto.UINT64: "UINT64",
    TensorProto.BOOL: "BOOL", TensorProto.STRING: "BYTES",
}


class ServeError(EECompileError):
    """A server folder that cannot be served, a bad serving option, or a server that does not match a bundle."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output: its name, protocol datatype and shape (-1 for a symbolic or unknown dim)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    dims: tuple[int | str | None, ...]  # as the model states them (symbol names kept)


@dataclass(frozen=True)
class ServedModel:
    """A compiled server folder: the model file, its compilation id, its tensors, and whether it generates."""

    server_dir: Path
    model_path: Path
    model_id: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def is_decoder(self) -> bool:
        """Whether the model has the decoder interface generation uses: ``input_ids`` in, ``logits``
        ``[batch, sequence, vocab]`` out (a classifier's 2-D logits are not a decoder's)."""
        return any(t.name == "input_ids" for t in self.inputs) and \
            any(t.name == "logits" and len(t.shape) == 3 for t in self.outputs)


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise ServeError(f"'{value.name}' is not a tensor; the Open Inference Protocol serves tensors only")
    datatype = OIP_DATATYPES.get(tensor.elem_type)
    if datatype is None:
        raise ServeError(f"'{value.name}' has ONNX element type "
                         f"{TensorProto.DataType.Name(tensor.elem_type)}, which the protocol cannot carry")
    dims: list[int | str | None] = []
    for d in tensor.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else (d.dim_param or None))
    shape = tuple(d if isinstance(d, int) else -1 for d in dims)
    return TensorSpec(value.name, datatype, shape, tuple(dims))


def describe(server_dir: str | Path) -> ServedModel:
    """The :class:`ServedModel` of a compiled ``server/`` folder (one clear :class:`ServeError` otherwise)."""
    from eecompile.compiler import model_id

    server_dir = Path(server_dir)
    if not server_dir.is_dir():
        raise ServeError(f"no server folder at {server_dir}" if not server_dir.exists() else
                         f"{server_dir} is not a folder; give the compiled server/ folder")
    path = server_dir / MODEL_FILE
    if not path.is_file():
        hint = " (give OUT/server, not OUT)" if (server_dir / "server" / MODEL_FILE).is_file() else ""
        raise ServeError(f"no {MODEL_FILE} in {server_dir}{hint}")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf errors of a file that is not a model
        raise ServeError(f"cannot read {path} as an ONNX model ({type(exc).__name__})") from None
    initializers = {t.name for t in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in model.graph.output)
    return ServedModel(server_dir, path, model_id(server_dir), inputs, outputs)
