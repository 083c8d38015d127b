"""Loading an ONNX model into an editable graph, with shapes and constant access."""

from __future__ import annotations

import contextlib
import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from eecompile.errors import ModelFileError
from eecompile.passes.options import CompileOptions
from eecompile.passes.precision import BFLOAT16, is_float_dtype
from eecompile.passes.store import (INLINE_BYTES, DerivedValues, FileValues, TensorStore, external_values,
                                    load_structure)

Dim = int | str | None


ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.training", "ai.onnx.preview.training"})
"""Domains whose ops ``onnx.checker`` validates against ONNX's own schemas (it skips all others)."""

_RENAMED_DOMAIN = "eecompile.ort_registered"
_NO_OP = re.compile(r"No Op registered for (\S+) with domain_version of (\d+)")


@dataclass(frozen=True)
class Validity:
    """Which checks a model passed: ``onnx.checker`` and, for the ops ONNX does not know, ONNX Runtime's registry.

    ``ort_ops``: ``domain::op`` (``op`` in the default domain) of the ops ``onnx.checker`` has no schema for,
    checked against ONNX Runtime's operator schemas instead (input/output counts, attribute names, required
    attributes). ``unregistered``: ops of custom domains neither registry knows (``onnx.checker`` skips
    custom domains; ONNX Runtime needs a custom-op library for them).
    """

    ort_ops: tuple[str, ...] = ()
    unregistered: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the report: ``onnx.checker`` or ``onnx.checker + ONNX Runtime op registry (...)``."""
        text = "onnx.checker"
        if self.ort_ops:
            text += f" + ONNX Runtime op registry (ops onnx.checker does not know: {', '.join(self.ort_ops)})"
        if self.unregistered:
            text += f"; not checked (custom-domain ops no registry knows: {', '.join(self.unregistered)})"
        return text


class InvalidModel(ValueError):
    """A model that neither ``onnx.checker`` nor ONNX Runtime's op registry accepts (one line)."""


def load_model(path: str | Path, store: TensorStore | None = None) -> onnx.ModelProto:
    """Load an ONNX model's structure, failing with one clear line (see :func:`load_checked`)."""
    return load_checked(path, store)[0]


