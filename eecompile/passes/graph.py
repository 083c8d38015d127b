"""Loading an ONNX model into an editable graph, with shapes and constant access."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from eecompile.errors import ModelFileError
from eecompile.passes.store import FileValues, TensorStore, external_values, externalize

Dim = int | str | None


def load_model(path: str | Path, store: TensorStore | None = None) -> onnx.ModelProto:
    """Load an ONNX model's structure, failing with one clear line.

    External data is not read here: :class:`ModelGraph` reads each such tensor from its file
    only when a pass needs its values. With a ``store``, weights embedded in the protobuf move
    to its scratch file and the proto is re-parsed, so memory holds the structure only.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    try:  # first, so the checker's own copy is gone before the model is loaded
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ModelFileError(f"{path} is not a valid ONNX model: {str(exc).strip().splitlines()[0]}") from None
    except Exception as exc:  # not parseable at all
        raise ModelFileError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelFileError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    if not model.graph.node:
        raise ModelFileError(f"{path} is not an ONNX model with a graph (no nodes found)")
    if store is not None and store.scratch is not None:
        externalize(model, store)
        slim = onnx.ModelProto()
        slim.ParseFromString(model.SerializeToString())  # drops the arena that held the weights
        model = slim
    return model


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Shape inference that reasons about run-time shape arithmetic (stale value_info dropped first).

    ONNX Runtime's symbolic shape inference evaluates Shape → Gather → Concat chains and keeps
    symbolic dimensions as expressions (``batch_size``, ``past_sequence_length + sequence_length``),
    so a head split whose target shape is computed at run time still reads
    ``[batch, seq, 4, 16]``. Where it cannot run (ops it does not know, such as opset-23
    ``Attention``), ONNX shape inference with data propagation is used. Returns the model
    unchanged when both fail.
    """
    del model.graph.value_info[:]
    inferred = _symbolic_shapes(model)
    if inferred is not None:
        return inferred
    try:
        return onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:
        try:
            return onnx.shape_inference.infer_shapes(model)
        except Exception:
            return model


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX Runtime's symbolic shape inference (auto-merging symbols), or None when it fails.

    Shapes it could not infer are kept partial rather than discarded (its public entry point
    raises, and writes a file into the working directory, when any shape is left unknown).
    The declared graph outputs keep their own types; value_info without a shape is dropped.
    """
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return None
    outputs = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in model.graph.output]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
            inference._preprocess(model)
            while inference.run_:
                inference._infer_impl()
            inferred = inference.out_mp_
    except Exception:  # it asserts on ops it does not know
        return None
    del inferred.graph.output[:]
    inferred.graph.output.extend(outputs)
    kept = [v for v in inferred.graph.value_info if v.type.tensor_type.HasField("shape")]
    del inferred.graph.value_info[:]
    inferred.graph.value_info.extend(kept)
    return inferred


class ModelGraph:
    """An onnx-graphsurgeon graph with lookups the passes need.

    ``base_dir`` resolves external-data locations; ``store`` receives rewritten tensors.
    """

    def __init__(self, model: onnx.ModelProto, base_dir: str | Path = ".", store: TensorStore | None = None) -> None:
        self.opset_imports = {o.domain or "": o.version for o in model.opset_import}
        self.ir_version = model.ir_version
        self.metadata = {p.key: p.value for p in model.metadata_props}
        self.producer = (model.producer_name, model.producer_version)
        self.store = store or TensorStore()
        self.graph: gs.Graph = gs.import_onnx(model)
        for tensor in self.graph.tensors().values():
            if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues) \
                    and not isinstance(tensor._values, FileValues):
                values = external_values(tensor._values.tensor, Path(base_dir))
                if values is not None:
                    tensor._values = values
            if isinstance(tensor, gs.Constant):
                # Where values live is ours to track (FileValues / arrays); graphsurgeon's flag goes
                # stale once its getter swaps a loaded array in, and would export data as "external".
                tensor.data_location = None
        self.graph.toposort()
        self._refresh()

    def _refresh(self) -> None:
        self.tensors: dict[str, gs.Tensor] = self.graph.tensors()
        self.input_names = [t.name for t in self.graph.inputs]
        self.output_names = [t.name for t in self.graph.outputs]

    def refresh(self) -> None:
        """Re-read the tensor map after the graph was edited."""
        self.graph.cleanup(remove_unused_graph_inputs=False).toposort()
        self._refresh()

    @property
    def nodes(self) -> list[gs.Node]:
        """Nodes in topological order."""
        return list(self.graph.nodes)

    def const(self, tensor: gs.Tensor | str | None) -> np.ndarray | None:
        """The value of a constant tensor, or None for activations and missing inputs."""
        if tensor is None:
            return None
        if isinstance(tensor, str):
            tensor = self.tensors.get(tensor)
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        return None

    def const_shape(self, tensor: gs.Tensor | None) -> tuple[int, ...] | None:
        """Shape of a constant tensor without reading its values, else None."""
        if isinstance(tensor, gs.Constant):
            return tuple(int(d) for d in tensor.shape)
        return None

    def set_values(self, tensor: gs.Constant, value: np.ndarray) -> None:
        """Replace a constant's values (large ones go to the tensor store, not memory)."""
        tensor.values = self.store.put(tensor.name, value)
        tensor.data_location = None  # graphsurgeon would otherwise re-export it as external

    def shape(self, tensor: gs.Tensor) -> list[Dim] | None:
        """Static or symbolic shape of a tensor, None when unknown."""
        if isinstance(tensor, gs.Constant):
            return list(tensor.shape)
        if tensor.shape is None:
            return None
        return [d if isinstance(d, (int, str)) else None for d in tensor.shape]

    def rank(self, tensor: gs.Tensor) -> int | None:
        """Rank of a tensor, None when unknown."""
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def is_float(self, tensor: gs.Tensor) -> bool:
        """Whether the tensor holds floating-point values."""
        dtype = tensor.dtype
        if dtype is None:
            return False
        try:
            return np.issubdtype(np.dtype(dtype), np.floating)
        except TypeError:
            return False

    def export(self) -> onnx.ModelProto:
        """The graph as an ONNX model (opset imports preserved)."""
        model = gs.export_onnx(self.graph, do_type_check=False)
        model.ir_version = self.ir_version
        model.producer_name, model.producer_version = self.producer
        if self.metadata:
            onnx.helper.set_model_props(model, self.metadata)
        del model.opset_import[:]
        for domain, version in sorted(self.opset_imports.items()):
            model.opset_import.append(onnx.helper.make_opsetid(domain, version))
        return model