def load_checked(path: str | Path, store: TensorStore | None = None) -> tuple[onnx.ModelProto, Validity]:
    """Load an ONNX model's structure and say which validity checks it passed.

    ``onnx.checker`` runs on the file first. A model it rejects only because an op is unknown to ONNX
    (``No Op registered for SimplifiedLayerNormalization with domain_version of 22``: ONNX Runtime's
    ops in the default domain) is accepted when ONNX Runtime registers every such op for that domain
    version; the rest of the model is then checked by ``onnx.checker`` with those ops set aside.
    Contrib ops (``com.microsoft``), which ``onnx.checker`` skips, are checked against ONNX Runtime's
    schemas as well. :class:`Validity` records what was applied.

    External data is not read here: :class:`ModelGraph` reads each such tensor from its file
    only when a pass needs its values. With a ``store``, weights embedded in the protobuf are not
    read either: the structure is read past them and they are referenced in place, inside the model
    file, so memory holds the structure only (``onnx.checker`` then checks that structure).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file not found: {path}")
    if store is not None and store.scratch is not None:
        return _load_structure_checked(path)
    rejected = None
    try:  # first, so the checker's own copy is gone before the model is loaded
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        rejected = str(exc).strip().splitlines()[0]
        if not _NO_OP.search(rejected):
            raise ModelFileError(f"{path} is not a valid ONNX model: {rejected}") from None
    except Exception as exc:  # not parseable at all
        raise ModelFileError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelFileError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    return model, _checked_ops(model, path, rejected)


def _checked_ops(model: onnx.ModelProto, path: Path, rejected: str | None) -> Validity:
    if not model.graph.node:
        raise ModelFileError(f"{path} is not an ONNX model with a graph (no nodes found)")
    try:
        return check_registered_ops(model, checker_failed=rejected)
    except InvalidModel as exc:
        raise ModelFileError(f"{path} is not a valid ONNX model: {exc}") from None


def _load_structure_checked(path: Path) -> tuple[onnx.ModelProto, Validity]:
    """:func:`load_checked` without reading the weights: the structure is read past them
    (:func:`~eecompile.passes.store.load_structure`), ``onnx.checker`` checks it with the large and external
    weights as typed inputs (their sizes were checked against their shapes on the way, external files here)."""
    try:
        model = load_structure(path)
    except ModelFileError:
        raise
    except Exception as exc:  # protobuf raises several unrelated types
        raise ModelFileError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {exc})") from None
    for tensor in model.graph.initializer:
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if tensor.data_location == onnx.TensorProto.EXTERNAL and location is not None:
            target = Path(location)
            if target.is_absolute() or ".." in target.parts:
                raise ModelFileError(f"{path} is not a valid ONNX model: external data of '{tensor.name}' lies "
                                     f"outside the model's folder ({location})")
            if not (path.parent / target).is_file():
                raise ModelFileError(f"{path}: external data file {path.parent / target} of '{tensor.name}' "
                                     "not found")
    rejected = None
    try:
        onnx.checker.check_model(_slim_copy(model), full_check=False)
    except onnx.checker.ValidationError as exc:
        rejected = str(exc).strip().splitlines()[0]
        if not _NO_OP.search(rejected):
            raise ModelFileError(f"{path} is not a valid ONNX model: {rejected}") from None
    return model, _checked_ops(model, path, rejected)


def check_model(model: onnx.ModelProto, path: str | Path | None = None) -> Validity:
    """``onnx.checker`` (on ``path`` when given) plus ONNX Runtime's registry for the ops ONNX does not know.

    Raises :class:`InvalidModel` with one line when the model fails either.
    """
    try:
        onnx.checker.check_model(str(path) if path is not None else model, full_check=False)
        rejected = None
    except onnx.checker.ValidationError as exc:
        rejected = str(exc).strip().splitlines()[0]
        if not _NO_OP.search(rejected):
            raise InvalidModel(rejected) from None
    return check_registered_ops(model, checker_failed=rejected)


def check_registered_ops(model: onnx.ModelProto, checker_failed: str | None = None) -> Validity:
    """Check the ops ONNX has no schema for against ONNX Runtime's; re-run ``onnx.checker`` without them.

    ``checker_failed``: the line ``onnx.checker`` rejected the model with (an unknown op), or None when it
    passed. Then the model's structure (initializers as typed inputs: ``onnx.checker`` validated them
    before it reached the nodes) is checked again with the ONNX Runtime ops moved to a private domain,
    which ``onnx.checker`` skips.
    """
    versions = {o.domain or "": o.version for o in model.opset_import}
    if "ai.onnx" in versions and "" not in versions:
        versions[""] = versions["ai.onnx"]
    ort_ops: dict[str, None] = {}
    unregistered: dict[str, None] = {}
    renamed: set[int] = set()
    for index, (node, graph_versions) in enumerate(_all_nodes(model, versions)):
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        version = graph_versions.get(domain)
        if version is None:
            continue  # onnx.checker reports a missing opset import
        if onnx.defs.has(node.op_type, version, domain):
            continue
        label = node.op_type if not domain else f"{domain}::{node.op_type}"
        schema = _ort_schema(domain, node.op_type, version)
        if schema is None:
            if domain in ONNX_DOMAINS:
                raise InvalidModel((checker_failed or f"No Op registered for {node.op_type} with domain_version "
                                    f"of {version}") + " (ONNX Runtime does not register it either)")
            unregistered[label] = None
            continue
        _check_against(node, schema, label)
        ort_ops[label] = None
        if domain in ONNX_DOMAINS:
            renamed.add(index)
    if checker_failed is not None:
        if not renamed:
            raise InvalidModel(checker_failed)
        _recheck_without(model, renamed)
    return Validity(tuple(sorted(ort_ops)), tuple(sorted(unregistered)))


def _all_nodes(model: onnx.ModelProto, versions: dict[str, int]):
    """(node, opset versions in scope) for every node: graph, subgraphs, and model-local functions."""
    def walk(graph_nodes, scope):
        for node in graph_nodes:
            yield node, scope
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attr.g.node, scope)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for sub in attr.graphs:
                        yield from walk(sub.node, scope)

    yield from walk(model.graph.node, versions)
    for function in model.functions:
        scope = dict(versions)
        scope.update({o.domain or "": o.version for o in function.opset_import})
        yield from walk(function.node, scope)


@functools.lru_cache(maxsize=1)
def _ort_schemas() -> dict[tuple[str, str], list]:
    """ONNX Runtime's operator schemas by (domain, op), oldest version first ({} without ONNX Runtime)."""
    try:
        from onnxruntime.capi.onnxruntime_pybind11_state import get_all_operator_schema
    except ImportError:  # pragma: no cover - onnxruntime is a dependency
        return {}
    table: dict[tuple[str, str], list] = {}
    for schema in get_all_operator_schema():
        domain = "" if schema.domain in ("", "ai.onnx") else schema.domain
        table.setdefault((domain, schema.name), []).append(schema)
    for schemas in table.values():
        schemas.sort(key=lambda s: s.since_version)
    return table


def _ort_schema(domain: str, op_type: str, version: int):
    """The ONNX Runtime schema of ``op_type`` in effect at opset ``version`` of ``domain``, or None."""
    candidates = [s for s in _ort_schemas().get((domain, op_type), []) if s.since_version <= version]
    if not candidates or candidates[-1].deprecated:
        return None
    return candidates[-1]


def _check_against(node: onnx.NodeProto, schema, label: str) -> None:
    """Input/output counts and attributes of ``node`` against an ONNX Runtime schema."""
    where = f"node {node.name or '(unnamed)'} ({label})"
    inputs = len(node.input)
    while inputs and not node.input[inputs - 1]:
        inputs -= 1  # trailing optional inputs left out
    outputs = len(node.output)
    if not schema.min_input <= inputs <= schema.max_input:
        raise InvalidModel(f"{where} has {inputs} inputs; ONNX Runtime's schema takes "
                           f"{schema.min_input} to {schema.max_input}")
    if not schema.min_output <= outputs <= schema.max_output:
        raise InvalidModel(f"{where} has {outputs} outputs; ONNX Runtime's schema gives "
                           f"{schema.min_output} to {schema.max_output}")
    known = schema.attributes
    for attr in node.attribute:
        if attr.name not in known:
            raise InvalidModel(f"{where} has attribute {attr.name!r}, which ONNX Runtime's schema does not define")
    given = {a.name for a in node.attribute}
    missing = [name for name, attr in known.items() if attr.required and name not in given]
    if missing:
        raise InvalidModel(f"{where} lacks the required attribute(s) {', '.join(missing)}")


def _recheck_without(model: onnx.ModelProto, renamed: set[int]) -> None:
    """``onnx.checker`` on the structure with the nodes at positions ``renamed`` (in :func:`_all_nodes`
    order) moved to a private domain, and initializers as typed inputs."""
    copy = onnx.ModelProto()
    _structure_copy(model, copy)
    for index, (node, _) in enumerate(_all_nodes(copy, {})):
        if index in renamed:
            node.domain = _RENAMED_DOMAIN
    copy.opset_import.append(onnx.helper.make_opsetid(_RENAMED_DOMAIN, 1))
    try:
        onnx.checker.check_model(copy, full_check=False)
    except onnx.checker.ValidationError as exc:
        raise InvalidModel(str(exc).strip().splitlines()[0]) from None


def _structure_copy(model: onnx.ModelProto, copy: onnx.ModelProto) -> None:
    """``model`` into ``copy`` without initializer data: each initializer becomes a typed graph input."""
    graph = model.graph
    copy.CopyFrom(onnx.ModelProto(ir_version=model.ir_version, producer_name=model.producer_name,
                                  opset_import=model.opset_import, functions=model.functions))
    inputs = list(graph.input)
    names = {v.name for v in inputs}
    for init in graph.initializer:
        if init.name not in names:
            inputs.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    copy.graph.CopyFrom(onnx.GraphProto(name=graph.name, node=graph.node, input=inputs, output=graph.output,
                                        value_info=graph.value_info))


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


SHAPE_VALUE_ELEMENTS = 4096
"""Initializers up to this size keep their values for symbolic inference (shape arithmetic reads them)."""


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """ONNX Runtime's symbolic shape inference (auto-merging symbols), or None when it fails.

    It runs on a slim copy — weights larger than :data:`SHAPE_VALUE_ELEMENTS` (and every external
    one, which it would otherwise try to read from the working directory) become typed graph
    inputs without data — so memory never holds the weights twice; the shapes it finds are then
    written into ``model``'s value_info. Shapes it could not infer are kept partial (its public
    entry point raises, and writes a file into the working directory, when any is left unknown);
    the declared graph outputs keep their own types; value_info without a shape is dropped.
    """
    SymbolicShapeInference = _symbolic_shape_inference()
    if SymbolicShapeInference is None:  # pragma: no cover - onnxruntime is a dependency
        return None
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
            inference._preprocess(_slim_copy(model))
            while inference.run_:
                inference._infer_impl()
            inferred = inference.out_mp_
    except Exception:  # it asserts on ops it does not know
        return None
    initializers = {t.name for t in model.graph.initializer}
    kept = [v for v in inferred.graph.value_info
            if v.type.tensor_type.HasField("shape") and v.name not in initializers]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    return model


@functools.lru_cache(maxsize=1)
def _symbolic_shape_inference():
    """ONNX Runtime's ``SymbolicShapeInference`` class, or None without ONNX Runtime.

    The module is loaded from its file rather than through ``onnxruntime.tools``, whose package init imports
    torch when it is installed (seconds of a compile's start, for a helper the compile never calls).
    """
    import importlib.util
    import sys

    name = "onnxruntime.tools.symbolic_shape_infer"
    if name in sys.modules:
        return sys.modules[name].SymbolicShapeInference
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "tools" / "symbolic_shape_infer.py"
    module_spec = importlib.util.spec_from_file_location("eecompile._ort_symbolic_shape_infer", path)
    if module_spec is None or not path.is_file():
        return None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SymbolicShapeInference


def _slim_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without the data of its large or external initializers (they become typed inputs)."""
    slim = onnx.ModelProto()
    graph = model.graph
    big = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
           or int(np.prod(t.dims, dtype=np.int64)) > SHAPE_VALUE_ELEMENTS]
    big_names = {t.name for t in big}
    for field, value in model.ListFields():
        if field.name != "graph":
            _copy_field(slim, field, value)
    for field, value in graph.ListFields():
        if field.name == "initializer":
            slim.graph.initializer.extend(t for t in value if t.name not in big_names)
        else:
            _copy_field(slim.graph, field, value)
    declared = {v.name for v in graph.input}
    slim.graph.input.extend(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                            for t in big if t.name not in declared)
    return slim


def _copy_field(target, field, value) -> None:
    if hasattr(value, "extend"):  # a repeated field
        getattr(target, field.name).extend(value)
    elif hasattr(value, "CopyFrom"):  # a message
        getattr(target, field.name).CopyFrom(value)
    else:
        setattr(target, field.name, value)


def _numpy_bfloat16(tensor: gs.Tensor) -> None:
    """graphsurgeon keeps bfloat16 as the ONNX enum (numpy has no such type): give it ml_dtypes' bfloat16."""
    holder = tensor._values if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues) else tensor
    if isinstance(holder.dtype, int) and holder.dtype == onnx.TensorProto.BFLOAT16:
        holder.dtype = BFLOAT16


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
        self.validity: Validity | None = None
        """The checks the loaded model passed (:func:`load_checked`), for the report; None when unknown."""
        self.options = CompileOptions()
        """What the user chose (:class:`~eecompile.passes.options.CompileOptions`); rules read it."""
        self.row_gains: dict[str, np.ndarray] = {}
        """Per-row gains normalize folded into a quantised weight (node name → gain over K), applied when
        that weight is re-quantised, so it is quantised once (``--requantize`` only)."""
        self.graph: gs.Graph = gs.import_onnx(model)
        for tensor in self.graph.tensors().values():
            if isinstance(tensor, gs.Constant) and isinstance(tensor._values, LazyValues) \
                    and not isinstance(tensor._values, (FileValues, DerivedValues)):
                values = self.store.resolve(tensor._values.tensor) or external_values(tensor._values.tensor,
                                                                                       Path(base_dir))
                if values is not None:
                    tensor._values = values
            _numpy_bfloat16(tensor)
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
        """The value of a constant tensor, or None for activations and missing inputs.

        A large weight still in its file is read for each call and not kept in memory by the graph."""
        if tensor is None:
            return None
        if isinstance(tensor, str):
            tensor = self.tensors.get(tensor)
        if isinstance(tensor, gs.Constant):
            lazy = tensor._values
            if isinstance(lazy, LazyValues) and lazy.nbytes >= INLINE_BYTES:
                return np.asarray(lazy.load())  # a weight: read for the caller, not kept in the graph
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
            return is_float_dtype(dtype)
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
